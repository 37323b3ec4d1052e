"""Several LoRA adapters on one model: named adapters, switching, disabling, mixed-adapter batches
and combining. Plain PyTorch, for the LoRA family (LoRA, rsLoRA, DoRA, QLoRA).

Every :class:`~lightning_peft.methods.lora.LoRALinear` keeps its own adapter (``lora_A``/``lora_B``,
named ``"default"``, exactly as :func:`~lightning_peft.apply_lora` made it) and holds the adapters
:func:`add_adapter` (or ``load_adapter(..., adapter_name=...)``) adds beside it, each with its own
r, alpha (hence scaling), rsLoRA, dropout, init and DoRA setting. The layer computes

    y = W0·x + b + Σ_{n active} s_n·B_n·A_n·dropout_n(x)

with the first active adapter (or the DoRA one: one DoRA adapter may be active at a time, its
magnitude rescales the whole weight) through the fused op and each other one's low-rank term
added. With only ``"default"`` active (the start) the layer runs exactly as without named
adapters, fused shared-input path included. Only active adapters train: ``requires_grad``
follows the active set.

Mixed-adapter batches (inference; autograd works too): within ``with adapter_names_for_rows(model,
names):`` (or in ``model(..., adapter_names=names)``, a forward pre-hook :func:`add_adapter` puts on
the transformers model) row ``i`` of the batch runs adapter ``names[i]`` alone (``"__base__"``: the
base model). transformers' ``generate`` refuses keywords its model's forward does not declare, so
for generation use the context manager around ``generate``. Each layer runs, per adapter present,
one ``index_select`` of its rows and the fused op with that adapter, and one gather puts the rows
back in order: the cost grows with the number of adapters present, not with the number of rows.

Combining (:func:`combine_adapters`) makes a new named adapter from the updates
``ΔW_i = s_i·B_i·A_i`` of existing ones, layer by layer, with no cross terms between adapters
(HF PEFT's ``add_weighted_adapter(combination_type="linear")`` combines the A's and the B's
separately, which adds ``B_i·A_j`` terms; that is not copied here):

- ``"linear"`` and ``"cat"``: ``Σ w_i·ΔW_i`` exactly, as stacked factors
  ``A = [A_1; ...; A_K]`` (Σr, in), ``B = [w_1 s_1 B_1, ..., w_K s_K B_K]`` (out, Σr), scaling 1;
- ``"svd"``: the truncated SVD of ``Σ w_i·ΔW_i`` to ``rank`` (default the largest r_i);
- ``"ties"`` (Yadav et al. 2023, arXiv 2306.01708): each ``ΔW_i`` trimmed to its ``density``
  fraction of largest magnitudes, weighted, the sign of each entry elected by the sign of the
  weighted sum, and the mean of the entries that agree with it (disjoint mean);
- ``"dare"`` (Yu et al. 2023, arXiv 2311.03099): each ``ΔW_i`` keeps each entry with probability
  ``density`` and is rescaled by ``1/density``, then ``Σ w_i·ΔW̃_i``; the masks come from
  ``seed``;

``ties`` and ``dare`` are refactorised by SVD to ``rank`` (default ``Σ r_i``, capped at the
layer's ``min(out, in)``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._base import AdapterLayer, ModelState, first_names
from lightning_peft.fsdp import refuse_sharded
from lightning_peft.methods.lora import (
    BASE_ROWS,
    DEFAULT_ADAPTER,
    LoRAConfig,
    LoRALinear,
    add_named_adapter,
    check_adapter_name,
    lora_layers,
)
from lightning_peft.targeting import find_targets

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare")
_HOOK_ATTR = "_lightning_peft_adapter_names_hook"


def _layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; inject LoRA first with "
                         f"apply_lora(model, ...) or load_adapter(model, directory)")
    return layers


def list_adapters(model: nn.Module) -> list[str]:
    """Every adapter of the model's LoRA layers: ``"default"`` first, then the named ones in the
    order they were added."""
    names = {DEFAULT_ADAPTER: None}
    for _, layer in _layers(model):
        names.update(dict.fromkeys(layer.named_adapters()))
    return list(names)


def _check_known(model: nn.Module, names: Sequence[Any], arg: str, extra: tuple[str, ...] = ()) -> list[str]:
    known = list_adapters(model)
    unknown = [n for n in names if not isinstance(n, str) or (n not in known and n not in extra)]
    if unknown:
        raise ValueError(f"{arg}: unknown adapter(s) {unknown}; the model's adapters are {known}"
                         + (f" (and {list(extra)})" if extra else ""))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the model's LoRA layers apply (``["default"]`` until :func:`set_adapter`)."""
    return list(_layers(model)[0][1].active_adapters)


def _update_requires_grad(layers: list[tuple[str, LoRALinear]]) -> None:
    for _, layer in layers:
        for name in [DEFAULT_ADAPTER, *layer.named_adapters()]:
            slot = layer.slot(name)
            active = name in layer.active_adapters
            params = [slot.lora_A, slot.lora_B, slot.lora_magnitude_vector]
            for param in params:
                if param is not None:
                    param.requires_grad_(active)


def install_adapter_names_hook(model: nn.Module) -> None:
    """Let the transformers model inside ``model`` (or ``model`` itself) take
    ``adapter_names=[...]`` in its forward (and so in ``generate``): a forward pre-hook pops the
    keyword and runs the call inside :func:`adapter_names_for_rows`. Installed once."""
    from lightning_peft.io import _transformers_root

    _, root = _transformers_root(model)
    if root.__dict__.get(_HOOK_ATTR) is not None:
        return
    pre = root.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    post = root.register_forward_hook(_post_hook, always_call=True)
    root.__dict__[_HOOK_ATTR] = (pre, post)


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    stack = module.__dict__.setdefault("_lightning_peft_rows_stack", [])
    stack.append(None)  # popped by the forward hook, which runs even when this one raises
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        context = adapter_names_for_rows(module, names)
        context.__enter__()
        stack[-1] = context
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    stack = module.__dict__.get("_lightning_peft_rows_stack")
    context = stack.pop() if stack else None
    if context is not None:
        context.__exit__(None, None, None)


def add_adapter(model: nn.Module, adapter_name: str, config: LoRAConfig | None = None,
                **kwargs: Any) -> nn.Module:
    """Add a new, inactive named adapter to the LoRA layers of ``model`` and return ``model``.

    ``config`` (or the keyword arguments of :class:`LoRAConfig`) gives its r, alpha, dropout,
    rsLoRA, init and DoRA setting; ``target_modules`` selects the layers (``None``: every LoRA
    layer), which must already carry LoRA (the adapter lives beside their default one);
    ``modules_to_save`` and trainable biases are not supported for named adapters. It starts with
    ``B = 0`` (no change to the outputs) and trains once made active with :func:`set_adapter`.
    Everything is checked before the model changes.
    """
    if config is None:
        config = LoRAConfig(**kwargs)
    elif kwargs:
        raise ValueError(f"pass either config or keyword arguments, not both (got {sorted(kwargs)})")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    layers = _layers(model)
    if adapter_name in list_adapters(model):
        raise ValueError(f"adapter_name={adapter_name!r} exists already; delete_adapter(model, "
                         f"{adapter_name!r}) first, or pick another name")
    if config.modules_to_save or config.bias != "none":
        raise ValueError("a named adapter holds LoRA factors only: modules_to_save must be None and bias "
                         f"'none', got modules_to_save={config.modules_to_save!r}, bias={config.bias!r}")
    if config.target_modules is None:
        targets = [n for n, _ in layers]
    else:
        targets = find_targets(model, config.target_modules, config.exclude_modules)
        bare = [t for t in targets if not isinstance(model.get_submodule(t), LoRALinear)]
        if bare:
            raise ValueError(f"target_modules={config.target_modules!r} selects {first_names(bare)}, which "
                             f"carry no LoRA layer; a named adapter lives beside the default one, so "
                             f"apply_lora to those modules first")
    merged = [n for n in targets if model.get_submodule(n).merged]
    if merged:
        raise ValueError(f"{first_names(merged)} are merged; unmerge_adapters(model) first")
    add_named_adapter(model, adapter_name, targets, r=config.r, alpha=config.alpha, dropout=config.dropout,
                      use_rslora=config.use_rslora, init=config.init, use_dora=config.use_dora)
    install_adapter_names_hook(model)
    return model


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> nn.Module:
    """Make ``adapter_name`` (a name or a list of names) the active adapters of every LoRA layer:
    the forward applies their updates summed, and only their tensors require grad. A merged model
    is unmerged first (with a warning). At most one DoRA adapter may be active."""
    names = list(adapter_name) if isinstance(adapter_name, Iterable) and not isinstance(adapter_name, str) \
        else [adapter_name]  # (a non-name is then reported as an unknown adapter)
    if not names:
        raise ValueError("adapter_name must name at least one adapter; use disable_adapters(model) for "
                         "the base model")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_name lists an adapter twice: {names}")
    _check_known(model, names, "adapter_name")
    layers = _layers(model)
    for lname, layer in layers:
        dora = [n for n in names if layer.holds(n) and layer.slot(n).use_dora]
        if len(dora) > 1:
            raise ValueError(f"{lname}: adapters {dora} are DoRA adapters; one DoRA adapter can be active "
                             f"at a time")
    if any(layer.merged for _, layer in layers):
        warnings.warn("set_adapter on a merged model: unmerging it first", stacklevel=2)
        for _, layer in layers:
            if layer.merged:
                layer.unmerge()
    for _, layer in layers:
        layer.active_adapters = list(names)
    _update_requires_grad(layers)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRA layer runs its base layer alone and every module trained in
    full (``modules_to_save``) its original, and so does every other method's layer beside LoRA
    (layers that wrap a module, prompts and prefixes, rows trained in full): the base
    model's outputs bit for bit (biases a ``bias="all"``/``"lora_only"`` adapter trained stay as
    trained). Merged layers are unmerged for the block (``W0`` restored exactly) and merged again
    after it."""
    layers = _layers(model)
    # every other adapter layer beside LoRA runs its base too: the ones that can
    # (``runs_base_when_disabled``) when marked, the other wrappers swapped for their base module
    # for the block; merged
    # ones are unmerged for the block (their merge/unmerge are idempotent)
    lora = {id(layer) for _, layer in layers}
    others = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer) and id(m) not in lora]
    marked = [m for _, m in others if m.runs_base_when_disabled]
    wrappers = [(n, m) for n, m in others if not m.runs_base_when_disabled]
    stuck = [n for n, m in wrappers if not isinstance(m._modules.get("base_layer"), nn.Module)]
    if stuck:
        raise ValueError(f"disable_adapters cannot run {first_names(stuck)} "
                         f"({', '.join(sorted({type(model.get_submodule(n)).__name__ for n in stuck}))}) "
                         f"as the base model")
    parents = {id(child): (parent, key) for parent in model.modules()
               for key, child in parent._modules.items() if child is not None}
    swaps = [(*parents[id(m)], m) for _, m in wrappers]
    merged = [layer for _, layer in layers if layer.merged] + \
        [m for _, m in others if getattr(m, "merged", False)]
    for layer in merged:
        layer.unmerge()
    previous = [(m, m.__dict__.get("_disabled", False)) for m in [*(layer for _, layer in layers), *marked]]
    try:
        for layer, _ in previous:
            layer.__dict__["_disabled"] = True
        for parent, key, wrapper in swaps:
            parent._modules[key] = wrapper.base_layer
        yield model
    finally:
        for parent, key, wrapper in reversed(swaps):
            parent._modules[key] = wrapper
        for layer, state in previous:
            layer.__dict__["_disabled"] = state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a 4-bit base re-quantizes: warned at the first merge
            for layer in merged:
                layer.merge()


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove the named adapter ``adapter_name`` from every LoRA layer (unmerging the layers
    merged with it first). An active adapter leaves the active set (``["default"]`` when it was
    the only one). The default adapter cannot be deleted."""
    if adapter_name == DEFAULT_ADAPTER:
        raise ValueError("the default adapter is part of the LoRA layers and cannot be deleted; "
                         "set_adapter(model, <another>) or disable_adapters(model) instead")
    _check_known(model, [adapter_name], "adapter_name")
    layers = _layers(model)
    for _, layer in layers:
        if layer.merged and adapter_name in layer._merged_names:
            layer.unmerge()
        if adapter_name in layer.named_adapters():
            layer.remove_named(adapter_name)
        else:
            kept = [n for n in layer.active_adapters if n != adapter_name]
            layer.active_adapters = kept or [DEFAULT_ADAPTER]
    _update_requires_grad(layers)
    return model


class _RowPlan:
    """Rows of a batch grouped by adapter: per adapter present, the indices of its rows."""

    def __init__(self, names: list[str]) -> None:
        self.size = len(names)
        order: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            order.setdefault(name, []).append(i)
        self._groups = [(name, torch.tensor(rows, dtype=torch.long)) for name, rows in order.items()]
        perm = torch.cat([rows for _, rows in self._groups])
        self._inverse = torch.argsort(perm)
        self._cache: dict[torch.device, tuple[list, Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[list, Tensor]:
        if device not in self._cache:
            groups = [(n, None if len(self._groups) == 1 else r.to(device)) for n, r in self._groups]
            self._cache[device] = (groups, self._inverse.to(device))
        return self._cache[device]

    def groups(self, device: torch.device) -> list[tuple[str, Tensor | None]]:
        """``(adapter, row indices)``; the indices are None when one adapter has every row."""
        return self._on(device)[0]

    def inverse(self, device: torch.device) -> Tensor:
        return self._on(device)[1]


@contextmanager
def adapter_names_for_rows(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of every batch the model runs uses adapter
    ``adapter_names[i]`` alone (``"__base__"``: the base model), as if that adapter were the only
    active one: e.g. three users' adapters and the base model served in one ``generate`` call.
    The inputs of the LoRA layers must have the batch as their first dimension, with
    ``len(adapter_names)`` rows (beam search and ``num_return_sequences`` repeat rows: repeat the
    names to match). Merged layers are refused."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise ValueError(f"adapter_names must be a non-empty list with one adapter name per row, got "
                         f"{adapter_names!r}")
    names = _check_known(model, list(adapter_names), "adapter_names", extra=(BASE_ROWS,))
    layers = _layers(model)
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"{first_names(merged)} are merged; unmerge_adapters(model) before running a "
                         f"mixed-adapter batch")
    plan = _RowPlan(names)
    previous = [(layer, layer.__dict__.get("_rows")) for _, layer in layers]
    try:
        for _, layer in layers:
            layer.__dict__["_rows"] = plan
        yield model
    finally:
        for layer, state in previous:
            layer.__dict__["_rows"] = state


# ------------------------------------------------------------------------------ combining


def _svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B·A`` the best rank-``rank`` approximation of ``delta`` (out, in)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)            # (out, k) (k,) (k, in)
    return u[:, :rank] * s[:rank], vh[:rank]                           # (out, rank), (rank, in)


def _trim(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ``int(density·numel)`` largest magnitudes set to zero."""
    k = int(density * delta.numel())
    if k >= delta.numel():
        return delta
    out = torch.zeros_like(delta)
    if k > 0:
        top = torch.topk(delta.abs().reshape(-1), k).indices
        out.view(-1)[top] = delta.reshape(-1)[top]
    return out


def _ties(deltas: list[Tensor], weights: list[float], density: float) -> Tensor:
    trimmed = torch.stack([w * _trim(d, density) for d, w in zip(deltas, weights)])  # (K, out, in)
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)            # elected sign
    agree = trimmed.sign() == sign                                                   # (K, out, in)
    total = (trimmed * agree).sum(0)
    return total / agree.sum(0).clamp_min(1).to(total.dtype)                         # disjoint mean


def _dare(deltas: list[Tensor], weights: list[float], density: float, generator: torch.Generator) -> Tensor:
    total = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        keep = torch.rand(d.shape, generator=generator, dtype=torch.float64) < density  # drawn on CPU
        total += w * d * keep.to(d.device) / density
    return total


def combine_adapters(model: nn.Module, adapter_names: Sequence[str], weights: Sequence[float],
                     method: str = "linear", name: str = "combined", rank: int | None = None,
                     density: float | None = None, seed: int | None = None) -> nn.Module:
    """Add the named adapter ``name`` (inactive) made from the updates of ``adapter_names``
    weighted by ``weights``, layer by layer (see the module docstring for the methods), and
    return ``model``.

    ``method``: ``"linear"``/``"cat"`` (exact: ``Σ w_i s_i B_i A_i`` as stacked factors of rank
    ``Σ r_i``, scaling 1), ``"svd"`` (truncated to ``rank``, default the largest ``r_i``),
    ``"ties"`` and ``"dare"`` (with ``density`` in (0, 1]; refactorised by SVD to ``rank``,
    default ``Σ r_i`` capped at ``min(out, in)``). ``seed`` makes DARE's masks reproducible: they
    are drawn on the CPU from ``torch.Generator().manual_seed(seed)``, layer by layer in module
    order, adapter by adapter in ``adapter_names`` order, as ``torch.rand(out, in,
    dtype=float64) < density``. The math runs in float64; the result has the adapters' dtype.
    A layer that holds only some of the adapters combines those; DoRA adapters are refused (their
    update is not ``s·B·A``). Everything is checked and computed before the model changes.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise ValueError(f"adapter_names must be a non-empty list of adapter names, got {adapter_names!r}")
    refuse_sharded(model, "combine_adapters")
    names = _check_known(model, list(adapter_names), "adapter_names")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_names lists an adapter twice: {names}")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(names) \
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                       for w in weights):
        raise ValueError(f"weights must be a list of {len(names)} finite numbers, one per adapter of "
                         f"adapter_names={names}, got {weights!r}")
    if method not in COMBINATIONS:
        raise ValueError(f"method must be one of {COMBINATIONS}, got {method!r}")
    check_adapter_name(name, "name")
    if name in list_adapters(model):
        raise ValueError(f"name={name!r} exists already; pick another name or delete_adapter it first")
    if method in ("ties", "dare"):
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"density must be a number in (0, 1] for method={method!r}, got {density!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    layers = _layers(model)
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"{first_names(merged)} are merged; unmerge_adapters(model) first")
    dora = sorted({n for _, layer in layers for n in names if layer.holds(n) and layer.slot(n).use_dora})
    if dora:
        raise ValueError(f"adapters {dora} are DoRA adapters, whose update is not s·B·A; they cannot be "
                         f"combined")
    generator = None
    if method == "dare":
        generator = torch.Generator()
        generator.manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else int(seed))
    weights = [float(w) for w in weights]
    plan: list[tuple[str, Tensor, Tensor]] = []
    with torch.no_grad():
        for lname, layer in layers:
            held = [(layer.slot(n), w) for n, w in zip(names, weights) if layer.holds(n)]
            if not held:
                continue
            dtype = layer.lora_A.dtype
            f64 = {"dtype": torch.float64}
            if method in ("linear", "cat"):
                a = torch.cat([s.lora_A.to(**f64) for s, _ in held])                       # (Σr, in)
                b = torch.cat([s.lora_B.to(**f64) * (w * s.scaling) for s, w in held], 1)  # (out, Σr)
            else:
                deltas = [(s.lora_B.to(**f64) @ s.lora_A.to(**f64)) * s.scaling for s, _ in held]
                ws = [w for _, w in held]
                if method == "svd":
                    total = sum(w * d for d, w in zip(deltas, ws))
                    k = rank or max(s.r for s, _ in held)
                elif method == "ties":
                    total = _ties(deltas, ws, density)
                    k = rank or sum(s.r for s, _ in held)
                else:
                    total = _dare(deltas, ws, density, generator)
                    k = rank or sum(s.r for s, _ in held)
                if not bool(torch.isfinite(total).all()):
                    raise ValueError(f"weights={weights} make the combined update of {lname} overflow "
                                     f"float64; use smaller weights")
                b, a = _svd_factors(total, min(k, *total.shape))
            a, b = a.to(dtype), b.to(dtype)
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
                raise ValueError(f"weights={weights} make the combined update of {lname} overflow {dtype}; "
                                 f"use smaller weights")
            plan.append((lname, a, b))
        before = ModelState(model)  # a failure part way leaves no half-built adapter
        try:
            for lname, a, b in plan:
                layer = model.get_submodule(lname)
                k = a.shape[0]
                adapter = layer.add_named(name, r=k, alpha=float(k))  # scaling 1: B·A is the update
                adapter.lora_A.copy_(a)
                adapter.lora_B.copy_(b)
                for param in adapter.parameters_by_name().values():
                    param.requires_grad_(False)
        except BaseException:
            before.restore()
            raise
    install_adapter_names_hook(model)
    return model


__all__ = ["COMBINATIONS", "active_adapters", "adapter_names_for_rows", "add_adapter", "combine_adapters",
           "delete_adapter", "disable_adapters", "install_adapter_names_hook", "list_adapters", "set_adapter"]
