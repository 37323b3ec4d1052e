"""BitFit: train only the biases (Ben Zaken, Ravfogel and Goldberg, 2022, arXiv 2106.10199).

Every weight stays frozen; a layer ``y = W·x + b`` trains only ``b``, and a LayerNorm only its
shift ``β`` (the paper trains every bias, LayerNorm's included, or only the biases of the query
projections and of the intermediate (first feed-forward) layers)::

    y = W·x + b            W frozen, b trained         (nn.Linear, Conv1D)
    y = γ·norm(x) + β      γ frozen, β trained         (LayerNorm)

plus, in full, the modules named in ``trainable_modules`` (the task head: BERT's
``classifier``), as trainable copies (:class:`lightning_peft._base.ModulesToSave`).

Models without biases (Llama, SmolLM2) have nothing to train until ``add_missing_biases=True``
gives the targeted linear layers a zero bias (in the weight's dtype and on its device), so the
model computes exactly what it computed before (``W·x + 0``) and training starts from it.

The adapter file holds only the trained biases (``<module path>.bias``) and the modules trained in
full; ``adapter_config.json`` (``peft_type: "BITFIT"``; HF PEFT has no BitFit) names exactly the
modules whose biases train, the ones whose bias BitFit added, and the modules trained in full, so
loading re-creates exactly that on a fresh model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._base import (
    TRAIN_BIAS_ATTR,
    AdapterLayer,
    ModulesToSave,
    first_names,
    freeze_all_but_adapters,
    inside_any,
    wrap_modules_to_save,
)
from lightning_peft.methods import Method, register
from lightning_peft.targeting import (
    TargetSpec,
    check_module_names,
    check_module_spec,
    conv1d_class,
    find_modules,
    find_targets,
)

EVERY_BIAS = ("all", None)
"""``target_modules`` values that select every bias of the model."""

BITFIT_ATTR = "_lightning_peft_bitfit"
"""Set on every module whose bias BitFit trains: ``"added"`` where BitFit created the bias,
``"existing"`` where the model had it. (``_base.TRAIN_BIAS_ATTR`` is set as well: that mark makes
the bias an adapter tensor; this one tells BitFit's biases from LoRA's ``bias="all"``.)"""

_JSON_FIELDS = ("target_modules", "added_biases", "trainable_modules")
_IO_FIELDS = ("peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode")


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


@dataclass
class BitFitConfig:
    """What :func:`apply_bitfit` trains."""

    target_modules: str | list[str] | None = None
    """Whose biases train. ``None`` (or ``"all"``): every bias of the model, LayerNorm's included,
    as in the paper. ``"all-linear"``: the biases of every ``nn.Linear``/``Conv1D`` except the
    output head. A list of names (exact or dotted suffix, as in :mod:`lightning_peft.targeting`;
    the paper's subset on BERT is ``["query", "intermediate.dense"]``), or a regex (full match).
    Named modules must have a bias (or be linear layers, with ``add_missing_biases``)."""
    exclude_modules: str | list[str] | None = None
    """Names (exact or dotted suffix) or a regex of modules whose biases never train."""
    trainable_modules: list[str] | None = None
    """Modules trained in full as trainable copies (e.g. ``["classifier"]``, the task head); no
    bias inside them is selected separately."""
    add_missing_biases: bool = False
    """Give every targeted ``nn.Linear``/``Conv1D`` without a bias a zero bias (the weight's dtype
    and device) that trains; with ``target_modules=None`` every linear layer but the output head.
    The model's outputs stay bit-identical. ``False``: a target without a bias is an error."""

    def __post_init__(self) -> None:
        self.target_modules = check_module_spec(self.target_modules, "target_modules")
        self.exclude_modules = check_module_spec(self.exclude_modules, "exclude_modules")
        self.trainable_modules = check_module_names(self.trainable_modules, "trainable_modules")
        if not isinstance(self.add_missing_biases, bool):
            raise ValueError(f"add_missing_biases must be a bool (True or False), got "
                             f"{self.add_missing_biases!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# 2. Modules: BitFit injects none; it marks the biases it trains (and adds the missing ones)
# --------------------------------------------------------------------------------------------


def _has_bias_slot(module: nn.Module) -> bool:
    """Whether ``module`` registers a ``bias`` parameter (set or ``None``)."""
    return "bias" in module._parameters and not isinstance(module, AdapterLayer)


def _can_add_bias(module: nn.Module) -> bool:
    """A dense ``nn.Linear`` or ``Conv1D`` without a bias (4-bit layers are not given one)."""
    conv1d = conv1d_class()
    weight = getattr(module, "weight", None)
    return (module._parameters.get("bias", 0) is None
            and (isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)))
            and isinstance(weight, Tensor) and weight.is_floating_point()
            and getattr(weight, "quant_state", None) is None)


def _add_zero_bias(module: nn.Module) -> None:
    """Register a zero bias on a Linear (weight (out, in)) or Conv1D (weight (in, out))."""
    conv1d = conv1d_class()
    weight = module.weight
    out = weight.shape[1] if conv1d is not None and isinstance(module, conv1d) else weight.shape[0]
    module.bias = nn.Parameter(torch.zeros(out, dtype=weight.dtype, device=weight.device))  # (out,)


def bitfit_biases(model: nn.Module) -> dict[str, str]:
    """``{module name: "added" | "existing"}`` of every module whose bias BitFit trains."""
    return {n: m.__dict__[BITFIT_ATTR] for n, m in model.named_modules() if BITFIT_ATTR in m.__dict__}


def _inject(model: nn.Module, existing: Sequence[str], added: Sequence[str],
            trainable: Sequence[str]) -> None:
    """Wrap ``trainable``, add zero biases to ``added``, mark the biases of both bias lists, freeze
    the rest. ``added`` modules that already have a bias (a second application) keep it."""
    wrap_modules_to_save(model, trainable)
    for name in added:
        module = model.get_submodule(name)
        if module._parameters.get("bias") is None:
            _add_zero_bias(module)
        setattr(module, TRAIN_BIAS_ATTR, True)
        setattr(module, BITFIT_ATTR, "added")
    for name in existing:
        module = model.get_submodule(name)
        setattr(module, TRAIN_BIAS_ATTR, True)
        if BITFIT_ATTR not in module.__dict__:
            setattr(module, BITFIT_ATTR, "existing")
    freeze_all_but_adapters(model)


# --------------------------------------------------------------------------------------------
# 3. apply_bitfit
# --------------------------------------------------------------------------------------------


def apply_bitfit(model: nn.Module, target_modules: TargetSpec = None, exclude_modules: TargetSpec = None,
                 trainable_modules: Sequence[str] | None = None, add_missing_biases: bool = False,
                 config: BitFitConfig | None = None) -> nn.Module:
    """Make only the selected biases of ``model`` (and the ``trainable_modules``) trainable, in
    place, and return ``model``.

    Arguments are the fields of :class:`BitFitConfig` (or pass ``config=``). Everything is checked
    before the model is changed: an entry of ``target_modules`` that matches no module with a bias
    (the error lists those that exist), a target without a bias while ``add_missing_biases`` is
    False, a target inside a module of ``trainable_modules``. Applying twice is harmless; the
    biases of a second, different selection are added to the first's.
    """
    if config is None:
        config = BitFitConfig(target_modules=target_modules, exclude_modules=exclude_modules,
                              trainable_modules=trainable_modules, add_missing_biases=add_missing_biases)
    elif not isinstance(config, BitFitConfig):
        raise TypeError(f"config must be a BitFitConfig, got {type(config).__name__}")
    existing, added, trainable = _plan(model, config)
    _inject(model, existing, added, trainable)
    return model


def _plan(model: nn.Module, config: BitFitConfig) -> tuple[list[str], list[str], list[str]]:
    """``(names whose existing bias trains, names that get a zero bias, modules trained in
    full)`` for ``config`` on ``model``, or a ``ValueError`` naming the argument."""
    trainable = find_modules(model, config.trainable_modules, "trainable_modules") \
        if config.trainable_modules else []
    trainable = [t for t in trainable if not any(t.startswith(o + ".") for o in trainable)]  # outermost
    adapters = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    exclude = _matcher(config.exclude_modules) if config.exclude_modules is not None else None
    # modules with a bias slot, outside adapter layers and not excluded
    slots = {n: m for n, m in model.named_modules()
             if n and _has_bias_slot(m) and not any(n.startswith(a + ".") for a in adapters)
             and not (exclude is not None and exclude(n))}
    spec = config.target_modules
    add = config.add_missing_biases
    if spec in EVERY_BIAS or spec == "all-linear":
        linear = _all_linear(model)
        # layers another method wraps: their biases lie inside its layer, out of BitFit's reach
        wrapped = {n: type(m).__name__ for n, m in model.named_modules()
                   if isinstance(m, AdapterLayer) and not isinstance(m, ModulesToSave)
                   and isinstance(getattr(m, "base_layer", None), nn.Module) and _has_bias_slot(m.base_layer)
                   and (spec != "all-linear" or n in linear) and not (exclude is not None and exclude(n))}
        if wrapped:
            raise ValueError(f"target_modules={spec!r} selects {first_names(list(wrapped))}, which carr"
                             f"{'ies' if len(wrapped) == 1 else 'y'} another method's layer "
                             f"({', '.join(sorted(set(wrapped.values())))}); BitFit does not reach inside "
                             f"another method's layer. Leave them out with exclude_modules, or apply "
                             f"BitFit to a model without that method")
        pool = {n: m for n, m in slots.items() if not inside_any(n, trainable)
                and (spec != "all-linear" or n in linear)}
        existing = [n for n, m in pool.items() if m._parameters["bias"] is not None]
        missing = [n for n, m in pool.items() if n in linear and _can_add_bias(m)]
        if spec == "all-linear" and missing and not add:
            raise ValueError(_no_bias_message(missing, spec))
        added = missing if add else []
        if not existing and not added:
            if missing:
                raise ValueError(_no_bias_message(missing, spec, model))
            raise ValueError(f"target_modules={spec!r} selects no bias of {type(model).__name__}"
                             + _excluded(config) + f". {_describe(model)}")
        return existing, added, trainable

    hits = _select(slots, spec, config, model)
    clash = [n for n in hits if inside_any(n, trainable)]
    if clash and not isinstance(spec, str):
        raise ValueError(f"trainable_modules and target_modules both select {clash}; a module trained "
                         f"in full trains its biases already: drop it from one of them")
    hits = [n for n in hits if not inside_any(n, trainable)]
    no_bias = [n for n in hits if slots[n]._parameters["bias"] is None]
    unaddable = [n for n in no_bias if not _can_add_bias(slots[n])]
    if unaddable:
        raise ValueError(f"target_modules={spec!r} selects modules without a bias that are not dense "
                         f"nn.Linear/Conv1D layers, so add_missing_biases cannot give them one: "
                         f"{_kinds(model, unaddable)}; exclude them (exclude_modules) or name other "
                         f"modules. {_describe(model)}")
    if no_bias and not add:
        raise ValueError(_no_bias_message(no_bias, spec))
    if not hits:
        raise ValueError(f"every module target_modules={spec!r} selects is inside trainable_modules="
                         f"{config.trainable_modules!r}, so no bias is left to select")
    existing = [n for n in hits if n not in no_bias]
    return existing, no_bias, trainable


def _select(slots: dict[str, nn.Module], spec: str | list[str], config: BitFitConfig,
            model: nn.Module) -> list[str]:
    """Names of ``slots`` that ``spec`` (names or a regex) selects; every list entry must select
    one (a ``ValueError`` lists the modules with biases otherwise)."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    chosen: list[str] = []
    for entry in entries:
        match = _matcher(entry if isinstance(spec, str) else [entry])
        found = [n for n in slots if match(n)]
        if not found:
            what = f"target_modules={spec!r}" if isinstance(spec, str) else \
                f"target_modules entry {entry!r}"
            others = [n for n, m in model.named_modules() if n and match(n) and not _has_bias_slot(m)]
            near = (f" (it names {_kinds(model, others)}, which have no bias of their own: name the "
                    f"layers inside)") if others else ""
            raise ValueError(f"{what} matches no module with a bias{near}{_excluded(config)}. "
                             f"{_describe(model)}")
        chosen.extend(n for n in found if n not in chosen)
    return chosen


def _matcher(spec: str | list[str]) -> Callable[[str], bool]:
    """Names (exact or dotted suffix) or a regex (full match), as in targeting."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(name == e or name.endswith("." + e) for e in spec)


def _all_linear(model: nn.Module) -> set[str]:
    """Targeting's ``"all-linear"``: every Linear/Conv1D except the output head."""
    try:
        return set(find_targets(model, "all-linear"))
    except ValueError:  # no linear layer at all
        return set()


def _no_bias_message(names: list[str], spec: Any, model: nn.Module | None = None) -> str:
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    what = f"{type(model).__name__} has no bias to train" if model is not None else \
        f"target_modules={spec!r} selects linear layers without a bias"
    return (f"{what}: {shown} have none (target_modules={spec!r}). Pass "
            f"add_missing_biases=True to give them zero biases that train (the model's outputs stay "
            f"unchanged), or select layers that have biases")


def _excluded(config: BitFitConfig) -> str:
    return f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules is not None else ""


def _kinds(model: nn.Module, names: list[str], limit: int = 6) -> str:
    shown = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names[:limit]]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _describe(model: nn.Module, limit: int = 12) -> str:
    """The modules of ``model`` that have a bias (or could get one), for error messages."""
    names = [n for n, m in model.named_modules() if n and _has_bias_slot(m)
             and (m._parameters["bias"] is not None or _can_add_bias(m))]
    if not names:
        return f"{type(model).__name__} has no module with a bias and no linear layer"
    leaves = sorted({n.split(".")[-1] for n in names})
    with_bias = [n for n in names if model.get_submodule(n)._parameters["bias"] is not None]
    more = f", ... ({len(with_bias)} in all)" if len(with_bias) > limit else ""
    shown = ", ".join(with_bias[:limit]) + more
    shown = shown or "none (add_missing_biases=True adds them to linear layers)"
    return f"Modules with a bias slot: {leaves}; with a bias: {shown}"


# --------------------------------------------------------------------------------------------
# 4. Registry entry: adapter_config.json fields from the model's marks, and back
# --------------------------------------------------------------------------------------------


def bitfit_to_json(root: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` fields of the BitFit adapter of ``root``, read from its marks:
    ``target_modules`` (the exact names, relative to ``root``, of the modules whose biases train),
    ``added_biases`` (those whose bias BitFit added) and ``trainable_modules`` (the modules
    trained in full, or null)."""
    marks = bitfit_biases(root)
    if not marks:
        raise ValueError(f"{type(root).__name__} carries no BitFit adapter; apply it first with "
                         f"apply_bitfit(model, ...)")
    if "" in marks:
        raise ValueError("BitFit marked the bias of the model itself; save the model that contains it")
    broken = [n for n in marks if root.get_submodule(n)._parameters.get("bias") is None]
    if broken:
        raise ValueError(f"modules BitFit trains the bias of have no bias any more: {broken}")
    trainable = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    return {"target_modules": list(marks),
            "added_biases": [n for n, kind in marks.items() if kind == "added"],
            "trainable_modules": trainable or None}


def _fields(cfg: dict[str, Any], where: str) -> tuple[list[str], list[str], list[str]]:
    """The three BitFit fields of ``cfg`` checked for JSON types and duplicates."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got {type(cfg).__name__}")
    unknown = sorted(k for k in cfg if k not in _JSON_FIELDS + _IO_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown BitFit config fields {unknown}; a BitFit config holds "
                         f"{list(_JSON_FIELDS)}")
    for key in ("base_model_name_or_path", "revision", "task_type"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise ValueError(f"{where}: {key} must be a string or null, got {cfg[key]!r}")
    if "inference_mode" in cfg and not isinstance(cfg["inference_mode"], bool):
        raise ValueError(f"{where}: inference_mode must be true or false (a JSON boolean), got "
                         f"{cfg['inference_mode']!r}")
    if "target_modules" not in cfg:
        raise ValueError(f"{where}: target_modules is missing; it lists the modules whose biases train")

    def names(key: str, empty_ok: bool, null_ok: bool) -> list[str]:
        value = cfg.get(key)
        if value is None and null_ok:
            return []
        if not isinstance(value, list) or not all(isinstance(e, str) for e in value) \
                or (not value and not empty_ok):
            kind = "a non-empty list" if not empty_ok else "a list"
            raise ValueError(f"{where}: {key} must be {kind} of module names (strings)"
                             + (" or null" if null_ok else "") + f", got {value!r}")
        dup = sorted({e for e in value if value.count(e) > 1})
        if dup:
            raise ValueError(f"{where}: {key} names {dup} more than once")
        return list(value)

    targets = names("target_modules", empty_ok=False, null_ok=False)
    added = names("added_biases", empty_ok=True, null_ok=True)
    trainable = names("trainable_modules", empty_ok=True, null_ok=True)
    stray = [n for n in added if n not in targets]
    if stray:
        raise ValueError(f"{where}: added_biases names {stray}, which are not in target_modules")
    return targets, added, trainable


def bitfit_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    """Check every field of a BitFit ``adapter_config.json`` against ``model`` (a ``ValueError``
    naming the field and ``where``) without changing it, and return ``inject(model)``, which adds
    the recorded zero biases, wraps the modules trained in full and marks the biases."""
    targets, added, trainable = _fields(cfg, where)
    modules = dict(model.named_modules())
    adapters = [n for n, m in modules.items() if isinstance(m, AdapterLayer)]

    def usable(name: str) -> bool:
        return bool(name) and name in modules and not any(name.startswith(a + ".") for a in adapters)

    for key, values in (("trainable_modules", trainable), ("target_modules", targets)):
        absent = [n for n in values if not usable(n)]
        if absent:
            raise ValueError(f"{where}: {key} names modules {type(model).__name__} does not have: "
                             f"{absent[:6]}. {_describe(model)}")
    nested = [t for t in trainable if any(t.startswith(o + ".") for o in trainable)]
    if nested:
        raise ValueError(f"{where}: trainable_modules names modules inside other ones: {nested}")
    inside = [n for n in targets if inside_any(n, trainable)]
    if inside:
        raise ValueError(f"{where}: target_modules names modules inside trainable_modules: {inside}")
    no_slot = [n for n in targets if not _has_bias_slot(modules[n])]
    if no_slot:
        raise ValueError(f"{where}: target_modules names modules that have no bias: "
                         f"{_kinds(model, no_slot)}. {_describe(model)}")
    has = {n for n in targets if modules[n]._parameters["bias"] is not None}
    lacking = [n for n in targets if n not in has and n not in added]
    if lacking:
        raise ValueError(f"{where}: target_modules names modules without a bias that added_biases does "
                         f"not list: {lacking[:6]} (the adapter was saved from a model with biases there)")
    clash = [n for n in added if n in has]
    if clash:
        raise ValueError(f"{where}: added_biases names modules that already have a bias: {clash[:6]} "
                         f"(the adapter was saved from another model)")
    bad = [n for n in added if not _can_add_bias(modules[n])]
    if bad:
        raise ValueError(f"{where}: added_biases names modules that are not dense nn.Linear/Conv1D "
                         f"layers: {_kinds(model, bad)}")
    existing = [n for n in targets if n not in added]

    def inject(module: nn.Module) -> None:
        _inject(module, existing, added, trainable)

    return inject


def bitfit_update_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[], None]:
    """For a model that already carries BitFit: the file must describe the same adapter (the
    same biases, added ones and modules trained in full); only tensors are loaded."""
    targets, added, trainable = _fields(cfg, where)
    carried = bitfit_to_json(model)
    given = {"target_modules": targets, "added_biases": added, "trainable_modules": trainable or None}
    for key in _JSON_FIELDS:
        if sorted(given[key] or []) != sorted(carried[key] or []):
            raise ValueError(f"{where}: {key} is {given[key]!r}, but the model carries a BitFit adapter "
                             f"with {key}={carried[key]!r}; load it into a fresh model instead")
    return lambda: None


def _detect(model: nn.Module) -> bool:
    return any(BITFIT_ATTR in m.__dict__ for m in model.modules())


METHOD = register(Method(
    name="bitfit",
    config_class=BitFitConfig,
    peft_type="BITFIT",
    apply=apply_bitfit,
    detect=_detect,
    to_json=bitfit_to_json,
    from_json=bitfit_from_json,
    update_from_json=bitfit_update_from_json,
))

__all__ = ["BitFitConfig", "apply_bitfit", "bitfit_biases"]
