"""Fast Walsh-Hadamard transform over the last dimension: ``y = x·H_n`` (optionally ``/√n``).

``H_n`` is the Sylvester Hadamard matrix of order ``n = 2^k``: ``H_1 = [1]``,
``H_2n = [[H_n, H_n], [H_n, -H_n]]``, so ``H_n[i, j] = (-1)^popcount(i & j)``. It is symmetric and
``H_n·H_n = n·I``: the normalised transform ``H_n/√n`` is orthogonal and its own inverse. The
Fastfood projection of :mod:`lightning_peft.methods.intrinsic_dimension` (Le, Sarlós and Smola
2013; Li et al. 2018, arXiv 1804.08838; Aghajanyan et al. 2020, arXiv 2012.13255) runs two of
them per step, which is why it is an op here.

The butterfly: with ``x`` viewed as ``(n/2h, 2, h)`` at stage ``h = 1, 2, 4, ..., n/2``,
``(a, b) -> (a + b, a - b)``; ``log2 n`` stages of ``n`` additions, ``O(n log n)``. Because
``H_{r·s} = H_r ⊗ H_s``, ``log2 r`` consecutive stages are one multiplication by the dense
``H_r`` along one axis of ``x`` viewed as ``(..., r, s)``. The PyTorch path does exactly that with
radix ``r <= 32`` (:data:`RADIX`): ``ceil(log2 n / 5)`` batched matmuls against a cached ``±1``
matrix, still ``O(n log n)`` (``r`` is a constant), but each pass a BLAS call instead of five
memory-bound passes of additions. The Triton kernel (:mod:`kernels._hadamard_triton`) keeps one row
in registers and runs the radix-2 stages there (one read and one write of the row); rows longer
than its limit are split the same Kronecker way.

Half-precision inputs are transformed in fp32 and rounded once at the end; fp32 and fp64 inputs
in their own dtype. The last dimension must be a power of two (1 included); anything else is a
``ValueError`` (pad with zeros yourself: the transform of a zero-padded vector is not the
transform of the vector, so silently padding would change what the caller asked for).

Autograd: ``H`` is symmetric, so the gradient of ``y = x·H·c`` is ``dx = dY·H·c``, the same
transform of the incoming gradient: backward costs one forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels import _backend

__all__ = ["RADIX", "hadamard_matrix", "hadamard_transform", "hadamard_transform_reference"]

RADIX = 32
"""Largest dense factor ``H_r`` the PyTorch path multiplies by at once (``r`` stages per pass)."""

_MATRICES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The dense Sylvester Hadamard matrix ``H_n`` (``n`` a power of two), entries ``±1``."""
    _check_size(n, "n")
    idx = torch.arange(n, device=device)
    bits = torch.bitwise_and(idx[:, None], idx[None, :])  # (n, n)
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def _cached_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (n, dtype, device)
    matrix = _MATRICES.get(key)
    if matrix is None:
        matrix = _MATRICES[key] = hadamard_matrix(n, dtype, device)
    return matrix


def _check_size(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two (1, 2, 4, 8, ...), got {n!r}; pad the last "
                         f"dimension with zeros to the next power of two if that is what you mean")
    return n


def _check_input(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the transform runs over the last one)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    _check_size(int(x.shape[-1]), f"x's last dimension (shape {tuple(x.shape)})")
    return x


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _factors(n: int) -> list[int]:
    """``n = r_1·r_2·...`` with every ``r_i <= RADIX`` powers of two, as few as possible."""
    out = []
    while n > 1:
        r = min(n, RADIX)
        out.append(r)
        n //= r
    return out


def _transform_torch(x: Tensor, scale: float) -> Tensor:
    """``x·H_n·scale`` by radix-``<=32`` Kronecker passes (batched matmuls), in the compute dtype."""
    n = x.shape[-1]
    dtype = _compute_dtype(x.dtype)
    y = x.to(dtype).reshape(-1, n)  # (rows, n)
    rows = y.shape[0]
    inner = n
    for r in _factors(n):
        # the pass over axis r of y viewed as (rows, outer, r, inner/r)
        inner //= r
        h = _cached_matrix(r, dtype, y.device)  # (r, r), symmetric
        if inner == 1:
            y = (y.reshape(-1, r) @ h).reshape(rows, n)
        else:
            y = torch.matmul(h, y.reshape(-1, r, inner)).reshape(rows, n)  # (rows·outer, r, inner)
    if n == 1:
        y = y.clone()
    if scale != 1.0:
        y = y.mul_(scale)
    return y.reshape(x.shape).to(x.dtype)


def _transform(x: Tensor, scale: float) -> Tensor:
    """No-autograd dispatch: the Triton kernel when the backend says so, else the PyTorch path."""
    if _backend.use_triton(x):  # (float64 runs the reference: the kernel sums in fp32)
        from kernels import _hadamard_triton

        return _hadamard_triton.hadamard_triton(x, scale)
    return _transform_torch(x, scale)


class _Hadamard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return _transform(x, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _transform(grad.contiguous(), ctx.scale), None  # H symmetric: dx = dY·H·scale


def _scale(n: int, normalize: bool) -> float:
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be True or False, got {normalize!r}")
    return 1.0 / math.sqrt(n) if normalize else 1.0


def hadamard_transform(x: Tensor, normalize: bool = False) -> Tensor:
    """``x·H_n`` over the last dimension of ``x`` (``n`` a power of two), times ``1/√n`` when
    ``normalize`` (then orthogonal and self-inverse). Any leading shape; differentiable; the
    Triton kernel on CUDA (or under ``TRITON_INTERPRET=1`` with backend ``"triton"``), the
    PyTorch path otherwise (see :func:`kernels.set_backend`). A fresh tensor of ``x``'s dtype."""
    x = _check_input(x)
    return _Hadamard.apply(x.contiguous(), _scale(int(x.shape[-1]), normalize))


def hadamard_transform_reference(x: Tensor, normalize: bool = False) -> Tensor:
    """The radix-2 butterfly written out stage by stage (the specification): ``log2 n`` passes of
    ``(a, b) -> (a + b, a - b)`` over ``x`` viewed as ``(..., n/2h, 2, h)``; differentiable
    through plain torch ops."""
    x = _check_input(x)
    n = int(x.shape[-1])
    dtype = _compute_dtype(x.dtype)
    y = x.to(dtype)
    h = 1
    while h < n:
        v = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(x.shape)
        h *= 2
    return (y * _scale(n, normalize)).to(x.dtype)
