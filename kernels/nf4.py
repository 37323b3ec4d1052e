"""NF4 4-bit weights, bit-compatible with bitsandbytes: quantize, dequantize, ``y = x·Wᵀ + b``.

NF4 (NormalFloat4, QLoRA: Dettmers et al., 2023, arXiv 2305.14314) stores each weight as one of
16 code values ``c[0..15]`` (quantiles of N(0, 1), scaled into [-1, 1]) times a per-block scale.
The format is exactly the one bitsandbytes writes: quantizing gives byte for byte the packed codes,
absmax, nested absmax and offset of bitsandbytes 0.50.2's ``quantize_4bit`` (CPU), and
dequantizing is bit for bit the formula ``w'`` below on those bytes, which is what bitsandbytes'
PyTorch dequantize computes (its native AVX-512 CPU kernel returns other values when a row ends
inside a block, e.g. a (48, 80) weight at blocksize 128). With ``w`` the flattened row-major
weight of ``n`` elements (all finite) and ``B`` the blocksize (32, 64, ..., 4096; 64 by default):

    absmax[b] = max_i |w[bB + i]|                           fp32, one per block (ceil(n/B),)
    s         = clamp(w[i] · (1 / absmax[b]), -1, 1)        full blocks (a zero absmax reads 1e-38)
    s         = clamp(w[i] / max(absmax[b], 1e-38), -1, 1)  the partial last block, whose stored
                                                            absmax is the clamped value
    q[i]      = #{ k : s > (c[k] + c[k+1]) / 2 }           nearest code; a tie goes to the lower
    byte[j]   = (q[2j] << 4) | q[2j+1]                      first element in the high nibble; an odd
                                                            n pads q[n] = 7 (the code of 0.0)
    w'[i]     = c[q[i]] · absmax[i // B]                   fp32 product, then rounded to the dtype

Double quantization (``double_quant=True``, bitsandbytes' ``compress_statistics``) stores absmax
as 8 bits with bitsandbytes' signed dynamic map ``d[0..255]`` in blocks of 256 absmax values:

    offset   = mean(absmax)                                fp32 scalar
    v        = absmax - offset ;  a2[g] = max |v[256g:256g+256]|          fp32 (ceil(blocks/256),)
    qa[b]    = L[trunc(((clamp(v[b] / a2[g], -1, 1) + 1) · 0.5) · 65535 + 0.5)]   uint8; 0 if a2 = 0
    L[t]     = #{ k : (d[k] + d[k+1]) / 2 < -1 + 2t/65535 }   bitsandbytes' CPU 65536-entry table
    absmax'  = d[qa[b]] · a2[b // 256] + offset            two fp32 roundings, never fused

(The CUDA build of bitsandbytes picks the exactly nearest ``d[k]`` instead of going through ``L``;
the two differ within one table step, 2/65535, of a midpoint, which covers much of |s| < 1e-4,
where the codes are denser than the table.) The serialized form is that of
``bitsandbytes.nn.Linear4bit``: ``weight`` (packed bytes ``((n+1)//2, 1)``), ``weight.absmax``,
``weight.quant_map`` (c), ``weight.nested_absmax`` (a2), ``weight.nested_quant_map`` (d) and
``weight.quant_state.bitsandbytes__nf4`` (JSON with type, blocksize, dtype, shape, offset).

Matmul: ``nf4_linear(x, q, b) = x·dequant(q)ᵀ + b`` with ``dX = dY·dequant(q)``; the weight gets
no gradient. On the Triton path, ``M <= 16`` rows run a fused kernel that reads the 4-bit bytes
straight into the dot product; larger ``M`` dequantizes into a reused buffer and calls the GEMM.
Every op may be called from several threads at once: the reused buffers are per thread (and CUDA
stream), never shared. This file is the specification and CPU fallback; :mod:`kernels._nf4_triton`
holds the kernels.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from kernels import _backend, _nf4_cpu

__all__ = [
    "BLOCKSIZES",
    "NF4Tensor",
    "dequantize_nf4",
    "nf4_dense_for_matmul",
    "nf4_linear",
    "nf4_linear_reference",
    "quantize_nf4",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NESTED_BLOCKSIZE = 256
_QS_KEY = "quant_state.bitsandbytes__nf4"

# The 16 NF4 code values, as bitsandbytes hard-codes them (sorted ascending, c[7] = 0).
_NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# Elements per step of the Torch dequantizer on a CPU: under torch's parallel grain size (32768),
# so every op runs inline on the calling thread and its temporaries stay in cache.
_CPU_CHUNK = 32767


def _dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), 256 sorted fp32 values.

    For exponent ``e = 0..6`` it holds ``±10^(e-6)`` times the midpoints of ``2^e + 1`` points
    evenly spaced over [0.1, 1], plus 0 and 1.
    """
    values: list[float] = []
    for e in range(7):
        points = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (points[:-1] + points[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist()
        values += (-(10 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


class _Tables:
    """Per-device constant tables shared by the Torch and Triton paths."""

    def __init__(self, device: torch.device) -> None:
        code = torch.tensor(_NF4_CODE, dtype=torch.float32)
        byte = torch.arange(256)
        self.code = code.to(device)                                        # (16,) c
        self.bounds = ((code[:-1] + code[1:]) / 2).to(device)              # (15,) midpoints of c
        # pair[byte] holds (c[byte >> 4], c[byte & 15]) as two fp32 in one int64 (low word first)
        pair = torch.stack([code[byte >> 4], code[byte & 15]], 1)           # (256, 2)
        self.pair = pair.contiguous().view(torch.int64).view(256).to(device)  # (256,)
        # quads[v] for the uint16 word v read from bytes (first, second) holds the codes of its
        # 4 nibbles in element order: (c[first >> 4], c[first & 15], c[second >> 4], ...)
        word = torch.arange(65536)
        first, second = (word & 255, word >> 8) if sys.byteorder == "little" else (word >> 8,
                                                                                    word & 255)
        quads = torch.stack([code[first >> 4], code[first & 15], code[second >> 4],
                             code[second & 15]], 1)                        # (65536, 4)
        self.quads = quads.contiguous().view(torch.complex128).view(65536).to(device)
        dyn = _dynamic_map()
        self.dynamic = dyn.to(device)                                      # (256,) d
        mid = 0.5 * (dyn[:-1] + dyn[1:])                                   # (255,)
        grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
        lut = torch.searchsorted(mid, grid, right=False)                   # #{mid < grid}
        self.lut = lut.to(torch.uint8).to(device)                          # (65536,) L


@functools.cache
def _tables(device: torch.device) -> _Tables:
    return _Tables(device)


class NF4Tensor:
    """A weight in bitsandbytes' NF4 format (see the module docstring for the exact layout).

    Attributes:
        packed: uint8 ``((numel + 1) // 2,)``, two codes per byte, first in the high nibble.
        absmax: fp32 ``(blocks,)`` scales, or uint8 ``(blocks,)`` codes when double-quantized.
        nested_absmax: fp32 ``(ceil(blocks / 256),)`` scales of the absmax codes, or ``None``.
        nested_code: fp32 ``(256,)`` map of the absmax codes (the dynamic map), or ``None``.
        nested_offset: fp32 0-d tensor added back to the absmax, or ``None``.
        shape: the logical shape (``(out, in)`` for a linear weight).
        dtype: the dtype the weight had before quantization (the default dequantize dtype).
        blocksize: elements per absmax block.
    """

    def __init__(self, packed: Tensor, absmax: Tensor, shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype, blocksize: int, nested_absmax: Tensor | None = None,
                 nested_code: Tensor | None = None, nested_offset: Tensor | None = None) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.packed = packed
        self.absmax = absmax
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.nested_offset = nested_offset
        self._validate()

    def _validate(self) -> None:
        if self.dtype not in _DTYPES:
            raise TypeError(f"NF4Tensor dtype must be one of {_DTYPES}, got {self.dtype}")
        _check_blocksize(self.blocksize)
        n = self.numel()
        if n == 0:
            raise ValueError(f"NF4Tensor shape must have at least one element, got {self.shape}")
        blocks = -(-n // self.blocksize)
        _check_tensor("packed", self.packed, torch.uint8, ((n + 1) // 2,))
        device = self.packed.device
        nested = (self.nested_absmax, self.nested_code, self.nested_offset)
        if all(t is None for t in nested):
            _check_tensor("absmax", self.absmax, torch.float32, (blocks,), device)
        elif any(t is None for t in nested):
            raise ValueError("nested_absmax, nested_code and nested_offset must be given together "
                             "(double quantization) or all be None")
        else:
            _check_tensor("absmax", self.absmax, torch.uint8, (blocks,), device)
            groups = -(-blocks // _NESTED_BLOCKSIZE)
            _check_tensor("nested_absmax", self.nested_absmax, torch.float32, (groups,), device)
            _check_tensor("nested_code", self.nested_code, torch.float32, (256,), device)
            _check_tensor("nested_offset", self.nested_offset, torch.float32, (), device)

    # ----------------------------------------------------------------------------- properties
    @property
    def double_quant(self) -> bool:
        """Whether the absmax is itself quantized to 8 bits."""
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: packed codes plus all quantization statistics."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel()

    def _tensors(self) -> dict[str, Tensor]:
        names = ("packed", "absmax", "nested_absmax", "nested_code", "nested_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize="
                f"{self.blocksize}, double_quant={self.double_quant}, device={self.device}, "
                f"nbytes={self.nbytes})")

    # ----------------------------------------------------------------------------- conversion
    def dequantize(self, dtype: torch.dtype | None = None, out: Tensor | None = None) -> Tensor:
        """The dense weight, ``self.shape``, in ``dtype`` (default: the original dtype)."""
        return dequantize_nf4(self, dtype, out=out)

    def to(self, device: torch.device | str | int | None = None, non_blocking: bool = False
           ) -> NF4Tensor:
        """A copy on ``device`` (``self`` when it is already there). The dtype never changes."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"NF4Tensor.to takes a device, got the dtype {device}; use "
                            "dequantize(dtype) for a dense tensor of that dtype")
        if device is None:
            return self
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self._tensors().items()}
        return NF4Tensor(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize, **moved)

    def cpu(self) -> NF4Tensor:
        return self.to("cpu")

    def cuda(self, device: int | str | None = None) -> NF4Tensor:
        return self.to("cuda" if device is None else torch.device("cuda", device)
                       if isinstance(device, int) else device)

    def _json(self) -> dict[str, Any]:
        """The non-tensor quant state, key for key as bitsandbytes' ``QuantState.as_dict``."""
        meta: dict[str, Any] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.double_quant:
            meta.update(nested_blocksize=_NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=self.nested_offset.item())
        return meta

    def to_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The keys ``bitsandbytes.nn.Linear4bit`` writes for its weight, under ``prefix``.

        ``prefix`` is the module's prefix (``"model.layers.0.q_proj."``); the keys are
        ``{prefix}weight``, ``{prefix}weight.absmax``, ``{prefix}weight.quant_map``, with double
        quantization ``{prefix}weight.nested_absmax`` and ``{prefix}weight.nested_quant_map``, and
        ``{prefix}weight.quant_state.bitsandbytes__nf4`` (the JSON state as uint8).
        """
        w = prefix + "weight"
        sd = {w: self.packed.view(-1, 1), f"{w}.absmax": self.absmax,
              f"{w}.quant_map": _tables(self.device).code.clone()}
        if self.double_quant:
            sd[f"{w}.nested_absmax"] = self.nested_absmax
            sd[f"{w}.nested_quant_map"] = self.nested_code.clone()
        blob = json.dumps(self._json()).encode("utf-8")
        sd[f"{w}.{_QS_KEY}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str = "") -> NF4Tensor:
        """Read the weight keys a ``bitsandbytes.nn.Linear4bit`` serialized (see :meth:`to_state_dict`)."""
        w = prefix + "weight"
        missing = [k for k in (w, f"{w}.absmax", f"{w}.{_QS_KEY}") if k not in state_dict]
        if missing:
            other = [k for k in state_dict if k.startswith(f"{w}.quant_state.")]
            hint = f"; found {other} (only nf4 is supported)" if other else ""
            raise ValueError(f"state_dict lacks the NF4 keys {missing} under prefix {prefix!r}"
                             f"{hint}")
        blob = state_dict[f"{w}.{_QS_KEY}"]
        meta = json.loads(bytes(blob.cpu().to(torch.uint8).tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"quant_type must be 'nf4', got {meta.get('quant_type')!r}")
        packed = state_dict[w]
        _check_quant_map(state_dict.get(f"{w}.quant_map"))
        nested = {}
        if "nested_offset" in meta or f"{w}.nested_absmax" in state_dict:
            if meta.get("nested_blocksize") != _NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {_NESTED_BLOCKSIZE}, got "
                                 f"{meta.get('nested_blocksize')!r}")
            for key in ("nested_absmax", "nested_quant_map"):
                if f"{w}.{key}" not in state_dict:
                    raise ValueError(f"state_dict lacks {w}.{key} for a double-quantized weight")
            nested = dict(nested_absmax=state_dict[f"{w}.nested_absmax"],
                          nested_code=state_dict[f"{w}.nested_quant_map"],
                          nested_offset=torch.tensor(float(meta["nested_offset"]),
                                                     dtype=torch.float32, device=packed.device))
        return cls(packed=_as_bytes(packed), absmax=state_dict[f"{w}.absmax"],
                   shape=tuple(meta["shape"]), dtype=_parse_dtype(meta["dtype"]),
                   blocksize=meta["blocksize"], **nested)

    @classmethod
    def from_bitsandbytes(cls, packed: Tensor, quant_state: Any) -> NF4Tensor:
        """Wrap bitsandbytes' ``quantize_4bit(..., quant_type="nf4")`` output (no copy)."""
        if getattr(quant_state, "quant_type", None) != "nf4":
            raise ValueError(f"quant_state.quant_type must be 'nf4', got "
                             f"{getattr(quant_state, 'quant_type', None)!r}")
        _check_quant_map(quant_state.code)
        nested = {}
        if quant_state.nested:
            if quant_state.state2.blocksize != _NESTED_BLOCKSIZE:
                raise ValueError(f"quant_state.state2.blocksize must be {_NESTED_BLOCKSIZE}, got "
                                 f"{quant_state.state2.blocksize}")
            nested = dict(nested_absmax=quant_state.state2.absmax,
                          nested_code=quant_state.state2.code,
                          nested_offset=torch.as_tensor(quant_state.offset, dtype=torch.float32,
                                                        device=packed.device).reshape(()))
        return cls(packed=_as_bytes(packed), absmax=quant_state.absmax, shape=quant_state.shape,
                   dtype=quant_state.dtype, blocksize=quant_state.blocksize, **nested)

    def to_bitsandbytes(self) -> tuple[Tensor, Any]:
        """``(packed ((n+1)//2, 1) uint8, bitsandbytes.functional.QuantState)`` sharing storage."""
        from bitsandbytes.functional import QuantState

        state2 = offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code,
                                blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32)
            offset = self.nested_offset
        state = QuantState(absmax=self.absmax, shape=self.shape, code=_tables(self.device).code,
                           blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                           offset=offset, state2=state2)
        return self.packed.view(-1, 1), state


# --------------------------------------------------------------------------------- validation
def _check_blocksize(blocksize: Any) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def _check_tensor(name: str, t: Any, dtype: torch.dtype, shape: tuple[int, ...],
                  device: torch.device | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but packed is on {device}")


def _check_quant_map(code: Tensor | None) -> None:
    if code is None:
        return
    expected = torch.tensor(_NF4_CODE, dtype=torch.float32)
    if code.numel() != 16 or not torch.equal(code.detach().float().cpu().reshape(16), expected):
        raise ValueError("quant_map is not the NF4 code (only quant_type='nf4' is supported)")


def _as_bytes(packed: Tensor) -> Tensor:
    """bitsandbytes' packed weight (any ``quant_storage`` dtype, shape ``(k, 1)``) as flat uint8."""
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    packed = packed.detach().contiguous()
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    return packed.view(-1)


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if dtype not in _DTYPES:
        raise TypeError(f"dtype in the quant state must be one of {_DTYPES}, got {name!r}")
    return dtype


def _check_dtype(dtype: Any, what: str = "dtype") -> torch.dtype:
    if dtype not in _DTYPES:
        raise TypeError(f"{what} must be one of {_DTYPES}, got {dtype}")
    return dtype


def _check_nf4(q: Any, what: str = "q") -> NF4Tensor:
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"{what} must be an NF4Tensor (from quantize_nf4), got {type(q).__name__}")
    return q


# ------------------------------------------------------------------------- Torch reference
def _quantize_torch(w: Tensor, blocksize: int, double_quant: bool) -> NF4Tensor:
    tables = _tables(w.device)
    x = w.reshape(-1).float()                                          # (n,)
    n = x.numel()
    full_blocks, rem = divmod(n, blocksize)
    full = full_blocks * blocksize
    blocks = full_blocks + (rem > 0)
    scaled = torch.empty(n + (n & 1), dtype=torch.float32, device=w.device)  # even length
    scaled[n:] = 0.0
    absmax = torch.empty(blocks, dtype=torch.float32, device=w.device)
    xb = x[:full].view(full_blocks, blocksize)                         # (full_blocks, B)
    torch.amax(xb.abs(), dim=1, out=absmax[:full_blocks])
    inv = 1.0 / absmax[:full_blocks].clamp(min=1e-38)                  # (full_blocks,)
    torch.mul(xb, inv[:, None], out=scaled[:full].view(full_blocks, blocksize))
    if rem:
        am = x[full:].abs().amax().clamp(min=1e-38)                    # () partial block
        absmax[-1] = am
        torch.div(x[full:], am, out=scaled[full:n])
    _check_finite(w, absmax)
    scaled.clamp_(-1.0, 1.0)
    codes = torch.bucketize(scaled, tables.bounds, out_int32=True).to(torch.uint8)  # (n_even,)
    packed = (codes[0::2] << 4) | codes[1::2]                          # ((n+1)//2,)
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    offset = _nested_offset(absmax)                                    # () fp32
    qabs, nested = _quantize_absmax_torch(absmax - offset, tables)
    return NF4Tensor(packed, qabs, w.shape, w.dtype, blocksize, nested_absmax=nested,
                     nested_code=tables.dynamic.clone(), nested_offset=offset)


def _nested_offset(absmax: Tensor) -> Tensor:
    """The mean of the blocks' maxima, which double quantization subtracts before its 8-bit
    quantization; a ``ValueError`` where it overflows float32 (maxima near fp32's limit)."""
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):
        raise ValueError(f"w's block maxima (up to {float(absmax.max()):.3g}) overflow float32 in their "
                         f"mean, which double quantization subtracts; scale w down or pass "
                         f"double_quant=False")
    return offset


def _quantize_absmax_torch(v: Tensor, tables: _Tables) -> tuple[Tensor, Tensor]:
    """8-bit blockwise (256) quantization of ``v`` as bitsandbytes' CPU kernel does it."""
    blocks = v.numel()
    groups = -(-blocks // _NESTED_BLOCKSIZE)
    vp = torch.zeros(groups * _NESTED_BLOCKSIZE, dtype=torch.float32, device=v.device)
    vp[:blocks] = v
    vp = vp.view(groups, _NESTED_BLOCKSIZE)                            # (groups, 256)
    a2 = vp.abs().amax(dim=1)                                          # (groups,)
    inv = torch.where(a2 == 0, 0.0, 1.0 / a2)                          # (groups,)
    t = (vp * inv[:, None]).clamp_(-1.0, 1.0)
    idx = (((t + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int32)          # trunc: (groups, 256)
    q = tables.lut[idx.view(-1)].view(groups, _NESTED_BLOCKSIZE)
    q.masked_fill_((a2 == 0)[:, None], 0)
    return q.view(-1)[:blocks].clone(), a2


def _absmax_torch(q: NF4Tensor) -> Tensor:
    """The fp32 per-block scales, reconstructing double-quantized ones: ``d[qa]·a2 + offset``.

    Works in steps of whole 256-groups below torch's CPU grain size (see :func:`_dequantize_torch`).
    """
    if not q.double_quant:
        return q.absmax
    blocks = q.absmax.numel()
    g = _NESTED_BLOCKSIZE
    out = torch.empty(blocks, dtype=torch.float32, device=q.device)
    step = max(1, _chunk_elements(q.device) // g) * g                  # whole groups per step
    for b0 in range(0, blocks, step):
        b1 = min(b0 + step, blocks)
        v = out[b0:b1]
        torch.index_select(q.nested_code, 0, q.absmax[b0:b1].int(), out=v)   # d[qa]
        full, rem = divmod(b1 - b0, g)
        if full:
            v[:full * g].view(full, g).mul_(q.nested_absmax[b0 // g:b0 // g + full, None])
        if rem:
            v[full * g:].mul_(q.nested_absmax[b0 // g + full])
        v.add_(q.nested_offset)                                        # then + offset
    return out                                                         # (blocks,)


def _dequantize_torch(q: NF4Tensor, out: Tensor) -> Tensor:
    """Write ``c[q]·absmax`` into ``out`` (any float dtype, contiguous, ``q.numel()`` elements).

    On a CPU with a C compiler the full blocks go through one compiled loop
    (:func:`_dequantize_native`, :mod:`kernels._nf4_cpu`); otherwise, and on other devices, it
    reads the bytes two at a time as uint16: one gather per 4 elements from a 65536-entry table of
    fp32 quadruples (1 MiB), then scale in place, then one rounding copy into ``out`` (an fp32
    ``out`` receives the gather directly). On a CPU each op covers fewer than torch's grain size
    (32768) elements, so it runs inline without waking torch's thread pool (whose spinning
    threads cost more than this memory-bound loop on a busy machine); instead up to
    ``min(torch.get_num_threads(), 4)`` Python threads (torch ops release the GIL) take chunks.
    """
    tables = _tables(q.device)
    n, bs = q.numel(), q.blocksize
    absmax = _absmax_torch(q)                                          # (blocks,)
    flat = out.view(-1)
    full_blocks = n // bs
    native = _nf4_cpu.library() if q.device.type == "cpu" and full_blocks else None
    if native is not None and out.dtype in native.functions:
        _dequantize_native(native, q.packed, absmax, tables.code, flat, full_blocks, bs)
    elif full_blocks:
        step = min(_chunk_elements(q.device) // bs, full_blocks)       # blocks per chunk
        packed = q.packed if q.packed.data_ptr() % 2 == 0 else q.packed.clone()
        job = _DequantizeJob(
            # uint16 -> int32 is one fast copy on a CPU; elsewhere read int16 and mask
            words=packed[:full_blocks * bs // 2].view(
                torch.uint16 if q.device.type == "cpu" else torch.int16),  # (full_blocks·B/4,)
            dest=flat[:full_blocks * bs].view(full_blocks, bs),        # (full_blocks, B)
            scale=absmax[:full_blocks, None],                          # (full_blocks, 1)
            table=tables.quads, step=step,
            direct=(out.dtype == torch.float32 and out.data_ptr() % 16 == 0
                    and out.storage_offset() % 4 == 0))
        chunks = -(-full_blocks // step)
        threads = min(torch.get_num_threads(), 4, chunks // 8) if q.device.type == "cpu" else 1
        if threads > 1:
            done = [_thread_pool(3).submit(job.run) for _ in range(threads - 1)]
            job.run()
            for d in done:
                d.result()
        else:
            job.run()
    rem = n - full_blocks * bs
    if rem:                                                            # partial last block
        tail = q.packed[full_blocks * bs // 2:].int()                  # (ceil(rem/2),)
        tail_vals = tables.pair.index_select(0, tail).view(torch.float32)[:rem]
        flat[n - rem:].copy_(tail_vals * absmax[full_blocks])
    return out


_NATIVE_CHUNK = 1 << 18   # elements per task of the compiled loop's threads


def _dequantize_native(lib: Any, packed: Tensor, absmax: Tensor, code: Tensor, flat: Tensor,
                       blocks: int, bs: int) -> None:
    """The first ``blocks`` full blocks through the compiled loop (:mod:`kernels._nf4_cpu`): one
    pass, no temporaries. Weights over two chunks are split over up to ``min(torch threads, 4)``
    Python threads (the C call releases the GIL), each taking the next chunk of blocks."""
    step = max(1, _NATIVE_CHUNK // bs)                                 # blocks per task
    chunks = -(-blocks // step)
    threads = min(torch.get_num_threads(), 4, chunks // 2)
    if threads <= 1:
        _nf4_cpu.dequantize_blocks(lib, packed, absmax, code, flat, 0, blocks, bs)
        return
    counter = itertools.count()

    def work() -> None:
        for chunk in counter:
            b0 = chunk * step
            if b0 >= blocks:
                return
            _nf4_cpu.dequantize_blocks(lib, packed, absmax, code, flat, b0, min(b0 + step, blocks), bs)

    done = [_thread_pool(3).submit(work) for _ in range(threads - 1)]
    work()
    for d in done:
        d.result()


class _DequantizeJob:
    """Chunks of ``step`` blocks handed to whichever thread asks next (``next`` on an
    ``itertools.count`` is atomic under the GIL)."""

    def __init__(self, words: Tensor, dest: Tensor, scale: Tensor, table: Tensor, step: int,
                 direct: bool) -> None:
        self.words, self.dest, self.scale, self.table = words, dest, scale, table
        self.step, self.direct = step, direct
        self.blocks = dest.shape[0]
        self.counter = itertools.count()

    def run(self) -> None:
        step, bs = self.step, self.dest.shape[1]
        idx = torch.empty(step * bs // 4, dtype=torch.int32, device=self.words.device)
        quads = torch.empty(step * bs // 4, dtype=torch.complex128, device=self.words.device)
        vals = quads.view(torch.float32).view(step, bs)                # (step, B)
        for chunk in self.counter:
            b0 = chunk * step
            if b0 >= self.blocks:
                return
            b1 = min(b0 + step, self.blocks)
            w = (b1 - b0) * bs // 4
            dest = self.dest[b0:b1]                                    # (blocks, B)
            i, v, f = (idx, quads, vals) if b1 - b0 == step else (idx[:w], quads[:w], vals[:b1 - b0])
            if self.direct:
                v, f = dest.view(-1).view(torch.complex128), dest
            i.copy_(self.words[b0 * bs // 4:b1 * bs // 4])             # (w,) 16 bits -> int32
            if self.words.dtype == torch.int16:
                i.bitwise_and_(0xFFFF)                                 # 0..65535
            torch.index_select(self.table, 0, i, out=v)                # (w,) 4 x fp32
            f.mul_(self.scale[b0:b1])                                  # (blocks, B)
            if not self.direct:
                dest.copy_(f)


@functools.cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool for :func:`_dequantize_torch`'s helper threads."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nf4-dequantize")


def _chunk_elements(device: torch.device) -> int:
    """Elements per step of the Torch dequantizer: below the CPU grain size, large on a GPU."""
    return _CPU_CHUNK if device.type == "cpu" else 1 << 24


# ----------------------------------------------------------------------------- public ops
def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize ``w`` (any shape, fp16/bf16/fp32) to NF4, exactly as bitsandbytes would.

    Same packed bytes and absmax as ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    compress_statistics=double_quant, quant_type="nf4")``. ``w`` is not modified and needs no
    gradient (quantization is not differentiable). A NaN or inf in ``w`` is a ``ValueError`` that
    gives their count and the first one's index (NF4 holds finite values only).
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _DTYPES:
        raise TypeError(f"w must be a float tensor of dtype {_DTYPES}, got {w.dtype}")
    _check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if w.numel() == 0:
        raise ValueError(f"w must have at least one element, got shape {tuple(w.shape)}")
    w = w.detach()
    if _backend.use_triton(w):
        from kernels import _nf4_triton

        _check_finite(w)
        return _nf4_triton.quantize(w, blocksize, double_quant)
    return _quantize_torch(w, blocksize, double_quant)   # checks its (NaN-propagating) absmax


def _check_finite(w: Tensor, absmax: Tensor | None = None) -> None:
    """NF4 stores ``c[q]·absmax``: a NaN or inf has no code and would poison its block's scale.

    With ``absmax`` (the blocks' ``max |w|``, in which a NaN or inf shows) ``w`` is read only when
    some block is not finite, to say where."""
    if absmax is not None and bool(torch.isfinite(absmax).all()):
        return
    finite = torch.isfinite(w)
    if bool(finite.all()):
        return
    bad = ~finite.reshape(-1)
    count = int(bad.sum())
    first = int(bad.to(torch.uint8).argmax())                          # first True
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), w.shape))
    value = w.reshape(-1)[first].item()
    raise ValueError(f"w has {count} non-finite value{'s' if count > 1 else ''} (NaN or inf); the "
                     f"first at index {index} (flat {first}) is {value}: NF4 stores finite "
                     "weights only (fix or mask them before quantizing)")


def _check_out(out: Any, q: NF4Tensor, dtype: torch.dtype) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype} but the requested dtype is {dtype}")
    if out.numel() != q.numel():
        raise ValueError(f"out must have {q.numel()} elements (shape {tuple(q.shape)}), got "
                         f"shape {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.device != q.device:
        raise ValueError(f"out is on {out.device} but q is on {q.device}")
    return out


_HUGE_PAGE_MIN_BYTES = 1 << 23


def _empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty``; a large CPU buffer on Linux is first advised to use transparent huge
    pages (``madvise(MADV_HUGEPAGE)``), which makes writing it the first time about 3x faster
    (512x fewer page faults). A failing ``madvise`` leaves ordinary pages."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if device.type == "cpu" and nbytes >= _HUGE_PAGE_MIN_BYTES and sys.platform == "linux":
        madvise = _madvise()
        if madvise is not None:
            start = (out.data_ptr() + 4095) & ~4095
            end = (out.data_ptr() + nbytes) & ~4095
            madvise(start, end - start, 14)                            # 14 = MADV_HUGEPAGE
    return out


@functools.cache
def _madvise() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, out: Tensor | None = None
                   ) -> Tensor:
    """The dense weight of ``q`` in ``dtype`` (fp16/bf16/fp32; default ``q.dtype``).

    Bit for bit the NF4 formula ``c[q[i]]·absmax[i // B]`` (one fp32 product, then rounded to
    ``dtype``), as bitsandbytes' PyTorch ``dequantize_4bit`` computes it. With ``out`` (contiguous,
    same number of elements, dtype, device) the result is written there and ``out`` is returned, so
    a buffer can be reused across calls; otherwise a new tensor of shape ``q.shape``.
    """
    _check_nf4(q)
    if dtype is None:
        dtype = out.dtype if isinstance(out, Tensor) else q.dtype
    _check_dtype(dtype)
    if out is not None:
        _check_out(out, q, dtype)
    if torch.compiler.is_compiling():   # traced as one opaque op (its loops and tables are eager)
        w = _dequantize_op(q.packed, q.absmax, q.nested_absmax, q.nested_code, q.nested_offset,
                           q.blocksize, list(q.shape), dtype)
        return w if out is None else out.copy_(w.view(out.shape))
    if out is None:
        out = _empty(q.shape, dtype, q.device)
    if _backend.use_triton(q.packed, out):
        from kernels import _nf4_triton

        return _nf4_triton.dequantize(q, out)
    return _dequantize_torch(q, out)


_SCRATCH = threading.local()   # per thread: {(device, dtype, stream): flat buffer}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat scratch buffer of the calling thread for ``(device, dtype)`` (and, on a GPU, the
    current stream); grows as needed. Never shared across threads, so two threads running NF4
    layers at once each dequantize into their own buffer; a thread's buffers go with it."""
    buffers: dict | None = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, dtype, stream)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)
        buf = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buf
    return buf[:numel]


def nf4_dense_for_matmul(q: NF4Tensor, dtype: torch.dtype, reuse: bool = True) -> Tensor:
    """``q`` dequantized to ``dtype`` for an immediately following matmul (Triton or Torch path).

    With ``reuse=True`` the result lives in a scratch buffer of the calling thread per (device,
    dtype, stream) that keeps the size of the largest weight seen: consume it before this thread's
    next call (do not save it for backward; dequantize again there). Other threads never write
    it. ``reuse=False`` returns a fresh tensor.
    """
    _check_nf4(q)
    _check_dtype(dtype)
    reuse = reuse and not torch.compiler.is_compiling()    # a traced graph gets a fresh tensor
    out = _workspace(q.numel(), dtype, q.device).view(q.shape) if reuse else None
    return dequantize_nf4(q, dtype, out=out)


def _check_linear(x: Any, q: Any, bias: Any) -> None:
    _check_nf4(q)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be a float tensor of dtype {_DTYPES}, got {x.dtype}")
    if q.ndim != 2:
        raise ValueError(f"q must be a 2-D (out, in) weight, got shape {tuple(q.shape)}")
    out_features, in_features = q.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must be (..., {in_features}) to match q of shape "
                         f"{tuple(q.shape)} (out, in), got {tuple(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"x is on {x.device} but q is on {q.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")


def _matmul(x2: Tensor, q: NF4Tensor, bias: Tensor | None, triton: bool) -> Tensor:
    """``x2·dequant(q)ᵀ (+ bias)``, ``x2`` (M, K) -> (M, N)."""
    if triton:
        from kernels import _nf4_triton

        # its kernels read the bias at unit stride
        return _nf4_triton.nf4_matmul(x2, q, None if bias is None else bias.contiguous())
    w = nf4_dense_for_matmul(q, x2.dtype)                               # (N, K), scratch
    return torch.addmm(bias, x2, w.t()) if bias is not None else torch.mm(x2, w.t())


def _grad_x(dy: Tensor, q: NF4Tensor) -> Tensor:
    """``dX = dY·dequant(q)``, ``dy`` (M, N) -> (M, K); the weight is dequantized again."""
    return torch.mm(dy, nf4_dense_for_matmul(q, dy.dtype))


class _NF4Linear(torch.autograd.Function):
    # on 2-D x (M, K): the caller reshapes, so the output is no view made in here (a model may
    # edit it in place)
    @staticmethod
    def forward(ctx, x2, q, bias, triton):
        ctx.q = q
        return _matmul(x2, q, bias, triton)                             # (M, N)

    @staticmethod
    def backward(ctx, dy):  # linear in dy: double backward through it is exact
        grad_x = _grad_x(dy, ctx.q) if ctx.needs_input_grad[0] else None
        grad_bias = dy.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None


# torch.compile sees nf4_linear as this opaque op (eager calls skip its dispatch overhead).
def _unpack(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, shape):
    return NF4Tensor(packed, absmax, shape, torch.float32, blocksize, nested_absmax, nested_code,
                     nested_offset)


@torch.library.custom_op("lightning_peft::nf4_linear", mutates_args=())
def _nf4_linear_op(x2: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
                   nested_code: Tensor | None, nested_offset: Tensor | None, blocksize: int,
                   shape: list[int], bias: Tensor | None, triton: bool) -> Tensor:
    q = _unpack(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, shape)
    return _matmul(x2, q, bias, triton)


@_nf4_linear_op.register_fake
def _(x2, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, shape, bias,
      triton):
    return x2.new_empty(x2.shape[0], shape[0])


@torch.library.custom_op("lightning_peft::nf4_linear_grad_x", mutates_args=())
def _nf4_grad_x_op(dy: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
                   nested_code: Tensor | None, nested_offset: Tensor | None, blocksize: int,
                   shape: list[int]) -> Tensor:
    q = _unpack(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, shape)
    return _grad_x(dy, q)


@torch.library.custom_op("lightning_peft::nf4_dequantize", mutates_args=())
def _dequantize_op(packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
                   nested_code: Tensor | None, nested_offset: Tensor | None, blocksize: int,
                   shape: list[int], dtype: torch.dtype) -> Tensor:
    """:func:`dequantize_nf4` as ``torch.compile`` sees it (QLoRA and DoRA layers over a 4-bit
    base dequantize through it while traced)."""
    q = _unpack(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, shape)
    return dequantize_nf4(q, dtype)


@_dequantize_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@_nf4_grad_x_op.register_fake
def _(dy, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, shape):
    return dy.new_empty(dy.shape[0], shape[1])


def _op_setup_context(ctx, inputs, output) -> None:
    ctx.blocksize, ctx.shape = inputs[6], inputs[7]
    ctx.save_for_backward(*(t for t in inputs[1:6] if t is not None))   # the weight's tensors
    ctx.present = [t is not None for t in inputs[1:6]]


def _op_backward(ctx, grad):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if p else None for p in ctx.present]
    grad_x = (_nf4_grad_x_op(grad, *tensors, ctx.blocksize, ctx.shape)
              if ctx.needs_input_grad[0] else None)
    grad_bias = grad.sum(0) if ctx.needs_input_grad[8] else None
    return grad_x, None, None, None, None, None, None, None, grad_bias, None


_nf4_linear_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _nf4_linear(x: Tensor, q: NF4Tensor, bias: Tensor | None, triton: bool | None) -> Tensor:
    _check_linear(x, q, bias)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return _nf4_linear(x, q, bias, triton)
    if bias is not None:
        bias = bias.to(x.dtype)
    if triton is None:
        triton = _backend.use_triton(x, q.packed)
    x2 = x.reshape(-1, x.shape[-1])                                     # (M, K)
    if not torch.compiler.is_compiling():
        return _NF4Linear.apply(x2, q, bias, triton).view(*x.shape[:-1], q.shape[0])
    y = _nf4_linear_op(x2, q.packed, q.absmax, q.nested_absmax, q.nested_code, q.nested_offset,
                       q.blocksize, list(q.shape), bias, triton)        # (M, N)
    return y.view(*x.shape[:-1], q.shape[0])


def nf4_linear_reference(x: Tensor, q: NF4Tensor, bias: Tensor | None = None) -> Tensor:
    """The pure-PyTorch op (CPU fallback and the specification of the Triton path)."""
    return _nf4_linear(x, q, bias, triton=False)


def nf4_linear(x: Tensor, q: NF4Tensor, bias: Tensor | None = None) -> Tensor:
    """``x·dequant(q)ᵀ + bias`` with autograd for ``x`` and ``bias`` (the weight is frozen).

    Args:
        x: input ``(..., in)``, fp16/bf16/fp32; the weight is dequantized to ``x``'s dtype.
        q: NF4 weight ``(out, in)``.
        bias: optional ``(out,)``, cast to ``x``'s dtype (the cast is differentiable).

    Under ``torch.autocast`` the input is cast to the autocast dtype first.
    """
    return _nf4_linear(x, q, bias, triton=None)
