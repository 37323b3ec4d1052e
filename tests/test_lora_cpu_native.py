"""The compiled dS/dB loop of the LoRA backward (kernels/_lora_cpu.py): float64 references on
awkward shapes, strided inputs and outputs, every supported rank, one and two threads, builds for
AVX2 and for no particular CPU, the LoRA ops' gradients with and without it, and the BLAS path
wherever it does not apply."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import _lora_cpu, _native

pytestmark = pytest.mark.skipif(_lora_cpu.library() is None, reason="no C compiler on this machine")


def _reference(dy, b, s_lora, scale):
    return scale * dy.double() @ b.double(), dy.double().t() @ s_lora.double()


def _check(got, ref, rtol=2e-6):
    for g, r in zip(got, ref):
        err = (g.double() - r).abs().max().item()
        assert err <= rtol * max(r.abs().max().item(), 1.0) * 4, err


def _inputs(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(m, n + 3, generator=g)[:, 2:n + 2]               # row stride n + 3
    b = torch.randn(n, r, generator=g)
    s_lora = torch.randn(m, 3 * r, generator=g)[:, r:2 * r]          # a block of S_cat
    return dy, b, s_lora


_RANKS = (8, 16, 24, 32, 64)
"""Ranks tried; a build takes the one its vector holds (16 floats with AVX-512, else 8)."""


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n", [(383, 1537), (1, 5), (9, 3000), (100, 100), (1024, 64)])
def test_matches_float64(threads, m, n):
    lib = _lora_cpu.library()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    tested = []
    try:
        for r in _RANKS:
            if not lib.supports(r):
                continue
            dy, b, s_lora = _inputs(m, n, r, seed=r)
            full = torch.full((m, 3 * r), 7.0)
            out = full[:, r:2 * r]
            d_s, d_b = _lora_cpu.ds_db(dy, b, s_lora, 0.7, out)
            assert d_s is out and d_b.is_contiguous() and d_b.shape == (n, r)
            _check((d_s, d_b), _reference(dy, b, s_lora, 0.7))
            assert (full[:, :r] == 7).all() and (full[:, 2 * r:] == 7).all()  # only the block
            fresh = _lora_cpu.ds_db(dy, b, s_lora, 0.7)
            assert torch.equal(fresh[0], d_s) and torch.equal(fresh[1], d_b)
            tested.append(r)
        assert tested == [lib.lanes]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("march", ["x86-64-v3", None])
def test_builds_for_avx2_and_for_any_cpu_agree(march):
    """The loop compiled for AVX2 (8-float vectors, 16 registers: other row blocks, rank 8) and
    with no -march at all gives the same sums as the float64 reference."""
    if march is not None and "avx2" not in _native.cpu_flags():
        pytest.skip("this CPU has no AVX2")
    flags = ("-O3", "-fPIC", "-shared") + (() if march is None else (f"-march={march}",))
    built = _native.build("lora_cpu_test", [(_lora_cpu._SOURCE, flags)])
    assert built is not None
    lib = _lora_cpu._Library(built[0], built[1])
    assert lib.lanes == 8 and not lib.openmp
    assert [r for r in (0, 4, *_RANKS) if lib.supports(r)] == [8]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dy, b, s_lora = _inputs(77, 301, 8, seed=8)
        _check(_lora_cpu.run(lib, dy, b, s_lora, 1.5), _reference(dy, b, s_lora, 1.5))
        assert _lora_cpu.run(lib, *_inputs(77, 301, 16)[:3], 1.5) is None     # two vectors wide
    finally:
        torch.set_num_threads(previous)


def test_not_applicable_takes_the_blas_path(monkeypatch):
    lib = _lora_cpu.library()
    dy, b, s_lora = _inputs(20, 30, 16)
    assert _lora_cpu.ds_db(dy.double(), b.double(), s_lora.double(), 1.0) is None
    assert _lora_cpu.ds_db(dy.bfloat16(), b.bfloat16(), s_lora.bfloat16(), 1.0) is None
    assert not lib.supports(4) and _lora_cpu.ds_db(*_inputs(20, 30, 4)[:3], 1.0) is None
    assert _lora_cpu.ds_db(*_inputs(20, 30, 2 * lib.lanes)[:3], 1.0) is None    # two vectors
    assert _lora_cpu.ds_db(dy.t().contiguous().t(), b, s_lora, 1.0) is None   # column-major dY
    assert _lora_cpu.ds_db(dy[:0], b, s_lora[:0], 1.0) is None
    monkeypatch.setenv("LIGHTNING_PEFT_LORA_NATIVE", "0")
    assert _lora_cpu.library() is None and _lora_cpu.ds_db(dy, b, s_lora, 1.0) is None


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(5)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g) for o in outs])
    return [o.detach() for o in outs], [t.grad for t in leaves]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_ops_equal_with_and_without_the_loop(monkeypatch, dropout):
    """lora_linear, the grouped op and DoRA: the same outputs, and gradients equal to rounding,
    with the compiled loop and with it switched off (then dB comes from the two GEMMs). The rank
    is the one this machine's build takes (16 with AVX-512, else 8)."""
    r = _lora_cpu.library().lanes
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, 96, generator=g)
    ws = [torch.randn(n, 96, generator=g) * 0.1 for n in (80, 48, 48)]
    as_ = [torch.randn(r, 96, generator=g) * 0.1 for _ in ws]
    bs = [torch.randn(n, r, generator=g) * 0.1 for n in (80, 48, 48)]
    mag = torch.rand(80, generator=g) + 0.5

    def single(x, a, b):
        return kernels.lora_linear(x, ws[0], a, b, 2.0, dropout_p=dropout,
                                   generator=torch.Generator().manual_seed(3))

    def grouped(x, a0, a1, a2, b0, b1, b2):
        return kernels.lora_linear_grouped(x, ws, [a0, a1, a2], [b0, b1, b2], [2.0, 0.5, 1.0],
                                           dropout_p=dropout,
                                           generator=torch.Generator().manual_seed(3))

    def dora(x, a, b, m):
        return kernels.dora_linear(x, ws[0], a, b, 2.0, m, dropout_p=dropout,
                                   generator=torch.Generator().manual_seed(3))

    cases = [(single, (x, as_[0], bs[0])), (grouped, (x, *as_, *bs)),
             (dora, (x, as_[0], bs[0], mag))]
    calls = []
    real = _lora_cpu.run

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result is not None)                              # the loop really ran
        return result

    monkeypatch.setattr(_lora_cpu, "run", counted)
    with_loop = [_grads(fn, *args) for fn, args in cases]
    assert calls == [True] * (1 + 3 + 1)                               # every dS/dB pair
    monkeypatch.setenv("LIGHTNING_PEFT_LORA_NATIVE", "0")
    without = [_grads(fn, *args) for fn, args in cases]
    assert len(calls) == 5
    for (outs1, grads1), (outs2, grads2) in zip(with_loop, without):
        for o1, o2 in zip(outs1, outs2):
            assert torch.equal(o1, o2)
        for g1, g2 in zip(grads1, grads2):   # sums over the tokens in another order: float32
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5 * g2.abs().max().item())


def test_torch_compile_traces_the_gemms(monkeypatch):
    """``torch.compile(fullgraph=True)`` traces the op's backward with the two GEMMs (the ctypes
    loop cannot be traced), with the eager op's gradients."""
    calls = []
    real = _lora_cpu.run
    monkeypatch.setattr(_lora_cpu, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(23, 40, generator=g)
    args = [torch.randn(2, 19, 40, generator=g), torch.randn(16, 40, generator=g),
            torch.randn(23, 16, generator=g)]
    args = [t.requires_grad_(True) for t in args]

    def f(x, a, b):
        return kernels.lora_linear(x, w, a, b, 0.5).square().mean()

    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), args)
    assert not calls
    want = torch.autograd.grad(f(*args), args)
    assert len(calls) == 1
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_march_override_builds_for_that_target(monkeypatch):
    """``LIGHTNING_PEFT_LORA_MARCH=x86-64-v3`` builds the AVX2 loop (8-float vectors) on any CPU
    with AVX2, which is how the forced-AVX2 benchmark rows are measured on an AVX-512 machine;
    unset, ``-march=native``."""
    monkeypatch.delenv("LIGHTNING_PEFT_LORA_MARCH", raising=False)
    assert "-march=native" in _lora_cpu.flags()
    monkeypatch.setenv("LIGHTNING_PEFT_LORA_MARCH", "x86-64-v3")
    assert "-march=x86-64-v3" in _lora_cpu.flags() and "-march=native" not in _lora_cpu.flags()
    if "avx2" not in _native.cpu_flags():
        pytest.skip("this CPU has no AVX2 (the x86-64-v3 build could not run here)")
    lib = _lora_cpu._build()
    assert lib is not None and lib.lanes == 8 and lib.supports(8) and not lib.supports(16)
    dy, b, s_lora = _inputs(50, 70, 8, seed=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check(_lora_cpu.run(lib, dy, b, s_lora, 0.5), _reference(dy, b, s_lora, 0.5))
    finally:
        torch.set_num_threads(previous)
