"""LoRA linear: ``y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + b``.

LoRA (Hu et al., 2021, arXiv 2106.09685) freezes the pretrained weight ``W0`` (out, in) and learns
a low-rank update ``ΔW = s·B·A`` with ``A`` (r, in), ``B`` (out, r) and ``s = α/r`` (or ``α/√r``
for rsLoRA). Unfused, the update costs a second read of ``x`` and an output-sized temporary
``(x·Aᵀ)·Bᵀ``. Here only ``S = s·dropout(x)·Aᵀ`` (tokens, r) is materialised, and the base GEMM
accumulates into the same output buffer:

    forward    S  = s·dropout(x)·Aᵀ                    (M, r)
               y  = b + S·Bᵀ ; y += x·W0ᵀ               (M, N), one output buffer
    backward   dS = s·dY·B                             (M, r)
               dB = (Sᵀ·dY)ᵀ                           (N, r)
               dA = dSᵀ·dropout(x)                     (r, K)
               dX = (dS·A)⊙mask/(1-p) ; dX += dY·W0    (M, K), one buffer

The rank-r terms come first so that each big GEMM accumulates onto them (``beta=1``) instead of a
second pass over the output. On a CPU (float32, a rank one vector wide) ``dS`` and ``dB``
come from one compiled pass over ``dY`` (:mod:`kernels._lora_cpu`) instead of two GEMMs that each
read it. Saved for backward: ``x`` (already alive as the previous layer's
output), ``S``, and what dropout dropped: the flat positions of the dropped elements when
``0 < dropout_p <= 0.5`` (about ``p·M·K`` int64, drawn as geometric gaps: see
:func:`dropout_positions`), a bool keep mask above. The dropped copy of ``x`` is never kept: forward
and backward rebuild it with one scattered ``index_fill_``. ``W0`` only gets a gradient when it
requires one. Adapters wider than ``x`` (fp32 ``A``, ``B`` on a bf16 base) keep the branch in their
dtype: ``S`` and ``dS`` are in it, ``dY`` is cast to it for ``dB``/``dS``, and the rank-r terms are
rounded to ``x``'s dtype before the base GEMMs accumulate onto them. Outputs are fresh tensors (no
view made inside the autograd Function), so models may edit them in place (Falcon's
``mlp_output += attention_output``). The Triton kernels of
:mod:`kernels._lora_triton` implement the same contract; this file is their specification and the
CPU fallback.

DoRA (Liu et al. 2024, arXiv 2402.09353), :func:`dora_linear`, is the same op with a per-output
scale ``g = m/||W0 + s·B·A||`` (the norm from low-rank algebra, detached) applied where the output
is written: ``y = g⊙(x·W0ᵀ + s·S·Bᵀ) + b``; its backward runs the LoRA backward on ``g⊙dY``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels import _backend, _lora_cpu
from kernels.nf4 import NF4Tensor, nf4_dense_for_matmul

__all__ = [
    "bernoulli_positions",
    "dora_linear",
    "dora_linear_reference",
    "dora_weight_norm",
    "dropout_keep_mask",
    "dropout_positions",
    "lora_linear",
    "lora_linear_grouped",
    "lora_linear_grouped_reference",
    "lora_linear_reference",
]


def _dense(weight: Any, dtype: torch.dtype) -> Tensor:
    """The base weight as a dense (out, in) tensor of ``dtype``. An :class:`NF4Tensor` dequantizes
    into the calling thread's scratch buffer, as the frozen NF4 layer does (no fresh allocation
    per call; every caller here consumes it before this thread's next dequantize and never keeps
    it); any other quantized weight through its ``dequantize(dtype)``."""
    if isinstance(weight, Tensor):
        return weight
    if isinstance(weight, NF4Tensor):
        return nf4_dense_for_matmul(weight, dtype)
    return weight.dequantize(dtype)


def _branch_dtype(x_dtype: torch.dtype, *adapters: Tensor) -> torch.dtype:
    """The dtype the LoRA branch computes in: the adapters' when it is wider than ``x``'s (fp32
    ``A``, ``B`` on a bf16/fp16 base, HF PEFT's ``autocast_adapter_dtype``), else ``x``'s."""
    dtype = adapters[0].dtype
    for t in adapters[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype != x_dtype and torch.promote_types(dtype, x_dtype) == dtype:
        return dtype
    return x_dtype


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` (differentiable), skipping the dispatch when ``t`` already is ``dtype``."""
    return t if t.dtype == dtype else t.to(dtype)


def _check_args(x: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None,
                dropout_p: float, scaling: Any) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = f"{x.dtype}, shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor (..., in) of at least one dim, got {got}")
    if len(getattr(weight, "shape", ())) != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(getattr(weight, 'shape', ()))}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight is "
                         f"{tuple(weight.shape)} (out, in); expected x[..., {in_features}]")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
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
    autocast = torch.is_autocast_enabled(x.device.type)  # then both run in the autocast dtype
    if isinstance(weight, Tensor) and weight.dtype != x.dtype and not autocast:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}; cast one of "
                        "them or run under torch.autocast")


_MARGIN_SIGMAS = 6.0
"""Extra gaps drawn beyond the expected count, in standard deviations of the count."""


def bernoulli_positions(numel: int, q: float, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """Sorted flat indices ``i < numel`` at which i.i.d. Bernoulli(``q``) trials succeed.

    The gaps between successes are geometric, ``G = ⌊ln(1-U) / ln(1-q)⌋ + 1`` for ``U`` uniform on
    [0, 1), so about ``q·numel`` uniforms are drawn instead of ``numel``: at dropout 0.05 the
    positions of a 1024x4096 mask cost a twentieth of the uniforms a dense mask needs. The same
    ``generator`` state gives the same positions."""
    if numel <= 0 or q <= 0.0:
        return torch.empty(0, dtype=torch.int64, device=device)
    inv_log1m_q = 1.0 / math.log1p(-q) if q < 1.0 else -0.0
    dtype = torch.float32 if q >= 0.01 else torch.float64  # long gaps need more than 24 bits
    mean = numel * q
    chunk, last, parts = max(16, int(mean + _MARGIN_SIGMAS * math.sqrt(mean) + 16)), -1, []
    while last < numel - 1:  # one round almost always (the sum of the gaps falls short ~1e-9)
        u = torch.rand(chunk, dtype=dtype, generator=generator, device=device)
        gaps = torch.log1p(-u).mul_(inv_log1m_q).to(torch.int64).add_(1)  # >= 0 truncates: floor
        parts.append(torch.cumsum(gaps, 0).add_(last))
        last, chunk = int(parts[-1][-1]), max(16, chunk // 8)
    pos = parts[0] if len(parts) == 1 else torch.cat(parts)
    return pos[: int(torch.searchsorted(pos, numel))]


def dropout_positions(numel: int, dropout_p: float, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """What the torch path of :func:`lora_linear` drops: for ``dropout_p <= 0.5`` the sorted flat
    indices (int64) of the dropped elements, each element dropped independently with probability
    ``dropout_p``; above 0.5 a bool keep mask of ``numel`` elements built from the positions of the
    (fewer) kept ones. Forward and backward zero the dropped elements in place with one scattered
    ``index_fill_``, and backward keeps these positions (8 bytes per drop, about 0.4 bit per element
    at 0.05) instead of a mask. While ``torch.compile`` traces, the bool keep mask at every
    ``dropout_p``, drawn densely (the geometric gaps need a loop that depends on the draws, which
    a graph cannot hold): the same distribution, other draws than eager for one generator state."""
    if torch.compiler.is_compiling():
        return torch.rand(numel, generator=generator, device=device) >= dropout_p
    if dropout_p <= 0.5:
        return bernoulli_positions(numel, dropout_p, generator, device)
    keep = torch.zeros(numel, dtype=torch.bool, device=device)
    return keep.index_fill_(0, bernoulli_positions(numel, 1.0 - dropout_p, generator, device), True)


def dropout_keep_mask(shape: tuple[int, ...] | torch.Size, dropout_p: float,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """Bool mask of ``shape``, True where the torch path keeps an element: the mask that
    :func:`lora_linear` with the same ``generator`` state applies (see :func:`dropout_positions`)."""
    numel = math.prod(int(d) for d in shape)
    drop = dropout_positions(numel, dropout_p, generator, device)
    if drop.dtype == torch.bool:
        return drop.view(*shape)
    keep = torch.ones(numel, dtype=torch.bool, device=device)
    return keep.index_fill_(0, drop, False).view(*shape)


def _zero_dropped_(t: Tensor, drop: Tensor) -> Tensor:
    """Zero, in place, the elements of contiguous ``t`` that ``drop`` (from
    :func:`dropout_positions`) drops."""
    if drop.dtype == torch.bool:
        return t.mul_(drop.view(t.shape))
    t.view(-1).index_fill_(0, drop, 0)
    return t


def _needs_graph(*tensors: Any) -> bool:
    """Whether an op on ``tensors`` must record autograd: grad mode is on and one of them requires
    a gradient. Otherwise (``torch.no_grad()``, inference, frozen everything) the ops below run
    their forward math directly, without an autograd Function's bookkeeping, which on one token
    costs as much as the layer's matrix-vector products."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _lora_forward(x: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor, scaling: float,
                  bias: Tensor | None, dropout_p: float, generator: torch.Generator | None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(y, x2, s·S, dropped)``: the output of :class:`_LoRALinear` and what its backward needs."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                       # (M, K)
    w = _dense(weight, x.dtype)                                         # (N, K)
    branch = lora_a.dtype  # x's dtype, or the adapters' when wider (then S, B·S in it)
    drop = dropout_positions(x2.numel(), dropout_p, generator, x2.device) if dropout_p > 0.0 \
        else None
    xd = _dropped(x2, drop, branch)                                     # (M, K)
    s_lora = torch.mm(xd, lora_a.t()).mul_(scaling / (1.0 - dropout_p))  # s·S (M, r)
    del xd
    # a fresh output (not a view made here): models edit layer outputs in place
    y = torch.empty((*shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)
    y2 = y.view(x2.shape[0], w.shape[0])                                # (M, N)
    _lowrank_into(y2, s_lora, lora_b, bias)                             # b + s·S·Bᵀ
    y2.addmm_(x2, w.t())                                                # y += x·W0ᵀ
    return y, x2, s_lora, drop


class _LoRALinear(torch.autograd.Function):
    # The rank-r terms are written first and each big GEMM accumulates onto them (beta=1, the read
    # of C hidden inside the compute-bound GEMM), rather than a separate read-modify-write pass over
    # the (M, N) output and the (M, K) input gradient afterwards.
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, bias, dropout_p, generator):
        y, x2, s_lora, drop = _lora_forward(x, weight, lora_a, lora_b, scaling, bias, dropout_p,
                                            generator)
        ctx.save_for_backward(x2, lora_a, lora_b, s_lora, drop,
                              weight if isinstance(weight, Tensor) else None)
        ctx.weight = None if isinstance(weight, Tensor) else weight
        ctx.scaling, ctx.dropout_p, ctx.shape = scaling, dropout_p, x.shape
        return y

    @staticmethod
    @once_differentiable  # (second derivatives: not through the saved S)
    def backward(ctx, grad_out):
        x2, lora_a, lora_b, s_lora, drop, weight = ctx.saved_tensors   # s_lora holds s·S
        weight = ctx.weight if weight is None else weight
        need_x, need_w, need_a, need_b, _, need_bias = ctx.needs_input_grad[:6]
        dy = grad_out.reshape(-1, grad_out.shape[-1])                   # (M, N)
        grad_x, grad_w, grad_a, grad_b = _lowrank_backward(
            dy, x2, weight, lora_a, lora_b, s_lora, drop, ctx.scaling, ctx.dropout_p,
            need_x, need_w, need_a, need_b)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.shape)
        grad_bias = dy.sum(0) if need_bias else None
        return grad_x, grad_w, grad_a, grad_b, None, grad_bias, None, None


def _lowrank_backward(dy: Tensor, x2: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor,
                      s_lora: Tensor, drop: Tensor | None, s: float, p: float, need_x: bool,
                      need_w: bool, need_a: bool, need_b: bool
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dX (M, K), dW0 (N, K), dA (r, K), dB (N, r))`` of ``y = x·W0ᵀ + s_lora·Bᵀ`` given
    ``dY`` (M, N) (each ``None`` unless needed); ``s_lora = s·dropout(x)·Aᵀ`` from forward."""
    branch = lora_a.dtype
    dy_b = dy.to(branch) if need_b or need_x or need_a else None        # dY in the branch dtype
    grad_x = grad_w = grad_a = grad_b = None
    if need_x or need_a or need_b:
        d_s, grad_b = _ds_db(dy_b, lora_b, s_lora, s if drop is None else s / (1.0 - p), need_b)
        if need_a:
            grad_a = torch.mm(d_s.t(), _dropped(x2, drop, branch))      # (r, K)
        if need_x:
            grad_x = torch.mm(d_s, lora_a).to(dy.dtype)                 # (M, K) dS·A
            if drop is not None:
                _zero_dropped_(grad_x, drop)                            # ⊙ mask
            grad_x.addmm_(dy, _dense(weight, dy.dtype))                 # += dY·W0
    if need_w:
        grad_w = torch.mm(dy.t(), x2)                                   # (N, K)
    return grad_x, grad_w, grad_a, grad_b


def _ds_db(dy_b: Tensor, lora_b: Tensor, s_lora: Tensor, scale: float, need_b: bool,
           out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(dS, dB)``: ``dS = scale·dY·B`` (M, r), into ``out`` when given, and with ``need_b``
    ``dB = (s·Sᵀ·dY)ᵀ`` (N, r) (else ``None``). On a CPU, float32 and a supported rank, one
    compiled pass over ``dY`` computes both (:mod:`kernels._lora_cpu`); otherwise, and while
    ``torch.compile`` traces the op (the loop is opaque to it), two GEMMs."""
    if need_b and dy_b.device.type == "cpu" and not torch.compiler.is_compiling():
        both = _lora_cpu.ds_db(dy_b, lora_b, s_lora, scale, out)
        if both is not None:
            return both
    grad_b = torch.mm(s_lora.t(), dy_b).t() if need_b else None        # (s·Sᵀ·dY)ᵀ (N, r)
    d_s = torch.mm(dy_b, lora_b).mul_(scale)                            # (M, r)
    if out is None:
        return d_s, grad_b
    out.copy_(d_s)
    return out, grad_b


def _dropped(x2: Tensor, drop: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``dropout(x)`` (unscaled) in ``dtype``: ``x2`` itself when nothing is dropped and the dtype
    matches, else a contiguous copy with the dropped elements zeroed."""
    if drop is None:
        return x2 if x2.dtype == dtype else x2.to(dtype)
    return _zero_dropped_(x2.to(dtype, memory_format=torch.contiguous_format, copy=True), drop)


def _lowrank_into(out: Tensor, s_lora: Tensor, lora_b: Tensor, bias: Tensor | None) -> None:
    """``out (M, N) = b + (s·S)·Bᵀ``. With adapters wider than ``out`` the product (and the bias)
    is summed in the adapters' dtype and rounded once to ``out``'s."""
    if s_lora.dtype == out.dtype:
        if bias is None:
            torch.mm(s_lora, lora_b.t(), out=out)
        else:
            torch.addmm(bias, s_lora, lora_b.t(), out=out)
        return
    lowrank = torch.mm(s_lora, lora_b.t())                              # (M, N) branch dtype
    out.copy_(lowrank if bias is None else lowrank.add_(bias))


def lora_linear_reference(x: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor, scaling: float,
                          bias: Tensor | None = None, dropout_p: float = 0.0,
                          generator: torch.Generator | None = None) -> Tensor:
    """The pure-PyTorch op (CPU fallback and the specification of the Triton kernels)."""
    if not _needs_graph(x, weight, lora_a, lora_b, bias):
        return _lora_forward(x, weight, lora_a, lora_b, float(scaling), bias, float(dropout_p),
                             generator)[0]
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

    ``bias`` is cast to ``x``'s dtype, and so are ``lora_a`` and ``lora_b`` unless they are wider
    (fp32 adapters on a bf16/fp16 base, HF PEFT's ``autocast_adapter_dtype``): then the branch
    computes in their dtype, ``S = dropout(x).to(A.dtype)·Aᵀ`` and ``s·S·Bᵀ``, which is rounded once
    to ``x``'s dtype and added to the base output there; ``A`` and ``B`` get gradients in their
    dtype, ``x`` in its own. Under ``torch.autocast`` everything runs in the autocast dtype. The
    output is a fresh tensor that may be edited in place. (All casts are differentiable.)
    """
    _check_args(x, weight, lora_a, lora_b, bias, dropout_p, scaling)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, lora_a, lora_b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        if isinstance(weight, Tensor):
            weight = weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p, generator)
    branch = _branch_dtype(x.dtype, lora_a, lora_b)
    lora_a, lora_b = _as_dtype(lora_a, branch), _as_dtype(lora_b, branch)
    bias = None if bias is None else _as_dtype(bias, x.dtype)
    if isinstance(weight, Tensor) and _backend.use_triton(x, weight, lora_a, lora_b):
        from kernels import _lora_triton

        return _lora_triton.lora_linear_triton(x, weight, lora_a, lora_b, float(scaling), bias,
                                               float(dropout_p), generator)
    if isinstance(weight, NF4Tensor) and _backend.use_triton(x, weight.packed, lora_a, lora_b):
        from kernels import _lora_nf4_triton  # QLoRA: dequantize to a scratch buffer, fused op

        return _lora_nf4_triton.lora_linear_nf4_triton(x, weight, lora_a, lora_b, float(scaling),
                                                       bias, float(dropout_p), generator)
    return lora_linear_reference(x, weight, lora_a, lora_b, scaling, bias, dropout_p, generator)


def _grouped_forward(x: Tensor, scalings: list[float], dropout_p: float,
                     generator: torch.Generator | None, weights: Any, lora_as: Any, lora_bs: Any,
                     biases: Any) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor | None]:
    """``(outputs, x2, S_cat, dropped)``: the outputs of :class:`_LoRALinearGrouped` (``S_cat``'s
    blocks scaled by their ``s_i``) and what its backward needs."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                       # (M, K)
    branch = lora_as[0].dtype  # x's dtype, or the adapters' when wider
    drop = dropout_positions(x2.numel(), dropout_p, generator, x2.device) if dropout_p > 0.0 \
        else None
    xd = _dropped(x2, drop, branch)                                     # (M, K)
    s_cat = torch.mm(xd, torch.cat(lora_as, dim=0).t())                 # (M, Σr)
    del xd  # (the concatenated A is not kept: backward concatenates the A_i again)
    outs, start = [], 0
    for w, b, bias, s, a in zip(weights, lora_bs, biases, scalings, lora_as):
        s_i = s_cat[:, start:start + a.shape[0]].mul_(s / (1.0 - dropout_p))  # s_i·S_i, in place
        start += a.shape[0]
        w = _dense(w, x.dtype)                                          # (N_i, K)
        # fresh outputs (not views made here): models edit layer outputs in place
        y = torch.empty((*shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)
        y2 = y.view(x2.shape[0], w.shape[0])                            # (M, N_i)
        _lowrank_into(y2, s_i, b, bias)                                 # b_i + s_i·S_i·B_iᵀ
        y2.addmm_(x2, w.t())                                            # y_i += x·W_iᵀ
        outs.append(y)
    return tuple(outs), x2, s_cat, drop


class _LoRALinearGrouped(torch.autograd.Function):
    """``n`` LoRA linears on one ``x`` with the contract of :class:`_LoRALinear`: one dropout draw
    and one pass over ``x`` for ``S_cat = dropout(x)·[A_1; ...; A_n]ᵀ`` (each block scaled by its
    ``s_i``), each output written as ``b_i + S_i·B_iᵀ`` and then accumulated onto by its base GEMM;
    backward reads ``x`` once for all ``dA_i`` and builds ``dX = (dS_cat·A_cat)⊙mask + Σ dY_i·W_i``
    in one buffer. Saved: ``x``, ``S_cat`` and the dropped positions (besides the parameters)."""

    @staticmethod
    def forward(ctx, x, scalings, dropout_p, generator, *tensors):
        n = len(scalings)
        weights, lora_as, lora_bs, biases = (tensors[i * n:(i + 1) * n] for i in range(4))
        outs, x2, s_cat, drop = _grouped_forward(x, scalings, dropout_p, generator, weights,
                                                 lora_as, lora_bs, biases)
        ctx.save_for_backward(x2, s_cat, drop, *lora_as, *lora_bs,
                              *(w if isinstance(w, Tensor) else None for w in weights))
        ctx.quantized = [None if isinstance(w, Tensor) else w for w in weights]
        ctx.scalings, ctx.dropout_p, ctx.shape = scalings, dropout_p, x.shape
        ctx.ranks = [a.shape[0] for a in lora_as]
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    @once_differentiable  # (second derivatives: not through the saved S)
    def backward(ctx, *grad_outs):
        x2, s_cat, drop, *rest = ctx.saved_tensors
        n, p = len(ctx.scalings), ctx.dropout_p
        lora_as, lora_bs = rest[:n], rest[n:2 * n]
        weights = [q if w is None else w for w, q in zip(rest[2 * n:], ctx.quantized)]
        needs = ctx.needs_input_grad[4:]
        need_w, need_a, need_b, need_bias = (needs[i * n:(i + 1) * n] for i in range(4))
        branch = s_cat.dtype
        dys = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grad_outs]
        grads_w, grads_b, grads_bias = [None] * n, [None] * n, [None] * n
        d_s = torch.zeros_like(s_cat)                                   # (M, Σr)
        start = 0
        for i, (dy, b, r, s) in enumerate(zip(dys, lora_bs, ctx.ranks, ctx.scalings)):
            block = slice(start, start + r)
            start += r
            if dy is None:
                continue
            dy_b = dy.to(branch)                                        # dY_i in the branch dtype
            _, grads_b[i] = _ds_db(dy_b, b, s_cat[:, block], s / (1.0 - p), need_b[i],
                                   out=d_s[:, block])                   # dS_i, dB_i
            del dy_b
            if need_w[i]:
                grads_w[i] = torch.mm(dy.t(), x2)
            if need_bias[i]:
                grads_bias[i] = dy.sum(0)
        grads_a = [None] * n
        if any(need_a):
            grads_a = list(torch.mm(d_s.t(), _dropped(x2, drop, branch)).split(ctx.ranks, dim=0))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(d_s, torch.cat(lora_as, dim=0)).to(x2.dtype)  # (M, K) dS_cat·A_cat
            if drop is not None:
                _zero_dropped_(grad_x, drop)                            # ⊙ mask
            for dy, w in zip(dys, weights):
                if dy is not None:
                    grad_x.addmm_(dy, _dense(w, dy.dtype))              # += dY_i·W_i
            grad_x = grad_x.view(ctx.shape)
        return (grad_x, None, None, None, *grads_w, *grads_a, *grads_b, *grads_bias)


def lora_linear_grouped_reference(x: Tensor, weights: list[Tensor], lora_as: list[Tensor],
                                  lora_bs: list[Tensor], scalings: list[float],
                                  biases: list[Tensor | None] | None = None, dropout_p: float = 0.0,
                                  generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """The pure-PyTorch grouped op (CPU fallback and specification): ``S_cat = dropout(x)·[A_1;
    ...; A_n]ᵀ`` in one pass over ``x`` (one dropout draw shared by the members), then each
    member's base GEMM accumulates onto its ``b_i + s_i·S_i·B_iᵀ``; see :class:`_LoRALinearGrouped`."""
    biases = [None if b is None else _as_dtype(b, x.dtype) for b in
              ([None] * len(weights) if biases is None else biases)]
    branch = _branch_dtype(x.dtype, *lora_as, *lora_bs)
    lora_as, lora_bs = [_as_dtype(a, branch) for a in lora_as], [_as_dtype(b, branch) for b in lora_bs]
    scalings = [float(s) for s in scalings]
    if not _needs_graph(x, *weights, *lora_as, *lora_bs, *biases):
        return _grouped_forward(x, scalings, float(dropout_p), generator, weights, lora_as, lora_bs,
                                biases)[0]
    return _LoRALinearGrouped.apply(x, scalings, float(dropout_p), generator, *weights, *lora_as,
                                    *lora_bs, *biases)


def lora_linear_grouped(x: Tensor, weights: list[Tensor], lora_as: list[Tensor], lora_bs: list[Tensor],
                        scalings: list[float], biases: list[Tensor | None] | None = None,
                        dropout_p: float = 0.0,
                        generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """LoRA linears that read the same ``x`` (q/k/v, gate/up), with ``x`` read once for all their
    ``A`` matrices: ``y_i = x·W_iᵀ + s_i·(dropout(x)·A_iᵀ)·B_iᵀ + b_i``. The members share one
    dropout mask. Returns one fresh output per member (editable in place); autograd to every input.
    Dtypes as in :func:`lora_linear`: adapters wider than ``x`` keep the branch in their dtype."""
    if len(lora_as) != len(weights) or len(lora_bs) != len(weights) or len(scalings) != len(weights) \
            or (biases is not None and len(biases) != len(weights)) or not weights:
        raise ValueError("weights, lora_as, lora_bs, scalings (and biases) must be non-empty and have "
                         "one entry per member")
    for i, (w, a, b) in enumerate(zip(weights, lora_as, lora_bs)):  # on every backend
        _check_args(x, w, a, b, None if biases is None else biases[i], dropout_p, scalings[i])
    if all(isinstance(w, Tensor) for w in weights) and _backend.use_triton(x, *weights, *lora_as, *lora_bs):
        from kernels import _lora_triton

        return _lora_triton.lora_linear_grouped(x, weights, lora_as, lora_bs, scalings, biases,
                                                dropout_p, generator)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return lora_linear_grouped(
                x.to(dtype), [w.to(dtype) if isinstance(w, Tensor) else w for w in weights],
                [a.to(dtype) for a in lora_as], [b.to(dtype) for b in lora_bs], scalings, biases,
                dropout_p, generator)
    return lora_linear_grouped_reference(x, weights, lora_as, lora_bs, scalings, biases, dropout_p,
                                         generator)


# ------------------------------------------------------------------------------------------ DoRA


def dora_weight_norm(weight: Any, lora_a: Tensor, lora_b: Tensor, scaling: float,
                     weight_norm_sq: Tensor | None = None) -> Tensor:
    """``||W0_i + s·B_i·A||`` for every output feature ``i``, (out,), without building the
    (out, in) update (DoRA, arXiv 2402.09353):

        ||W0_i + s·B_i·A||² = ||W0_i||² + 2s·B_i·(A·W0_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ

    at ``r·in·out + r²·in`` multiply-adds (``A·W0ᵀ`` and ``A·Aᵀ``). ``weight_norm_sq`` is
    ``||W0_i||²`` (out,), cached by a caller while ``W0`` is frozen; computed here when ``None``.
    The result is in float32 at least (float64 for float64 inputs), detached from autograd;
    negative rounding residues are clamped to zero."""
    with torch.no_grad():
        adapters = _branch_dtype(lora_a.dtype, lora_a, lora_b)
        compute = torch.promote_types(adapters, torch.float32)
        w = _dense(weight, compute if not isinstance(weight, Tensor) else weight.dtype)  # (N, K)
        compute = torch.promote_types(compute, w.dtype)
        if weight_norm_sq is None:
            weight_norm_sq = torch.linalg.vector_norm(w, dim=1, dtype=compute).square()  # (N,)
        a, b = lora_a.detach().to(compute), lora_b.detach().to(compute)  # (r, K), (N, r)
        if w.dtype == compute:
            aw = torch.mm(w, a.t())                                     # (N, r) = (A·W0ᵀ)ᵀ
        else:  # a half-precision W0 is not copied to fp32: the product accumulates in fp32
            aw = torch.mm(w, a.t().to(w.dtype)).to(compute)
        cross = torch.linalg.vecdot(b, aw, dim=1)                       # (N,) B_i·(A·W0_iᵀ)
        quad = torch.linalg.vecdot(torch.mm(b, torch.mm(a, a.t())), b, dim=1)  # (N,) B_i·AAᵀ·B_iᵀ
        norm_sq = weight_norm_sq.to(compute) + (2.0 * scaling) * cross + (scaling * scaling) * quad
        return norm_sq.clamp_min_(0.0).sqrt_()


def _dora_forward(x: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor, scaling: float,
                  magnitude: Tensor, bias: Tensor | None, dropout_p: float,
                  generator: torch.Generator | None, weight_norm_sq: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """``(y, x2, s·S, dropped, g, norm, u)``: the output of :class:`_DoRALinear` and what its
    backward needs (``u`` (M, N) the output before the magnitude, ``g = m/norm``)."""
    w = _dense(weight, x.dtype)                                         # (N, K), dequantized once
    norm = dora_weight_norm(w, lora_a, lora_b, scaling, weight_norm_sq)  # (N,) detached
    g = magnitude.detach().to(norm.dtype) / norm                        # (N,) m/||W0 + s·B·A||
    u, x2, s_lora, drop = _lora_forward(x, w, lora_a, lora_b, scaling, None, dropout_p, generator)
    u = u.view(x2.shape[0], w.shape[0])                                 # (M, N) x·W0ᵀ + s·S·Bᵀ
    y = torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)  # fresh
    y2 = y.view(u.shape)
    gx = g.to(x.dtype)
    if bias is None:
        torch.mul(u, gx, out=y2)                                        # y = g⊙u
    else:
        torch.addcmul(bias, u, gx, out=y2)                              # y = g⊙u + b
    return y, x2, s_lora, drop, g, norm, u


class _DoRALinear(torch.autograd.Function):
    # forward   u = x·W0ᵀ + s·S·Bᵀ (the LoRA op), y = g⊙u + b with g = m/||W0 + s·B·A|| (N,)
    #           applied as the epilogue that writes y: one pass over the (M, N) output
    # backward  dm = Σ_m dY⊙u / ||W0 + s·B·A||, then the LoRA backward of dU = g⊙dY
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, magnitude, bias, dropout_p, generator,
                weight_norm_sq):
        y, x2, s_lora, drop, g, norm, u = _dora_forward(
            x, weight, lora_a, lora_b, scaling, magnitude, bias, dropout_p, generator,
            weight_norm_sq)
        need_m = ctx.needs_input_grad[5]
        ctx.save_for_backward(x2, lora_a, lora_b, s_lora, drop,
                              weight if isinstance(weight, Tensor) else None, g, norm,
                              u if need_m else None)
        ctx.weight = None if isinstance(weight, Tensor) else weight
        ctx.scaling, ctx.dropout_p, ctx.shape = scaling, dropout_p, x.shape
        ctx.magnitude_dtype = magnitude.dtype
        return y

    @staticmethod
    @once_differentiable  # (second derivatives: not through the saved S)
    def backward(ctx, grad_out):
        x2, lora_a, lora_b, s_lora, drop, weight, g, norm, u = ctx.saved_tensors
        weight = ctx.weight if weight is None else weight
        need_x, need_w, need_a, need_b, _, need_m, need_bias = ctx.needs_input_grad[:7]
        dy = grad_out.reshape(-1, grad_out.shape[-1])                   # (M, N)
        grad_m = grad_bias = None
        if need_m:                                                      # Σ_m dY⊙u / ||·||
            grad_m = torch.linalg.vecdot(dy.to(norm.dtype), u.to(norm.dtype), dim=0).div_(norm)  # (N,)
            grad_m = grad_m.to(ctx.magnitude_dtype)
        if need_bias:
            grad_bias = dy.sum(0)
        grad_x = grad_w = grad_a = grad_b = None
        if need_x or need_w or need_a or need_b:
            du = dy * g.to(dy.dtype)                                    # (M, N) g⊙dY
            grad_x, grad_w, grad_a, grad_b = _lowrank_backward(
                du, x2, weight, lora_a, lora_b, s_lora, drop, ctx.scaling, ctx.dropout_p,
                need_x, need_w, need_a, need_b)
            if grad_x is not None:
                grad_x = grad_x.view(ctx.shape)
        return grad_x, grad_w, grad_a, grad_b, None, grad_m, grad_bias, None, None, None


def dora_linear_reference(x: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor, scaling: float,
                          magnitude: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0,
                          generator: torch.Generator | None = None,
                          weight_norm_sq: Tensor | None = None) -> Tensor:
    """The pure-PyTorch DoRA op (see :func:`dora_linear`); arguments already checked and cast."""
    if not _needs_graph(x, weight, lora_a, lora_b, magnitude, bias):
        return _dora_forward(x, weight, lora_a, lora_b, float(scaling), magnitude, bias,
                             float(dropout_p), generator, weight_norm_sq)[0]
    return _DoRALinear.apply(x, weight, lora_a, lora_b, float(scaling), magnitude, bias,
                             float(dropout_p), generator, weight_norm_sq)


def dora_linear(x: Tensor, weight: Any, lora_a: Tensor, lora_b: Tensor, scaling: float,
                magnitude: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0,
                generator: torch.Generator | None = None,
                weight_norm_sq: Tensor | None = None) -> Tensor:
    """DoRA linear (Liu et al. 2024, arXiv 2402.09353), with autograd, on any leading batch dims:

        y = m / ||W0 + s·B·A|| ⊙ (x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ) + b

    the norm taken per output feature (row of ``W0 + s·B·A``, (out,)) and detached from autograd
    (the paper's section 4.3), so only ``m`` (out,) and ``A``, ``B`` get gradients through it.
    The norm comes from low-rank algebra (:func:`dora_weight_norm`; ``||W0_i||²`` may be passed
    as ``weight_norm_sq`` (out,) while ``W0`` is frozen), and ``m/norm`` is applied by the fused
    LoRA op's epilogue, the one pass that writes the output. Saved for backward besides LoRA's
    ``x``, ``S`` and dropped positions: the pre-scale output ``u`` (tokens, out) when ``m``
    requires a gradient (``dm = Σ dY⊙u / norm``), and two (out,) vectors. Without dropout (and in
    eval) this is HF PEFT's DoRA; with dropout, dropout acts on the low-rank branch only, as in
    :func:`lora_linear` (HF PEFT also runs ``W0`` on the dropped input, a second base GEMM); both
    have the same expectation. ``weight`` may be quantized (:class:`kernels.NF4Tensor`). Dtypes,
    autocast and the fresh output as in :func:`lora_linear`; ``m`` follows the adapters' dtype.
    The Triton backend runs the fused LoRA GEMM with ``g`` as its epilogue (which also stores
    ``u``) and the fused LoRA backward on ``g⊙dY`` (:mod:`kernels._lora_triton`); a quantized
    ``weight`` runs the PyTorch path on every backend.
    """
    _check_args(x, weight, lora_a, lora_b, bias, dropout_p, scaling)
    out_features = weight.shape[0]
    if not isinstance(magnitude, Tensor) or tuple(magnitude.shape) != (out_features,):
        raise ValueError(f"magnitude must be a ({out_features},) tensor, one entry per output "
                         f"feature, got {tuple(getattr(magnitude, 'shape', ())) or type(magnitude).__name__}")
    if weight_norm_sq is not None and (not isinstance(weight_norm_sq, Tensor)
                                       or tuple(weight_norm_sq.shape) != (out_features,)):
        got = tuple(getattr(weight_norm_sq, "shape", ())) or type(weight_norm_sq).__name__
        raise ValueError(f"weight_norm_sq must be None or a ({out_features},) tensor of ||W0_i||², "
                         f"got {got}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, lora_a, lora_b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        if isinstance(weight, Tensor):
            weight = weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return dora_linear(x, weight, lora_a, lora_b, scaling, magnitude, bias, dropout_p,
                               generator, weight_norm_sq)
    branch = _branch_dtype(x.dtype, lora_a, lora_b)
    lora_a, lora_b = lora_a.to(branch), lora_b.to(branch)
    if bias is not None:
        bias = bias.to(x.dtype)
    if isinstance(weight, Tensor) and _backend.use_triton(x, weight, lora_a, lora_b):
        from kernels import _lora_triton

        return _lora_triton.dora_linear_triton(x, weight, lora_a, lora_b, float(scaling), magnitude,
                                               bias, float(dropout_p), generator, weight_norm_sq)
    return dora_linear_reference(x, weight, lora_a, lora_b, scaling, magnitude, bias, dropout_p,
                                 generator, weight_norm_sq)
