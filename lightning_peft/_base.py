"""What every PEFT method shares: the adapter-layer marker, finding adapter parameters by module
structure, freezing, and parameter counts. Plain PyTorch."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

TRAIN_BIAS_ATTR = "_lightning_peft_train_bias"
"""Set (``True``) on a module whose ``bias`` a method makes trainable (LoRA ``bias="all"``, BitFit)."""

TRAIN_PARAMS_ATTR = "_lightning_peft_train_params"
"""Set, in a module's ``__dict__``, to the tuple of names of the module's own (direct) parameters
that a method trains in full (Child-tuning): they are adapter tensors, found, frozen, counted and
saved like the parameters of adapter layers, as ``<module path>.<name>``. A parameter shared by
several modules (tied weights) is marked on one of them."""


class AdapterLayer(nn.Module):
    """Base class of the modules a PEFT method injects.

    Subclasses return their own trainable tensors from :meth:`adapter_parameters`, keyed by their
    name relative to the layer (e.g. ``{"lora_A": ..., "lora_B": ...}``).
    """

    runs_base_when_disabled: bool = False
    """Whether the layer itself runs as its base when ``lightning_peft.disable_adapters`` marks it
    (``_disabled`` in its ``__dict__``); others that wrap a module are swapped for it instead."""
    adapter_dtype: torch.dtype | None = None
    """The dtype the layer's adapter tensors are meant to keep whatever the base is cast to
    (fp32 on a half-precision base); ``None``: they follow the model's casts."""
    no_merge: str | None = None
    """Why the layer cannot be merged into base weights (a nonlinear adapter, prompts the input
    carries), for :func:`merge_adapters` to say what it left; ``None``: it merges, or holds
    nothing to merge."""
    keys_from_root: bool = False
    """Whether the layer's tensors are keyed in adapter files by :meth:`file_key` alone, not under
    the layer's module path (HF PEFT's prompt-learning files hold ``prompt_embeddings`` at the top
    level, whatever module holds the prompt)."""

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        raise TypeError(f"{type(self).__name__} must define adapter_parameters()")

    def adapter_buffers(self) -> dict[str, Tensor]:
        """Buffers that belong to the adapter (e.g. BatchNorm statistics of a module trained in
        full), keyed by their name relative to the layer."""
        return {}

    def file_tensors(self) -> dict[str, Tensor] | None:
        """What adapter files hold for this layer instead of its adapter parameters and persistent
        buffers, keyed like them (then through :meth:`file_key`); ``None`` (the default): those.
        P-tuning returns its prompt encoder's outputs while the encoder trains (HF PEFT saves the
        outputs, not the encoder); such computed tensors are written, never loaded into."""
        return None

    def named_adapters(self) -> list[str]:
        """The names of the adapters the layer holds beside its default one (LoRA's named
        adapters, :func:`lightning_peft.add_adapter`); ``[]`` for layers of one adapter."""
        return []

    def inactive_adapter_parameters(self) -> list[Tensor]:
        """Adapter parameters of adapters that are not active (LoRA's named adapters outside
        :func:`lightning_peft.set_adapter`'s set): saved and loaded, but kept frozen."""
        return []

    def named_adapter_files(self, name: str) -> dict[str, tuple[str, Tensor]]:
        """``{file key relative to the layer: (name relative to the layer, tensor)}`` of the adapter
        ``name`` saved alone (``save_adapter(..., adapter_name=name)``); ``{}`` where the layer does
        not hold it."""
        return {}

    def file_key(self, name: str) -> str:
        """The name, relative to the layer's path, under which the adapter tensor ``name`` (a key
        of :meth:`adapter_parameters` or :meth:`adapter_buffers`) is stored in
        ``adapter_model.safetensors``: HF PEFT's key where PEFT has the method (LoRA's ``lora_A``
        is ``lora_A.weight``, IA3's ``ia3_l`` is ``ia3_l``). Default: ``name`` itself."""
        return name


class LinearAdapterLayer(AdapterLayer):
    """An adapter layer around a frozen linear ``base_layer`` (``nn.Linear``, GPT-2 ``Conv1D`` read
    transposed through ``fan_in_fan_out``, or a 4-bit layer). A subclass that merges sets
    ``merged`` and defines ``merge()``/``unmerge()``; a cast or move of a merged layer
    (``.half()``, ``.to(...)``) is then done unmerged: the update is taken out exactly first and
    merged again afterwards, so a later ``unmerge()`` restores ``W0`` exactly in the new dtype or
    on the new device."""

    base_layer: nn.Module
    fan_in_fan_out: bool = False
    merged: bool = False

    @property
    def weight(self) -> Tensor:
        """The base weight as (out, in) (a transposed view for Conv1D)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def _apply(self, fn, recurse: bool = True):
        if not self.merged:
            return super()._apply(fn, recurse)
        self.unmerge()
        try:
            result = super()._apply(fn, recurse)
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a 4-bit base re-quantizes: warned at merge()
                self.merge()
        return result


class WrapperLayer(AdapterLayer):
    """An adapter layer around one module (the submodule named :attr:`wrapped`) whose attributes
    it shows as its own where it has none of that name: model code reads them through the wrapper
    (``.weight``, ``layer_idx``, ``config``; T5's feed-forward casts to ``wo.weight.dtype``)."""

    wrapped: ClassVar[str] = "base_layer"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get(self.wrapped)
            if inner is None:
                raise
            return getattr(inner, name)


class ModulesToSave(WrapperLayer):
    """A module trained in full: a trainable copy (``modules_to_save``) runs, the frozen
    ``original_module`` is kept so the base model can be restored."""

    wrapped = "modules_to_save"

    runs_base_when_disabled = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {f"modules_to_save.{n}": p for n, p in self.modules_to_save.named_parameters()}

    def adapter_buffers(self) -> dict[str, Tensor]:
        """The trainable copy's buffers (BatchNorm running statistics): saved with the adapter."""
        return {f"modules_to_save.{n}": b for n, b in self.modules_to_save.named_buffers()}

    def file_key(self, name: str) -> str:
        """HF PEFT stores a module trained in full under the module's own path."""
        return name.removeprefix("modules_to_save.")

    def forward(self, *args, **kwargs):
        if self.__dict__.get("_disabled", False):  # lightning_peft.disable_adapters: the base module
            return self.original_module(*args, **kwargs)
        return self.modules_to_save(*args, **kwargs)


def inside_any(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or lies under one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def wrap_modules_to_save(model: nn.Module, names: Iterable[str]) -> None:
    """Replace each named module of ``model`` by a :class:`ModulesToSave` (once)."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ModulesToSave(module))


def adapter_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every adapter tensor in ``model``: those of adapter layers, plus the
    biases a method made trainable (LoRA ``bias="all"``/``"lora_only"``, ``TRAIN_BIAS_ATTR``) and
    the parameters a method trains in full (``TRAIN_PARAMS_ATTR``), each tensor once."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        owned: dict[str, nn.Parameter] = {}
        if isinstance(module, AdapterLayer):
            owned.update(module.adapter_parameters())
        if getattr(module, TRAIN_BIAS_ATTR, False) and getattr(module, "bias", None) is not None:
            owned["bias"] = module.bias
        for name in module.__dict__.get(TRAIN_PARAMS_ATTR, ()):
            param = module._parameters.get(name)
            if param is not None:
                owned.setdefault(name, param)
        for name, param in owned.items():
            if id(param) not in seen:
                seen.add(id(param))
                yield dot + name, param


def adapter_named_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, buffer)`` of every adapter buffer in ``model`` (names as in ``state_dict()``)."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        dot = f"{prefix}." if prefix else ""
        for name, buf in module.adapter_buffers().items():
            if buf is not None and id(buf) not in seen:
                seen.add(id(buf))
                yield dot + name, buf


def restore_adapter_dtypes(model: nn.Module) -> int:
    """Cast the adapter parameters of every layer with an ``adapter_dtype`` back to it, in place
    (the ``Parameter`` objects are kept, so an optimizer built on them stays valid). Needed after
    a whole-model cast such as Lightning's "bf16-true" ``module.to(bfloat16)``. Returns how many
    tensors were cast."""
    count = 0
    for module in model.modules():
        dtype = getattr(module, "adapter_dtype", None) if isinstance(module, AdapterLayer) else None
        if dtype is None:
            continue
        for param in module.adapter_parameters().values():
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
                count += 1
    return count


def merge_adapters(model: nn.Module, adapter_names: str | Iterable[str] | None = None) -> nn.Module:
    """Merge every adapter layer that can merge (LoRA, IA3, ...) into its base weight: the model
    then runs at the base model's speed. Returns ``model``.

    ``adapter_names`` (LoRA's named adapters, :func:`lightning_peft.add_adapter`): merge those
    adapters (a name or a list; they become the active ones), unmerging first a layer merged
    with others: ``merge_adapters(model, "a")``, ``unmerge_adapters(model)`` (``W0`` back bit for
    bit), ``merge_adapters(model, "b")`` switches tasks at the base model's speed."""
    from lightning_peft.fsdp import refuse_sharded

    refuse_sharded(model, "merge_adapters")  # it writes whole base weights
    if adapter_names is not None:
        names = list(adapter_names) if isinstance(adapter_names, Iterable) and \
            not isinstance(adapter_names, str) else [adapter_names]  # a non-name: unknown, below
        layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and hasattr(m, "active_adapters")]
        known = list(dict.fromkeys(["default", *(n for m in layers for n in m.named_adapters())]))
        unknown = [n for n in names if not isinstance(n, str) or n not in known]
        if not layers or not names or unknown:
            raise ValueError(f"adapter_names={adapter_names!r}: unknown adapters {unknown}; the model's "
                             f"adapters are {known if layers else []}")
        for layer in layers:
            if layer.merged and layer.active_adapters != names:
                layer.unmerge()
        done = []
        try:
            for layer in layers:
                if not layer.merged:
                    layer.merge(adapter_names=names)
                    done.append(layer)
        except ValueError:  # e.g. a DoRA adapter with others: undo this call's merges
            for layer in done:
                if layer.merged:
                    layer.unmerge()
            raise
        return model
    kept: dict[str, str] = {}
    for module in model.modules():
        if isinstance(module, AdapterLayer) and callable(getattr(module, "merge", None)) \
                and not getattr(module, "merged", True):
            module.merge()
        elif isinstance(module, AdapterLayer) and module.no_merge:
            kept.setdefault(type(module).__name__, module.no_merge)
    if kept:  # the model does not run at the base model's speed: say which layers stay
        warnings.warn("merge_adapters left layers that cannot merge as they are: "
                      + "; ".join(f"{name} ({why})" for name, why in kept.items()), stacklevel=2)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters`, restoring every base weight exactly. Returns ``model``."""
    from lightning_peft.fsdp import refuse_sharded

    refuse_sharded(model, "unmerge_adapters")
    for module in model.modules():
        if isinstance(module, AdapterLayer) and getattr(module, "merged", False):
            module.unmerge()
    return model


def first_names(names: list[str], limit: int = 5) -> str:
    """``"a, b, c, ... and 7 more"``: the first ``limit`` of ``names`` for an error message."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def names_outside_adapters(root: nn.Module) -> list[str]:
    """Names of the modules of ``root`` that are not inside an adapter layer."""
    adapters = [n + "." for n, m in root.named_modules() if isinstance(m, AdapterLayer) and n]
    return [n for n, _ in root.named_modules() if n and not any(n.startswith(a) for a in adapters)]


def has_adapters(model: nn.Module) -> bool:
    """Whether any adapter layer is injected in ``model``."""
    return any(isinstance(m, AdapterLayer) for m in model.modules())


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Set ``requires_grad`` on the adapter tensors of ``model`` and clear it everywhere else, and
    give each adapter layer the train/eval mode of the module it wraps (else of the module that
    holds it): a layer is created in training mode, and one injected into a model in ``eval()``
    must not run its dropout at inference."""
    keep = {id(p) for _, p in adapter_named_parameters(model)}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, AdapterLayer):
            keep.difference_update(id(p) for p in module.inactive_adapter_parameters())
            base = module._modules.get("base_layer")
            host = base if base is not None else modules.get(name.rpartition(".")[0]) if name else None
            if host is not None and module.training != host.training:
                module.train(host.training)
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)


class ModelState:
    """What injecting (and quantizing) can change in ``model``, kept by reference (no tensor is
    copied) so that :meth:`restore` puts it back exactly after a failure part way: every module's
    attributes, children, parameters and buffers (the same objects), and every parameter's
    ``requires_grad``. Values written into existing tensors are not undone."""

    _STORES = ("_modules", "_parameters", "_buffers")

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, dict(m.__dict__), [dict(getattr(m, k)) for k in self._STORES])
                        for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, attrs, stores in self.modules:
            for key in module.__dict__.keys() - attrs.keys():
                del module.__dict__[key]
            module.__dict__.update(attrs)
            for key, saved in zip(self._STORES, stores):
                store = getattr(module, key)
                store.clear()
                store.update(saved)
        for param, requires_grad in self.requires_grad:
            param.requires_grad_(requires_grad)


class ParameterCount(NamedTuple):
    """``(trainable, total)`` parameter counts; ``str()`` gives PEFT's summary line."""

    trainable: int
    total: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {pct:.4f}")


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable and total parameters (each shared tensor once).

    Returns a ``(trainable, total)`` named tuple; ``print(trainable_parameters(model))`` prints
    ``trainable params: ... || all params: ... || trainable%: ...``. A module that keeps a frozen
    weight outside ``parameters()`` (a 4-bit base) reports it through a ``frozen_numel()`` method,
    counted as its logical number of elements, as HF PEFT does.
    """
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    for module in model.modules():  # quantized bases keep their weight outside parameters()
        extra = getattr(module, "frozen_numel", None)
        if callable(extra):
            total += extra()
    return ParameterCount(trainable, total)
