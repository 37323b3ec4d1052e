"""Shared-input fusion: sibling LoRA layers that read the same tensor (q/k/v, gate/up) compute
their ``S_i = dropout(x)·A_iᵀ`` in one pass over ``x`` via :func:`kernels.lora_linear_grouped`.

Which siblings really share their input is learned, not assumed: a :class:`SharedInputGroup`
holds the LoRA layers of one parent with the same ``in_features`` and dropout, watches which of
them are called with the identical tensor during a forward pass, and from the next pass on, the
first member called runs the grouped op for all of them and hands each sibling its output when
that sibling is called with the same tensor. If a sibling is then called with another tensor
(cross-attention, a changed model), the group forgets what it learned and falls back to single
calls, so the result is always that of the layers run one by one.

What is learned takes effect only when a pass starts again, at the member that started the last
pass (a pass ends when a member is called a second time). That member is learned from the calls,
not assumed from the order the layers were registered in: OPT, GPT-J, BART, Whisper and CLIP
register ``k_proj`` before ``q_proj`` but call ``q_proj`` first. Nothing is learned while
backward runs, so an activation-checkpointing recomputation takes the path of the forward it
replays.

What the groups learned is kept in Lightning checkpoints (:func:`learned_state`, through the
callbacks): a resumed run takes the fused path from its first step, as the uninterrupted run did
there, and so resumes bit for bit (the fused backward sums the input gradient in another order
than the layers one by one, so the first, unfused pass of a fresh run differs in the last bits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import kernels
from kernels import _backend

if TYPE_CHECKING:
    from lightning_peft.methods.lora import LoRALinear

_ATTR = "_shared_input_group"


def _key(x: Tensor) -> tuple:
    version = 0 if x.is_inference() else x._version  # inference tensors have no version counter
    return (id(x), x.data_ptr(), version, tuple(x.shape), x.dtype, x.device)


class SharedInputGroup:
    """LoRA layers of one parent that may read the same input (see the module docstring)."""

    def __init__(self, layers: list[LoRALinear]) -> None:
        self.layers = layers
        self.learned: tuple[int, ...] | None = None
        self._round_key: tuple | None = None
        self._round: set[int] = set()
        self._candidate: tuple[int, ...] | None = None
        self._pending: dict[int, Tensor] = {}
        self._pending_key: tuple | None = None
        self._pending_x: Tensor | None = None  # keeps x alive so its id cannot be reused meanwhile
        self._seen: list[int] = []  # members called in the current pass, in call order
        self._first: int | None = None  # the member that started the last complete pass

    def _note_call(self, index: int) -> None:
        """Track passes: a member called a second time starts a new one."""
        if index in self._seen:
            self._first, self._seen = self._seen[0], [index]
        else:
            self._seen.append(index)

    def _observe(self, index: int, key: tuple) -> bool:
        """Record that member ``index`` read ``key``; True when this call starts a new round."""
        if key == self._round_key and index not in self._round:
            self._round.add(index)
            return False
        if len(self._round) >= 2:
            self._candidate = tuple(sorted(self._round))
        self._round_key, self._round = key, {index}
        return True

    def __call__(self, layer: LoRALinear, x: Tensor) -> Tensor:
        index = self.layers.index(layer)
        key = _key(x)
        # Inside backward (an activation-checkpointing recomputation) nothing is learned or
        # unlearned, so the recomputation takes the path of the forward it replays.
        in_backward = torch._C._current_graph_task_id() != -1
        if not in_backward:
            self._note_call(index)
        if index in self._pending:
            out = self._pending.pop(index)
            if self._pending_key == key and x is self._pending_x:
                if not in_backward:
                    self._round.add(index)
                if not self._pending:
                    self._pending_x = None
                return out
            self._pending.clear()  # a sibling read another tensor: stop fusing from next pass
            self._pending_x = None
            if not in_backward:
                self._candidate = None
        if not in_backward and self._observe(index, key) and self.learned != self._candidate:
            # what was learned takes effect only when a pass starts again at the member that
            # started the last one, never in the middle of a pass (a later recomputation must see
            # the same decision)
            if index == self._first:
                self.learned = self._candidate
        operands = None
        if self.learned is not None and index in self.learned:
            operands = self._operands(layer, x)
        if operands is not None:
            members = [self.layers[i] for i in self.learned]
            weights, compute = operands
            # a 4-bit base computes in its compute_dtype (as the layer alone does)
            xc = x if compute is None or torch.is_autocast_enabled(x.device.type) else x.to(compute)
            outs = kernels.lora_linear_grouped(
                xc, weights, [m.lora_A for m in members], [m.lora_B for m in members],
                [m.scaling for m in members], [m.base_layer.bias for m in members],
                dropout_p=layer.dropout if layer.training else 0.0)
            if xc is not x:
                outs = tuple(o.to(x.dtype) for o in outs)
            self._pending = {i: o for i, o in zip(self.learned, outs) if i != index}
            self._pending_key, self._pending_x = key, x
            return outs[self.learned.index(index)]
        return layer.forward_single(x)

    def _operands(self, layer: LoRALinear, x: Tensor) -> tuple[list[Any], torch.dtype | None] | None:
        """``(weights, compute dtype)`` when the learned members may run as one op now, else
        ``None``: each in ``layer``'s mode, unmerged, not DoRA, with only its default adapter
        active, on a floating or 4-bit base as :func:`groupable` asks (read here once per fused
        call: a base may turn 4-bit after grouping, e.g. under Lightning's BitsandbytesPrecision),
        all computing in one dtype; 4-bit bases only where the op runs
        its PyTorch path (on a GPU each runs its own NF4 Triton kernel instead)."""
        from lightning_peft.methods.lora import _DEFAULT_ONLY

        members = [self.layers[i] for i in self.learned]
        if not all(m.training == layer.training and not m.merged and not getattr(m, "use_dora", False)
                   and m.active_adapters == _DEFAULT_ONLY for m in members):
            return None
        weights, computes = zip(*(m.base_operands() for m in members))  # (groupable, read once)
        if len(set(computes)) > 1 or any(isinstance(w, Tensor) and not w.is_floating_point()
                                         for w in weights):
            return None
        if not all(isinstance(w, Tensor) for w in weights) and _backend.use_triton(x):
            return None
        return list(weights), computes[0]


def _groups(model: nn.Module) -> list[tuple[SharedInputGroup, list[str]]]:
    """Each shared-input group of ``model`` once, with its members' names in ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[int, tuple[SharedInputGroup, list[str]]] = {}
    for module in model.modules():
        group = module.__dict__.get(_ATTR)
        if group is not None and id(group) not in found and all(id(m) in names for m in group.layers):
            found[id(group)] = (group, [names[id(m)] for m in group.layers])
    return list(found.values())


def learned_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What the groups of ``model`` learned, by member names (plain lists and strings):
    ``{"<members, comma-joined>": {"fused": [names], "first": name}}``, groups that learned
    nothing left out."""
    state = {}
    for group, names in _groups(model):
        if group.learned is not None and group._first is not None:
            state[",".join(names)] = {"fused": [names[i] for i in group.learned],
                                      "first": names[group._first]}
    return state


def restore_learned(model: nn.Module, state: dict[str, Any]) -> None:
    """Give the groups of ``model`` what :func:`learned_state` recorded; entries for groups the
    model does not have (another model, other targets) are ignored: those groups learn anew."""
    for group, names in _groups(model):
        entry = state.get(",".join(names))
        if not isinstance(entry, dict):
            continue
        fused, first = entry.get("fused"), entry.get("first")
        if not (isinstance(fused, list) and len(fused) >= 2 and set(fused) <= set(names) and first in names):
            continue
        group.learned = group._candidate = tuple(sorted(names.index(n) for n in fused))
        group._first = names.index(first)


def groupable(layer: LoRALinear) -> bool:
    """Plain LoRA on a dense floating or a 4-bit (NF4) base: a DoRA layer (``use_dora``) runs
    :func:`kernels.lora.dora_linear` alone (the grouped op has no DoRA epilogue)."""
    from lightning_peft.methods.lora import _quantized_base_weight

    if getattr(layer, "use_dora", False):
        return False
    weight = getattr(layer.base_layer, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dtype.is_floating_point:
        return True
    return _quantized_base_weight(layer.base_layer) is not None


def attach(model: nn.Module) -> None:
    """Give the sibling LoRA layers of every parent (same in_features and dropout) a shared group."""
    from lightning_peft.methods.lora import LoRALinear

    for parent in model.modules():
        buckets: dict[tuple, list[LoRALinear]] = {}
        for child in parent.children():
            if isinstance(child, LoRALinear) and groupable(child):
                buckets.setdefault((child.in_features, child.dropout), []).append(child)
        for members in buckets.values():
            if len(members) < 2:
                continue
            if all(getattr(m, _ATTR, None) is not None and getattr(m, _ATTR).layers == members
                   for m in members):
                continue
            group = SharedInputGroup(members)
            for m in members:
                m.__dict__[_ATTR] = group


def group_of(layer: nn.Module) -> SharedInputGroup | None:
    group = layer.__dict__.get(_ATTR)
    if group is None or torch.compiler.is_compiling():
        return None
    return group
