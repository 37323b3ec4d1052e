"""Child-tuning: update only a child network of the weights (Xu et al. 2021, "Raise a Child in
Large Language Model", arXiv 2109.05687).

Every step, after backward and before the optimizer's update, the gradient of each child-tuned
weight ``W`` is multiplied by a mask ``M`` (the same shape as ``W``)::

    g ← g ⊙ M / p,   M_ij ~ Bernoulli(p), drawn afresh every step      (task-free, mode "F")
    g ← g ⊙ M,       M = top-p fraction of F_ij over all weights, once  (task-driven, mode "D")

    F_ij ≈ (1/N) · Σ_b (∂L_b / ∂W_ij)²   the empirical Fisher over N training batches, before training

so only the child network ``{ij : M_ij = 1}`` learns. The optimizer still runs its own update on
the whole tensor (Adam's momentum and AdamW's decoupled weight decay would move the masked
weights too), so the masked entries are copied before the step and written back after it: they
are bit for bit what they were, with any optimizer. Parameters outside the method (the modules
trained in full, ``trainable_modules``) are not masked.

The method injects no layer: it marks the parameters it trains (``_base.TRAIN_PARAMS_ATTR`` on
their modules), which makes them adapter tensors for freezing, counting, checkpoints and files.
The per-step work is :func:`attach_child_tuning` (hooks on a torch optimizer; a Lightning run
calls :meth:`ChildTuningHandle.mask_gradients` itself, because Lightning computes the gradients
inside ``optimizer.step(closure)``) and, for mode "D", :func:`child_tuning_fisher_masks`.

The adapter file holds the child-tuned parameters' full tensors (``<module path>.<param>``) and
the modules trained in full; ``adapter_config.json`` (``peft_type: "CHILD_TUNING"``) records the
mode, ``p``, the full names of the child-tuned parameters and the modules trained in full.
Nothing is merged: the trained weights are the model's own.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

import kernels
from lightning_peft._base import (
    TRAIN_PARAMS_ATTR,
    AdapterLayer,
    ModulesToSave,
    freeze_all_but_adapters,
    inside_any,
    wrap_modules_to_save,
)
from lightning_peft.methods import Method, planned_injection, register
from lightning_peft.methods._fisher import empirical_fisher, top_k_masks
from lightning_peft.targeting import (
    TargetSpec,
    check_module_names,
    check_module_spec,
    find_modules,
    find_targets,
)

MODES = ("F", "D")
"""``"F"``: task-free, a fresh Bernoulli(p) mask each step; ``"D"``: task-driven, the top-p
weights by Fisher information, chosen once."""

CHILD_TUNING_ATTR = "_lightning_peft_child_tuning"
"""Set, in the ``__dict__`` of every module owning a child-tuned parameter, to ``{"params": (names
of its direct parameters that are child-tuned), "mode": "F" | "D", "p": float}``."""

TOUCHED_ATTR = "_lightning_peft_child_tuning_touched"
"""``{parameter name: bool tensor}`` in the owner module's ``__dict__``: the entries that were
unmasked at some optimizer step (and so may have changed), for :func:`child_tuning_changed`."""

_JSON_FIELDS = ("mode", "p", "target_parameters", "trainable_modules")
_IO_FIELDS = ("peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode")


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


@dataclass
class ChildTuningConfig:
    """What :func:`apply_child_tuning` trains and how the child network is chosen."""

    mode: str = "F"
    """``"F"`` (task-free): each step a fresh Bernoulli(``p``) mask per weight, the kept gradients
    scaled by ``1/p``. ``"D"`` (task-driven): the ``p`` fraction of the weights with the largest
    Fisher information (over all child-tuned parameters together), estimated before training
    from ``fisher_batches`` training batches; only they train."""
    p: float = 0.3
    """The fraction of the weights in the child network, in (0, 1] (1: full fine-tuning)."""
    target_modules: str | list[str] | None = None
    """Whose parameters are child-tuned. ``None``: every parameter of the model outside
    ``trainable_modules`` (and outside other methods' adapter layers), as in the paper.
    ``"all-linear"``: the weights and biases of every ``nn.Linear``/``Conv1D`` but the output head.
    A list of module names (exact or dotted suffix, as in :mod:`lightning_peft.targeting`; every
    parameter inside a named module) or a regex (full match on a module's name)."""
    exclude_modules: str | list[str] | None = None
    """Names (exact or dotted suffix) or a regex of modules whose parameters are never trained."""
    trainable_modules: list[str] | None = None
    """Modules trained in full, unmasked, as trainable copies (e.g. ``["classifier"]``, the task
    head)."""
    fisher_batches: int = 8
    """Mode "D": how many training batches the Fisher information is estimated from (>= 1)."""
    seed: int | None = None
    """Mode "F": the seed of :class:`lightning_peft.ChildTuningCallback`'s mask generator (``None``:
    drawn once per run and checkpointed). With :func:`attach_child_tuning` pass
    ``generator=torch.Generator().manual_seed(seed)`` instead."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'F' (task-free: a fresh random mask each step) or 'D' "
                             f"(task-driven: the top-p weights by Fisher information), got {self.mode!r}")
        self.p = _check_p(self.p, "p")
        self.target_modules = check_module_spec(self.target_modules, "target_modules")
        self.exclude_modules = check_module_spec(self.exclude_modules, "exclude_modules")
        self.trainable_modules = check_module_names(self.trainable_modules, "trainable_modules")
        if isinstance(self.fisher_batches, bool) or not isinstance(self.fisher_batches, int) \
                or self.fisher_batches < 1:
            raise ValueError(f"fisher_batches must be an integer >= 1 (the number of training batches "
                             f"the Fisher information is estimated from), got {self.fisher_batches!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_p(p: Any, arg: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
        raise ValueError(f"{arg} must be a number in (0, 1] (the fraction of the weights that train), "
                         f"got {p!r}")
    return float(p)


# --------------------------------------------------------------------------------------------
# 2. Modules: Child-tuning injects none; it marks the parameters it trains
# --------------------------------------------------------------------------------------------


def _trainable_tensor(param: Tensor) -> bool:
    """A dense floating-point tensor (not a 4-bit weight)."""
    return (param.is_floating_point() and getattr(param, "quant_state", None) is None
            and not isinstance(param, kernels.NF4Tensor))


def child_tuned_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{full name: parameter}`` of the parameters Child-tuning trains in ``model`` (names as in
    ``model.named_parameters()``: the owner module's path and the parameter's name)."""
    out: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        mark = module.__dict__.get(CHILD_TUNING_ATTR)
        if not mark:
            continue
        dot = f"{prefix}." if prefix else ""
        for name in mark["params"]:
            param = module._parameters.get(name)
            if param is not None:
                out[dot + name] = param
    return out


def _settings(model: nn.Module) -> tuple[str, float]:
    """``(mode, p)`` the marks of ``model`` record (the last application's)."""
    marks = [m.__dict__[CHILD_TUNING_ATTR] for m in model.modules() if CHILD_TUNING_ATTR in m.__dict__]
    if not marks:
        raise ValueError(f"{type(model).__name__} carries no Child-tuning; apply it first with "
                         f"apply_child_tuning(model, ...)")
    return marks[0]["mode"], marks[0]["p"]


def _inject(model: nn.Module, chosen: Sequence[str], trainable: Sequence[str], mode: str, p: float) -> None:
    """Wrap ``trainable``, mark the parameters ``chosen`` (full names), set every mark's mode and
    ``p``, freeze the rest."""
    wrap_modules_to_save(model, trainable)
    for full in chosen:
        owner, _, name = full.rpartition(".")
        module = model.get_submodule(owner)
        mark = module.__dict__.get(CHILD_TUNING_ATTR) or {"params": ()}
        params = tuple(dict.fromkeys((*mark["params"], name)))
        module.__dict__[CHILD_TUNING_ATTR] = {"params": params, "mode": mode, "p": p}
        marked = module.__dict__.get(TRAIN_PARAMS_ATTR, ())
        module.__dict__[TRAIN_PARAMS_ATTR] = tuple(dict.fromkeys((*marked, name)))
    for module in model.modules():
        mark = module.__dict__.get(CHILD_TUNING_ATTR)
        if mark:
            module.__dict__[CHILD_TUNING_ATTR] = {**mark, "mode": mode, "p": p}
    freeze_all_but_adapters(model)


# --------------------------------------------------------------------------------------------
# 3. apply_child_tuning and the per-step functions
# --------------------------------------------------------------------------------------------


def apply_child_tuning(model: nn.Module, mode: str = "F", p: float = 0.3, target_modules: TargetSpec = None,
                       exclude_modules: TargetSpec = None, trainable_modules: Sequence[str] | None = None,
                       fisher_batches: int = 8, seed: int | None = None,
                       config: ChildTuningConfig | None = None) -> nn.Module:
    """Mark the parameters Child-tuning trains in ``model`` (and make the ``trainable_modules``
    trainable copies), freeze everything else, in place, and return ``model``.

    Arguments are the fields of :class:`ChildTuningConfig` (or pass ``config=``). Everything is
    checked before the model is changed. Applying twice is harmless; the parameters of a second,
    different selection are added to the first's, and its mode and ``p`` replace the first's.
    The masking itself happens at each optimizer step: :func:`attach_child_tuning` (plain
    PyTorch) or :class:`lightning_peft.ChildTuningCallback` (Lightning).
    """
    if config is None:
        config = ChildTuningConfig(mode=mode, p=p, target_modules=target_modules,
                                   exclude_modules=exclude_modules, trainable_modules=trainable_modules,
                                   fisher_batches=fisher_batches, seed=seed)
    elif not isinstance(config, ChildTuningConfig):
        raise TypeError(f"config must be a ChildTuningConfig, got {type(config).__name__}")
    chosen, trainable = _plan(model, config)
    _inject(model, chosen, trainable, config.mode, config.p)
    return model


def _plan(model: nn.Module, config: ChildTuningConfig) -> tuple[list[str], list[str]]:
    """``(full names of the parameters to child-tune, modules trained in full)`` for ``config``
    on ``model``, or a ``ValueError`` naming the argument. A tied parameter is listed once, under
    its first owner in ``named_modules()`` order."""
    trainable = find_modules(model, config.trainable_modules, "trainable_modules") \
        if config.trainable_modules else []
    trainable = [t for t in trainable if not any(t.startswith(o + ".") for o in trainable)]  # outermost
    adapters = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    exclude = _matcher(config.exclude_modules) if config.exclude_modules is not None else None
    seen: set[int] = set()
    pool: dict[str, str] = {}  # full parameter name -> owner module name
    for owner, module in model.named_modules():
        if isinstance(module, AdapterLayer) or inside_any(owner, adapters):
            for param in module._parameters.values():  # another method's tensors: never ours
                if param is not None:
                    seen.add(id(param))
            continue
        for name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            if not _trainable_tensor(param) or (exclude is not None and _any_ancestor(owner, exclude)):
                continue
            pool[f"{owner}.{name}" if owner else name] = owner
    spec = config.target_modules
    if spec is None or spec == "all-linear":
        linear = set(_all_linear(model)) if spec == "all-linear" else None
        chosen = [n for n, o in pool.items()
                  if not inside_any(o, trainable) and (linear is None or o in linear)]
        if not chosen:
            raise ValueError(f"target_modules={spec!r} selects no parameter of {type(model).__name__}"
                             + _excluded(config) + f". {_describe(model)}")
        return chosen, trainable
    entries = [spec] if isinstance(spec, str) else list(spec)
    chosen = []
    for entry in entries:
        match = _matcher(entry if isinstance(spec, str) else [entry])
        found = [n for n, o in pool.items() if _any_ancestor(o, match)]
        if not found:
            what = f"target_modules={spec!r}" if isinstance(spec, str) else f"target_modules entry {entry!r}"
            raise ValueError(f"{what} matches no module with a parameter to train{_excluded(config)}. "
                             f"{_describe(model)}")
        clash = sorted({pool[n] for n in found if inside_any(pool[n], trainable)})
        if clash and not isinstance(spec, str):
            raise ValueError(f"trainable_modules and target_modules both select {clash[:6]}; a module "
                             f"trained in full is not masked: drop it from one of them")
        chosen.extend(n for n in found if n not in chosen and not inside_any(pool[n], trainable))
    if not chosen:
        raise ValueError(f"every parameter target_modules={spec!r} selects is inside trainable_modules="
                         f"{config.trainable_modules!r}, so no parameter is left to child-tune")
    return chosen, trainable


def _matcher(spec: str | list[str]) -> Callable[[str], bool]:
    """Names (exact or dotted suffix) or a regex (full match), as in targeting."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(name == e or name.endswith("." + e) for e in spec)


def _any_ancestor(owner: str, match: Callable[[str], bool]) -> bool:
    """Whether module ``owner`` or a module containing it matches (the root never does)."""
    parts = owner.split(".") if owner else []
    return any(match(".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _all_linear(model: nn.Module) -> list[str]:
    try:
        return find_targets(model, "all-linear")
    except ValueError:  # no linear layer at all
        return []


def _excluded(config: ChildTuningConfig) -> str:
    return f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules is not None else ""


def _describe(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, m in model.named_modules() if n and any(p is not None for p in m._parameters.values())]
    if not names:
        return f"{type(model).__name__} has no module with parameters"
    leaves = sorted({n.split(".")[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"Modules with parameters: {leaves}; full names: {shown}"


def child_tuning_fisher_masks(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], Tensor],
                              p: float | None = None) -> dict[str, Tensor]:
    """Mode "D": the child network, ``{full name: bool mask}`` over the child-tuned parameters of
    ``model`` (:func:`child_tuned_parameters`): the ``k = round(p · count)`` weights (at least
    one) with the largest empirical Fisher information over ``batches`` (``loss_fn(batch)`` a
    scalar), ranked over all those parameters together. ``p`` defaults to the model's marks."""
    params = child_tuned_parameters(model)
    if not params:
        raise ValueError(f"{type(model).__name__} carries no Child-tuning; apply it first with "
                         f"apply_child_tuning(model, ...)")
    p = _check_p(_settings(model)[1] if p is None else p, "p")
    fisher = empirical_fisher(model, batches, loss_fn, params)
    count = sum(f.numel() for f in fisher.values())
    return top_k_masks(fisher, max(1, min(count, round(p * count))))


def _scale_kept(grad: Tensor, keep: Tensor, p: float) -> None:
    """``grad ← grad ⊙ keep / p`` in place, rounded once from the exact value: directly where
    ``1/p`` is a power of two, through float64 otherwise (float32 division by ``float32(p)``
    would be off by an ulp for most entries)."""
    if p == 1.0:
        return
    if math.frexp(p)[0] == 0.5 or grad.device.type == "mps":  # exact, or no float64 there
        grad.mul_(keep).div_(p)
    else:
        grad.copy_(grad.to(torch.float64).mul_(keep).div_(p))


class ChildTuningHandle:
    """The per-step masking of one optimizer, made by :func:`attach_child_tuning`.

    :meth:`mask_gradients` (run by the optimizer's step pre-hook, or by a caller that computes
    the gradients inside ``step(closure)``, as Lightning does) masks each child-tuned gradient
    and keeps a copy of the masked entries' values; the step post-hook writes them back.
    :meth:`remove` removes both hooks."""

    def __init__(self, entries: list[tuple[str, nn.Parameter, nn.Module, str]], mode: str, p: float,
                 masks: dict[str, Tensor] | None, generator: torch.Generator | None) -> None:
        self.entries = entries
        """``(full name, parameter, owner module, its name there)`` of every masked parameter."""
        self.mode, self.p = mode, p
        self.masks = masks
        """Mode "D": ``{full name: bool mask}`` (True: trains); ``None`` in mode "F"."""
        self.generator = generator
        """Mode "F": draws the masks (on its own device; the mask is moved to the parameter's)."""
        self._saved: list[tuple[nn.Parameter, Tensor | None, Tensor]] | None = None
        self._hooks: list[Any] = []

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Mask every gradient (F: ``g ⊙ M / p`` with a fresh ``M ~ Bernoulli(p)``; D: ``g ⊙ M``),
        record which entries trained, and copy the masked entries' values (a parameter without a
        gradient: all of it) for the step post-hook."""
        saved = []
        for full, param, owner, name in self.entries:
            grad = param.grad
            if grad is None:
                saved.append((param, None, param.detach().clone()))
                continue
            if grad.is_sparse:
                raise ValueError(f"Child-tuning needs dense gradients; {full} has a sparse one")
            if self.mode == "F":
                keep = torch.rand(param.shape, generator=self.generator,  # (param shape,) in [0, 1)
                                  device=self.generator.device) < self.p
                keep = keep.to(param.device)
                _scale_kept(grad, keep, self.p)
            else:
                keep = self.masks[full]
                if keep.device != param.device:
                    keep = self.masks[full] = keep.to(param.device)
                grad.mul_(keep)
            touched = owner.__dict__.setdefault(TOUCHED_ATTR, {})
            known = touched.get(name)
            if known is None or known.shape != param.shape or known.device != param.device:
                touched[name] = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            touched[name].logical_or_(keep)
            frozen = ~keep
            saved.append((param, frozen, param.detach().masked_select(frozen)))  # (masked entries,)
        self._saved = saved

    @torch.no_grad()
    def restore(self) -> None:
        """Write the masked entries back (after the optimizer's update)."""
        saved, self._saved = self._saved, None
        if saved is None:
            raise RuntimeError("Child-tuning: the optimizer stepped without masking the gradients first; "
                               "call handle.mask_gradients() between backward and step (attach with "
                               "mask_in_pre_hook=True to have the step's pre-hook do it)")
        for param, frozen, values in saved:
            if frozen is None:
                param.data.copy_(values)
            else:
                param.data.masked_scatter_(frozen, values)

    def remove(self) -> None:
        """Remove the optimizer hooks (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._saved = None


def attach_child_tuning(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str | None = None,
                        p: float | None = None, masks: Mapping[str, Tensor] | None = None,
                        generator: torch.Generator | None = None,
                        mask_in_pre_hook: bool = True) -> ChildTuningHandle:
    """Make ``optimizer`` train only the child network of ``model``'s child-tuned parameters (those
    the optimizer holds; others, e.g. the modules trained in full, are left alone) and return the
    handle (``handle.remove()`` detaches it).

    Hooks: ``optimizer.register_step_pre_hook`` masks the gradients (mode "F": a fresh
    Bernoulli(``p``) mask per parameter per step, drawn with ``generator``, kept gradients scaled
    by ``1/p``; mode "D": the fixed ``masks``, ``{full name: bool tensor}`` as
    :func:`child_tuning_fisher_masks` returns them) and copies the masked entries;
    ``register_step_post_hook`` writes them back, so no optimizer (Adam's momentum, AdamW's
    decoupled weight decay, L2 weight decay) moves a masked weight. A parameter without a gradient
    at a step is restored whole. With ``mask_in_pre_hook=False`` the caller runs
    ``handle.mask_gradients()`` after the gradients exist and before the update (Lightning
    computes them inside ``optimizer.step(closure)``, after the pre-hook).

    ``mode`` and ``p`` default to the model's marks. ``generator`` defaults to one on the first
    parameter's device seeded from torch's global generator.
    """
    params = child_tuned_parameters(model)
    if not params:
        raise ValueError(f"{type(model).__name__} carries no Child-tuning; apply it first with "
                         f"apply_child_tuning(model, ...)")
    marked_mode, marked_p = _settings(model)
    mode = marked_mode if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"mode must be 'F' or 'D', got {mode!r}")
    p = _check_p(marked_p if p is None else p, "p")
    in_optimizer = {id(q) for group in optimizer.param_groups for q in group["params"]}
    owners = {}
    for prefix, module in model.named_modules():
        mark = module.__dict__.get(CHILD_TUNING_ATTR)
        for name in (mark or {}).get("params", ()):
            owners[f"{prefix}.{name}" if prefix else name] = (module, name)
    entries = [(full, param, *owners[full]) for full, param in params.items() if id(param) in in_optimizer]
    if not entries:
        raise ValueError("the optimizer holds none of the child-tuned parameters; build it over "
                         "model.parameters() (or the trainable ones) after apply_child_tuning")
    chosen: dict[str, Tensor] | None = None
    if mode == "D":
        if masks is None:
            raise ValueError("mode 'D' needs masks: the child network from "
                             "child_tuning_fisher_masks(model, batches, loss_fn, p)")
        chosen = _check_masks(masks, {full: param for full, param, _, _ in entries}, params)
    elif masks is not None:
        raise ValueError("masks are for mode 'D'; mode 'F' draws a fresh mask every step")
    taken = {id(q) for h in _ATTACHED.get(optimizer, ()) if h._hooks for _, q, _, _ in h.entries}
    again = [full for full, param, _, _ in entries if id(param) in taken]
    if again:  # a second masking would multiply the masks (F: p^2 of the weights, gradients / p^2)
        raise ValueError(f"the optimizer already has Child-tuning attached for {again[:4]}; call "
                         f"handle.remove() on the earlier handle before attaching again")
    if mode == "F" and generator is None:
        device = entries[0][1].device
        generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, ()).item()))
    handle = ChildTuningHandle(entries, mode, p, chosen, generator)

    def pre_hook(opt: Any, args: Any, kwargs: Any) -> None:
        if mask_in_pre_hook:
            handle.mask_gradients()

    def post_hook(opt: Any, args: Any, kwargs: Any) -> None:
        handle.restore()

    handle._hooks = [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]
    _ATTACHED[optimizer] = [h for h in _ATTACHED.get(optimizer, ()) if h._hooks] + [handle]
    return handle


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The handles attached to each optimizer (a removed one has no hooks left)."""


def _check_masks(masks: Mapping[str, Tensor], needed: dict[str, nn.Parameter],
                 params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """The masks of ``needed`` on their parameters' devices, or a ``ValueError`` naming the
    missing, unknown and mis-shaped ones."""
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be a mapping of parameter names to bool tensors, got "
                         f"{type(masks).__name__}")
    missing = sorted(set(needed) - set(masks))
    unknown = sorted(set(masks) - set(params))
    wrong = [f"{n}: {tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}"
             f"{'' if isinstance(m, Tensor) and m.dtype == torch.bool else ' (not bool)'} vs "
             f"{tuple(params[n].shape)}" for n, m in masks.items() if n in params
             and (not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != params[n].shape)]
    kinds = (("missing", missing), ("not child-tuned parameters", unknown), ("mis-shaped", wrong))
    problems = [f"{what}: {items[:5]}" for what, items in kinds if items]
    if problems:
        raise ValueError("masks do not match the model's child-tuned parameters: " + "; ".join(problems))
    return {n: masks[n].to(needed[n].device) for n in needed}


def child_tuning_touched(model: nn.Module) -> dict[str, Tensor]:
    """``{full name: bool tensor}``: the entries of each child-tuned parameter that were unmasked
    at some optimizer step since the masking was attached (zeros where it never stepped)."""
    out = {}
    for prefix, module in model.named_modules():
        mark = module.__dict__.get(CHILD_TUNING_ATTR)
        if not mark:
            continue
        touched = module.__dict__.get(TOUCHED_ATTR, {})
        for name in mark["params"]:
            param = module._parameters.get(name)
            if param is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            t = touched.get(name)
            out[full] = t if t is not None and t.shape == param.shape else \
                torch.zeros(param.shape, dtype=torch.bool, device=param.device)
    return out


def child_tuning_changed(model: nn.Module) -> int:
    """How many child-tuned weights could have changed: those unmasked at one optimizer step or
    more (mode "D": at most the child network; "F": it grows towards every weight). This, not the
    full size of the child-tuned tensors that ``trainable_parameters`` counts, is the method's
    honest number of trained weights."""
    return int(sum(int(t.sum()) for t in child_tuning_touched(model).values()))


def child_tuning_reset_touched(model: nn.Module) -> None:
    """Forget which entries trained (for a fresh count)."""
    for module in model.modules():
        module.__dict__.pop(TOUCHED_ATTR, None)


# --------------------------------------------------------------------------------------------
# 4. Registry entry: adapter_config.json fields from the model's marks, and back
# --------------------------------------------------------------------------------------------


def child_tuning_to_json(root: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` fields of the Child-tuning of ``root``, read from its marks: ``mode``,
    ``p``, ``target_parameters`` (the full names, relative to ``root``, of the child-tuned
    parameters) and ``trainable_modules`` (the modules trained in full, or null)."""
    mode, p = _settings(root)
    params = child_tuned_parameters(root)
    if not params:
        raise ValueError("the parameters Child-tuning marked are gone from the model")
    trainable = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    return {"mode": mode, "p": p, "target_parameters": list(params), "trainable_modules": trainable or None}


def _fields(cfg: dict[str, Any], where: str) -> tuple[str, float, list[str], list[str]]:
    """The Child-tuning fields of ``cfg``, checked for JSON types, ranges and duplicates."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got {type(cfg).__name__}")
    unknown = sorted(k for k in cfg if k not in _JSON_FIELDS + _IO_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown Child-tuning config fields {unknown}; a Child-tuning config "
                         f"holds {list(_JSON_FIELDS)}")
    for key in ("base_model_name_or_path", "revision", "task_type"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise ValueError(f"{where}: {key} must be a string or null, got {cfg[key]!r}")
    if "inference_mode" in cfg and not isinstance(cfg["inference_mode"], bool):
        raise ValueError(f"{where}: inference_mode must be true or false (a JSON boolean), got "
                         f"{cfg['inference_mode']!r}")
    for key in ("mode", "p", "target_parameters"):
        if key not in cfg:
            raise ValueError(f"{where}: {key} is missing; a Child-tuning config holds {list(_JSON_FIELDS)}")
    mode = cfg["mode"]
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be 'F' or 'D', got {mode!r}")
    try:
        p = _check_p(cfg["p"], "p")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err

    def names(key: str, null_ok: bool) -> list[str]:
        value = cfg.get(key)
        if value is None and null_ok:
            return []
        if not isinstance(value, list) or not all(isinstance(e, str) and e for e in value) \
                or (not value and not null_ok):
            kind = "a list" if null_ok else "a non-empty list"
            raise ValueError(f"{where}: {key} must be {kind} of names (non-empty strings)"
                             + (" or null" if null_ok else "") + f", got {value!r}")
        dup = sorted({e for e in value if value.count(e) > 1})
        if dup:
            raise ValueError(f"{where}: {key} names {dup} more than once")
        return list(value)

    return mode, p, names("target_parameters", null_ok=False), names("trainable_modules", null_ok=True)


def _check_against(model: nn.Module, targets: list[str], trainable: list[str]) -> None:
    """Every name of ``targets`` a distinct floating-point parameter of ``model`` outside
    ``trainable`` and outside adapter layers; every ``trainable`` a module, none nested."""
    modules = dict(model.named_modules())
    adapters = [n for n, m in modules.items() if isinstance(m, AdapterLayer) and n]
    absent = [n for n in trainable if not n or n not in modules or inside_any(n, adapters)]
    if absent:
        raise ValueError(f"trainable_modules names modules {type(model).__name__} does not have: "
                         f"{absent[:6]}. {_describe(model)}")
    nested = [t for t in trainable if any(t.startswith(o + ".") for o in trainable)]
    if nested:
        raise ValueError(f"trainable_modules names modules inside other ones: {nested}")
    bad, ids = [], {}
    for full in targets:
        owner, _, name = full.rpartition(".")
        module = modules.get(owner)
        param = None if module is None else module._parameters.get(name)
        if param is None or isinstance(module, AdapterLayer) or inside_any(owner, adapters):
            bad.append(full)
        elif not _trainable_tensor(param):
            raise ValueError(f"target_parameters names {full}, a {param.dtype} tensor Child-tuning "
                             f"cannot train")
        elif inside_any(owner, trainable):
            raise ValueError(f"target_parameters names {full}, inside trainable_modules")
        elif id(param) in ids:
            raise ValueError(f"target_parameters names one (tied) parameter twice: {ids[id(param)]} "
                             f"and {full}")
        else:
            ids[id(param)] = full
    if bad:
        raise ValueError(f"target_parameters names parameters {type(model).__name__} does not have: "
                         f"{bad[:6]}{' ...' if len(bad) > 6 else ''}")


def child_tuning_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    """Check every field of a Child-tuning ``adapter_config.json`` against ``model`` (a
    ``ValueError`` naming the field and ``where``) without changing it, and return
    ``inject(model)``, which wraps the modules trained in full and marks the parameters."""
    mode, p, targets, trainable = _fields(cfg, where)

    def plan(target: nn.Module, _: Any) -> None:
        _check_against(target, targets, trainable)

    def apply(target: nn.Module, config: Any) -> nn.Module:
        _inject(target, targets, trainable, mode, p)
        return target

    return planned_injection(model, None, where, plan, apply)


def child_tuning_update_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[], None]:
    """For a model that already carries Child-tuning: the file must name the same parameters and
    modules trained in full; its mode and ``p`` are set once the tensors have been checked."""
    mode, p, targets, trainable = _fields(cfg, where)
    carried = child_tuning_to_json(model)
    for key, given in (("target_parameters", targets), ("trainable_modules", trainable)):
        if sorted(given) != sorted(carried[key] or []):
            raise ValueError(f"{where}: {key} is {given!r}, but the model carries a Child-tuning with "
                             f"{key}={carried[key]!r}; load it into a fresh model instead")

    def update() -> None:
        for module in model.modules():
            mark = module.__dict__.get(CHILD_TUNING_ATTR)
            if mark:
                module.__dict__[CHILD_TUNING_ATTR] = {**mark, "mode": mode, "p": p}

    return update


def _detect(model: nn.Module) -> bool:
    return any(m.__dict__.get(CHILD_TUNING_ATTR) for m in model.modules())


METHOD = register(Method(
    name="child_tuning",
    config_class=ChildTuningConfig,
    peft_type="CHILD_TUNING",
    apply=apply_child_tuning,
    detect=_detect,
    to_json=child_tuning_to_json,
    from_json=child_tuning_from_json,
    update_from_json=child_tuning_update_from_json,
    bound_fields=("peft_type", "target_parameters", "trainable_modules"),
))

__all__ = ["ChildTuningConfig", "ChildTuningHandle", "apply_child_tuning", "attach_child_tuning",
           "child_tuned_parameters", "child_tuning_changed", "child_tuning_fisher_masks",
           "child_tuning_reset_touched", "child_tuning_touched"]
