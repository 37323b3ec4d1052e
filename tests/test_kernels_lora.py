"""kernels.lora_linear and lora_linear_grouped on both backends: outputs that models edit in place,
and adapters kept in a wider dtype than the base (fp32 A, B on a bf16/fp16 x and W0), each against
a float64 reference, forward and backward."""

import copy

import pytest
import torch
import transformers
from torch import nn

import kernels
from kernels import _lora_triton as T
from lightning_peft import apply_lora
from lightning_peft.methods.lora import lora_layers
from tests import _tiny

OUTS, RANKS, SCALINGS = (16, 8, 12), (4, 2, 3), (2.0, 0.5, 1.5)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _inputs(x_dtype, adapter_dtype, n=1, lead=(3, 5), k=24, seed=0):
    """x (lead, k), and per member W (out, k), A (r, k), B (out, r), bias (out,) (member 1 has none),
    float64 values rounded to the given dtypes; every tensor requires grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64).to(x_dtype).requires_grad_()
    ws, as_, bs, biases = [], [], [], []
    for i, (out, r) in enumerate(zip(OUTS[:n], RANKS[:n])):
        ws.append((torch.randn(out, k, generator=g, dtype=torch.float64) / k**0.5).to(x_dtype))
        as_.append((torch.randn(r, k, generator=g, dtype=torch.float64) / k**0.5).to(adapter_dtype))
        bs.append((torch.randn(out, r, generator=g, dtype=torch.float64) / r**0.5).to(adapter_dtype))
        biases.append(None if i == 1 else torch.randn(out, generator=g, dtype=torch.float64).to(x_dtype))
    for t in (*ws, *as_, *bs, *[b for b in biases if b is not None]):
        t.requires_grad_()
    return x, ws, as_, bs, list(SCALINGS[:n]), biases


def _leaves(x, ws, as_, bs, biases):
    return [x, *ws, *as_, *bs, *[b for b in biases if b is not None]]


def _reference(x, ws, as_, bs, scalings, biases, keep=None, p=0.0):
    """The formula in float64 on float64 copies of the inputs: (outputs, leaves)."""
    x64, ws64, as64, bs64 = (x.detach().double().requires_grad_(),
                             *([t.detach().double().requires_grad_() for t in ts] for ts in (ws, as_, bs)))
    b64 = [None if b is None else b.detach().double().requires_grad_() for b in biases]
    xd = x64 if keep is None else x64 * keep.reshape(x.shape) / (1.0 - p)
    ys = [x64 @ w.t() + s * (xd @ a.t()) @ b.t() + (0 if bb is None else bb)
          for w, a, b, s, bb in zip(ws64, as64, bs64, scalings, b64)]
    return ys, _leaves(x64, ws64, as64, bs64, b64)


def _close(got, want, dtype, what):
    scale = want.detach().abs().max().item() + 1e-12
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:.1g}·{scale:.3g}"


def _run(op, x, ws, as_, bs, ss, biases, p=0.0, generator=None):
    if op == "single":
        return (kernels.lora_linear(x, ws[0], as_[0], bs[0], ss[0], biases[0], dropout_p=p,
                                    generator=generator),)
    return kernels.lora_linear_grouped(x, ws, as_, bs, ss, biases, dropout_p=p, generator=generator)


def _keep_mask(backend, gen, rows, cols, p):
    """The keep mask the op applies when called right after ``gen.manual_seed(9)``."""
    if backend == "triton":
        return T.dropout_keep_mask(T._draw_seed(gen.manual_seed(9), torch.device("cpu")), rows, cols,
                                   p).double()
    return kernels.lora.dropout_keep_mask((rows, cols), p, gen.manual_seed(9)).double()


# ------------------------------------------------------------------ in-place edits of the outputs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["single", "grouped"])
def test_outputs_can_be_edited_in_place(backend, op):
    """``out += other; out.mul_(2)`` works on every output, as on nn.Linear's (Falcon adds the
    attention output into the MLP's in place), with gradients of the float64 formula."""
    n = 1 if op == "single" else 3
    dtype = torch.float64 if backend == "torch" else torch.float32
    x, ws, as_, bs, ss, biases = _inputs(dtype, dtype, n)
    others = [torch.randn(*x.shape[:-1], o, dtype=dtype).requires_grad_() for o in OUTS[:n]]
    with kernels.use_backend(backend):
        ys = _run(op, x, ws, as_, bs, ss, biases)
        for y, other in zip(ys, others):
            y += other
            y.mul_(2.0)
    ys64, leaves64 = _reference(x, ws, as_, bs, ss, biases)
    ys64 = [(y + o.detach().double()) * 2.0 for y, o in zip(ys64, others)]
    gos = [torch.randn(y.shape, dtype=torch.float64) for y in ys64]
    for y, y64 in zip(ys, ys64):
        _close(y, y64, dtype, "edited output")
    leaves = _leaves(x, ws, as_, bs, biases)
    got = torch.autograd.grad(ys, leaves + others, [g.to(dtype) for g in gos])
    want = torch.autograd.grad(ys64, leaves64, gos)
    for i, (a, b) in enumerate(zip(got, want)):
        _close(a, b, dtype, f"grad of leaf {i}")
    for a, go in zip(got[len(leaves):], gos):
        _close(a, 2.0 * go, dtype, "grad of the added tensor")


@pytest.mark.parametrize("op", ["single", "grouped", "dora", "nf4"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_without_autograd_the_same_output_without_a_graph(op, mode, p):
    """With nothing to record (``no_grad``, ``inference_mode``, or no input requiring a gradient)
    the torch path runs the forward math without an autograd Function: the outputs are the
    recorded op's bit for bit (same dropout draw from the same generator state), have no
    ``grad_fn``, and are fresh tensors."""
    n = 3 if op == "grouped" else 1
    x, ws, as_, bs, ss, biases = _inputs(torch.float32, torch.float32, n)
    if op == "nf4":
        ws = [kernels.quantize_nf4(ws[0].detach())]
    magnitude = torch.rand(OUTS[0], generator=torch.Generator().manual_seed(3)) + 0.5

    def run(gen):
        if op == "dora":
            return (kernels.dora_linear(x, ws[0], as_[0], bs[0], ss[0], magnitude, biases[0],
                                        dropout_p=p, generator=gen),)
        return _run("single" if op == "nf4" else op, x, ws, as_, bs, ss, biases, p, gen)

    with kernels.use_backend("torch"):
        recorded = run(torch.Generator().manual_seed(5))
        assert all(y.grad_fn is not None for y in recorded)
        if mode == "frozen":
            for t in (x, *as_, *bs, *[w for w in ws if isinstance(w, torch.Tensor)],
                      *[b for b in biases if b is not None]):
                t.requires_grad_(False)
            plain = run(torch.Generator().manual_seed(5))
        else:
            with getattr(torch, mode)():
                plain = run(torch.Generator().manual_seed(5))
    for got, want in zip(plain, recorded):
        assert got.grad_fn is None and not got.requires_grad
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
        assert got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        if mode != "inference_mode":  # (an inference tensor is edited inside inference mode only)
            got.mul_(2.0)  # models edit layer outputs in place


class _PlainLoRA(nn.Module):
    """``base(x) + s·(x·Aᵀ)·Bᵀ`` with plain torch ops: the reference layer."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.lora_A = nn.Parameter(lora_a.detach().clone())
        self.lora_B = nn.Parameter(lora_b.detach().clone())

    def forward(self, x):
        return self.base(x) + self.scaling * nn.functional.linear(nn.functional.linear(x, self.lora_A),
                                                                  self.lora_B)


def test_falcon_training_step_with_lora_on_every_linear_layer():
    """Falcon adds the attention output into the MLP's output in place (``mlp_output +=
    attention_output``, a LoRA layer's output here): a training step runs and its loss and adapter
    gradients equal those of plain-torch LoRA layers."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, parallel_attn=True,
                                       new_decoder_architecture=False)
    model = transformers.FalconForCausalLM(config)
    reference = copy.deepcopy(model)
    apply_lora(model, r=4, alpha=8.0, target_modules="all-linear")
    _tiny.randomize_lora(model)
    layers = dict(lora_layers(model))
    assert any(name.endswith("dense_4h_to_h") for name in layers)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child,
                _PlainLoRA(reference.get_submodule(name), layer.lora_A, layer.lora_B, layer.scaling))
    model.train()
    reference.train()
    ids = torch.randint(0, 64, (2, 9))
    loss = model(ids, labels=ids).loss
    loss.backward()
    ref_loss = reference(ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for name, layer in layers.items():
        plain = reference.get_submodule(name)
        assert layer.lora_B.grad.abs().sum() > 0, name
        torch.testing.assert_close(layer.lora_A.grad, plain.lora_A.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, plain.lora_B.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ adapters wider than the base


MIXED = [("torch", torch.bfloat16, 0.0), ("torch", torch.float16, 0.0), ("torch", torch.bfloat16, 0.3),
         ("triton", torch.float16, 0.0), ("triton", torch.float16, 0.3)]  # no bf16 tl.dot in the interpreter


@pytest.mark.parametrize(("backend", "x_dtype", "p"), MIXED)
@pytest.mark.parametrize("op", ["single", "grouped"])
def test_fp32_adapters_on_a_half_precision_base(backend, x_dtype, p, op):
    """x, W0, bias in bf16/fp16, A and B in fp32: the branch computes in fp32, the output is in x's
    dtype, A and B get fp32 gradients accurate to fp32 and x, W0, bias gradients in x's dtype."""
    n = 1 if op == "single" else 3
    x, ws, as_, bs, ss, biases = _inputs(x_dtype, torch.float32, n)
    gen = torch.Generator()
    keep = _keep_mask(backend, gen, 15, 24, p) if p else None
    with kernels.use_backend(backend):
        gen.manual_seed(9)
        ys = _run(op, x, ws, as_, bs, ss, biases, p, gen)
    ys64, leaves64 = _reference(x, ws, as_, bs, ss, biases, keep, p)
    gos = [torch.randn(y.shape, dtype=torch.float64).to(x_dtype).double() for y in ys64]
    for y, y64 in zip(ys, ys64):
        assert y.dtype == x_dtype
        _close(y, y64, x_dtype, "y")
    leaves = _leaves(x, ws, as_, bs, biases)
    got = torch.autograd.grad(ys, leaves, [g.to(x_dtype) for g in gos])
    want = torch.autograd.grad(ys64, leaves64, gos)
    adapters = {id(t) for t in (*as_, *bs)}
    for i, (leaf, a, b) in enumerate(zip(leaves, got, want)):
        assert a.dtype == leaf.dtype, f"grad of leaf {i} is {a.dtype}, the leaf {leaf.dtype}"
        _close(a, b, torch.float32 if id(leaf) in adapters else x_dtype, f"grad of leaf {i}")


@pytest.mark.parametrize("op", ["single", "grouped"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fp32_adapters_under_autocast(op, base_dtype):
    """bf16-mixed (fp32 everything) and a bf16 base with fp32 adapters, under autocast: bf16 output,
    fp32 adapter gradients, values of the float64 formula to bf16 accuracy."""
    n = 1 if op == "single" else 3
    x, ws, as_, bs, ss, biases = _inputs(base_dtype, torch.float32, n)
    with kernels.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        ys = _run(op, x, ws, as_, bs, ss, biases)
    ys64, leaves64 = _reference(x, ws, as_, bs, ss, biases)
    for y, y64 in zip(ys, ys64):
        assert y.dtype == torch.bfloat16
        _close(y, y64, torch.bfloat16, "y")
    gos = [torch.randn(y.shape, dtype=torch.float64).to(torch.bfloat16).double() for y in ys64]
    leaves = _leaves(x, ws, as_, bs, biases)
    got = torch.autograd.grad(ys, leaves, [g.to(torch.bfloat16) for g in gos])
    want = torch.autograd.grad(ys64, leaves64, gos)
    for i, (leaf, a, b) in enumerate(zip(leaves, got, want)):
        assert a.dtype == leaf.dtype
        _close(a, b, torch.bfloat16, f"grad of leaf {i}")
