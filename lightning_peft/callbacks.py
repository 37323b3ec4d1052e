"""Lightning callbacks: inject a PEFT method, freeze the base, keep checkpoints adapter-only.

Lightning 2.6 runs ``Callback.setup -> LightningModule.setup -> configure_model -> (restore
ckpt_path weights) -> strategy.setup (precision, device move, DDP wrap, configure_optimizers) ->
on_fit_start``. :class:`PEFTCallback` therefore injects in ``setup`` and, when the module builds
layers in ``configure_model``, right after that hook (by wrapping the instance's method, undone
in ``teardown``), so the optimizer and DDP see the adapters. Injection is idempotent, so repeated
``fit``/``validate``/``test`` calls are safe.

Checkpoints hold only adapter tensors: the module's ``on_save_checkpoint`` is wrapped too (Lightning
calls it even for ``ModelCheckpoint(save_weights_only=True)``, which skips callback hooks), and
loading is non-strict with the adapter keys checked by us before any weight is touched.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft._base import adapter_named_parameters, trainable_parameters
from lightning_peft.lora import LoRAConfig, apply_lora, merge_adapters

_WRAPPED = "_lightning_peft_wrapped"


class PEFTCallback(Callback):
    """Base of every method's callback. A subclass sets ``self.config`` (a dataclass) and
    implements :meth:`apply` (inject + freeze, idempotent) with the method's plain function."""

    config: Any

    def __init__(self, merge_on_fit_end: bool = False, adapter_dir: str | None = None) -> None:
        self.merge_on_fit_end = merge_on_fit_end
        self.adapter_dir = adapter_dir
        self._module: pl.LightningModule | None = None
        self._trainer: pl.Trainer | None = None
        self._originals: dict[str, Any] = {}

    # -- what a method provides -------------------------------------------------------------
    def apply(self, module: nn.Module) -> nn.Module:
        raise TypeError(f"{type(self).__name__} must define apply(module)")

    def merge(self, module: nn.Module) -> None:
        merge_adapters(module)

    # -- Lightning plumbing -----------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**asdict(self.config))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config")
        if saved is not None and saved != asdict(self.config):
            rank_zero_warn(f"{type(self).__name__}: the checkpoint was written with config {saved}, "
                           f"this run uses {asdict(self.config)}")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module, self._trainer = pl_module, trainer
        pl_module.strict_loading = False
        if getattr(pl_module, _WRAPPED, None) is not self:
            self._wrap(pl_module)
        if not self._builds_in_configure_model(pl_module):
            self.apply(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, original in self._originals.items():
            if original is None:
                pl_module.__dict__.pop(name, None)
            else:
                pl_module.__dict__[name] = original
        self._originals = {}
        pl_module.__dict__.pop(_WRAPPED, None)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = trainable_parameters(pl_module)
        rank_zero_info(f"{type(self).__name__}: {counts}")
        for logger in trainer.loggers:
            logger.log_metrics({"peft/trainable_params": counts.trainable,
                                "peft/total_params": counts.total}, step=trainer.global_step)
        if counts.trainable == 0:
            rank_zero_warn(f"{type(self).__name__}: no parameter is trainable")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapter_dir is not None:
            self.save_adapter(self.adapter_dir)
        if self.merge_on_fit_end:
            self.merge(pl_module)

    def save_adapter(self, directory: str | Path) -> Path | None:
        """Write the adapter in HF PEFT format (rank 0 only); returns the directory on rank 0."""
        if self._module is None:
            raise RuntimeError(f"{type(self).__name__}.save_adapter needs a module: call it after "
                               "trainer.fit/validate/test has set the callback up")
        if self._trainer is not None and not self._trainer.is_global_zero:
            return None
        from lightning_peft.io import save_adapter

        return save_adapter(self._module, directory)

    # -- internals ----------------------------------------------------------------------------
    @staticmethod
    def _builds_in_configure_model(pl_module: pl.LightningModule) -> bool:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        return is_overridden("configure_model", pl_module, pl.LightningModule)

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        """Wrap instance hooks (no functools.wraps: Lightning's is_overridden follows __wrapped__)."""
        callback = self

        def hook(name: str, after) -> None:
            self._originals[name] = pl_module.__dict__.get(name)
            original = getattr(pl_module, name)

            def wrapped(*args, **kwargs):
                result = original(*args, **kwargs)
                after(*args, **kwargs)
                return result

            pl_module.__dict__[name] = wrapped

        if self._builds_in_configure_model(pl_module):
            hook("configure_model", lambda: callback.apply(pl_module))
        hook("on_save_checkpoint", lambda checkpoint: callback._filter_checkpoint(pl_module, checkpoint))
        hook("on_load_checkpoint", lambda checkpoint: callback._check_checkpoint(pl_module, checkpoint))
        pl_module.__dict__[_WRAPPED] = self

    @staticmethod
    def _filter_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen base tensors from ``checkpoint["state_dict"]`` (keys the user added stay)."""
        state = checkpoint.get("state_dict")
        if state is None:
            return
        keep = {name for name, _ in adapter_named_parameters(pl_module)}
        frozen = set(pl_module.state_dict(keep_vars=True)) - keep
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}

    @staticmethod
    def _check_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads (non-strictly): every adapter tensor must be there, shaped right."""
        state = checkpoint.get("state_dict", {})
        missing, misshaped = [], []
        for name, param in adapter_named_parameters(pl_module):
            if name not in state:
                missing.append(name)
            elif tuple(state[name].shape) != tuple(param.shape):
                misshaped.append(f"{name}: checkpoint {tuple(state[name].shape)}, "
                                 f"model {tuple(param.shape)}")
        if missing or misshaped:
            raise ValueError(
                "checkpoint does not match the adapters of the model: "
                + (f"{len(missing)} missing (e.g. {missing[:5]})" if missing else "")
                + ("; " if missing and misshaped else "")
                + (f"{len(misshaped)} mis-shaped ({misshaped[:5]})" if misshaped else "")
                + ". Was it written with the same PEFT callback and config?")


class LoRACallback(PEFTCallback):
    """Fine-tune with LoRA: ``Trainer(callbacks=[LoRACallback(r=8)])``.

    Arguments are those of :func:`lightning_peft.apply_lora` plus ``merge_on_fit_end`` (merge the
    adapters into the base weights when ``fit`` ends) and ``adapter_dir`` (write the adapter there
    in HF PEFT format when ``fit`` ends, on rank 0).
    """

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 modules_to_save: list[str] | None = None, use_rslora: bool = False,
                 init: str = "kaiming", bias: str = "none", merge_on_fit_end: bool = False,
                 adapter_dir: str | None = None) -> None:
        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                 exclude_modules=exclude_modules, modules_to_save=modules_to_save,
                                 use_rslora=use_rslora, init=init, bias=bias)

    @override
    def apply(self, module: nn.Module) -> nn.Module:
        return apply_lora(module, config=self.config)


class QLoRACallback(PEFTCallback):
    """Fine-tune with QLoRA: ``Trainer(callbacks=[QLoRACallback(r=16, target_modules="all-linear")],
    precision="bf16-true")``.

    The targeted base layers are quantized to 4-bit NF4 one at a time and LoRA trains in
    ``compute_dtype`` (a name: ``"bfloat16"``, ``"float16"`` or ``"float32"``). Arguments are
    those of :func:`lightning_peft.apply_qlora` plus ``merge_on_fit_end`` (merge into the 4-bit
    base, re-quantizing, when ``fit`` ends) and ``adapter_dir`` (write the adapter in HF PEFT
    format when ``fit`` ends, on rank 0). Checkpoints hold only the adapter; the NF4 base stays
    4-bit through precision "bf16-true"/"bf16-mixed" and device moves.
    """

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 modules_to_save: list[str] | None = None, use_rslora: bool = False,
                 init: str = "kaiming", bias: str = "none", double_quant: bool = True,
                 compute_dtype: str = "bfloat16", blocksize: int = 64,
                 merge_on_fit_end: bool = False, adapter_dir: str | None = None) -> None:
        from lightning_peft.qlora import QLoRAConfig

        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = QLoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                  exclude_modules=exclude_modules, modules_to_save=modules_to_save,
                                  use_rslora=use_rslora, init=init, bias=bias,
                                  double_quant=double_quant, compute_dtype=compute_dtype,
                                  blocksize=blocksize)

    @override
    def apply(self, module: nn.Module) -> nn.Module:
        from lightning_peft.qlora import apply_qlora

        return apply_qlora(module, config=self.config)
