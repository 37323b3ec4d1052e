"""DyLoRA: LoRA trained for every rank at once (Valipour et al., 2023, arXiv 2210.07558).

A targeted layer ``y = W0·x + bias`` (``W0`` (out, in), frozen) carries LoRA's ``A`` (r, in) and
``B`` (out, r). Each training step draws one rank ``b`` in ``[r_min, r]`` for the whole model
(uniform, as the paper) and runs the truncated update

    y = W0·x + bias + s_b·B[:, :b]·A[:b]·dropout(x),     s_b = α/b   (rsLoRA: α/√b)

            x ──► [ W0, bias ] ─────────────────────────────────┐
            │      frozen                                       ▼
            └──► dropout ──► A[:b] (b, in) ──► B[:, :b] (out, b) ──► ·s_b ──► + ──► y

so the first rows of ``A`` and columns of ``B`` learn to carry the update on their own: the
representation is sorted by rank. After training, :func:`truncate_rank` keeps ``A[:b]``,
``B[:, :b]`` and the scale ``α/b``, a rank-``b`` LoRA layer for any ``b`` without retraining; a
plain LoRA adapter cut the same way loses much more.

Variant: every step trains all of ``A[:b]`` and ``B[:, :b]`` (the paper's mode without
"frozen"; its "frozen" mode, which updates only the ``b``-th row of ``A`` and column of ``B``, is
not implemented). In eval mode a layer always runs at its full rank ``r`` (the truncated rank after
:func:`truncate_rank`). :func:`dylora_sample_rank` is the per-step draw, a plain function that
:class:`lightning_peft.callbacks.DyLoRACallback` calls in ``on_train_batch_start`` and a
hand-written loop calls before each forward. The op is :func:`kernels.lora_linear` on the slices.
Merging writes ``W0 + s_b·B[:, :b]·A[:b]`` at the active rank into the base weight; unmerging
restores ``W0`` bit for bit.

Files: the LoRA layout (``adapter_config.json`` + ``adapter_model.safetensors``, tensors
``base_model.model.<path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r)) under our own
``peft_type`` ``"DYLORA"``; a truncated adapter is saved at its truncated rank.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

import kernels
from lightning_peft._base import (
    TRAIN_BIAS_ATTR,
    AdapterLayer,
    LinearAdapterLayer,
    ModulesToSave,
    first_names,
    freeze_all_but_adapters,
    inside_any,
    names_outside_adapters,
    wrap_modules_to_save,
)
from lightning_peft.methods import Method, planned_injection, register
from lightning_peft.methods.lora import BIAS_MODES, INITS, _bias_mode, lora_scaling
from lightning_peft.targeting import (
    TargetSpec,
    check_module_spec,
    conv1d_class,
    find_modules,
    find_targets,
    get_parent,
    is_linear_like,
    short_names,
)

DISTRIBUTIONS = ("uniform", "log-uniform")
"""How :func:`dylora_sample_rank` draws ``b`` in ``[r_min, r]``: ``"uniform"`` (the paper's),
``"log-uniform"`` (``P(b) ∝ 1/b``: small ranks, the ones meant for deployment, more often)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DyLoRAConfig:
    """What :func:`apply_dylora` injects: LoRA's fields plus the range and law of the sampled rank."""

    r: int = 8
    """Largest rank: ``A`` is (r, in), ``B`` (out, r)."""
    alpha: float = 16.0
    """Scale numerator: at rank ``b`` the update is multiplied by ``alpha / b`` (``alpha / sqrt(b)``
    with rsLoRA)."""
    r_min: int = 1
    """Smallest rank drawn in training: each step draws ``b`` in ``[r_min, r]``."""
    distribution: str = "uniform"
    """Law of ``b``: ``"uniform"`` (the paper's) or ``"log-uniform"`` (``P(b) ∝ 1/b``)."""
    seed: int = 0
    """Seed of the generator :class:`~lightning_peft.callbacks.DyLoRACallback` draws ``b`` with
    (``torch.Generator().manual_seed(seed)``): every process uses the same one, so under DDP all
    ranks train the same ``b`` each step."""
    dropout: float = 0.0
    """Dropout probability on the adapter branch's input (the base path never sees dropout)."""
    target_modules: str | list[str] | None = None
    """Names (exact or dotted suffix), a regex (full match), ``"all-linear"``, or None for the
    architecture's default (Llama ``q_proj, v_proj``; GPT-2 ``c_attn``; BERT ``query, value``)."""
    exclude_modules: str | list[str] | None = None
    """Names or regex of modules never to adapt."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, as trainable copies (e.g. ``["lm_head"]``)."""
    use_rslora: bool = False
    """Scale by ``alpha / sqrt(b)`` (rank-stabilised LoRA)."""
    init: str = "kaiming"
    """Initialisation of ``A``: ``"kaiming"`` (uniform, a=√5) or ``"gaussian"`` (std 1/r); ``B`` is
    zero, so training starts from the base model."""
    bias: str = "none"
    """Which biases train: ``"none"``, ``"all"`` or ``"lora_only"`` (those of adapted layers)."""
    autocast_adapter_dtype: bool = True
    """Keep ``A`` and ``B`` in float32 over a half-precision base (as LoRA)."""

    def __post_init__(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not _is_int(self.r_min) or self.r_min < 1:
            raise ValueError(f"r_min must be an integer >= 1, got {self.r_min!r}")
        if self.r_min > self.r:
            raise ValueError(f"r_min must be at most r={self.r}, got r_min={self.r_min}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or not self.alpha > 0:
            raise ValueError(f"alpha must be a finite positive number, got {self.alpha!r}")
        if not isinstance(self.distribution, str) or self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        for flag in ("use_rslora", "autocast_adapter_dtype"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool (True or False), got {getattr(self, flag)!r}")
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.bias, str) or self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
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


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class DyLoRALinear(LinearAdapterLayer):
    """A frozen dense ``nn.Linear`` or GPT-2 ``Conv1D`` (``base_layer``) plus ``lora_A`` (r, in) and
    ``lora_B`` (out, r), run at the active rank :attr:`active_rank`:

    - training: :attr:`rank_in_use`, the rank drawn for this step (``None``, before any draw: ``r``);
    - eval: ``r`` (the truncated rank after :meth:`truncate`);
    - merged: the rank it was merged at.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16.0, r_min: int = 1,
                 distribution: str = "uniform", dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        DyLoRAConfig(r=r, alpha=alpha, r_min=r_min, distribution=distribution, dropout=dropout,
                     use_rslora=use_rslora, init=init, autocast_adapter_dtype=autocast_adapter_dtype)
        if not is_linear_like(base_layer) or _is_quantized(base_layer):
            raise ValueError(f"DyLoRALinear wraps a dense nn.Linear or transformers Conv1D, got "
                             f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        conv1d = conv1d_class()
        self.fan_in_fan_out = conv1d is not None and isinstance(base_layer, conv1d)
        weight = base_layer.weight
        if self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        self.r, self.r_min, self.alpha = r, r_min, alpha
        self.distribution, self.dropout = distribution, float(dropout)
        self.use_rslora, self.init = use_rslora, init
        self.rank_in_use: int | None = None
        self._adapter_dtype = torch.float32 if autocast_adapter_dtype and weight.dtype in (
            torch.float16, torch.bfloat16, torch.float32) else None
        factory = {"device": weight.device, "dtype": self._adapter_dtype or weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))  # (out, r)
        self.merged = False
        self._merged_rank = 0
        self._restore: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A: kaiming-uniform (a=√5) or gaussian (std 1/r); B: zero, so ``ΔW = 0`` at start."""
        if self.lora_A.is_meta:
            return
        with torch.no_grad():
            if self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def file_key(self, name: str) -> str:
        return f"{name}.weight"  # LoRA's lora_A.weight / lora_B.weight

    @property
    def adapter_dtype(self) -> torch.dtype | None:
        """float32 for fp32 adapters kept over a dense base (``autocast_adapter_dtype``)."""
        return self._adapter_dtype

    @property
    def active_rank(self) -> int:
        """The rank the layer runs at now (see the class docstring)."""
        if self.merged:
            return self._merged_rank
        if self.training and self.rank_in_use is not None:
            return self.rank_in_use
        return self.r

    def scaling_at(self, b: int) -> float:
        """``alpha / b`` (``alpha / sqrt(b)`` with rsLoRA): the scale of the rank-``b`` update."""
        return lora_scaling(b, self.alpha, self.use_rslora)

    @property
    def scaling(self) -> float:
        """The scale at the active rank."""
        return self.scaling_at(self.active_rank)

    def set_rank_in_use(self, b: int | None) -> None:
        """Set the rank training runs at (``None``: the full rank ``r``)."""
        if b is not None and (not _is_int(b) or not 1 <= b <= self.r):
            raise ValueError(f"b must be an integer in [1, r={self.r}], got {b!r}")
        if self.merged:
            raise RuntimeError("the DyLoRA layer is merged at rank "
                               f"{self._merged_rank}; unmerge it before changing the rank in use")
        self.rank_in_use = b

    def _factors(self, b: int) -> tuple[Tensor, Tensor]:
        """``(A[:b], B[:, :b])``: the rank-``b`` adapter, views of the parameters."""
        if b == self.r:
            return self.lora_A, self.lora_B
        return self.lora_A[:b], self.lora_B[:, :b]  # (b, in), (out, b)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        b = self.active_rank
        lora_a, lora_b = self._factors(b)
        return kernels.lora_linear(x, self.weight, lora_a, lora_b, self.scaling_at(b),
                                   bias=self.base_layer.bias,
                                   dropout_p=self.dropout if self.training else 0.0)

    def delta_weight(self, b: int | None = None) -> Tensor:
        """``s_b·B[:, :b]·A[:b]`` (``b``: the active rank by default) in the base weight's layout
        and dtype, computed in fp32 at least."""
        b = self.active_rank if b is None else b
        dtype = self.base_layer.weight.dtype
        compute = torch.promote_types(dtype, torch.float32)
        lora_a, lora_b = self._factors(b)
        delta = (lora_b.to(compute) @ lora_a.to(compute)) * self.scaling_at(b)  # (out, in)
        if self.fan_in_fan_out:
            delta = delta.t()
        return delta.to(dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update at the active rank into the base weight; :meth:`unmerge` restores the
        weight bit for bit (elements a subtraction would not restore are remembered)."""
        if self.merged:
            warnings.warn("DyLoRA layer is already merged; merge() does nothing", stacklevel=2)
            return
        self._merge_at(self.active_rank)

    @torch.no_grad()
    def _merge_at(self, b: int) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight(b)
        merged = weight + delta
        drift = ((merged - delta) != weight).reshape(-1).nonzero().squeeze(1)
        self._restore = (drift, weight.reshape(-1)[drift].clone())
        weight.copy_(merged)
        self._merged_rank, self.merged = b, True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged update again, restoring the original base weight exactly."""
        if not self.merged:
            warnings.warn("DyLoRA layer is not merged; unmerge() does nothing", stacklevel=2)
            return
        weight = self.base_layer.weight
        restored = weight - self.delta_weight(self._merged_rank)
        if self._restore is not None:
            index, values = self._restore
            restored.view(-1)[index.to(restored.device)] = values.to(restored.device, restored.dtype)
        weight.copy_(restored)
        self._restore, self.merged = None, False

    def _apply(self, fn, recurse: bool = True):
        if not self.merged:
            return super()._apply(fn, recurse)
        rank = self._merged_rank  # merged again at the same rank after the cast or move
        self.unmerge()
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._merge_at(rank)
        return result

    @torch.no_grad()
    def truncate(self, b: int) -> None:
        """Keep ``A[:b]``, ``B[:, :b]`` as the layer's parameters (new ``Parameter`` objects: build
        the optimizer afterwards): it becomes a rank-``b`` layer with scale ``α/b``. ``r_min`` and
        :attr:`rank_in_use` are capped at ``b``; a merged layer is merged again at rank ``≤ b``."""
        if not _is_int(b) or not 1 <= b <= self.r:
            raise ValueError(f"b must be an integer in [1, r={self.r}], got {b!r}")
        merged_rank = self._merged_rank if self.merged else None
        if merged_rank is not None:
            self.unmerge()
        lora_a, lora_b = self._factors(b)
        self.lora_A = nn.Parameter(lora_a.clone(), requires_grad=self.lora_A.requires_grad)  # (b, in)
        self.lora_B = nn.Parameter(lora_b.clone(), requires_grad=self.lora_B.requires_grad)  # (out, b)
        self.r, self.r_min = b, min(self.r_min, b)
        if self.rank_in_use is not None:
            self.rank_in_use = min(self.rank_in_use, b)
        if merged_rank is not None:
            self._merge_at(min(merged_rank, b))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, r_min={self.r_min}, "
                f"alpha={self.alpha}, distribution={self.distribution!r}, dropout={self.dropout}, "
                f"rslora={self.use_rslora}, active_rank={self.active_rank}")


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, kernels.NF4Tensor) or getattr(weight, "quant_state", None) is not None


def dylora_layers(model: nn.Module) -> list[tuple[str, DyLoRALinear]]:
    """``(name, layer)`` of every DyLoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DyLoRALinear)]


def _layers_or_raise(model: nn.Module) -> list[tuple[str, DyLoRALinear]]:
    layers = dylora_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) carries no DyLoRA layers; inject them first "
                         f"with apply_dylora(model, ...)")
    return layers


# --------------------------------------------------------------------------------------------
# Per-step rank, truncation
# --------------------------------------------------------------------------------------------


def draw_rank(r_min: int, r: int, distribution: str, generator: torch.Generator | None = None) -> int:
    """One rank ``b`` in ``[r_min, r]`` from ``distribution`` (see :data:`DISTRIBUTIONS`), drawn
    on the CPU with ``generator`` (the global generator when ``None``)."""
    if not _is_int(r_min) or not _is_int(r) or not 1 <= r_min <= r:
        raise ValueError(f"r_min and r must be integers with 1 <= r_min <= r, got r_min={r_min!r}, r={r!r}")
    if distribution == "uniform":
        return int(torch.randint(r_min, r + 1, (1,), generator=generator))
    if distribution == "log-uniform":
        weights = 1.0 / torch.arange(r_min, r + 1, dtype=torch.float64)  # P(b) ∝ 1/b
        return r_min + int(torch.multinomial(weights, 1, generator=generator))
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def dylora_set_rank(model: nn.Module, b: int | None) -> nn.Module:
    """Make every DyLoRA layer of ``model`` train at rank ``b`` (``None``: its full rank) from the
    next forward in training mode on; eval mode always runs at the full rank. Returns ``model``."""
    layers = _layers_or_raise(model)
    if b is not None:
        r = min(m.r for _, m in layers)
        if not _is_int(b) or not 1 <= b <= r:
            raise ValueError(f"b must be an integer in [1, r={r}], got {b!r}")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise RuntimeError(f"DyLoRA layers are merged ({first_names(merged)}); unmerge_adapters(model) "
                           f"before changing the rank in use")
    for _, layer in layers:
        layer.set_rank_in_use(b)
    return model


def dylora_sample_rank(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Draw this step's rank ``b`` in ``[r_min, r]`` (one for the whole model, as the paper) from
    the layers' distribution with ``generator``, set it on every DyLoRA layer of ``model``, and
    return it. Call it before each training forward (the callback does, in
    ``on_train_batch_start``); give every process a generator with the same seed under DDP."""
    layers = _layers_or_raise(model)
    settings = {(m.r_min, m.r, m.distribution) for _, m in layers}
    if len(settings) > 1:
        raise ValueError(f"the DyLoRA layers of the model disagree on (r_min, r, distribution): "
                         f"{sorted(settings)}; one rank is drawn for the whole model, so they must agree")
    r_min, r, distribution = settings.pop()
    b = draw_rank(r_min, r, distribution, generator)
    dylora_set_rank(model, b)
    return b


def truncate_rank(model: nn.Module, b: int) -> nn.Module:
    """Cut every DyLoRA layer of ``model`` to rank ``b`` in place, without retraining: ``A[:b]``,
    ``B[:, :b]``, scale ``α/b`` (see :meth:`DyLoRALinear.truncate`). Everything is checked first
    (a ``ValueError`` when ``b`` is not in ``[1, r]`` for every layer). Returns ``model``."""
    layers = _layers_or_raise(model)
    r = min(m.r for _, m in layers)
    if not _is_int(b) or not 1 <= b <= r:
        raise ValueError(f"b must be an integer in [1, r={r}], got {b!r}")
    for _, layer in layers:
        layer.truncate(b)
    return model


# --------------------------------------------------------------------------------------------
# apply_dylora
# --------------------------------------------------------------------------------------------


def _plan(model: nn.Module, config: DyLoRAConfig) -> tuple[list[str], list[str]]:
    """``(names of the modules to wrap, modules_to_save names)`` for ``config`` on ``model``, every
    argument checked against the model. Reads the model only."""
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    saved = find_modules(model, config.modules_to_save, "modules_to_save") if config.modules_to_save else []
    explicit = config.target_modules is not None and config.target_modules != "all-linear"
    clash = sorted(set(targets) & set(saved)) if explicit else []
    if clash:
        raise ValueError(f"modules_to_save and target_modules both select {clash}; a module trained "
                         f"in full gets no DyLoRA")
    targets = [t for t in targets if not inside_any(t, saved)]
    if not targets:
        raise ValueError(f"every module target_modules={config.target_modules!r} selects is in "
                         f"modules_to_save={config.modules_to_save!r}, so nothing is left to adapt")
    new = []
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, DyLoRALinear):
            continue
        if isinstance(module, AdapterLayer):
            raise ValueError(f"target_modules selects {name}, which already carries a "
                             f"{type(module).__name__}; DyLoRA does not wrap another method's layer")
        if _is_quantized(module):
            raise ValueError(f"target_modules selects {name}, a 4-bit layer; DyLoRA adapts dense "
                             f"nn.Linear/Conv1D layers only")
        new.append(name)
    have = dylora_layers(model)
    if new and have:
        for field in ("r", "r_min", "distribution"):
            values = {getattr(m, field) for _, m in have}
            if values != {getattr(config, field)}:
                raise ValueError(f"{field}={getattr(config, field)!r}, but the model's DyLoRA layers have "
                                 f"{field}={sorted(values)}; one rank is drawn for the whole model, so new "
                                 f"layers must agree with them")
    return new, saved


def apply_dylora(model: nn.Module, r: int = 8, alpha: float = 16.0, r_min: int = 1,
                 distribution: str = "uniform", seed: int = 0, dropout: float = 0.0,
                 target_modules: TargetSpec = None, exclude_modules: TargetSpec = None,
                 modules_to_save: Sequence[str] | None = None, use_rslora: bool = False,
                 init: str = "kaiming", bias: str = "none", autocast_adapter_dtype: bool = True,
                 config: DyLoRAConfig | None = None) -> nn.Module:
    """Inject DyLoRA into ``model`` in place, freeze everything else, and return ``model``.

    Arguments are the fields of :class:`DyLoRAConfig` (or pass ``config=`` alone). Layers that
    already carry DyLoRA are left as they are (applying twice is harmless); new layers must agree
    with them on ``r``, ``r_min`` and ``distribution``. A module in ``modules_to_save`` is trained
    in full and gets no adapter inside it. Everything is checked before the model is changed.
    Training then needs one :func:`dylora_sample_rank` per step (the callback does it).
    """
    keywords = {"r": r, "alpha": alpha, "r_min": r_min, "distribution": distribution, "seed": seed,
                "dropout": dropout, "target_modules": target_modules, "exclude_modules": exclude_modules,
                "modules_to_save": modules_to_save, "use_rslora": use_rslora, "init": init, "bias": bias,
                "autocast_adapter_dtype": autocast_adapter_dtype}
    if config is None:
        config = DyLoRAConfig(**keywords)  # type: ignore[arg-type]
    elif not isinstance(config, DyLoRAConfig):
        raise TypeError(f"config must be a DyLoRAConfig, got {type(config).__name__}")
    else:
        defaults = DyLoRAConfig()
        given = [k for k, v in keywords.items() if v != getattr(defaults, k)]
        if given:
            raise ValueError(f"pass either config= or the keyword arguments, not both: {given} given "
                             f"beside config")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    new, saved = _plan(model, config)
    for name in new:
        parent, child = get_parent(model, name)
        setattr(parent, child, DyLoRALinear(
            model.get_submodule(name), r=config.r, alpha=config.alpha, r_min=config.r_min,
            distribution=config.distribution, dropout=config.dropout, use_rslora=config.use_rslora,
            init=config.init, autocast_adapter_dtype=config.autocast_adapter_dtype))
    wrap_modules_to_save(model, saved)
    if config.bias == "all":
        inside_saved = {id(m) for w in model.modules() if isinstance(w, ModulesToSave) for m in w.modules()}
        for module in model.modules():
            if isinstance(getattr(module, "bias", None), nn.Parameter) and \
                    not isinstance(module, AdapterLayer) and id(module) not in inside_saved:
                setattr(module, TRAIN_BIAS_ATTR, True)
    elif config.bias == "lora_only":
        for _, layer in dylora_layers(model):
            if layer.base_layer.bias is not None:
                setattr(layer.base_layer, TRAIN_BIAS_ATTR, True)
    freeze_all_but_adapters(model)
    return model


# --------------------------------------------------------------------------------------------
# Files (the registry entry's hooks)
# --------------------------------------------------------------------------------------------

_SHARED = ("r", "alpha", "r_min", "distribution", "use_rslora", "dropout", "init")
"""Layer settings one ``adapter_config.json`` holds once: every layer must have the same."""
_BOUND_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
                 "modules_to_save", "bias")


def _to_json(root: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` fields describing the DyLoRA layers of ``root`` (at their
    current, possibly truncated, rank)."""
    layers = dylora_layers(root)
    if not layers:
        raise ValueError(f"{type(root).__name__} has no DyLoRA layers to save; inject them first with "
                         f"apply_dylora(model, ...)")
    if any(not name for name, _ in layers):
        raise ValueError("the model itself is a DyLoRALinear; save the model that contains it")
    for field in _SHARED:
        values = {getattr(m, field) for _, m in layers}
        if len(values) > 1:
            raise ValueError(f"the DyLoRA layers have different {field} ({sorted(values, key=str)}), which "
                             f"one adapter_config.json cannot express")
    first = layers[0][1]
    saved = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    free = names_outside_adapters(root)
    alpha = first.alpha
    return {
        "r": first.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "r_min": first.r_min,
        "distribution": first.distribution,
        "lora_dropout": first.dropout,
        "target_modules": sorted(short_names([n for n, _ in layers], free, dotted=True)),
        "exclude_modules": None,
        "modules_to_save": sorted(short_names(saved, free, dotted=False)) or None,
        "bias": _bias_mode(root, layers, saved),  # type: ignore[arg-type]
        "use_rslora": first.use_rslora,
        "init": first.init,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
    }


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _config_from_json(model: nn.Module, config: dict[str, Any], where: str) -> DyLoRAConfig:
    """Check every DyLoRA field of ``config`` (a ``ValueError`` naming the field and ``where``) and
    build the :class:`DyLoRAConfig` it describes for ``model`` (read only)."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got {type(config).__name__}")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{where}: {key} is missing")
    if "fan_in_fan_out" in config and not isinstance(config["fan_in_fan_out"], bool):
        raise ValueError(f"{where}: fan_in_fan_out must be true or false (a JSON boolean), got "
                         f"{config['fan_in_fan_out']!r}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) and s for s in saved)):
        raise ValueError(f"{where}: modules_to_save must be a list of module names or null, got {saved!r}")
    fields = {"r": config["r"], "alpha": config["lora_alpha"], "r_min": config.get("r_min", 1),
              "distribution": config.get("distribution", "uniform"),
              "dropout": _or(config.get("lora_dropout"), 0.0), "target_modules": config.get("target_modules"),
              "exclude_modules": config.get("exclude_modules"), "modules_to_save": saved,
              "use_rslora": config.get("use_rslora", False), "init": config.get("init", "kaiming"),
              "bias": _or(config.get("bias"), "none")}
    json_names = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    try:
        return DyLoRAConfig(**fields)
    except ValueError as err:
        message = str(err)
        field = message.split(" ", 1)[0]
        if field in json_names:
            message = json_names[field] + message[len(field):]
        raise ValueError(f"{where}: {message}") from err


def _from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    """Check ``config`` and plan its injection into ``model`` (read only); return the injection."""
    return planned_injection(model, _config_from_json(model, config, where), where, _plan, apply_dylora)


def _update_from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[], None]:
    """Loading into a model that already carries DyLoRA: the fields are checked against its layers
    (the same r; the tensors' shapes are checked by the loader); returns the setter of the layers'
    alpha, rsLoRA, r_min, distribution and dropout, run once every check has passed."""
    dylora = _config_from_json(model, config, where)
    layers = dylora_layers(model)
    ranks = sorted({m.r for _, m in layers})
    if ranks != [dylora.r]:
        raise ValueError(f"{where}: r is {dylora.r}, but the model's DyLoRA layers have r={ranks}; load it "
                         f"into a model without DyLoRA, or truncate_rank(model, {dylora.r}) first")

    def update() -> None:
        for _, layer in layers:
            layer.alpha, layer.use_rslora, layer.r_min = dylora.alpha, dylora.use_rslora, dylora.r_min
            layer.distribution, layer.dropout = dylora.distribution, float(dylora.dropout)

    return update


def _detect(model: nn.Module) -> bool:
    return any(isinstance(m, DyLoRALinear) for m in model.modules())


METHOD = register(Method(
    name="dylora",
    config_class=DyLoRAConfig,
    peft_type="DYLORA",
    apply=apply_dylora,
    detect=_detect,
    to_json=_to_json,
    from_json=_from_json,
    update_from_json=_update_from_json,
    bound_fields=_BOUND_FIELDS,
))

__all__ = ["DISTRIBUTIONS", "METHOD", "DyLoRAConfig", "DyLoRALinear", "apply_dylora", "draw_rank",
           "dylora_layers", "dylora_sample_rank", "dylora_set_rank", "truncate_rank"]
