"""Fused LoRA linear on a frozen NF4 base weight (the QLoRA layer), Triton path.

The base weight ``W0`` is kept as an :class:`kernels.NF4Tensor` (4 bits per weight) and is
dequantized into the calling thread's scratch buffer for (device, dtype) right before each fused
GEMM (never shared across threads)::

    forward    W  = dequant(q)                          (N, K) scratch, in x's dtype
               S  = keep⊙x·Aᵀ/(1-p)                     (M, r)   the fused LoRA op of
               y  = S·(s·B)ᵀ + x·W0ᵀ + b                (M, N)   kernels._lora_triton
    backward   W  = dequant(q) again                    (N, K) (later layers reused the buffer)
               dS = s/(1-p)·dY·B ,  dB = s·dYᵀ·S        (M, r), (N, r)
               dX = keep⊙(dS·A) + dY·W0                 (M, K)   one GEMM
               dA = dSᵀ·(keep⊙x) ,  db = Σ_m dY ;  W0 gets no gradient

Saved for backward: ``x``, ``S`` and the dropout seed, never a dense ``W0``: a model's autograd
graph holds no dequantized weights, only one scratch buffer per dtype and thread exists. The
contract is :func:`kernels.lora.lora_linear_reference` with an NF4 weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import _lora_triton  # noqa: F401  (registers torch.ops.lightning_peft.lora_linear_*)
from kernels._lora_triton import _draw_seed
from kernels.nf4 import NF4Tensor, nf4_dense_for_matmul

__all__ = ["lora_linear_nf4_triton"]


class _LoRANF4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, q, lora_a, lora_b, scaling, bias, dropout_p, generator):
        x = x2                                                          # (M, K)
        seed = _draw_seed(generator, x.device) if dropout_p > 0.0 else None
        w = nf4_dense_for_matmul(q, x.dtype)                            # (N, K) scratch
        y, s_lora = torch.ops.lightning_peft.lora_linear_fwd(
            x2, [w], lora_a, [lora_b], [scaling], [] if bias is None else [bias],
            [bias is not None], dropout_p, seed)                        # (M, N), (M, r)
        ctx.save_for_backward(x2, lora_a, lora_b, s_lora, seed)
        ctx.q, ctx.scaling, ctx.dropout_p = q, scaling, dropout_p
        return y  # a fresh (M, N) tensor: the caller's view of it may be edited in place

    @staticmethod
    def backward(ctx, grad_out):
        x2, lora_a, lora_b, s_lora, seed = ctx.saved_tensors
        need_x, _, need_a, need_b, _, need_bias = ctx.needs_input_grad[:6]
        dy = grad_out                                                   # (M, N)
        grad_x = grad_a = grad_b = grad_bias = None
        if need_x or need_a or need_b:
            # W0 is read only for dX; otherwise an empty placeholder keeps the op's signature
            w = nf4_dense_for_matmul(ctx.q, dy.dtype) if need_x else dy.new_empty((0, 0))
            dx, da, db = torch.ops.lightning_peft.lora_linear_bwd(
                [dy], x2, [w], lora_a, [lora_b], s_lora, [ctx.scaling], ctx.dropout_p, seed,
                need_x, need_a, need_b)
            grad_x = dx if need_x else None
            grad_a = da if need_a else None
            grad_b = db if need_b else None
        if need_bias:
            grad_bias = dy.sum(0)                                       # (N,)
        return grad_x, None, grad_a, grad_b, None, grad_bias, None, None


def lora_linear_nf4_triton(x: Tensor, q: NF4Tensor, lora_a: Tensor, lora_b: Tensor,
                           scaling: float, bias: Tensor | None = None, dropout_p: float = 0.0,
                           generator: torch.Generator | None = None) -> Tensor:
    """The Triton path of :func:`kernels.lora_linear` for an NF4 ``q`` (N, K): arguments already
    checked and cast to ``x.dtype`` by the caller; ``x`` (..., K), ``lora_a`` (r, K),
    ``lora_b`` (N, r), ``bias`` (N,) or None."""
    shape = x.shape
    y = _LoRANF4.apply(x.reshape(-1, shape[-1]), q, lora_a, lora_b, float(scaling), bias,
                       float(dropout_p), generator)                     # (M, N)
    return y.view(*shape[:-1], y.shape[-1])
