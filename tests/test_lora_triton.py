"""The fused LoRA Triton kernels against the torch reference and float64.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest) in fp32 and fp16 on tiny,
awkward shapes; bf16, big shapes, ``torch.compile`` and autocast are checked in ``gpu`` tests.
"""

import json

import pytest
import torch
import triton

import kernels
from kernels import _lora_triton as T
from kernels.lora import lora_linear_reference
from tests._aot import compile_ahead

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # x max|ref|


@pytest.fixture(autouse=True)
def _triton_backend():
    with kernels.use_backend("triton"):
        yield


def _make(x_shape, n, r, dtype, bias=True, seed=0, device=DEVICE):
    """x (x_shape), W (n, K), A (r, K), B (n, r), bias (n,): float64 values, cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    vals = {
        "x": torch.randn(x_shape, generator=g, dtype=torch.float64),
        "w": torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5,
        "a": torch.randn(r, k, generator=g, dtype=torch.float64) / k**0.5,
        "b": torch.randn(n, r, generator=g, dtype=torch.float64) / r**0.5,
        "bias": torch.randn(n, generator=g, dtype=torch.float64) if bias else None,
    }
    return {name: None if v is None else v.to(device, dtype).requires_grad_()
            for name, v in vals.items()}


def _ref64(t, scaling, keep=None, p=0.0):
    """y and the float64 leaves of ``x·Wᵀ + s·(keep⊙x/(1-p)·Aᵀ)·Bᵀ + b``."""
    leaves = {k: None if v is None else v.detach().double().requires_grad_()
              for k, v in t.items()}
    x = leaves["x"]
    xd = x if keep is None else x * keep.reshape(x.shape).double() / (1.0 - p)
    y = x @ leaves["w"].t() + scaling * (xd @ leaves["a"].t()) @ leaves["b"].t()
    if leaves["bias"] is not None:
        y = y + leaves["bias"]
    return y, leaves


def _grads(y, tensors, grad_out):
    ts = [t for t in tensors if t is not None and t.requires_grad]
    gs = torch.autograd.grad(y, ts, grad_out)
    return gs


def _assert_close(got, want, dtype, what):
    scale = want.detach().abs().max().item() + 1e-6
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:.1g}·{scale:.3g}"


def _check_against_f64(t, y, scaling, keep=None, p=0.0, dtype=torch.float32):
    y64, leaves = _ref64(t, scaling, keep, p)
    _assert_close(y, y64, dtype, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    got = _grads(y, [t[k] for k in names], g.to(y.device, y.dtype))
    want = _grads(y64, [leaves[k] for k in names], g.to(y.device))
    for name, a, b in zip(names, got, want):
        assert a.shape == t[name].shape and a.dtype == t[name].dtype
        _assert_close(a, b, dtype, f"d{name}")


# fp32 covers every rank, bias/no bias and dropout on 2-D and 3-D x; fp16 a subset.
CASES = [
    # (dtype, x_shape, N, r, bias, dropout_p)
    (torch.float32, (37, 50), 23, 1, True, 0.0),
    (torch.float32, (37, 50), 23, 8, False, 0.0),
    (torch.float32, (37, 50), 23, 16, True, 0.25),
    (torch.float32, (37, 50), 23, 64, False, 0.1),
    (torch.float32, (3, 7, 50), 23, 8, True, 0.5),
    (torch.float32, (2, 9, 40), 33, 16, False, 0.0),
    (torch.float32, (37, 50), 23, 100, True, 0.2),                # rank in several chunks
    (torch.float16, (37, 50), 23, 8, True, 0.0),
    (torch.float16, (3, 7, 50), 23, 16, False, 0.3),
    (torch.float16, (37, 50), 23, 64, True, 0.1),
    (torch.float16, (37, 50), 23, 1, False, 0.0),
]


@pytest.mark.parametrize(("dtype", "x_shape", "n", "r", "bias", "p"), CASES)
def test_matches_float64_and_reference(dtype, x_shape, n, r, bias, p):
    t = _make(x_shape, n, r, dtype, bias)
    scaling = 2.0 / r
    torch.manual_seed(123)
    seed = T._draw_seed(None, t["x"].device)
    torch.manual_seed(123)
    y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], scaling, t["bias"], dropout_p=p)
    assert y.shape == (*x_shape[:-1], n) and y.dtype == dtype
    keep = T.dropout_keep_mask(seed, y.numel() // n, x_shape[-1], p) if p > 0 else None
    _check_against_f64(t, y, scaling, keep, p, dtype)
    if p == 0.0:  # the torch reference in the same dtype agrees too
        yr = lora_linear_reference(t["x"], t["w"], t["a"], t["b"], scaling, t["bias"])
        _assert_close(y, yr, dtype, "y vs lora_linear_reference")


def _kernel_name(kernel):
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn.__name__


def test_triton_path_runs(monkeypatch):
    launched = []
    real = T._launch
    monkeypatch.setattr(T, "_launch", lambda k, g, *a, **kw: (launched.append(_kernel_name(k)),
                                                              real(k, g, *a, **kw))[1])
    t = _make((37, 50), 23, 8, torch.float32)
    y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"], dropout_p=0.1)
    assert launched == ["_lora_down_kernel", "_lora_gemm_kernel"]
    y.sum().backward()
    assert launched[2:] == ["_lora_dy_kernel", "_lora_gemm_kernel"]
    launched.clear()
    with kernels.use_backend("torch"):
        kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])
    assert launched == []


def test_backward_launches_skip_unneeded_work(monkeypatch):
    launched = []
    real = T._launch
    monkeypatch.setattr(T, "_launch", lambda k, g, *a, **kw: (launched.append(_kernel_name(k)),
                                                              real(k, g, *a, **kw))[1])
    t = _make((37, 50), 23, 8, torch.float32)
    t["x"].requires_grad_(False)
    y = kernels.lora_linear(t["x"], t["w"].detach(), t["a"], t["b"], 0.5)
    launched.clear()
    y.sum().backward()
    assert launched == ["_lora_dy_kernel", "_lora_gemm_kernel"]  # dS/dB, then dA only
    assert t["w"].grad is None and t["x"].grad is None
    y64, leaves = _ref64({**t, "bias": None}, 0.5)
    y64.sum().backward()
    _assert_close(t["a"].grad, leaves["a"].grad, torch.float32, "dA")
    _assert_close(t["b"].grad, leaves["b"].grad, torch.float32, "dB")


@pytest.mark.parametrize("which", ["x", "a", "b", "w", "bias"])
def test_single_input_requires_grad(which):
    t = _make((2, 11, 50), 23, 4, torch.float32)
    for name, v in t.items():
        v.requires_grad_(name == which)
    y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.75, t["bias"], dropout_p=0.2)
    assert y.requires_grad
    torch.manual_seed(5)
    seed = T._draw_seed(None, t["x"].device)
    torch.manual_seed(5)
    y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.75, t["bias"], dropout_p=0.2)
    _check_against_f64(t, y, 0.75, T.dropout_keep_mask(seed, 22, 50, 0.2), 0.2)


def test_non_contiguous_inputs():
    t = _make((37, 50), 23, 8, torch.float32, bias=True)
    g = torch.Generator().manual_seed(7)
    # x: every other column of a wider tensor; W, A, B: transposes of their transposes.
    wide = torch.randn(37, 100, generator=g).to(DEVICE)
    x = wide[:, ::2].requires_grad_()
    w = t["w"].detach().t().contiguous().t().requires_grad_()
    a = t["a"].detach().t().contiguous().t().requires_grad_()
    b = t["b"].detach().t().contiguous().t().requires_grad_()
    bias = torch.randn(46, generator=g).to(DEVICE)[::2].requires_grad_()
    assert not any(v.is_contiguous() for v in (x, w, a, b, bias))
    nt = {"x": x, "w": w, "a": a, "b": b, "bias": bias}
    y = kernels.lora_linear(x, w, a, b, 0.5, bias)
    _check_against_f64(nt, y, 0.5)
    # 3-D x that is a permuted view (reshape copies it) and a non-contiguous grad_out.
    x3 = torch.randn(50, 5, 3, generator=g).to(DEVICE).permute(2, 1, 0).requires_grad_()
    nt["x"] = x3
    y3 = kernels.lora_linear(x3, w, a, b, 0.5, bias)
    y64, leaves = _ref64(nt, 0.5)
    _assert_close(y3, y64, torch.float32, "y (3-D view)")
    go = torch.randn(23, 5, 3, generator=g).to(DEVICE).permute(2, 1, 0)
    for got, want in zip(torch.autograd.grad(y3, [x3, a, b], go),
                         torch.autograd.grad(y64, [leaves["x"], leaves["a"], leaves["b"]],
                                             go.double())):
        _assert_close(got, want, torch.float32, "grad (3-D view)")


def test_dropout_is_seeded_and_reproducible():
    t = _make((37, 50), 23, 8, torch.float32)
    args = (t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])
    torch.manual_seed(0)
    y1 = kernels.lora_linear(*args, dropout_p=0.3)
    torch.manual_seed(0)
    y2 = kernels.lora_linear(*args, dropout_p=0.3)
    y3 = kernels.lora_linear(*args, dropout_p=0.3)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    g1 = torch.Generator(device=DEVICE).manual_seed(42)
    g2 = torch.Generator(device=DEVICE).manual_seed(42)
    assert torch.equal(kernels.lora_linear(*args, dropout_p=0.3, generator=g1),
                       kernels.lora_linear(*args, dropout_p=0.3, generator=g2))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics(p):
    seed = torch.tensor([987654321987], dtype=torch.int64, device=DEVICE)
    keep = T.dropout_keep_mask(seed, 96, 257, p).float()                   # (96, 257)
    n = keep.numel()
    std = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * std
    for lane in range(8):  # every one of the 8 16-bit lanes of a Philox draw is used
        lane_keep = keep[:, lane::8]
        assert abs(lane_keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / lane_keep.numel())**.5
    # neighbours are uncorrelated, and another seed gives another mask
    centred = keep - keep.mean()
    corr = (centred[:, 1:] * centred[:, :-1]).mean() / centred.var()
    assert abs(corr.item()) < 0.05
    other = T.dropout_keep_mask(seed + 1, 96, 257, p).float()
    assert (other != keep).float().mean().item() > p * (1 - p)


def test_forward_mask_is_the_helper_mask():
    """W0 = 0, A = B = I, s = 1: y = keep⊙x/(1-p) shows the mask the forward used."""
    m, k, p = 29, 24, 0.4
    x = torch.randn(m, k, device=DEVICE) + 3.0                              # no zeros
    eye = torch.eye(k, device=DEVICE)
    torch.manual_seed(11)
    seed = T._draw_seed(None, x.device)
    torch.manual_seed(11)
    y = kernels.lora_linear(x, torch.zeros(k, k, device=DEVICE), eye, eye, 1.0, dropout_p=p)
    keep = T.dropout_keep_mask(seed, m, k, p)
    assert torch.equal(y != 0, keep)
    torch.testing.assert_close(y[keep], x[keep] / (1 - p))
    # and the backward uses the same mask: dX = keep⊙dY/(1-p) here, dA = dYᵀ·(keep⊙x)/(1-p)
    xg = x.clone().requires_grad_()
    a = eye.clone().requires_grad_()
    torch.manual_seed(11)
    y = kernels.lora_linear(xg, torch.zeros(k, k, device=DEVICE), a, eye, 1.0, dropout_p=p)
    go = torch.randn(m, k, device=DEVICE)
    y.backward(go)
    torch.testing.assert_close(xg.grad, go * keep / (1 - p))
    torch.testing.assert_close(a.grad, go.t() @ (x * keep) / (1 - p))


@pytest.mark.parametrize("target", [1, 64])
def test_split_and_unsplit_reductions_agree(monkeypatch, target):
    t = _make((37, 50), 23, 8, torch.float32)
    monkeypatch.setattr(T, "_target_programs", lambda device: target)
    torch.manual_seed(3)
    seed = T._draw_seed(None, t["x"].device)
    torch.manual_seed(3)
    y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"], dropout_p=0.2)
    _check_against_f64(t, y, 0.5, T.dropout_keep_mask(seed, 37, 50, 0.2), 0.2)


def test_int64_offsets_path(monkeypatch):
    assert T._needs_int64(torch.empty(1).expand(2**31))
    assert not T._needs_int64(torch.empty(4, 4), None)
    t = _make((37, 50), 23, 8, torch.float32)
    args = (t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])
    torch.manual_seed(9)
    y32 = kernels.lora_linear(*args, dropout_p=0.3)
    g32 = torch.autograd.grad(y32.sum(), [t["x"], t["a"], t["b"]])
    monkeypatch.setattr(T, "_needs_int64", lambda *tensors: True)
    torch.manual_seed(9)
    y64 = kernels.lora_linear(*args, dropout_p=0.3)                         # same mask too
    g64 = torch.autograd.grad(y64.sum(), [t["x"], t["a"], t["b"]])
    torch.testing.assert_close(y64, y32, rtol=0, atol=1e-6)
    for a, b in zip(g64, g32):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _twice_deterministic(run):
    """Two calls of ``run()`` under ``torch.use_deterministic_algorithms(True)``."""
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        return [run(), run()]
    finally:
        torch.use_deterministic_algorithms(previous)


def test_deterministic_mode_is_bitwise_reproducible():
    t = _make((37, 50), 23, 16, torch.float32)
    args = (t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])

    def run():
        torch.manual_seed(4)
        y = kernels.lora_linear(*args, dropout_p=0.2)
        return [y, *torch.autograd.grad(y.square().sum(), [t["x"], t["a"], t["b"]])]

    results = _twice_deterministic(run)
    atomic = run()
    for a, b, c in zip(*results, atomic):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    t = _make((0, 50), 23, 8, torch.float32)
    y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])
    assert y.shape == (0, 23)
    y.sum().backward()
    assert torch.equal(t["a"].grad, torch.zeros_like(t["a"]))
    assert torch.equal(t["b"].grad, torch.zeros_like(t["b"]))
    assert t["x"].grad.shape == (0, 50)


# ---------------------------------------------------------------------------------------------
# Grouped op
# ---------------------------------------------------------------------------------------------


def _group(dtype=torch.float32, ranks=(8, 4, 16), outs=(23, 9, 40), k=50, lead=(3, 7)):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, k, generator=g).to(DEVICE, dtype).requires_grad_()
    ws = [(torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype).requires_grad_()
          for n in outs]
    as_ = [(torch.randn(r, k, generator=g) / k**0.5).to(DEVICE, dtype).requires_grad_()
           for r in ranks]
    bs = [(torch.randn(n, r, generator=g) / r**0.5).to(DEVICE, dtype).requires_grad_()
          for n, r in zip(outs, ranks)]
    biases = [None if i % 2 else torch.randn(n, generator=g).to(DEVICE, dtype).requires_grad_()
              for i, n in enumerate(outs)]                                  # member 1: no bias
    return x, ws, as_, bs, [2.0, 0.5, 0.25][:len(outs)], biases


def _leaves(x, ws, as_, bs, biases):
    return [x, *ws, *as_, *bs, *[b for b in biases if b is not None]]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_grouped_matches_separate_ops(p):
    x, ws, as_, bs, ss, biases = _group()
    torch.manual_seed(8)
    seed = T._draw_seed(None, x.device)
    torch.manual_seed(8)
    ys = T.lora_linear_grouped(x, ws, as_, bs, ss, biases, dropout_p=p)
    assert [y.shape for y in ys] == [(3, 7, 23), (3, 7, 9), (3, 7, 40)]
    keep = T.dropout_keep_mask(seed, 21, 50, p) if p > 0 else None
    leaves = _leaves(x, ws, as_, bs, biases)
    leaves64 = [v.detach().double().requires_grad_() for v in leaves]
    x64, it = leaves64[0], iter(leaves64[1:])
    ws64, as64, bs64 = [next(it) for _ in ws], [next(it) for _ in as_], [next(it) for _ in bs]
    b64 = [None if b is None else next(it) for b in biases]
    xd = x64 if keep is None else x64 * keep.reshape(x.shape).double() / (1 - p)
    ys64 = [x64 @ w.t() + s * (xd @ a.t()) @ b.t() + (0 if bb is None else bb)
            for w, a, b, s, bb in zip(ws64, as64, bs64, ss, b64)]
    gos = [torch.randn(y.shape, dtype=torch.float64, device=y.device) for y in ys]
    for y, y64 in zip(ys, ys64):
        _assert_close(y, y64, torch.float32, "y_i")
    got = torch.autograd.grad(ys, leaves, [g.float() for g in gos])
    want = torch.autograd.grad(ys64, leaves64, gos)
    for i, (a, b) in enumerate(zip(got, want)):
        _assert_close(a, b, torch.float32, f"grad of leaf {i}")
    if p == 0.0:  # separate fused ops and the grouped torch reference agree
        sep = [kernels.lora_linear(x, w, a, b, s, bb) for w, a, b, s, bb in
               zip(ws, as_, bs, ss, biases)]
        ref = T.lora_linear_grouped_reference(x, ws, as_, bs, ss, biases)
        for y, y1, y2 in zip(ys, sep, ref):
            _assert_close(y, y1, torch.float32, "grouped vs separate")
            _assert_close(y, y2, torch.float32, "grouped vs reference")


def test_grouped_fp16_and_partial_grads():
    x, ws, as_, bs, ss, biases = _group(torch.float16, ranks=(8, 8), outs=(23, 17), lead=(37,))
    x.requires_grad_(False)
    ys = T.lora_linear_grouped(x, ws, as_, bs, ss, biases)
    ref = T.lora_linear_grouped_reference(x.double(), [w.double() for w in ws],
                                          [a.double() for a in as_], [b.double() for b in bs],
                                          ss, [None if b is None else b.double() for b in biases])
    for y, r in zip(ys, ref):
        _assert_close(y, r, torch.float16, "y_i fp16")
    # only the second output is used: the first gets a zero gradient
    leaves = [as_[0], as_[1], bs[0], bs[1]]
    got = torch.autograd.grad(ys[1].float().sum(), leaves)
    want = torch.autograd.grad(ref[1].sum(), leaves, allow_unused=True)
    for a, b in zip(got, want):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        _assert_close(a, b, torch.float16, "grad fp16")


def test_grouped_reference_shares_the_mask():
    x, ws, as_, bs, ss, biases = _group(ranks=(4, 4), outs=(9, 9), lead=(5,))
    ys = T.lora_linear_grouped_reference(x, [torch.zeros_like(w) for w in ws], [as_[0], as_[0]],
                                         [bs[0], bs[0]], [1.0, 1.0], None, dropout_p=0.5,
                                         generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert torch.equal(ys[0], ys[1])


@pytest.mark.parametrize(("change", "error", "match"), [
    (lambda a: a.update(weights=[]), ValueError, "weights"),
    (lambda a: a.update(lora_as=a["lora_as"][:1]), ValueError, "lora_as"),
    (lambda a: a.update(lora_bs=[a["lora_bs"][0].t(), a["lora_bs"][1]]), ValueError, "lora_bs"),
    (lambda a: a.update(weights=[a["weights"][0].double(), a["weights"][1]]), TypeError,
     "weights"),
    (lambda a: a.update(biases=[torch.zeros(3), None]), ValueError, "biases"),
    (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p"),
    (lambda a: a.update(scalings=["2", 1.0]), TypeError, "scalings"),
])
def test_grouped_rejects_bad_arguments(change, error, match):
    x, ws, as_, bs, ss, biases = _group(ranks=(4, 4), outs=(9, 9), lead=(5,))
    kwargs = dict(weights=ws, lora_as=as_, lora_bs=bs, scalings=ss, biases=biases)
    change(kwargs)
    with pytest.raises(error, match=match):
        T.lora_linear_grouped(x, **kwargs)


def test_torch_compile_fullgraph_traces_the_ops():
    """Dynamo + AOTAutograd trace the wrappers and the registered autograd without graph breaks
    (on CPU the ops stay opaque; the gpu test below compiles the kernels with inductor)."""
    t = _make((2, 19, 40), 23, 8, torch.float32)
    args = [t[k] for k in ("x", "w", "a", "b", "bias")]

    def f(x, w, a, b, bias):
        return kernels.lora_linear(x, w, a, b, 0.5, bias, dropout_p=0.1).square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    loss = compiled(*args)
    got = torch.autograd.grad(loss, args)
    torch.manual_seed(1)
    want_loss = f(*args)
    want = torch.autograd.grad(want_loss, args)
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    x, ws, as_, bs, ss, biases = _group(ranks=(4, 8), outs=(16, 9), k=40, lead=(2, 5))

    def g(x, ws, as_, bs, biases):
        return sum(y.sum() for y in T.lora_linear_grouped(x, ws, as_, bs, ss, biases))

    torch.compile(g, fullgraph=True, backend="aot_eager")(x, ws, as_, bs, biases).backward()
    got = [v.grad for v in (x, *as_, *bs)]
    for v in (x, *as_, *bs):
        v.grad = None
    g(x, ws, as_, bs, biases).backward()
    for a, v in zip(got, (x, *as_, *bs)):
        torch.testing.assert_close(a, v.grad)


_HOPPER_COMPILE = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from kernels import _lora_triton as T

compiled = []

def compile_launch(kernel, grid, *args, **kwargs):
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    configs = kernel.configs[:2] if isinstance(kernel, Autotuner) else [None]
    for cfg in configs:
        consts = dict(kwargs)
        if cfg is None:
            opts = {k: consts.pop(k) for k in ("num_warps", "num_stages")}
        else:
            consts.update(cfg.kwargs)
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        sig, attrs = {}, {}
        for i, (name, v) in enumerate(zip(fn.arg_names, args)):
            if isinstance(v, torch.Tensor):
                sig[name] = "*" + {torch.bfloat16: "bf16", torch.float32: "fp32",
                                   torch.int64: "i64"}[v.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[name] = "fp32"
            elif v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        for name in consts:
            sig[name] = "constexpr"
        k = triton.compile(triton.compiler.ASTSource(fn, sig, consts, attrs),
                           target=GPUTarget("cuda", 90, 32), options=opts)
        ttgir = k.asm["ttgir"]
        compiled.append({"kernel": fn.__name__, "smem": k.metadata.shared,
                         "async": ttgir.count("async_copy_global_to_local"),
                         "wgmma": ttgir.count("ttng.warp_group_dot ")})

T._launch = compile_launch
adapter_dtype = getattr(torch, os.environ["LORA_ADAPTER_DTYPE"])
torch.set_float32_matmul_precision("high")  # fp32 adapters: rank-r dots in tf32 (wgmma)
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 256, generator=g).bfloat16().requires_grad_()
w = torch.randn(384, 256, generator=g).bfloat16()
a = torch.randn(16, 256, generator=g).to(adapter_dtype).requires_grad_()
b = torch.randn(384, 16, generator=g).to(adapter_dtype).requires_grad_()
y = T.lora_linear_triton(x, w, a, b, 2.0, None, 0.1, None)
y.backward(torch.ones_like(y))
print(json.dumps(compiled))
"""


@pytest.mark.parametrize("adapter_dtype", ["bfloat16", "float32"])
def test_kernels_compile_for_hopper(adapter_dtype):
    """Ahead-of-time compile (ptxas, no GPU needed) of every launch of a bf16 forward+backward
    with dropout for sm_90, with bf16 adapters or fp32 ones (rank-r dots in tf32): the GEMMs' main
    loops are pipelined (async copies) and use wgmma, and each kernel fits in shared memory."""
    compiled = compile_ahead(_HOPPER_COMPILE, LORA_ADAPTER_DTYPE=adapter_dtype)
    kinds = [c["kernel"] for c in compiled]
    assert kinds == ["_lora_down_kernel", "_lora_gemm_kernel", "_lora_gemm_kernel",
                     "_lora_dy_kernel", "_lora_gemm_kernel", "_lora_gemm_kernel"], kinds
    for c in compiled:
        assert c["async"] > 0 and c["wgmma"] > 0, c
        assert c["smem"] <= 227 * 1024, c


def test_benchmark_smoke(tmp_path):
    from benchmarks import kernels_lora

    assert kernels_lora.main(["--smoke", "--out", str(tmp_path)]) == 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    impls = {row["impl"] for row in data["results"]}
    assert {"fused", "reference", "peft", "base"} <= impls
    for row in data["results"]:
        assert row["ms"] > 0 and row["tflops"] > 0 and row["ratio_to_base"] > 0
    assert list(tmp_path.glob("*.png"))


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("x_shape", "n", "r"), [((4, 999, 1024), 3000, 16), ((2048, 4096), 4096,
                                                                               64)])
def test_gpu_bf16_big_shapes(x_shape, n, r):
    t = _make(x_shape, n, r, torch.bfloat16, bias=True)
    y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])
    with kernels.use_backend("torch"):
        yr = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])
    _assert_close(y, yr, torch.bfloat16, "bf16 y vs reference")
    _check_against_f64(t, y, 0.5, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_bf16_dropout_and_grouped():
    t = _make((3, 333, 512), 700, 16, torch.bfloat16)
    torch.manual_seed(1)
    seed = T._draw_seed(None, t["x"].device)
    torch.manual_seed(1)
    y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"], dropout_p=0.1)
    _check_against_f64(t, y, 0.5, T.dropout_keep_mask(seed, 999, 512, 0.1), 0.1,
                       torch.bfloat16)
    x, ws, as_, bs, ss, biases = _group(torch.bfloat16, k=512, lead=(4, 100))
    ys = T.lora_linear_grouped(x, ws, as_, bs, ss, biases)
    for y, w, a, b, s, bb in zip(ys, ws, as_, bs, ss, biases):
        _assert_close(y, lora_linear_reference(x, w, a, b, s, bb), torch.bfloat16, "grouped")


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    t = _make((4, 100, 256), 384, 16, torch.float16)

    def f(x, w, a, b, bias):
        return kernels.lora_linear(x, w, a, b, 0.5, bias).float().square().mean()

    compiled = torch.compile(f, fullgraph=True)
    args = [t[k] for k in ("x", "w", "a", "b", "bias")]
    loss = compiled(*args)
    got = torch.autograd.grad(loss, args)
    want_loss = f(*args)
    want = torch.autograd.grad(want_loss, args)
    torch.testing.assert_close(loss, want_loss, rtol=2e-3, atol=2e-3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)

    def g(x, ws, as_, bs, biases):
        return sum(y.float().sum() for y in T.lora_linear_grouped(x, ws, as_, bs, [1.0, 2.0],
                                                                   biases, dropout_p=0.1))

    x, ws, as_, bs, _, biases = _group(torch.float16, ranks=(8, 8), outs=(64, 32), k=128)
    torch.compile(g, fullgraph=True)(x, ws, as_, bs, biases).backward()
    assert x.grad is not None and all(a.grad is not None for a in as_)


@pytest.mark.gpu
def test_gpu_autocast():
    t = _make((300, 512), 256, 16, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])
        ys = T.lora_linear_grouped(t["x"], [t["w"]], [t["a"]], [t["b"]], [0.5], [t["bias"]])
    assert y.dtype == torch.bfloat16 and ys[0].dtype == torch.bfloat16
    _assert_close(y, ys[0], torch.bfloat16, "autocast grouped vs single")
    y.float().sum().backward()
    assert t["a"].grad.dtype == torch.float32 and t["x"].grad.dtype == torch.float32
    y64, leaves = _ref64(t, 0.5)
    _assert_close(y, y64, torch.bfloat16, "autocast y")


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_gpu_fp32_adapters_on_a_half_precision_base(x_dtype):
    """x, W0, bias in bf16/fp16 with fp32 A, B (HF PEFT's autocast_adapter_dtype): the rank-r
    products run in fp32 inside the kernels; fp32 adapter gradients, single and grouped, dropout."""
    t = _make((3, 333, 512), 700, 16, torch.float32)
    for k in ("x", "w", "bias"):
        t[k] = t[k].detach().to(x_dtype).requires_grad_()
    torch.manual_seed(1)
    seed = T._draw_seed(None, t["x"].device)
    torch.manual_seed(1)
    y = kernels.lora_linear(t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"], dropout_p=0.1)
    assert y.dtype == x_dtype
    y64, leaves = _ref64(t, 0.5, T.dropout_keep_mask(seed, 999, 512, 0.1), 0.1)
    _assert_close(y, y64, x_dtype, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, x_dtype)
    names = ["x", "w", "a", "b", "bias"]
    got = torch.autograd.grad(y, [t[k] for k in names], g)
    want = torch.autograd.grad(y64, [leaves[k] for k in names], g.double())
    for name, a, b in zip(names, got, want):
        assert a.dtype == t[name].dtype
        _assert_close(a, b, torch.float32 if name in ("a", "b") else x_dtype, f"d{name}")
    x, ws, as_, bs, ss, biases = _group(torch.float32, k=512, lead=(4, 100))
    x, ws = x.detach().to(x_dtype).requires_grad_(), [w.detach().to(x_dtype) for w in ws]
    biases = [None if b is None else b.detach().to(x_dtype) for b in biases]
    ys = T.lora_linear_grouped(x, ws, as_, bs, ss, biases)
    refs = T.lora_linear_grouped_reference(x.double(), [w.double() for w in ws],
                                           [a.double() for a in as_], [b.double() for b in bs], ss,
                                           [None if b is None else b.double() for b in biases])
    gos = [torch.randn(y.shape, device=DEVICE).to(x_dtype) for y in ys]
    got = torch.autograd.grad(ys, [*as_, *bs], gos)
    want = torch.autograd.grad(refs, [*as_, *bs], [g.double() for g in gos])
    for y, r in zip(ys, refs):
        assert y.dtype == x_dtype
        _assert_close(y, r, x_dtype, "grouped y")
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        _assert_close(a, b, torch.float32, "grouped adapter grad")


@pytest.mark.gpu
def test_gpu_determinism():
    t = _make((4096, 1024), 1024, 16, torch.bfloat16)
    args = (t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])

    def run():
        torch.manual_seed(0)
        y = kernels.lora_linear(*args, dropout_p=0.1)
        return [y, *torch.autograd.grad(y.float().square().sum(), [t["x"], t["a"], t["b"]])]

    runs = _twice_deterministic(run)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_float64_runs_the_reference_on_the_triton_backend():
    """The kernels accumulate in fp32 and ``tl.dot`` on fp64 operands into it gave garbage (errors
    as large as the outputs): float64 operands take the PyTorch reference on every backend, so
    the ops equal it bit for bit (a gradcheck on CUDA reaches this)."""
    from kernels.lora import dora_linear_reference, lora_linear_grouped_reference

    t = _make((5, 33), 17, 3, torch.float64)
    args = (t["x"], t["w"], t["a"], t["b"], 0.5, t["bias"])
    assert torch.equal(kernels.lora_linear(*args), lora_linear_reference(*args))
    ws, as_, bs = [t["w"], t["w"][:7]], [t["a"], t["a"][:2]], [t["b"], t["b"][:7, :2]]
    got = kernels.lora_linear_grouped(t["x"], ws, as_, bs, [0.5, 2.0])
    want = lora_linear_grouped_reference(t["x"], ws, as_, bs, [0.5, 2.0])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    m = torch.rand(17, dtype=torch.float64) + 0.5
    dora = kernels.dora_linear(*args[:5], m, t["bias"])
    assert torch.equal(dora, dora_linear_reference(*args[:5], m, t["bias"]))


def test_grouped_arguments_are_checked_as_on_the_torch_backend():
    """The Triton grouped op returned inf/NaN for a non-finite scaling and raised Triton's own
    assertion for integer inputs; it now gives the torch backend's errors."""
    t = _make((5, 33), 17, 3, torch.float32)
    ws, as_, bs = [t["w"], t["w"]], [t["a"], t["a"]], [t["b"], t["b"]]
    for scaling in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scaling must be a finite number"):
            kernels.lora_linear_grouped(t["x"], ws, as_, bs, [0.5, scaling])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        kernels.lora_linear_grouped(t["x"].long(), [w.long() for w in ws], as_, bs, [0.5, 0.5])
    with pytest.raises(TypeError, match="x must be a floating-point tensor .* shape \\(\\)"):
        kernels.lora_linear_grouped(t["x"][0, 0], ws, as_, bs, [0.5, 0.5])
    with pytest.raises(TypeError, match="lora_a must be a floating-point tensor, got NoneType"):
        kernels.lora_linear_grouped(t["x"], ws, [t["a"], None], bs, [0.5, 0.5])


def test_dropout_mask_is_the_same_with_int32_and_int64_offsets():
    """Forward and backward choose 64-bit offsets separately (by their own tensors' sizes), so the
    mask must not depend on the counter's width: the kernel runs the 32-bit Philox on the
    counter's two words itself (before Triton 3.4 ``randint4x`` ran a 64-bit Philox on int64
    counters: other masks, and a drop rate near 0.5 in half the lanes)."""
    seed = torch.tensor([123456789], dtype=torch.int64, device=DEVICE)
    rows, cols, p = 37, 200, 0.3
    masks = []
    for int64 in (False, True):
        out = torch.empty((rows, cols), dtype=torch.int8, device=DEVICE)
        T._launch(T._mask_kernel, (triton.cdiv(rows, 32), triton.cdiv(cols, 64)), seed, out, rows, cols,
                  T._threshold(p), INT64=int64, BM=32, BN=64)
        masks.append(out.bool())
    assert torch.equal(masks[0], masks[1])
    assert abs(1 - masks[0].float().mean().item() - p) < 0.05
    for lane in range(8):  # every lane of a Philox group drops at the rate
        assert abs(1 - masks[0][:, lane::8].float().mean().item() - p) < 0.1
