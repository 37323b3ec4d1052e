"""Edge cases of the public ops found by review: autocast with a float32 weight, strided NF4
bias on the Triton path, second derivatives, empty batches, float64 Hadamard on the Triton
backend, in-place edits of ``nf4_linear``'s output, and errors that name the argument."""

import pytest
import torch
from torch import nn

import kernels
from kernels import hadamard_transform, ia3_linear, lora_linear, nf4_linear, quantize_nf4
from kernels.hadamard import hadamard_matrix
from kernels.lora import dora_linear, lora_linear_reference
from lightning_peft import apply_lora


def _operands(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, generator=g)
    w, a, b = torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    return x.to(dtype), w, a, b


def test_autocast_runs_a_float32_weight_in_the_autocast_dtype():
    """Under autocast a bf16 activation meets the fp32 frozen weight (as ``nn.Linear`` takes it):
    the ops and a LoRA layer run in bf16, equal to the inputs cast by hand (they used to refuse
    the dtypes before autocast's cast)."""
    x, w, a, b = _operands(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, a, b, 0.5)
        d = dora_linear(x, w, a, b, 0.5, torch.ones(6))
    bf = [t.to(torch.bfloat16) for t in (w, a, b)]
    assert y.dtype == d.dtype == torch.bfloat16
    torch.testing.assert_close(y, lora_linear_reference(x, *bf, 0.5), rtol=0, atol=0)
    model = apply_lora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6)), r=2, target_modules=["1"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model[1](x)  # a bf16 activation into the adapted fp32 layer
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("op", ["lora", "dora", "grouped"])
def test_second_derivatives_are_refused_not_wrong(op):
    """The fused backward does not build a graph through the saved ``S``: a second derivative
    is an error (it used to come out silently wrong)."""
    x, w, a, b = (t.double().requires_grad_() for t in _operands())
    if op == "lora":
        y = lora_linear(x, w.detach(), a, b, 1.0)
    elif op == "dora":
        y = dora_linear(x, w.detach(), a, b, 1.0, torch.ones(6, dtype=torch.float64))
    else:
        y = kernels.lora_linear_grouped(x, [w.detach()], [a], [b], [1.0])[0]
    (gb,) = torch.autograd.grad(y.square().sum(), b, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gb.sum().backward()


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_empty_batch_gives_zero_gradients(feedforward):
    x = torch.randn(2, 0, 8, requires_grad=True)
    vector = torch.ones(8 if feedforward else 6, requires_grad=True)
    ia3_linear(x, torch.randn(6, 8), vector, feedforward=feedforward).sum().backward()
    assert torch.equal(vector.grad, torch.zeros_like(vector)) and x.grad.shape == x.shape


def test_nf4_linear_output_may_be_edited_in_place():
    """As ``nn.Linear``'s: Falcon-style ``y += ...`` on a 4-bit layer that runs without its adapter
    (it used to be a view made inside the autograd Function)."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    q = quantize_nf4(torch.randn(6, 8))
    y = nf4_linear(x, q)
    y += 1.0
    y.sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize(torch.float32).sum(0).expand(2, 3, 8))


def test_triton_nf4_matmul_reads_a_strided_bias():
    """Small batches take the fused dequant-matmul kernel, which read the bias at unit stride."""
    q = quantize_nf4(torch.randn(24, 64), 32, True)
    x, bias = torch.randn(3, 64), torch.randn(48)[::2]
    with kernels.use_backend("triton"):
        got = nf4_linear(x, q, bias)
    torch.testing.assert_close(got, x @ q.dequantize(torch.float32).t() + bias, rtol=1e-5, atol=1e-5)


def test_float64_hadamard_stays_float64_on_the_triton_backend():
    x = torch.randn(4, 64, dtype=torch.float64)
    with kernels.use_backend("triton"):
        got = hadamard_transform(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x @ hadamard_matrix(64, torch.float64), rtol=1e-12, atol=1e-12)


_X, _W, _A, _B = _operands()


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((torch.tensor(1.0), _W, _A, _B, 1.0), {}, TypeError, r"x must be a floating-point tensor .*shape \(\)"),
    ((_X.long(), _W.long(), _A, _B, 1.0), {}, TypeError, r"x must be a floating-point tensor.*int64"),
    ((_X, torch.randn(8), _A, _B, 1.0), {}, ValueError, r"weight must be 2-D \(out, in\), got shape \(8,\)"),
    ((_X, _W, _A, _B, float("nan")), {}, ValueError, "scaling must be a finite number, got nan"),
    ((_X, _W, _A, _B, "2"), {}, ValueError, "scaling must be a finite number, got '2'"),
    ((_X, _W, _A, _B, 1.0), {"dropout_p": "0.1"}, ValueError, r"dropout_p must be a number in \[0, 1\)"),
])
def test_bad_arguments_name_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        lora_linear(*args, **kwargs)


def test_ia3_dtype_mismatch_and_nf4_overflow_name_their_argument():
    with pytest.raises(TypeError, match="weight dtype torch.float32 differs from x dtype torch.float16"):
        ia3_linear(torch.randn(3, 8).half(), torch.randn(6, 8), torch.ones(6))
    with pytest.raises(ValueError, match=r"maxima \(up to 2e\+38\) overflow float32.*double_quant=False"):
        quantize_nf4(torch.full((128,), 2e38), 64, True)
    plain = quantize_nf4(torch.full((128,), 2e38), 64, False)  # without double quantization: fine
    assert torch.equal(plain.dequantize(torch.float32), torch.full((128,), 2e38))
