"""The method registry: one :class:`Method` entry per PEFT method, so that adapter files
(:mod:`lightning_peft.io`), adapter-only checkpoints, ``trainable_parameters``, merging and the
methods tables serve every method without knowing any of them by name.

Every method lives in one file of this package with the same four parts in the same order:

1. a typed config dataclass (``<Method>Config``, a docstring under each field, ``__post_init__``
   checks that name the argument),
2. the module(s) it injects (subclasses of :class:`lightning_peft._base.AdapterLayer`),
3. ``apply_<method>(model, ..., config=None)``, which injects and freezes in place and returns
   the model,
4. its registry entry, ``METHOD = Method(...)``, registered here.

An adapter directory always holds ``adapter_config.json`` (with ``peft_type``) and
``adapter_model.safetensors``, for methods HF PEFT has in PEFT's own layout and key names, and for
the others in the same layout with our own upper-case ``peft_type``.

What the rest of the package does with an entry (no method-specific branch anywhere else):

- The config dataclass: a docstring under each field; ``__post_init__`` raises a ``ValueError``
  whose message starts with the field name and says what is valid (alpha finite, booleans real
  bools, module specs through :func:`lightning_peft.targeting.check_module_spec`).
- The layers subclass :class:`lightning_peft._base.AdapterLayer`: ``adapter_parameters()``,
  ``adapter_buffers()``, ``file_key(name)`` (the tensor's key in the file, relative to the layer's
  path: HF PEFT's where PEFT has the method), ``reset_parameters()`` (skipped on meta tensors);
  a method that can merge gives its layers ``merge()``, ``unmerge()`` (restoring ``W0`` bit for
  bit) and a ``merged`` flag that never lies. ``merge_adapters``/``unmerge_adapters`` call them on
  every layer that has them.
- ``apply_<method>(model, ..., config=None)`` checks everything before changing anything (targets
  through :func:`lightning_peft.targeting.find_targets`; ``modules_to_save`` through
  ``find_modules`` + :func:`lightning_peft._base.wrap_modules_to_save`, with no target inside a
  saved module), injects in place, is idempotent and ends with ``freeze_all_but_adapters``.
- ``save_adapter`` writes ``{"peft_type": ..., "base_model_name_or_path": ..., **to_json(root)}``
  and, for every adapter layer, its parameters and buffers as ``file_prefix + <layer path> + "." +
  layer.file_key(name)``, plus the biases marked trainable (``_base.TRAIN_BIAS_ATTR``) as
  ``<module path>.bias``. ``to_json`` reads the model (its layers and marks), not a stored config.
- ``load_adapter`` finds the method by ``peft_type``; on a model without the adapter it calls
  ``from_json(model, config_json, where)`` (every field checked, a ``ValueError`` naming the field;
  the model only read) and runs the returned ``inject`` on a meta-device copy to learn the expected
  tensors, checks names, shapes, dtypes and finiteness (and whatever the method's
  ``check_tensors`` checks: FishMask's indices), then injects into the model and copies.
  On a model that already carries the method, ``update_from_json`` (if any) checks the fields and
  returns the setter of the non-tensor state, run only after every check has passed.
- Callbacks: one short class per method over ``PEFTCallback`` with a flat typed ``__init__``
  (LightningCLI builds it) that builds the config; ``apply`` calls ``apply_<method>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class Method:
    """One PEFT method as the rest of the package sees it."""

    name: str
    """Registry key and command-line name, lower case: ``"lora"``, ``"ia3"``, ``"bitfit"``."""
    config_class: type
    """The method's config dataclass; ``apply(model, config=config_class(...))`` injects it."""
    peft_type: str
    """``adapter_config.json``'s ``peft_type``: HF PEFT's where PEFT has the method (``"LORA"``,
    ``"IA3"``), our own upper-case name otherwise (``"BITFIT"``)."""
    apply: Callable[..., nn.Module]
    """``apply_<method>(model, config=...)``: inject and freeze in place, return the model."""
    detect: Callable[[nn.Module], bool]
    """Whether a model carries this method's adapter (its layers, or its marks on the model)."""
    to_json: Callable[[nn.Module], dict[str, Any]]
    """The ``adapter_config.json`` fields that describe the adapter of a model (the model is
    self-describing); ``peft_type`` and ``base_model_name_or_path`` are added by the caller."""
    from_json: Callable[[nn.Module, dict[str, Any], str], Callable[[nn.Module], None]]
    """``from_json(model, config_json, where)`` checks every field (a ``ValueError`` that names
    the field and ``where``) and plans the injection against ``model``, changing nothing; it
    returns ``inject(model)``, which is first run on a meta-device copy of the model to learn the
    expected tensors, then on the model itself."""
    update_from_json: Callable[[nn.Module, dict[str, Any], str], Callable[[], None]] | None = None
    """For loading into a model that already carries the method: check the fields and return the
    function that sets the non-tensor state (e.g. LoRA's alpha) once the tensors have been
    checked too. ``None``: nothing but tensors to load."""
    bound_fields: tuple[str, ...] | None = None
    """The ``adapter_config.json`` fields that decide how the weights are read: recorded in the
    weights' metadata on save, and a config file that disagrees is refused on load. ``None``:
    every field ``to_json`` writes."""
    file_format: str | None = None
    """The registry name of the method whose files this one writes and reads (QLoRA's adapter is a
    LoRA adapter); ``None``: its own, under ``peft_type``."""
    export: Callable[[nn.Module], nn.Module] | None = None
    """Turn a trained model into a plain one for inference (QLoRA: ``merge_and_dequantize``);
    ``None``: :func:`lightning_peft._base.merge_adapters`."""
    check_tensors: Callable[[nn.Module, dict[str, Tensor], str], None] | None = None
    """``check_tensors(model, tensors, where)``: checks of a file's tensors beyond names, shapes,
    dtypes and finiteness (FishMask: its indices lie in the parameter and strictly increase), a
    ``ValueError`` naming the tensor and ``where``. ``tensors`` are keyed as in the file without
    :attr:`file_prefix`, cast to the model's dtypes; ``model`` is the one loaded into, still
    unchanged. ``load_adapter`` calls it after its own checks, before anything is copied.
    ``None``: nothing more to check."""
    file_prefix: str = "base_model.model."
    """Prefix of every tensor name in ``adapter_model.safetensors``."""
    aliases: tuple[str, ...] = field(default=())
    """Other names that find the method (e.g. ``"rslora"``)."""
    alias_settings: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)
    """Config fields an alias stands for (``{"rslora": {"use_rslora": True}}``): a callback
    built by that name (:func:`lightning_peft.peft_callback`) gets them."""
    named_adapters: bool = False
    """Whether the method's layers hold named adapters beside the default one (LoRA's
    :func:`lightning_peft.add_adapter`): then ``to_json``, ``from_json`` and ``update_from_json``
    also take ``adapter_name=`` (that adapter alone, with PEFT's plain keys), and its layers give
    ``named_adapters()`` and ``named_adapter_files(name)``, which ``save_adapter``/``load_adapter``
    use with ``adapter_name=``."""


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name and peft_type must be new) and return it."""
    for key in (method.name, *method.aliases):
        if key in _REGISTRY and _REGISTRY[key] is not method:
            raise ValueError(f"a method named {key!r} is already registered")
    if method.file_format is None and any(
            m.peft_type == method.peft_type and m.name != method.name and m.file_format is None
            for m in _REGISTRY.values()):
        raise ValueError(f"peft_type {method.peft_type!r} is already registered")
    for key in (method.name, *method.aliases):
        _REGISTRY[key] = method
    return method


def methods() -> list[Method]:
    """Every registered method, each once, in registration order."""
    _load_builtin()
    return list(dict.fromkeys(_REGISTRY.values()))


def get_method(name: str) -> Method:
    """The method registered as ``name`` (or an alias); a ``ValueError`` lists the known names."""
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise ValueError(f"unknown PEFT method {name!r}; known methods: {sorted(m.name for m in methods())}")


def method_for_peft_type(peft_type: Any, where: str = "adapter_config.json") -> Method:
    """The method whose files carry ``peft_type``; a ``ValueError`` lists the known types."""
    for method in methods():
        if method.peft_type == peft_type and method.file_format is None:
            return method
    known = sorted({m.peft_type for m in methods()})
    raise ValueError(f"{where}: peft_type is {peft_type!r}; this package loads {known}")


def method_for_config(config: Any) -> Method:
    """The method whose config class ``config`` is an instance of (the most derived match)."""
    matches = [m for m in methods() if isinstance(config, m.config_class)]
    if not matches:
        raise TypeError(f"config must be one of {[m.config_class.__name__ for m in methods()]}, "
                        f"got {type(config).__name__}")
    return max(matches, key=lambda m: len(type(config).__mro__) - type(config).__mro__.index(m.config_class))


def methods_in(model: nn.Module) -> list[Method]:
    """The registered methods whose adapter ``model`` carries."""
    return [m for m in methods() if m.detect(model)]


def file_method(model: nn.Module) -> Method:
    """The one method whose file format describes the adapter of ``model`` (QLoRA's is LoRA's);
    a ``ValueError`` when the model carries none, or several at once."""
    found = list(dict.fromkeys(get_method(m.file_format) if m.file_format else m for m in methods_in(model)))
    if not found:
        raise ValueError(f"{type(model).__name__} carries no adapter to save; inject one first, e.g. "
                         f"apply_lora(model, ...) or apply_peft(model, config)")
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} carries adapters of several methods "
                         f"({sorted(m.name for m in found)}); one adapter file holds one method. "
                         f"adapter_state_dict(model) holds every method's tensors (save it with "
                         f"safetensors' save_file; load_adapter_state_dict puts it back into a model "
                         f"the same methods were applied to)")
    return found[0]


def planned_injection(model: nn.Module, config: Any, where: str, plan: Callable[[nn.Module, Any], Any],
                      apply: Callable[..., nn.Module]) -> Callable[[nn.Module], None]:
    """The usual ``from_json`` tail: ``plan(model, config)`` checks the injection against the
    model (read only; its ``ValueError`` is re-raised naming ``where``), and the returned function
    applies ``config`` with ``apply(target, config=config)``."""
    try:
        plan(model, config)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return lambda target: apply(target, config=config)


def apply_peft(model: nn.Module, config: Any) -> nn.Module:
    """Inject any registered method's adapter into ``model`` from its config object (e.g.
    ``LoRAConfig(r=8)``, ``IA3Config()``, ``BitFitConfig()``), freeze the rest, return ``model``."""
    return method_for_config(config).apply(model, config=config)


def _load_builtin() -> None:
    """Import every method file of this package (each registers its ``METHOD``) on first use:
    adding a method is adding its file."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["Method", "apply_peft", "file_method", "get_method", "method_for_config", "method_for_peft_type",
           "methods", "methods_in", "planned_injection", "register"]
