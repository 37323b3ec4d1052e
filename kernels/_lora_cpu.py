"""LoRA's ``dS``/``dB`` pair on a CPU in one pass over ``dY``, a C loop compiled once per machine.

The backward of ``y = x·W0ᵀ + (s·S)·Bᵀ`` (:mod:`kernels.lora`) needs, from the output gradient
``dY`` (M, N), both

    dS = c·dY·B        (M, r)      c = s, or s/(1-p) with dropout
    dB = dYᵀ·(s·S)     (N, r)

Two BLAS calls read ``dY`` twice, and inside a model ``dY`` is no longer in the L2 cache the second
time: in a SmolLM2-135M training step (r=16 on seven projections, 384 tokens) the pairs of GEMMs
took 36 ms against this loop's 25 ms at 2 threads, 57 against 42 ms at 1 thread. Here one loop
reads each row block of ``dY`` once (``MB`` rows at a time, ``MB`` chosen so the row block's
accumulators stay in vector registers) and updates both: for every column ``n`` it loads ``B[n]`` and
``dB[n]``, and for every row ``m`` of the block does ``dS[m] += dY[m,n]·B[n]`` and
``dB[n] += dY[m,n]·S[m]``, vectorised along ``r``. The rank must be one vector wide: r=16 with
AVX-512, r=8 with AVX2 or older. Wider ranks take the two GEMMs, which measured as fast or faster in
a training step: r=32 with AVX-512, +23.4% against +22.7% for the GEMMs over the frozen SmolLM2
step; r=16 with the Xeon forced to AVX2, +16.6% against +14.4% (2 threads; at 1 thread +13.0%
against +10.6%), where r=8 on AVX2 gains (+13.5% against +14.9%), as r=16 on AVX-512 does.
(Before this rule the loop also took ranks of several vectors, kept in arrays GCC did not hold in
registers, and ran 5-20x slower than the GEMMs there.) With OpenMP, rows are split over
torch's threads, each thread sums its own ``dB`` and the partial sums are added at the end.

OpenMP is only used when the OpenMP runtime in the process is torch's GNU ``libgomp.so.1`` (the
library then shares torch's thread pool instead of starting a second one); otherwise the loop is
built without it and used only where torch runs one thread. ``LIGHTNING_PEFT_LORA_NATIVE=0``
switches the loop off (the BLAS path is then the only one). Only float32 is handled; the sums are
float32 in a different order than the BLAS, so results agree with it to rounding, not bit for bit.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import torch
from torch import Tensor

from kernels import _native

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#define VBYTES 64
#define NREGS 32
#else
#define VBYTES 32
#define NREGS 16
#endif
#define LANES (VBYTES / 4)
typedef float vf __attribute__((vector_size(VBYTES)));

/* Rows [m0, m1) of dY (row stride ldy, N columns): dS[m] = scale * sum_n dY[m,n] B[n] (row stride
   lds) and dB[n] += sum_m dY[m,n] S[m] (S row stride ldS), every row of B, S, dS, dB being one
   vector (LANES floats: the rank). MB rows at a time, their dS sums and S rows held in registers
   while every column n loads B[n] and dB[n]. A last block of fewer rows is copied into a
   zero-padded MB-row buffer first (its zero S rows add nothing to dB, and only its real rows of
   dS are stored). Returns 1 if that buffer cannot be allocated. */
enum { MB = (NREGS - 3) / 2 > 8 ? 8 : (NREGS - 3) / 2 };

static int rows(const float *restrict dy, int64_t ldy, int64_t m0, int64_t m1, int64_t N,
                const float *restrict B, const float *restrict S, int64_t ldS, float scale,
                float *restrict dS, int64_t lds, float *restrict dB) {
  float *pad = 0;
  for (; m0 < m1; m0 += MB) {
    const int64_t mb = m1 - m0 < MB ? m1 - m0 : MB;
    const float *d0 = dy + m0 * ldy;
    int64_t ld = ldy;
    if (mb < MB) {
      pad = calloc((size_t)(MB * N), sizeof(float));
      if (!pad) return 1;
      for (int64_t j = 0; j < mb; j++) memcpy(pad + j * N, d0 + j * ldy, N * sizeof(float));
      d0 = pad;
      ld = N;
    }
    vf acc[MB], sv[MB];
    memset(acc, 0, sizeof acc);
    memset(sv, 0, sizeof sv);
    for (int64_t j = 0; j < mb; j++) memcpy(&sv[j], S + (m0 + j) * ldS, VBYTES);
    for (int64_t n = 0; n < N; n++) {
      vf b, db;
      memcpy(&b, B + n * LANES, VBYTES);
      memcpy(&db, dB + n * LANES, VBYTES);
      _Pragma("GCC unroll 16") for (int j = 0; j < MB; j++) {
        const float d = d0[j * ld + n];
        acc[j] += d * b;
        db += d * sv[j];
      }
      memcpy(dB + n * LANES, &db, VBYTES);
    }
    for (int64_t j = 0; j < mb; j++) {
      acc[j] *= scale;
      memcpy(dS + (m0 + j) * lds, &acc[j], VBYTES);
    }
  }
  free(pad);
  return 0;
}

int lora_lanes(void) { return LANES; }

int lora_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

/* dS (M, r; row stride lds) = scale * dY B and dB (N, r, contiguous) = dY^T S over nt threads;
   partial holds (nt - 1) * N * r floats of per-thread sums. Returns 1 for an unsupported r, 2 when
   out of memory. */
int lora_ds_db_f32(const float *dy, int64_t ldy, int64_t M, int64_t N, const float *B,
                   const float *S, int64_t ldS, int64_t r, float scale, float *dS, int64_t lds,
                   float *dB, float *partial, int nt) {
  if (r != LANES) return 1;
  int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
  {
    int t = 0, T = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    T = omp_get_num_threads();
#endif
    float *mine = t == 0 ? dB : partial + (int64_t)(t - 1) * N * r;
    memset(mine, 0, sizeof(float) * N * r);
    const int64_t m0 = M * t / T, m1 = M * (t + 1) / T;
    if (m0 < m1) failed |= rows(dy, ldy, m0, m1, N, B, S, ldS, scale, dS, lds, mine);
#pragma omp barrier
    const int64_t i0 = N * r * t / T, i1 = N * r * (t + 1) / T;
    for (int u = 1; u < T; u++) {
      const float *p = partial + (int64_t)(u - 1) * N * r;
      for (int64_t i = i0; i < i1; i++) dB[i] += p[i];
    }
  }
  return failed ? 2 : 0;
}
"""

ENV = "LIGHTNING_PEFT_LORA_NATIVE"
_ARCH_ENV = "LIGHTNING_PEFT_LORA_MARCH"


def flags() -> tuple[str, ...]:
    """The compiler flags: ``-march=native`` unless ``LIGHTNING_PEFT_LORA_MARCH`` names another
    target (e.g. ``x86-64-v3``, AVX2, to measure what an AVX2 CPU would run)."""
    return ("-O3", _native.march(_ARCH_ENV), "-fPIC", "-shared")


_FALLBACK_FLAGS = ("-O3", "-fPIC", "-shared")
_PARALLEL_MIN = 32768
"""Fewer elements of ``dY`` than this run on one thread (the fork/join would cost more)."""


def _torch_libgomp() -> bool:
    """Whether the OpenMP runtime loaded in this process is one GNU ``libgomp.so.1`` (what the
    PyPI torch wheels ship), so that a library built with ``-fopenmp`` binds to the same runtime
    and thread pool instead of loading a second one."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    loaded = {line.split()[-1] for line in maps.splitlines()
              if re.match(r"lib[gi]?omp[0-9]*\.so", line.rsplit("/", 1)[-1])}
    return len(loaded) == 1 and Path(next(iter(loaded))).name == "libgomp.so.1"


class _Library:
    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.lanes = int(lib.lora_lanes())
        self.openmp = bool(lib.lora_openmp())
        fn = lib.lora_ds_db_f32
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int]
        fn.restype = ctypes.c_int
        self.ds_db = fn

    def supports(self, r: int) -> bool:
        """Whether the loop takes rank ``r``: one vector wide (see the module docstring)."""
        return r == self.lanes


def _build() -> _Library | None:
    openmp = (("-fopenmp",),) if _torch_libgomp() else ()
    variants = [(_SOURCE, options + extra) for options in (flags(), _FALLBACK_FLAGS)
                for extra in (*openmp, ())]
    built = _native.build("lora_cpu", variants)
    return None if built is None else _Library(built[0], built[1])


library = _native.loader(ENV, _build)
"""The compiled loop (built on the first call, well under a second), or ``None``."""


def ds_db(dy: Tensor, lora_b: Tensor, s_lora: Tensor, scale: float, out: Tensor | None = None
          ) -> tuple[Tensor, Tensor] | None:
    """``(dS, dB)`` = ``(scale·dY·B, dYᵀ·s_lora)`` in one pass over ``dY`` (M, N), with ``lora_b``
    (N, r) and ``s_lora`` (M, r); ``dS`` written into ``out`` (an (M, r) view with unit column
    stride) when given, ``dB`` a fresh contiguous (N, r). ``None`` where the loop does not apply
    (no compiler, switched off, not float32 on a CPU, an unsupported rank or layout, or several
    torch threads without OpenMP): the caller then takes the BLAS path."""
    lib = library()
    return None if lib is None else run(lib, dy, lora_b, s_lora, scale, out)


def run(lib: _Library, dy: Tensor, lora_b: Tensor, s_lora: Tensor, scale: float,
        out: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """:func:`ds_db` through a given build of the loop."""
    if dy.device.type != "cpu" or dy.dim() != 2:
        return None
    m, n = dy.shape
    r = lora_b.shape[1]
    if not lib.supports(r) or m == 0 or n == 0 or not all(
            t.dtype == torch.float32 for t in (dy, lora_b, s_lora)):
        return None
    if dy.stride(1) != 1 or not lora_b.is_contiguous() or s_lora.stride(1) != 1 \
            or tuple(s_lora.shape) != (m, r) or tuple(lora_b.shape) != (n, r):
        return None
    threads = torch.get_num_threads() if m * n >= _PARALLEL_MIN else 1
    if threads > 1 and not lib.openmp:
        return None
    if out is None:
        out = torch.empty((m, r), dtype=torch.float32)
    elif tuple(out.shape) != (m, r) or out.stride(1) != 1 or out.dtype != torch.float32:
        return None
    grad_b = torch.empty((n, r), dtype=torch.float32)
    partial = torch.empty(max(threads - 1, 0) * n * r + 1, dtype=torch.float32)
    status = lib.ds_db(dy.data_ptr(), dy.stride(0), m, n, lora_b.data_ptr(), s_lora.data_ptr(),
                       s_lora.stride(0), r, float(scale), out.data_ptr(), out.stride(0),
                       grad_b.data_ptr(), partial.data_ptr(), threads)
    if status != 0:
        raise MemoryError(f"the compiled LoRA dS/dB loop could not allocate {n} floats per row "
                          "for its last row block")
    return out, grad_b
