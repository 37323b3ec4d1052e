"""ReLoRA: high-rank training through low-rank updates (Lialin et al., 2023, arXiv 2307.05695).

LoRA's update ``s·B·A`` has rank at most r. ReLoRA trains LoRA in cycles of ``reset_every``
optimizer steps and, after the step that completes a cycle, folds the cycle's update into the
frozen weight and starts a fresh one::

    cycle k:   y = W_k·x + b + s·B_k·A_k·x            A_k (r, in), B_k (out, r), s = α/r
    reset:     W_{k+1} = W_k + s·B_k·A_k ;  A <- kaiming (or gaussian), B <- 0
    after K:   W_K = W_0 + Σ_k s·B_k·A_k               rank(W_K - W_0) <= K·r, not r

Since ``B`` restarts at zero, the model's outputs are unchanged at the instant of a reset (up to
the rounding of ``W_k + s·B_k·A_k`` in the weight's dtype). Each reset also prunes the
optimizer state of the adapter parameters by magnitude (the paper keeps about 1% of it: the
moments of the old A/B would otherwise push the fresh ones along the old directions; one mask
per parameter, chosen on Adam's second moment, see :func:`prune_optimizer_state`), and the
learning rate restarts with a short warmup: the paper's *jagged cosine*
(:class:`JaggedCosine`, :func:`jagged_cosine_schedule`)::

    lr(t) / lr = cos_t                                   outside a restart window
               = (j + 1) / restart_warmup · cos_{kR+W-1}  t = kR + j, k >= 1, j < W

    cos_t = linear warmup (t + 1) / warmup_steps, then min_lr_ratio + (1 - min_lr_ratio) ·
            ½(1 + cos(π·progress)) down to min_lr_ratio at the last step

``R = reset_every``, ``W = restart_warmup``; each restart ramps back up to the cosine it left.

The pieces are plain functions for a hand-written loop or Fabric::

    apply_relora(model, r=8, reset_every=200, target_modules="all-linear")
    scheduler = jagged_cosine_schedule(optimizer, total_steps=2000, reset_every=200,
                                       restart_warmup=20, warmup_steps=50)
    for step, batch in enumerate(loader, 1):
        loss(model, batch).backward(); optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if step % 200 == 0:
            relora_reset(model, optimizer)      # merge, re-initialise, prune the state

and :class:`lightning_peft.callbacks.ReLoRACallback` calls them at the right steps in Lightning.

What the product of ReLoRA is: the merged full model (``merge_adapters(model)``, then e.g.
``save_pretrained``). The base weights change at each reset, so the last cycle's A/B alone are not
the trained model. ``save_adapter`` writes a ReLoRA model as a LoRA adapter (``peft_type``
``"LORA"``, this registry entry's ``file_format``): before the first reset that is exactly the
trained model over the original base; after resets it is the last cycle's LoRA *over the merged
base* and is only correct together with those base weights (``ReLoRACallback`` warns then, and
its checkpoints hold the adapted layers' base weights for that reason).

A 4-bit (NF4) base is refused, by :func:`apply_relora` and :func:`relora_reset`: merging would
re-quantize ``W_k + s·B_k·A_k`` to NF4 at every reset, whose rounding error (up to about
``absmax/10`` per element) is larger than a cycle's update, so the update would be mostly lost and
the error would accumulate reset after reset. Train ReLoRA on a dense (bf16/fp32) base.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._base import first_names, freeze_all_but_adapters
from lightning_peft.methods import Method, register
from lightning_peft.methods.lora import METHOD as LORA_METHOD
from lightning_peft.methods.lora import (
    LoRAConfig,
    LoRALinear,
    _quantized_base_weight,
    apply_lora,
    lora_layers,
)
from lightning_peft.targeting import TargetSpec, find_targets

__all__ = ["JaggedCosine", "ReLoRAConfig", "apply_relora", "jagged_cosine", "jagged_cosine_schedule",
           "prune_optimizer_state", "relora_layers", "relora_reset", "relora_resets"]

_MARK = "_lightning_peft_relora"
"""Attribute of a LoRA layer that ReLoRA manages: its :class:`_ReLoRAState`."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keep(value: Any, name: str = "optimizer_keep") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of each adapter optimizer-state "
                         f"tensor kept, by magnitude; the paper keeps 0.01), got {value!r}")
    return float(value)


@dataclass
class ReLoRAConfig(LoRAConfig):
    """What :func:`apply_relora` injects: the fields of :class:`~lightning_peft.methods.lora.LoRAConfig`
    plus the reset cycle."""

    reset_every: int = 1000
    """Optimizer steps per cycle: after every ``reset_every``-th step the update is merged into
    the base weight, A and B are re-initialised and the optimizer state is pruned."""
    optimizer_keep: float = 0.01
    """Fraction, in (0, 1], of each adapter optimizer-state tensor (Adam's moments, SGD's
    momentum) kept at a reset: the largest by magnitude; the rest is set to zero."""
    restart_warmup: int = 50
    """Optimizer steps of linear learning-rate warmup after each reset, in ``[0, reset_every)``
    (used by :func:`jagged_cosine_schedule` and ``ReLoRACallback``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if getattr(self, "use_dora", False):
            raise ValueError("use_dora must be False for ReLoRA: a reset merges the update s·B·A, and DoRA's "
                             "update is not s·B·A")
        if not _is_int(self.reset_every) or self.reset_every <= 0:
            raise ValueError(f"reset_every must be a positive integer (optimizer steps per cycle), "
                             f"got {self.reset_every!r}")
        self.optimizer_keep = _check_keep(self.optimizer_keep)
        if not _is_int(self.restart_warmup) or not 0 <= self.restart_warmup < self.reset_every:
            raise ValueError(f"restart_warmup must be an integer in [0, reset_every={self.reset_every}) "
                             f"(warmup steps after each reset), got {self.restart_warmup!r}")


@dataclass
class _ReLoRAState:
    """What ReLoRA keeps on each layer it manages."""

    optimizer_keep: float
    resets: int = 0


# ------------------------------------------------------------------------------------ apply
def apply_relora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: TargetSpec = None, exclude_modules: TargetSpec = None,
                 modules_to_save: Sequence[str] | None = None, use_rslora: bool = False,
                 init: str = "kaiming", bias: str = "none", autocast_adapter_dtype: bool = True,
                 reset_every: int = 1000, optimizer_keep: float = 0.01, restart_warmup: int = 50,
                 config: ReLoRAConfig | None = None) -> nn.Module:
    """Inject LoRA for ReLoRA into ``model`` in place, freeze everything else, return ``model``.

    Arguments are the fields of :class:`ReLoRAConfig` (or pass ``config=``). The layers are
    :func:`~lightning_peft.methods.lora.apply_lora`'s :class:`LoRALinear`, marked as managed by
    ReLoRA (their ``optimizer_keep`` is remembered for :func:`relora_reset`); applying twice keeps
    the layers and their reset counts. Refused before anything changes (``ValueError`` naming the
    layers): a 4-bit base (see the module docstring), a merged LoRA layer, a DoRA layer.
    """
    if config is None:
        config = ReLoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                              exclude_modules=exclude_modules,
                              modules_to_save=modules_to_save,
                              use_rslora=use_rslora, init=init, bias=bias,
                              autocast_adapter_dtype=autocast_adapter_dtype, reset_every=reset_every,
                              optimizer_keep=optimizer_keep, restart_warmup=restart_warmup)
    elif not isinstance(config, ReLoRAConfig):
        raise TypeError(f"config must be a ReLoRAConfig, got {type(config).__name__}")
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    _check_layers([(n, model.get_submodule(n)) for n in targets])
    apply_lora(model, config=config)
    wanted = set(targets)
    for name, layer in lora_layers(model):
        if name in wanted:
            state = getattr(layer, _MARK, None)
            if state is None:
                setattr(layer, _MARK, _ReLoRAState(config.optimizer_keep))
            else:
                state.optimizer_keep = config.optimizer_keep
    freeze_all_but_adapters(model)
    return model


def _check_layers(named: Iterable[tuple[str, nn.Module]]) -> None:
    """Refuse 4-bit bases, merged LoRA layers and DoRA layers (a ``ValueError`` naming them)."""
    quantized, merged, dora = [], [], []
    for name, module in named:
        if getattr(module, "use_dora", False):
            dora.append(name)
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if _quantized_base_weight(base) is not None:
            quantized.append(name)
        if getattr(module, "merged", False):
            merged.append(name)
    if quantized:
        raise ValueError(f"ReLoRA refuses a 4-bit base ({first_names(quantized)}): each reset would "
                         f"re-quantize W0 + s·B·A to NF4, whose rounding error is larger than a cycle's "
                         f"update. Train ReLoRA on a dense (bf16/fp32) base")
    if dora:
        raise ValueError(f"{first_names(dora)}: DoRA layers; a ReLoRA reset merges the update s·B·A, and "
                         f"DoRA's update is not s·B·A")
    if merged:
        raise ValueError(f"{first_names(merged)}: merged LoRA layers; unmerge_adapters(model) first "
                         f"(a ReLoRA reset merges the update itself)")


def relora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(name, layer)`` of every LoRA layer of ``model`` that ReLoRA manages."""
    return [(n, m) for n, m in lora_layers(model) if getattr(m, _MARK, None) is not None]


def relora_resets(model: nn.Module) -> int:
    """How many resets have been merged into the base weights of ``model`` (0: the base is the
    original one, and a saved LoRA adapter is the whole trained update)."""
    return max((getattr(m, _MARK).resets for _, m in relora_layers(model)), default=0)


def _set_resets(model: nn.Module, resets: int) -> None:
    """Record ``resets`` on every ReLoRA layer of ``model`` (a resumed run's count)."""
    for _, layer in relora_layers(model):
        getattr(layer, _MARK).resets = resets


# ------------------------------------------------------------------------------------ reset
def relora_reset(model: nn.Module,
                 optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
                 optimizer_keep: float | None = None) -> int:
    """One ReLoRA reset: for every ReLoRA layer of ``model``, ``W0 <- W0 + s·B·A`` (computed in
    fp32 at least, rounded once to the weight's dtype), then ``A`` re-initialised (kaiming or
    gaussian, the layer's ``init``) and ``B`` zeroed, so the outputs are unchanged; then the
    optimizer state of exactly those ``A``/``B`` is pruned by magnitude
    (:func:`prune_optimizer_state`). Call it right after the optimizer step that completes a cycle.

    ``optimizer``: one optimizer, several, or None (no state to prune). ``optimizer_keep``: the
    fraction kept, in (0, 1]; None: each layer's ``ReLoRAConfig.optimizer_keep``. Checked before
    anything changes: the model has ReLoRA layers, none merged, none on a 4-bit base, and an
    optimizer given holds some of their parameters (``ValueError`` otherwise). Returns the number
    of layers reset. ``A``/``B`` stay the same ``Parameter`` objects, so the optimizer keeps them.
    """
    layers = relora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no ReLoRA layers; inject them first with "
                         f"apply_relora(model, ...)")
    _check_layers(layers)
    keep = None if optimizer_keep is None else _check_keep(optimizer_keep)
    optimizers = [] if optimizer is None else [optimizer] if isinstance(optimizer, torch.optim.Optimizer) \
        else list(optimizer)
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a list of them), "
                            f"got {type(opt).__name__}")
    if optimizers:
        held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        if not any(id(p) in held for _, m in layers for p in (m.lora_A, m.lora_B)):
            raise ValueError("the optimizer holds none of the ReLoRA parameters (lora_A/lora_B); pass "
                             "the optimizer that trains them")
    with torch.no_grad():
        for _, layer in layers:
            _merge_into_base(layer)
            layer.reset_parameters()
            getattr(layer, _MARK).resets += 1
    for _, layer in layers:
        fraction = keep if keep is not None else getattr(layer, _MARK).optimizer_keep
        for opt in optimizers:
            prune_optimizer_state(opt, (layer.lora_A, layer.lora_B), fraction)
    return len(layers)


def _merge_into_base(layer: LoRALinear) -> None:
    """``W0 <- W0 + s·B·A`` in the base weight's layout, with a single rounding."""
    weight = layer.base_layer.weight                                            # (out, in) or (in, out)
    compute = torch.promote_types(weight.dtype, torch.float32)
    delta = (layer.lora_B.to(compute) @ layer.lora_A.to(compute)) * layer.scaling  # (out, in)
    if layer.fan_in_fan_out:
        delta = delta.t()
    weight.copy_((weight.to(compute) + delta.to(weight.device)).to(weight.dtype))


def prune_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[Tensor],
                          keep: float = 0.01) -> int:
    """Magnitude-prune the optimizer state of ``params``, in place: of every floating-point state
    tensor shaped like its parameter (Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
    SGD ``momentum_buffer``, ...), ``ceil(keep·numel)`` entries are kept and every other entry is
    set to zero. Returns the number of tensors pruned.

    Which entries: with a second moment (``exp_avg_sq``), the ones largest in it, the same
    positions in every state tensor of the parameter; otherwise each tensor's largest in absolute
    value. One mask per parameter, because a first moment kept where the second one was zeroed
    makes Adam's next step ``m̂/(√v̂ + ε)`` tens of times too large: with masks drawn independently
    for ``exp_avg`` and ``exp_avg_sq`` (as the paper's code does), a tiny Llama trained with resets
    every 4 steps ended above its starting loss; with one mask it learns as with no pruning.
    Scalars (``step``, kept, so bias correction goes on), factored or quantized states (Adafactor,
    8-bit optimizers) are left as they are; parameters without state yet are skipped."""
    keep = _check_keep(keep, "keep")
    pruned = 0
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue
        shaped = [v for v in state.values()
                  if isinstance(v, Tensor) and v.is_floating_point() and v.shape == param.shape]
        second = state.get("exp_avg_sq")
        shared = _largest_mask(second, keep) if any(second is t for t in shaped) else None
        for tensor in shaped:
            mask = shared if shared is not None else _largest_mask(tensor, keep)
            if mask is not None:
                tensor.masked_fill_(~mask, 0)
            pruned += 1
    return pruned


@torch.no_grad()
def _largest_mask(tensor: Tensor, keep: float) -> Tensor | None:
    """Where the ``ceil(keep·numel)`` entries of ``tensor`` largest in magnitude are (a boolean
    tensor of its shape); None when that is every entry."""
    n = tensor.numel()
    k = math.ceil(keep * n)
    if k >= n:
        return None
    mask = torch.zeros(n, dtype=torch.bool, device=tensor.device)
    mask[tensor.reshape(-1).abs().topk(k, sorted=False).indices] = True
    return mask.view(tensor.shape)


# ---------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class JaggedCosine:
    """The jagged cosine learning-rate multiplier of ReLoRA (see the module docstring): ``f(t)``
    is the multiplier of optimizer step ``t`` (0-based, as ``LambdaLR`` calls it).

    A callable object, not a lambda, so that ``LambdaLR.state_dict()`` saves its fields."""

    total_steps: int
    """Optimizer steps of the whole run: the cosine reaches ``min_lr_ratio`` at the last one."""
    reset_every: int
    """Steps per ReLoRA cycle (``ReLoRAConfig.reset_every``)."""
    restart_warmup: int = 0
    """Warmup steps after each reset, in ``[0, reset_every)``."""
    warmup_steps: int = 0
    """Warmup steps at the start of the run, in ``[0, total_steps)``."""
    min_lr_ratio: float = 0.0
    """The last step's multiplier, in ``[0, 1]``."""

    def __post_init__(self) -> None:
        if not _is_int(self.total_steps) or self.total_steps <= 0:
            raise ValueError(f"total_steps must be a positive integer (optimizer steps of the run), "
                             f"got {self.total_steps!r}")
        if not _is_int(self.reset_every) or self.reset_every <= 0:
            raise ValueError(f"reset_every must be a positive integer (optimizer steps per cycle), "
                             f"got {self.reset_every!r}")
        if not _is_int(self.restart_warmup) or not 0 <= self.restart_warmup < self.reset_every:
            raise ValueError(f"restart_warmup must be an integer in [0, reset_every={self.reset_every}), "
                             f"got {self.restart_warmup!r}")
        if not _is_int(self.warmup_steps) or not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"warmup_steps must be an integer in [0, total_steps={self.total_steps}), "
                             f"got {self.warmup_steps!r}")
        if isinstance(self.min_lr_ratio, bool) or not isinstance(self.min_lr_ratio, (int, float)) \
                or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {self.min_lr_ratio!r}")

    def cosine(self, step: int) -> float:
        """The schedule without restarts: warmup ``(t + 1) / warmup_steps``, then half a cosine
        from 1 down to ``min_lr_ratio`` at step ``total_steps - 1`` (flat after it)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        cycle, within = divmod(step, self.reset_every)
        if cycle >= 1 and within < self.restart_warmup:
            end = cycle * self.reset_every + self.restart_warmup - 1  # the window's last step
            return (within + 1) / self.restart_warmup * self.cosine(end)
        return self.cosine(step)


def jagged_cosine(step: int, total_steps: int, reset_every: int, restart_warmup: int = 0,
                  warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """The jagged cosine multiplier of optimizer step ``step`` (:class:`JaggedCosine`)."""
    return JaggedCosine(total_steps, reset_every, restart_warmup, warmup_steps, min_lr_ratio)(step)


def jagged_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, reset_every: int,
                           restart_warmup: int = 0, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                           last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :class:`JaggedCosine`, to step once per optimizer step (Lightning:
    ``{"scheduler": ..., "interval": "step"}``). The restarts fall right after the resets when
    :func:`relora_reset` runs after steps ``reset_every, 2·reset_every, ...``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, JaggedCosine(total_steps, reset_every, restart_warmup, warmup_steps, min_lr_ratio),
        last_epoch=last_epoch)


# ---------------------------------------------------------------------------------- registry
def _detect(model: nn.Module) -> bool:
    return any(getattr(m, _MARK, None) is not None for m in model.modules() if isinstance(m, LoRALinear))


METHOD = register(Method(
    name="relora", config_class=ReLoRAConfig, peft_type="LORA", apply=apply_relora, detect=_detect,
    to_json=LORA_METHOD.to_json, from_json=LORA_METHOD.from_json,
    update_from_json=LORA_METHOD.update_from_json, bound_fields=LORA_METHOD.bound_fields,
    file_format="lora"))
