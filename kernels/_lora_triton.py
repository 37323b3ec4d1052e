"""Fused LoRA linear in Triton: forward, backward, and a grouped op for projections sharing x.

The contract is :func:`kernels.lora.lora_linear_reference`; the fusion follows LoRAFusion
(arXiv 2510.00206). With ``keep`` the dropout mask, ``p`` its probability and ``s`` the scaling,
one op call runs four kinds of pass::

    forward    S  = keep⊙x·Aᵀ / (1-p)                     (M, r)   down pass: reads x once
               y  = S·(s·B)ᵀ + x·W0ᵀ + b                  (M, N)   one GEMM; its accumulator
                                                                   starts at S·(s·B)ᵀ, bias added
                                                                   in the epilogue
    backward   dS = s/(1-p)·dY·B ,  dB = s·dYᵀ·S          (M, r), (N, r)   dY pass: reads dY once
               dX = keep⊙(dS·A) + dY·W0                   (M, K)   one GEMM; its accumulator
               dA = dSᵀ·(keep⊙x)                          (r, K)   starts at the LoRA term, and
                                                                   its prologue also adds the
                                                                   tile's share of dA
               dW0 = dYᵀ·x , db = Σ_m dY                  only when W0 / b require grad (torch)

Only ``S`` (M, r) is materialised besides the output; the dropped copy of ``x`` and the mask are
never stored. Adapters may be wider than ``x`` and ``W0`` (fp32 ``A``, ``B`` on a bf16/fp16 base):
then ``S``, ``dS``, ``dA`` and ``dB`` are in the adapters' dtype, the tiles of ``x`` and ``dY`` are
cast to it in registers before the rank-r ``tl.dot``s, and the base GEMMs stay in ``x``'s dtype,
accumulating in fp32 onto the rank-r term before one rounding to ``x``'s dtype.

The grouped op (q/k/v or gate/up reading the same ``x``) concatenates the adapters,
``A_cat = [A1; ...; An]`` (Σr, K), shares one mask, and runs one down pass for all of them::

    S_cat = keep⊙x·A_catᵀ / (1-p) ,  y_i = S_i·(s_i·B_i)ᵀ + x·W_iᵀ + b_i
    dX = keep⊙(dS_cat·A_cat) + Σ_i dY_i·W_i ,  dA_cat = dS_catᵀ·(keep⊙x)

Dropout mask: ``keep[m, k]`` comes from Philox-4x32-7 (Salmon et al. 2011: 7 rounds pass
BigCrush; 10 is their margin) keyed by a 64-bit seed with counter ``m·⌈K/8⌉ + ⌊k/8⌋``; its four
32-bit words give eight 16-bit uniforms ``u`` and element ``k`` takes lane ``k mod 8``;
``keep = u >= round(p·2¹⁶)`` (so p is resolved to 2⁻¹⁶; kept values are scaled by 1/(1-p)). One
Philox call per 8 elements keeps the mask cheap next to the GEMMs. The mask depends only on
(seed, m, k, K), so every kernel regenerates the same one whatever its tiling.
The seed is drawn with ``torch.randint`` from ``generator`` (or torch's default generator), so
``torch.manual_seed`` reproduces it; :func:`dropout_keep_mask` rebuilds the mask from a seed.

Reductions split across programs (split-K of the down pass, dB and dS of the dY pass, dA) add
fp32 partials with atomics, or, under ``torch.use_deterministic_algorithms(True)``, store them
per program and sum them with torch in a fixed order. Offsets are int64 where a tensor spans
2³¹ elements or more. The ops (``lightning_peft::lora_linear_fwd`` / ``_bwd``) are registered
with ``torch.library.triton_op`` and ``register_autograd``, so ``torch.compile(fullgraph=True)``
traces into their kernels; under the CPU interpreter they are opaque ``custom_op``s instead.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from kernels import _backend
from kernels.lora import _branch_dtype

__all__ = [
    "dora_linear_triton",
    "dropout_keep_mask",
    "lora_linear_grouped",
    "lora_linear_grouped_reference",
    "lora_linear_triton",
]

_PHILOX_ROUNDS = tl.constexpr(7)  # Philox-4x32 rounds: the fewest that pass BigCrush
_INT32_LIMIT = 2**31 - 2**24  # margin for block overhang past the last row or column


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _keep_mask(seed, rows, col0, n_cols, threshold, BM: tl.constexpr, BN: tl.constexpr):
    """keep (BM, BN) for ``rows`` x columns ``col0 .. col0+BN-1`` (col0 a multiple of 8)."""
    groups = col0 // 8 + tl.arange(0, BN // 8)                                  # (BN/8,)
    counter = rows[:, None] * ((n_cols + 7) // 8) + groups[None, :]             # (BM, BN/8)
    # Philox-4x32 on the counter's two 32-bit words, written out: an int32 and an int64 counter
    # give the same draws (forward and backward pick int64 offsets separately), on every Triton
    # (randint4x ran a 64-bit Philox on int64 counters before Triton 3.4)
    lo = counter.to(tl.uint32)
    hi = (counter.to(tl.int64) >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, lo * 0, lo * 0, _PHILOX_ROUNDS)
    u = tl.join(tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16)),
                tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16)))
    u = tl.reshape(u, (BM, BN))                   # (BM, BN): column k holds lane k % 8
    return u.to(tl.int32) >= threshold


@triton.jit
def _mask_kernel(seed_ptr, out_ptr, M, N, threshold,
                 INT64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out[m, n] = keep(m, n) as int8, for tests and for reconstructing a forward's mask."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    if INT64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    keep = _keep_mask(tl.load(seed_ptr), rm, tl.program_id(1) * BN, N, threshold, BM, BN)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], keep.to(tl.int8),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, s_ptr, seed_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sp, stride_sm, stride_sr,
    scale, threshold,
    DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
    RB: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """S[m, r] (+)= scale · Σ_k keep(m, k)·x[m, k]·A[r, k] over this program's slice of K,
    for rank columns r in block ``program_id(2)`` of RB, in A's dtype (x is cast to it)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = tl.program_id(2) * RB + tl.arange(0, RB)
    if INT64:
        rm = rm.to(tl.int64)
    m_ok = rm < M
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BM, RB), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        if INT64:
            rk = rk.to(tl.int64)
        k_ok = rk < k_hi
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)               # (BM, BK)
        if DROPOUT:
            x = tl.where(_keep_mask(seed, rm, k0, K, threshold, BM, BK), x, tl.zeros_like(x))
        a = tl.load(a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar,
                    mask=k_ok[:, None] & (rr[None, :] < R), other=0.0)           # (BK, RB) = Aᵀ
        acc = tl.dot(x.to(a.dtype), a, acc, input_precision=PRECISION)          # (BM, RB)
    acc = acc * scale
    ptrs = s_ptr + pid_s.to(tl.int64) * stride_sp + rm[:, None] * stride_sm + rr[None, :] * stride_sr
    mask = m_ok[:, None] & (rr[None, :] < R)
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    M, N, R, n_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsp, stride_dsm, stride_dsr, stride_dbp, stride_dbn, stride_dbr,
    ds_scale, db_scale,
    NEED_DS: tl.constexpr, NEED_DB: tl.constexpr, DS_ATOMIC: tl.constexpr,
    DB_ATOMIC: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
    RB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """One read of dY: dS (+)= ds_scale·dY·B and dB (+)= db_scale·dYᵀ·S on this row tile, this
    slice of N, and rank columns in block ``program_id(2)`` of RB, in S's (and B's) dtype."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = tl.program_id(2) * RB + tl.arange(0, RB)
    if INT64:
        rm = rm.to(tl.int64)
    m_ok = rm < M
    r_ok = rr < R
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    s = tl.zeros((BM, RB), dtype=s_ptr.dtype.element_ty)
    if NEED_DB:
        s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)               # (BM, RB)
    acc = tl.zeros((BM, RB), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BN):
        rn = n0 + tl.arange(0, BN)
        if INT64:
            rn = rn.to(tl.int64)
        n_ok = rn < n_hi
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)              # (BM, BN)
        dy = dy.to(s_ptr.dtype.element_ty)        # into the branch dtype (A, B, S share it)
        if NEED_DS:
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)           # (BN, RB)
            acc = tl.dot(dy, b, acc, input_precision=PRECISION)                 # (BM, RB)
        if NEED_DB:
            db = tl.dot(tl.trans(dy), s, input_precision=PRECISION) * db_scale  # (BN, RB)
            # (a partial-sum plane per row block: pid_m·N·R passes 2^31 for long inputs)
            db_ptrs = (db_ptr + pid_m.to(tl.int64) * stride_dbp + rn[:, None] * stride_dbn
                       + rr[None, :] * stride_dbr)
            db_mask = n_ok[:, None] & r_ok[None, :]
            if DB_ATOMIC:
                tl.atomic_add(db_ptrs, db, mask=db_mask, sem="relaxed")
            else:
                tl.store(db_ptrs, db, mask=db_mask)
    if NEED_DS:
        ds = acc * ds_scale
        ds_ptrs = (ds_ptr + pid_s.to(tl.int64) * stride_dsp + rm[:, None] * stride_dsm
                   + rr[None, :] * stride_dsr)
        ds_mask = m_ok[:, None] & r_ok[None, :]
        if DS_ATOMIC:
            tl.atomic_add(ds_ptrs, ds, mask=ds_mask, sem="relaxed")
        else:
            tl.store(ds_ptrs, ds.to(ds_ptr.dtype.element_ty), mask=ds_mask)


def _gemm_configs() -> list:
    """Autotune space of the fused GEMM: one small config under the interpreter, Hopper-sized
    tiles (128x128x64 and 128x256x64, 8 warps, 3-4 stages) plus smaller ones for small M."""
    if _backend.interpreting():
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}, num_warps=1,
                              num_stages=1)]
    shapes = [  # BM, BN, BK, warps, stages
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (128, 128, 32, 4, 4),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s in shapes]


_GEMM_CONFIGS = _gemm_configs()
_GEMM_MIN_BM = min(c.kwargs["BM"] for c in _GEMM_CONFIGS)


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "RP", "NEED_OUT", "HAS_LOWRANK", "HAS_BIAS", "ACCUMULATE",
         "DROPOUT", "NEED_DA", "HAS_SCALE", "STORE_U"],
    reset_to_zero=["da_ptr"],
    restore_value=["out_ptr"],
)
@triton.jit
def _lora_gemm_kernel(
    a_ptr, w_ptr, p_ptr, q_ptr, bias_ptr, out_ptr, xl_ptr, da_ptr, seed_ptr, scale_ptr, u_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_wk, stride_wn, stride_pm, stride_pr, stride_qr, stride_qn,
    stride_om, stride_on, stride_xm, stride_xn, stride_dap, stride_dar, stride_dan, stride_bias,
    stride_um, stride_un,
    alpha, threshold,
    NEED_OUT: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr, DROPOUT: tl.constexpr, NEED_DA: tl.constexpr,
    HAS_SCALE: tl.constexpr, STORE_U: tl.constexpr,
    DA_ATOMIC: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
    LR_PRECISION: tl.constexpr, RP: tl.constexpr,
    RB: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """On one (BM, BN) tile: out = g⊙(alpha·keep⊙(P·Q) + Am·W) (+ bias) (+ out),
    and dA (+)= Pᵀ·(keep⊙XL).

    DoRA (HAS_SCALE): g = m/||W0 + s·B·A|| (N,) scales the columns in the epilogue, and with
    STORE_U the unscaled sum u is stored as well (backward's dm = Σ dY⊙u / norm).

    Forward: Am = x, W = W0ᵀ, P = S, Q = Bᵀ, alpha = s. Backward: Am = dY, W = W0, P = dS,
    Q = A, XL = x, alpha = 1. The accumulator starts at the low-rank term, so the output is
    written once. P and Q may be wider than Am and W (fp32 adapters on a bf16 base): the rank-r
    products run in P's dtype (XL is cast to it) and everything sums in the fp32 accumulator.
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n                      # grouped order: GROUP_M row tiles share W in L2
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    if INT64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if NEED_DA:                                   # dA (+)= Pᵀ·(keep⊙XL), before acc is live
        xl = tl.load(xl_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)              # (BM, BN)
        if DROPOUT:
            keep = _keep_mask(tl.load(seed_ptr), rm, pid_n * BN, N, threshold, BM, BN)
            xl = tl.where(keep, xl, tl.zeros_like(xl))
        for r0 in tl.static_range(0, RP, RB):    # the rank in chunks of RB columns
            rr = r0 + tl.arange(0, RB)
            r_ok = rr < R
            p = tl.load(p_ptr + rm[:, None] * stride_pm + rr[None, :] * stride_pr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)           # (BM, RB)
            da = tl.dot(tl.trans(p), xl.to(p.dtype), input_precision=LR_PRECISION)  # (RB, BN)
            da_ptrs = (da_ptr + pid_m.to(tl.int64) * stride_dap + rr[:, None] * stride_dar
                       + rn[None, :] * stride_dan)
            if DA_ATOMIC:
                tl.atomic_add(da_ptrs, da, mask=r_ok[:, None] & n_ok[None, :], sem="relaxed")
            else:
                tl.store(da_ptrs, da, mask=r_ok[:, None] & n_ok[None, :])
    if NEED_OUT:
        if HAS_LOWRANK:                           # the accumulator starts at the LoRA term
            for r0 in tl.static_range(0, RP, RB):
                rr = r0 + tl.arange(0, RB)
                r_ok = rr < R
                p = tl.load(p_ptr + rm[:, None] * stride_pm + rr[None, :] * stride_pr,
                            mask=m_ok[:, None] & r_ok[None, :], other=0.0)       # (BM, RB)
                q = tl.load(q_ptr + rr[:, None] * stride_qr + rn[None, :] * stride_qn,
                            mask=r_ok[:, None] & n_ok[None, :], other=0.0)       # (RB, BN)
                acc = tl.dot(p, q, acc, input_precision=LR_PRECISION)           # (BM, BN)
            acc = acc * alpha
            if DROPOUT:                           # regenerated: cheaper than keeping it live
                keep = _keep_mask(tl.load(seed_ptr), rm, pid_n * BN, N, threshold, BM, BN)
                acc = tl.where(keep, acc, 0.0)
        ram = rm % M                              # wrapped rows/cols: loads need no M/N mask
        rwn = rn % N
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            if INT64:
                rk = rk.to(tl.int64)
            k_ok = rk < K
            a = tl.load(a_ptr + ram[:, None] * stride_am + rk[None, :] * stride_ak,
                        mask=k_ok[None, :], other=0.0)                          # (BM, BK)
            w = tl.load(w_ptr + rk[:, None] * stride_wk + rwn[None, :] * stride_wn,
                        mask=k_ok[:, None], other=0.0)                          # (BK, BN)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if STORE_U:                               # DoRA: u = x·W0ᵀ + s·S·Bᵀ, before the scale
            tl.store(u_ptr + rm[:, None] * stride_um + rn[None, :] * stride_un,
                     acc.to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        if HAS_SCALE:                             # DoRA: y = g⊙u (+ b), one g per column
            g = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)                     # (BN,)
            acc = acc * g.to(tl.float32)[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn * stride_bias, mask=n_ok, other=0.0)      # (BN,)
            acc += bias.to(tl.float32)[None, :]
        out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
        out_mask = m_ok[:, None] & n_ok[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch a Triton kernel through ``wrap_triton`` (traceable by torch.compile).

    Under the interpreter ``wrap_triton`` hands back the plain kernel, which cannot run on fake
    tensors: there the ops are opaque custom ops (see :func:`_op`) and the launch is skipped
    while their fake implementation computes output metadata."""
    if _backend.interpreting() and any(is_fake(a) for a in args if isinstance(a, Tensor)):
        return
    with _backend.interpreter_lock():  # interpreted launches must not overlap (threads)
        wrap_triton(kernel)[grid](*args, **kwargs)


def _op(name: str):
    """Register ``fn`` as a torch.library op: a ``triton_op`` (torch.compile traces into its
    kernels), or under the interpreter an opaque ``custom_op`` whose fake implementation is
    ``fn`` itself with the launches skipped."""
    def register(fn):
        if not _backend.interpreting():
            return triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op
    return register


def _pad_rank(r: int) -> int:
    """The rank as ``tl.dot`` sees it: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(r))


def _rank_block(r: int) -> int:
    """Rank columns handled at once: all of them up to 64 (16 under the interpreter, so that
    tests cover the chunking); larger ranks go in chunks."""
    return min(_pad_rank(r), 16 if _backend.interpreting() else 64)


def _m_bucket(m) -> int:
    """Autotune key for M: the next power of two (linear 256-row buckets for a symbolic M)."""
    if isinstance(m, int):
        return triton.next_power_of_2(max(m, 1))
    return (m + 255) // 256 * 256


def _needs_int64(*tensors: Tensor | None) -> bool:
    """Whether an element offset into any tensor can pass int32."""
    for t in tensors:
        if t is None:
            continue
        extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
        if t.numel() >= _INT32_LIMIT or extent >= _INT32_LIMIT:
            return True
    return False


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands, following torch's matmul setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _target_programs(device: torch.device) -> int:
    """Programs to aim for in the memory-bound passes before splitting their reduction."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so that tests exercise the split paths


def _split(blocks_out: int, blocks_red: int, block: int, device: torch.device) -> tuple[int, int]:
    """(splits, elements per split) of a reduction over ``blocks_red`` blocks of ``block``."""
    want = max(1, -(-_target_programs(device) // max(blocks_out, 1)))
    splits = max(1, min(blocks_red, want))
    per = max(1, -(-blocks_red // splits)) * block
    return max(1, -(-(blocks_red * block) // per)), per


def _down_config() -> dict:
    if _backend.interpreting():
        return {"BM": 16, "BK": 32, "num_warps": 1, "num_stages": 1}
    return {"BM": 64, "BK": 128, "num_warps": 4, "num_stages": 3}


def _dy_config() -> dict:
    if _backend.interpreting():
        return {"BM": 16, "BN": 32, "num_warps": 1, "num_stages": 1}
    return {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3}


def _threshold(dropout_p: float) -> int:
    return min(int(round(dropout_p * 65536.0)), 65536)


def _lora_down(x: Tensor, a: Tensor, dropout_p: float, seed: Tensor | None) -> Tensor:
    """S = keep⊙x·Aᵀ/(1-p), (M, r) in A's dtype (x's, or the adapters' when wider), reading
    x once."""
    M, K = x.shape
    R = a.shape[0]
    cfg = _down_config()
    m_blocks = triton.cdiv(M, cfg["BM"])
    splits, per = _split(m_blocks, triton.cdiv(K, cfg["BK"]), cfg["BK"], x.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if splits == 1:
        buf = torch.empty((M, R), dtype=a.dtype, device=x.device)              # (M, r)
    elif deterministic:
        buf = torch.empty((splits, M, R), dtype=torch.float32, device=x.device)
    else:
        buf = torch.zeros((M, R), dtype=torch.float32, device=x.device)
    if M > 0:
        _launch(_lora_down_kernel, (m_blocks, splits, triton.cdiv(R, _rank_block(R))),
                x, a, buf, x if seed is None else seed,
                M, K, R, per,
                x.stride(0), x.stride(1), a.stride(0), a.stride(1),
                buf.stride(0) if buf.dim() == 3 else 0, buf.stride(-2), buf.stride(-1),
                1.0 / (1.0 - dropout_p), _threshold(dropout_p),
                DROPOUT=dropout_p > 0.0, ATOMIC=splits > 1 and not deterministic,
                INT64=_needs_int64(x, a, buf), PRECISION=_precision(a.dtype),
                RB=_rank_block(R), **cfg)
    if splits == 1:
        return buf
    return (buf.sum(0) if deterministic else buf).to(a.dtype)


def _lora_dy(dy: Tensor, b: Tensor, s: Tensor, scaling: float, ds_scale: float, need_ds: bool,
             need_db: bool) -> tuple[Tensor | None, Tensor | None]:
    """One read of dY: (dS = ds_scale·dY·B (M, r), dB = scaling·dYᵀ·S (N, r)), in B's dtype
    (dY's, or the adapters' when wider)."""
    M, N = dy.shape
    R = b.shape[1]
    cfg = _dy_config()
    m_blocks = triton.cdiv(M, cfg["BM"])
    splits, per = _split(m_blocks, triton.cdiv(N, cfg["BN"]), cfg["BN"], dy.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    f32 = {"dtype": torch.float32, "device": dy.device}
    if splits == 1:
        ds = torch.empty((M, R), dtype=b.dtype, device=dy.device)              # (M, r)
    elif deterministic:
        ds = torch.empty((splits, M, R), **f32)
    else:
        ds = torch.zeros((M, R), **f32)
    if not need_db:
        db = torch.empty((1, 1), **f32)            # not written
    elif deterministic:
        db = torch.zeros((m_blocks, N, R), **f32)  # one partial per row tile, summed below
    else:
        db = torch.zeros((N, R), **f32)
    if M > 0 and (need_ds or need_db):
        _launch(_lora_dy_kernel, (m_blocks, splits, triton.cdiv(R, _rank_block(R))),
                dy, b, s, ds, db,
                M, N, R, per,
                dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), s.stride(0), s.stride(1),
                ds.stride(0) if ds.dim() == 3 else 0, ds.stride(-2), ds.stride(-1),
                db.stride(0) if db.dim() == 3 else 0, db.stride(-2), db.stride(-1),
                ds_scale, scaling,
                NEED_DS=need_ds, NEED_DB=need_db, DS_ATOMIC=splits > 1 and not deterministic,
                DB_ATOMIC=not deterministic, INT64=_needs_int64(dy, b, s, ds, db),
                PRECISION=_precision(b.dtype), RB=_rank_block(R), **cfg)
    if not need_ds:
        ds = None
    elif splits > 1:
        ds = (ds.sum(0) if deterministic else ds).to(b.dtype)
    if need_db:
        db = (db.sum(0) if deterministic else db).to(b.dtype)
    return ds, (db if need_db else None)


def _lora_gemm(a: Tensor, w: Tensor, out: Tensor | None, *, p: Tensor | None = None,
               q: Tensor | None = None, alpha: float = 1.0, bias: Tensor | None = None,
               accumulate: bool = False, xl: Tensor | None = None, need_out: bool = True,
               dropout_p: float = 0.0, seed: Tensor | None = None, row_scale: Tensor | None = None,
               u: Tensor | None = None) -> Tensor | None:
    """out (M, N) = g⊙(alpha·keep⊙(p·q) + a·w) (+ bias) (+ out); returns dA = pᵀ·(keep⊙xl)
    (r, N) in p's dtype when ``xl`` (M, N) is given. ``a`` (M, K), ``w`` (K, N), ``p`` (M, r),
    ``q`` (r, N), ``row_scale`` g (N,) or None (DoRA), ``u`` (M, N) or None: receives the sum
    before the scale. With ``need_out=False`` only dA is computed and ``out`` may be None."""
    M, N = out.shape if out is not None else xl.shape
    K = a.shape[1]
    has_lowrank = need_out and q is not None
    need_da = xl is not None
    R = p.shape[1] if p is not None else 1
    deterministic = torch.are_deterministic_algorithms_enabled()
    f32 = {"dtype": torch.float32, "device": a.device}
    da = None
    if need_da:
        if deterministic:
            da = torch.zeros((triton.cdiv(M, _GEMM_MIN_BM), R, N), **f32)
        else:
            da = torch.zeros((R, N), **f32)
    if M > 0 and N > 0:
        dummy = torch.empty(1, **f32)             # autotune zeroes da_ptr: never alias an input
        da_buf = dummy if da is None else da
        p_, q_, xl_ = (p if p is not None else a), (q if q is not None else a), \
            (xl if xl is not None else a)
        _launch(_lora_gemm_kernel,
                lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),),
                a, w, p_, q_, a if bias is None else bias, out if need_out else dummy, xl_,
                da_buf,
                a if seed is None else seed,
                a if row_scale is None else row_scale, a if u is None else u,
                M, N, K, R, _m_bucket(M),
                a.stride(0), a.stride(1), w.stride(0), w.stride(1), p_.stride(0), p_.stride(1),
                q_.stride(0), q_.stride(1), *(out.stride() if need_out else (0, 0)),
                xl_.stride(0), xl_.stride(1),
                da_buf.stride(0) if da_buf.dim() == 3 else 0,
                da_buf.stride(-2) if da_buf.dim() >= 2 else 0, da_buf.stride(-1),
                0 if bias is None else bias.stride(0),
                *((0, 0) if u is None else u.stride()),
                alpha, _threshold(dropout_p),
                NEED_OUT=need_out, HAS_LOWRANK=has_lowrank, HAS_BIAS=bias is not None,
                ACCUMULATE=accumulate, DROPOUT=dropout_p > 0.0, NEED_DA=need_da,
                HAS_SCALE=row_scale is not None, STORE_U=u is not None,
                DA_ATOMIC=not deterministic,
                INT64=_needs_int64(a, w, p, q, out, xl, da, u), PRECISION=_precision(a.dtype),
                LR_PRECISION=_precision(p_.dtype),
                RP=_pad_rank(R), RB=_rank_block(R))
    if da is None:
        return None
    return (da.sum(0) if deterministic else da).to(p.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library ops and autograd
# ----------------------------------------------------------------------------------------------


@_op("lightning_peft::lora_linear_fwd")
def _lora_fwd(x: Tensor, weights: list[Tensor], lora_a: Tensor, lora_bs: list[Tensor],
              scalings: list[float], biases: list[Tensor], has_bias: list[bool],
              dropout_p: float, seed: Tensor | None) -> list[Tensor]:
    """[y_1, ..., y_n, S_cat]: the grouped forward on 2-D x. ``biases`` holds only the present
    biases, in member order; ``has_bias[i]`` says whether member i has one."""
    s_cat = _lora_down(x, lora_a, dropout_p, seed)                              # (M, Σr)
    outs = []
    offset, next_bias = 0, 0
    for w, b, scaling, with_bias in zip(weights, lora_bs, scalings, has_bias):
        r = b.shape[1]
        bias = None
        if with_bias:
            bias, next_bias = biases[next_bias], next_bias + 1
        y = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)  # (M, N)
        s = s_cat if len(weights) == 1 else s_cat[:, offset:offset + r]         # (M, r)
        _lora_gemm(x, w.t(), y, p=s, q=b.t(), alpha=scaling, bias=bias)
        outs.append(y)
        offset += r
    return outs + [s_cat]


@_op("lightning_peft::lora_linear_bwd")
def _lora_bwd(grads: list[Tensor], x: Tensor, weights: list[Tensor], lora_a: Tensor,
              lora_bs: list[Tensor], s_cat: Tensor, scalings: list[float], dropout_p: float,
              seed: Tensor | None, need_dx: bool, need_da: bool, need_db: bool) -> list[Tensor]:
    """[dX, dA_cat, dB_1, ..., dB_n] of the grouped op; an empty tensor for each not needed."""
    keep_scale = 1.0 / (1.0 - dropout_p)
    need_ds = need_dx or need_da
    ds_parts, dbs = [], []
    offset = 0
    for dy, b, scaling in zip(grads, lora_bs, scalings):
        r = b.shape[1]
        s = s_cat if len(grads) == 1 else s_cat[:, offset:offset + r]           # (M, r)
        ds, db = _lora_dy(dy, b, s, scaling, scaling * keep_scale, need_ds, need_db)
        ds_parts.append(ds)
        dbs.append(db if db is not None else x.new_empty(0))
        offset += r
    dx = da = None
    if need_ds:
        ds_cat = ds_parts[0] if len(ds_parts) == 1 else torch.cat(ds_parts, dim=1)  # (M, Σr)
        if need_dx:
            dx = torch.empty_like(x, memory_format=torch.contiguous_format)     # (M, K)
            da = _lora_gemm(grads[0], weights[0], dx, p=ds_cat, q=lora_a,
                            xl=x if need_da else None, dropout_p=dropout_p, seed=seed)
            for dy, w in zip(grads[1:], weights[1:]):
                _lora_gemm(dy, w, dx, accumulate=True)                          # dX += dY_i·W_i
        else:
            da = _lora_gemm(x, lora_a, None, p=ds_cat, xl=x, need_out=False,
                            dropout_p=dropout_p, seed=seed)
    return [x.new_empty(0) if dx is None else dx, x.new_empty(0) if da is None else da] + dbs


def _setup_context(ctx, inputs, output) -> None:
    x, weights, lora_a, lora_bs, scalings, biases, has_bias, dropout_p, seed = inputs
    ctx.n = len(weights)
    ctx.scalings, ctx.dropout_p, ctx.has_bias = scalings, dropout_p, has_bias
    ctx.save_for_backward(x, lora_a, output[-1], seed, *weights, *lora_bs)


def _backward(ctx, grads):
    x, lora_a, s_cat, seed, *rest = ctx.saved_tensors
    n = ctx.n
    weights, lora_bs = rest[:n], rest[n:]
    need_x, need_w, need_a, need_b, _, need_bias, _, _, _ = ctx.needs_input_grad
    dys = [torch.zeros((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device) if g is None
           else g for g, w in zip(grads[:n], weights)]                         # (M, N_i) each
    need_db = any(need_b)
    dx = da = None
    dbs = [None] * n
    if need_x or need_a or need_db:
        dx, da, *dbs = torch.ops.lightning_peft.lora_linear_bwd(
            dys, x, list(weights), lora_a, list(lora_bs), s_cat, ctx.scalings, ctx.dropout_p,
            seed, need_x, need_a, need_db)
        dbs = [db if nb else None for db, nb in zip(dbs, need_b)]
    grad_w = [torch.mm(dy.t(), x) if nw else None for dy, nw in zip(dys, need_w)]  # (N_i, K)
    present = [dy for dy, hb in zip(dys, ctx.has_bias) if hb]
    grad_bias = [dy.sum(0) if nb else None for dy, nb in zip(present, need_bias)]
    return (dx if need_x else None, grad_w, da if need_a else None, dbs, None, grad_bias, None,
            None, None)


_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A (1,) int64 Philox seed on ``device``, drawn from ``generator`` or torch's default."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=gen_device,
                         generator=generator)
    return seed.to(device)


def _apply(x: Tensor, weights: list[Tensor], lora_a: Tensor, lora_bs: list[Tensor],
           scalings: list[float], biases: list[Tensor | None], dropout_p: float,
           generator: torch.Generator | None) -> tuple[Tensor, ...]:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                               # (M, K)
    seed = _draw_seed(generator, x.device) if dropout_p > 0.0 else None
    present = [b for b in biases if b is not None]
    has_bias = [b is not None for b in biases]
    outs = torch.ops.lightning_peft.lora_linear_fwd(x2, list(weights), lora_a, list(lora_bs),
                                                   [float(s) for s in scalings], present,
                                                   has_bias, float(dropout_p), seed)
    return tuple(y.view(*shape[:-1], y.shape[-1]) for y in outs[:-1])


def lora_linear_triton(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                       bias: Tensor | None = None, dropout_p: float = 0.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """The Triton path of :func:`kernels.lora_linear`: arguments already checked and cast to
    ``x.dtype`` by the caller. ``x`` (..., K), ``weight`` (N, K), ``lora_a`` (r, K),
    ``lora_b`` (N, r), ``bias`` (N,) or None."""
    return _apply(x, [weight], lora_a, [lora_b], [scaling], [bias], dropout_p, generator)[0]


@_op("lightning_peft::dora_linear_fwd")
def _dora_fwd(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
              row_scale: Tensor, bias: Tensor | None, dropout_p: float, seed: Tensor | None,
              store_u: bool) -> list[Tensor]:
    """[y, S, u] of DoRA on 2-D x: ``S = keep⊙x·Aᵀ/(1-p)`` (M, r), ``y = g⊙(x·W0ᵀ + s·S·Bᵀ) + b``
    (M, N) with ``g = row_scale`` applied in the GEMM's epilogue, and the unscaled ``u`` (M, N)
    when ``store_u`` (else an empty tensor)."""
    s_lora = _lora_down(x, lora_a, dropout_p, seed)                             # (M, r)
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)  # (M, N)
    u = torch.empty_like(y) if store_u else x.new_empty(0)                      # (M, N)
    _lora_gemm(x, weight.t(), y, p=s_lora, q=lora_b.t(), alpha=scaling, bias=bias,
               dropout_p=0.0, seed=None, row_scale=row_scale, u=u if store_u else None)
    return [y, s_lora, u]


class _DoRATriton(torch.autograd.Function):
    # forward: the fused LoRA GEMM with DoRA's column scale g = m/||W0 + s·B·A|| as its epilogue
    # backward: dm = Σ_m dY⊙u / norm, then the fused LoRA backward of dU = g⊙dY
    @staticmethod
    def forward(ctx, x2, weight, lora_a, lora_b, scaling, magnitude, bias, dropout_p, generator,
                weight_norm_sq):
        from kernels.lora import dora_weight_norm

        norm = dora_weight_norm(weight, lora_a, lora_b, scaling, weight_norm_sq)  # (N,) detached
        g = magnitude.detach().to(norm.dtype) / norm                             # (N,)
        seed = _draw_seed(generator, x2.device) if dropout_p > 0.0 else None
        need_m = ctx.needs_input_grad[5]
        y, s_lora, u = torch.ops.lightning_peft.dora_linear_fwd(
            x2, weight, lora_a, lora_b, scaling, g, bias, dropout_p, seed, need_m)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, s_lora, seed, g, norm,
                              u if need_m else None)
        ctx.scaling, ctx.dropout_p, ctx.magnitude_dtype = scaling, dropout_p, magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, lora_a, lora_b, s_lora, seed, g, norm, u = ctx.saved_tensors
        need_x, need_w, need_a, need_b, _, need_m, need_bias = ctx.needs_input_grad[:7]
        dy = grad_out                                                           # (M, N)
        grad_x = grad_w = grad_a = grad_b = grad_m = grad_bias = None
        if need_m:
            grad_m = torch.linalg.vecdot(dy.to(norm.dtype), u.to(norm.dtype), dim=0).div_(norm)  # (N,)
            grad_m = grad_m.to(ctx.magnitude_dtype)
        if need_bias:
            grad_bias = dy.sum(0)
        if need_x or need_w or need_a or need_b:
            du = dy * g.to(dy.dtype)                                            # (M, N) g⊙dY
            if need_x or need_a or need_b:
                dx, da, db = torch.ops.lightning_peft.lora_linear_bwd(
                    [du], x2, [weight], lora_a, [lora_b], s_lora, [ctx.scaling], ctx.dropout_p,
                    seed, need_x, need_a, need_b)
                grad_x = dx if need_x else None
                grad_a = da if need_a else None
                grad_b = db if need_b else None
            if need_w:
                grad_w = torch.mm(du.t(), x2)                                   # (N, K)
        return grad_x, grad_w, grad_a, grad_b, None, grad_m, grad_bias, None, None, None


def dora_linear_triton(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                       magnitude: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0,
                       generator: torch.Generator | None = None,
                       weight_norm_sq: Tensor | None = None) -> Tensor:
    """The Triton path of :func:`kernels.lora.dora_linear`: arguments already checked and cast by
    the caller. ``x`` (..., K), ``weight`` (N, K), ``lora_a`` (r, K), ``lora_b`` (N, r),
    ``magnitude`` (N,), ``bias`` (N,) or None."""
    shape = x.shape
    y = _DoRATriton.apply(x.reshape(-1, shape[-1]), weight, lora_a, lora_b, float(scaling),
                          magnitude, bias, float(dropout_p), generator, weight_norm_sq)  # (M, N)
    return y.view(*shape[:-1], y.shape[-1])


def _check_grouped(x, weights, lora_as, lora_bs, scalings, biases, dropout_p) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a tensor (..., in_features), got {type(x).__name__}")
    n = len(weights)
    if n == 0:
        raise ValueError("weights must hold at least one (out, in) tensor, got an empty list")
    for name, seq in (("lora_as", lora_as), ("lora_bs", lora_bs), ("scalings", scalings),
                      ("biases", biases)):
        if len(seq) != n:
            raise ValueError(f"{name} must have one entry per weight ({n}), got {len(seq)}")
    in_features = x.shape[-1]
    for i, (w, a, b, s, bias) in enumerate(zip(weights, lora_as, lora_bs, scalings, biases)):
        if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[1] != in_features:
            raise ValueError(f"weights[{i}] must be a tensor (out, {in_features}), "
                             f"got {getattr(w, 'shape', type(w).__name__)}")
        if w.dtype != x.dtype:
            raise TypeError(f"weights[{i}] dtype {w.dtype} differs from x dtype {x.dtype}; "
                            "cast one of them or run under torch.autocast")
        if a.dim() != 2 or a.shape[1] != in_features or a.shape[0] < 1:
            raise ValueError(f"lora_as[{i}] must be (r, {in_features}) with r >= 1, "
                             f"got {tuple(a.shape)}")
        if b.dim() != 2 or tuple(b.shape) != (w.shape[0], a.shape[0]):
            raise ValueError(f"lora_bs[{i}] must be ({w.shape[0]}, {a.shape[0]}), "
                             f"got {tuple(b.shape)}")
        if not isinstance(s, (int, float)) or isinstance(s, bool):
            raise TypeError(f"scalings[{i}] must be a float, got {type(s).__name__}")
        if bias is not None and tuple(bias.shape) != (w.shape[0],):
            raise ValueError(f"biases[{i}] must be ({w.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def lora_linear_grouped(x: Tensor, weights: list[Tensor], lora_as: list[Tensor],
                        lora_bs: list[Tensor], scalings: list[float],
                        biases: list[Tensor | None] | None = None, dropout_p: float = 0.0,
                        generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """LoRA linears that share their input (q/k/v, gate/up), with x read once for all the A's.

    ``y_i = x·W_iᵀ + s_i·(dropout(x)·A_iᵀ)·B_iᵀ + b_i`` for each member, with autograd; the
    members share one dropout mask. ``weights[i]`` (N_i, K), ``lora_as[i]`` (r_i, K),
    ``lora_bs[i]`` (N_i, r_i), ``biases[i]`` (N_i,) or None. Biases are cast to ``x.dtype``,
    adapters too unless they are wider (fp32 ``A``, ``B`` on a bf16/fp16 base): then the rank-r
    products run in their dtype and they get gradients in it. Under ``torch.autocast`` everything
    runs in the autocast dtype. Runs the Triton kernels (CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``).
    """
    weights, lora_as, lora_bs = list(weights), list(lora_as), list(lora_bs)
    scalings = list(scalings)
    biases = [None] * len(weights) if biases is None else list(biases)
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    if isinstance(x, Tensor) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return lora_linear_grouped(x.to(dtype), [w.to(dtype) for w in weights],
                                       [a.to(dtype) for a in lora_as],
                                       [b.to(dtype) for b in lora_bs], scalings, biases,
                                       dropout_p, generator)
    _check_grouped(x, weights, lora_as, lora_bs, scalings, biases, dropout_p)
    branch = _branch_dtype(x.dtype, *lora_as, *lora_bs)
    lora_as = [a.to(branch) for a in lora_as]
    lora_bs = [b.to(branch) for b in lora_bs]
    biases = [None if b is None else b.to(x.dtype) for b in biases]
    lora_a = lora_as[0] if len(lora_as) == 1 else torch.cat(lora_as, dim=0)     # (Σr, K)
    return _apply(x, weights, lora_a, lora_bs, scalings, biases, float(dropout_p), generator)


def dropout_keep_mask(seed: Tensor, rows: int, cols: int, dropout_p: float) -> Tensor:
    """The (rows, cols) bool keep-mask the kernels derive from ``seed`` (a (1,) int64 tensor)."""
    out = torch.empty((rows, cols), dtype=torch.int8, device=seed.device)
    bm, bn = 32, 64
    if rows > 0 and cols > 0:
        _launch(_mask_kernel, (triton.cdiv(rows, bm), triton.cdiv(cols, bn)),
                seed, out, rows, cols, _threshold(dropout_p),
                INT64=rows * cols >= _INT32_LIMIT, BM=bm, BN=bn)
    return out.bool()


# ----------------------------------------------------------------------------------------------
# Reference (specification of lora_linear_grouped; to move into kernels/lora.py)
# ----------------------------------------------------------------------------------------------


def lora_linear_grouped_reference(x: Tensor, weights: list[Tensor], lora_as: list[Tensor],
                                  lora_bs: list[Tensor], scalings: list[float],
                                  biases: list[Tensor | None] | None = None,
                                  dropout_p: float = 0.0,
                                  generator: torch.Generator | None = None,
                                  ) -> tuple[Tensor, ...]:
    """Pure-PyTorch grouped LoRA: one dropout mask shared by the members, autograd by torch."""
    biases = [None] * len(weights) if biases is None else list(biases)
    xd = x
    if dropout_p > 0.0:
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - dropout_p,
                                                                 generator=generator)
        xd = x * keep / (1.0 - dropout_p)
    branch = _branch_dtype(x.dtype, *lora_as, *lora_bs)  # x's, or the adapters' when wider
    xd = xd.to(branch)
    outs = []
    for w, a, b, s, bias in zip(weights, lora_as, lora_bs, scalings, biases):
        a, b = a.to(branch), b.to(branch)
        y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
        lowrank = s * torch.nn.functional.linear(torch.nn.functional.linear(xd, a), b)
        outs.append((y + lowrank).to(x.dtype))
    return tuple(outs)
