"""QLoRA: LoRA on a frozen 4-bit NF4 base (Dettmers et al., 2023, arXiv 2305.14314).

Each targeted layer ``y = W0·x + b`` keeps ``W0`` (out, in) as NF4 (:class:`kernels.NF4Tensor`,
the exact format of bitsandbytes) and learns a LoRA update in ``compute_dtype``:

    y = dequant(W0)·x + b + s·B·A·dropout(x),   A (r, in), B (out, r), s = α/r (rsLoRA: α/√r)

computed by :func:`kernels.lora_linear` with the NF4 weight (the weight is dequantized into a
scratch buffer right before each GEMM, and again in backward for ``dX = dY·W0``; ``W0`` gets no
gradient). Storage per base weight: 4 bits + the fp32 absmax per ``blocksize`` block
(``32/blocksize`` bits), or with double quantization 8 bits per block plus one fp32 per 256
blocks (about 4.127 bits per weight at blocksize 64).

:func:`apply_qlora` injects LoRA (as :func:`~lightning_peft.methods.lora.apply_lora`), then quantizes the
targeted base layers one at a time, each straight from its own weight (no full-precision copy is
made). It is all or nothing: the dense weights are kept until every layer is quantized, so that
any failure (a NaN weight, an interrupt, out of memory) puts the model back exactly as it was;
then they are released. Peak memory is therefore the dense model plus its 4-bit copies (about
+26% of a bf16 model, +13% of an fp32 one), never a second full-precision model. A base on the
meta device becomes an NF4 placeholder on the meta device (fill it with ``model.to_empty`` and
:meth:`NF4Linear.quantize_` or ``load_state_dict``).

Paged and 8-bit optimizers (bitsandbytes) keep the optimizer state small or in paged memory;
return one from ``configure_optimizers`` for the trainable (adapter) parameters only::

    def configure_optimizers(self):
        import bitsandbytes as bnb
        params = [p for p in self.parameters() if p.requires_grad]
        return bnb.optim.PagedAdamW8bit(params, lr=2e-4)   # or PagedAdamW, AdamW8bit

(bitsandbytes 0.50.2 runs them on CPU too, where "paged" memory is ordinary memory.)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import kernels
from kernels.nf4 import BLOCKSIZES
from lightning_peft._base import TRAIN_BIAS_ATTR, AdapterLayer, ModelState, freeze_all_but_adapters
from lightning_peft.methods import Method, _grouping, register
from lightning_peft.methods.lora import METHOD as LORA_METHOD
from lightning_peft.methods.lora import (
    LoRAConfig,
    LoRALinear,
    ModulesToSave,
    _quantized_base_weight,
    apply_lora,
)
from lightning_peft.targeting import TargetSpec, find_targets, get_parent

__all__ = ["COMPUTE_DTYPES", "NF4Linear", "QLoRAConfig", "apply_qlora", "merge_and_dequantize"]

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_WEIGHT_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                    ".quant_state.bitsandbytes__nf4")


def _compute_dtype(value: Any, arg: str = "compute_dtype") -> torch.dtype:
    """A torch dtype from ``"bfloat16"``/``"float16"``/``"float32"`` or the torch dtype itself."""
    if isinstance(value, torch.dtype) and value in COMPUTE_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{arg} must be one of {sorted(COMPUTE_DTYPES)} (or the torch dtype), "
                     f"got {value!r}")


def _check_blocksize(blocksize: Any) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return blocksize


@dataclass
class QLoRAConfig(LoRAConfig):
    """What :func:`apply_qlora` injects: the fields of :class:`~lightning_peft.methods.lora.LoRAConfig`
    plus how the base layers are quantized."""

    double_quant: bool = True
    """Quantize the per-block absmax to 8 bits as well (bitsandbytes' ``compress_statistics``)."""
    compute_dtype: str = "bfloat16"
    """dtype of the matmuls and of the LoRA weights: ``"bfloat16"``, ``"float16"`` or
    ``"float32"`` (a torch dtype is accepted and stored by name, so the config stays JSON)."""
    blocksize: int = 64
    """Weights per absmax block: 32, 64, ..., 4096."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {self.double_quant!r}")
        dtype = _compute_dtype(self.compute_dtype)
        self.compute_dtype = str(dtype).removeprefix("torch.")
        _check_blocksize(self.blocksize)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]


@functools.cache
def _dynamic_code() -> Tensor:
    """bitsandbytes' 8-bit dynamic map, the ``nested_code`` of a double-quantized NF4 weight."""
    zero = torch.zeros(1, dtype=torch.float32, device="cpu")
    with kernels.use_backend("torch"):
        return kernels.quantize_nf4(zero, blocksize=64, double_quant=True).nested_code


def _zero_nf4(shape: tuple[int, int], blocksize: int, double_quant: bool, dtype: torch.dtype,
              device: torch.device | str | None) -> kernels.NF4Tensor:
    """An all-zero NF4 weight built directly (every code 7 = 0.0, every scale 0): no dense copy."""
    n = shape[0] * shape[1]
    blocks = -(-n // blocksize)
    f32 = {"dtype": torch.float32, "device": device}
    packed = torch.full(((n + 1) // 2,), 0x77, dtype=torch.uint8, device=device)
    if not double_quant:
        return kernels.NF4Tensor(packed, torch.zeros(blocks, **f32), shape, dtype, blocksize)
    return kernels.NF4Tensor(packed, torch.zeros(blocks, dtype=torch.uint8, device=device), shape,
                             dtype, blocksize, nested_absmax=torch.zeros(-(-blocks // 256), **f32),
                             nested_code=_dynamic_code().to(device),
                             nested_offset=torch.zeros((), **f32))


class NF4Linear(nn.Module):
    """A frozen linear layer ``y = x·dequant(W)ᵀ + b`` whose weight is 4-bit NF4.

    ``weight`` is a :class:`kernels.NF4Tensor` (out, in), outside ``parameters()`` (it never
    trains; :func:`~lightning_peft.trainable_parameters` counts it through :meth:`frozen_numel`).
    The input is cast to ``compute_dtype`` and the output back to the input's dtype, as
    bitsandbytes' ``Linear4bit`` does (under autocast the autocast dtype wins).

    - ``state_dict()`` holds bitsandbytes ``Linear4bit``'s keys (``weight``, ``weight.absmax``,
      ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``,
      ``bias``), and ``load_state_dict`` reads them, or a dense ``weight``, which it quantizes.
    - ``.to(device)``/``.cuda()``/``to_empty`` move the NF4 data; a dtype cast
      (``.to(torch.bfloat16)``, ``.half()``, Lightning's "bf16-true") changes only ``compute_dtype``
      (and the bias), never the packed codes or scales.

    Build one from a layer with :meth:`from_linear`; the constructor makes an all-zero weight
    (a placeholder to load or :meth:`quantize_` into; free on the meta device).
    """

    from_conv1d: bool = False
    """Quantized from a transformers ``Conv1D`` (GPT-2): :func:`merge_and_dequantize` gives a
    ``Conv1D`` back, with its (in, out) weight, so the exported model saves and loads as one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype | str = torch.bfloat16, blocksize: int = 64,
                 double_quant: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = _compute_dtype(compute_dtype)
        self.weight = _zero_nf4((out_features, in_features), _check_blocksize(blocksize),
                                double_quant, self.compute_dtype, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | str = torch.bfloat16,
                    blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        """Quantize an ``nn.Linear`` or transformers ``Conv1D`` (read transposed) to NF4, or wrap
        a quantized bitsandbytes ``Linear4bit`` (nf4) without re-quantizing. The bias
        ``Parameter`` is kept as it is; ``linear`` itself is not modified. A weight on the meta
        device gives a placeholder on the meta device."""
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(f"linear must be an nn.Linear, Conv1D or bitsandbytes Linear4bit, got "
                            f"{type(linear).__name__}")
        q = _quantized_base_weight(linear)
        if q is not None:
            out_features, in_features = q.shape
        else:
            w = weight.detach().t() if _is_conv1d(linear) else weight.detach()  # (out, in)
            if w.dim() != 2:
                raise ValueError(f"linear.weight must be 2-D, got shape {tuple(w.shape)}")
            out_features, in_features = w.shape
        layer = cls(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                    blocksize=blocksize, double_quant=double_quant, device="meta")
        if q is None and w.is_meta:
            q = _zero_nf4((out_features, in_features), blocksize, double_quant,
                          w.dtype if w.dtype in COMPUTE_DTYPES.values() else torch.float32, "meta")
        elif q is None:
            q = kernels.quantize_nf4(w.contiguous() if w.dtype != torch.float64 else w.float(),
                                     blocksize=blocksize, double_quant=double_quant)
        layer.weight = q
        if getattr(linear, "bias", None) is not None:
            layer.bias = linear.bias
            if getattr(linear, TRAIN_BIAS_ATTR, False):  # LoRA's bias="lora_only"/"all" keeps it trained
                setattr(layer, TRAIN_BIAS_ATTR, True)
        # the weight is (out, in) either way; a Conv1D's model expects its (in, out) back on export
        layer.from_conv1d = _is_conv1d(linear)
        return layer

    # ------------------------------------------------------------------------------ weights
    @property
    def blocksize(self) -> int:
        return self.weight.blocksize

    @property
    def double_quant(self) -> bool:
        return self.weight.double_quant

    def frozen_numel(self) -> int:
        """Elements of the 4-bit weight (kept outside ``parameters()``)."""
        return self.weight.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight (out, in) in ``dtype`` (default: ``compute_dtype``)."""
        return self.weight.dequantize(dtype or self.compute_dtype)

    @torch.no_grad()
    def quantize_(self, weight: Tensor) -> NF4Linear:
        """Replace the weight by ``weight`` (out, in) quantized with this layer's blocksize and
        double quantization, on this layer's device (the meta device: ``weight``'s)."""
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must be ({self.out_features}, {self.in_features}), got "
                             f"{tuple(weight.shape)}")
        device = weight.device if self.weight.device.type == "meta" else self.weight.device
        w = weight.detach().to(device)
        q = kernels.quantize_nf4(w.float() if w.dtype == torch.float64 else w.contiguous(),
                                 blocksize=self.blocksize, double_quant=self.double_quant)
        self.weight = q
        return self

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type) or x.dtype == self.compute_dtype:
            return kernels.nf4_linear(x, self.weight, self.bias)
        return kernels.nf4_linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)

    # -------------------------------------------------------------- device, dtype, state dict
    def _apply(self, fn, recurse: bool = True):
        """Move the NF4 data with a device move; a dtype cast only sets ``compute_dtype``.

        ``fn`` (the per-tensor function of ``.to``/``.cuda``/``.half``/``to_empty``...) is run on
        an empty probe of ``compute_dtype`` on the weight's device to learn what it does.
        """
        super()._apply(fn, recurse)  # the bias
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device))
        if not isinstance(probe, Tensor):
            return self
        if probe.dtype in COMPUTE_DTYPES.values():
            self.compute_dtype = probe.dtype
        if probe.device != self.weight.device:
            q = self.weight
            self.weight = _zero_nf4(tuple(q.shape), q.blocksize, q.double_quant, q.dtype,
                                    probe.device) if q.device.type == "meta" else q.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination.update(self.weight.to_state_dict(prefix))
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "weight"
        own = [k for k in state_dict if k == key or k.startswith(key + ".")]
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # the bias
        if strict:
            unexpected_keys.extend(k for k in own if k[len(key):] not in _WEIGHT_SUFFIXES)
        if key not in state_dict:
            missing_keys.append(key)
            return
        try:
            self.weight = self._read_weight(state_dict, prefix, local_metadata)
        except (TypeError, ValueError) as err:
            error_msgs.append(f"While loading {key}: {err}")

    def _read_weight(self, state_dict, prefix: str, local_metadata) -> kernels.NF4Tensor:
        dense = state_dict[prefix + "weight"]
        shape = (self.out_features, self.in_features)
        if f"{prefix}weight.quant_state.bitsandbytes__nf4" not in state_dict and \
                isinstance(dense, Tensor) and dense.is_floating_point():  # a full-precision layer
            if tuple(dense.shape) != shape:
                raise ValueError(f"size mismatch: checkpoint weight {tuple(dense.shape)}, "
                                 f"layer {shape}")
            target = dense.device if self.weight.device.type == "meta" else self.weight.device
            w = dense.detach().to(target)
            return kernels.quantize_nf4(w.float() if w.dtype == torch.float64 else w.contiguous(),
                                        blocksize=self.blocksize, double_quant=self.double_quant)
        q = kernels.NF4Tensor.from_state_dict(state_dict, prefix)
        if tuple(q.shape) != shape:
            raise ValueError(f"size mismatch: checkpoint NF4 weight {tuple(q.shape)}, layer {shape}")
        assign = bool((local_metadata or {}).get("assign_to_params_buffers", False))
        target = q.device if assign or self.weight.device.type == "meta" else self.weight.device
        tensors = {k: t.detach().to(target, copy=not assign) for k, t in q._tensors().items()}
        return kernels.NF4Tensor(shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, **tensors)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")


# ------------------------------------------------------------------------------------ apply
def apply_qlora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                target_modules: TargetSpec = None, exclude_modules: TargetSpec = None,
                modules_to_save: Sequence[str] | None = None, use_rslora: bool = False,
                init: str = "kaiming", bias: str = "none", double_quant: bool = True,
                compute_dtype: torch.dtype | str = torch.bfloat16, blocksize: int = 64,
                use_dora: bool = False, config: QLoRAConfig | None = None) -> nn.Module:
    """Quantize the targeted layers of ``model`` to NF4, inject LoRA in ``compute_dtype`` and
    freeze everything else, in place; returns ``model``.

    Arguments are the fields of :class:`QLoRAConfig` (or pass ``config=``). LoRA is injected by
    :func:`~lightning_peft.methods.lora.apply_lora` (same targeting, ``modules_to_save``, ``bias``), then
    each targeted base is quantized in turn. All or nothing: if anything fails (e.g. a NaN or inf
    in a weight: a ``ValueError`` naming the layer), the model is left exactly as it was (same
    modules, same ``Parameter`` objects and values, same ``requires_grad``); the dense weights are
    released only once every layer succeeded (freed unless something else still references them,
    e.g. a tied weight). Layers whose base is already 4-bit are left as they are, so applying twice
    is harmless; a quantized bitsandbytes ``Linear4bit`` base is taken over without re-quantizing.
    """
    if config is None:
        config = QLoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                             exclude_modules=exclude_modules,
                             modules_to_save=modules_to_save,
                             use_rslora=use_rslora, init=init, bias=bias, double_quant=double_quant,
                             compute_dtype=compute_dtype, blocksize=blocksize, use_dora=use_dora)
    elif not isinstance(config, QLoRAConfig):
        raise TypeError(f"config must be a QLoRAConfig, got {type(config).__name__}")
    names = find_targets(model, config.target_modules, config.exclude_modules)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) and module.merged and \
                _quantized_base_weight(module.base_layer) is None:
            raise ValueError(f"{name} is a merged LoRA layer; unmerge it before apply_qlora")
        weight = getattr(module.base_layer if isinstance(module, LoRALinear) else module, "weight", None)
        if isinstance(weight, Tensor) and not weight.is_floating_point() and \
                getattr(weight, "quant_state", None) is None:
            raise TypeError(f"{name} has a {weight.dtype} weight; apply_qlora quantizes float "
                            f"weights or takes over bitsandbytes nf4 Linear4bit layers")
    before = ModelState(model)
    try:
        apply_lora(model, config=config)
        dtype = config.torch_compute_dtype
        for name in names:
            layer = model.get_submodule(name)
            if not isinstance(layer.base_layer, NF4Linear):
                try:
                    base = NF4Linear.from_linear(layer.base_layer, compute_dtype=dtype,
                                                 blocksize=config.blocksize,
                                                 double_quant=config.double_quant)
                except (TypeError, ValueError) as err:
                    raise type(err)(f"apply_qlora could not quantize {name}: {err}") from err
                layer.base_layer = base
                layer.fan_in_fan_out = False  # the NF4 weight is (out, in) even for a Conv1D
            for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
                param = getattr(layer, attr, None)
                if param is not None and param.dtype != dtype:
                    setattr(layer, attr, nn.Parameter(param.detach().to(dtype)))
            layer.__dict__["_qlora_adapter_dtype"] = dtype  # kept through "bf16-true"'s cast
            layer.reset_magnitude()  # DoRA: m = ||W0_i|| of the 4-bit weight, so it starts at the base
        _grouping.attach(model)  # 4-bit siblings share one pass over x as dense ones do
        freeze_all_but_adapters(model)
    except BaseException:
        before.restore()
        raise
    return model


# ----------------------------------------------------------------------------------- export
@torch.no_grad()
def merge_and_dequantize(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Export a plain full-precision model, in place: returns ``model`` with

    - every LoRA layer on a 4-bit base replaced by an ``nn.Linear`` holding
      ``dequant(W0) + s·B·A`` (DoRA: its rows times ``m/||W0 + s·B·A||``) in ``dtype`` (summed in
      fp32, never re-quantized; a merged layer is unmerged first, which restores its original
      4-bit weight);
    - every LoRA layer on a dense base merged in place and replaced by its base layer;
    - every other 4-bit layer (NF4Linear, quantized bitsandbytes Linear4bit) replaced by its
      dequantized ``nn.Linear`` in ``dtype``;
    - every module trained in full (``modules_to_save``) replaced by its trained copy.

    Layers are converted one at a time. The new layers' parameters do not require grad.
    """
    dtype = _compute_dtype(dtype, "dtype")
    if isinstance(model, (AdapterLayer, NF4Linear)):
        raise ValueError(f"model is itself a {type(model).__name__}; pass the model containing it")
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(r) for r in replaced):
            continue
        if isinstance(module, LoRALinear):
            if module.merged:
                module.unmerge()
            q = _quantized_base_weight(module.base_layer)
            if q is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module.merge()
                new = module.base_layer
            else:
                active = [n for n in module.active_adapters if module.holds(n)]  # named adapters
                w = module.merged_from_4bit(q, active)  # (out, in) fp32, DoRA's scale included
                new = _dense_linear(w, module.base_layer.bias, dtype, module.base_layer)
        elif isinstance(module, ModulesToSave):
            new = module.modules_to_save
        elif not isinstance(module, AdapterLayer) and hasattr(module, "weight") and \
                _quantized_base_weight(module) is not None:
            new = _dense_linear(_quantized_base_weight(module).dequantize(torch.float32),
                                module.bias, dtype, module)
        else:
            continue
        parent, child = get_parent(model, name)
        setattr(parent, child, new)
        replaced.append(name + ".")
    return model


def _is_conv1d(module: nn.Module) -> bool:
    from lightning_peft.targeting import conv1d_class

    conv1d = conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def _dense_linear(weight: Tensor, bias: Tensor | None, dtype: torch.dtype, quantized: nn.Module) -> nn.Module:
    """A frozen dense layer for the (out, in) ``weight``: an ``nn.Linear``, or a transformers
    ``Conv1D`` holding ``weightᵀ`` where ``quantized`` was made from one."""
    out_features, in_features = weight.shape
    if getattr(quantized, "from_conv1d", False):
        from lightning_peft.targeting import conv1d_class

        layer = conv1d_class()(out_features, in_features)
        layer.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(weight.device, dtype, copy=True), requires_grad=False)
    return layer



def _has_quantized_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) and _quantized_base_weight(m.base_layer) is not None
               for m in model.modules())


# QLoRA's adapter is a LoRA adapter: its files are LoRA's (HF PEFT saves QLoRA adapters as LORA).
METHOD = register(Method(
    name="qlora", config_class=QLoRAConfig, peft_type="LORA", apply=apply_qlora,
    detect=_has_quantized_lora, to_json=LORA_METHOD.to_json, from_json=LORA_METHOD.from_json,
    update_from_json=LORA_METHOD.update_from_json, file_format="lora",
    export=functools.partial(merge_and_dequantize, dtype=torch.float32)))
