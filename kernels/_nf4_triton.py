"""Triton kernels of the NF4 ops; the format and the math are in :mod:`kernels.nf4`.

Kernels (each one computes exactly what the Torch reference computes):

- ``_quantize_kernel``: one program per ``ROWS`` blocks; absmax, nearest code by counting the 15
  midpoints below ``s``, two codes packed per byte.
- ``_quantize_absmax_kernel``: one program per 256 absmax values; bitsandbytes' 8-bit
  double quantization through its 65536-entry table.
- ``_dequantize_kernel``: a tile of bytes ``(ROWS, COLS)`` whose rows each lie inside one block,
  so the scale (rebuilt from the nested absmax in the same kernel) is loaded once per row; each
  byte is one gather of a ``(c[hi], c[lo])`` fp32 pair packed in an int64.
- ``_matmul_kernel``: ``y = x·dequant(W)ᵀ (+ b)`` for ``M <= 16`` rows, reading the packed bytes
  straight into the dot. The weight tile is ``(BLOCK_N, NBLK, B/2)`` bytes: ``NBLK`` whole
  quantization blocks of ``BLOCK_N`` rows, so each block's scale is a ``(BLOCK_N, NBLK)`` tile.
  ``M == 1`` multiplies and reduces on the CUDA cores, applying each scale once per block:
  ``y[n] = Σ_blocks absmax · Σ_{k in block} c[q[n, k]]·x[k]``; ``M > 1`` dequantizes the tile to
  ``x``'s dtype and uses ``tl.dot``. ``SPLIT_K`` programs per row tile write fp32 partial sums
  that the launcher adds (deterministic, no atomics).

Bit-exactness on GPU: divisions use ``div_rn`` (Triton's ``/`` is approximate) and the
quantize/dequantize kernels launch with ``enable_fp_fusion=False`` so ``d·a2 + offset`` is not
contracted into an FMA. Offsets are int64 so tensors beyond 2³¹ elements index correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import _backend
from kernels.nf4 import _NESTED_BLOCKSIZE, NF4Tensor, _nested_offset, _tables, _workspace

# Largest M served by the fused matmul kernel; larger batches dequantize once and call the GEMM.
SMALL_M = 16


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _quantize_kernel(x_ptr, packed_ptr, absmax_ptr, bounds_ptr, n, nbytes, nblocks,
                     BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
    # absmax = max|x| per block; s = clamp(x·(1/absmax), -1, 1) (x / absmax in a partial last
    # block); q = #{midpoints < s}; byte = q[2j] << 4 | q[2j+1].
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)                               # (ROWS,)
    e = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]     # (ROWS, B)
    x = tl.load(x_ptr + e, mask=e < n, other=0.0).to(tl.float32)
    am = tl.max(tl.abs(x), axis=1)                                      # (ROWS,)
    am_c = tl.maximum(am, 1e-38)
    partial = (blk + 1) * BLOCKSIZE > n
    s_full = x * tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), am_c)[:, None]
    s_part = tl.math.div_rn(x, tl.broadcast_to(am_c[:, None], (ROWS, BLOCKSIZE)))
    s = tl.where(partial[:, None], s_part, s_full)
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    q = tl.zeros((ROWS, BLOCKSIZE), dtype=tl.int32)
    for i in tl.static_range(15):
        q += (s > tl.load(bounds_ptr + i)).to(tl.int32)
    hi, lo = tl.split(tl.reshape(q, (ROWS, BLOCKSIZE // 2, 2)))         # (ROWS, B/2) each
    byte = (hi << 4) | lo
    bo = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + bo, byte.to(tl.uint8), mask=bo < nbytes)
    tl.store(absmax_ptr + blk, tl.where(partial, am_c, am), mask=blk < nblocks)


@triton.jit
def _quantize_absmax_kernel(absmax_ptr, offset_ptr, lut_ptr, qabs_ptr, nested_ptr, nblocks,
                            GROUP: tl.constexpr):
    # v = absmax - offset; a2 = max|v| per group; qa = L[trunc(((s + 1)·0.5)·65535 + 0.5)],
    # s = clamp(v·(1/a2), -1, 1); qa = 0 where a2 == 0.
    g = tl.program_id(0).to(tl.int64)
    i = g * GROUP + tl.arange(0, GROUP)                                 # (GROUP,)
    m = i < nblocks
    v = tl.load(absmax_ptr + i, mask=m, other=0.0) - tl.load(offset_ptr)
    v = tl.where(m, v, 0.0)
    a2 = tl.max(tl.abs(v), axis=0)                                      # ()
    inv = tl.where(a2 == 0.0, 0.0, tl.math.div_rn(1.0, tl.maximum(a2, 1e-38)))
    s = tl.minimum(tl.maximum(v * inv, -1.0), 1.0)
    t = ((s + 1.0) * 0.5) * 65535.0 + 0.5
    qa = tl.load(lut_ptr + t.to(tl.int32), mask=m, other=0)
    qa = tl.where(a2 == 0.0, 0, qa)
    tl.store(qabs_ptr + i, qa.to(tl.uint8), mask=m)
    tl.store(nested_ptr + g, a2)


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, mask,
                 NESTED: tl.constexpr):
    # fp32 scale of quantization block ``blk``: absmax, or d[qa]·a2 + offset when nested.
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(nested_absmax_ptr + blk // 256, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + qa) * a2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def _unpack_pair(b, pair_ptr):
    # byte -> (c[b >> 4], c[b & 15]) as fp32, one int64 gather from the 256-entry pair table
    pair = tl.load(pair_ptr + b.to(tl.int32))
    hi = pair.to(tl.int32).to(tl.float32, bitcast=True)
    lo = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                       pair_ptr, out_ptr, n, nbytes, BLOCKSIZE: tl.constexpr,
                       NESTED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # out[2j], out[2j+1] = c[byte[j] >> 4]·scale, c[byte[j] & 15]·scale, scale of block 2j // B.
    pid = tl.program_id(0).to(tl.int64)
    row = pid * (ROWS * COLS) + tl.arange(0, ROWS).to(tl.int64) * COLS  # (ROWS,) first byte
    byte = row[:, None] + tl.arange(0, COLS)[None, :]                    # (ROWS, COLS)
    b = tl.load(packed_ptr + byte, mask=byte < nbytes, other=0)
    scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                         (2 * row) // BLOCKSIZE, row < nbytes, NESTED)   # (ROWS,)
    hi, lo = _unpack_pair(b, pair_ptr)
    vals = tl.interleave(hi * scale[:, None], lo * scale[:, None])       # (ROWS, 2·COLS)
    o = 2 * row[:, None] + tl.arange(0, 2 * COLS)[None, :]
    tl.store(out_ptr + o, vals.to(out_ptr.dtype.element_ty), mask=o < n)


@triton.jit
def _matmul_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                   pair_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                   blocks_per_split, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   NBLK: tl.constexpr, FINAL: tl.constexpr, IEEE: tl.constexpr):
    # y[m, n] = Σ_k x[m, k]·c[q[n, k]]·absmax[(nK + k) // B]  over this program's K range.
    # Requires K % B == 0, so row n holds the K/B whole blocks n·K/B ... (n+1)·K/B - 1.
    HB: tl.constexpr = BLOCKSIZE // 2
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    kblocks = K // BLOCKSIZE
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                          # (BLOCK_N,)
    n_mask = n < N
    j = tl.arange(0, NBLK)
    h = tl.arange(0, HB)
    kb_start = pid_s * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, kblocks)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)                # yᵀ tile
        m = tl.arange(0, BLOCK_M)
        m_mask = m < M
    for kb in range(kb_start, kb_end, NBLK):
        jb = kb + j                                                      # (NBLK,) block in row
        j_mask = jb < kb_end
        blk = n[:, None].to(tl.int64) * kblocks + jb[None, :]            # (BLOCK_N, NBLK)
        w_mask = n_mask[:, None] & j_mask[None, :]
        scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk,
                             w_mask, NESTED)                             # (BLOCK_N, NBLK)
        byte = blk[:, :, None] * HB + h[None, None, :]                   # (BLOCK_N, NBLK, HB)
        b = tl.load(packed_ptr + byte, mask=w_mask[:, :, None], other=0)
        hi, lo = _unpack_pair(b, pair_ptr)                               # (BLOCK_N, NBLK, HB)
        k = jb[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]   # (NBLK, B)
        if BLOCK_M == 1:
            xk = tl.load(x_ptr + k, mask=j_mask[:, None], other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(xk, (NBLK, HB, 2)))      # (NBLK, HB) each
            part = tl.sum(hi * x_even[None, :, :] + lo * x_odd[None, :, :], axis=2)
            acc += tl.sum(part * scale, axis=1)                          # (BLOCK_N,)
        else:
            w = tl.interleave(hi * scale[:, :, None], lo * scale[:, :, None])  # (BN, NBLK, B)
            w = tl.reshape(w, (BLOCK_N, NBLK * BLOCKSIZE)).to(x_ptr.dtype.element_ty)
            k = tl.reshape(k, (NBLK * BLOCKSIZE,))
            kmask = tl.reshape(tl.broadcast_to(j_mask[:, None], (NBLK, BLOCKSIZE)),
                               (NBLK * BLOCKSIZE,))
            xt = tl.load(x_ptr + m[None, :] * stride_xm + k[:, None],
                         mask=m_mask[None, :] & kmask[:, None], other=0.0)  # (NBLK·B, BLOCK_M)
            # the weight tile is the dot's A operand, so it can stay in registers
            if IEEE:
                acc += tl.dot(w, xt, input_precision="ieee")             # (BLOCK_N, BLOCK_M)
            else:
                acc += tl.dot(w, xt)
    if FINAL:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)   # (BLOCK_N,)
            if BLOCK_M == 1:
                acc += bias
            else:
                acc += bias[:, None]
        acc = acc.to(out_ptr.dtype.element_ty)
        base = out_ptr
    else:
        base = out_ptr + pid_s * stride_os                              # fp32 partial sums
    if BLOCK_M == 1:
        tl.store(base + n, acc, mask=n_mask)
    else:
        tl.store(base + m[None, :] * stride_om + n[:, None], acc,
                 mask=m_mask[None, :] & n_mask[:, None])


# ---------------------------------------------------------------------------------- launchers
def _launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``. Launches hold no shared state, so threads may launch at
    once; only Triton's CPU interpreter (``TRITON_INTERPRET=1``) patches ``triton.language`` for
    the duration of a kernel, so there launches run one at a time."""
    with _backend.interpreter_lock():
        kernel[grid](*args, **kwargs)


def _nested_args(q: NF4Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if q.double_quant:
        return q.nested_absmax, q.nested_code, q.nested_offset
    return q.absmax, q.absmax, q.absmax                                 # unused placeholders


def quantize(w: Tensor, blocksize: int, double_quant: bool) -> NF4Tensor:
    """Triton ``quantize_nf4``: same bytes and statistics as :func:`kernels.nf4._quantize_torch`."""
    tables = _tables(w.device)
    x = w.contiguous().view(-1)                                         # (n,)
    n = x.numel()
    nbytes = (n + 1) // 2
    blocks = -(-n // blocksize)
    packed = torch.empty(nbytes, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=w.device)
    rows = max(1, 2048 // blocksize)
    _launch(
        _quantize_kernel, (triton.cdiv(blocks, rows),),
        x, packed, absmax, tables.bounds, n, nbytes, blocks, BLOCKSIZE=blocksize, ROWS=rows,
        num_warps=4, enable_fp_fusion=False)
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    offset = _nested_offset(absmax)                                     # () fp32
    groups = -(-blocks // _NESTED_BLOCKSIZE)
    qabs = torch.empty(blocks, dtype=torch.uint8, device=w.device)
    nested = torch.empty(groups, dtype=torch.float32, device=w.device)
    _launch(
        _quantize_absmax_kernel, (groups,),
        absmax, offset, tables.lut, qabs, nested, blocks, GROUP=_NESTED_BLOCKSIZE, num_warps=2,
        enable_fp_fusion=False)
    return NF4Tensor(packed, qabs, w.shape, w.dtype, blocksize, nested_absmax=nested,
                     nested_code=tables.dynamic.clone(), nested_offset=offset)


def dequantize(q: NF4Tensor, out: Tensor) -> Tensor:
    """Triton ``dequantize_nf4`` into ``out`` (contiguous, ``q.numel()`` elements)."""
    tables = _tables(q.device)
    n = q.numel()
    nbytes = q.packed.numel()
    cols = min(q.blocksize // 2, 1024)                                  # bytes per tile row
    rows = max(1, 1024 // cols)              # 1024 bytes a program, 4 a thread: 8 outputs store
                                             # as one 16-byte bf16 vector, no layout shuffle
    grid = (triton.cdiv(nbytes, rows * cols),)
    _launch(
        _dequantize_kernel, grid,
        q.packed, q.absmax, *_nested_args(q), tables.pair, out, n, nbytes,
        BLOCKSIZE=q.blocksize, NESTED=q.double_quant, ROWS=rows, COLS=cols, num_warps=8,
        enable_fp_fusion=False)
    return out


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _matmul_config(m: int, blocksize: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, NBLK, num_warps)``, chosen by compiling for sm_90 (no spills, few
    layout conversions). ``M == 1``: K steps of 512+ over 16 rows (8192 weights a step).
    ``M > 1``: the dequantized ``(BLOCK_N, K step)`` tile is the A operand of the dot."""
    if m == 1:
        nblk = max(1, 512 // blocksize)
        return 1, max(1, min(16, 8192 // (nblk * blocksize))), nblk, 8
    nblk = max(1, 128 // blocksize)
    return 16, max(16, 8192 // (nblk * blocksize)) if blocksize <= 128 else 16, nblk, 8


def fused_supported(m: int, q: NF4Tensor) -> bool:
    """Whether :func:`matmul_small_m` serves an ``(m, K)`` input for weight ``q``."""
    k = q.shape[1]
    return 1 <= m <= SMALL_M and k % q.blocksize == 0 and (m == 1 or q.blocksize <= 512)


def matmul_small_m(x2: Tensor, q: NF4Tensor, bias: Tensor | None, split_k: int | None = None
                   ) -> Tensor:
    """Fused ``x2·dequant(q)ᵀ (+ bias)`` for ``x2`` ``(M <= 16, K)`` with ``K % blocksize == 0``."""
    tables = _tables(q.device)
    m, k = x2.shape
    n = q.shape[0]
    x2 = x2.contiguous()
    block_m, block_n, nblk, warps = _matmul_config(m, q.blocksize)
    kblocks = k // q.blocksize
    tiles_n = triton.cdiv(n, block_n)
    steps = triton.cdiv(kblocks, nblk)                                  # K steps per row tile
    if split_k is None:
        split_k = min(steps, max(1, triton.cdiv(2 * _num_sms(x2.device), tiles_n)))
    split_k = max(1, min(int(split_k), steps))
    blocks_per_split = triton.cdiv(steps, split_k) * nblk
    split_k = triton.cdiv(kblocks, blocks_per_split)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    final = split_k == 1
    dest = y if final else torch.empty(split_k, m, n, dtype=torch.float32, device=x2.device)
    _launch(
        _matmul_kernel, (tiles_n, split_k),
        x2, q.packed, q.absmax, *_nested_args(q), tables.pair,
        bias if bias is not None else y, dest, m, n, k, x2.stride(0), n, m * n, blocks_per_split,
        BLOCKSIZE=q.blocksize, NESTED=q.double_quant, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, NBLK=nblk, FINAL=final,
        IEEE=x2.dtype == torch.float32, num_warps=warps, enable_fp_fusion=True)
    if not final:
        acc = dest.sum(0)                                               # (M, N) fp32
        if bias is not None:
            acc += bias.float()
        y.copy_(acc)
    return y


def nf4_matmul(x2: Tensor, q: NF4Tensor, bias: Tensor | None) -> Tensor:
    """``x2·dequant(q)ᵀ (+ bias)``: fused for small ``M``, else dequantize to scratch + GEMM."""
    if fused_supported(x2.shape[0], q):
        return matmul_small_m(x2, q, bias)
    w = dequantize(q, _workspace(q.numel(), x2.dtype, q.device).view(q.shape))   # (N, K)
    return torch.addmm(bias, x2, w.t()) if bias is not None else torch.mm(x2, w.t())


__all__ = ["SMALL_M", "dequantize", "fused_supported", "matmul_small_m", "nf4_matmul", "quantize"]
