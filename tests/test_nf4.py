"""NF4: bit-exactness with bitsandbytes' CPU path, Triton kernels against the Torch reference,
nf4_linear against a float model, Linear4bit state-dict interop, and every bad input.

Facts about bitsandbytes 0.50.2 on CPU that these tests pin (``test_bnb_cpu_facts``):
blocksizes 32..4096 are accepted (16 and 8192 are not); ``quantize_4bit`` runs the Torch
"default" kernel; the nested (double) quantization of absmax runs the C++ ``quantize_cpu`` whose
nearest-code search goes through a 65536-entry table (not the exact nearest of the CUDA kernel);
``dequantize_4bit`` of a shape whose last dim is odd runs a ``torch.compile``d fallback.

What is bit-exact: the packed codes, the absmax (and nested absmax, offset, maps) of
``quantize_nf4`` are byte-for-byte bitsandbytes' ``quantize_4bit``; ``dequantize_nf4`` equals the
NF4 formula ``c[nibble]·absmax[block]`` (:func:`_formula`) applied to bitsandbytes' own bytes and
scales. bitsandbytes' native CPU ``dequantize_4bit`` is compared only where it follows that
formula on every x86-64 CPU (:func:`_bnb_dequantize_is_exact`): on CPUs with AVX-512 (bf16) it
returns other values when a row ends inside a block, e.g. a (48, 80) weight at blocksize 128,
disagreeing with its own PyTorch fallback, which these tests also check against the formula.
"""

from __future__ import annotations

import json
import math
import threading

import bitsandbytes as bnb
import pytest
import torch

from kernels import use_backend
from kernels.nf4 import (
    BLOCKSIZES,
    NF4Tensor,
    _dynamic_map,
    _quantize_absmax_torch,
    _tables,
    dequantize_nf4,
    nf4_dense_for_matmul,
    nf4_linear,
    nf4_linear_reference,
    quantize_nf4,
)
from tests._aot import compile_ahead

F = bnb.functional

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Awkward sizes: tiny, odd, not a multiple of 64 or 256, 1-D and 3-D.
SHAPES = [(1,), (3,), (64,), (65,), (100, 77), (7, 9, 11), (33, 200), (2, 4097)]


@pytest.fixture
def eager_bnb():
    """Run bitsandbytes' ``torch.compile``d CPU fallbacks eagerly (same math, no compile time)."""
    import torch._dynamo

    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2.5).to(dtype)


def _bnb_quantize(w, blocksize, double_quant):
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                           quant_type="nf4")


def _bnb_dequantize(packed, state, dtype):
    state.dtype = dtype
    return F.dequantize_4bit(packed, state).reshape(-1)  # bnb transposes outputs of <= 2 elements


def _formula(packed, state, dtype):
    """The NF4 specification on bitsandbytes' bytes and scales, flat: ``c[nibble i]·absmax[i // B]``
    as one fp32 product, then rounded to ``dtype``; nibble ``2j`` is the high one of byte ``j``.
    A double-quantized absmax is ``d[qa]·a2 + offset`` (fp32, two roundings)."""
    assert not getattr(state, "packing_format_for_cpu", False)   # bnb's canonical layout
    n = math.prod(state.shape)
    b = packed.detach().contiguous().view(torch.uint8).reshape(-1).long()
    nibbles = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]   # (n,)
    absmax = state.absmax
    if state.nested:
        s2 = state.state2
        absmax = s2.code[absmax.long()] * s2.absmax.repeat_interleave(256)[:absmax.numel()]
        absmax = absmax + state.offset
    scale = absmax.float().repeat_interleave(state.blocksize)[:n]
    return (state.code.float()[nibbles] * scale).to(dtype)


def _bnb_dequantize_is_exact(shape, blocksize) -> bool:
    """Where bitsandbytes 0.50.2's CPU ``dequantize_4bit`` follows the formula on every x86-64
    CPU: rows of whole blocks (any native kernel), or an odd last dim (its PyTorch fallback)."""
    last = shape[-1]
    return last % 2 == 1 or last % blocksize == 0


def _assert_dequantizes_as_bnb_format(ours, packed, state, dtype):
    """``ours`` (the dense weight in ``dtype``) is the formula on bitsandbytes' bytes and scales,
    which is also bitsandbytes' own PyTorch fallback; and it is bitsandbytes' native
    ``dequantize_4bit`` output wherever that one is exact."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    want = _formula(packed, state, dtype)
    assert torch.equal(ours.reshape(-1), want)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested \
        else state.absmax                                         # as bnb's dequantize_4bit does
    fallback = _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, state.code,
                                        state.blocksize, state.shape, dtype)
    assert torch.equal(fallback.reshape(-1), want)
    if _bnb_dequantize_is_exact(state.shape, state.blocksize):
        assert torch.equal(ours.reshape(-1), _bnb_dequantize(packed, state, dtype))


def _assert_same_as_bnb(q: NF4Tensor, packed, state):
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert q.double_quant == state.nested
    if state.nested:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_code, state.state2.code)
        assert torch.equal(q.nested_offset, state.offset)
    assert q.shape == state.shape and q.dtype == state.dtype and q.blocksize == state.blocksize


# ------------------------------------------------------------------------------ bnb facts
def test_bnb_cpu_facts():
    w = torch.randn(300)
    for bs in BLOCKSIZES:
        _bnb_quantize(w, bs, False)
    for bs in (16, 8192):
        with pytest.raises(ValueError):
            _bnb_quantize(w, bs, False)
    _, state = _bnb_quantize(w, 64, True)
    assert state.state2.blocksize == 256 and state.absmax.dtype == torch.uint8
    # element 0 is the high nibble: [-1, 1] -> codes (0, 15) = 0x0F; an odd n pads code 7
    packed, _ = _bnb_quantize(torch.tensor([-1.0, 1.0, 0.5]), 64, False)
    assert packed.view(-1).tolist() == [0x0F, (12 << 4) | 7]  # 0.5 -> c[12] = 0.4407
    assert torch.equal(_dynamic_map(), F.create_dynamic_map())
    assert torch.equal(_tables(torch.device("cpu")).code, F.get_4bit_type("nf4", device="cpu"))


# -------------------------------------------------------------- bit-exactness (Torch path)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes(shape, dtype, double_quant, eager_bnb):
    w = _weight(shape, dtype)
    for bs in (32, 64, 256, 4096):
        q = quantize_nf4(w, blocksize=bs, double_quant=double_quant)
        packed, state = _bnb_quantize(w, bs, double_quant)
        _assert_same_as_bnb(q, packed, state)
        for out_dtype in FLOATS:
            ours = dequantize_nf4(q, out_dtype)
            assert ours.shape == w.shape and ours.dtype == out_dtype
            _assert_dequantizes_as_bnb_format(ours, packed, state, out_dtype)


def test_matches_bitsandbytes_compiled_fallback():
    """An odd last dim sends bnb's dequantize through its torch.compile'd kernel: still equal."""
    w = _weight((5, 33), torch.float32, seed=3)
    q = quantize_nf4(w, 64, True)
    packed, state = _bnb_quantize(w, 64, True)
    assert _bnb_dequantize_is_exact(w.shape, 64)
    _assert_dequantizes_as_bnb_format(dequantize_nf4(q, torch.bfloat16), packed, state,
                                      torch.bfloat16)


@pytest.mark.parametrize("threads", [1, 4])
def test_large_dequantize_matches_bitsandbytes(threads, monkeypatch, eager_bnb):
    """Enough chunks for the helper threads; a partial last block; fp32 straight into ``out``,
    also when ``out`` is not 16-byte aligned."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    w = _weight((1030, 601), torch.float32, seed=4)
    q = quantize_nf4(w, 64, True)
    packed, state = _bnb_quantize(w, 64, True)
    for dt in FLOATS:
        _assert_dequantizes_as_bnb_format(dequantize_nf4(q, dt), packed, state, dt)
    unaligned = torch.empty(w.numel() + 1)[1:]
    dequantize_nf4(q, torch.float32, out=unaligned)
    _assert_dequantizes_as_bnb_format(unaligned, packed, state, torch.float32)


def test_special_values_match_bitsandbytes(eager_bnb):
    code = _tables(torch.device("cpu")).code
    mids = (code[:-1] + code[1:]) / 2
    blocks = [
        torch.zeros(64),                                    # all-zero block: absmax 0
        torch.full((64,), -3.0),                            # constant block
        torch.cat([torch.tensor([1.0]), mids, -mids, mids.nextafter(torch.tensor(2.0)),
                   torch.zeros(64 - 1 - 45)]),              # ties at every midpoint
        torch.randn(64) * 1e-30,                            # tiny
        torch.randn(64) * 1e30,                             # huge
        torch.randn(64) * 1e-39,                            # subnormal
    ]
    w = torch.cat(blocks + [torch.zeros(10)])               # all-zero partial block (1e-38)
    for dq in (False, True):
        q = quantize_nf4(w, 64, dq)
        packed, state = _bnb_quantize(w, 64, dq)
        _assert_same_as_bnb(q, packed, state)
        for dt in FLOATS:
            _assert_dequantizes_as_bnb_format(dequantize_nf4(q, dt), packed, state, dt)
    assert quantize_nf4(w, 64, False).absmax[-1].item() == pytest.approx(1e-38)


def test_nested_quantization_matches_bitsandbytes_table():
    """Double quantization follows bnb's CPU 65536-entry table, magnitudes 1e-9..1e3."""
    g = torch.Generator().manual_seed(1)
    for n in (1, 255, 256, 257, 1000, 3000):
        v = torch.randn(n, generator=g) * 10 ** torch.empty(n).uniform_(-9, 3, generator=g)
        if n == 1000:
            v[256:512] = 0.0                                # an all-zero group
        q, a2 = _quantize_absmax_torch(v, _tables(v.device))
        q_ref, state = F.quantize_blockwise(v, blocksize=256)
        assert torch.equal(q, q_ref) and torch.equal(a2, state.absmax)


@pytest.mark.parametrize("shape,blocksize", [((48, 80), 128), ((48, 80), 64), ((16, 80), 64),
                                              ((64, 64), 128), ((64, 128), 64)])
def test_bitsandbytes_quantized_dequantizes_identically(shape, blocksize, eager_bnb):
    """Weights quantized by bitsandbytes read through from_bitsandbytes, and back. The first four
    shapes end a row inside a block, where bnb's AVX-512 CPU dequantize departs from the formula;
    the last is compared with bnb's native output on every CPU."""
    for dq in (False, True):
        w = _weight(shape, torch.bfloat16, seed=5)
        packed, state = _bnb_quantize(w, blocksize, dq)
        q = NF4Tensor.from_bitsandbytes(packed, state)
        for dt in FLOATS:
            _assert_dequantizes_as_bnb_format(q.dequantize(dt), packed, state, dt)
        packed2, state2 = q.to_bitsandbytes()
        assert packed2.shape == packed.shape and torch.equal(packed2, packed)
        assert state2 == state
        assert torch.equal(F.dequantize_4bit(packed2, state2), F.dequantize_4bit(packed, state))


# ---------------------------------------------------------------------- Linear4bit interop
def _linear4bit_from(sd, in_f, out_f, double_quant):
    from bitsandbytes.nn import Linear4bit, Params4bit

    layer = Linear4bit(in_f, out_f, bias=True, quant_type="nf4",
                       compress_statistics=double_quant)
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    layer.bias = torch.nn.Parameter(sd["bias"])
    return layer


@pytest.mark.parametrize("in_features", [96, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_interop_with_linear4bit(double_quant, in_features, eager_bnb):
    """Byte-for-byte the state dict ``Linear4bit`` writes; a ``Linear4bit`` built from ours holds
    our bytes and computes what ``nf4_linear`` computes: exactly, where bnb's CPU dequantize is
    exact (rows of whole blocks, 128); for 96 (rows end inside a block) against the linear of the
    formula on the bytes and scales it holds, as bnb's PyTorch path would."""
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, 40)
    ref = Linear4bit(in_features, 40, quant_type="nf4", compress_statistics=double_quant)
    ref.load_state_dict(dense.state_dict())
    ref = ref.to("cpu")                                     # quantizes
    bnb_sd = ref.state_dict()

    q = quantize_nf4(dense.weight.detach(), 64, double_quant)
    ours = q.to_state_dict()
    assert set(ours) == set(bnb_sd) - {"bias"}
    for k, v in ours.items():
        assert v.dtype == bnb_sd[k].dtype and torch.equal(v, bnb_sd[k]), k
    keys = {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        keys |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(ours) == keys

    # ours -> a real Linear4bit (training mode: bnb keeps its canonical layout) -> same outputs
    layer = _linear4bit_from({**ours, "bias": dense.bias.detach()}, in_features, 40, double_quant)
    assert torch.equal(layer.weight.data.view(-1), q.packed)
    w = _formula(layer.weight.data, layer.weight.quant_state, torch.float32).view(40, in_features)
    assert torch.equal(w, q.dequantize(torch.float32))
    x = torch.randn(5, in_features)
    with torch.no_grad():
        got = nf4_linear(x, q, dense.bias)
        assert torch.equal(got, torch.nn.functional.linear(x, w, dense.bias))
        if _bnb_dequantize_is_exact((40, in_features), 64):
            assert torch.equal(layer(x), got) and torch.equal(ref(x), got)

    # Linear4bit's state dict -> NF4Tensor, under a module prefix
    prefixed = {f"model.layers.0.q_proj.{k}": v for k, v in bnb_sd.items()}
    back = NF4Tensor.from_state_dict(prefixed, "model.layers.0.q_proj.")
    assert torch.equal(back.dequantize(torch.float32), q.dequantize(torch.float32))
    assert back.double_quant == double_quant and back.shape == (40, in_features)
    assert set(back.to_state_dict("p.")) == {f"p.{k}" for k in keys}


def test_state_dict_json_matches_bnb():
    w = _weight((10, 30), torch.bfloat16)
    q = quantize_nf4(w, 256, True)
    _, state = _bnb_quantize(w, 256, True)
    blob = q.to_state_dict()["weight.quant_state.bitsandbytes__nf4"]
    assert torch.equal(blob, state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"])
    meta = json.loads(bytes(blob.tolist()))
    assert meta["dtype"] == "bfloat16" and meta["shape"] == [10, 30]


# ---------------------------------------------------------------------------- NF4Tensor
def test_nf4tensor_attributes_and_memory():
    w = _weight((128, 256), torch.bfloat16)
    q = quantize_nf4(w)                                     # blocksize 64, double quant
    assert q.shape == (128, 256) and q.dtype == torch.bfloat16 and q.ndim == 2
    n = 128 * 256
    assert q.nbytes == n // 2 + n // 64 + 4 * 2 + 4 * 256 + 4
    assert 4.0 < q.bits_per_weight < 4.4
    q1 = quantize_nf4(w, double_quant=False)
    assert q1.nbytes == n // 2 + 4 * n // 64
    assert "NF4Tensor(shape=(128, 256)" in repr(q)
    assert q.to("cpu") is q and q.to(None) is q
    with pytest.raises(TypeError, match="takes a device"):
        q.to(torch.float16)
    assert torch.equal(q.dequantize(), dequantize_nf4(q, torch.bfloat16))


def test_dequantize_out_buffer_reused():
    q = quantize_nf4(_weight((37, 70), torch.float32))
    buf = torch.empty(37 * 70, dtype=torch.float16)
    got = dequantize_nf4(q, out=buf)
    assert got is buf and torch.equal(got.view(37, 70), dequantize_nf4(q, torch.float16))
    scratch = nf4_dense_for_matmul(q, torch.float16)
    assert torch.equal(scratch, dequantize_nf4(q, torch.float16))
    fresh = nf4_dense_for_matmul(q, torch.float16, reuse=False)
    assert fresh.data_ptr() != nf4_dense_for_matmul(q, torch.float16).data_ptr()


def test_lora_linear_accepts_nf4_weight():
    from kernels.lora import lora_linear

    torch.manual_seed(0)
    q = quantize_nf4(_weight((24, 40), torch.float32))
    a, b = torch.randn(4, 40), torch.randn(24, 4)
    x = torch.randn(3, 40)
    with use_backend("torch"):
        got = lora_linear(x, q, a, b, 0.5)
        want = lora_linear(x, q.dequantize(torch.float32), a, b, 0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------- nf4_linear
def _check_linear(backend, x_shape, n, k, blocksize, double_quant, dtype, with_bias, tol):
    g = torch.Generator().manual_seed(sum(x_shape) + n + k)
    q = quantize_nf4(torch.randn(n, k, generator=g), blocksize, double_quant)
    w = q.dequantize(dtype)                                 # the float model's weight
    x = torch.randn(x_shape, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(n, generator=g).to(dtype).requires_grad_() if with_bias else None
    with use_backend(backend):
        y = nf4_linear(x, q, bias)
    y_ref = x.double() @ w.double().t() + (bias.double() if with_bias else 0.0)
    assert y.shape == (*x_shape[:-1], n) and y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **tol)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(y, [x] + ([bias] if with_bias else []), dy)
    dx_ref = dy.double() @ w.double()
    torch.testing.assert_close(grads[0].double(), dx_ref, **tol)
    if with_bias:
        torch.testing.assert_close(grads[1].double(), dy.double().reshape(-1, n).sum(0), **tol)


LINEAR_CASES = [
    # x shape,     n,  k,  blocksize, double_quant, bias
    ((1, 128), 37, 128, 64, True, True),                   # decode, fused M == 1
    ((2, 3, 192), 20, 192, 32, False, False),              # M = 6, fused dot path
    ((16, 256), 33, 256, 128, True, True),                 # M = 16, largest fused
    ((17, 96), 24, 96, 64, True, True),                    # M = 17: dequantize + GEMM
    ((4, 100), 9, 100, 64, True, True),                    # K % blocksize != 0: unfused
    ((1, 512), 5, 512, 512, False, True),                  # one block per row
]
TOLS = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=5e-2)}


@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_linear_torch(case, dtype):
    x_shape, n, k, bs, dq, with_bias = case
    _check_linear("torch", x_shape, n, k, bs, dq, dtype, with_bias, TOLS[dtype])


@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_linear_triton(case, dtype):
    x_shape, n, k, bs, dq, with_bias = case
    _check_linear("triton", x_shape, n, k, bs, dq, dtype, with_bias, TOLS[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nf4_linear_empty_batch(backend):
    q = quantize_nf4(_weight((8, 64), torch.float32))
    x = torch.randn(0, 64, requires_grad=True)
    with use_backend(backend):
        y = nf4_linear(x, q)
        y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 64)


def test_nf4_linear_bf16_torch_and_autocast():
    q = quantize_nf4(_weight((16, 64), torch.float32))
    x = torch.randn(3, 64)
    want = x.to(torch.bfloat16) @ q.dequantize(torch.bfloat16).t()
    assert torch.equal(nf4_linear_reference(x.to(torch.bfloat16), q), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nf4_linear(x, q)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("with_out", [False, True])
def test_dequantize_under_torch_compile_fullgraph(with_out):
    """While traced, dequantize is one opaque op: bit for bit eager's, fresh or written into
    ``out`` (a flat buffer here: same elements, another shape)."""
    q = quantize_nf4(_weight((24, 130), torch.float32), 64, True)   # a partial last block

    def f(buf):
        return dequantize_nf4(q, torch.bfloat16, out=buf) * 2

    buf = torch.zeros(24 * 130, dtype=torch.bfloat16) if with_out else None
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(buf)
    want = dequantize_nf4(q, torch.bfloat16) * 2
    assert torch.equal(got.view(want.shape), want)
    if with_out:
        assert torch.equal(buf.view(want.shape), want / 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nf4_linear_torch_compile_fullgraph(backend):
    """Dynamo + AOTAutograd trace nf4_linear as the registered op without graph breaks."""
    q = quantize_nf4(_weight((24, 128), torch.float32), 64, True)
    x = torch.randn(2, 3, 128, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)

    def f(x, bias):
        return nf4_linear(x, q, bias).square().mean()

    torch._dynamo.reset()
    with use_backend(backend):
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, bias)
        got = torch.autograd.grad(loss, [x, bias])
        want_loss = f(x, bias)
        want = torch.autograd.grad(want_loss, [x, bias])
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_nf4_linear_weight_gets_no_gradient():
    q = quantize_nf4(_weight((8, 64), torch.float32))
    x = torch.randn(2, 64, requires_grad=True)
    nf4_linear(x, q).sum().backward()
    assert x.grad is not None
    assert all(not t.requires_grad for t in q._tensors().values())


# ----------------------------------------------------------------- Triton (interpreter)
TRITON_SHAPES = [(1,), (3,), (65,), (100, 77), (7, 9, 11), (3, 1030)]


@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_quantize_matches_reference(shape, double_quant):
    from kernels import _nf4_triton

    for dtype, bs in ((torch.float32, 32), (torch.float16, 64), (torch.bfloat16, 1024)):
        w = _weight(shape, dtype, seed=7)
        with use_backend("torch"):
            ref = quantize_nf4(w, bs, double_quant)
        got = _nf4_triton.quantize(w, bs, double_quant)
        assert got._tensors().keys() == ref._tensors().keys()
        for name, t in ref._tensors().items():
            assert torch.equal(getattr(got, name), t), name


@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_dequantize_matches_reference(shape, double_quant):
    for bs in (32, 64, 4096):
        q = quantize_nf4(_weight(shape, torch.float32, seed=8), bs, double_quant)
        for dtype in (torch.float32, torch.float16):
            with use_backend("torch"):
                ref = dequantize_nf4(q, dtype)
            out = torch.full(shape, float("nan"), dtype=dtype)
            with use_backend("triton"):
                got = dequantize_nf4(q, dtype, out=out)
            assert got is out and torch.equal(got, ref)


def test_triton_quantize_special_values_and_nested():
    from kernels import _nf4_triton

    g = torch.Generator().manual_seed(2)
    w = torch.randn(64 * 700 + 5, generator=g) * 10 ** torch.empty(64 * 700 + 5).uniform_(
        -6, 2, generator=g)
    w[:64] = 0.0
    w[-5:] = 0.0
    ref = quantize_nf4(w, 64, True)
    got = _nf4_triton.quantize(w, 64, True)
    for name, t in ref._tensors().items():
        assert torch.equal(getattr(got, name), t), name


@pytest.mark.parametrize("m,n,k,bs,dq,split_k", [
    (1, 37, 192, 64, True, None), (1, 37, 192, 64, False, 2), (1, 5, 4096, 4096, True, 1),
    (3, 40, 256, 128, True, None), (16, 17, 512, 32, True, 3), (5, 33, 1024, 512, False, 2),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_fused_matmul(m, n, k, bs, dq, split_k, dtype):
    from kernels import _nf4_triton

    g = torch.Generator().manual_seed(m * n + k)
    q = quantize_nf4(torch.randn(n, k, generator=g), bs, dq)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    assert _nf4_triton.fused_supported(m, q)
    y = _nf4_triton.matmul_small_m(x, q, bias, split_k=split_k)
    ref = x.double() @ q.dequantize(dtype).double().t() + bias.double()
    torch.testing.assert_close(y.double(), ref, **TOLS[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_gpu_bf16_bit_exact_and_matmul(double_quant):
    w = _weight((4096 + 3, 257), torch.bfloat16).cuda()
    with use_backend("torch"):
        ref = quantize_nf4(w, 64, double_quant)
        dense = dequantize_nf4(ref, torch.bfloat16)
    with use_backend("triton"):
        got = quantize_nf4(w, 64, double_quant)
        assert torch.equal(dequantize_nf4(ref, torch.bfloat16), dense)
    assert torch.equal(got.packed, ref.packed) and torch.equal(got.absmax, ref.absmax)
    q = quantize_nf4(torch.randn(1000, 1024, device="cuda"), 64, double_quant)
    for m in (1, 7, 16, 300):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        with use_backend("triton"):
            y = nf4_linear(x, q)
        ref_y = x.float() @ q.dequantize(torch.bfloat16).float().t()
        torch.testing.assert_close(y.float(), ref_y, rtol=2e-2, atol=2e-1)


_HOPPER_COMPILE = r"""
import json, os, re, subprocess, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from kernels import _nf4_triton as T, nf4

T._nested_offset = lambda absmax: absmax.mean()  # launches are captured, not run: absmax holds no values
PTR = {torch.uint8: "*u8", torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.int64: "*i64"}
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
compiled = []


class Capture:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.compile

    def compile(self, *args, **kwargs):
        consts = {k: v for k, v in kwargs.items() if k not in OPTIONS}
        opts = {k: v for k, v in kwargs.items() if k in OPTIONS}
        sig, attrs = {}, {}
        for i, (name, v) in enumerate(zip(self.fn.arg_names, args)):
            if isinstance(v, torch.Tensor):
                sig[name], attrs[(i,)] = PTR[v.dtype], [["tt.divisibility", 16]]
            else:
                sig[name] = "i64" if abs(v) >= 2**31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        sig.update({name: "constexpr" for name in consts})
        k = triton.compile(triton.compiler.ASTSource(self.fn, sig, consts, attrs),
                           target=GPUTarget("cuda", 90, 32), options=opts)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True,
                                   text=True).stdout
        ptx = k.asm["ptx"]
        compiled.append({"kernel": self.fn.__name__, "smem": k.metadata.shared,
                         "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
                         "spill": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
                         "vector_store": "st.global.v4" in ptx,
                         "mma": "mma" in ptx})


for name in ("_quantize_kernel", "_quantize_absmax_kernel", "_dequantize_kernel",
             "_matmul_kernel"):
    setattr(T, name, Capture(getattr(T, name)))
g = torch.Generator().manual_seed(0)
w = torch.randn(512, 1024, generator=g).bfloat16()
T.quantize(w, 64, True)
q = nf4.quantize_nf4(w.float(), 64, True)
T.dequantize(q, torch.empty(512, 1024, dtype=torch.bfloat16))
for m in (1, 16):
    T.matmul_small_m(torch.randn(m, 1024, generator=g).bfloat16(), q, None, split_k=1)
print(json.dumps(compiled))
"""


def test_kernels_compile_for_hopper():
    """Ahead-of-time compile (ptxas, no GPU needed) of every NF4 kernel for sm_90 in bf16: no
    register spills, dequantize stores 16-byte vectors, the M = 16 matmul runs on tensor cores."""
    compiled = compile_ahead(_HOPPER_COMPILE, TRITON_DEFAULT_FP_FUSION="1")
    kinds = [c["kernel"] for c in compiled]
    assert kinds == ["_quantize_kernel", "_quantize_absmax_kernel", "_dequantize_kernel",
                     "_matmul_kernel", "_matmul_kernel"], kinds
    for c in compiled:
        assert c["spill"] == 0 and c["smem"] <= 227 * 1024, c
    assert compiled[2]["vector_store"], compiled[2]
    assert compiled[4]["mma"], compiled[4]


@pytest.mark.gpu
def test_gpu_against_bitsandbytes_cuda():
    """bnb's CUDA kernels: dequantizing its weights is bit-identical; quantizing agrees except
    for values within rounding of a code midpoint (its CUDA kernel uses its own comparisons)."""
    for dq in (False, True):
        w = _weight((1000, 300), torch.bfloat16).cuda()
        packed, state = _bnb_quantize(w, 64, dq)
        q = NF4Tensor.from_bitsandbytes(packed, state)
        for dt in FLOATS:
            with use_backend("triton"):
                ours = dequantize_nf4(q, dt)
            assert torch.equal(ours.reshape(-1), _bnb_dequantize(packed, state, dt))
        with use_backend("triton"):
            mine = quantize_nf4(w, 64, dq)
        assert (mine.packed == packed.view(-1)).float().mean() > 0.999
        if not dq:
            assert torch.equal(mine.absmax, state.absmax)


# ---------------------------------------------------------------------------- thread safety
def concurrently(jobs, rounds: int) -> list[list]:
    """Run each job ``rounds`` times in its own thread, all threads released together; returns
    each job's results (re-raises the first exception a thread met)."""
    start = threading.Barrier(len(jobs))
    results: list[list] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def work(i):
        try:
            start.wait()
            for _ in range(rounds):
                results[i].append(jobs[i]())
        except BaseException as err:  # noqa: BLE001  (handed to the main thread)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def count_wrong(results, want, tol=1e-5) -> int:
    """How many results (tuples of tensors) differ from ``want`` beyond ``tol`` (relative)."""
    def close(a, b):
        return a.shape == b.shape and bool(((a.float() - b.float()).abs() <=
                                            tol * (1 + b.float().abs())).all())
    return sum(not all(close(a, b) for a, b in zip(r, want)) for r in results)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_are_thread_safe(backend):
    """Two threads, each with its own NF4 weight of another shape, run nf4_linear forward and
    backward (M > 16: dequantize into scratch + GEMM), dequantize_nf4 and nf4_dense_for_matmul at
    the same time: every result equals the one computed alone."""
    rounds = 40 if backend == "torch" else 4
    g = torch.Generator().manual_seed(11)
    cases = []
    for n, k in ((96, 128), (80, 192)):
        q = quantize_nf4(torch.randn(n, k, generator=g), 64, True)
        x = torch.randn(24, k, generator=g)
        dy = torch.randn(24, n, generator=g)
        cases.append((q, x, dy))

    def job(q, x, dy):
        def run():
            xg = x.clone().requires_grad_()
            y = nf4_linear(xg, q)
            y.backward(dy)
            return (y.detach(), xg.grad, dequantize_nf4(q, torch.float32),
                    nf4_dense_for_matmul(q, torch.float32).clone())
        return run

    with use_backend(backend):
        jobs = [job(*c) for c in cases]
        want = [j() for j in jobs]
        got = concurrently(jobs, rounds)
    wrong = [count_wrong(r, w) for r, w in zip(got, want)]
    assert wrong == [0, 0], f"wrong results per thread out of {rounds}: {wrong}"


# ------------------------------------------------------------------------------- bad input
def test_bad_quantize_inputs():
    w = torch.randn(4, 64)
    with pytest.raises(TypeError, match="w must be a float tensor"):
        quantize_nf4(w.to(torch.int32))
    with pytest.raises(TypeError, match="w must be a float tensor"):
        quantize_nf4(w.double())
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_nf4([[1.0, 2.0]])
    for bs in (16, 63, 8192, "64", True, 64.0):
        with pytest.raises(ValueError, match="blocksize must be one of"):
            quantize_nf4(w, blocksize=bs)
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        quantize_nf4(w, double_quant=1)
    with pytest.raises(ValueError, match="at least one element"):
        quantize_nf4(torch.empty(0, 64))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bad,dtype", [(float("nan"), torch.float32), (float("inf"), torch.float16),
                                       (float("-inf"), torch.bfloat16)])
def test_quantize_rejects_non_finite_weights(backend, double_quant, bad, dtype):
    """A NaN or inf cannot be stored as a code times a finite scale: a ValueError with the count
    and the first index (no IndexError from the nested table, no silently NaN block)."""
    w = torch.randn(6, 70).to(dtype)
    w[4, 1] = bad
    w[2, 5] = bad
    w[5, 69] = float("nan")
    with use_backend(backend), pytest.raises(
            ValueError, match=r"w has 3 non-finite values \(NaN or inf\); the first at index "
                              r"\(2, 5\) \(flat 145\)"):
        quantize_nf4(w, 64, double_quant)
    with pytest.raises(ValueError, match=r"1 non-finite value .* index \(3,\)"):
        quantize_nf4(torch.tensor([0.0, 1.0, 2.0, float("nan")]), 32, double_quant)


def test_bad_dequantize_inputs():
    q = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(TypeError, match="q must be an NF4Tensor"):
        dequantize_nf4(torch.randn(4, 64))
    for dtype in (torch.float64, torch.int8, "bf16"):
        with pytest.raises(TypeError, match="dtype must be one of"):
            dequantize_nf4(q, dtype)
    with pytest.raises(TypeError, match="out has dtype"):
        dequantize_nf4(q, torch.float16, out=torch.empty(4, 64))
    with pytest.raises(ValueError, match="out must have 256 elements"):
        dequantize_nf4(q, out=torch.empty(4, 65))
    with pytest.raises(ValueError, match="out must be contiguous"):
        dequantize_nf4(q, out=torch.empty(64, 4).t())
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        dequantize_nf4(q, torch.float32, out=[0.0])
    with pytest.raises(TypeError, match="dtype must be one of"):
        nf4_dense_for_matmul(q, torch.float64)


def test_bad_linear_inputs():
    q = quantize_nf4(torch.randn(8, 64))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 64\)"):
        nf4_linear(torch.randn(2, 63), q)
    with pytest.raises(TypeError, match="x must be a float tensor"):
        nf4_linear(x.long(), q)
    with pytest.raises(TypeError, match="q must be an NF4Tensor"):
        nf4_linear(x, torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        nf4_linear(x, q, torch.randn(9))
    with pytest.raises(ValueError, match="2-D"):
        nf4_linear(x, quantize_nf4(torch.randn(64)))


def test_bad_nf4tensor_and_interop_inputs():
    q = quantize_nf4(torch.randn(8, 64), 64, True)
    with pytest.raises(ValueError, match="packed must have shape"):
        NF4Tensor(q.packed[:-1], q.absmax, q.shape, q.dtype, 64, q.nested_absmax, q.nested_code,
                  q.nested_offset)
    with pytest.raises(TypeError, match="absmax must be torch.float32"):
        NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 64)
    with pytest.raises(ValueError, match="must be given together"):
        NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 64, nested_absmax=q.nested_absmax)
    with pytest.raises(TypeError, match="NF4Tensor dtype"):
        NF4Tensor(q.packed, q.absmax, q.shape, torch.int8, 64, q.nested_absmax, q.nested_code,
                  q.nested_offset)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 48, q.nested_absmax, q.nested_code,
                  q.nested_offset)
    sd = q.to_state_dict("m.")
    with pytest.raises(ValueError, match="lacks the NF4 keys"):
        NF4Tensor.from_state_dict(sd, "other.")
    fp4 = {k.replace("nf4", "fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="only nf4 is supported"):
        NF4Tensor.from_state_dict(fp4, "m.")
    with pytest.raises(ValueError, match="lacks m.weight.nested_absmax"):
        NF4Tensor.from_state_dict({k: v for k, v in sd.items() if "nested_absmax" not in k}, "m.")
    packed, state = F.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type must be 'nf4'"):
        NF4Tensor.from_bitsandbytes(packed, state)


# ------------------------------------------------------------------------------- benchmark
def test_benchmark_smoke(tmp_path, unforced):
    from benchmarks import kernels_nf4

    rc = kernels_nf4.main(["--tiny", "--out", str(tmp_path), "--repeats", "2"])
    assert rc == 0
    (result,) = tmp_path.rglob("nf4.json")
    data = json.loads(result.read_text())
    assert data["dequantize"] and data["matmul"]
    assert all(r["gbps"] > 0 for r in data["dequantize"])
    assert (result.parent / "nf4.md").exists()
