"""IA3 linear: a frozen linear layer whose output or input is rescaled by a learned vector ``l``.

(IA)³ (Liu et al., 2022, arXiv 2205.05638) learns one vector per adapted layer, initialised to
ones, and multiplies an activation by it elementwise. With ``W0`` (out, in) frozen:

    output scaling (keys, values)     y = (x·W0ᵀ + b) ⊙ l        l (out,)
    input scaling  (feed-forward)     y = (x ⊙ l)·W0ᵀ + b        l (in,)

The frozen base alone costs two GEMMs per step (``x·W0ᵀ`` forward, ``dY·W0`` backward); the op
adds only elementwise passes over (tokens, features) tensors and never a third GEMM:

    output scaling  forward   y0 = x·W0ᵀ + b            (M, N)   saved for dl
                              y  = y0 ⊙ l               (M, N)   a fresh output
                    backward  dl = Σ_tokens dY ⊙ y0     (N,)     one pass over dY and y0 in row
                              dYs = dY ⊙ l              (M, N)   blocks, dYs written over y0
                              dX = dYs·W0               (M, K)
    input scaling   forward   xs = x ⊙ l                (M, K)   a scratch buffer, not saved
                              y  = xs·W0ᵀ + b           (M, N)
                    backward  dXs = dY·W0               (M, K)
                              dl = Σ_tokens dXs ⊙ x     (K,)     one pass over dXs and x in row
                              dX = dXs ⊙ l              (M, K)   blocks, dXs scaled in place

Saved for backward: ``l`` and, for output scaling, ``y0`` (what HF PEFT's autograd keeps too);
for input scaling ``x``, which is alive anyway as the previous layer's output. ``dY ⊙ l`` is
written over ``y0`` once read (``y0`` is this op's own tensor, dead after the backward pass) unless
the graph is kept (``retain_graph``/``create_graph``); then, like ``x ⊙ l`` in forward, it goes to a
per-thread scratch buffer on CPU (where a fresh allocation of that size costs page faults
comparable to the pass itself) or to the caching allocator elsewhere, and lives only until the
GEMM that reads it. ``W0`` and ``b`` get gradients only when they require
them. The op computes on (tokens, features) matrices and its output is a fresh tensor,
reshaped outside the autograd Function, so models may edit it in place (Falcon's
``mlp_output += attention_output``).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

__all__ = ["ia3_linear", "ia3_linear_reference"]

_BLOCK_BYTES = 1 << 19
"""Bytes of the row block that accumulates the ``Σ_tokens a ⊙ b`` reduction (stays in L2)."""

SCRATCH_LIMIT = 256 << 20
"""Largest CPU scratch buffer (bytes) a thread keeps between calls; :func:`release_scratch`
frees it."""

_local = threading.local()


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``shape`` tensor for a temporary that dies before the next call: on CPU
    a per-thread buffer that grows to the largest size asked for (up to :data:`SCRATCH_LIMIT`
    bytes; larger requests get a fresh tensor), elsewhere a fresh tensor from the caching
    allocator."""
    numel = 1
    for d in shape:
        numel *= int(d)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes > SCRATCH_LIMIT:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _local.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes].view(dtype).view(shape)


def release_scratch() -> None:
    """Free this thread's CPU scratch buffer (it is allocated again when next needed)."""
    _local.buf = None


def _graph_kept() -> bool:
    """Whether the backward pass running now keeps the graph (``retain_graph``/``create_graph``,
    or no backward at all, or a compiler tracing it): then saved tensors must stay intact."""
    if torch.compiler.is_compiling():
        return True
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return True if getter is None else bool(getter())
    except RuntimeError:
        return True


def _sum_of_products(a: Tensor, b: Tensor, dtype: torch.dtype, l: Tensor | None = None,
                     out: Tensor | None = None) -> Tensor:
    """``Σ_rows a ⊙ b`` of two (M, N) tensors as an (N,) tensor of ``dtype`` and, given ``l``,
    ``out = a ⊙ l`` in the same pass (``out`` may be ``a`` or ``b`` itself). Row blocks small
    enough to stay in cache: each block of ``a`` and ``b`` is read once from memory, the products
    are accumulated with ``addcmul_`` into a block of rows summed at the end (no (M, N)
    temporary), and the block of ``a`` is scaled while still in cache. Half-precision inputs
    accumulate in fp32."""
    m, n = a.shape
    rows = max(1, min(m, _BLOCK_BYTES // max(1, n * a.element_size())))  # >= 1: also 0 rows
    wide = torch.promote_types(dtype, torch.float32)
    same = a.dtype == wide and b.dtype == wide  # addcmul_ needs one dtype
    acc = torch.zeros((rows, n) if same else (n,), dtype=wide, device=a.device)
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        a_part, b_part = a[start:stop], b[start:stop]
        if same:
            acc[: stop - start].addcmul_(a_part, b_part)
        else:  # products rounded in the inputs' dtype, as HF PEFT's autograd rounds them
            acc += (a_part * b_part).sum(0, dtype=wide)
        if l is not None:
            torch.mul(a_part, l, out=out[start:stop])
    return (acc.sum(0) if same else acc).to(dtype)


def _linear(x2: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x2·Wᵀ + b`` for a 2-D ``x2`` as a fresh (M, N) tensor: the call ``F.linear`` (and
    transformers' ``Conv1D``) makes, so the values are the base layer's bit for bit."""
    wt = weight.t()
    return torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)


class _IA3Linear(torch.autograd.Function):
    # works on 2-D (tokens, features) tensors; the caller's reshapes are views made outside the
    # Function, which models may edit in place
    @staticmethod
    def forward(ctx, x2, ia3_l, weight, bias, feedforward):
        need_x, need_l, need_w, need_b = ctx.needs_input_grad[:4]
        l = ia3_l.reshape(-1)
        if feedforward:
            xs = _scratch(tuple(x2.shape), x2.dtype, x2.device)
            torch.mul(x2, l, out=xs)                                     # x ⊙ l (M, K)
            y = _linear(xs, weight, bias)                                # xs·W0ᵀ + b (M, N)
            ctx.save_for_backward(x2 if (need_l or need_w) else None, ia3_l, weight)
        else:
            y0 = _linear(x2, weight, bias)                               # x·W0ᵀ + b (M, N)
            if need_l:
                y = torch.mul(y0, l)                                     # a fresh output
            else:
                y, y0 = y0.mul_(l), None                                 # y0 is not needed
            ctx.save_for_backward(x2 if need_w else None, ia3_l, weight, y0)
        ctx.feedforward, ctx.l_shape = feedforward, ia3_l.shape
        return y

    @staticmethod
    @once_differentiable  # first-order only (create_graph works; a second derivative is refused)
    def backward(ctx, grad_out):
        need_x, need_l, need_w, need_b = ctx.needs_input_grad[:4]
        dy = grad_out                                                    # (M, N)
        grad_x = grad_l = grad_w = grad_b = None
        if ctx.feedforward:
            x2, ia3_l, weight = ctx.saved_tensors                        # x2 (M, K)
            l = ia3_l.reshape(-1)
            if need_x or need_l:
                dxs = torch.mm(dy, weight)                               # dXs = dY·W0 (M, K)
                if need_l:  # one pass: dl = Σ dXs ⊙ x, and dX = dXs ⊙ l in place
                    grad_l = _sum_of_products(dxs, x2, ia3_l.dtype, l if need_x else None, dxs)
                elif need_x:
                    dxs.mul_(l)
                grad_x = dxs if need_x else None
            if need_w:
                grad_w = torch.mm(dy.t(), x2 * l)                        # dYᵀ·(x ⊙ l) (N, K)
            if need_b:
                grad_b = dy.sum(0)
        else:
            x2, ia3_l, weight, y0 = ctx.saved_tensors
            l = ia3_l.reshape(-1)
            scale = need_x or need_w or need_b
            if scale:  # dYs = dY ⊙ l: into y0 once dl has read it, unless the graph is kept
                dys = y0 if need_l and not _graph_kept() else \
                    _scratch(tuple(dy.shape), dy.dtype, dy.device)
            if need_l:  # one pass over dY and y0: dl = Σ dY ⊙ y0, and dYs
                grad_l = _sum_of_products(dy, y0, ia3_l.dtype, l if scale else None, dys if scale else None)
            elif scale:
                torch.mul(dy, l, out=dys)                                # (M, N)
            if need_x:
                grad_x = torch.mm(dys, weight)                           # dYs·W0 (M, K)
            if need_w:
                grad_w = torch.mm(dys.t(), x2)                           # dYsᵀ·x (N, K)
            if need_b:
                grad_b = dys.sum(0)
        if grad_l is not None:
            grad_l = grad_l.view(ctx.l_shape)
        return grad_x, grad_l, grad_w, grad_b, None


def ia3_linear_reference(x: Tensor, weight: Tensor, ia3_l: Tensor, bias: Tensor | None = None,
                         feedforward: bool = False) -> Tensor:
    """Plain autograd, as HF PEFT computes it: ``(x·Wᵀ + b) ⊙ l`` or ``(x ⊙ l)·Wᵀ + b``, with
    ``l`` reshaped to a vector. The specification :func:`ia3_linear` is tested against."""
    l = ia3_l.reshape(-1)
    if feedforward:
        return F.linear((x.to(l.dtype) * l).to(x.dtype), weight, bias)
    y = F.linear(x, weight, bias)
    return (y * l).to(y.dtype)


def ia3_linear(x: Tensor, weight: Tensor, ia3_l: Tensor, bias: Tensor | None = None,
               feedforward: bool = False) -> Tensor:
    """``(x·Wᵀ + b) ⊙ l`` (``feedforward=False``: scale the output) or ``(x ⊙ l)·Wᵀ + b``
    (``feedforward=True``: scale the input), with autograd to every input.

    Args:
        x: input ``(..., in)``.
        weight: base weight ``(out, in)`` (for transformers' ``Conv1D``, its weight transposed:
            a view, no copy).
        ia3_l: the IA3 vector, ``(out, 1)``/``(out,)`` or ``(1, in)``/``(in,)`` (HF PEFT's shapes).
        bias: optional ``(out,)``.
        feedforward: scale the input instead of the output.

    The values are HF PEFT's bit for bit: the base output is the call ``nn.Linear``/``Conv1D``
    make and the product is the same elementwise ``mul``. The fused op runs when ``x``,
    ``weight`` and ``ia3_l`` share one dtype outside autocast; otherwise (an fp32 vector on a
    bf16 base, autocast) the product is formed as HF PEFT forms it, in ``l``'s dtype and rounded
    to the activation's, with plain autograd.
    """
    out_features, in_features = weight.shape
    n = in_features if feedforward else out_features
    if ia3_l.numel() != n:
        which = "in" if feedforward else "out"
        raise ValueError(f"ia3_l must have {n} elements (the layer's {which} features, "
                         f"feedforward={feedforward}), got shape {tuple(ia3_l.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight is "
                         f"{tuple(weight.shape)} (out, in); expected x[..., {in_features}]")
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}; cast one of "
                        f"them or run under torch.autocast")
    fused = (x.dtype == weight.dtype == ia3_l.dtype and not torch.is_autocast_enabled(x.device.type)
             and (bias is None or bias.dtype == x.dtype))
    if not fused:
        return ia3_linear_reference(x, weight, ia3_l, bias, feedforward)
    y2 = _IA3Linear.apply(x.reshape(-1, in_features), ia3_l, weight, bias, bool(feedforward))
    return y2.view(*x.shape[:-1], out_features)                          # a view made here
