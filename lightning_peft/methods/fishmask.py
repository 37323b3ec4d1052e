"""FishMask: train a fixed sparse mask of the weights with the largest Fisher information
(Sung, Nair and Raffel, 2021, "Training Neural Networks with Fixed Sparse Masks", arXiv 2111.09839).

Before training, the diagonal of the empirical Fisher information is estimated over the candidate
weights from a few batches (:func:`lightning_peft.methods._fisher.empirical_fisher`)::

    F_i ≈ (1/N) · Σ_b (∂L_b / ∂θ_i)²

and the ``k = max(1, round(keep · candidates))`` weights with the largest ``F_i`` over the whole
model (one global top-k, not per tensor) are the only ones that train. Every other weight stays
bit for bit as it was::

    W = W0 with W.flat[idx] = v          idx (k_W,) sorted flat positions, frozen
                                         v   (k_W,) learned, starts at W0.flat[idx]

    x ──► [ base_layer with W0.flat[idx] ← v ] ──► y        (torch.func.functional_call)

Each module that owns selected entries (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``,
``LayerNorm``, ...) is wrapped by a :class:`SparseUpdate` holding, per parameter, the indices (a
buffer) and the values (an ``nn.Parameter``): the optimizer holds exactly ``k`` numbers (plus the
modules trained in full), so Adam's moments and AdamW's weight decay touch nothing else, and
``trainable_parameters`` reports ``k``. Merging writes the values into ``W0`` (the replaced
originals are kept, so unmerging restores ``W0`` bit for bit).

Candidates: the floating-point parameters of the leaf modules ``target_modules`` selects (every
leaf module by default), except parameters shared by several modules (tied input embeddings and
LM head: an update to one use would change the other once merged), parameters inside
``trainable_modules`` (trained in full anyway) or inside another adapter layer, and parameters of
the model itself (no module to wrap).

Files (``peft_type`` ``"FISHMASK"``; HF PEFT has no FishMask): for a parameter ``<param>`` of the
module at ``<path>``, ``base_model.model.<path>.<param>.fishmask_indices`` (int64, sorted flat
positions in ``<param>.reshape(-1)``) and ``base_model.model.<path>.<param>.fishmask_values``
(the parameter's dtype), plus the modules trained in full under their own paths.
``adapter_config.json`` holds ``keep``, ``counts`` (``{"<path>.<param>": number of entries}``)
and ``trainable_modules``; loading wraps the recorded modules and checks that the indices lie in
the parameter and strictly increase before anything is copied.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._base import (
    AdapterLayer,
    ModulesToSave,
    WrapperLayer,
    freeze_all_but_adapters,
    inside_any,
    wrap_modules_to_save,
)
from lightning_peft.methods import Method, register
from lightning_peft.methods._fisher import empirical_fisher, top_k_masks
from lightning_peft.targeting import (
    TargetSpec,
    check_module_names,
    check_module_spec,
    find_modules,
    find_targets,
    get_parent,
)

_VALUES = "fishmask_values_"
_INDICES = "fishmask_indices_"
_RESTORE = "_fishmask_restore_"
_JSON_FIELDS = ("keep", "counts", "trainable_modules")
_IO_FIELDS = ("peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode")


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


@dataclass
class FishMaskConfig:
    """What :func:`apply_fishmask` selects and trains."""

    keep: float = 0.005
    """Fraction of the candidate weights that train, in (0, 1]: ``k = max(1, round(keep ·
    candidates))`` weights with the largest Fisher information over the whole model (the paper's
    0.5% is the default)."""
    target_modules: str | list[str] | None = None
    """Whose parameters are candidates: ``None`` every leaf module of the model; names (exact or
    dotted suffix, as in :mod:`lightning_peft.targeting`), a regex (full match), or
    ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the output head). Parameters shared by
    several modules (tied embeddings and LM head) are never candidates."""
    exclude_modules: str | list[str] | None = None
    """Names (exact or dotted suffix) or a regex of modules whose parameters are never candidates."""
    trainable_modules: list[str] | None = None
    """Modules trained in full as trainable copies (e.g. ``["classifier"]``, the task head); their
    parameters are not candidates."""
    fisher_batches: int = 8
    """How many training batches the Fisher information is estimated from (the callback takes
    the first ones of the run), at least 1."""

    def __post_init__(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) \
                or not 0 < keep <= 1:
            raise ValueError(f"keep must be a number in (0, 1] (the fraction of the candidate weights "
                             f"that train, e.g. 0.005), got {keep!r}")
        self.keep = float(keep)
        if isinstance(self.fisher_batches, bool) or not isinstance(self.fisher_batches, int) \
                or self.fisher_batches < 1:
            raise ValueError(f"fisher_batches must be an integer >= 1 (training batches to estimate the "
                             f"Fisher information from), got {self.fisher_batches!r}")
        self.target_modules = check_module_spec(self.target_modules, "target_modules")
        self.exclude_modules = check_module_spec(self.exclude_modules, "exclude_modules")
        if self.exclude_modules == "all-linear":
            raise ValueError("exclude_modules='all-linear' is not supported: name the modules or give "
                             "a regex")
        self.trainable_modules = check_module_names(self.trainable_modules, "trainable_modules")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# 2. The layer
# --------------------------------------------------------------------------------------------


class SparseUpdate(WrapperLayer):
    """Any module (``base_layer``, kept with its frozen parameters) of which a few entries of some
    direct parameters are replaced by learned values.

    For each such parameter ``<p>`` (``W0``): ``fishmask_indices_<p>`` (a buffer, int64, sorted
    flat positions in ``W0.reshape(-1)``) and ``fishmask_values_<p>`` (an ``nn.Parameter`` of the
    same length in ``W0``'s dtype, initialised to ``W0``'s entries there, so a fresh layer computes
    exactly what ``base_layer`` computes). The forward runs ``base_layer`` through
    ``torch.func.functional_call`` with ``W = W0.flat.index_put(idx, v)``: gradients reach only the
    values. In files the tensors are ``<p>.fishmask_indices`` and ``<p>.fishmask_values``.
    """

    def __init__(self, base_layer: nn.Module, indices: Mapping[str, Tensor],
                 keep: float | None = None) -> None:
        super().__init__()
        if isinstance(base_layer, AdapterLayer):
            raise ValueError(f"SparseUpdate does not wrap another adapter layer "
                             f"({type(base_layer).__name__})")
        if not indices:
            raise ValueError("SparseUpdate needs the indices of at least one parameter")
        self.base_layer = base_layer
        self.param_names: tuple[str, ...] = tuple(n for n in base_layer._parameters if n in indices)
        unknown = sorted(set(indices) - set(self.param_names))
        if unknown:
            raise ValueError(f"{type(base_layer).__name__} has no direct parameters {unknown}; it has "
                             f"{[n for n, p in base_layer._parameters.items() if p is not None]}")
        for name in self.param_names:
            weight = base_layer._parameters[name]
            if weight is None or not weight.is_floating_point():
                raise ValueError(f"{type(base_layer).__name__}.{name} is not a floating-point parameter")
            idx = torch.as_tensor(indices[name])
            if not idx.is_meta:
                check_indices(idx, weight.numel(), f"indices of {type(base_layer).__name__}.{name}")
            idx = idx.to(device=weight.device, dtype=torch.int64)
            self.register_buffer(_INDICES + name, idx)
            self.register_parameter(_VALUES + name, nn.Parameter(
                torch.empty(idx.shape, dtype=weight.dtype, device=weight.device)))
            self.register_buffer(_RESTORE + name, None, persistent=False)
        self.keep = keep
        """The ``keep`` fraction the selection was made with (recorded in files), or None."""
        self.merged = False
        self.reset_parameters()

    def indices(self, name: str) -> Tensor:
        return getattr(self, _INDICES + name)

    def values(self, name: str) -> nn.Parameter:
        return getattr(self, _VALUES + name)

    def reset_parameters(self) -> None:
        """The values back to ``W0``'s entries at the indices (the base model exactly)."""
        with torch.no_grad():
            for name in self.param_names:
                values, weight = self.values(name), self._base_weight(name)
                if values.is_meta or weight.is_meta:
                    continue
                values.copy_(weight.reshape(-1)[self.indices(name).to(weight.device)])

    def _base_weight(self, name: str) -> Tensor:
        """``W0`` (the merged weight while merged)."""
        return self.base_layer._parameters[name]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {_VALUES + n: self.values(n) for n in self.param_names}

    def adapter_buffers(self) -> dict[str, Tensor]:
        return {_INDICES + n: self.indices(n) for n in self.param_names}

    def file_key(self, name: str) -> str:
        for prefix, suffix in ((_VALUES, "fishmask_values"), (_INDICES, "fishmask_indices")):
            if name.startswith(prefix):
                return f"{name[len(prefix):]}.{suffix}"
        return name

    def count(self) -> int:
        """How many entries of the base parameters this layer replaces."""
        return sum(self.indices(n).numel() for n in self.param_names)

    def patched(self, name: str) -> Tensor:
        """``W0`` with the values written at the indices (differentiable in the values only)."""
        weight, values = self._base_weight(name), self.values(name)
        flat = weight.reshape(-1).index_put((self.indices(name),), values.to(weight.dtype))  # (numel,)
        return flat.view_as(weight)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged:
            return self.base_layer(*args, **kwargs)
        patched = {n: self.patched(n) for n in self.param_names}
        return torch.func.functional_call(self.base_layer, patched, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the values into ``W0``, keeping the entries they replace for :meth:`unmerge`."""
        if self.merged:
            warnings.warn("SparseUpdate layer is already merged; merge() does nothing", stacklevel=2)
            return
        restores = {}
        for name in self.param_names:
            weight, idx = self._base_weight(name), self.indices(name)
            restores[name] = weight.reshape(-1)[idx].clone()
        for name in self.param_names:  # every copy taken first: a failure above changes nothing
            weight, idx = self._base_weight(name), self.indices(name)
            weight.index_put_(torch.unravel_index(idx, weight.shape), self.values(name).to(weight.dtype))
            setattr(self, _RESTORE + name, restores[name])
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put ``W0``'s replaced entries back, bit for bit."""
        if not self.merged:
            warnings.warn("SparseUpdate layer is not merged; unmerge() does nothing", stacklevel=2)
            return
        for name in self.param_names:
            weight, idx = self._base_weight(name), self.indices(name)
            restore = getattr(self, _RESTORE + name)
            weight.index_put_(torch.unravel_index(idx, weight.shape), restore.to(weight.dtype))
            setattr(self, _RESTORE + name, None)
        self.merged = False

    def extra_repr(self) -> str:
        counts = ", ".join(f"{n}: {self.indices(n).numel()}/{self._base_weight(n).numel()}"
                           for n in self.param_names)
        return f"entries=({counts}), merged={self.merged}"


def fishmask_layers(model: nn.Module) -> list[tuple[str, SparseUpdate]]:
    """``(name, layer)`` of every FishMask layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseUpdate)]


# --------------------------------------------------------------------------------------------
# 3. fishmask_scores, apply_fishmask
# --------------------------------------------------------------------------------------------


def _matcher(spec: str | list[str]) -> Callable[[str], bool]:
    """Names (exact or dotted suffix) or a regex (full match), as in targeting."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(name == e or name.endswith("." + e) for e in spec)


def _trainable(model: nn.Module, config: FishMaskConfig) -> list[str]:
    names = find_modules(model, config.trainable_modules, "trainable_modules") \
        if config.trainable_modules else []
    return [t for t in names if not any(t.startswith(o + ".") for o in names)]  # outermost


def _shared(model: nn.Module) -> set[int]:
    """``id`` of every parameter that several modules (or several names) hold."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _candidates(model: nn.Module, config: FishMaskConfig) -> tuple[dict[str, nn.Parameter], list[str]]:
    """``({"<module>.<param>": parameter}, trainable module names)``: the weights FishMask may
    select on ``model`` under ``config``, or a ``ValueError`` naming the argument. Reads only."""
    trainable = _trainable(model, config)
    adapters = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    shared = _shared(model)
    spec = config.target_modules
    if spec == "all-linear":
        linear = set(find_targets(model, "all-linear", config.exclude_modules))
        match = linear.__contains__
    else:
        match = (lambda name: True) if spec is None else _matcher(spec)
    exclude = _matcher(config.exclude_modules) if config.exclude_modules is not None else None
    pool: dict[str, nn.Parameter] = {}
    matched: list[str] = []
    for name, module in model.named_modules():
        if not name or inside_any(name, adapters) or any(True for _ in module.children()):
            continue
        if not match(name) or (exclude is not None and exclude(name)):
            continue
        matched.append(name)
        if inside_any(name, trainable):
            continue
        for pname, param in module._parameters.items():
            if param is not None and param.is_floating_point() and id(param) not in shared:
                pool[f"{name}.{pname}"] = param
    if isinstance(spec, list):
        for entry in spec:
            if not any(_matcher([entry])(n) for n in matched):
                raise ValueError(f"target_modules entry {entry!r} matches no leaf module of "
                                 f"{type(model).__name__}{_excluded(config)}")
    if not pool:
        why = " (parameters shared by several modules and those inside trainable_modules never are)"
        raise ValueError(f"target_modules={spec!r}{_excluded(config)} leaves no candidate weight in "
                         f"{type(model).__name__}{why}")
    return pool, trainable


def _excluded(config: FishMaskConfig) -> str:
    return f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules is not None else ""


def _make_config(config: FishMaskConfig | None, **keywords: Any) -> FishMaskConfig:
    defaults = {"keep": 0.005, "fisher_batches": 8}
    if config is None:
        return FishMaskConfig(**keywords)
    if not isinstance(config, FishMaskConfig):
        raise TypeError(f"config must be a FishMaskConfig, got {type(config).__name__}")
    given = [k for k, v in keywords.items() if v != defaults.get(k)]
    if given:
        raise ValueError(f"pass either config= or the keyword arguments, not both: {given} given "
                         f"beside config")
    return config


def fishmask_scores(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], Tensor],
                    config: FishMaskConfig | None = None, target_modules: TargetSpec = None,
                    exclude_modules: TargetSpec = None,
                    trainable_modules: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The empirical Fisher information (``{"<module>.<param>": F}``, float32, the parameter's
    shape) of every FishMask candidate of ``model``: the mean over ``batches`` of the squared
    gradient of ``loss_fn(batch)``. Pass it to :func:`apply_fishmask` as ``fisher``."""
    config = _make_config(config, target_modules=target_modules, exclude_modules=exclude_modules,
                          trainable_modules=trainable_modules)
    pool, _ = _candidates(model, config)
    return empirical_fisher(model, batches, loss_fn, pool)


def select_fishmask(model: nn.Module, fisher: Mapping[str, Tensor],
                    config: FishMaskConfig) -> dict[str, dict[str, Tensor]]:
    """``{module name: {param: sorted flat indices}}``: the ``k`` candidates of ``model`` with the
    largest ``fisher`` scores (``{"<module>.<param>": scores}`` covering every candidate). Reads
    only; a ``ValueError`` names what is wrong."""
    pool, _ = _candidates(model, config)
    if not isinstance(fisher, Mapping):
        raise ValueError(f"fisher must map parameter names to score tensors, got {type(fisher).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(n for n in fisher if n not in params)
    if unknown:
        raise ValueError(f"fisher names parameters {type(model).__name__} does not have: {unknown[:6]}")
    missing = sorted(n for n in pool if n not in fisher)
    if missing:
        raise ValueError(f"fisher has no scores for {len(missing)} candidate parameters "
                         f"({missing[:6]}); compute them with fishmask_scores(model, batches, loss_fn, "
                         f"config) for the same target_modules/exclude_modules/trainable_modules")
    scores: dict[str, Tensor] = {}
    for name, param in pool.items():
        score = fisher[name]
        if not isinstance(score, Tensor) or tuple(score.shape) != tuple(param.shape):
            got = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise ValueError(f"fisher[{name!r}] must be a tensor of the parameter's shape "
                             f"{tuple(param.shape)}, got {got}")
        scores[name] = score
    total = sum(p.numel() for p in pool.values())
    k = max(1, round(config.keep * total))
    try:
        masks = top_k_masks(scores, k)
    except ValueError as err:
        raise ValueError(f"fisher: {err}") from err
    selection: dict[str, dict[str, Tensor]] = {}
    for name, mask in masks.items():
        idx = mask.reshape(-1).nonzero().squeeze(1).cpu()  # (k_W,) sorted
        if idx.numel():
            module, _, pname = name.rpartition(".")
            selection.setdefault(module, {})[pname] = idx
    return selection


def apply_fishmask(model: nn.Module, fisher: Mapping[str, Tensor] | None = None, keep: float = 0.005,
                   target_modules: TargetSpec = None, exclude_modules: TargetSpec = None,
                   trainable_modules: Sequence[str] | None = None, fisher_batches: int = 8,
                   config: FishMaskConfig | None = None, batches: Iterable[Any] | None = None,
                   loss_fn: Callable[[Any], Tensor] | None = None) -> nn.Module:
    """Select the ``k = max(1, round(keep · candidates))`` weights of ``model`` with the largest
    Fisher information, make them the only trainable ones (plus ``trainable_modules``, in full),
    and return ``model`` (changed in place).

    The scores come from ``fisher`` (``{"<module>.<param>": F}``, e.g. from
    :func:`fishmask_scores`) or are estimated here from ``batches`` and ``loss_fn(batch)`` (a
    scalar loss); one of the two is needed. Arguments are the fields of :class:`FishMaskConfig`
    (or pass ``config=`` alone; ``fisher_batches`` is what the callback reads). Everything is
    checked before the model is changed; a model that already carries FishMask is returned as is
    (with another ``keep``: a ``ValueError``).
    """
    config = _make_config(config, keep=keep, target_modules=target_modules,
                          exclude_modules=exclude_modules, trainable_modules=trainable_modules,
                          fisher_batches=fisher_batches)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = fishmask_layers(model)
    if layers:  # the same selection again is harmless; another fraction is refused
        kept = {layer.keep for _, layer in layers if layer.keep is not None}
        if kept and kept != {config.keep}:
            raise ValueError(f"the model already carries FishMask with keep={sorted(kept)[0]!r}, not "
                             f"keep={config.keep!r}; masks do not stack: use a fresh model")
        return model
    if fisher is None:
        if batches is None or loss_fn is None:
            raise ValueError("FishMask selects its weights by their Fisher information: pass fisher= "
                             "(scores by parameter name, from fishmask_scores(model, batches, loss_fn)) "
                             "or batches= and loss_fn= (training batches and loss_fn(batch) -> scalar "
                             "loss); with Lightning use FishMaskCallback, which takes them from the run")
        fisher = fishmask_scores(model, batches, loss_fn, config)
    elif batches is not None or loss_fn is not None:
        raise ValueError("pass either fisher= or batches= and loss_fn=, not both")
    selection = select_fishmask(model, fisher, config)
    inject_fishmask(model, selection, _trainable(model, config), keep=config.keep)
    return model


def inject_fishmask(model: nn.Module, selection: Mapping[str, Mapping[str, Tensor]],
                    trainable: Iterable[str] = (), keep: float | None = None) -> nn.Module:
    """Wrap each module named in ``selection`` (``{module: {param: flat indices}}``) in a
    :class:`SparseUpdate`, the ``trainable`` modules in :class:`ModulesToSave`, and freeze the
    rest. The selection is trusted (:func:`select_fishmask` or a checked file made it)."""
    for name, indices in selection.items():
        module = model.get_submodule(name)
        parent, child = get_parent(model, name)
        setattr(parent, child, SparseUpdate(module, indices, keep=keep))
    wrap_modules_to_save(model, list(trainable))
    freeze_all_but_adapters(model)
    return model


# --------------------------------------------------------------------------------------------
# 4. Registry entry
# --------------------------------------------------------------------------------------------


def fishmask_to_json(root: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` fields of the FishMask adapter of ``root``, read from its layers:
    ``keep`` (the fraction it was selected with; null when unknown), ``counts``
    (``{"<module>.<param>": entries}``, whose sum is ``k``) and ``trainable_modules`` (the
    modules trained in full, or null)."""
    layers = fishmask_layers(root)
    if not layers:
        raise ValueError(f"{type(root).__name__} carries no FishMask adapter; apply it first with "
                         f"apply_fishmask(model, fisher=...) or FishMaskCallback")
    if any(not name for name, _ in layers):
        raise ValueError("the model itself is a SparseUpdate; save the model that contains it")
    keeps = {m.keep for _, m in layers}
    counts = {f"{n}.{p}": int(m.indices(p).numel()) for n, m in layers for p in m.param_names}
    trainable = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    return {"keep": keeps.pop() if len(keeps) == 1 else None, "counts": counts,
            "trainable_modules": trainable or None}


def _fields(cfg: Any, where: str) -> tuple[dict[str, int], list[str]]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got {type(cfg).__name__}")
    unknown = sorted(k for k in cfg if k not in _JSON_FIELDS + _IO_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown FishMask config fields {unknown}; a FishMask config holds "
                         f"{list(_JSON_FIELDS)}")
    if cfg.get("keep") is not None:
        keep = cfg["keep"]
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"{where}: keep must be a number in (0, 1], got {keep!r}")
    counts = cfg.get("counts")
    if not isinstance(counts, dict) or not counts:
        raise ValueError(f"{where}: counts must be a non-empty object {{\"<module>.<param>\": entries}}, "
                         f"got {counts!r}")
    for key, value in counts.items():
        if not isinstance(key, str) or "." not in key or not all(key.split(".")):
            raise ValueError(f"{where}: counts key {key!r} is not '<module path>.<parameter>'")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: counts[{key!r}] must be an integer >= 1, got {value!r}")
    trainable = cfg.get("trainable_modules")
    if trainable is None:
        trainable = []
    elif not isinstance(trainable, list) or not all(isinstance(e, str) and e for e in trainable):
        raise ValueError(f"{where}: trainable_modules must be a list of module names or null, got "
                         f"{trainable!r}")
    elif len(set(trainable)) != len(trainable):
        raise ValueError(f"{where}: trainable_modules names a module more than once: {trainable}")
    return dict(counts), list(trainable)


def _plan_from_counts(model: nn.Module, counts: Mapping[str, int], trainable: list[str],
                      where: str) -> dict[str, dict[str, int]]:
    """``{module: {param: count}}`` for ``counts`` on ``model``, every entry checked (a
    ``ValueError`` naming ``counts``/``trainable_modules`` and ``where``). Reads only."""
    modules = dict(model.named_modules())
    adapters = [n for n, m in modules.items() if isinstance(m, AdapterLayer)]
    for name in trainable:
        if not name or name not in modules or any(name.startswith(a + ".") for a in adapters):
            raise ValueError(f"{where}: trainable_modules names {name!r}, which "
                             f"{type(model).__name__} does not have")
    nested = [t for t in trainable if any(t.startswith(o + ".") for o in trainable)]
    if nested:
        raise ValueError(f"{where}: trainable_modules names modules inside other ones: {nested}")
    shared = _shared(model)
    plan: dict[str, dict[str, int]] = {}
    for key, count in counts.items():
        path, _, pname = key.rpartition(".")
        module = modules.get(path)
        if module is None or isinstance(module, AdapterLayer) or inside_any(path, adapters):
            raise ValueError(f"{where}: counts names {key!r}, but {type(model).__name__} has no module "
                             f"{path!r} to wrap")
        param = module._parameters.get(pname)
        if param is None or not param.is_floating_point():
            raise ValueError(f"{where}: counts names {key!r}, but {path} has no floating-point "
                             f"parameter {pname!r}")
        if id(param) in shared:
            raise ValueError(f"{where}: counts names {key!r}, a parameter shared by several modules "
                             f"(tied weights); FishMask never selects those")
        if inside_any(path, trainable):
            raise ValueError(f"{where}: counts names {key!r}, inside trainable_modules")
        if count > param.numel():
            raise ValueError(f"{where}: counts[{key!r}] is {count}, but {key} has {param.numel()} entries")
        plan.setdefault(path, {})[pname] = count
    return plan


def _placeholders(plan: Mapping[str, Mapping[str, int]], model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Valid indices of the planned counts (0..count-1), to be overwritten by a file's."""
    out = {}
    for path, params in plan.items():
        module = model.get_submodule(path)
        out[path] = {p: torch.arange(c, device=module._parameters[p].device) for p, c in params.items()}
    return out


def fishmask_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    """Check every field of a FishMask ``adapter_config.json`` against ``model`` (changing nothing)
    and return ``inject(model)``, which wraps the recorded modules with placeholder indices of the
    recorded counts (the file's indices and values are copied in afterwards) and the modules
    trained in full."""
    counts, trainable = _fields(cfg, where)
    plan = _plan_from_counts(model, counts, trainable, where)
    keep = float(cfg["keep"]) if cfg.get("keep") is not None else None

    def inject(target: nn.Module) -> None:
        inject_fishmask(target, _placeholders(plan, target), trainable, keep=keep)

    return inject


def fishmask_update_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[], None]:
    """For a model that already carries FishMask: the file must record the same counts and
    modules trained in full (its indices and values then replace the model's)."""
    counts, trainable = _fields(cfg, where)
    carried = fishmask_to_json(model)
    if counts != carried["counts"]:
        raise ValueError(f"{where}: counts differ from those of the FishMask adapter the model carries; "
                         f"load it into a fresh model instead")
    if sorted(trainable) != sorted(carried["trainable_modules"] or []):
        raise ValueError(f"{where}: trainable_modules is {trainable or None!r}, but the model carries "
                         f"{carried['trainable_modules']!r}; load it into a fresh model instead")
    keep = float(cfg["keep"]) if cfg.get("keep") is not None else None

    def update() -> None:
        for _, layer in fishmask_layers(model):
            layer.keep = keep

    return update


def check_indices(indices: Tensor, numel: int, name: str) -> None:
    """A ``ValueError`` naming ``name`` unless ``indices`` is a 1-D integer tensor of positions
    in ``[0, numel)`` that strictly increase."""
    if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex() \
            or indices.dtype == torch.bool:
        raise ValueError(f"{name}: indices must be a 1-D integer tensor, got {indices.dtype} "
                         f"of shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= numel:
        raise ValueError(f"{name}: indices must lie in [0, {numel}) (the parameter's size), found "
                         f"{low if low < 0 else high}")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{name}: indices must strictly increase (sorted, no repeats)")


def fishmask_check_tensors(model: nn.Module, tensors: Mapping[str, Tensor], where: str) -> None:
    """The registry's ``check_tensors``: every ``<path>.<param>.fishmask_indices`` of a file
    (``tensors`` keyed without the file prefix) lies in the parameter and strictly increases,
    and comes with its values (and the reverse)."""
    modules = dict(model.named_modules())
    keys = set(tensors)
    for key, tensor in tensors.items():
        for mine, other in (("fishmask_indices", "fishmask_values"), ("fishmask_values", "fishmask_indices")):
            if key.endswith("." + mine) and key[:-len(mine)] + other not in keys:
                raise ValueError(f"{where}: {key} comes without {key[:-len(mine)] + other}")
        if not key.endswith(".fishmask_indices"):
            continue
        path, _, pname = key[:-len(".fishmask_indices")].rpartition(".")
        module = modules.get(path)
        base = module.base_layer if isinstance(module, SparseUpdate) else module
        param = None if base is None else base._parameters.get(pname)
        if param is None:
            raise ValueError(f"{where}: {key} names no parameter of the model")
        check_indices(tensor, param.numel(), f"{where}: {key}")


def _detect(model: nn.Module) -> bool:
    return any(isinstance(m, SparseUpdate) for m in model.modules())


METHOD = register(Method(
    name="fishmask",
    config_class=FishMaskConfig,
    peft_type="FISHMASK",
    apply=apply_fishmask,
    detect=_detect,
    to_json=fishmask_to_json,
    from_json=fishmask_from_json,
    update_from_json=fishmask_update_from_json,
    check_tensors=fishmask_check_tensors,
))

__all__ = ["FishMaskConfig", "SparseUpdate", "apply_fishmask", "fishmask_layers", "fishmask_scores",
           "inject_fishmask", "select_fishmask"]
