"""The NF4 dequantizer's CPU loop in C, compiled once per machine (:mod:`kernels._native`).

One pass over the packed bytes writes ``c[nibble]·absmax[block]`` (one fp32 product, then rounded to
the output dtype: round to nearest even, as torch's casts do) straight into the output, which
torch's ops cannot do without several passes over (n,)-sized temporaries. Built with ``-O3
-march=native`` so the compiler vectorizes the loop for the CPU it runs on, and
``-ffp-contract=off`` so no product is fused with anything. Without a working compiler (or with
``LIGHTNING_PEFT_NF4_NATIVE=0``) :func:`library` returns ``None`` and :mod:`kernels.nf4` keeps its
Torch path. The calls release the GIL (ctypes), so several threads may run chunks of one weight at
once.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kernels import _native

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* fp32 -> bf16, round to nearest even; NaN -> 0x7fc0 (what torch's cast gives). */
static inline uint16_t to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* Blocks [b0, b1) of bs elements (bs even): out[b·bs + 2j + k] = code[nibble k of byte j]·absmax[b],
   the first element in the high nibble. */
#define NF4_LOOP(NAME, T, CONVERT)                                                       \
  void NAME(const uint8_t *restrict packed, const float *restrict absmax,                \
            const float *restrict code, T *restrict out, int64_t b0, int64_t b1,         \
            int64_t bs) {                                                                 \
    float c[16];                                                                          \
    memcpy(c, code, sizeof c);                                                            \
    const int64_t half = bs / 2;                                                          \
    for (int64_t b = b0; b < b1; b++) {                                                   \
      const float s = absmax[b];                                                          \
      const uint8_t *p = packed + b * half;                                               \
      T *o = out + b * bs;                                                                \
      for (int64_t j = 0; j < half; j++) {                                                \
        const uint8_t v = p[j];                                                           \
        o[2 * j] = CONVERT(c[v >> 4] * s);                                                \
        o[2 * j + 1] = CONVERT(c[v & 15] * s);                                            \
      }                                                                                   \
    }                                                                                     \
  }

#define AS_IS(x) (x)
NF4_LOOP(nf4_dequantize_f32, float, AS_IS)
NF4_LOOP(nf4_dequantize_bf16, uint16_t, to_bf16)
#ifdef NF4_HAVE_FLOAT16
#define TO_F16(x) ((_Float16)(x))
NF4_LOOP(nf4_dequantize_f16, _Float16, TO_F16)
#endif
"""

_ARCH_ENV = "LIGHTNING_PEFT_NF4_MARCH"


def flags() -> tuple[str, ...]:
    """The compiler flags: ``-march=native`` unless ``LIGHTNING_PEFT_NF4_MARCH`` names another
    target (e.g. ``x86-64-v3``, AVX2, to measure what an AVX2 CPU would run)."""
    return ("-O3", _native.march(_ARCH_ENV), "-ffp-contract=off", "-fPIC", "-shared")


_FALLBACK_FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared")
_ENV = "LIGHTNING_PEFT_NF4_NATIVE"


class _Library:
    """The compiled loops, one per output dtype (fp16 only where the compiler has ``_Float16``)."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.functions: dict[torch.dtype, ctypes._CFuncPtr] = {}
        for dtype, name in ((torch.float32, "nf4_dequantize_f32"),
                            (torch.bfloat16, "nf4_dequantize_bf16"),
                            (torch.float16, "nf4_dequantize_f16")):
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
            fn.restype = None
            self.functions[dtype] = fn


def _build() -> _Library | None:
    variants = [(("#define NF4_HAVE_FLOAT16 1\n" if fp16 else "") + _SOURCE, opts)
                for opts in (flags(), _FALLBACK_FLAGS) for fp16 in (True, False)]
    built = _native.build("nf4_cpu", variants)
    return None if built is None else _Library(built[0], built[1])


library = _native.loader(_ENV, _build)
"""The compiled loops (built on the first call, a fraction of a second), or ``None``."""


def dequantize_blocks(lib: _Library, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                      out: torch.Tensor, b0: int, b1: int, blocksize: int) -> None:
    """Write full blocks ``[b0, b1)`` of ``out`` (contiguous, flat) from ``packed`` and the fp32
    ``absmax`` (both contiguous); the caller keeps all tensors alive and checked."""
    lib.functions[out.dtype](packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), out.data_ptr(),
                             b0, b1, blocksize)
