"""LoRA linear: ``y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + b``.

LoRA (Hu et al., 2021, arXiv 2106.09685) freezes the pretrained weight ``W0`` (out, in) and learns
a low-rank update ``ΔW = s·B·A`` with ``A`` (r, in), ``B`` (out, r) and ``s = α/r`` (or ``α/√r``
for rsLoRA). Unfused, the update costs a second read of ``x`` and an output-sized temporary
``(x·Aᵀ)·Bᵀ``. Here only ``S = dropout(x)·Aᵀ`` (tokens, r) is materialised and the base GEMM
accumulates into the same output buffer:

    forward    S  = dropout(x)·Aᵀ                      (M, r)
               y  = b + x·W0ᵀ ; y += s·S·Bᵀ             (M, N), one output buffer
    backward   dS = s·dY·B                             (M, r)
               dB = s·dYᵀ·S                            (N, r)
               dA = dSᵀ·dropout(x)                     (r, K)
               dX = dY·W0 + (dS·A)⊙mask/(1-p)          (M, K), one buffer

Saved for backward: ``x`` (already alive as the previous layer's output), ``S``, and the dropout
mask as bool when ``dropout_p > 0`` (the dropped copy of ``x`` is never kept). ``W0`` only gets a
gradient when it requires one. The Triton kernels of :mod:`kernels._lora_triton` implement the same
contract; this file is their specification and the CPU fallback.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kernels import _backend

__all__ = [
    "dropout_keep_mask",
    "lora_linear",
    "lora_linear_grouped",
    "lora_linear_grouped_reference",
    "lora_linear_reference",
]


def _dense(weight: Any, dtype: torch.dtype) -> Tensor:
    """The base weight as a dense (out, in) tensor of ``dtype`` (quantized weights dequantize)."""
    if isinstance(weight, Tensor):
        return weight
    return weight.dequantize(dtype)


def _check_args(x: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None,
                dropout_p: float) -> None:
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight is "
                         f"{tuple(weight.shape)} (out, in); expected x[..., {in_features}]")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must be (r, {in_features}), got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_features, r):
        raise ValueError(f"lora_b must be ({out_features}, {r}) to match weight and lora_a, "
                         f"got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(weight, Tensor) and weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}; cast one of "
                        "them or run under torch.autocast")


def dropout_keep_mask(shape: tuple[int, ...] | torch.Size, dropout_p: float,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """Bool mask, True with probability ``1 - dropout_p``, from 16-bit uniforms: element i keeps
    when ``u_i >= round(p·2¹⁶) - 2¹⁵`` for ``u_i`` uniform on the int16 range (``p`` rounded to a
    multiple of 2⁻¹⁶, as the Triton kernels do). Four elements share one 64-bit draw of
    ``torch.randint``, about 2.5x cheaper on a CPU than ``bernoulli_``; the same ``generator``
    state gives the same mask."""
    n = 1
    for d in shape:
        n *= int(d)
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device,
                          generator=generator)
    threshold = min(round(dropout_p * 65536.0), 65536) - 32768
    return (words.view(torch.int16)[:n] >= threshold).view(*shape)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, bias, dropout_p, generator):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                   # (M, K)
        w = _dense(weight, x.dtype)                                     # (N, K)
        mask = None
        if dropout_p > 0.0:
            mask = dropout_keep_mask(x2.shape, dropout_p, generator, x2.device)  # (M, K) bool
            s_lora = torch.mm(x2 * mask, lora_a.t()).mul_(1.0 / (1.0 - dropout_p))  # (M, r)
        else:
            s_lora = torch.mm(x2, lora_a.t())                           # (M, r)
        if bias is not None:
            y = torch.addmm(bias, x2, w.t())                            # (M, N)
        else:
            y = torch.mm(x2, w.t())
        y.addmm_(s_lora, lora_b.t(), alpha=scaling)                     # y += s·S·Bᵀ
        ctx.save_for_backward(x2, lora_a, lora_b, s_lora, mask,
                              weight if isinstance(weight, Tensor) else None)
        ctx.weight = None if isinstance(weight, Tensor) else weight
        ctx.scaling, ctx.dropout_p, ctx.shape = scaling, dropout_p, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, lora_a, lora_b, s_lora, mask, weight = ctx.saved_tensors
        weight = ctx.weight if weight is None else weight
        s, p = ctx.scaling, ctx.dropout_p
        need_x, need_w, need_a, need_b, _, need_bias = ctx.needs_input_grad[:6]
        dy = grad_out.reshape(-1, grad_out.shape[-1])                   # (M, N)
        grad_x = grad_w = grad_a = grad_b = grad_bias = None
        if need_b:
            grad_b = torch.mm(dy.t(), s_lora).mul_(s)                   # (N, r)
        if need_x or need_a:
            keep = 1.0 / (1.0 - p)
            d_s = torch.mm(dy, lora_b).mul_(s * keep if mask is not None else s)  # (M, r)
            if need_a:
                xd = x2 if mask is None else x2 * mask
                grad_a = torch.mm(d_s.t(), xd)                          # (r, K)
            if need_x:
                if mask is None:
                    grad_x = torch.mm(dy, _dense(weight, dy.dtype))     # (M, K) dY·W0
                    grad_x.addmm_(d_s, lora_a)                          # += dS·A, in place
                else:
                    grad_x = torch.mm(d_s, lora_a).mul_(mask)           # (M, K) (dS·A)⊙mask
                    grad_x.addmm_(dy, _dense(weight, dy.dtype))         # += dY·W0, in place
                grad_x = grad_x.view(ctx.shape)
        if need_w:
            grad_w = torch.mm(dy.t(), x2)                               # (N, K)
        if need_bias:
            grad_bias = dy.sum(0)
        return grad_x, grad_w, grad_a, grad_b, None, grad_bias, None, None


def lora_linear_reference(x: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor, scaling: float,
                          bias: Tensor | None = None, dropout_p: float = 0.0,
                          generator: torch.Generator | None = None) -> Tensor:
    """The pure-PyTorch op (CPU fallback and the specification of the Triton kernels)."""
    return _LoRALinear.apply(x, weight, lora_a, lora_b, float(scaling), bias, float(dropout_p),
                             generator)


def lora_linear(x: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor, scaling: float,
                bias: Tensor | None = None, dropout_p: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """``x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ (+ bias)`` with autograd, on any leading batch dims.

    Args:
        x: input ``(..., in)``.
        weight: frozen base weight ``(out, in)``, a tensor or a quantized weight with
            ``.dequantize(dtype)`` (e.g. :class:`kernels.NF4Tensor`).
        lora_a: ``(r, in)``.
        lora_b: ``(out, r)``.
        scaling: ``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA).
        bias: optional ``(out,)``.
        dropout_p: dropout probability on the LoRA branch's input only.
        generator: optional ``torch.Generator`` for the dropout mask.

    ``lora_a``, ``lora_b`` and ``bias`` are cast to ``x``'s dtype (the casts are differentiable);
    under ``torch.autocast`` everything runs in the autocast dtype.
    """
    _check_args(x, weight, lora_a, lora_b, bias, dropout_p)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        if isinstance(weight, Tensor):
            weight = weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p, generator)
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    if isinstance(weight, Tensor) and _backend.use_triton(x, weight, lora_a, lora_b):
        from kernels import _lora_triton

        return _lora_triton.lora_linear_triton(x, weight, lora_a, lora_b, float(scaling), bias,
                                               float(dropout_p), generator)
    from kernels.nf4 import NF4Tensor

    if isinstance(weight, NF4Tensor) and _backend.use_triton(x, weight.packed, lora_a, lora_b):
        from kernels import _lora_nf4_triton  # QLoRA: dequantize to a scratch buffer, fused op

        return _lora_nf4_triton.lora_linear_nf4_triton(x, weight, lora_a, lora_b, float(scaling),
                                                       bias, float(dropout_p), generator)
    return lora_linear_reference(x, weight, lora_a, lora_b, scaling, bias, dropout_p, generator)


def lora_linear_grouped_reference(x: Tensor, weights: list[Tensor], lora_as: list[Tensor],
                                  lora_bs: list[Tensor], scalings: list[float],
                                  biases: list[Tensor | None] | None = None, dropout_p: float = 0.0,
                                  generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """Pure-PyTorch grouped op: ``S_cat = dropout(x)·[A_1; ...; A_n]ᵀ`` in one pass over ``x``
    (one dropout mask shared by the members), then each member's base GEMM accumulates
    ``s_i·S_i·B_iᵀ`` in its output buffer; autograd by torch."""
    biases = [None] * len(weights) if biases is None else list(biases)
    x2 = x.reshape(-1, x.shape[-1])                                          # (M, K)
    xd = x2
    if dropout_p > 0.0:
        keep = dropout_keep_mask(x2.shape, dropout_p, generator, x2.device)   # (M, K)
        xd = x2 * keep / (1.0 - dropout_p)
    lora_a = torch.cat([a.to(x.dtype) for a in lora_as], dim=0)             # (Σr, K)
    s_cat = torch.mm(xd, lora_a.t())                                         # (M, Σr)
    outs, start = [], 0
    for w, a, b, s, bias in zip(weights, lora_as, lora_bs, scalings, biases):
        s_i = s_cat[:, start:start + a.shape[0]]                             # (M, r_i)
        start += a.shape[0]
        w = _dense(w, x.dtype)
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(x.dtype), x2, w.t())
        y = torch.addmm(y, s_i, b.to(x.dtype).t(), alpha=float(s))          # (M, N_i)
        outs.append(y.view(*x.shape[:-1], w.shape[0]))
    return tuple(outs)


def lora_linear_grouped(x: Tensor, weights: list[Tensor], lora_as: list[Tensor], lora_bs: list[Tensor],
                        scalings: list[float], biases: list[Tensor | None] | None = None,
                        dropout_p: float = 0.0,
                        generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """LoRA linears that read the same ``x`` (q/k/v, gate/up), with ``x`` read once for all their
    ``A`` matrices: ``y_i = x·W_iᵀ + s_i·(dropout(x)·A_iᵀ)·B_iᵀ + b_i``. The members share one
    dropout mask. Returns one output per member; autograd to every input."""
    if isinstance(x, Tensor) and all(isinstance(w, Tensor) for w in weights) and \
            _backend.use_triton(x, *weights, *lora_as, *lora_bs):
        from kernels import _lora_triton

        return _lora_triton.lora_linear_grouped(x, weights, lora_as, lora_bs, scalings, biases,
                                                dropout_p, generator)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return lora_linear_grouped(
                x.to(dtype), [w.to(dtype) if isinstance(w, Tensor) else w for w in weights], lora_as,
                lora_bs, scalings, biases, dropout_p, generator)
    if len(lora_as) != len(weights) or len(lora_bs) != len(weights) or len(scalings) != len(weights) \
            or (biases is not None and len(biases) != len(weights)) or not weights:
        raise ValueError("weights, lora_as, lora_bs, scalings (and biases) must be non-empty and have "
                         "one entry per member")
    for i, (w, a, b) in enumerate(zip(weights, lora_as, lora_bs)):
        _check_args(x, w, a, b, None if biases is None else biases[i], dropout_p)
    return lora_linear_grouped_reference(x, weights, lora_as, lora_bs, scalings, biases, dropout_p,
                                         generator)
