"""AdaLoRA: adaptive budget allocation for low-rank adaptation (Zhang et al., 2023, arXiv 2303.10512).

A targeted layer ``y = W0·x + b`` with ``W0`` (out, in) becomes, in SVD form,

    y = W0·x + b + s·P·Λ·Q·dropout(x),   Q = lora_A (r, in), Λ = diag(lora_E) (r, 1), P = lora_B (out, r)
    s = alpha / (ranknum + 1e-5)          ranknum = init_r, also after triplets are masked or pruned

            x ──► [ W0, b ] ─────────────────────────────► + ──► y
            └───► Q (r, in) ──► ⊙ Λ (r) ──► P (out, r) ──► ·s

``Λ`` starts at zero (``Q``, ``P`` at N(0, 0.02²)), so training starts from the base model exactly.
Each triplet ``(P[:, i], λ_i, Q[i, :])`` gets an importance score (paper eq. 7-10): for every
entry ``θ`` of ``P``, ``Λ``, ``Q``

    I(θ) = |θ·∇θ L|                                          sensitivity
    Ī(θ) ← β1·Ī(θ) + (1 − β1)·I(θ)                           smoothed sensitivity
    Ū(θ) ← β2·Ū(θ) + (1 − β2)·|I(θ) − Ī(θ)|                  uncertainty
    S_i = Ī·Ū(λ_i) + mean_k Ī·Ū(Q[i, k]) + mean_k Ī·Ū(P[k, i])

A global budget ``b(t)`` (triplets over all layers) stays at ``init_r·n`` for ``t ≤ tinit``,
falls cubically ``b(t) = ⌊target_r·n + (init_r − target_r)·n·(1 − (t − tinit)/(T − tfinal −
tinit))³⌋`` and masks (``λ_i = 0`` for the ``init_r·n − b(t)`` lowest ``S_i``) every ``deltaT``
steps; at ``t = T − tfinal`` it masks to ``target_r·n`` a last time and keeps that mask for the
last ``tfinal`` steps. Training adds the orthogonality penalty ``w·R`` to the loss, with ``R`` the
mean over every ``P`` and ``Q`` of ``‖PᵀP − I‖_F`` and ``‖QQᵀ − I‖_F`` (the paper writes the squared
norms; the authors' code and HF PEFT use these, and so do we, so that training matches PEFT's).

Everything follows HF PEFT 0.21.2's AdaLoRA step for step (its ``RankAllocator``: the same
scores, schedule, masks and penalty), and the files are PEFT's (``peft_type`` ``"ADALORA"``):
``<path>.lora_A`` (r, in), ``<path>.lora_E`` (r, 1), ``<path>.lora_B`` (out, r), and after
allocation a ``rank_pattern`` ``{"<path>.lora_E": [kept?] * init_r}`` with only the kept triplets
stored. Loading such a file gives layers of ``sum(kept)`` triplets scaled by ``alpha/init_r``.

With Lightning use :class:`lightning_peft.callbacks.AdaLoRACallback`. In a hand-written loop
(the allocation needs the gradients, so it runs after the optimizer step and before
``zero_grad``, as in PEFT and the paper's Algorithm 1)::

    apply_adalora(model, init_r=12, target_r=4, tinit=200, tfinal=500, total_step=3000)
    for step, batch in enumerate(loader):
        loss = model(**batch).loss + adalora_orthogonal_penalty(model)
        loss.backward(); optimizer.step()
        adalora_update_and_allocate(model, step)
        optimizer.zero_grad()
    adalora_prune(model); save_adapter(model, "out/adalora")   # kept triplets + rank_pattern
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

import kernels
from lightning_peft._base import (
    AdapterLayer,
    LinearAdapterLayer,
    ModulesToSave,
    first_names,
    freeze_all_but_adapters,
    inside_any,
    names_outside_adapters,
    wrap_modules_to_save,
)
from lightning_peft.methods import Method, register
from lightning_peft.targeting import (
    TargetSpec,
    check_module_spec,
    conv1d_class,
    find_modules,
    find_targets,
    get_parent,
    peft_modules_to_save,
    short_names,
)

ADALORA_TARGET_MODULES: dict[str, list[str]] = {
    # HF PEFT 0.21.2's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING where it differs from LoRA's
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}
"""Default ``target_modules`` per ``model_type`` where AdaLoRA's differ from LoRA's (others: LoRA's)."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AdaLoRAConfig:
    """What :func:`apply_adalora` injects, and the schedule of its rank allocation."""

    init_r: int = 12
    """Triplets per layer at the start (HF PEFT's ``init_r``)."""
    target_r: int = 8
    """Average triplets per layer at the end: the final budget is ``target_r`` times the number
    of adapted layers, shared among them by importance. At most ``init_r``."""
    alpha: float = 8.0
    """Scale numerator (PEFT's ``lora_alpha``): the update is multiplied by ``alpha / init_r``."""
    dropout: float = 0.0
    """Dropout probability on the adapter branch's input."""
    target_modules: str | list[str] | None = None
    """Names (exact or dotted suffix), a regex (full match), ``"all-linear"``, or None for the
    architecture's default (HF PEFT's AdaLoRA table: Llama ``q_proj, v_proj``)."""
    exclude_modules: str | list[str] | None = None
    """Names or regex of modules never to adapt."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, as trainable copies (e.g. ``["classifier"]``)."""
    tinit: int = 0
    """Warm-up steps at the full budget before any triplet is masked."""
    tfinal: int = 0
    """Last steps, at the final budget, with the mask fixed."""
    deltaT: int = 1
    """Steps between two budget allocations while the budget falls."""
    beta1: float = 0.85
    """EMA coefficient of the smoothed sensitivity, in (0, 1)."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty, in (0, 1)."""
    orth_reg_weight: float = 0.5
    """Weight ``w`` of the orthogonality penalty added to the training loss (0 turns it off)."""
    total_step: int | None = None
    """Training steps ``T``; None: the callback takes ``trainer.estimated_stepping_batches``
    (a hand-written loop passes it to :func:`adalora_update_and_allocate`)."""
    autocast_adapter_dtype: bool = True
    """Keep the adapter in float32 on a half-precision base (HF PEFT's ``autocast_adapter_dtype``)."""

    def __post_init__(self) -> None:
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r must be at most init_r={self.init_r} (the budget only falls), "
                             f"got {self.target_r!r}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not _is_number(self.alpha) or not self.alpha > 0:
            raise ValueError(f"alpha must be a finite positive number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        if not _is_number(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be a finite number >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            check_schedule(self.tinit, self.tfinal, self.total_step)
        if not isinstance(self.autocast_adapter_dtype, bool):
            raise ValueError(f"autocast_adapter_dtype must be a bool (True or False), got "
                             f"{self.autocast_adapter_dtype!r}")
        self.target_modules = check_module_spec(self.target_modules, "target_modules")
        self.exclude_modules = check_module_spec(self.exclude_modules, "exclude_modules")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                    isinstance(e, str) and e for e in self.modules_to_save):
                raise ValueError(f"modules_to_save must be a list of module names, got "
                                 f"{self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save) or None

    def to_dict(self) -> dict:
        return asdict(self)


def check_schedule(tinit: int, tfinal: int, total_step: Any) -> int:
    """``total_step`` if it leaves a budgeting phase (``tinit + tfinal < total_step``), else a
    ``ValueError`` naming the fields."""
    if not _is_int(total_step) or total_step <= 0:
        raise ValueError(f"total_step must be a positive integer, got {total_step!r}")
    if tinit + tfinal >= total_step:
        raise ValueError(f"tinit + tfinal must be less than total_step, so that the budget has steps to "
                         f"fall in: tinit={tinit} + tfinal={tfinal} >= total_step={total_step}")
    return total_step


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class AdaLoRALinear(LinearAdapterLayer):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` (``base_layer``) plus the SVD-form update
    ``s·P·Λ·Q``: ``lora_A`` = Q (r, in), ``lora_E`` = Λ (r, 1), ``lora_B`` = P (out, r).

    ``ranknum`` (the divisor of the scale) is ``init_r`` whatever ``r`` is: a layer loaded with a
    ``rank_pattern`` has ``r = sum(kept)`` rows and the scale it was trained with. ``rank_mask``
    (bool (r,), or None) holds the triplets the allocation keeps while the masked ones are still
    in the layer (:func:`adalora_prune` drops them); ``pattern`` the kept triplets among the
    original ``init_r`` once some were dropped (the file's ``rank_pattern`` entry).
    """

    def __init__(self, base_layer: nn.Module, config: AdaLoRAConfig, r: int | None = None) -> None:
        super().__init__()
        weight = base_layer.weight
        if isinstance(weight, kernels.NF4Tensor) or getattr(weight, "quant_state", None) is not None:
            raise ValueError("AdaLoRA over a 4-bit base is not supported; use a dense base")
        self.base_layer = base_layer
        conv1d = conv1d_class()
        self.fan_in_fan_out = conv1d is not None and isinstance(base_layer, conv1d)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        self.config = config
        self.r = config.init_r if r is None else r
        self.ranknum = config.init_r
        self.scaling = float(config.alpha)
        self.dropout = float(config.dropout)
        dtype = weight.dtype
        self._adapter_dtype = torch.float32 if config.autocast_adapter_dtype and dtype in (
            torch.float16, torch.bfloat16, torch.float32) else None
        factory = {"device": weight.device, "dtype": self._adapter_dtype or dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))   # (r, in)
        self.lora_E = nn.Parameter(torch.empty(self.r, 1, **factory))                  # (r, 1)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))  # (out, r)
        self.rank_mask: Tensor | None = None
        self.pattern: list[bool] | None = None
        self.total_step: int | None = config.total_step
        self._importance: tuple[list[Tensor], list[Tensor]] | None = None  # (Ī, Ū) of A, E, B
        self._divisors: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.merged = False
        self._restore: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Λ zero (the base model exactly), P and Q from N(0, 0.02²), as HF PEFT."""
        if self.lora_A.is_meta:
            return
        with torch.no_grad():
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}

    def file_key(self, name: str) -> str:
        return name  # HF PEFT's "<path>.lora_A" / ".lora_E" / ".lora_B" (ParameterDicts)

    @property
    def adapter_dtype(self) -> torch.dtype | None:
        return self._adapter_dtype

    def _divisor(self, like: Tensor) -> Tensor:
        """``ranknum + 1e-5`` as a (1,) tensor of ``like``'s dtype and device (PEFT's ``ranknum``
        parameter plus 1e-5, so that the result is PEFT's bit for bit)."""
        key = (like.device, like.dtype)
        if key not in self._divisors:
            self._divisors[key] = torch.full((1,), float(self.ranknum), dtype=like.dtype,
                                             device=like.device) + 1e-5
        return self._divisors[key]

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a, e, b = self.lora_A, self.lora_E, self.lora_B
        xa = x if x.dtype == a.dtype else x.to(a.dtype)
        if self.training and self.dropout > 0:
            xa = nn.functional.dropout(xa, self.dropout)
        delta = xa @ (a * e).T @ b.T                                  # (..., out)
        result += delta * self.scaling / self._divisor(delta)        # in place, as PEFT
        return result

    def delta_weight(self) -> Tensor:
        """``s·P·Λ·Q`` in the base weight's layout and dtype (computed in fp32 at least)."""
        dtype = self.base_layer.weight.dtype
        compute = torch.promote_types(dtype, torch.float32)
        a, e, b = (t.detach().to(compute) for t in (self.lora_A, self.lora_E, self.lora_B))
        delta = (b @ (a * e)) * self.scaling / (float(self.ranknum) + 1e-5)  # (out, in)
        return (delta.t() if self.fan_in_fan_out else delta).to(dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; the elements a later subtraction would not
        restore exactly are remembered, so :meth:`unmerge` gives ``W0`` back bit for bit."""
        if self.merged:
            warnings.warn("AdaLoRA layer is already merged; merge() does nothing", stacklevel=2)
            return
        weight = self.base_layer.weight
        delta = self.delta_weight()
        merged = weight + delta
        drift = ((merged - delta) != weight).reshape(-1).nonzero().squeeze(1)
        self._restore = (drift, weight.reshape(-1)[drift].clone())
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again, restoring the original base weight exactly."""
        if not self.merged:
            warnings.warn("AdaLoRA layer is not merged; unmerge() does nothing", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight())
        if self._restore is not None:
            index, values = self._restore
            weight.view(-1)[index.to(weight.device)] = values.to(weight.device, weight.dtype)
        self._restore, self.merged = None, False

    def kept(self) -> int:
        """Triplets the allocation keeps in this layer."""
        return self.r if self.rank_mask is None else int(self.rank_mask.sum())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, kept={self.kept()}, "
                f"init_r={self.ranknum}, alpha={self.scaling}, dropout={self.dropout}")


def adalora_layers(model: nn.Module) -> list[tuple[str, AdaLoRALinear]]:
    """``(name, layer)`` of every AdaLoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)]


# --------------------------------------------------------------------------------------------
# apply_adalora
# --------------------------------------------------------------------------------------------


def _plan(model: nn.Module, config: AdaLoRAConfig) -> tuple[list[str], list[str]]:
    """``(target names, modules_to_save names)`` for ``config`` on ``model``; reads only."""
    spec = config.target_modules
    if spec is None:
        from lightning_peft.targeting import model_type

        spec = ADALORA_TARGET_MODULES.get(model_type(model))
    targets = find_targets(model, spec, config.exclude_modules, every_entry=config.target_modules is not None)
    saved = find_modules(model, config.modules_to_save, "modules_to_save") if config.modules_to_save else []
    explicit = config.target_modules is not None and config.target_modules != "all-linear"
    clash = sorted(set(targets) & set(saved)) if explicit else []
    if clash:
        raise ValueError(f"modules_to_save and target_modules both select {clash}; a module trained "
                         f"in full gets no AdaLoRA")
    targets = [t for t in targets if not inside_any(t, saved)]
    if not targets:
        raise ValueError(f"every module target_modules={config.target_modules!r} selects is in "
                         f"modules_to_save={config.modules_to_save!r}, so nothing is left to adapt")
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) and not isinstance(module, AdaLoRALinear):
            raise ValueError(f"target_modules selects {name}, which already carries a "
                             f"{type(module).__name__}; AdaLoRA does not wrap another method's layer")
        weight = getattr(module, "weight", None)
        if isinstance(weight, kernels.NF4Tensor) or getattr(weight, "quant_state", None) is not None:
            raise ValueError(f"target_modules selects {name}, a 4-bit layer; AdaLoRA needs a dense base")
    return targets, saved


def apply_adalora(model: nn.Module, init_r: int = 12, target_r: int = 8, alpha: float = 8.0,
                  dropout: float = 0.0, target_modules: TargetSpec = None,
                  exclude_modules: TargetSpec = None, modules_to_save: Sequence[str] | None = None,
                  tinit: int = 0, tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85,  # noqa: N803
                  beta2: float = 0.85, orth_reg_weight: float = 0.5, total_step: int | None = None,
                  autocast_adapter_dtype: bool = True, config: AdaLoRAConfig | None = None) -> nn.Module:
    """Inject AdaLoRA into ``model`` in place, freeze everything else, and return ``model``.

    Arguments are the fields of :class:`AdaLoRAConfig` (or pass ``config=``). Layers that already
    carry AdaLoRA are left as they are (applying twice is harmless). Everything is checked before
    the model is changed. Training then needs the penalty (:func:`adalora_orthogonal_penalty`)
    and the allocation (:func:`adalora_update_and_allocate`) each step, which
    :class:`~lightning_peft.callbacks.AdaLoRACallback` does.
    """
    if config is None:
        config = AdaLoRAConfig(init_r=init_r, target_r=target_r, alpha=alpha, dropout=dropout,
                               target_modules=target_modules, exclude_modules=exclude_modules,
                               modules_to_save=modules_to_save,
                               tinit=tinit, tfinal=tfinal, deltaT=deltaT, beta1=beta1, beta2=beta2,
                               orth_reg_weight=orth_reg_weight, total_step=total_step,
                               autocast_adapter_dtype=autocast_adapter_dtype)
    elif not isinstance(config, AdaLoRAConfig):
        raise TypeError(f"config must be an AdaLoRAConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets, saved = _plan(model, config)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, AdaLoRALinear):
            continue
        parent, child = get_parent(model, name)
        setattr(parent, child, AdaLoRALinear(module, config))
    wrap_modules_to_save(model, saved)
    freeze_all_but_adapters(model)
    return model


# --------------------------------------------------------------------------------------------
# Training: the orthogonality penalty and the rank allocation (plain functions)
# --------------------------------------------------------------------------------------------


def _layers_of(model: nn.Module) -> list[AdaLoRALinear]:
    layers = [m for _, m in adalora_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no AdaLoRA layers; inject them first with "
                         f"apply_adalora(model, ...)")
    return layers


def adalora_orthogonal_penalty(model: nn.Module, weight: float | None = None) -> Tensor:
    """``w·R``: the orthogonality penalty to add to the training loss, with
    ``R = mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F over every layer)`` (HF PEFT's ``orth_reg_weight`` term;
    arXiv 2303.10512 eq. 4 with the norms unsquared, as the authors' code) and ``w`` the config's
    ``orth_reg_weight`` unless ``weight`` is given. Differentiable in every ``P`` and ``Q``."""
    layers = _layers_of(model)
    w = layers[0].config.orth_reg_weight if weight is None else weight
    total: Tensor | None = None
    for layer in layers:
        for gram in (layer.lora_A @ layer.lora_A.T,     # Q Qᵀ (r, r)
                     layer.lora_B.T @ layer.lora_B):    # Pᵀ P (r, r)
            eye = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
            term = torch.norm(gram - eye, p="fro")
            total = term if total is None else total + term
    assert total is not None
    return w * (total / (2 * len(layers)))


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:  # noqa: N803
    """``(budget, mask now?)`` at ``step``: ``init_budget`` until ``tinit``, then the cubic fall
    ``⌊target + (init − target)·(1 − (step − tinit)/(T − tfinal − tinit))³⌋`` masking every
    ``deltaT`` steps, and ``target_budget`` (masking every step) after ``T − tfinal``."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * coeff ** 3 + target_budget), step % deltaT == 0


def _update_importance(layers: list[AdaLoRALinear], beta1: float, beta2: float) -> None:
    """Ī ← β1·Ī + (1 − β1)·|θ·g| and Ū ← β2·Ū + (1 − β2)·||θ·g| − Ī| for every entry of every
    ``Q``, ``Λ``, ``P`` (one batched op per step for all layers). Gradients with an inf or NaN (an
    fp16 step the GradScaler skipped) leave the scores as they are."""
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_E, layer.lora_B)]
    missing = [p for p in params if p.grad is None]
    if missing:
        raise ValueError("adalora_update_and_allocate needs the gradients of the adapter: call it after "
                         "loss.backward() (and optimizer.step()), before optimizer.zero_grad()")
    with torch.no_grad():
        grads = [p.grad for p in params]
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return  # an fp16 step the GradScaler skipped: its inf/NaN would poison the averages
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        for i, layer in enumerate(layers):
            if layer._importance is None or layer._importance[0][0].shape != layer.lora_A.shape:
                own = ipt[3 * i:3 * i + 3]
                layer._importance = ([torch.zeros_like(t) for t in own], [torch.zeros_like(t) for t in own])
        avg = [t for layer in layers for t in layer._importance[0]]
        unc = [t for layer in layers for t in layer._importance[1]]
        new_avg = torch._foreach_add(torch._foreach_mul(avg, beta1), torch._foreach_mul(ipt, 1 - beta1))
        dev = torch._foreach_sub(ipt, new_avg)
        torch._foreach_abs_(dev)
        new_unc = torch._foreach_add(torch._foreach_mul(unc, beta2), torch._foreach_mul(dev, 1 - beta2))
        for i, layer in enumerate(layers):
            layer._importance = (new_avg[3 * i:3 * i + 3], new_unc[3 * i:3 * i + 3])


def triplet_scores(layer: AdaLoRALinear) -> Tensor:
    """``S_i`` (r,) of the layer's triplets from its smoothed sensitivity and uncertainty: the
    λ_i entry's ``Ī·Ū`` plus the row mean over ``Q[i, :]`` and the column mean over ``P[:, i]``."""
    if layer._importance is None:
        return torch.zeros(layer.r, device=layer.lora_E.device, dtype=layer.lora_E.dtype)
    (avg_a, avg_e, avg_b), (unc_a, unc_e, unc_b) = layer._importance
    score_a = (avg_a * unc_a).mean(dim=1, keepdim=True)               # (r, 1)
    score_b = (avg_b * unc_b).mean(dim=0, keepdim=False).view(-1, 1)  # (r, 1)
    return (avg_e * unc_e).view(-1) + torch.cat([score_a, score_b], dim=1).sum(dim=1)


@torch.no_grad()
def _mask_to_budget(layers: list[AdaLoRALinear], init_budget: int, budget: int) -> None:
    """Zero λ_i of the ``init_budget − budget`` lowest-scoring triplets over all layers (ties at
    the threshold are masked too, as PEFT does) and record each layer's ``rank_mask``."""
    scores = [triplet_scores(layer) for layer in layers]
    k = init_budget - budget
    threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item() if k > 0 else -math.inf
    for layer, score in zip(layers, scores, strict=True):
        keep = ~(score <= threshold)                                  # (r,)
        layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
        layer.rank_mask = keep


@torch.no_grad()
def _apply_masks(layers: list[AdaLoRALinear]) -> None:
    for layer in layers:
        if layer.rank_mask is not None:
            layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)


def adalora_update_and_allocate(model: nn.Module, step: int, total_step: int | None = None) -> int:
    """One step of AdaLoRA's rank allocation (HF PEFT's ``update_and_allocate``), to call after
    ``loss.backward()`` (and ``optimizer.step()``) and before ``optimizer.zero_grad()``, with
    ``step`` counting optimizer steps from 0. Before ``T − tfinal`` it updates the importance
    scores and, every ``deltaT`` steps after ``tinit``, masks the triplets to the cubic budget;
    at ``T − tfinal`` it masks to the final budget ``target_r·layers``; after it, it re-applies
    that mask. ``total_step`` (``T``) defaults to the config's. Returns the budget of the step.
    """
    layers = _layers_of(model)
    config = layers[0].config
    total = total_step if total_step is not None else layers[0].total_step
    if total is None:
        raise ValueError("total_step is not known: give it to apply_adalora(total_step=...) or to "
                         "adalora_update_and_allocate(model, step, total_step=...)")
    check_schedule(config.tinit, config.tfinal, total)
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be a non-negative integer (optimizer steps from 0), got {step!r}")
    merged = [layer for layer in layers if layer.merged]
    if merged:
        raise ValueError("the AdaLoRA layers are merged; unmerge_adapters(model) before training them")
    for layer in layers:
        layer.total_step = total
    init_budget = sum(layer.r for layer in layers)
    target_budget = min(config.target_r * len(layers), init_budget)
    boundary = total - config.tfinal
    if step < boundary:
        _update_importance(layers, config.beta1, config.beta2)
    budget, mask = budget_schedule(step, init_budget, target_budget, config.tinit, config.tfinal, total,
                                   config.deltaT)
    if step < boundary:
        if mask:
            _mask_to_budget(layers, init_budget, budget)
    elif step == boundary:
        _mask_to_budget(layers, init_budget, budget)
        for layer in layers:
            layer._importance = None
    else:
        _apply_masks(layers)
    return budget


def adalora_ranks(model: nn.Module) -> dict[str, int]:
    """``{layer name: triplets kept}`` of every AdaLoRA layer in ``model``."""
    return {name: layer.kept() for name, layer in adalora_layers(model)}


@torch.no_grad()
def adalora_prune(model: nn.Module) -> dict[str, int]:
    """Drop the masked triplets from every AdaLoRA layer (new, smaller ``lora_A``/``lora_E``/
    ``lora_B`` parameters; the outputs do not change, the scale keeps ``init_r``), as HF PEFT's
    files store them: do this once training is over, before :func:`~lightning_peft.save_adapter`.
    An optimizer built before holds the old parameters. Returns :func:`adalora_ranks`."""
    for _, layer in adalora_layers(model):
        mask = layer.rank_mask
        if mask is None:
            continue
        if bool(mask.all()):
            layer.rank_mask = None
            continue
        if layer.merged:
            raise ValueError("unmerge the AdaLoRA layers before adalora_prune(model)")
        rows = mask.nonzero().squeeze(1)
        old = layer.pattern or [True] * layer.r
        positions = [i for i, kept in enumerate(old) if kept]
        chosen = set(positions[int(i)] for i in rows)
        layer.pattern = [i in chosen for i in range(len(old))]
        _resize(layer, rows)
        layer.rank_mask = None
    return adalora_ranks(model)


def _unprune(layer: AdaLoRALinear) -> tuple:
    """Give a pruned ``layer`` its original ``len(pattern)`` triplets back (new Parameters, the
    kept triplets in their places, the dropped ones zero: the outputs do not change), so a
    checkpoint written before :func:`adalora_prune` loads into it. Returns what
    :func:`_undo_unprune` needs to put the layer back as it was."""
    before = (layer.lora_A, layer.lora_E, layer.lora_B, layer.r, layer.pattern, layer.rank_mask,
              layer._importance)
    n, grad = len(layer.pattern), layer.lora_A.requires_grad
    rows = torch.tensor([i for i, kept in enumerate(layer.pattern) if kept], dtype=torch.long,
                        device=layer.lora_A.device)

    def spread(t: Tensor, dim: int) -> nn.Parameter:
        shape = list(t.shape)
        shape[dim] = n
        return nn.Parameter(t.data.new_zeros(shape).index_copy_(dim, rows, t.data), requires_grad=grad)

    layer.lora_A, layer.lora_E, layer.lora_B = spread(layer.lora_A, 0), spread(layer.lora_E, 0), \
        spread(layer.lora_B, 1)
    layer.r, layer.pattern, layer.rank_mask, layer._importance = n, None, None, None
    return before


def _undo_unprune(layer: AdaLoRALinear, before: tuple) -> None:
    """Put back the layer :func:`_unprune` changed, exactly as it was."""
    (layer.lora_A, layer.lora_E, layer.lora_B, layer.r, layer.pattern, layer.rank_mask,
     layer._importance) = before


def _resize(layer: AdaLoRALinear, rows: Tensor) -> None:
    """Keep the triplets ``rows`` of ``layer`` (new Parameters)."""
    grad = layer.lora_A.requires_grad
    layer.lora_A = nn.Parameter(layer.lora_A.data[rows].clone(), requires_grad=grad)   # (r', in)
    layer.lora_E = nn.Parameter(layer.lora_E.data[rows].clone(), requires_grad=grad)   # (r', 1)
    layer.lora_B = nn.Parameter(layer.lora_B.data[:, rows].clone(), requires_grad=grad)  # (out, r')
    layer.r = int(rows.numel())
    layer._importance = None


# --------------------------------------------------------------------------------------------
# Files: HF PEFT's AdaLoRA adapter_config.json (the registry entry's hooks)
# --------------------------------------------------------------------------------------------

_UNSUPPORTED_OPTIONS = (
    "use_dora", "lora_bias", "layers_to_transform", "layers_pattern", "layer_replication",
    "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "use_qalora",
    "use_bdlora", "megatron_config", "arrow_config", "kasa_config", "monteclora_config", "alpha_pattern",
    "use_rslora",
)
_BOOL_FIELDS = ("inference_mode", "fan_in_fan_out", "use_rslora", "use_dora", "lora_bias")
_BOUND_FIELDS = ("peft_type", "init_r", "lora_alpha", "rank_pattern", "target_modules", "exclude_modules",
                 "modules_to_save", "bias")


def _to_json(root: nn.Module) -> dict[str, Any]:
    """The AdaLoRA fields of ``adapter_config.json`` (HF PEFT's) describing ``root``'s layers."""
    layers = adalora_layers(root)
    if not layers:
        raise ValueError(f"{type(root).__name__} has no AdaLoRA layers to save; inject them first with "
                         f"apply_adalora(model, ...)")
    if any(not name for name, _ in layers):
        raise ValueError("the model itself is an AdaLoRALinear; save the model that contains it")
    pending = [n for n, m in layers if m.rank_mask is not None and not bool(m.rank_mask.all())]
    if pending:
        raise ValueError(f"the rank allocation masked triplets that are still in the layers "
                         f"({first_names(pending)}); HF PEFT's file stores only the kept ones: call "
                         f"adalora_prune(model) first (AdaLoRACallback does when fit ends)")
    config = layers[0][1].config
    total = next((m.total_step for _, m in layers if m.total_step is not None), None)
    if total is None:
        raise ValueError("total_step is not known (HF PEFT's AdaLoRA config requires it): give "
                         "apply_adalora(total_step=...), or train with AdaLoRACallback first")
    init_r = {m.ranknum for _, m in layers}
    if len(init_r) > 1:
        raise ValueError(f"the AdaLoRA layers have different init_r ({sorted(init_r)}), which "
                         f"adapter_config.json cannot express")
    alphas, dropouts = {m.scaling for _, m in layers}, {m.dropout for _, m in layers}
    if len(alphas) > 1 or len(dropouts) > 1:
        raise ValueError(f"the AdaLoRA layers have different alphas ({sorted(alphas)}) or dropouts "
                         f"({sorted(dropouts)}), which adapter_config.json cannot express")
    alpha = alphas.pop()
    patterned = any(m.pattern is not None for _, m in layers)
    saved = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    free = names_outside_adapters(root)
    return {
        "r": 8,  # unused by AdaLoRA (PEFT's LoraConfig default)
        "init_r": init_r.pop(),
        "target_r": config.target_r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": dropouts.pop(),
        "tinit": config.tinit,
        "tfinal": config.tfinal,
        "deltaT": config.deltaT,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "total_step": total,
        "rank_pattern": ({f"{n}.lora_E": (m.pattern or [True] * m.r) for n, m in layers}
                         if patterned else None),
        "target_modules": sorted(short_names([n for n, _ in layers], free, dotted=True)),
        "exclude_modules": None,
        "modules_to_save": sorted(short_names(saved, free, dotted=False)) or None,
        "bias": "none",
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _config_from_json(config: dict[str, Any], where: str) -> tuple[AdaLoRAConfig, dict[str, list[bool]]]:
    """Check every AdaLoRA field of ``config`` (a ``ValueError`` naming it and ``where``); return
    the :class:`AdaLoRAConfig` and the rank pattern ``{module path: kept?}``."""
    def fail(key: str, expected: str) -> None:
        raise ValueError(f"{where}: {key} must be {expected}, got {config.get(key)!r}")

    if config.get("peft_type") != "ADALORA":
        fail("peft_type", "'ADALORA'")
    for key in _BOOL_FIELDS:
        if key in config and not isinstance(config[key], bool):
            fail(key, "true or false (a JSON boolean)")
    used = [k for k in _UNSUPPORTED_OPTIONS if config.get(k)]
    if used:
        raise ValueError(f"{where}: PEFT options not supported by AdaLoRA here: "
                         + ", ".join(f"{k}={config[k]!r}" for k in used))
    if config.get("bias", "none") not in ("none", None):
        fail("bias", "'none' (trainable biases are not supported with AdaLoRA here)")
    if not isinstance(config.get("init_lora_weights", True), bool):
        fail("init_lora_weights", "true or false")
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            fail(key, "a list of module names, a regular expression string or null")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) and s for s in saved)):
        fail("modules_to_save", "a list of module names or null")
    fields = {"init_r": ("init_r", 12), "target_r": ("target_r", 8), "alpha": ("lora_alpha", 8),
              "dropout": ("lora_dropout", 0.0), "tinit": ("tinit", 0), "tfinal": ("tfinal", 0),
              "deltaT": ("deltaT", 1), "beta1": ("beta1", 0.85), "beta2": ("beta2", 0.85),
              "orth_reg_weight": ("orth_reg_weight", 0.5), "total_step": ("total_step", None)}
    kwargs = {ours: config.get(theirs, default) for ours, (theirs, default) in fields.items()}
    kwargs["dropout"] = kwargs["dropout"] or 0.0
    if _is_number(kwargs["alpha"]):
        kwargs["alpha"] = float(kwargs["alpha"])
    try:
        ada = AdaLoRAConfig(**kwargs, target_modules=config.get("target_modules"),
                            exclude_modules=config.get("exclude_modules"))
    except ValueError as err:
        theirs = {ours: theirs for ours, (theirs, _) in fields.items()}
        field = str(err).split(" ", 1)[0]
        raise ValueError(f"{where}: {theirs.get(field, field)}: {err}") from err
    patterns: dict[str, list[bool]] = {}
    raw = config.get("rank_pattern")
    if raw is not None:
        if not isinstance(raw, dict):
            fail("rank_pattern", "a JSON object {'<module>.lora_E': [true/false] * init_r} or null")
        for key, kept in raw.items():
            path = re.sub(r"\.lora_E(\.[^.]+)?$", "", key)
            if path == key or not path:
                raise ValueError(f"{where}: rank_pattern key {key!r} must name a layer's lora_E, e.g. "
                                 f"'model.layers.0.self_attn.q_proj.lora_E'")
            if not (isinstance(kept, list) and len(kept) == ada.init_r
                    and all(isinstance(b, bool) for b in kept)):
                raise ValueError(f"{where}: rank_pattern[{key!r}] must be a list of init_r={ada.init_r} "
                                 f"booleans, got {kept!r}")
            patterns[path] = kept
    return ada, patterns


def _from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    """Check ``config`` and plan the injection into ``model`` (read only); return the injection."""
    ada, patterns = _config_from_json(config, where)
    ada.modules_to_save = peft_modules_to_save(model, config.get("modules_to_save")) or None
    try:
        targets, _ = _plan(model, ada)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    unknown = sorted(set(patterns) - set(targets))
    if unknown:
        raise ValueError(f"{where}: rank_pattern names layers that target_modules does not adapt: "
                         f"{first_names(unknown)}")

    def inject(target: nn.Module) -> None:
        apply_adalora(target, config=ada)
        for name, kept in patterns.items():
            layer = target.get_submodule(name)
            _resize(layer, torch.tensor([i for i, k in enumerate(kept) if k], dtype=torch.long))
            layer.pattern = list(kept)
        freeze_all_but_adapters(target)

    return inject


def _update_from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[], None]:
    """Loading into a model that carries AdaLoRA already: the fields are checked, and the layers
    (their ``init_r``, their rank pattern) must be the ones the file describes."""
    ada, patterns = _config_from_json(config, where)
    layers = adalora_layers(model)
    for name, layer in layers:
        want = patterns.get(name) or [True] * ada.init_r
        if layer.ranknum != ada.init_r or (layer.pattern or [True] * layer.r) != want:
            raise ValueError(f"{where}: init_r/rank_pattern describe other AdaLoRA layers than the "
                             f"model carries ({name}); load it into a model without AdaLoRA")

    def update() -> None:
        for _, layer in layers:
            layer.scaling = ada.alpha
            layer.rank_mask = None

    return update


METHOD = register(Method(
    name="adalora", config_class=AdaLoRAConfig, peft_type="ADALORA", apply=apply_adalora,
    detect=lambda model: any(isinstance(m, AdaLoRALinear) for m in model.modules()),
    to_json=_to_json, from_json=_from_json, update_from_json=_update_from_json,
    bound_fields=_BOUND_FIELDS))

__all__ = ["ADALORA_TARGET_MODULES", "AdaLoRAConfig", "AdaLoRALinear", "METHOD", "adalora_layers",
           "adalora_orthogonal_penalty", "adalora_prune", "adalora_ranks", "adalora_update_and_allocate",
           "apply_adalora", "budget_schedule", "check_schedule", "triplet_scores"]
