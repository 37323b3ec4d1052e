"""LoRA: low-rank adaptation of frozen linear layers (Hu et al., 2021, arXiv 2106.09685).

A targeted layer ``y = W0·x + b`` with ``W0`` (out, in) becomes

    y = W0·x + b + s·B·A·dropout(x),   A (r, in), B (out, r), s = α/r   (rsLoRA: s = α/√r)

with ``W0`` frozen, ``A`` initialised kaiming-uniform (a=√5) or gaussian (std 1/r) and ``B`` zero,
so training starts from the base model exactly. rsLoRA (Kalajdzievski, 2023, arXiv 2312.03732)
keeps the update's scale stable as r grows. Merging writes ``W0 + s·B·A`` into the base weight
(zero inference overhead); unmerging restores ``W0`` bit for bit. The op itself is
:func:`kernels.lora_linear`.

DoRA (Liu et al., 2024, arXiv 2402.09353; ``use_dora=True``, HF PEFT's spelling) splits the
adapted weight into a trainable magnitude ``m`` (out,) and a direction:

    W' = m ⊙ (W0 + s·B·A) / ||W0 + s·B·A||     (norm per output feature, detached: section 4.3)
    y  = m/||W0 + s·B·A|| ⊙ (W0·x + s·B·A·dropout(x)) + b

``m`` starts at ``||W0_i||``, so training starts from the base model exactly. The norms come from
low-rank algebra (``||W0_i||²`` cached while ``W0`` is frozen) and the per-row scale is the
epilogue of the fused op, :func:`kernels.lora.dora_linear`; the (out, in) update is never built
in forward or backward. The tensor ``m`` is saved as HF PEFT's ``lora_magnitude_vector``.

    x ──┬──────────── W0 ────────────┐
        │                            + ──> ⊙ m/||W0 + s·B·A|| ──> + b ──> y
        └─ dropout ─ A ─ B ─ ·s ─────┘        (DoRA only)
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

import kernels
from kernels.lora import dora_linear, dora_weight_norm
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
from lightning_peft.methods import Method, _grouping, register
from lightning_peft.methods.trainable_tokens import (
    LORA_PART_ATTR,
    TrainableTokensLayer,
    check_token_layers,
    check_token_spec,
    inject_tokens,
    input_embedding_name,
    plan_tokens,
)
from lightning_peft.targeting import (
    TargetSpec,
    check_module_spec,
    conv1d_class,
    find_modules,
    find_targets,
    get_parent,
    is_linear_like,
    peft_modules_to_save,
    short_names,
)

INITS = ("kaiming", "gaussian")
BIAS_MODES = ("none", "all", "lora_only")


@torch.no_grad()
def init_lora_factors(lora_a: Tensor, lora_b: Tensor, init: str) -> None:
    """A: kaiming-uniform (a=√5, HF PEFT's default) or gaussian (std 1/r); B: zero, so the update
    B·A starts at zero."""
    if init == "gaussian":
        nn.init.normal_(lora_a, std=1.0 / lora_a.shape[0])
    else:
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    nn.init.zeros_(lora_b)


@dataclass
class LoRAConfig:
    """What :func:`apply_lora` injects."""

    r: int = 8
    """Rank of the update ``B·A``."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    dropout: float = 0.0
    """Dropout probability on the LoRA branch's input (the base path never sees dropout)."""
    target_modules: str | list[str] | None = None
    """Names (exact or dotted suffix), a regex (full match), ``"all-linear"``, or None for the
    architecture's default (Llama ``q_proj, v_proj``; GPT-2 ``c_attn``; BERT ``query, value``)."""
    exclude_modules: str | list[str] | None = None
    """Names or regex of modules never to adapt."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, as trainable copies (e.g. ``["embed_tokens", "lm_head"]``)."""
    use_rslora: bool = False
    """Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA)."""
    init: str = "kaiming"
    """Initialisation of ``A``: ``"kaiming"`` (uniform, a=√5, as HF PEFT) or ``"gaussian"``."""
    bias: str = "none"
    """Which biases train: ``"none"``, ``"all"`` (every bias of the model) or ``"lora_only"``
    (the biases of adapted layers)."""

    use_dora: bool = False
    """DoRA (arXiv 2402.09353): also learn a magnitude per output feature, ``W' = m ⊙ (W0 + s·B·A)
    / ||W0 + s·B·A||``; files carry ``use_dora`` and ``lora_magnitude_vector`` as HF PEFT's."""

    autocast_adapter_dtype: bool = True
    """Keep ``A`` and ``B`` in float32 when the base weight is half precision (fp16/bf16), and
    after Lightning's "bf16-true"/"16-true" cast of the whole model, as HF PEFT's
    ``autocast_adapter_dtype``: small updates to bf16 adapters round away. The LoRA branch then
    computes in float32 and its result is added in the base's dtype. A 4-bit (NF4) base keeps
    its adapters in its ``compute_dtype``. ``False``: adapters take the base weight's dtype."""

    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Train only these rows of the input embedding beside LoRA (HF PEFT's option of the same
    name; :mod:`lightning_peft.methods.trainable_tokens`): a list of token ids (e.g. those
    :func:`lightning_peft.add_tokens` returned), or ``{module name: token ids}`` for other
    embeddings. A head tied to the embedding follows its rows. With this or ``modules_to_save``,
    ``target_modules`` may match nothing (or be ``[]``): then only those train."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or not self.alpha > 0:
            raise ValueError(f"alpha must be a finite positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        for flag in ("use_rslora", "use_dora", "autocast_adapter_dtype"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool (True or False), got {getattr(self, flag)!r}")
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.bias, str) or self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        # [] adapts nothing: only modules_to_save / trainable_token_indices train
        self.target_modules = check_module_spec(self.target_modules, "target_modules", allow_empty=True)
        self.exclude_modules = check_module_spec(self.exclude_modules, "exclude_modules")
        if self.trainable_token_indices is not None:
            self.trainable_token_indices = check_token_spec(self.trainable_token_indices,
                                                            "trainable_token_indices")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                    isinstance(e, str) and e for e in self.modules_to_save):
                raise ValueError(f"modules_to_save must be a list of module names, got "
                                 f"{self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save) or None
        if self.target_modules == [] and not self.modules_to_save and self.trainable_token_indices is None:
            raise ValueError("target_modules [] adapts no module, and neither modules_to_save nor "
                             "trainable_token_indices is given, so nothing would train; name the modules "
                             "to adapt (names, a regex or 'all-linear')")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def to_dict(self) -> dict:
        return asdict(self)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _quantized_base_weight(base: nn.Module) -> kernels.NF4Tensor | None:
    """The 4-bit weight of a quantized base layer: a :class:`lightning_peft.methods.qlora.NF4Linear`'s
    ``NF4Tensor``, or a quantized bitsandbytes ``Linear4bit``'s (nf4) wrapped without a copy;
    ``None`` for a dense base."""
    weight = base.weight
    if isinstance(weight, kernels.NF4Tensor):
        return weight
    state = getattr(weight, "quant_state", None)  # bitsandbytes Params4bit once quantized
    if state is None:
        return None
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' AVX512-BF16 CPU layout
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = weight.quant_state
    return kernels.NF4Tensor.from_bitsandbytes(weight.data, state)


def _set_quantized_base_weight(base: nn.Module, q: kernels.NF4Tensor) -> None:
    """Make ``q`` the weight of the quantized base layer ``base`` (NF4Linear or Linear4bit)."""
    if isinstance(base.weight, kernels.NF4Tensor):
        base.weight = q
        return
    packed, state = q.to_bitsandbytes()
    base.weight.data = packed.view(base.weight.dtype)
    base.weight.quant_state = state
    if hasattr(base, "quant_state"):  # bitsandbytes keeps a copy on the module as well
        base.quant_state = state


DEFAULT_ADAPTER = "default"
"""The name of a LoRA layer's own adapter (``lora_A``/``lora_B``), as HF PEFT's default adapter."""
BASE_ROWS = "__base__"
"""In mixed-adapter batches, the name of rows that run the base model."""
_NAMED = "lora_adapters"
_DEFAULT_ONLY = [DEFAULT_ADAPTER]  # compared against, never changed


class NamedLoRA(nn.Module):
    """A named adapter held by a :class:`LoRALinear` beside its default one (see
    :func:`lightning_peft.add_adapter`): its own ``lora_A`` (r, in), ``lora_B`` (out, r), DoRA
    magnitude, r, alpha (hence scaling), rsLoRA and dropout."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", use_dora: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.use_rslora, self.init, self.use_dora = use_rslora, init, use_dora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))  # (out, r)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, **factory)) if use_dora \
            else None  # (out,), set by LoRALinear.add_named to ||W0_i||
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.lora_A.is_meta:
            init_lora_factors(self.lora_A, self.lora_B, self.init)

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        params = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_magnitude_vector is not None:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}, "
                f"rslora={self.use_rslora}" + (", dora=True" if self.use_dora else ""))


class LoRALinear(LinearAdapterLayer):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` (kept as ``base_layer``) plus ``lora_A``/``lora_B``.

    ``Conv1D`` stores its weight (in, out); the layer reads it transposed (``fan_in_fan_out``),
    without copying. A 4-bit base (:class:`lightning_peft.methods.qlora.NF4Linear`, or a bitsandbytes
    ``Linear4bit`` such as Lightning's ``BitsandbytesPrecision`` swaps in) is dequantized on the fly
    and the layer computes in the base's ``compute_dtype``; merging re-quantizes (see :meth:`merge`).
    """

    runs_base_when_disabled = True

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming",
                 autocast_adapter_dtype: bool = True, use_dora: bool = False) -> None:
        super().__init__()
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be a bool (True or False), got {use_dora!r}")
        weight = getattr(base_layer, "weight", None)
        if not is_linear_like(base_layer) and not isinstance(weight, kernels.NF4Tensor):
            raise ValueError(f"LoRALinear wraps nn.Linear, transformers Conv1D or NF4Linear, "
                             f"got {type(base_layer).__name__}")
        self.base_layer = base_layer
        conv1d = conv1d_class()
        self.fan_in_fan_out = conv1d is not None and isinstance(base_layer, conv1d)
        dtype = weight.dtype
        quantized = isinstance(weight, kernels.NF4Tensor) or getattr(weight, "quant_state", None) is not None
        if quantized:
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
            dtype = getattr(base_layer, "compute_dtype", None) or torch.float32
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.dropout = r, alpha, float(dropout)
        self.use_rslora, self.init = use_rslora, init
        self.scaling = lora_scaling(r, alpha, use_rslora)
        # fp32 adapters on a dense base of at most 32 bits (HF PEFT's autocast_adapter_dtype)
        self._adapter_dtype = torch.float32 if autocast_adapter_dtype and dtype in (
            torch.float16, torch.bfloat16, torch.float32) and not quantized else None
        if self._adapter_dtype is not None:
            dtype = self._adapter_dtype
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))  # (out, r)
        self.use_dora = use_dora
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:  # DoRA's magnitude m, one per output feature
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory))  # (out,)
        self.merged = False
        self.active_adapters: list[str] = [DEFAULT_ADAPTER]
        """The adapters the forward applies (:func:`lightning_peft.set_adapter`); the default one,
        ``lora_A``/``lora_B`` of this layer, is ``"default"``; others live in ``lora_adapters``."""
        self._merged_names: list[str] = []
        self._restore: tuple[Tensor | None, Tensor] | kernels.NF4Tensor | None = None
        self._dora_scale: Tensor | None = None  # m/||W0 + s·B·A|| (out,) used by merge()
        self._norm_sq_cache: tuple[tuple, Tensor] | None = None  # (key of W0, ||W0_i||² (out,))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A: kaiming-uniform (a=√5) or gaussian (std 1/r); B: zero, so ``ΔW = 0`` at start."""
        if self.lora_A.is_meta:
            return
        init_lora_factors(self.lora_A, self.lora_B, self.init)
        self.reset_magnitude()

    def reset_magnitude(self) -> None:
        """DoRA: set ``m`` to ``||W0_i + s·B_i·A||`` (``||W0_i||`` right after
        :meth:`reset_parameters`), so the layer gives the LoRA layer's output; call it again after
        the base weight changed (e.g. was quantized). Nothing for plain LoRA, on meta tensors, or
        while merged."""
        m = self.lora_magnitude_vector
        if m is None or m.is_meta or self.merged:
            return
        with torch.no_grad():
            m.copy_(dora_weight_norm(self._dense_weight(), self.lora_A, self.lora_B, self.scaling))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        params = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_magnitude_vector is not None:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        for name, adapter in self.named_lora().items():  # named adapters, as in state_dict()
            params.update({f"{_NAMED}.{name}.{k}": v for k, v in adapter.parameters_by_name().items()})
        return params

    def file_key(self, name: str) -> str:
        if name.startswith(_NAMED + "."):  # a named adapter: HF PEFT's internal lora_A.<name>.weight
            adapter, _, attr = name[len(_NAMED) + 1:].partition(".")
            return f"{attr}.{adapter}.weight"
        if name == "lora_magnitude_vector":
            return name  # HF PEFT's key has no ".weight"
        return f"{name}.weight"  # HF PEFT's lora_A.weight / lora_B.weight

    # ------------------------------------------------------------------ named adapters
    def named_lora(self) -> dict[str, NamedLoRA]:
        """The named adapters held beside the default one (``{}`` when there are none)."""
        named = self._modules.get(_NAMED)
        return dict(named.items()) if named is not None else {}

    def named_adapters(self) -> list[str]:
        return list(self.named_lora())

    def holds(self, name: str) -> bool:
        """Whether this layer holds adapter ``name`` (``"default"`` always)."""
        return name == DEFAULT_ADAPTER or name in self.named_lora()

    def slot(self, name: str) -> LoRALinear | NamedLoRA:
        """The holder of adapter ``name``'s tensors and settings (``lora_A``, ``lora_B``,
        ``lora_magnitude_vector``, ``r``, ``alpha``, ``scaling``, ``dropout``, ``use_rslora``,
        ``init``, ``use_dora``): the layer itself for the default adapter."""
        return self if name == DEFAULT_ADAPTER else self._modules[_NAMED][name]

    def add_named(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                  init: str = "kaiming", use_dora: bool = False) -> NamedLoRA:
        """Add adapter ``name`` (inactive) beside the others, initialised as the default one is
        (``B = 0``: no change to the outputs) on the default adapter's device and dtype."""
        if _NAMED not in self._modules:
            self.add_module(_NAMED, nn.ModuleDict())
        adapter = NamedLoRA(self.in_features, self.out_features, r, alpha, dropout, use_rslora, init,
                            use_dora, device=self.lora_A.device, dtype=self.lora_A.dtype)
        self._modules[_NAMED][name] = adapter
        if use_dora and not adapter.lora_A.is_meta and not self.merged:
            with torch.no_grad():
                adapter.lora_magnitude_vector.copy_(dora_weight_norm(
                    self._dense_weight(), adapter.lora_A, adapter.lora_B, adapter.scaling))
        return adapter

    def remove_named(self, name: str) -> None:
        named = self._modules[_NAMED]
        del named[name]
        if not len(named):
            del self._modules[_NAMED]
        self.active_adapters = [n for n in self.active_adapters if n != name] or [DEFAULT_ADAPTER]

    def file_tensors(self) -> dict[str, Tensor] | None:
        """With named adapters, files written for the default adapter hold its tensors only."""
        if not self.named_lora():
            return None
        params = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_magnitude_vector is not None:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    def inactive_adapter_parameters(self) -> list[Tensor]:
        slots = [self.slot(n) for n in (DEFAULT_ADAPTER, *self.named_lora()) if n not in self.active_adapters]
        return [p for s in slots for p in (s.lora_A, s.lora_B, s.lora_magnitude_vector) if p is not None]

    def named_adapter_files(self, name: str) -> dict[str, tuple[str, Tensor]]:
        """``{PEFT's plain key relative to the layer: (name in the layer, tensor)}`` of adapter
        ``name`` saved alone (``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``)."""
        if not self.holds(name):
            return {}
        slot = self.slot(name)
        prefix = "" if name == DEFAULT_ADAPTER else f"{_NAMED}.{name}."
        files = {"lora_A.weight": (prefix + "lora_A", slot.lora_A),
                 "lora_B.weight": (prefix + "lora_B", slot.lora_B)}
        if slot.lora_magnitude_vector is not None:
            files["lora_magnitude_vector"] = (prefix + "lora_magnitude_vector", slot.lora_magnitude_vector)
        return files

    def _dense_weight(self) -> Tensor:
        """``W0`` (out, in): the base weight (a transposed view for Conv1D), dequantized to fp32
        for a 4-bit base."""
        q = _quantized_base_weight(self.base_layer)
        return self.weight if q is None else q.dequantize(torch.float32)

    def _weight_norm_sq(self) -> Tensor | None:
        """``||W0_i||²`` (out,) in fp32 (fp64 for an fp64 base), cached while ``W0`` is unchanged
        (same tensor, storage, version, dtype and device); ``None`` under ``torch.compile`` (the op
        then computes it) and while ``W0`` trains."""
        if torch.compiler.is_compiling():
            return None
        q = _quantized_base_weight(self.base_layer)
        if q is None:
            w = self.base_layer.weight
            if w.requires_grad:
                return None
            key: tuple = (id(w), w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        else:
            key = (id(q), q.packed.data_ptr(), q.packed._version, q.packed.device)
        if self._norm_sq_cache is None or self._norm_sq_cache[0] != key:
            with torch.no_grad():
                w = self._dense_weight()
                dtype = torch.promote_types(w.dtype, torch.float32)
                self._norm_sq_cache = (key, torch.linalg.vector_norm(w, dim=1, dtype=dtype).square())
        return self._norm_sq_cache[1]

    @property
    def adapter_dtype(self) -> torch.dtype | None:
        """float32 for fp32 adapters kept over a dense base (``autocast_adapter_dtype``); over a
        4-bit base the ``compute_dtype`` :func:`~lightning_peft.apply_qlora` gave them (kept
        through a whole-model cast such as "bf16-true"), else None (they follow the casts)."""
        if _quantized_base_weight(self.base_layer) is not None:
            return self.__dict__.get("_qlora_adapter_dtype")
        return self._adapter_dtype

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.__dict__.get("_disabled", False):
            return self.base_layer(x)
        rows = self.__dict__.get("_rows")
        if rows is not None:
            return self._mixed_forward(x, rows)
        if self.active_adapters != _DEFAULT_ONLY:
            return self._multi_forward(x)
        group = _grouping.group_of(self)
        # siblings reading the same x share one pass over it (the group checks, when it fuses,
        # that every member is still LoRA with only its default adapter active). In eval mode
        # without autograd (generation, evaluation) there is no backward for the fusion to pay
        # off in, and each layer runs alone, which is cheaper on a few tokens; a training-mode
        # forward under no_grad (reentrant checkpointing, replayed in backward) stays fused
        if group is not None and (self.training or torch.is_grad_enabled()):
            return group(self, x)
        return self.forward_single(x)

    def forward_single(self, x: Tensor) -> Tensor:
        """This layer alone (no shared-input fusion with its siblings)."""
        return self._forward_slot(x, self)

    def _multi_forward(self, x: Tensor) -> Tensor:
        """The active adapters this layer holds: the first (or the DoRA one) through the fused op,
        each other one's ``s·B·A·dropout(x)`` added."""
        names = [n for n in self.active_adapters if self.holds(n)]
        if not names:
            return self.base_layer(x)
        dora = [n for n in names if self.slot(n).use_dora]
        if len(dora) > 1:
            raise ValueError(f"adapters {dora} are all DoRA adapters; one DoRA adapter can be active at a "
                             f"time (its magnitude rescales the whole weight)")
        first = dora[0] if dora else names[0]
        y = self._forward_slot(x, self.slot(first))
        for name in names:
            if name != first:
                y = y + self._lowrank(x, self.slot(name)).to(y.dtype)
        return y

    def _lowrank(self, x: Tensor, slot: LoRALinear | NamedLoRA) -> Tensor:
        """``s·(dropout(x)·Aᵀ)·Bᵀ`` (..., out) in the adapter's dtype."""
        a, b = slot.lora_A, slot.lora_B
        xd = x.to(a.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        if self.training and slot.dropout > 0.0:
            xd = nn.functional.dropout(xd, slot.dropout, training=True)
        return (xd @ a.t()) @ b.t() * slot.scaling                            # (..., out)

    def _mixed_forward(self, x: Tensor, rows: Any) -> Tensor:
        """Mixed-adapter batch: the rows of each adapter present run that adapter alone (one
        ``index_select`` per adapter), base rows the base layer; one gather puts them in order."""
        if x.dim() < 2 or x.shape[0] != rows.size:
            raise ValueError(f"adapter_names gives {rows.size} rows but this layer's input has "
                             f"{x.shape[0] if x.dim() else 0} rows (shape {tuple(x.shape)}); give one "
                             f"adapter name per row of the batch")
        outs = []
        for name, index in rows.groups(x.device):
            xi = x if index is None else x.index_select(0, index)
            if name == BASE_ROWS or not self.holds(name):
                outs.append(self.base_layer(xi))
            else:
                outs.append(self._forward_slot(xi, self.slot(name)))
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs).index_select(0, rows.inverse(x.device))

    def base_operands(self) -> tuple[Any, torch.dtype | None]:
        """``(weight, compute dtype)`` of the base for the fused ops: the dense (out, in) weight
        and ``None`` (x's own dtype), or a 4-bit base's NF4 weight and the dtype it computes in."""
        q = _quantized_base_weight(self.base_layer)
        if q is None:
            return self.weight, None
        return q, getattr(self.base_layer, "compute_dtype", None)

    def _forward_slot(self, x: Tensor, slot: LoRALinear | NamedLoRA) -> Tensor:
        """The fused op with the base and one adapter (the default one or a named one)."""
        weight, compute = self.base_operands()
        xc = x if compute is None or torch.is_autocast_enabled(x.device.type) else x.to(compute)
        if slot.use_dora:
            y = dora_linear(
                xc, weight, slot.lora_A, slot.lora_B, slot.scaling,
                slot.lora_magnitude_vector, bias=self.base_layer.bias,
                dropout_p=slot.dropout if self.training else 0.0,
                weight_norm_sq=self._weight_norm_sq())
            return y if xc is x else y.to(x.dtype)
        y = kernels.lora_linear(xc, weight, slot.lora_A, slot.lora_B,
                                slot.scaling, bias=self.base_layer.bias,
                                dropout_p=slot.dropout if self.training else 0.0)
        return y if xc is x else y.to(x.dtype)  # a 4-bit base computes in its compute_dtype

    def delta_weight(self) -> Tensor:
        """``s·B·A`` in the base weight's layout and dtype (computed in fp32 at least; fp32 for a
        4-bit base)."""
        quantized = _quantized_base_weight(self.base_layer) is not None
        dtype = torch.float32 if quantized else self.base_layer.weight.dtype
        compute = torch.promote_types(dtype, torch.float32)
        delta = (self.lora_B.to(compute) @ self.lora_A.to(compute)) * self.scaling  # (out, in)
        if self.fan_in_fan_out:
            delta = delta.t()
        return delta.to(dtype)

    def _delta(self, names: list[str]) -> Tensor:
        """``Σ s_n·B_n·A_n`` over the adapters ``names`` in the base weight's layout and dtype (summed
        in fp32 at least, rounded once); :meth:`delta_weight` for the default adapter alone."""
        if names == [DEFAULT_ADAPTER]:
            return self.delta_weight()
        quantized = _quantized_base_weight(self.base_layer) is not None
        dtype = torch.float32 if quantized else self.base_layer.weight.dtype
        compute = torch.promote_types(dtype, torch.float32)
        total = None
        for name in names:
            slot = self.slot(name)
            delta = (slot.lora_B.to(compute) @ slot.lora_A.to(compute)) * slot.scaling  # (out, in)
            total = delta if total is None else total.add_(delta)
        if self.fan_in_fan_out:
            total = total.t()
        return total.to(dtype)

    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Add the update of the active adapters (or of ``adapter_names``, which then become the
        active ones) into the base weight. The few elements whose value a later subtraction would
        not restore exactly (rounding ties, binade crossings) are remembered, so :meth:`unmerge`
        gives back the original weight bit for bit. A DoRA adapter merges alone."""
        if self.merged:
            warnings.warn("LoRA layer is already merged; merge() does nothing", stacklevel=2)
            return
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        held = [n for n in names if self.holds(n)]
        dora = self._check_dora_alone(held)
        self.active_adapters = names or [DEFAULT_ADAPTER]
        if not held:  # none of the adapters lives here: the base weight is already the result
            return
        slot = self.slot(held[0])
        q = _quantized_base_weight(self.base_layer)
        if q is not None:  # 4-bit base: dequantize, add, re-quantize; keep the original for unmerge
            warnings.warn("merging LoRA into a 4-bit base re-quantizes W0 + s·B·A to NF4, which adds "
                          "rounding error to the update; unmerge() restores the original 4-bit weight "
                          "exactly. For a full-precision merged model use "
                          "lightning_peft.merge_and_dequantize(model, dtype)", stacklevel=2)
            merged = self.merged_from_4bit(q, held)
            _set_quantized_base_weight(self.base_layer, kernels.quantize_nf4(
                merged.to(q.dtype), blocksize=q.blocksize, double_quant=q.double_quant))
            self._restore, self.merged, self._merged_names = q, True, held
            return
        weight = self.base_layer.weight
        delta = self._delta(held)
        if dora:
            merged, drift = self._dora_merged(weight, delta, slot)
        else:
            merged = weight + delta
            drift = ((merged - delta) != weight).reshape(-1).nonzero().squeeze(1)
        if drift.numel() * 3 > weight.numel():  # most elements drift (DoRA's scaling): keep W0
            self._restore = (None, weight.detach().clone())
        else:
            self._restore = (drift, weight.reshape(-1)[drift].clone())
        weight.copy_(merged)
        self.merged, self._merged_names = True, held

    def _check_dora_alone(self, held: list[str]) -> bool:
        """Whether a DoRA adapter is among ``held`` (the adapters merged together); a
        ``ValueError`` when it is not alone."""
        dora = [n for n in held if self.slot(n).use_dora]
        if dora and len(held) > 1:
            raise ValueError(f"the DoRA adapter {dora[0]!r} merges alone, not with {held}: its magnitude "
                             f"rescales the whole weight")
        return bool(dora)

    def merged_from_4bit(self, q: kernels.NF4Tensor, held: list[str]) -> Tensor:
        """The merged weight of the adapters ``held`` over this layer's 4-bit base ``q``, (out, in)
        fp32: ``dequant(W0) + Σ s·B·A``, its rows scaled by DoRA's ``m/||W0 + s·B·A||`` for a
        DoRA adapter (what merging into the 4-bit base re-quantizes, and what
        :func:`~lightning_peft.merge_and_dequantize` exports)."""
        merged = q.dequantize(torch.float32)
        if not held:
            return merged
        merged.add_(self._delta(held))
        if self._check_dora_alone(held):  # W' = m/||W0 + s·B·A|| ⊙ (W0 + s·B·A), rows
            merged.mul_(self._dora_merge_scale(q, self.slot(held[0])).to(torch.float32)[:, None])
        return merged

    def _dora_merge_scale(self, q: kernels.NF4Tensor | None = None,
                          slot: LoRALinear | NamedLoRA | None = None) -> Tensor:
        """DoRA's ``m/||W0 + s·B·A||`` (out,) from the unmerged base weight, remembered for
        :meth:`unmerge`; fp32 at least."""
        slot = self if slot is None else slot
        w = self.weight if q is None else q.dequantize(torch.float32)  # (out, in)
        norm = dora_weight_norm(w, slot.lora_A, slot.lora_B, slot.scaling, self._weight_norm_sq())
        self._dora_scale = slot.lora_magnitude_vector.detach().to(norm.dtype) / norm  # (out,)
        return self._dora_scale

    def _dora_scale_view(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The merge scale shaped to multiply the base weight in its own layout."""
        g = self._dora_scale.to(device, dtype)
        return g[None, :] if self.fan_in_fan_out else g[:, None]

    def _dora_merged(self, weight: Tensor, delta: Tensor,
                     slot: LoRALinear | NamedLoRA | None = None) -> tuple[Tensor, Tensor]:
        """``(g ⊙ (W0 + ΔW), flat indices where unmerging it would not give W0 back)``."""
        compute = torch.promote_types(weight.dtype, torch.float32)
        self._dora_merge_scale(None, slot)
        g = self._dora_scale_view(compute, weight.device)
        merged = ((weight.to(compute) + delta.to(compute)) * g).to(weight.dtype)
        back = (merged.to(compute) / g - delta.to(compute)).to(weight.dtype)
        return merged, (back != weight).reshape(-1).nonzero().squeeze(1)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again, restoring the original base weight exactly."""
        if not self.merged:
            warnings.warn("LoRA layer is not merged; unmerge() does nothing", stacklevel=2)
            return
        names = self._merged_names or [DEFAULT_ADAPTER]
        if isinstance(self._restore, kernels.NF4Tensor):  # 4-bit base: the weight before merge()
            _set_quantized_base_weight(self.base_layer, self._restore)
            self._restore, self._dora_scale, self.merged = None, None, False
            return
        weight = self.base_layer.weight
        # computed aside and written in one copy, so a failure leaves the weight and the flag as
        # they were; the remembered elements are cast in case the weight was cast behind our back
        index, values = self._restore if self._restore is not None else (None, None)
        if index is None and values is not None:  # the whole original weight was kept
            restored = values.to(weight.device, weight.dtype)
        elif self._dora_scale is not None:
            compute = torch.promote_types(weight.dtype, torch.float32)
            restored = (weight.to(compute) / self._dora_scale_view(compute, weight.device)
                        - self._delta(names).to(compute)).to(weight.dtype)
        else:
            restored = weight - self._delta(names)
        if index is not None:
            restored.view(-1)[index.to(restored.device)] = values.to(restored.device, restored.dtype)
        weight.copy_(restored)
        self._restore, self._dora_scale = None, None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:.4g}, dropout={self.dropout}, rslora={self.use_rslora}"
                + (", dora=True" if self.use_dora else ""))


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(name, layer)`` of every LoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: TargetSpec = None, exclude_modules: TargetSpec = None,
               modules_to_save: Sequence[str] | None = None, use_rslora: bool = False,
               init: str = "kaiming", bias: str = "none", autocast_adapter_dtype: bool = True,
               use_dora: bool = False,
               trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
               config: LoRAConfig | None = None) -> nn.Module:
    """Inject LoRA into ``model`` in place, freeze everything else, and return ``model``.

    Arguments are the fields of :class:`LoRAConfig` (or pass ``config=``). Layers that already
    carry LoRA are left as they are, so applying twice is harmless; it must then have their r,
    alpha, dropout, rsLoRA and DoRA settings (others are refused, as is a target that carries
    another method's layer). The base modules and their
    ``Parameter`` objects are kept, not copied. As in HF PEFT, a module listed in
    ``modules_to_save`` is trained in full and gets no LoRA inside it: ``"all-linear"`` (or the
    default targets) skip it and everything under it (a one-Linear classification head, or
    RoBERTa's two-layer ``classifier``); naming it in ``target_modules`` as well is an error.
    Everything is checked before the model is changed. ``use_dora=True`` injects DoRA layers
    (a magnitude per output feature as well; see the module docstring).
    ``trainable_token_indices`` trains those rows of the input embedding (and of a tied head)
    beside the LoRA layers. With it or ``modules_to_save``, ``target_modules`` may match nothing
    (a warning, unless it is ``[]``): then only those train.
    """
    if config is None:
        config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                            exclude_modules=exclude_modules,
                            modules_to_save=modules_to_save, use_rslora=use_rslora, init=init,
                            bias=bias, autocast_adapter_dtype=autocast_adapter_dtype,
                            use_dora=use_dora, trainable_token_indices=trainable_token_indices)
    elif not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    others = bool(config.modules_to_save) or config.trainable_token_indices is not None
    try:
        targets = find_targets(model, config.target_modules, config.exclude_modules)
    except ValueError as err:
        if not others:
            raise
        warnings.warn(f"{err} No LoRA layer is injected; only modules_to_save/trainable_token_indices "
                      f"train", stacklevel=2)
        targets = []
    saved = find_modules(model, config.modules_to_save, "modules_to_save") \
        if config.modules_to_save else []
    explicit = config.target_modules is not None and config.target_modules != "all-linear"
    clash = sorted(set(targets) & set(saved)) if explicit else []
    if clash:
        raise ValueError(f"modules_to_save and target_modules both select {clash}; a module trained "
                         f"in full gets no LoRA")
    if targets and not [t for t in targets if not inside_any(t, saved)] and not others:
        raise ValueError(f"every module target_modules={config.target_modules!r} selects is in "
                         f"modules_to_save={config.modules_to_save!r}, so nothing is left to adapt")
    targets = [t for t in targets if not inside_any(t, saved)]
    _check_carried(model, targets, config)
    tokens: tuple[dict[str, list[int]], dict[str, str]] = ({}, {})
    if config.trainable_token_indices is not None:
        tokens = _plan_lora_tokens(model, config.trainable_token_indices, targets, saved)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            continue
        parent, child = get_parent(model, name)
        layer = LoRALinear(module, r=config.r, alpha=config.alpha, dropout=config.dropout,
                           use_rslora=config.use_rslora, init=config.init,
                           autocast_adapter_dtype=config.autocast_adapter_dtype,
                           use_dora=config.use_dora)
        setattr(parent, child, layer)
    wrap_modules_to_save(model, saved)
    for name in saved:
        model.get_submodule(name).__dict__[LORA_PART_ATTR] = True
    if tokens[0]:
        inject_tokens(model, *tokens, in_lora=True, arg="trainable_token_indices")
    if config.bias == "all":
        inside_saved = {id(m) for w in model.modules() if isinstance(w, ModulesToSave)
                        for m in w.modules()}
        for module in model.modules():
            if isinstance(getattr(module, "bias", None), nn.Parameter) and \
                    not isinstance(module, AdapterLayer) and id(module) not in inside_saved:
                setattr(module, TRAIN_BIAS_ATTR, True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.base_layer.bias is not None:
                setattr(layer.base_layer, TRAIN_BIAS_ATTR, True)
    freeze_all_but_adapters(model)
    _grouping.attach(model)
    # model(..., adapter_names=[...]) works from the start (transformers' forward would swallow the
    # keyword silently, running every row with the default adapter)
    from lightning_peft.multi_adapter import install_adapter_names_hook

    install_adapter_names_hook(model)
    return model


def _check_carried(model: nn.Module, targets: list[str], config: LoRAConfig) -> None:
    """A ``ValueError`` when a target already carries another method's layer (LoRA does not wrap
    one; it used to skip such targets silently), or LoRA with other settings than ``config``'s
    (applying again keeps each layer's adapter as it is and adds the new targets, so a different
    rank, alpha, dropout, rsLoRA or DoRA would be ignored silently)."""
    layers = {name: model.get_submodule(name) for name in targets}
    foreign = {name: type(layer).__name__ for name, layer in layers.items()
               if isinstance(layer, AdapterLayer) and not isinstance(layer, (LoRALinear, ModulesToSave))}
    if foreign:
        raise ValueError(
            f"target_modules={config.target_modules!r} selects {first_names(list(foreign))}, which "
            f"already carr{'ies' if len(foreign) == 1 else 'y'} another method's layer "
            f"({', '.join(sorted(set(foreign.values())))}); LoRA does not wrap another method's layer. "
            f"Leave them out with exclude_modules, or apply LoRA to a model without that method")
    want = {"r": config.r, "alpha": float(config.alpha), "dropout": float(config.dropout),
            "use_rslora": config.use_rslora, "use_dora": config.use_dora}
    differ: dict[str, dict[str, tuple[Any, Any]]] = {}
    for name, layer in layers.items():
        if isinstance(layer, LoRALinear):
            have = {"r": layer.r, "alpha": float(layer.alpha), "dropout": float(layer.dropout),
                    "use_rslora": layer.use_rslora, "use_dora": layer.use_dora}
            changed = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
            if changed:
                differ[name] = changed
    if differ:
        first = next(iter(differ.values()))
        shown = ", ".join(f"{k}={h!r} there, {w!r} asked" for k, (h, w) in first.items())
        raise ValueError(
            f"{first_names(list(differ))} already carr{'ies' if len(differ) == 1 else 'y'} LoRA with other "
            f"settings ({shown}); applying LoRA again keeps each layer's adapter and only adds new targets, "
            f"so it takes the same settings. For a second adapter use add_adapter(model, name, config); "
            f"to start over, apply LoRA to a fresh model")


def _plan_lora_tokens(model: nn.Module, spec: list[int] | dict[str, list[int]], targets: list[str],
                      saved: list[str]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Where ``trainable_token_indices`` trains rows (read only); a ``ValueError`` when a module
    also gets LoRA or is trained in full (or lies inside one that is)."""
    wanted, tied = plan_tokens(model, spec, None, "trainable_token_indices")
    clash = [n for n in [*wanted, *tied] if inside_any(n, [*targets, *saved])
             or any(inside_any(t, [n]) for t in [*targets, *saved])]
    if clash:
        raise ValueError(f"trainable_token_indices trains rows of {clash}, which target_modules or "
                         f"modules_to_save select as well; a module either trains some rows, gets LoRA or "
                         f"trains in full")
    check_token_layers(model, wanted, True, "trainable_token_indices")  # before LoRA goes in
    return wanted, tied


def lora_token_layers(model: nn.Module) -> list[tuple[str, TrainableTokensLayer]]:
    """``(name, layer)`` of the trainable-token layers a LoRA adapter of ``model`` owns (tied ones
    excluded)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, TrainableTokensLayer) and m.in_lora and not m._tied]


def _tokens_json(root: nn.Module) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices`` as HF PEFT writes it: a list for the input embedding alone,
    else ``{module name: ids}``."""
    layers = lora_token_layers(root)
    if not layers:
        return None
    try:
        embedding = input_embedding_name(root)
    except ValueError:
        embedding = None
    if len(layers) == 1 and layers[0][0] == embedding:
        return list(layers[0][1].token_indices)
    free = names_outside_adapters(root)
    return {short_names([n], free, dotted=True)[0]: list(m.token_indices) for n, m in layers}


def _detect(model: nn.Module) -> bool:
    """LoRA layers, or (with no target) the token layers and modules trained in full it owns."""
    return any(isinstance(m, LoRALinear) or m.__dict__.get(LORA_PART_ATTR, False) for m in model.modules())


# ------------------------------------------------------------------------------ file format
# HF PEFT's LoRA adapter_config.json, read and written through the method registry.

# PEFT options this package does not implement: loading a file that uses one would silently give
# a different model, so it is refused. A falsy value (None, False, [], {}) means "not used".
_UNSUPPORTED_OPTIONS = (
    "lora_bias", "layers_to_transform", "layers_pattern", "layer_replication",
    "target_parameters", "alora_invocation_tokens", "use_qalora",
    "use_bdlora", "megatron_config", "arrow_config", "kasa_config", "monteclora_config",
)
# Config fields that hold true or false (a string "false" would read as true).
_BOOL_FIELDS = ("inference_mode", "use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "use_qalora",
                "ensure_weight_tying")
# ``init_lora_weights`` values whose adapter is a plain LoRA on the unchanged base model (PiSSA,
# OLoRA, CorDA, LoftQ, ... rewrite the base weights, so their raw adapters do not apply to it).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# The fields that decide how the weights are read (recorded in the weights' metadata on save).
_BOUND_FIELDS = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                 "target_modules", "exclude_modules", "modules_to_save", "bias",
                 "trainable_token_indices")


def _to_json(root: nn.Module, adapter_name: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` fields (HF PEFT's LoRA format) that describe the LoRA layers of
    ``root``: the most common r and alpha, the others as ``rank_pattern``/``alpha_pattern``.
    ``adapter_name``: those of that named adapter (the default adapter's when None)."""
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, LoRALinear)]
    if not layers and not _detect(root):
        raise ValueError(f"{type(root).__name__} has no LoRA layers to save; inject them first with "
                         f"apply_lora(model, ...)")
    if any(not name for name, _ in layers):
        raise ValueError("the model itself is a LoRALinear; save the model that contains it")
    if adapter_name is not None and adapter_name != DEFAULT_ADAPTER:
        return _named_to_json(root, layers, adapter_name)
    if not layers:  # only modules_to_save / trainable_token_indices train
        return _untargeted_json(root)
    rslora = {m.use_rslora for _, m in layers}
    if len(rslora) > 1:
        mixed = [n for n, m in layers if m.use_rslora]
        raise ValueError(f"the LoRA layers mix use_rslora=True ({first_names(mixed)}) and False, which "
                         f"adapter_config.json cannot express")
    dora = {m.use_dora for _, m in layers}
    if len(dora) > 1:
        mixed = [n for n, m in layers if m.use_dora]
        raise ValueError(f"the LoRA layers mix use_dora=True ({first_names(mixed)}) and False, which "
                         f"adapter_config.json cannot express")
    r = _most_common(m.r for _, m in layers)
    alpha = _most_common(m.alpha for _, m in layers)
    saved = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    targets = [n for n, _ in layers]
    free = names_outside_adapters(root)
    return {
        "r": r,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": _most_common(m.dropout for _, m in layers),
        "target_modules": sorted(short_names(targets, free, dotted=True)),
        "exclude_modules": None,
        "modules_to_save": sorted(short_names(saved, free, dotted=False)) or None,
        "bias": _bias_mode(root, layers, saved),
        "use_rslora": rslora.pop(),
        "use_dora": dora.pop(),
        "lora_bias": False,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "init_lora_weights": True if _most_common(m.init for _, m in layers) == "kaiming" else "gaussian",
        "rank_pattern": {n: m.r for n, m in layers if m.r != r},
        "alpha_pattern": {n: _json_number(m.alpha) for n, m in layers if m.alpha != alpha},
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        "trainable_token_indices": _tokens_json(root),
    }


def _untargeted_json(root: nn.Module) -> dict[str, Any]:
    """The fields of a LoRA adapter with no LoRA layer (``target_modules`` ``[]``; HF PEFT 0.21
    refuses such a file): r and alpha are the defaults and unused."""
    saved = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    free = names_outside_adapters(root)
    return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": [], "exclude_modules": None,
            "modules_to_save": sorted(short_names(saved, free, dotted=False)) or None,
            "bias": _bias_mode(root, [], saved), "use_rslora": False, "use_dora": False, "lora_bias": False,
            "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
            "trainable_token_indices": _tokens_json(root)}


def _named_to_json(root: nn.Module, layers: list[tuple[str, LoRALinear]],
                   adapter_name: str) -> dict[str, Any]:
    """:func:`_to_json` for the named adapter ``adapter_name`` (no modules_to_save, no biases)."""
    slots = [(n, m.slot(adapter_name), m) for n, m in layers if m.holds(adapter_name)]
    if not slots:
        raise ValueError(f"no LoRA layer holds an adapter named {adapter_name!r}")
    for flag in ("use_rslora", "use_dora"):
        if len({getattr(s, flag) for _, s, _ in slots}) > 1:
            raise ValueError(f"adapter {adapter_name!r} mixes {flag}=True and False across layers, which "
                             f"adapter_config.json cannot express")
    r = _most_common(s.r for _, s, _ in slots)
    alpha = _most_common(s.alpha for _, s, _ in slots)
    free = names_outside_adapters(root)
    return {
        "r": r, "lora_alpha": _json_number(alpha),
        "lora_dropout": _most_common(s.dropout for _, s, _ in slots),
        "target_modules": sorted(short_names([n for n, _, _ in slots], free, dotted=True)),
        "exclude_modules": None, "modules_to_save": None, "bias": "none",
        "use_rslora": slots[0][1].use_rslora, "use_dora": slots[0][1].use_dora, "lora_bias": False,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, _, m in slots),
        "init_lora_weights": True if _most_common(s.init for _, s, _ in slots) == "kaiming" else "gaussian",
        "rank_pattern": {n: s.r for n, s, _ in slots if s.r != r},
        "alpha_pattern": {n: _json_number(s.alpha) for n, s, _ in slots if s.alpha != alpha},
        "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
    }


def _bias_mode(root: nn.Module, layers: list[tuple[str, LoRALinear]], saved: list[str]) -> str:
    """``"none"``, ``"all"`` or ``"lora_only"``: which biases of ``root`` were made trainable."""
    inside = [s + "." for s in saved]
    candidates, marked = set(), set()
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer) or any(name.startswith(p) for p in inside):
            continue
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            candidates.add(name)
            if getattr(module, TRAIN_BIAS_ATTR, False):
                marked.add(name)
    if not marked:
        return "none"
    if marked == candidates:
        return "all"
    if marked == {f"{n}.base_layer" for n, m in layers if m.base_layer.bias is not None}:
        return "lora_only"
    raise ValueError(f"the trainable biases ({first_names(sorted(marked))}) are neither all biases nor those "
                     f"of the LoRA layers, which adapter_config.json's bias cannot express")


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: Iterable[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _check_json(config: dict[str, Any], where: str) -> None:
    """Check every LoRA field the loader reads (JSON type, range, pattern syntax), naming the
    field: a ``ValueError`` before anything is built."""
    def fail(key: str, expected: str) -> None:
        raise ValueError(f"{where}: {key} must be {expected}, got {config[key]!r}")

    for key in _BOOL_FIELDS:
        if key in config and not isinstance(config[key], bool):
            fail(key, "true or false (a JSON boolean)")
    used = [k for k in _UNSUPPORTED_OPTIONS if config.get(k)]
    if config.get("ensure_weight_tying") and (config.get("modules_to_save")
                                              or config.get("trainable_token_indices")):
        used.append("ensure_weight_tying")  # PEFT ties the head to the embedding's trained copy
    if used:
        raise ValueError(f"{where}: PEFT options not supported here: "
                         + ", ".join(f"{k}={config[k]!r}" for k in used))
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        fail("init_lora_weights", f"one of {list(_PLAIN_INITS)}")
    if init not in _PLAIN_INITS:
        raise ValueError(f"{where}: init_lora_weights={init!r} changes the base weights, so this adapter "
                         f"does not apply to the unchanged base model; save it with HF PEFT's "
                         f"path_initial_model_for_weight_conversion to get a plain LoRA")
    if not _is_rank(config.get("r")):
        raise ValueError(f"{where}: r must be a positive integer, got {config.get('r')!r}")
    if not _is_alpha(config.get("lora_alpha")):
        raise ValueError(f"{where}: lora_alpha must be a positive finite number, got "
                         f"{config.get('lora_alpha')!r}")
    for key, valid, expected in (("rank_pattern", _is_rank, "a positive integer"),
                                 ("alpha_pattern", _is_alpha, "a positive finite number")):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            fail(key, "a JSON object of {pattern: value}")
        for pattern, value in patterns.items():
            if not pattern:
                raise ValueError(f"{where}: {key} has an empty pattern; keys are module names or "
                                 f"regular expressions such as 'model.layers.0.self_attn.q_proj'")
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as err:
                raise ValueError(f"{where}: {key} key {pattern!r} is not a valid regular expression: "
                                 f"{err}") from err
            if not valid(value):
                raise ValueError(f"{where}: {key}[{pattern!r}] must be {expected}, got {value!r}")
    dropout = config.get("lora_dropout")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0.0 <= dropout < 1.0):
        fail("lora_dropout", "a number in [0, 1)")
    if config.get("bias") is not None and config["bias"] not in BIAS_MODES:
        fail("bias", f"one of {list(BIAS_MODES)}")
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{where}: {key}={value!r} is not a valid regular expression: "
                                 f"{err}") from err
        elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            fail(key, "a list of module names, a regular expression string or null")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) and s for s in saved)):
        fail("modules_to_save", "a list of module names or null")
    if config.get("trainable_token_indices") is not None:
        try:
            check_token_spec(config["trainable_token_indices"], "trainable_token_indices")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``k`` (a regex) such that
    ``name`` matches ``(.*\\.)?(k)$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _injection_plan(root: nn.Module, config: dict[str, Any],
                    where: str) -> tuple[dict[tuple[int, float], list[str]], list[str]]:
    """Group the target modules of ``root`` by (r, alpha) and resolve ``modules_to_save``.
    Reads the model only."""
    target = config.get("target_modules")
    if isinstance(target, list):
        target = sorted(set(target))
    tokens = config.get("trainable_token_indices")
    try:
        targets = find_targets(root, target, config.get("exclude_modules"))
    except ValueError as err:
        if not (config.get("modules_to_save") or tokens is not None):
            raise ValueError(f"{where}: {err}") from err
        targets = []
    saved = peft_modules_to_save(root, config.get("modules_to_save"))
    # PEFT adapts nothing it trains in full, nor anything inside it (RoBERTa's two-Linear
    # classifier under "all-linear": PEFT lists its Linears in target_modules all the same)
    kept = [t for t in targets if not inside_any(t, saved)]
    if not kept and not saved and tokens is None:
        raise ValueError(f"{where}: every module target_modules selects ({first_names(targets)}) is or "
                         f"lies inside a module of modules_to_save ({first_names(saved)}); nothing is "
                         f"left to adapt")
    if tokens is not None:
        try:
            _plan_lora_tokens(root, check_token_spec(tokens, "trainable_token_indices"), kept, saved)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
    groups: dict[tuple[int, float], list[str]] = {}
    for name in kept:
        r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        groups.setdefault((r, alpha), []).append(name)
    return groups, saved


def _inject(root: nn.Module, config: dict[str, Any], groups: dict[tuple[int, float], list[str]],
            saved: list[str]) -> None:
    """Inject the planned adapter into ``root`` with :func:`apply_lora`, one call per (r, alpha)."""
    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"
    for i, ((r, alpha), names) in enumerate(groups.items() or [((config["r"], config["lora_alpha"]), [])]):
        apply_lora(root, config=LoRAConfig(
            r=r, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0),
            target_modules="|".join(re.escape(n) for n in names) if names else [],
            modules_to_save=list(saved) if i == 0 and saved else None,
            use_rslora=bool(config.get("use_rslora", False)), init=init,
            bias=config.get("bias") or "none", use_dora=bool(config.get("use_dora", False)),
            trainable_token_indices=config.get("trainable_token_indices") if i == 0 else None))


def _planned_scalings(root: nn.Module, config: dict[str, Any]) -> dict[LoRALinear, tuple[float, bool, float]]:
    """``{layer: (alpha, use_rslora, scaling)}``: what the config (already checked) gives the
    existing LoRA layers of ``root``. Changes nothing, so that a later error leaves them as they
    are."""
    rslora = config.get("use_rslora", False)
    plan = {}
    for name, layer in root.named_modules():
        if isinstance(layer, LoRALinear):
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
            plan[layer] = (alpha, rslora, lora_scaling(layer.r, alpha, rslora))
    return plan


def _from_json(model: nn.Module, config: dict[str, Any], where: str,
               adapter_name: str | None = None) -> Callable[[nn.Module], None]:
    """Check the LoRA fields of ``config`` and plan the injection into ``model`` (read only);
    return the function that injects it. ``adapter_name``: add it as that named adapter to the
    LoRA layers ``model`` already has."""
    _check_json(config, where)
    if adapter_name is not None and adapter_name != DEFAULT_ADAPTER:
        return _plan_named(model, config, where, adapter_name)
    groups, saved = _injection_plan(model, config, where)
    return lambda target: _inject(target, config, groups, saved)


def check_adapter_name(name: Any, arg: str = "adapter_name") -> str:
    """A valid name for a new named adapter: a non-empty string without dots or path separators
    (it names a module key and, in saved files, a subdirectory), not ``"default"`` nor
    ``"__base__"``."""
    if not isinstance(name, str) or not name or any(c in name for c in "./\\\0") \
            or name in (DEFAULT_ADAPTER, BASE_ROWS):
        raise ValueError(f"{arg} must be a non-empty string without dots or path separators, other than "
                         f"{DEFAULT_ADAPTER!r} and {BASE_ROWS!r}, got {name!r}")
    return name


def _plan_named(model: nn.Module, config: dict[str, Any], where: str,
                adapter_name: str) -> Callable[[nn.Module], None]:
    """Plan adding the file's adapter as the named adapter ``adapter_name`` (read only)."""
    check_adapter_name(adapter_name)
    if config.get("modules_to_save") or config.get("trainable_token_indices") is not None:
        key = "modules_to_save" if config.get("modules_to_save") else "trainable_token_indices"
        raise ValueError(f"{where}: {key}={config[key]!r}; a named adapter holds "
                         f"LoRA factors only (load it as the default adapter instead)")
    if (config.get("bias") or "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r}; a named adapter trains no biases")
    groups, _ = _injection_plan(model, {**config, "modules_to_save": None}, where)
    bare = [n for names in groups.values() for n in names
            if not isinstance(model.get_submodule(n), LoRALinear)]
    if bare:
        raise ValueError(f"{where}: adapter {adapter_name!r} adapts {first_names(bare)}, which carry no LoRA "
                         f"layer; a named adapter lives beside the default one, so apply_lora (or load "
                         f"the default adapter) to those modules first")
    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"

    def inject(target: nn.Module) -> None:
        for (r, alpha), names in groups.items():
            add_named_adapter(target, adapter_name, names, r=r, alpha=float(alpha),
                              dropout=float(config.get("lora_dropout") or 0.0),
                              use_rslora=bool(config.get("use_rslora", False)), init=init,
                              use_dora=bool(config.get("use_dora", False)))
        from lightning_peft.multi_adapter import install_adapter_names_hook

        install_adapter_names_hook(target)

    return inject


def add_named_adapter(root: nn.Module, adapter_name: str, targets: Iterable[str], **settings: Any) -> None:
    """Add the (inactive, frozen) named adapter ``adapter_name`` to the LoRA layers ``targets`` of
    ``root`` (names in ``root``); ``settings``: :meth:`LoRALinear.add_named`'s."""
    for name in targets:
        layer = root.get_submodule(name)
        adapter = layer.add_named(adapter_name, **settings)
        active = adapter_name in layer.active_adapters
        for param in adapter.parameters_by_name().values():
            param.requires_grad_(active)


def _update_from_json(model: nn.Module, config: dict[str, Any], where: str,
                      adapter_name: str | None = None) -> Callable[[], None]:
    """Check the LoRA fields of ``config`` for a model that has LoRA already; return the setter of
    the layers' alpha and rsLoRA setting (hence scaling), run once every check has passed.
    ``adapter_name``: those of that named adapter."""
    _check_json(config, where)
    if adapter_name is not None and adapter_name != DEFAULT_ADAPTER:
        return _update_named(model, config, where, adapter_name)
    dora = bool(config.get("use_dora", False))
    differ = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.use_dora != dora]
    if differ:
        raise ValueError(f"{where}: use_dora is {dora} but the model's LoRA layers {first_names(differ)} "
                         f"have use_dora={not dora}; load it into a model without this adapter")
    tokens = config.get("trainable_token_indices")
    carried = {n: m.token_indices for n, m in lora_token_layers(model)}
    wanted: dict[str, list[int]] = {}
    if tokens is not None:
        try:
            wanted, _ = plan_tokens(model, check_token_spec(tokens, "trainable_token_indices"), None,
                                    "trainable_token_indices")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
    if wanted != carried:
        raise ValueError(f"{where}: trainable_token_indices={tokens!r} trains {wanted or 'no rows'}, but the "
                         f"model's LoRA adapter trains {carried or 'no rows'}; load it into a fresh model")
    plan = _planned_scalings(model, config)

    def update() -> None:
        for layer, (alpha, rslora, scaling) in plan.items():
            layer.alpha, layer.use_rslora, layer.scaling = alpha, rslora, scaling

    return update


def _update_named(model: nn.Module, config: dict[str, Any], where: str,
                  adapter_name: str) -> Callable[[], None]:
    """:func:`_update_from_json` for the named adapter ``adapter_name`` the model holds."""
    slots = [(n, m.slot(adapter_name)) for n, m in model.named_modules()
             if isinstance(m, LoRALinear) and m.holds(adapter_name)]
    dora = bool(config.get("use_dora", False))
    differ = [n for n, s in slots if s.use_dora != dora]
    if differ:
        raise ValueError(f"{where}: use_dora is {dora} but adapter {adapter_name!r} of {first_names(differ)} "
                         f"has use_dora={not dora}; delete_adapter it first")
    rslora = bool(config.get("use_rslora", False))
    plan = {}
    for name, slot in slots:
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
        plan[slot] = (alpha, lora_scaling(slot.r, alpha, rslora))

    def update() -> None:
        for slot, (alpha, scaling) in plan.items():
            slot.alpha, slot.use_rslora, slot.scaling = alpha, rslora, scaling

    return update


METHOD = register(Method(
    name="lora", config_class=LoRAConfig, peft_type="LORA", apply=apply_lora,
    detect=_detect,
    to_json=_to_json, from_json=_from_json, update_from_json=_update_from_json,
    bound_fields=_BOUND_FIELDS, aliases=("rslora",), alias_settings={"rslora": {"use_rslora": True}},
    named_adapters=True))
