"""Triton kernel of :func:`kernels.hadamard_transform` (its specification and CPU fallback are in
:mod:`kernels.hadamard`).

One program transforms one row of ``n <= MAX_N`` elements held in registers: the radix-2
butterfly ``(a, b) -> (a + b, a - b)`` over the row viewed as ``(n/2h, 2, h)`` for
``h = 1, 2, ..., n/2`` (``tl.split``/``tl.join`` pair the halves), accumulated in fp32, scaled and
rounded once, then stored: one read and one write of the row. A longer row (``n = a·b``) uses
``H_n = H_a ⊗ H_b``: the kernel over rows of ``b``, a transpose, the kernel over rows of ``a``, and
the transpose back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._backend import interpreter_lock

MAX_N = 1 << 13
"""Longest row one program transforms in registers."""


@triton.jit
def _fwht_rows(x_ptr, y_ptr, scale, N: tl.constexpr, LOG_N: tl.constexpr):
    # y[row, :] = scale · x[row, :]·H_N, butterfly stages in registers, fp32 accumulation
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + row * N + offs).to(tl.float32)
    for s in tl.static_range(LOG_N):
        h: tl.constexpr = 1 << s
        v = tl.permute(tl.reshape(x, (N // (2 * h), 2, h)), (0, 2, 1))  # (n/2h, h, 2)
        a, b = tl.split(v)  # (n/2h, h) each: the first and the second half of every pair
        v = tl.permute(tl.join(a + b, a - b), (0, 2, 1))  # (n/2h, 2, h)
        x = tl.reshape(v, (N,))
    tl.store(y_ptr + row * N + offs, (x * scale).to(y_ptr.dtype.element_ty))


def _rows(x2: Tensor, scale: float) -> Tensor:
    """The kernel over the rows of the contiguous 2-D ``x2`` (row length ``<= MAX_N``)."""
    rows, n = x2.shape
    out = torch.empty_like(x2)
    if rows == 0:
        return out
    warps = 1 if n <= 256 else 4 if n <= 2048 else 8
    with interpreter_lock():
        _fwht_rows[(rows,)](x2, out, float(scale), N=n, LOG_N=n.bit_length() - 1, num_warps=warps)
    return out


def _transform(x2: Tensor, scale: float) -> Tensor:
    rows, n = x2.shape
    if n <= MAX_N:
        return _rows(x2, scale)
    b = MAX_N
    a = n // b
    y = _rows(x2.reshape(rows * a, b), 1.0)  # along the inner factor, fp32 or the input dtype
    y = y.reshape(rows, a, b).transpose(1, 2).contiguous().reshape(rows * b, a)  # (rows·b, a)
    y = _transform(y, scale)
    return y.reshape(rows, b, a).transpose(1, 2).contiguous().reshape(rows, n)


def hadamard_triton(x: Tensor, scale: float) -> Tensor:
    """``x·H_n·scale`` over the last dimension (a power of two), a fresh tensor of ``x``'s dtype.
    Rows longer than :data:`MAX_N` take two passes (half-precision inputs then go through them in
    fp32 and are rounded once at the end)."""
    n = int(x.shape[-1])
    x2 = x.contiguous().reshape(-1, n)
    if n > MAX_N and x.dtype in (torch.float16, torch.bfloat16):
        return _transform(x2.float(), scale).to(x.dtype).reshape(x.shape)
    return _transform(x2, scale).reshape(x.shape)
