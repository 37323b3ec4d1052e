"""Lightning callbacks: inject a PEFT method, freeze the base, keep checkpoints adapter-only.

Lightning 2.6 runs ``Callback.setup -> LightningModule.setup -> configure_model -> (restore
ckpt_path weights) -> strategy.setup (precision, device move, DDP wrap, configure_optimizers) ->
on_fit_start``. :class:`PEFTCallback` therefore injects in ``setup`` and, when the module builds
layers in ``configure_model``, right after that hook (by wrapping the instance's method), so the
optimizer and DDP see the adapters. Injection is idempotent, so repeated ``fit``/``validate``/
``test``/``predict`` calls are safe.

Checkpoints hold only adapter tensors (and adapter buffers, e.g. the BatchNorm statistics of a
module trained in full): the module's ``on_save_checkpoint`` is wrapped too (Lightning calls it
even for ``ModelCheckpoint(save_weights_only=True)``, which skips callback hooks). Loading is
non-strict, so the wrapped ``on_load_checkpoint`` checks, before any weight is touched, that the
checkpoint holds exactly the adapter of this run: every adapter tensor, nothing the model lacks,
and (where the checkpoint carries the callback's state) the same config.

The callback leaves no trace: every wrapped hook, ``strict_loading`` and the precision plugin's
``convert_module`` are put back in ``teardown`` and ``on_exception`` (a failed setup included).
A model whose adapters are merged is unmerged for the stage (``W0`` restored exactly, so a
checkpoint loads into, and ``fit`` trains, the unmerged adapters) and merged again when it ends.
Adapters that keep their own dtype (fp32 over a bf16 base, ``AdapterLayer.adapter_dtype``) keep
their values through "bf16-true"'s cast of the whole module.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_peft._base import (
    AdapterLayer,
    ModelState,
    adapter_named_buffers,
    adapter_named_parameters,
    first_names,
    merge_adapters,
    restore_adapter_dtypes,
    trainable_parameters,
)
from lightning_peft.fsdp import clean_name
from lightning_peft.io import _validate, check_method_tensors
from lightning_peft.methods import _grouping, apply_peft, get_method
from lightning_peft.methods.lora import LoRAConfig

_WRAPPED = "_lightning_peft_wrapped"
"""Key, in the module's ``__dict__``, of what the active callback changed (to undo it)."""


class PEFTCallback(Callback):
    """Base of every method's callback. A subclass names its registry ``method`` and sets
    ``self.config`` (the method's config dataclass) in a flat typed ``__init__``; :meth:`apply`
    injects and freezes through the registry (``apply_peft``), idempotently."""

    config: Any
    method: ClassVar[str] = ""
    """The registry name of the method (``lightning_peft.methods.get_method``)."""

    free_fields: tuple[str, ...] = ("dropout", "init", "autocast_adapter_dtype")
    """Config fields a checkpoint may differ in: they change how training runs or starts, not
    what the adapter tensors mean. Any other differing field refuses the checkpoint."""

    def __init__(self, merge_on_fit_end: bool = False, adapter_dir: str | None = None) -> None:
        if not isinstance(merge_on_fit_end, bool):
            raise ValueError(f"merge_on_fit_end must be True or False, got {merge_on_fit_end!r}")
        if adapter_dir is not None and not (isinstance(adapter_dir, (str, os.PathLike)) and str(adapter_dir)):
            raise ValueError(f"adapter_dir must be a directory path or None, got {adapter_dir!r}")
        self.merge_on_fit_end = merge_on_fit_end
        self.adapter_dir = adapter_dir
        self._module: pl.LightningModule | None = None
        self._trainer: pl.Trainer | None = None
        self._remerge: list[nn.Module] = []

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(self.config).items())
        return f"{type(self).__name__}({fields})"

    # -- what a method provides -------------------------------------------------------------
    def apply(self, module: nn.Module) -> nn.Module:
        """Inject the method's adapter into ``module`` and freeze the rest (idempotent)."""
        return apply_peft(module, self.config)

    def merge(self, module: nn.Module) -> None:
        merge_adapters(module)

    # -- Lightning plumbing -----------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**asdict(self.config))

    @override
    def state_dict(self) -> dict[str, Any]:
        # with what the shared-input groups learned, so a resumed run fuses from its first step,
        # and (one process) torch's random state, which the adapters' dropout draws from and
        # Lightning's checkpoints do not hold, so a resumed run draws the masks the whole run draws
        shared = _grouping.learned_state(self._module) if self._module is not None else {}
        state = {"config": asdict(self.config), **({"shared_input": shared} if shared else {})}
        if self._trainer is not None and self._trainer.world_size == 1:
            import torch

            state["rng"] = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_initialized():
                state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config")
        if isinstance(saved, dict):
            self._check_config(type(self).__qualname__, saved)
        shared = state_dict.get("shared_input")
        if isinstance(shared, dict) and self._module is not None:  # restored after setup
            _grouping.restore_learned(self._module, shared)
        rng = state_dict.get("rng")
        if isinstance(rng, dict) and self._trainer is not None and self._trainer.world_size == 1 \
                and self._trainer.state.fn == "fit":
            import torch

            if isinstance(rng.get("cpu"), Tensor):
                torch.set_rng_state(rng["cpu"])
            cuda = rng.get("cuda")
            devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if isinstance(cuda, list) and len(cuda) == devices > 0:
                torch.cuda.set_rng_state_all(cuda)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        peft = list({id(c): c for c in trainer.callbacks if isinstance(c, PEFTCallback)}.values())
        if len(peft) > 1:
            raise ValueError(f"more than one PEFT callback on one module: {' and '.join(map(repr, peft))}. "
                             "A module takes one PEFT callback: keep one (its target_modules can list "
                             "every layer to adapt)")
        self._module, self._trainer = pl_module, trainer
        _unwrap(pl_module)  # a wrapping left by a run that never ended is undone, never stacked
        try:
            self._wrap(pl_module, trainer)
            self._remerge += _unmerge(pl_module)
            if not self._builds_in_configure_model(pl_module):
                self.apply(pl_module)
        except BaseException:
            self._undo(pl_module)
            raise

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._undo(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._undo(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merge_on_fit_end:  # refused now, not after the training
            from lightning_peft.fsdp import refuse_sharded

            refuse_sharded(pl_module, f"{type(self).__name__}(merge_on_fit_end=True)")
        restore_adapter_dtypes(pl_module)
        counts = trainable_parameters(pl_module)
        rank_zero_info(f"{type(self).__name__}: {counts}")
        for logger in trainer.loggers:
            logger.log_metrics({"peft/trainable_params": counts.trainable,
                                "peft/total_params": counts.total}, step=trainer.global_step)
        if counts.trainable == 0:
            rank_zero_warn(f"{type(self).__name__}: no parameter is trainable")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        idle = sorted({type(m).__name__ for m in pl_module.modules() if isinstance(m, AdapterLayer)
                       and not m.training and isinstance(getattr(m, "dropout", None), float)
                       and m.dropout > 0})
        if idle:  # Lightning keeps submodules' modes; transformers' from_pretrained gives eval
            rank_zero_warn(f"{type(self).__name__}: the adapter layers ({', '.join(idle)}) start training in "
                           "eval mode, so their dropout does not run: the model was in eval mode when the "
                           "adapter went in (transformers' from_pretrained returns eval mode, and Lightning "
                           "keeps submodules' modes); call model.train() before Trainer.fit")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_adapter_dtypes(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_adapter_dtypes(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_adapter_dtypes(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapter_dir is not None:
            self.save_adapter(self.adapter_dir)
        if self.merge_on_fit_end:
            self.merge(pl_module)

    def save_adapter(self, directory: str | Path) -> Path | None:
        """Write the adapter in HF PEFT format (rank 0 only); returns the directory on rank 0.
        Under FSDP (``strategy="fsdp"``, ``ModelParallelStrategy``) call it on every rank: the
        shards are gathered and rank 0 writes the full adapter."""
        if self._module is None:
            raise RuntimeError(f"{type(self).__name__}.save_adapter needs a module: call it after "
                               "trainer.fit/validate/test has set the callback up")
        from lightning_peft.fsdp import is_sharded
        from lightning_peft.io import save_adapter

        outer = getattr(self._trainer.strategy, "model", None) if self._trainer is not None else None
        if outer is not None and is_sharded(outer):  # FSDP: every rank gathers, rank 0 writes
            path = save_adapter(outer, directory)
            return path if self._trainer.is_global_zero else None
        if self._trainer is not None and not self._trainer.is_global_zero:
            return None
        return save_adapter(self._module, directory)

    # -- internals ----------------------------------------------------------------------------
    @staticmethod
    def _builds_in_configure_model(pl_module: pl.LightningModule) -> bool:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        return is_overridden("configure_model", pl_module, pl.LightningModule)

    def _wrap(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> None:
        """Wrap instance hooks (no functools.wraps: Lightning's is_overridden follows __wrapped__)
        and the precision plugin's ``convert_module``; record what was there, for :func:`_unwrap`."""
        record: dict[str, Any] = {"callback": self, "hooks": {},
                                  "strict_loading": getattr(pl_module, "_strict_loading", None)}
        pl_module.__dict__[_WRAPPED] = record

        def hook(owner: Any, name: str, after) -> None:
            record["hooks"][(id(owner), name)] = (owner, owner.__dict__.get(name))
            original = getattr(owner, name)

            def wrapped(*args, **kwargs):
                result = original(*args, **kwargs)
                after(*args, **kwargs)
                return result

            owner.__dict__[name] = wrapped

        if self._builds_in_configure_model(pl_module):
            hook(pl_module, "configure_model", lambda: _check_injected_before_sharding(self.apply(pl_module)))
        hook(pl_module, "on_save_checkpoint", lambda ckpt: self._filter_checkpoint(pl_module, ckpt))
        hook(pl_module, "on_load_checkpoint", lambda ckpt: self._check_checkpoint(pl_module, ckpt))
        pl_module.strict_loading = False
        plugin = trainer.precision_plugin
        record["hooks"][(id(plugin), "convert_module")] = (plugin, plugin.__dict__.get("convert_module"))
        convert = plugin.convert_module

        def convert_module(module: nn.Module) -> nn.Module:
            """The plugin's cast, with the adapters that keep their own dtype put back exactly."""
            kept = _adapter_data(module)
            result = convert(module)
            for param, data in kept:
                if param.dtype != data.dtype:
                    param.data = data
            return result

        plugin.__dict__["convert_module"] = convert_module
        _wrap_sharded_load(trainer.strategy, pl_module, record)

    def _undo(self, pl_module: pl.LightningModule) -> None:
        """Undo this callback's wrapping, merge again what :meth:`setup` unmerged."""
        record = pl_module.__dict__.get(_WRAPPED)
        if record is not None and record["callback"] is self:
            _unwrap(pl_module)
        layers, self._remerge = self._remerge, []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a 4-bit base re-quantizes: warned at the first merge
            for layer in layers:
                if not layer.merged:
                    layer.merge()

    @staticmethod
    def _filter_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen base tensors from ``checkpoint["state_dict"]`` (adapter tensors,
        adapter buffers and keys the user added stay)."""
        state = checkpoint.get("state_dict")
        if state is None:
            return
        keep = {clean_name(name) for name, _ in adapter_named_parameters(pl_module)}
        keep.update(clean_name(name) for name, _ in adapter_named_buffers(pl_module))
        frozen = _state_keys(pl_module) - keep
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}

    def _check_checkpoint(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads (non-strictly): the checkpoint is this run's adapter. Its
        callback state (absent from weights-only checkpoints) has this config, up to
        :attr:`free_fields`; its ``state_dict`` holds every adapter tensor and buffer of the model,
        shaped as in the model, and no tensor the model lacks."""
        saved = self._saved_config(checkpoint)
        config = None if saved is None else self._config_differences(*saved)
        state = checkpoint.get("state_dict")
        if state is None and self._check_strategy_loaded_checkpoint(pl_module):
            return
        if not isinstance(state, dict):
            raise ValueError(f"the checkpoint has no 'state_dict' (keys: {sorted(map(str, checkpoint))}); "
                             f"{type(self).__name__} loads the adapter from it")
        expected: dict[str, Tensor] = {clean_name(n): p for n, p in adapter_named_parameters(pl_module)}
        expected.update((clean_name(n), b) for n, b in adapter_named_buffers(pl_module))
        known = _state_keys(pl_module)
        given = {k: v for k, v in state.items() if k in expected or k not in known}
        if _has_fsdp1(pl_module):  # FSDP1 holds flat shards outside forward: check names, not shapes
            expected = {k: given.get(k, v) for k, v in expected.items()}
        hint = f" It was written {config}." if config else ""
        _validate(expected, given, strict=True, where="checkpoint",
                  hint=hint + f" Use a checkpoint written with {self!r}.")
        if not _has_fsdp1(pl_module):
            check_method_tensors(pl_module, given, "checkpoint")  # e.g. FishMask's indices
        if config:
            raise ValueError(f"the checkpoint was written {config}. Nothing was loaded; the model is "
                             "unchanged. Use the checkpoint's config, or a checkpoint written with this one.")
        carried = self._checkpoint_base(pl_module)
        base = sorted(k for k in state if k in known and k not in expected and k not in carried)
        if base:  # Lightning would load them (non-strictly) over the model's frozen base
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in set(base)}
            rank_zero_warn(f"{type(self).__name__}: the checkpoint also holds {len(base)} frozen base "
                           f"tensor(s) ({first_names(base)}); they were not loaded: the frozen base "
                           "comes from the model (after merge_on_fit_end they would hold the merged "
                           "update and apply it twice)")

    def _checkpoint_base(self, pl_module: nn.Module) -> set[str]:
        """Names of frozen base tensors this method's checkpoints carry and load (none here)."""
        return set()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # the module's own hook filters while the callback is set up (weights-only saves reach
        # only that one); trainer.save_checkpoint after fit (the module unwrapped at teardown)
        # reaches only this one
        if _WRAPPED not in pl_module.__dict__ and adapter_named_parameters(pl_module):
            self._filter_checkpoint(pl_module, checkpoint)

    def _check_strategy_loaded_checkpoint(self, pl_module: nn.Module) -> bool:
        """FSDP, ModelParallelStrategy and DeepSpeed load the weights themselves, before this hook
        (which then gets no ``state_dict``): check from the file (a distributed checkpoint's
        metadata, or the consolidated file's keys) that it held every adapter tensor of the model
        (a ``ValueError`` naming the missing ones); a DeepSpeed directory is left to DeepSpeed.
        False when there is no such file or directory."""
        path = getattr(self._trainer, "ckpt_path", None)
        if path is None:
            return False
        if (Path(path) / ".metadata").is_file():
            from torch.distributed.checkpoint import FileSystemReader

            stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
            # ModelParallelStrategy stores the module under "state_dict.", FSDPStrategy under "model."
            prefix = "state_dict." if any(k.startswith("state_dict.") for k in stored) else "model."
            keys = {k.removeprefix(prefix) for k in stored if k.startswith(prefix)}
        elif Path(path).is_file():
            import torch

            stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            keys = set(stored.get("state_dict", {}))
        else:  # another strategy's directory (DeepSpeed's): it loaded what it holds, unchecked here
            return Path(path).is_dir()
        expected = {clean_name(n) for n, _ in adapter_named_parameters(pl_module)}
        expected.update(clean_name(n) for n, _ in adapter_named_buffers(pl_module))
        missing = sorted(expected - keys)
        if missing:
            raise ValueError(f"the checkpoint {path} lacks {len(missing)} adapter tensors of "
                             f"this model ({missing[:3]}...). Use a checkpoint written with {self!r}.")
        return True

    def _saved_config(self, checkpoint: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """``(callback class name, config)`` of the PEFT callback that wrote ``checkpoint``, from
        its ``"callbacks"`` states (keyed by ``state_key``: class name + config), or None."""
        names = _peft_callback_names()
        found = {key: state["config"] for key, state in (checkpoint.get("callbacks") or {}).items()
                 if isinstance(key, str) and key.split("{", 1)[0] in names and isinstance(state, dict)
                 and isinstance(state.get("config"), dict)}
        if self.state_key in found:
            return type(self).__qualname__, found[self.state_key]
        if len(found) > 1:
            raise ValueError(f"the checkpoint holds the states of {len(found)} PEFT callbacks "
                             f"({sorted(found)}), none with this run's config: {self!r}")
        return next(((key.split("{", 1)[0], config) for key, config in found.items()), None)

    def _check_config(self, name: str, saved: dict[str, Any]) -> None:
        """A ``ValueError`` naming every differing field, unless ``saved`` (a config written by
        the callback class ``name``) is this callback's config up to :attr:`free_fields`."""
        config = self._config_differences(name, saved)
        if config:
            raise ValueError(f"the checkpoint was written {config}")

    def _config_differences(self, name: str, saved: dict[str, Any]) -> str | None:
        """How ``saved`` (a config written by the callback class ``name``) differs from this
        callback's config, outside :attr:`free_fields`, as ``"with another ... config: ..."``;
        None when it does not."""
        if name != type(self).__qualname__:
            return f"by {name} (config {saved}), this run uses {self!r}"
        current = asdict(self.config)
        differ = [f"{field}: {saved[field]!r} in the checkpoint, {value!r} in this run"
                  for field, value in current.items()
                  if field in saved and field not in self.free_fields and saved[field] != value]
        return f"with another {name} config: " + "; ".join(differ) if differ else None


def inject_adapters(pl_module: pl.LightningModule) -> pl.LightningModule:
    """Inject the adapter of the trainer's PEFT callback into ``pl_module`` now (idempotent).

    For ``configure_model`` hooks that shard with FSDP2 (``ModelParallelStrategy``): FSDP2 manages
    only the parameters present when ``fully_shard`` runs, so build the model, call this, then
    shard (:func:`lightning_peft.fsdp.fully_shard_peft`)::

        def configure_model(self):
            self.model = build_model()
            inject_adapters(self)
            fully_shard_peft(self.model, mesh=self.device_mesh["data_parallel"])
    """
    trainer = pl_module._trainer
    peft = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, PEFTCallback)]
    if not peft:
        raise ValueError("inject_adapters(pl_module) needs a trainer with a PEFT callback (e.g. "
                         "LoRACallback); call it inside configure_model of a module being fit")
    peft[0].apply(pl_module)
    return pl_module


def _check_injected_before_sharding(module: nn.Module) -> nn.Module:
    """A ``RuntimeError`` when FSDP2 sharded ``module`` before the adapters existed: their
    gradients would never be reduced across ranks."""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in module.modules()):
        late = [n for n, p in adapter_named_parameters(module) if not hasattr(p, "full_tensor")]
        if late:
            raise RuntimeError(f"configure_model sharded the model with fully_shard before the adapter was "
                               f"injected ({late[:3]} are not sharded), so FSDP would not reduce their "
                               "gradients: call lightning_peft.inject_adapters(self) in configure_model "
                               "before fully_shard")
    return module


def _wrap_sharded_load(strategy: Any, pl_module: nn.Module, record: dict[str, Any]) -> None:
    """Let ``ModelParallelStrategy`` and ``FSDPStrategy`` resume from an adapter-only distributed
    (sharded) checkpoint.

    Lightning 2.6 asks a distributed checkpoint for every key of the module's state dict
    (``get_model_state_dict`` for FSDP2, the FSDP1 wrapper's sharded ``state_dict()``), which an
    adapter-only checkpoint lacks; while it loads one, that ``state_dict`` is narrowed to the keys
    the checkpoint holds (read from its metadata). :meth:`PEFTCallback._check_checkpoint` then
    checks that every adapter tensor was among them."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        prefix = "state_dict."
    elif isinstance(strategy, FSDPStrategy):
        prefix = "model."
    else:
        return
    record["hooks"][(id(strategy), "load_checkpoint")] = (strategy, strategy.__dict__.get("load_checkpoint"))
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        metadata = Path(checkpoint_path) / ".metadata"
        if not metadata.is_file():
            return original(checkpoint_path, *args, **kwargs)
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(str(checkpoint_path)).read_metadata().state_dict_metadata
        keys = {k.removeprefix(prefix) for k in stored if k.startswith(prefix)}
        # FSDP2: the LightningModule's own state_dict; FSDP1: the wrapper's (strategy.model)
        owner = pl_module if prefix == "state_dict." else strategy.model
        full = type(owner).state_dict

        def state_dict(*a: Any, **kw: Any) -> dict[str, Any]:
            return {k: v for k, v in full(owner, *a, **kw).items() if k in keys}

        owner.__dict__["state_dict"] = state_dict
        try:
            return original(checkpoint_path, *args, **kwargs)
        finally:
            owner.__dict__.pop("state_dict", None)

    strategy.__dict__["load_checkpoint"] = load_checkpoint


def _has_fsdp1(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def _state_keys(module: nn.Module) -> set[str]:
    """The keys of ``module.state_dict()``; under FSDP1 (whose state dict gathers the whole model)
    the names of its parameters and buffers, without the wrapper prefixes."""
    if _has_fsdp1(module):
        return {clean_name(n) for n, _ in module.named_parameters()} | \
            {clean_name(n) for n, _ in module.named_buffers()}
    return set(module.state_dict(keep_vars=True))


def _peft_callback_names() -> set[str]:
    """``__qualname__`` of every PEFTCallback class (the prefix of their ``state_key``)."""
    names, todo = set(), [PEFTCallback]
    while todo:
        cls = todo.pop()
        names.add(cls.__qualname__)
        todo.extend(cls.__subclasses__())
    return names


def _unwrap(pl_module: nn.Module) -> None:
    """Put back what a callback's ``_wrap`` changed on ``pl_module`` (and on the precision
    plugin), if anything."""
    record = pl_module.__dict__.pop(_WRAPPED, None)
    if record is None:
        return
    for (_, name), (owner, original) in record["hooks"].items():
        if original is None:
            owner.__dict__.pop(name, None)
        else:
            owner.__dict__[name] = original
    pl_module.strict_loading = record["strict_loading"]


def _unmerge(module: nn.Module) -> list[nn.Module]:
    """Unmerge every merged adapter layer of ``module`` (restoring its base weight exactly);
    return them, to merge again when the stage ends."""
    layers = [m for m in module.modules() if isinstance(m, AdapterLayer) and getattr(m, "merged", False)]
    for layer in layers:
        layer.unmerge()
    return layers


def _adapter_data(module: nn.Module) -> list[tuple[nn.Parameter, Tensor]]:
    """``(parameter, its tensor)`` of the adapter parameters already in their layer's
    ``adapter_dtype``, to put back after a cast of the whole module."""
    kept = []
    for layer in module.modules():
        dtype = getattr(layer, "adapter_dtype", None) if isinstance(layer, AdapterLayer) else None
        if dtype is not None:
            kept.extend((p, p.data) for p in layer.adapter_parameters().values() if p.dtype == dtype)
    return kept


def fisher_batches(trainer: pl.Trainer, pl_module: pl.LightningModule, count: int,
                   loss_fn: Any = None) -> tuple[list[Any], Any]:
    """``(batches, loss)`` for estimating the Fisher information inside a Lightning run (the
    callbacks of Child-tuning's task-driven mode and FishMask): the first ``count`` batches of the
    run's training data (the datamodule's, the module's or those passed to ``fit``), moved to the
    run's device (the module is moved there too), and ``loss(batch)``, a scalar.

    ``loss`` is ``loss_fn(pl_module, batch)`` when given, else ``pl_module.loss(batch)`` where the
    module has one (the shipped tasks do), else its ``training_step(batch, i)`` (its ``"loss"``
    entry for a dict) with ``self.log`` silenced, since no loop is running yet."""
    source = trainer.fit_loop._data_source
    if source.instance is None:
        raise ValueError("the Fisher information needs training data: call trainer.fit(model, "
                         "datamodule=...) or pass train_dataloaders")
    loader = source.dataloader()
    device = trainer.strategy.root_device
    pl_module.to(device)
    batches = []
    for i, batch in enumerate(loader):
        if i >= count:
            break
        batches.append(trainer.strategy.batch_to_device(batch, device))
    if not batches:
        raise ValueError("the training data gave no batch to estimate the Fisher information from")
    if loss_fn is not None:
        return batches, lambda batch: loss_fn(pl_module, batch)
    if callable(getattr(pl_module, "loss", None)):
        return batches, pl_module.loss
    steps = iter(range(len(batches)))

    def step_loss(batch: Any) -> Tensor:
        pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = lambda *a, **k: None
        try:
            out = pl_module.training_step(batch, next(steps))
        finally:
            pl_module.__dict__.pop("log", None)
            pl_module.__dict__.pop("log_dict", None)
        return out["loss"] if isinstance(out, dict) else out

    return batches, step_loss


class LoRACallback(PEFTCallback):
    """Fine-tune with LoRA: ``Trainer(callbacks=[LoRACallback(r=8)])``.

    Arguments are those of :func:`lightning_peft.apply_lora` (``use_dora=True``: DoRA, as HF PEFT
    spells it; ``trainable_token_indices``: those embedding rows train as well) plus
    ``merge_on_fit_end`` (merge the adapters into the base weights when ``fit`` ends) and
    ``adapter_dir`` (write the adapter there in HF PEFT format when ``fit`` ends, on rank 0).
    """

    method = "lora"

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 modules_to_save: list[str] | None = None, use_rslora: bool = False,
                 init: str = "kaiming", bias: str = "none", autocast_adapter_dtype: bool = True,
                 use_dora: bool = False, merge_on_fit_end: bool = False,
                 adapter_dir: str | None = None,
                 trainable_token_indices: list[int] | dict[str, list[int]] | None = None) -> None:
        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                 exclude_modules=exclude_modules, modules_to_save=modules_to_save,
                                 use_rslora=use_rslora, init=init, bias=bias,
                                 autocast_adapter_dtype=autocast_adapter_dtype, use_dora=use_dora,
                                 trainable_token_indices=trainable_token_indices)


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

    method = "qlora"

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 modules_to_save: list[str] | None = None, use_rslora: bool = False,
                 init: str = "kaiming", bias: str = "none", double_quant: bool = True,
                 compute_dtype: str = "bfloat16", blocksize: int = 64,
                 merge_on_fit_end: bool = False, adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.qlora import QLoRAConfig

        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = QLoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                  exclude_modules=exclude_modules, modules_to_save=modules_to_save,
                                  use_rslora=use_rslora, init=init, bias=bias,
                                  double_quant=double_quant, compute_dtype=compute_dtype,
                                  blocksize=blocksize)

    @override
    def apply(self, module: nn.Module) -> nn.Module:
        """Inject QLoRA; under an FSDP strategy also store the 4-bit bytes as parameters FSDP
        shards (:class:`lightning_peft.fsdp.ShardableNF4Linear`): ``ModelParallelStrategy`` (FSDP2)
        in uint8, ``strategy="fsdp"`` (FSDP1, one dtype per unit) in the precision's dtype
        ("bf16-true": bfloat16, "16-true": float16, otherwise float32; match ``compute_dtype``)."""
        module = super().apply(module)
        storage = _nf4_storage_dtype(self._trainer)
        if storage is not None:
            from lightning_peft.fsdp import prepare_nf4_for_fsdp

            prepare_nf4_for_fsdp(module, storage)
        return module


def _nf4_storage_dtype(trainer: pl.Trainer | None) -> Any:
    """The storage dtype of a 4-bit base under the trainer's FSDP strategy, None without one."""
    import torch
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, ModelParallelStrategy):
        return torch.uint8
    if isinstance(strategy, FSDPStrategy):
        precision = str(trainer.precision)
        if precision.endswith("-mixed"):
            raise ValueError(f"QLoRACallback under strategy='fsdp' needs precision 'bf16-true', '16-true' or "
                             f"'32-true', got {precision!r}: FSDP1's mixed precision casts every flat "
                             "parameter, the stored 4-bit bytes included (ModelParallelStrategy has no "
                             "such limit)")
        return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)
    return None


class IA3Callback(PEFTCallback):
    """Fine-tune with (IA)³: ``Trainer(callbacks=[IA3Callback()])``: learned vectors rescale the
    keys, values and feed-forward activations (the architecture's defaults when no targets are
    named, as HF PEFT).

    Arguments are those of :func:`lightning_peft.apply_ia3` plus ``merge_on_fit_end`` (fold the
    vectors into the base weights when ``fit`` ends) and ``adapter_dir`` (write the adapter there
    in HF PEFT's IA3 format when ``fit`` ends, on rank 0).
    """

    method = "ia3"

    def __init__(self, target_modules: str | list[str] | None = None,
                 feedforward_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 modules_to_save: list[str] | None = None, init_ia3_weights: bool = True,
                 autocast_adapter_dtype: bool = True, merge_on_fit_end: bool = False,
                 adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.ia3 import IA3Config

        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = IA3Config(target_modules=target_modules, feedforward_modules=feedforward_modules,
                                exclude_modules=exclude_modules, modules_to_save=modules_to_save,
                                init_ia3_weights=init_ia3_weights,
                                autocast_adapter_dtype=autocast_adapter_dtype)


class BitFitCallback(PEFTCallback):
    """Fine-tune with BitFit: ``Trainer(callbacks=[BitFitCallback(trainable_modules=["classifier"])])``.

    Only biases train (all of them by default, LayerNorm's included), plus the modules named in
    ``trainable_modules``, in full. Arguments are those of :func:`lightning_peft.apply_bitfit`
    plus ``adapter_dir`` (write the adapter there when ``fit`` ends, on rank 0). BitFit has
    nothing to merge.
    """

    method = "bitfit"

    def __init__(self, target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 trainable_modules: list[str] | None = None, add_missing_biases: bool = False,
                 adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.bitfit import BitFitConfig

        super().__init__(adapter_dir=adapter_dir)
        self.config = BitFitConfig(target_modules=target_modules, exclude_modules=exclude_modules,
                                   trainable_modules=trainable_modules,
                                   add_missing_biases=add_missing_biases)


class TrainableTokensCallback(PEFTCallback):
    """Train only some token rows of the embedding:
    ``Trainer(callbacks=[TrainableTokensCallback(token_indices=new_ids)])``.

    Only the rows ``token_indices`` of the input embedding (or of ``target_modules``) train, as
    one (n, d) tensor; a head tied to the embedding follows them (stage 1 of Chinese-LLaMA's
    recipe after :func:`lightning_peft.add_tokens`). Arguments are those of
    :func:`lightning_peft.apply_trainable_tokens` plus ``merge_on_fit_end`` (write the rows into
    the embedding when ``fit`` ends) and ``adapter_dir`` (write the adapter there in HF PEFT's
    TRAINABLE_TOKENS format when ``fit`` ends, on rank 0). Beside LoRA, use
    ``LoRACallback(trainable_token_indices=...)`` instead.
    """

    method = "trainable_tokens"

    def __init__(self, token_indices: list[int], target_modules: str | list[str] | None = None,
                 merge_on_fit_end: bool = False, adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.trainable_tokens import TrainableTokensConfig

        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = TrainableTokensConfig(token_indices=token_indices, target_modules=target_modules)


class DyLoRACallback(PEFTCallback):
    """Fine-tune with DyLoRA: ``Trainer(callbacks=[DyLoRACallback(r=8, r_min=1)])``: every training
    batch runs at one rank ``b`` drawn in ``[r_min, r]`` for the whole model, so that afterwards
    ``truncate_rank(model, b)`` gives a working rank-``b`` adapter for any ``b``.

    Arguments are those of :func:`lightning_peft.apply_dylora` plus ``merge_on_fit_end`` (merge at
    the full rank when ``fit`` ends) and ``adapter_dir`` (write the adapter there when ``fit``
    ends, on rank 0). ``b`` is drawn in ``on_train_batch_start`` by
    :func:`~lightning_peft.methods.dylora.dylora_sample_rank` with a generator seeded with
    ``seed`` (the same on every process, so DDP ranks agree); its state is checkpointed, so a
    resumed run continues the sequence. Validation runs at the full rank; when training ends the
    layers are set back to it.
    """

    method = "dylora"
    free_fields = ("dropout", "init", "autocast_adapter_dtype", "r_min", "distribution", "seed")

    def __init__(self, r: int = 8, alpha: float = 16.0, r_min: int = 1, distribution: str = "uniform",
                 seed: int = 0, dropout: float = 0.0, target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 modules_to_save: list[str] | None = None, use_rslora: bool = False,
                 init: str = "kaiming", bias: str = "none", autocast_adapter_dtype: bool = True,
                 merge_on_fit_end: bool = False, adapter_dir: str | None = None) -> None:
        import torch

        from lightning_peft.methods.dylora import DyLoRAConfig

        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = DyLoRAConfig(r=r, alpha=alpha, r_min=r_min, distribution=distribution, seed=seed,
                                   dropout=dropout, target_modules=target_modules,
                                   exclude_modules=exclude_modules, modules_to_save=modules_to_save,
                                   use_rslora=use_rslora, init=init, bias=bias,
                                   autocast_adapter_dtype=autocast_adapter_dtype)
        self.generator = torch.Generator().manual_seed(seed)  # draws each step's rank (CPU)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        from lightning_peft.methods.dylora import dylora_sample_rank

        dylora_sample_rank(pl_module, self.generator)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._full_rank(pl_module)

    def _undo(self, pl_module: pl.LightningModule) -> None:
        try:
            self._full_rank(pl_module)  # also after an exception in the middle of a step's rank
        finally:
            super()._undo(pl_module)

    @staticmethod
    def _full_rank(pl_module: pl.LightningModule) -> None:
        """Every unmerged DyLoRA layer back at its full rank (merged ones keep the rank they were
        merged at: ``merge_on_fit_end`` merges after ``on_train_end`` set the full rank)."""
        from lightning_peft.methods.dylora import dylora_layers

        for _, layer in dylora_layers(pl_module):
            if not layer.merged:
                layer.set_rank_in_use(None)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if isinstance(state_dict.get("generator"), Tensor):
            self.generator.set_state(state_dict["generator"])


class ReLoRACallback(PEFTCallback):
    """Train with ReLoRA (arXiv 2307.05695): ``Trainer(callbacks=[ReLoRACallback(r=8, reset_every=200)])``.

    LoRA trains in cycles of ``reset_every`` optimizer steps; after the optimizer step that
    completes a cycle the callback calls :func:`lightning_peft.methods.relora.relora_reset` (merge
    ``s·B·A`` into the base weight, re-initialise A and B, keep the ``optimizer_keep`` largest
    entries of the adapters' optimizer state, zero the rest). The new A after the reset at step t
    is drawn from ``seed + t``, the run's seed drawn on rank 0 and checkpointed: every DDP rank
    draws the same A, and a resumed run the A the interrupted one would have drawn.

    Learning rate: with ``lr_schedule="jagged_cosine"`` (default) the callback installs, when
    ``fit`` starts, the paper's jagged cosine on every optimizer (stepped every optimizer step:
    ``warmup_steps`` of warmup, a cosine down to ``min_lr_ratio`` over ``total_steps``, by default
    ``trainer.estimated_stepping_batches``, and ``restart_warmup`` steps of warmup after each
    reset), replacing any scheduler the module configured (with a warning). With
    ``lr_schedule="module"`` the module's own scheduler is kept: return
    ``jagged_cosine_schedule(optimizer, ...)`` from ``configure_optimizers`` to keep the restarts.

    Checkpoints hold the adapter and the base weights of the adapted layers, which the resets
    change, so a run resumes exactly; loading a checkpoint without them is refused. The product of
    ReLoRA is the merged full model (``merge_on_fit_end=True``, or ``merge_adapters``); the
    adapter written to ``adapter_dir`` (HF PEFT's LoRA format) is, after a reset, the last
    cycle's LoRA over the merged base, and a warning says so. The other arguments are those of
    :func:`lightning_peft.methods.relora.apply_relora`. A 4-bit base is refused.
    """

    method = "relora"
    LR_SCHEDULES = ("jagged_cosine", "module")

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 modules_to_save: list[str] | None = None, use_rslora: bool = False,
                 init: str = "kaiming", bias: str = "none", autocast_adapter_dtype: bool = True,
                 reset_every: int = 1000, optimizer_keep: float = 0.01, restart_warmup: int = 50,
                 lr_schedule: str = "jagged_cosine", warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 total_steps: int | None = None, merge_on_fit_end: bool = False,
                 adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.relora import JaggedCosine, ReLoRAConfig

        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = ReLoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                   exclude_modules=exclude_modules, modules_to_save=modules_to_save,
                                   use_rslora=use_rslora, init=init, bias=bias,
                                   autocast_adapter_dtype=autocast_adapter_dtype, reset_every=reset_every,
                                   optimizer_keep=optimizer_keep, restart_warmup=restart_warmup)
        if lr_schedule not in self.LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {self.LR_SCHEDULES}, got {lr_schedule!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)) \
                or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {min_lr_ratio!r}")
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
                raise ValueError(f"total_steps must be a positive integer or None (the trainer's "
                                 f"estimated_stepping_batches), got {total_steps!r}")
            JaggedCosine(total_steps, reset_every, restart_warmup, warmup_steps, min_lr_ratio)  # checks
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.min_lr_ratio, self.total_steps = float(min_lr_ratio), total_steps
        self._last_reset: int | None = None
        self._seed: int | None = None
        """The run's seed of the re-initialised A (drawn on rank 0 when fit starts; the reset at
        step t draws from ``seed + t``), checkpointed, so a resumed run draws the same A."""

    @override
    def state_dict(self) -> dict[str, Any]:
        from lightning_peft.methods.relora import relora_resets

        resets = relora_resets(self._module) if self._module is not None else 0
        return {**super().state_dict(), "resets": resets, "seed": self._seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from lightning_peft.methods.relora import _set_resets

        super().load_state_dict(state_dict)
        resets = state_dict.get("resets")
        if self._module is not None and isinstance(resets, int) and not isinstance(resets, bool):
            _set_resets(self._module, resets)
        seed = state_dict.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            self._seed = seed

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch

        super().on_fit_start(trainer, pl_module)
        self._last_reset = None
        if self._seed is None:
            self._seed = int(trainer.strategy.broadcast(int(torch.randint(0, 2**31 - 1, ()).item()), src=0))
        if self.lr_schedule == "jagged_cosine":
            self._install_schedule(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # (after a resumed run's step is restored) a run resumed at a reset step made that reset
        # before its checkpoint was written: under gradient accumulation its first batches still
        # see that step, and must not reset again
        self._last_reset = trainer.global_step

    def _install_schedule(self, trainer: pl.Trainer) -> None:
        """Put a jagged cosine ``LambdaLR`` on every optimizer, in place of the module's schedulers
        (Lightning restores a resumed run's scheduler state into it afterwards)."""
        from lightning.pytorch.utilities.types import LRSchedulerConfig

        from lightning_peft.methods.relora import jagged_cosine_schedule

        total = self.total_steps
        if total is None:
            estimated = trainer.estimated_stepping_batches
            if estimated == float("inf") or estimated <= 0:
                raise ValueError("ReLoRACallback: the jagged cosine needs the number of optimizer steps; "
                                 "set Trainer(max_steps=...) or max_epochs, or pass total_steps")
            total = int(estimated)
        replaced = sorted({type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs})
        if replaced:
            rank_zero_warn(f"ReLoRACallback replaces the module's learning-rate scheduler "
                           f"({', '.join(replaced)}) by the jagged cosine; pass lr_schedule='module' "
                           f"to keep yours")
        trainer.strategy.lr_scheduler_configs = [
            LRSchedulerConfig(jagged_cosine_schedule(optimizer, total, self.config.reset_every,
                                                     self.config.restart_warmup, self.warmup_steps,
                                                     self.min_lr_ratio),
                              name="relora-jagged-cosine" if i == 0 else f"relora-jagged-cosine-{i}",
                              interval="step")
            for i, optimizer in enumerate(trainer.optimizers)]

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """After the optimizer step that completes a cycle (once, also under gradient
        accumulation): the reset, with A drawn from ``seed + step`` on every rank."""
        import torch

        from lightning_peft.methods.relora import relora_reset, relora_resets

        step = trainer.global_step
        if step == 0 or step % self.config.reset_every or step == self._last_reset:
            return
        self._last_reset = step
        seed = (self._seed or 0) + step
        cuda = sorted({p.device.index or 0 for p in pl_module.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            relora_reset(pl_module, trainer.optimizers, self.config.optimizer_keep)
        for logger in trainer.loggers:
            logger.log_metrics({"relora/resets": relora_resets(pl_module)}, step=step)

    @staticmethod
    def _base_weights(pl_module: nn.Module) -> dict[str, Tensor]:
        """``{state-dict name: weight}`` of the base weights of the ReLoRA layers."""
        from lightning_peft.methods.relora import relora_layers

        return {f"{name}.base_layer.weight": layer.base_layer.weight
                for name, layer in relora_layers(pl_module)}

    @staticmethod
    @override
    def _filter_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """The adapter, plus the base weights of the adapted layers (the resets change them)."""
        state = checkpoint.get("state_dict")
        PEFTCallback._filter_checkpoint(pl_module, checkpoint)
        if state is None:
            return
        for name in ReLoRACallback._base_weights(pl_module):
            if name in state:
                checkpoint["state_dict"][name] = state[name]

    @override
    def _checkpoint_base(self, pl_module: nn.Module) -> set[str]:
        return set(self._base_weights(pl_module))

    @override
    def _check_checkpoint(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """The adapter check, then the adapted layers' base weights: all present, shaped as in the
        model, finite; before anything is loaded."""
        super()._check_checkpoint(pl_module, checkpoint)
        expected = self._base_weights(pl_module)
        state = checkpoint["state_dict"]
        _validate(expected, {k: state[k] for k in expected if k in state}, strict=True, where="checkpoint",
                  hint=" A ReLoRA checkpoint also holds the base weights of the adapted layers (each reset "
                       "changes them): use one written with ReLoRACallback.")

    @override
    def save_adapter(self, directory: str | Path) -> Path | None:
        """Write the adapter as a LoRA adapter (HF PEFT format); after a reset, warn that it is the
        last cycle's LoRA over the merged base, not the trained model over the original base."""
        from lightning_peft.methods.relora import relora_resets

        resets = relora_resets(self._module) if self._module is not None else 0
        if resets:
            rank_zero_warn(f"ReLoRACallback: {resets} reset(s) merged their updates into the base weights, "
                           f"so the adapter written to {str(directory)!r} is the last cycle's LoRA over that "
                           f"merged base, not the trained model over the original base. The product of "
                           f"ReLoRA is the merged full model: merge_adapters(model), then save the model "
                           f"(save_pretrained)")
        return super().save_adapter(directory)


class AdaLoRACallback(PEFTCallback):
    """Fine-tune with AdaLoRA (arXiv 2303.10512): ``Trainer(callbacks=[AdaLoRACallback(init_r=12,
    target_r=4, tinit=100, tfinal=200)])``: SVD-form adapters whose triplets are pruned by
    importance to a global budget that falls cubically from ``init_r`` to ``target_r`` per layer.

    Arguments are those of :func:`lightning_peft.apply_adalora` plus ``adapter_dir`` (write the
    adapter in HF PEFT's AdaLoRA format, with its ``rank_pattern``, when ``fit`` ends, on rank 0)
    and ``merge_on_fit_end``. ``total_step`` defaults to ``trainer.estimated_stepping_batches``.
    Each optimizer step, once the gradients are complete (``on_before_optimizer_step``, after
    AMP's unscaling, before clipping), the gradient of the orthogonality penalty is added (the
    module computes its own loss; ``adalora/orth_penalty`` is logged); after the step, with the
    gradients still there, :func:`lightning_peft.adalora_update_and_allocate` updates the
    importance and masks to the budget (``adalora/budget`` is logged), as HF PEFT and the paper's
    Algorithm 1 order it, so a masked triplet stays zero. When ``fit`` ends the masked triplets
    are dropped (:func:`lightning_peft.adalora_prune`) and the per-layer ranks are logged
    (``adalora/rank/<layer>``) and saved with the adapter.
    """

    method = "adalora"

    def __init__(self, init_r: int = 12, target_r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 modules_to_save: list[str] | None = None, tinit: int = 0, tfinal: int = 0,
                 deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,  # noqa: N803
                 orth_reg_weight: float = 0.5, total_step: int | None = None,
                 autocast_adapter_dtype: bool = True, merge_on_fit_end: bool = False,
                 adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.adalora import AdaLoRAConfig

        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = AdaLoRAConfig(init_r=init_r, target_r=target_r, alpha=alpha, dropout=dropout,
                                    target_modules=target_modules, exclude_modules=exclude_modules,
                                    modules_to_save=modules_to_save, tinit=tinit, tfinal=tfinal,
                                    deltaT=deltaT, beta1=beta1, beta2=beta2,
                                    orth_reg_weight=orth_reg_weight, total_step=total_step,
                                    autocast_adapter_dtype=autocast_adapter_dtype)
        self.total_step: int | None = total_step
        self._stepped = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_peft.methods.adalora import check_schedule

        super().on_fit_start(trainer, pl_module)
        total = self.config.total_step
        if total is None:
            estimated = trainer.estimated_stepping_batches
            if estimated == float("inf"):
                raise ValueError(f"total_step was not given and the trainer cannot estimate its steps "
                                 f"({estimated}); pass AdaLoRACallback(total_step=...) or set max_steps")
            total = int(estimated)
        self.total_step = check_schedule(self.config.tinit, self.config.tfinal, total)
        self._stepped = trainer.global_step
        self._restore_masks(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The config, the triplets the allocation keeps in each layer (a run resumed in the
        final phase keeps its mask) and the smoothed importance and uncertainty (Ī, Ū) of each
        layer's A, E, B (a run resumed in the budget phase ranks the triplets as the
        uninterrupted run does)."""
        from lightning_peft.methods.adalora import adalora_layers

        layers = [] if self._module is None else adalora_layers(self._module)
        masks = {name: layer.rank_mask.tolist() for name, layer in layers if layer.rank_mask is not None}
        importance = {name: [t.detach().cpu().clone() for t in (*layer._importance[0], *layer._importance[1])]
                      for name, layer in layers if layer._importance is not None}
        return {**super().state_dict(), "rank_masks": masks, "importance": importance}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        masks, importance = state_dict.get("rank_masks"), state_dict.get("importance")
        self._pending_masks = masks if isinstance(masks, dict) else None
        self._pending_importance = importance if isinstance(importance, dict) else None

    def _restore_masks(self, pl_module: pl.LightningModule) -> None:
        """Put back the masks and importance averages of the checkpoint this run resumes from
        (checked against the layers)."""
        import torch

        from lightning_peft.methods.adalora import adalora_layers

        masks, self._pending_masks = getattr(self, "_pending_masks", None), None
        importance, self._pending_importance = getattr(self, "_pending_importance", None), None
        layers = dict(adalora_layers(pl_module))
        wrong = [n for n, m in (masks or {}).items() if n not in layers or not isinstance(m, list)
                 or len(m) != layers[n].r or not all(isinstance(b, bool) for b in m)]
        def factors(name: str) -> tuple[Tensor, ...]:  # what (Ī, Ū) hold, in order: A, E, B twice
            return 2 * (layers[name].lora_A, layers[name].lora_E, layers[name].lora_B)

        wrong += [n for n, ts in (importance or {}).items() if n not in layers or not isinstance(ts, list)
                  or len(ts) != 6 or not all(isinstance(t, torch.Tensor) and t.shape == own.shape
                                             for t, own in zip(ts, factors(n)))]
        if wrong:
            raise ValueError(f"the checkpoint's AdaLoRA rank masks or importance averages do not fit this "
                             f"model's layers: {wrong[:5]}")
        for name, mask in (masks or {}).items():
            layer = layers[name]
            layer.rank_mask = torch.tensor(mask, dtype=torch.bool, device=layer.lora_E.device)
        for name, ts in (importance or {}).items():
            layer = layers[name]
            ts = [t.to(p.device, p.dtype) for t, p in zip(ts, factors(name))]
            layer._importance = (ts[:3], ts[3:])

    @override
    def _check_checkpoint(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """As every method checks, after giving layers pruned when an earlier ``fit`` ended their
        ``init_r`` triplets back where the checkpoint has them (this run's checkpoints are written
        before the pruning: ``test(ckpt_path="best")`` after ``fit``, or a second ``fit`` resuming
        from one); put back as they were when the checkpoint is refused."""
        from lightning_peft.methods.adalora import _undo_unprune, _unprune, adalora_layers

        state = checkpoint.get("state_dict")
        changed = []
        try:
            for name, layer in adalora_layers(pl_module):
                saved = state.get(f"{clean_name(name)}.lora_E") if isinstance(state, dict) else None
                if layer.pattern is not None and isinstance(saved, Tensor) and \
                        tuple(saved.shape) == (len(layer.pattern), 1) != tuple(layer.lora_E.shape):
                    changed.append((layer, _unprune(layer)))
            super()._check_checkpoint(pl_module, checkpoint)
        except BaseException:
            for layer, before in reversed(changed):
                _undo_unprune(layer, before)
            raise

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        from lightning_peft.methods.adalora import adalora_orthogonal_penalty

        if self.config.orth_reg_weight == 0 or not trainer.training:
            return
        import torch

        from lightning_peft.methods.adalora import adalora_layers

        params = [p for _, layer in adalora_layers(pl_module) for p in (layer.lora_A, layer.lora_B)]
        with torch.enable_grad():
            penalty = adalora_orthogonal_penalty(pl_module)
            # autograd.grad, not backward: DDP's gradient hooks must not fire a second time
            grads = torch.autograd.grad(penalty, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                if param.grad is None:
                    param.grad = grad.to(param.dtype)
                else:
                    param.grad.add_(grad.to(param.grad.dtype))
        pl_module.log("adalora/orth_penalty", penalty.detach(), on_step=True, on_epoch=False)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        from lightning_peft.methods.adalora import adalora_update_and_allocate

        if trainer.global_step == self._stepped:  # no optimizer step in this batch (accumulation)
            return
        self._stepped = trainer.global_step
        budget = adalora_update_and_allocate(pl_module, trainer.global_step - 1, self.total_step)
        pl_module.log("adalora/budget", float(budget), on_step=True, on_epoch=False)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_peft.methods.adalora import adalora_prune

        ranks = adalora_prune(pl_module)
        rank_zero_info(f"{type(self).__name__}: final ranks {ranks} (total {sum(ranks.values())})")
        for logger in trainer.loggers:
            logger.log_metrics({f"adalora/rank/{name}": r for name, r in ranks.items()},
                               step=trainer.global_step)
        super().on_fit_end(trainer, pl_module)


class FishMaskCallback(PEFTCallback):
    """Fine-tune with FishMask: ``Trainer(callbacks=[FishMaskCallback(keep=0.005)])``: the
    ``k = max(1, round(keep · candidates))`` weights with the largest Fisher information,
    estimated when ``fit`` sets up from the run's first ``fisher_batches`` training batches
    (``lightning_peft.callbacks.fisher_batches``: the module's ``loss(batch)``, else its
    ``training_step``), are the only ones that train; rank 0's selection is broadcast, so every
    rank trains the same weights.

    Arguments are the fields of :class:`lightning_peft.FishMaskConfig` plus ``merge_on_fit_end``
    and ``adapter_dir`` (write the adapter there when ``fit`` ends, on rank 0). Checkpoints hold
    the selected indices (buffers) and values: a run that loads one (``ckpt_path``, also for
    ``validate``/``test``/``predict``) re-creates its mask from it before the optimizer is built.
    ``validate``/``test``/``predict`` on a module without FishMask and without a checkpoint are
    refused (there is no training data to choose the weights from).
    """

    method = "fishmask"
    free_fields = (*PEFTCallback.free_fields, "fisher_batches")

    def __init__(self, keep: float = 0.005, fisher_batches: int = 8,
                 target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 trainable_modules: list[str] | None = None, merge_on_fit_end: bool = False,
                 adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.fishmask import FishMaskConfig

        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = FishMaskConfig(keep=keep, fisher_batches=fisher_batches,
                                     target_modules=target_modules, exclude_modules=exclude_modules,
                                     trainable_modules=trainable_modules)
        self._stage: str | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        super().setup(trainer, pl_module, stage)

    @override
    def apply(self, module: nn.Module) -> nn.Module:
        from lightning_peft.methods.fishmask import (
            _trainable,
            fishmask_layers,
            fishmask_scores,
            inject_fishmask,
            select_fishmask,
        )

        if fishmask_layers(module):
            return module
        trainer = self._trainer
        if trainer is None:
            raise ValueError("FishMaskCallback chooses its weights from the training data of a Lightning "
                             "run: pass it to Trainer(callbacks=[...]) and call fit, or use "
                             "apply_fishmask(model, batches=..., loss_fn=...) directly")
        if self._stage != "fit":
            return module  # no training data: the mask comes from the checkpoint, if any
        batches, loss = fisher_batches(trainer, module, self.config.fisher_batches)
        fisher = fishmask_scores(module, batches, loss, self.config)
        selection = trainer.strategy.broadcast(select_fishmask(module, fisher, self.config), src=0)
        inject_fishmask(module, selection, _trainable(module, self.config), keep=self.config.keep)
        return module

    def _require_adapter(self, pl_module: nn.Module, stage: str) -> None:
        from lightning_peft.methods.fishmask import fishmask_layers

        if not fishmask_layers(pl_module):
            raise ValueError(f"FishMaskCallback: {stage} on a module without a FishMask adapter; the mask "
                             f"is chosen from training data, which only fit has: run trainer.fit first, "
                             f"pass ckpt_path= of a checkpoint written with FishMaskCallback, or "
                             f"load_adapter(module, directory) before {stage}")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_adapter(pl_module, "validate")
        super().on_validation_start(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_adapter(pl_module, "test")
        super().on_test_start(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_adapter(pl_module, "predict")
        super().on_predict_start(trainer, pl_module)

    def _check_checkpoint(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Re-create the checkpoint's mask (its ``fishmask_indices_*`` buffers) where the module
        carries another one or none, then check the checkpoint as every PEFT callback does; a
        refused checkpoint leaves the module's own mask and values in place."""
        state = checkpoint.get("state_dict")
        before, remerge = ModelState(pl_module), list(self._remerge)
        try:
            if isinstance(state, dict):
                self._rebuild(pl_module, state)
            super()._check_checkpoint(pl_module, checkpoint)
        except BaseException:
            before.restore()
            self._remerge = remerge
            raise

    def _rebuild(self, pl_module: nn.Module, state: dict[str, Any]) -> None:
        import torch

        from lightning_peft.methods.fishmask import (
            _INDICES,
            SparseUpdate,
            _trainable,
            check_indices,
            fishmask_layers,
            inject_fishmask,
        )
        from lightning_peft.targeting import get_parent

        selection: dict[str, dict[str, Tensor]] = {}
        for key, value in state.items():
            path, _, leaf = key.rpartition(".") if isinstance(key, str) else ("", "", "")
            if path and leaf.startswith(_INDICES) and isinstance(value, Tensor):
                selection.setdefault(path, {})[leaf[len(_INDICES):]] = value
        if not selection:
            return  # the common check names what is missing
        current = {n: {p: m.indices(p) for p in m.param_names} for n, m in fishmask_layers(pl_module)}
        if current.keys() == selection.keys() and all(
                current[n].keys() == selection[n].keys()
                and all(torch.equal(current[n][p].cpu(), selection[n][p].cpu()) for p in current[n])
                for n in current):
            return
        modules = dict(pl_module.named_modules())
        for path, params in selection.items():
            module = modules.get(path)
            base = module.base_layer if isinstance(module, SparseUpdate) else module
            for name, idx in params.items():
                param = None if base is None else base._parameters.get(name)
                if param is None or not param.is_floating_point():
                    raise ValueError(f"checkpoint: {path}.{_INDICES}{name} names no floating-point "
                                     f"parameter of the module. Nothing was loaded.")
                check_indices(idx, param.numel(), f"checkpoint: {path}.{_INDICES}{name}")
        replaced = {id(layer): name for name, layer in fishmask_layers(pl_module)}
        for name, layer in fishmask_layers(pl_module):  # the mask this run chose gives way
            parent, child = get_parent(pl_module, name)
            setattr(parent, child, layer.base_layer)
        inject_fishmask(pl_module, selection, _trainable(pl_module, self.config), keep=self.config.keep)
        # setup unmerged a merged module to merge it again at teardown: merge the new layers then,
        # never the replaced ones (they share the base modules and would write their values in)
        new = dict(fishmask_layers(pl_module))
        self._remerge = [new.get(replaced[id(layer)]) if id(layer) in replaced else layer
                         for layer in self._remerge]
        self._remerge = [layer for layer in self._remerge if layer is not None]


class ChildTuningCallback(PEFTCallback):
    """Fine-tune with Child-tuning (arXiv 2109.05687): ``Trainer(callbacks=[ChildTuningCallback(
    mode="D", p=0.3)])``: each optimizer step updates only a child network of the weights.

    Arguments are those of :func:`lightning_peft.apply_child_tuning` plus ``adapter_dir`` (write
    the adapter, the child-tuned tensors in full, when ``fit`` ends, on rank 0). Mode ``"D"``:
    in ``setup`` of ``fit`` the Fisher information is estimated over the first ``fisher_batches``
    training batches (:func:`lightning_peft.callbacks.fisher_batches`; the module's ``loss(batch)``
    where it has one) and the top ``p`` fraction of the weights becomes the child network
    (:func:`lightning_peft.child_tuning_fisher_masks`), chosen on rank 0 and kept in the
    callback's checkpoint state, so a resumed run trains the same weights. Mode ``"F"``: a fresh
    Bernoulli(``p``) mask per step from a generator seeded with ``seed`` (or a seed drawn on
    rank 0), whose state is checkpointed, so a resumed run draws what the interrupted one would
    have. In ``on_fit_start`` every optimizer gets :func:`lightning_peft.attach_child_tuning`;
    the gradients are masked in ``on_before_optimizer_step`` (after AMP's unscaling, before
    clipping) and the masked weights are written back after the update, so no optimizer moves
    them. When ``fit`` ends the number of weights that trained in it (were unmasked at one step
    or more; a resumed fit counts from where it resumed) is logged
    (``child_tuning/changed_weights``, :func:`lightning_peft.child_tuning_changed`).
    """

    method = "child_tuning"

    def __init__(self, mode: str = "F", p: float = 0.3, target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None,
                 trainable_modules: list[str] | None = None, fisher_batches: int = 8,
                 seed: int | None = None, adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.child_tuning import ChildTuningConfig

        super().__init__(adapter_dir=adapter_dir)
        self.config = ChildTuningConfig(mode=mode, p=p, target_modules=target_modules,
                                        exclude_modules=exclude_modules,
                                        trainable_modules=trainable_modules,
                                        fisher_batches=fisher_batches, seed=seed)
        self.masks: dict[str, Tensor] | None = None
        """Mode "D": the child network, ``{parameter name in the LightningModule: bool mask}``."""
        self.generator: Any = None
        """Mode "F": the ``torch.Generator`` (on the parameters' device) that draws the masks."""
        self._seed: int | None = seed
        self._pending_generator: Tensor | None = None
        self._handles: dict[int, Any] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_peft.methods.child_tuning import child_tuned_parameters

        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.config.mode != "D" or self.masks is not None \
                or not child_tuned_parameters(pl_module):  # built in configure_model: on_fit_start
            return
        try:
            self._choose_masks(trainer, pl_module)
        except BaseException:
            self._undo(pl_module)
            raise

    def _choose_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_peft.methods.child_tuning import child_tuning_fisher_masks

        batches, loss = fisher_batches(trainer, pl_module, self.config.fisher_batches)
        masks = child_tuning_fisher_masks(pl_module, batches, loss, self.config.p)
        self.masks = trainer.strategy.broadcast({n: m.cpu() for n, m in masks.items()}, src=0)
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        rank_zero_info(f"{type(self).__name__}: child network of {kept:,d} of {total:,d} weights (top "
                       f"{self.config.p:g} by Fisher information over {len(batches)} batches)")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch

        from lightning_peft.methods.child_tuning import (
            attach_child_tuning,
            child_tuned_parameters,
            child_tuning_reset_touched,
        )

        super().on_fit_start(trainer, pl_module)
        child_tuning_reset_touched(pl_module)  # count what this fit trains
        params = child_tuned_parameters(pl_module)
        if not params:
            raise ValueError(f"{type(self).__name__}: the module carries no Child-tuning at fit start")
        device = next(iter(params.values())).device
        if self.config.mode == "F":
            if self._seed is None:
                drawn = int(torch.randint(0, 2**31 - 1, ()).item())
                self._seed = int(trainer.strategy.broadcast(drawn, src=0))
            if self.generator is None or self.generator.device != device:
                self.generator = torch.Generator(device=device).manual_seed(self._seed)
            state, self._pending_generator = self._pending_generator, None
            if state is not None:
                try:
                    self.generator.set_state(state)
                except (RuntimeError, TypeError, ValueError) as err:
                    rank_zero_warn(f"{type(self).__name__}: the checkpoint's mask generator state does not "
                                   f"fit a {device.type} generator ({err}); masks are drawn from seed "
                                   f"{self._seed} again")
        elif self.masks is None:
            self._choose_masks(trainer, pl_module)
        self._remove_handles()
        ids = {id(q) for q in params.values()}
        for optimizer in trainer.optimizers:
            if any(id(q) in ids for group in optimizer.param_groups for q in group["params"]):
                self._handles[id(optimizer)] = attach_child_tuning(
                    pl_module, optimizer, self.config.mode, self.config.p, masks=self.masks,
                    generator=self.generator, mask_in_pre_hook=False)
        if not self._handles:
            rank_zero_warn(f"{type(self).__name__}: no optimizer holds a child-tuned parameter; nothing "
                           f"is masked")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        handle = self._handles.get(id(optimizer))
        if handle is not None:
            handle.mask_gradients()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_peft.methods.child_tuning import child_tuned_parameters, child_tuning_changed

        changed = child_tuning_changed(pl_module)
        total = sum(q.numel() for q in child_tuned_parameters(pl_module).values())
        rank_zero_info(f"{type(self).__name__}: {changed:,d} of {total:,d} child-tuned weights trained "
                       f"(were unmasked at a step) in this fit")
        for logger in trainer.loggers:
            logger.log_metrics({"child_tuning/changed_weights": changed}, step=trainer.global_step)
        super().on_fit_end(trainer, pl_module)

    def _remove_handles(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}

    @override
    def _undo(self, pl_module: pl.LightningModule) -> None:
        self._remove_handles()
        super()._undo(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The config, the mask generator's seed and state (mode "F") and the child network
        (mode "D")."""
        masks = None if self.masks is None else {n: m.cpu() for n, m in self.masks.items()}
        generator = None if self.generator is None else self.generator.get_state()
        return {**super().state_dict(), "seed": self._seed, "generator": generator, "masks": masks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        seed = state_dict.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            self._seed = seed
        if isinstance(state_dict.get("generator"), Tensor):
            self._pending_generator = state_dict["generator"]
        masks = state_dict.get("masks")
        if isinstance(masks, dict) and masks:
            self.masks = dict(masks)  # checked against the parameters when attached


class AdapterCallback(PEFTCallback):
    """Fine-tune with bottleneck adapters: ``Trainer(callbacks=[AdapterCallback(bottleneck=64)])``;
    serial (Houlsby: after attention and feed-forward; ``config="pfeiffer"``: after the
    feed-forward only) or ``placement="parallel"`` (He et al.).

    Arguments are those of :func:`lightning_peft.apply_adapters` plus ``adapter_dir`` (write the
    adapter there when ``fit`` ends, on rank 0). Adapters do not merge: ``merge_on_fit_end`` is
    not offered.
    """

    method = "adapter"

    def __init__(self, bottleneck: int = 64, placement: str = "serial", config: str | None = None,
                 activation: str = "relu", scaling: float = 1.0,
                 target_modules: str | list[str] | None = None, trainable_modules: list[str] | None = None,
                 adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.bottleneck import AdapterConfig

        super().__init__(adapter_dir=adapter_dir)
        self.config = AdapterConfig(bottleneck=bottleneck, placement=placement, config=config,
                                    activation=activation, scaling=scaling, target_modules=target_modules,
                                    trainable_modules=trainable_modules)


class AdapterFusionCallback(PEFTCallback):
    """Train an AdapterFusion over trained bottleneck adapters:
    ``Trainer(callbacks=[AdapterFusionCallback(adapter_dirs=["out/task_a", "out/task_b"])])``.
    The adapters are loaded frozen; only the fusion attention (and ``trainable_modules``) trains.
    ``adapter_dir``: write the fusion (adapters included) there when ``fit`` ends."""

    method = "adapter_fusion"

    def __init__(self, adapter_dirs: list[str], temperature: float = 1.0,
                 trainable_modules: list[str] | None = None, adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.adapter_fusion import AdapterFusionConfig

        super().__init__(adapter_dir=adapter_dir)
        self.config = AdapterFusionConfig(adapter_dirs=adapter_dirs, temperature=temperature,
                                          trainable_modules=trainable_modules)


class LlamaAdapterCallback(PEFTCallback):
    """Fine-tune with LLaMA-Adapter (adaption prompts, arXiv 2303.16199):
    ``Trainer(callbacks=[LlamaAdapterCallback(adapter_len=10, adapter_layers=30)])``; prompts with
    zero-initialised gates in the top ``adapter_layers`` attention modules of a Llama-architecture
    model. Arguments are those of :func:`lightning_peft.apply_llama_adapter` plus ``adapter_dir``
    (write the adapter, HF PEFT's ``ADAPTION_PROMPT`` files, when ``fit`` ends, on rank 0). The
    prompts do not merge: ``merge_on_fit_end`` is not offered."""

    method = "llama_adapter"

    def __init__(self, adapter_len: int = 10, adapter_layers: int | None = None,
                 target_modules: str = "self_attn", adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.llama_adapter import LlamaAdapterConfig

        super().__init__(adapter_dir=adapter_dir)
        self.config = LlamaAdapterConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                         target_modules=target_modules)


class PromptTuningCallback(PEFTCallback):
    """Fine-tune with prompt tuning: ``Trainer(callbacks=[PromptTuningCallback(num_virtual_tokens=20)])``:
    n trainable embeddings are prepended to every input of the frozen model (HF PEFT's
    ``PROMPT_TUNING``). Arguments are those of :func:`lightning_peft.apply_prompt_tuning` (the
    tokenizer of ``init="text"`` by name) plus ``adapter_dir`` (write the prompt there when ``fit``
    ends, on rank 0). Nothing merges."""

    method = "prompt_tuning"
    free_fields = ("init", "init_text", "tokenizer_name_or_path")

    def __init__(self, num_virtual_tokens: int = 20, init: str = "random", init_text: str | None = None,
                 tokenizer_name_or_path: str | None = None, modules_to_save: list[str] | None = None,
                 adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.prompt_tuning import PromptTuningConfig

        super().__init__(adapter_dir=adapter_dir)
        self.config = PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, init=init,
                                         init_text=init_text, tokenizer_name_or_path=tokenizer_name_or_path,
                                         modules_to_save=modules_to_save)


class PTuningCallback(PEFTCallback):
    """Fine-tune with P-tuning: ``Trainer(callbacks=[PTuningCallback(num_virtual_tokens=20,
    encoder_type="LSTM")])``: a prompt encoder (MLP or LSTM) makes the virtual tokens. Arguments
    are those of :func:`lightning_peft.apply_p_tuning` plus ``adapter_dir`` (write the encoder's
    outputs there, HF PEFT's ``P_TUNING`` file, when ``fit`` ends, on rank 0)."""

    method = "p_tuning"
    free_fields = ("encoder_dropout",)

    def __init__(self, num_virtual_tokens: int = 20, encoder_type: str = "MLP",
                 encoder_hidden_size: int | None = None, encoder_num_layers: int = 2,
                 encoder_dropout: float = 0.0, template: str = "prefix",
                 template_split: tuple[int, int, int] | None = None, mask_token_id: int | None = None,
                 modules_to_save: list[str] | None = None, adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.p_tuning import PTuningConfig

        super().__init__(adapter_dir=adapter_dir)
        self.config = PTuningConfig(num_virtual_tokens=num_virtual_tokens, encoder_type=encoder_type,
                                    encoder_hidden_size=encoder_hidden_size,
                                    encoder_num_layers=encoder_num_layers, encoder_dropout=encoder_dropout,
                                    template=template,
                                    template_split=tuple(template_split) if template_split else None,
                                    mask_token_id=mask_token_id, modules_to_save=modules_to_save)


class MultitaskPromptTuningCallback(PEFTCallback):
    """Fine-tune with multitask prompt tuning: ``Trainer(callbacks=[MultitaskPromptTuningCallback(
    num_virtual_tokens=20, num_tasks=3)])``: batches carry ``task_ids`` (one per row). Adapt to a
    new task from a source adapter with ``init="average_source_tasks", source="out/mpt"``.
    Arguments are those of :func:`lightning_peft.apply_multitask_prompt_tuning` plus ``adapter_dir``
    (write the adapter there when ``fit`` ends, on rank 0)."""

    method = "multitask_prompt_tuning"
    free_fields = ("init", "init_text", "tokenizer_name_or_path", "source", "init_task")

    def __init__(self, num_virtual_tokens: int = 20, num_tasks: int = 1, num_ranks: int = 1,
                 init: str = "random", init_text: str | None = None,
                 tokenizer_name_or_path: str | None = None, source: str | None = None, init_task: int = 0,
                 modules_to_save: list[str] | None = None, adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.multitask_prompt_tuning import MultitaskPromptTuningConfig

        super().__init__(adapter_dir=adapter_dir)
        self.config = MultitaskPromptTuningConfig(
            num_virtual_tokens=num_virtual_tokens, num_tasks=num_tasks, num_ranks=num_ranks, init=init,
            init_text=init_text, tokenizer_name_or_path=tokenizer_name_or_path, source=source,
            init_task=init_task, modules_to_save=modules_to_save)


class PrefixTuningCallback(PEFTCallback):
    """Fine-tune with prefix tuning or P-tuning v2:
    ``Trainer(callbacks=[PrefixTuningCallback(num_virtual_tokens=20)])``: trainable key/value
    prefixes at every attention layer; ``prefix_projection=True`` computes them with an MLP (prefix
    tuning, Li and Liang), ``False`` learns them directly (P-tuning v2, Liu et al.). The module's
    calls, ``generate`` included, need no change.

    Arguments are those of :func:`lightning_peft.apply_prefix_tuning` plus ``adapter_dir`` (write
    the adapter there, HF PEFT's ``PREFIX_TUNING`` files, when ``fit`` ends, on rank 0). A prefix
    does not merge: ``merge_on_fit_end`` is not offered.
    """

    method = "prefix_tuning"

    def __init__(self, num_virtual_tokens: int = 20, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None, modules_to_save: list[str] | None = None,
                 init_weights: str | None = None, adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.prefix_tuning import PrefixTuningConfig

        super().__init__(adapter_dir=adapter_dir)
        self.config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens,
                                         prefix_projection=prefix_projection,
                                         encoder_hidden_size=encoder_hidden_size,
                                         modules_to_save=modules_to_save, init_weights=init_weights)


class IntrinsicDimensionCallback(PEFTCallback):
    """Fine-tune in a random ``d``-dimensional subspace of the weights (intrinsic dimension,
    Aghajanyan et al. 2020): ``Trainer(callbacks=[IntrinsicDimensionCallback(d=1000)])``: only
    ``θ_d`` (and, with ``said=True``, one scale per projected tensor) train; every weight runs as
    ``θ0 + P·θ_d`` with ``P`` a Fastfood projection rebuilt from ``seed``.

    Arguments are the fields of :class:`lightning_peft.IntrinsicDimensionConfig` plus
    ``merge_on_fit_end`` (write ``θ0 + P·θ_d`` into the weights when ``fit`` ends) and
    ``adapter_dir`` (write ``θ_d``, ``λ`` and the seed there when ``fit`` ends, on rank 0).
    """

    method = "intrinsic_dimension"

    def __init__(self, d: int = 1000, said: bool = True, seed: int = 0,
                 target_modules: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None, include_embeddings: bool = False,
                 trainable_modules: list[str] | None = None, merge_on_fit_end: bool = False,
                 adapter_dir: str | None = None) -> None:
        from lightning_peft.methods.intrinsic_dimension import IntrinsicDimensionConfig

        super().__init__(merge_on_fit_end=merge_on_fit_end, adapter_dir=adapter_dir)
        self.config = IntrinsicDimensionConfig(d=d, said=said, seed=seed, target_modules=target_modules,
                                               exclude_modules=exclude_modules,
                                               include_embeddings=include_embeddings,
                                               trainable_modules=trainable_modules)


def peft_callback(method: str, **kwargs: Any) -> PEFTCallback:
    """The callback of the registered method ``method`` (e.g. ``"lora"``, ``"ia3"``) built with
    ``kwargs``: ``peft_callback("lora", r=8)`` is ``LoRACallback(r=8)``."""
    found = get_method(method)
    # the class that names the method itself (a user's subclass of LoRACallback inherits "lora")
    classes = {cls.method: cls for cls in _subclasses(PEFTCallback) if cls.__dict__.get("method")}
    if found.name not in classes:
        raise ValueError(f"no callback for method {found.name!r}; callbacks exist for {sorted(classes)}")
    for key, value in found.alias_settings.get(method, {}).items():  # "rslora": use_rslora=True
        if kwargs.setdefault(key, value) != value:
            raise ValueError(f"method {method!r} is {found.name!r} with {key}={value!r}; got {key}="
                             f"{kwargs[key]!r} (pass method={found.name!r} for that)")
    return classes[found.name](**kwargs)


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]
