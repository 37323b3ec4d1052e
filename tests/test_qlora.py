"""QLoRA: NF4Linear, the LoRA layer on a 4-bit base, apply_qlora, QLoRACallback, bitsandbytes
interop, merge/export, adapter files, and the Triton path of lora_linear with an NF4 weight.

The reference throughout is a float model holding the dequantized weights: QLoRA must compute
exactly what LoRA computes on ``dequant(W0)``.
"""

import copy
import json
import warnings
import weakref

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import kernels
from kernels.lora import lora_linear_reference
from lightning_peft import (
    LoRALinear,
    NF4Linear,
    QLoRACallback,
    QLoRAConfig,
    apply_lora,
    apply_qlora,
    load_adapter,
    merge_adapters,
    merge_and_dequantize,
    save_adapter,
    trainable_parameters,
    unmerge_adapters,
)
from lightning_peft._base import adapter_named_parameters
from lightning_peft.methods.lora import LoRAConfig
from lightning_peft.methods.qlora import _dynamic_code
from tests import _lit, _tiny

bnb = pytest.importorskip("bitsandbytes")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(in_f=37, out_f=23, bias=True, compute=torch.float32, seed=0, r=5, double_quant=True,
           blocksize=64):
    """A QLoRA layer over a random Linear (shapes that fill no block exactly), nonzero B."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    layer = LoRALinear(NF4Linear.from_linear(base, compute, blocksize, double_quant), r=r, alpha=7.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    return layer


def _float_reference(layer):
    """fp64 LoRA on the dequantized weight: W (out, in), bias, A, B as float64 leaves."""
    w = layer.base_layer.weight.dequantize(torch.float32).double()
    b = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().double()
    a = layer.lora_A.detach().double().requires_grad_()
    bb = layer.lora_B.detach().double().requires_grad_()
    return w, b, a, bb


# ------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("bias", [True, False])
def test_layer_fp32_matches_float_model_with_dequantized_weight(bias):
    layer = _layer(bias=bias)
    x = torch.randn(3, 4, 37, requires_grad=True)
    y = layer(x)
    w, b, a, bb = _float_reference(layer)
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ w.t() + layer.scaling * (x64 @ a.t()) @ bb.t() + (0 if b is None else b)
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], g)
    ex, ea, eb = torch.autograd.grad(y64, [x64, a, bb], g.double())
    for got, want in ((gx, ex), (ga, ea), (gb, eb)):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    # the 4-bit base weight is no parameter and gets no gradient; the bias is frozen by apply only
    assert not any(p is layer.base_layer.weight for p in layer.parameters())


def test_layer_bf16_compute_matches_bf16_float_model():
    layer = _layer(compute=torch.bfloat16)
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.bfloat16(), layer.lora_B.bfloat16()
    x = torch.randn(2, 6, 37, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32  # cast back to the input's dtype, computed in bf16
    # the float model: the dequantized weight in bf16, plain torch ops in bf16
    w = layer.base_layer.weight.dequantize(torch.bfloat16)
    xb = x.detach().bfloat16().requires_grad_()
    a = layer.lora_A.detach().clone().requires_grad_()
    bb = layer.lora_B.detach().clone().requires_grad_()
    ref = (nn.functional.linear(xb, w, layer.base_layer.bias.bfloat16())
           + layer.scaling * (xb @ a.t()) @ bb.t())
    scale = ref.abs().max().item()
    torch.testing.assert_close(y, ref.float(), rtol=0, atol=2e-2 * scale)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], g)
    want = torch.autograd.grad(ref, [xb, a, bb], g.bfloat16())
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg.float(), ww.float(), rtol=0,
                                   atol=2e-2 * ww.abs().max().item())
    # and it is close to the fp64 truth within bf16 rounding
    w64, b64, a64, bb64 = _float_reference(layer)
    y64 = x.detach().double() @ w64.t() + b64 + layer.scaling * (x.detach().double() @ a64.t()) @ bb64.t()
    torch.testing.assert_close(y.double(), y64.detach(), rtol=0, atol=3e-2 * scale)


def test_nf4linear_forward_and_frozen_numel():
    torch.manual_seed(0)
    base = nn.Linear(70, 33)
    q = NF4Linear.from_linear(base, torch.float32)
    x = torch.randn(5, 70)
    expected = nn.functional.linear(x, q.weight.dequantize(torch.float32), base.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-6, atol=1e-6)
    assert q.bias is base.bias and q.frozen_numel() == 70 * 33
    assert q.weight.packed.dtype == torch.uint8 and q.weight.packed.numel() == (70 * 33 + 1) // 2


def test_dtype_cast_keeps_the_4bit_data_and_sets_compute_dtype():
    q = NF4Linear.from_linear(nn.Linear(64, 32), torch.float32)
    packed, absmax, nested = q.weight.packed, q.weight.absmax, q.weight.nested_absmax
    q.to(torch.bfloat16)  # Lightning's "bf16-true" does module.to(bfloat16)
    assert q.compute_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert q.weight.packed is packed and q.weight.absmax is absmax and q.weight.nested_absmax is nested
    assert q.weight.nested_absmax.dtype == torch.float32 and q.weight.absmax.dtype == torch.uint8
    q.half()
    assert q.compute_dtype == torch.float16 and q.weight.packed is packed
    q.to("cpu")  # a move to where it already is: nothing changes
    assert q.compute_dtype == torch.float16 and q.weight.packed is packed
    q.double()  # no NF4 compute in float64: the compute dtype stays
    assert q.compute_dtype == torch.float16
    assert q(torch.randn(2, 64)).dtype == torch.float32
    moved = copy.deepcopy(q).to("meta")  # a device move moves every NF4 tensor
    assert all(t.is_meta for t in moved.weight._tensors().values()) and moved.bias.is_meta
    assert q.weight.packed is packed and not packed.is_meta


def test_meta_placeholder_to_empty_and_quantize():
    with torch.device("meta"):
        layer = nn.Linear(48, 40)
    q = NF4Linear.from_linear(layer, torch.float32)
    assert q.weight.device.type == "meta" and q.weight.packed.is_meta
    q.to_empty(device="cpu")
    assert q.weight.device.type == "cpu"
    torch.testing.assert_close(q.dequantize(), torch.zeros(40, 48))  # placeholder is all zero
    w = torch.randn(40, 48)
    q.quantize_(w)
    ref = kernels.quantize_nf4(w, 64, True)
    assert torch.equal(q.weight.packed, ref.packed) and torch.equal(q.weight.absmax, ref.absmax)


@pytest.mark.gpu
def test_device_move_moves_nf4_data():
    q = NF4Linear.from_linear(nn.Linear(64, 32), torch.bfloat16)
    before = q.weight.dequantize(torch.float32)
    q.to("cuda")
    assert q.weight.packed.is_cuda and q.weight.absmax.is_cuda and q.bias.is_cuda
    torch.testing.assert_close(q.weight.dequantize(torch.float32).cpu(), before, rtol=0, atol=0)
    q.cpu()
    assert q.weight.device.type == "cpu"


# ------------------------------------------------------------- the Triton path of lora_linear


@pytest.mark.parametrize("dtype,tol,with_bias", [(torch.float32, 2e-5, True),
                                                  (torch.float16, 4e-3, False)])
def test_triton_lora_linear_with_nf4_weight_matches_torch_path(dtype, tol, with_bias):
    g = torch.Generator().manual_seed(0)
    q = kernels.quantize_nf4(torch.randn(40, 70, generator=g), blocksize=64)
    x = torch.randn(2, 9, 70, generator=g).to(DEVICE, dtype).requires_grad_()
    a = (torch.randn(5, 70, generator=g) / 8).to(DEVICE, dtype).requires_grad_()
    b = (torch.randn(40, 5, generator=g) / 2).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(40, generator=g).to(DEVICE, dtype).requires_grad_() if with_bias else None
    q = q.to(DEVICE)
    leaves = [t for t in (x, a, b, bias) if t is not None]
    with kernels.use_backend("triton"):
        y = kernels.lora_linear(x, q, a, b, 0.7, bias)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad)
    y_ref = lora_linear_reference(x, q, a, b, 0.7, bias)
    want = torch.autograd.grad(y_ref, leaves, grad)
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tol * scale)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=0, atol=tol * ww.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nf4_lora_output_can_be_edited_in_place(backend):
    """``out += other`` on a QLoRA layer's output (Falcon's ``mlp_output += attention_output``)
    works on both paths, with the gradients of the unedited op plus the edit."""
    g = torch.Generator().manual_seed(1)
    q = kernels.quantize_nf4(torch.randn(24, 40, generator=g), blocksize=64).to(DEVICE)
    x = torch.randn(2, 5, 40, generator=g).to(DEVICE).requires_grad_()
    a = (torch.randn(4, 40, generator=g) / 8).to(DEVICE).requires_grad_()
    b = (torch.randn(24, 4, generator=g) / 2).to(DEVICE).requires_grad_()
    other = torch.randn(2, 5, 24, generator=g).to(DEVICE)
    with kernels.use_backend(backend):
        y = kernels.lora_linear(x, q, a, b, 0.5)
        y += other
        y.mul_(2.0)
    y_ref = (lora_linear_reference(x, q, a, b, 0.5) + other) * 2.0
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-4)
    grad = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, a, b), grad),
                         torch.autograd.grad(y_ref, (x, a, b), grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * max(1.0, want.abs().max().item()))


def test_triton_nf4_dropout_matches_dense_triton_and_frees_no_weight():
    """With dropout the NF4 path draws the same seed and mask as the dense Triton op on the
    dequantized weight; its autograd graph keeps no dense weight."""
    g = torch.Generator().manual_seed(1)
    q = kernels.quantize_nf4(torch.randn(24, 40, generator=g), blocksize=32, double_quant=False)
    x = torch.randn(7, 40, generator=g).requires_grad_()
    a = (torch.randn(4, 40, generator=g) / 6).requires_grad_()
    b = (torch.randn(24, 4, generator=g) / 2).requires_grad_()
    w = q.dequantize(torch.float32)
    with kernels.use_backend("triton"):
        y = kernels.lora_linear(x, q, a, b, 2.0, dropout_p=0.3, generator=torch.Generator().manual_seed(5))
        y_dense = kernels.lora_linear(x, w, a, b, 2.0, dropout_p=0.3,
                                      generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(y, y_dense, rtol=0, atol=1e-5)
    grad = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [x, a, b], grad, retain_graph=True),
                         torch.autograd.grad(y_dense, [x, a, b], grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    node = y.grad_fn  # the op's node, under the view of its (M, N) output the caller gets
    while not hasattr(node, "saved_tensors"):
        node = node.next_functions[0][0]
    saved = [t for t in node.saved_tensors if t is not None]
    assert saved and all(tuple(t.shape) != tuple(w.shape) for t in saved)


# -------------------------------------------------------------------------- thread safety


def _threaded_job(op, k, n, seed):
    """One thread's work for :func:`test_layers_and_lora_ops_are_thread_safe`: forward and
    backward of ``op`` on its own weights of shape (n, k); returns the outputs and gradients."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, k, generator=g)
    if op == "qlora_layer":
        torch.manual_seed(seed)
        layer = LoRALinear(NF4Linear.from_linear(nn.Linear(k, n), torch.float32), r=4, alpha=8.0)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.3, generator=g)
        base = layer.base_layer

        def run():
            xg = x.clone().requires_grad_()
            y = layer(xg)
            y.square().sum().backward()
            grads = (xg.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
            layer.zero_grad(set_to_none=True)
            return (y.detach(), base(x), *grads)
        return run
    m = 1 if op == "lora_linear" else 3
    ws = [torch.randn(n + 8 * i, k, generator=g) / 8 for i in range(m)]
    a_s = [(torch.randn(4, k, generator=g) / 8).requires_grad_() for _ in range(m)]
    b_s = [(torch.randn(n + 8 * i, 4, generator=g) / 2).requires_grad_() for i in range(m)]

    def run():
        xg = x.clone().requires_grad_()
        if op == "lora_linear":
            ys = (kernels.lora_linear(xg, ws[0], a_s[0], b_s[0], 0.5),)
        else:
            ys = kernels.lora_linear_grouped(xg, ws, a_s, b_s, [0.5, 1.0, 2.0])
        grads = torch.autograd.grad(sum(y.square().sum() for y in ys), [xg, *a_s, *b_s])
        return (*(y.detach() for y in ys), *grads)
    return run


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_a_4bit_base_dequantizes_into_the_scratch_buffer(monkeypatch, use_dora):
    """Forward and backward of a LoRA (or DoRA) layer on an NF4 base dequantize into the calling
    thread's scratch buffer, as the frozen NF4 layer does, never into a fresh tensor."""
    fresh = []
    original = kernels.nf4.dequantize_nf4

    def spy(q, dtype=None, out=None):
        fresh.append(out is None)
        return original(q, dtype, out)

    monkeypatch.setattr(kernels.nf4, "dequantize_nf4", spy)
    model, _ = _llama_pair("float32", targets=["q_proj", "v_proj"], use_dora=use_dora)
    _tiny.randomize_lora(model)
    ids = torch.randint(0, 96, (2, 5))
    with kernels.use_backend("torch"):
        model(ids)  # (DoRA caches ||W0_i||² once, from its own fp32 copy)
        fresh.clear()
        model(ids, labels=ids).loss.backward()
    assert fresh and not any(fresh)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["qlora_layer", "lora_linear", "lora_linear_grouped"])
def test_layers_and_lora_ops_are_thread_safe(op, backend):
    """Two threads (serving, ``predict`` in threads) each run their own layer or op, of another
    shape, forward and backward, at the same time: every result equals the one computed alone
    (the NF4 layers' scratch buffers are per thread)."""
    from tests.test_nf4 import concurrently, count_wrong

    rounds, shapes = (30, ((128, 96), (192, 80))) if backend == "torch" else \
        (2 if op == "qlora_layer" else 1, ((64, 40), (96, 56)))
    with kernels.use_backend(backend):
        jobs = [_threaded_job(op, k, n, seed) for seed, (k, n) in enumerate(shapes)]
        want = [job() for job in jobs]
        got = concurrently(jobs, rounds)
    wrong = [count_wrong(r, w, tol=1e-4) for r, w in zip(got, want)]
    assert wrong == [0, 0], f"wrong results per thread out of {rounds}: {wrong}"


# -------------------------------------------------------------------------- apply_qlora


def _llama_pair(compute="float32", targets="all-linear", **kwargs):
    model = _tiny.llama()
    ref = copy.deepcopy(model)
    apply_qlora(model, r=4, target_modules=targets, compute_dtype=compute, **kwargs)
    return model, ref


def _reference_from(model, ref, targets="all-linear"):
    """``ref`` (a float copy of the model) with each adapted layer's weight replaced by its
    dequantized NF4 weight and LoRA injected with the same adapter values."""
    apply_lora(ref, r=4, target_modules=targets)
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, LoRALinear):
                qm = layers[name]
                m.base_layer.weight.copy_(qm.base_layer.weight.dequantize(torch.float32))
                m.lora_A.copy_(qm.lora_A)
                m.lora_B.copy_(qm.lora_B)
    return ref


def test_apply_qlora_model_matches_float_model_holding_dequantized_weights():
    model, ref = _llama_pair()
    _tiny.randomize_lora(model)
    ref = _reference_from(model, ref)
    ids = torch.randint(0, 96, (2, 11))
    out = model(ids, labels=ids)
    want = ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    want.loss.backward()
    ours = dict(adapter_named_parameters(model))
    theirs = dict(adapter_named_parameters(ref))
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 2
    for name, p in ours.items():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_qlora_siblings_fuse_on_the_torch_path_and_match_the_unfused_layers(count_grouped, compute):
    """q/k/v and gate/up on 4-bit bases share one pass over x from the second pass on (as dense
    siblings do): same logits and adapter gradients over three steps as the same model with its
    groups removed, x cast to the compute dtype once and the outputs back."""
    from lightning_peft.methods.lora import lora_layers

    model, _ = _llama_pair(compute)
    _tiny.randomize_lora(model)
    unfused = copy.deepcopy(model)
    for _, layer in lora_layers(unfused):
        layer.__dict__.pop("_shared_input_group", None)
    ids = torch.randint(0, 96, (2, 9))
    tol = dict(rtol=1e-5, atol=1e-5) if compute == "float32" else dict(rtol=2e-2, atol=2e-2)
    for _ in range(3):
        grads = []
        for m in (model, unfused):
            m.zero_grad(set_to_none=True)
            out = m(ids, labels=ids)
            out.loss.backward()
            grads.append((out.logits, dict(adapter_named_parameters(m))))
        (logits, ours), (want, theirs) = grads
        torch.testing.assert_close(logits, want, **tol)
        for name, p in ours.items():
            torch.testing.assert_close(p.grad, theirs[name].grad, **tol)
    assert sorted(set(count_grouped)) == [2, 3] and len(count_grouped) == 2 * 2 * 2  # passes 2, 3


def test_qlora_siblings_run_alone_where_each_has_its_triton_kernel(count_grouped):
    """On the Triton backend each 4-bit layer runs its own NF4 kernel, so 4-bit siblings are not
    fused (dense siblings still are)."""
    model, _ = _llama_pair("float32", targets=["q_proj", "k_proj", "v_proj"])
    _tiny.randomize_lora(model)
    ids = torch.randint(0, 96, (1, 3))
    with kernels.use_backend("triton"):
        for _ in range(2):
            model(ids)
    assert count_grouped == []
    for _ in range(2):
        model(ids)
    assert count_grouped == [3, 3, 3, 3]  # learned meanwhile: both layers fuse in both passes


def test_apply_qlora_structure_freezing_and_counts():
    model = _tiny.llama()
    total_before = sum(p.numel() for p in model.parameters())
    apply_qlora(model, r=4, target_modules=["q_proj", "v_proj"])
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4
    for m in layers:
        assert isinstance(m.base_layer, NF4Linear) and isinstance(m.base_layer.weight, kernels.NF4Tensor)
        assert m.lora_A.dtype == m.lora_B.dtype == torch.bfloat16  # the compute dtype
        assert m.base_layer.compute_dtype == torch.bfloat16
        assert m.lora_A.requires_grad and m.lora_B.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in adapter_named_parameters(model)}
    counts = trainable_parameters(model)
    assert counts.total == total_before + counts.trainable  # the 4-bit weights counted once
    assert counts.trainable == sum(4 * (32 + o) for o in (32, 16)) * 2
    # applying again changes nothing
    before = [(m.base_layer.weight, m.lora_A) for m in layers]
    apply_qlora(model, r=4, target_modules=["q_proj", "v_proj"])
    assert [(m.base_layer.weight, m.lora_A) for m in layers] == before


def test_quantizes_one_layer_at_a_time_and_releases_the_dense_weights(monkeypatch):
    """Each layer's own weight is quantized (no full-precision copy is made); the dense weights
    are kept until every layer succeeded (so a failure can put them back) and then released."""
    model = _tiny.llama()
    targets = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    refs = [weakref.ref(m.weight) for m in targets]
    pointers = [m.weight.data_ptr() for m in targets]
    del targets
    seen, alive_at_call = [], []
    original = kernels.quantize_nf4
    _dynamic_code()  # cached: the placeholders' nested map is quantized once per process

    def spy(w, *args, **kwargs):
        seen.append(w.data_ptr())
        alive_at_call.append(sum(r() is not None for r in refs))
        return original(w, *args, **kwargs)

    monkeypatch.setattr(kernels, "quantize_nf4", spy)
    apply_qlora(model, r=2, target_modules="all-linear")
    n = len(refs)
    assert seen == pointers and alive_at_call == [n] * n
    assert all(r() is None for r in refs)


def _snapshot(model):
    """Everything apply_qlora may touch: the module tree (objects), every module's attributes
    (by identity), every Parameter object with its values, dtype and requires_grad."""
    modules = [(name, m, dict(m.__dict__), dict(m._modules), dict(m._parameters))
               for name, m in model.named_modules()]
    params = [(name, p, p.detach().clone(), p.requires_grad) for name, p in
              model.named_parameters(remove_duplicate=False)]
    return modules, params


def _assert_unchanged(model, snapshot):
    modules, params = snapshot
    now = list(model.named_modules())
    assert [(n, id(m)) for n, m, *_ in modules] == [(n, id(m)) for n, m in now]
    for name, m, attrs, children, own in modules:
        assert m.__dict__.keys() == attrs.keys(), name
        assert all(m.__dict__[k] is v for k, v in attrs.items()
                   if k not in ("_modules", "_parameters")), name
        assert m._modules == children and all(m._modules[k] is v for k, v in children.items())
        assert m._parameters.keys() == own.keys()
        assert all(m._parameters[k] is v for k, v in own.items()), name
    now_params = list(model.named_parameters(remove_duplicate=False))
    assert [(n, id(p)) for n, p, *_ in params] == [(n, id(p)) for n, p in now_params]
    for name, p, value, requires_grad in params:
        assert p.requires_grad == requires_grad, name
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0, equal_nan=True, msg=name)


def test_apply_qlora_non_finite_weight_leaves_the_model_as_it_was():
    """One NaN in the last targeted layer: a ValueError naming the layer and the NaN, and the
    model is exactly as before (no LoRA, no NF4 layer, same Parameters, same values)."""
    model = _tiny.llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] = float("nan")
    before = _snapshot(model)
    ids = torch.randint(0, 96, (1, 5))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*1 non-finite value"
                                         r".*index \(3, 7\)"):
        apply_qlora(model, r=2, target_modules="all-linear")
    _assert_unchanged(model, before)
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules())
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] = 0.0
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    apply_qlora(model, r=2, target_modules="all-linear")  # the fixed model converts in full
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14


@pytest.mark.parametrize("start", ["plain", "lora"])
def test_apply_qlora_is_all_or_nothing(monkeypatch, start):
    """Any failure part-way (here the third quantization raises) leaves the model exactly as it
    was: a plain model, or one already carrying LoRA on dense bases (shared-input groups, trained
    biases and adapters kept as they were)."""
    model = _tiny.gpt2()
    if start == "lora":
        apply_lora(model, r=3, target_modules="all-linear", bias="all")
        _tiny.randomize_lora(model)
    before = _snapshot(model)
    calls = []
    original = kernels.quantize_nf4

    def fail_third(w, *args, **kwargs):
        calls.append(w.shape)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(w, *args, **kwargs)

    monkeypatch.setattr(kernels, "quantize_nf4", fail_third)
    r = 3 if start == "lora" else 4  # on a LoRA model, QLoRA with its settings quantizes the bases
    with pytest.raises(RuntimeError, match="simulated"):
        apply_qlora(model, r=r, target_modules="all-linear", bias="all", compute_dtype="float32")
    assert len(calls) == 3
    _assert_unchanged(model, before)
    monkeypatch.setattr(kernels, "quantize_nf4", original)
    apply_qlora(model, r=r, target_modules="all-linear", bias="all", compute_dtype="float32")
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 8


def test_gpt2_conv1d_is_quantized_transposed():
    model = _tiny.gpt2()
    ref = copy.deepcopy(model)
    apply_qlora(model, r=4, compute_dtype="float32")
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, NF4Linear) and not layer.fan_in_fan_out
    w = ref.transformer.h[0].attn.c_attn.weight.t()  # Conv1D stores (in, out)
    assert tuple(layer.base_layer.weight.shape) == tuple(w.shape)
    ids = torch.randint(0, 50, (1, 8))
    # B = 0: the output is that of the float model with the dequantized weights
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                ref.get_submodule(name).weight.copy_(m.base_layer.weight.dequantize(torch.float32).t())
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bitsandbytes interop


def _bnb_linear(in_f=64, out_f=48, double_quant=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu"), dense  # bitsandbytes quantizes on the move


@pytest.mark.parametrize("double_quant", [True, False])
def test_load_bitsandbytes_linear4bit_state_dict(double_quant):
    src, dense = _bnb_linear(double_quant=double_quant)
    ours = NF4Linear(64, 48, compute_dtype=torch.float32, double_quant=not double_quant)
    ours.load_state_dict(src.state_dict())
    assert ours.double_quant == double_quant
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src.train()(x), rtol=1e-5, atol=1e-5)
    ref = kernels.quantize_nf4(dense.weight.detach(), 64, double_quant)
    assert torch.equal(ours.weight.packed, ref.packed)


def test_bitsandbytes_loads_our_state_dict():
    torch.manual_seed(0)
    ours = NF4Linear.from_linear(nn.Linear(64, 48), torch.float32)
    sd = ours.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    theirs = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=theirs)
    theirs.bias = nn.Parameter(sd["bias"].clone())
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.train()(x), ours(x), rtol=1e-5, atol=1e-5)
    # and bitsandbytes writes back exactly our bytes and keys
    back = theirs.state_dict()
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k].cpu().reshape(-1), sd[k].reshape(-1)), k


def test_load_dense_state_dict_quantizes_and_bad_state_dicts_fail():
    torch.manual_seed(0)
    dense = nn.Linear(40, 24)
    q = NF4Linear(40, 24, compute_dtype=torch.float32, blocksize=32)
    q.load_state_dict(dense.state_dict())
    ref = kernels.quantize_nf4(dense.weight.detach(), 32, True)
    assert torch.equal(q.weight.packed, ref.packed) and q.blocksize == 32
    with pytest.raises(RuntimeError, match="size mismatch"):
        NF4Linear(40, 25).load_state_dict(dense.state_dict())
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        NF4Linear(40, 24).load_state_dict({"bias": dense.bias.detach()})
    with pytest.raises(RuntimeError, match="Unexpected key.*weight.junk"):
        NF4Linear(40, 24).load_state_dict({**q.state_dict(), "weight.junk": torch.zeros(1)})


def test_apply_qlora_takes_over_a_bitsandbytes_layer_without_requantizing():
    src, _ = _bnb_linear()
    model = nn.Sequential()
    model.add_module("proj", src)
    packed = src.weight.data
    apply_qlora(model, r=4, target_modules=["proj"], compute_dtype="float32")
    base = model.proj.base_layer
    assert isinstance(base, NF4Linear) and base.weight.packed.data_ptr() == packed.data_ptr()


def _bnb_plugin_lora_model():
    """A LoRA model converted by Lightning's BitsandbytesPrecision: the LoRA layers' nn.Linear
    bases become bitsandbytes Linear4bit, quantized when the module moves to its device."""
    from lightning.pytorch.plugins import BitsandbytesPrecision

    plugin = BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16)
    model = apply_lora(_tiny.llama().train(), r=4)
    return plugin, plugin.convert_module(model).to(DEVICE)


def test_lightning_bitsandbytes_precision_plugin_with_lora():
    """The adapters stay unquantized and train; the layer computes LoRA on the dequantized
    bitsandbytes weight. (Lightning's Trainer accepts the plugin only on CUDA: see the gpu test.)"""
    plugin, model = _bnb_plugin_lora_model()
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    assert all(m.base_layer.weight.dtype == torch.uint8 for m in layers)  # really 4-bit
    assert all(m.lora_A.dtype == torch.float32 for m in layers)
    m = layers[0]
    q = kernels.NF4Tensor.from_bitsandbytes(m.base_layer.weight.data, m.base_layer.weight.quant_state)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
    x = torch.randn(2, 3, m.in_features, device=DEVICE)
    want = kernels.lora_linear(x.bfloat16(), q, m.lora_A, m.lora_B, m.scaling).float()
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (2, 8), device=DEVICE)
    before = {n: p.detach().clone() for n, p in adapter_named_parameters(model)}
    packed = m.base_layer.weight.data.clone()
    with plugin.forward_context():
        for _ in range(2):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert torch.isfinite(loss)
    after = dict(adapter_named_parameters(model))
    assert all(not torch.equal(after[n], b) for n, b in before.items() if n.endswith("lora_B"))
    assert torch.equal(m.base_layer.weight.data, packed)


@pytest.mark.gpu
def test_lightning_trainer_with_bitsandbytes_precision_and_callbacks(tmp_path):
    from lightning.pytorch.plugins import BitsandbytesPrecision

    from lightning_peft import LoRACallback

    for callback in (LoRACallback(r=4), QLoRACallback(r=4)):
        module = _lit.TinyLM()
        trainer = _lit.trainer(tmp_path, accelerator="cuda", callbacks=[callback], max_steps=2,
                               plugins=[BitsandbytesPrecision("nf4", dtype=torch.bfloat16)])
        trainer.fit(module, _lit.loader())
        layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
        assert all(torch.count_nonzero(m.lora_B) > 0 for m in layers)
        assert all(isinstance(m.base_layer, (bnb.nn.Linear4bit, NF4Linear)) for m in layers)


# ---------------------------------------------------------------------- merge and export


def test_merge_warns_requantizes_and_unmerge_restores_exactly():
    model, _ = _llama_pair(targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.02)
    ids = torch.randint(0, 96, (2, 9))
    unmerged = model(ids).logits
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    bases = {n: m.base_layer.weight for n, m in layers.items()}
    exact = {n: m.base_layer.weight.dequantize(torch.float32) + m.delta_weight() for n, m in layers.items()}
    with pytest.warns(UserWarning, match="re-quantizes"):
        merge_adapters(model)
    for n, m in layers.items():
        q = m.base_layer.weight
        assert m.merged and isinstance(q, kernels.NF4Tensor) and q.double_quant
        # exactly the NF4 of dequant(W0) + s·B·A: its error is NF4 rounding, no more
        assert torch.equal(q.packed, kernels.quantize_nf4(exact[n], 64, True).packed)
        err = (q.dequantize(torch.float32) - exact[n]).norm() / exact[n].norm()
        assert 0 < err < 0.12
    merged = model(ids).logits
    assert 0 < (merged - unmerged).norm() / unmerged.norm() < 0.1
    unmerge_adapters(model)
    assert all(m.base_layer.weight is bases[n] for n, m in layers.items())
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=0, atol=0)


def test_merge_into_bitsandbytes_base():
    src, _ = _bnb_linear()
    layer = LoRALinear(src.train(), r=4)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    x = torch.randn(4, 64)
    before = layer(x).detach()
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    merged = layer(x).detach()  # the bitsandbytes layer's own forward on the merged weight
    assert 0 < (merged - before).norm() / before.norm() < 0.1
    layer.unmerge()
    torch.testing.assert_close(layer(x).detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_dequantize_exports_plain_linears(use_dora):
    """The export computes what the adapted model computes; with DoRA its rows carry the
    magnitude scale ``m/||W0 + s·B·A||`` (dropped before: 0.13 off on a tiny layer)."""
    model, _ = _llama_pair(modules_to_save=["lm_head"], targets=["q_proj", "k_proj"], use_dora=use_dora)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
                if use_dora:
                    m.lora_magnitude_vector.mul_(1.5)
    ids = torch.randint(0, 96, (2, 9))
    want = model(ids).logits.detach()
    with pytest.warns(UserWarning, match="re-quantizes"):  # a merged layer is unmerged first
        model.model.layers[0].self_attn.q_proj.merge()
    out = merge_and_dequantize(model, torch.float32)
    assert out is model
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    """Non-reentrant activation checkpointing (as the memory benchmark uses) recomputes the
    QLoRA layers exactly: same loss and adapter gradients as without it, over two steps."""
    model, _ = _llama_pair()
    _tiny.randomize_lora(model)
    plain = copy.deepcopy(model)
    model.train()
    plain.train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 96, (2, 10))
    for _ in range(2):
        for m in (model, plain):
            m.zero_grad()
            m(ids, labels=ids).loss.backward()
        got = dict(adapter_named_parameters(model))
        for name, p in adapter_named_parameters(plain):
            torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------- adapter files


def test_save_load_adapter_round_trip_and_hf_peft_on_dequantized_model(tmp_path):
    model, ref = _llama_pair(targets=["q_proj", "v_proj"])
    _tiny.randomize_lora(model)
    ids = torch.randint(0, 96, (2, 9))
    want = model(ids).logits.detach()
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    again, _ = _llama_pair(targets=["q_proj", "v_proj"])
    load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=0)
    # HF PEFT, on a float model holding the dequantized weights, computes the same logits
    import peft

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                ref.get_submodule(name).weight.copy_(m.base_layer.weight.dequantize(torch.float32))
    hf = peft.PeftModel.from_pretrained(ref, str(tmp_path / "a"))
    torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_load_adapter_onto_a_model_already_holding_nf4_layers(tmp_path):
    """A 4-bit base saved without adapters (NF4Linear layers, no LoRA yet) takes an adapter file."""
    model, _ = _llama_pair(targets=["q_proj", "v_proj"])
    _tiny.randomize_lora(model)
    ids = torch.randint(0, 96, (2, 9))
    want = model(ids).logits.detach()
    save_adapter(model, tmp_path / "a")
    bare = _tiny.llama()  # the same seed: the same unadapted weights
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):  # the same 4-bit bytes, as a plain NF4Linear
            parent, child = name.rsplit(".", 1)
            setattr(bare.get_submodule(parent), child, copy.deepcopy(m.base_layer))
    load_adapter(bare, tmp_path / "a")
    assert all(isinstance(bare.get_submodule(n).base_layer, NF4Linear)
               for n, m in model.named_modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(bare(ids).logits, want, rtol=0, atol=0)


# ------------------------------------------------------------------------ the callback


def _nf4_state(module):
    return {n: m.weight.packed.clone() for n, m in module.named_modules() if isinstance(m, NF4Linear)}


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_callback_fit_trains_only_lora_and_base_stays_4bit(tmp_path, precision):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _lit.TinyLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _lit.trainer(tmp_path, callbacks=[QLoRACallback(r=4, target_modules="all-linear"), ckpt],
                           precision=precision, max_steps=3, enable_checkpointing=True)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.fit(module, _lit.loader())
    nf4 = [m for m in module.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 14
    assert all(m.weight.packed.dtype == torch.uint8 and m.weight.absmax.dtype == torch.uint8 for m in nf4)
    assert all(m.weight.nested_absmax.dtype == torch.float32 for m in nf4)
    adapters = dict(adapter_named_parameters(module))
    assert all(torch.count_nonzero(p) > 0 for n, p in adapters.items() if n.endswith("lora_B"))
    for name, p in module.named_parameters():  # everything else (embeddings, norms, head) frozen
        if name not in adapters:
            torch.testing.assert_close(p, frozen_before[name].to(p.dtype), rtol=0, atol=0)
    # the checkpoint holds only the adapter
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert set(state) == set(adapters)


def test_callback_keeps_nf4_bytes_through_fits_and_merges_on_fit_end(tmp_path):
    module = _lit.TinyLM()
    trainer = _lit.trainer(tmp_path, callbacks=[QLoRACallback(r=4, compute_dtype="float32")], max_steps=2)
    trainer.fit(module, _lit.loader())
    packed = _nf4_state(module)
    callback = QLoRACallback(r=4, compute_dtype="float32", merge_on_fit_end=True)
    trainer = _lit.trainer(tmp_path, callbacks=[callback], max_steps=4)
    with pytest.warns(UserWarning, match="re-quantizes"):
        trainer.fit(module, _lit.loader())  # a second fit: injection is idempotent
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.merged for m in layers)
    assert _nf4_state(module).keys() == packed.keys()
    assert any(not torch.equal(_nf4_state(module)[n], t) for n, t in packed.items())  # merged
    unmerge_adapters(module)
    assert all(torch.equal(_nf4_state(module)[n], t) for n, t in packed.items())


def test_callback_state_and_paged_optimizers(tmp_path):
    class PagedLM(_lit.TinyLM):
        def __init__(self, name):
            super().__init__()
            self.optimizer_name = name

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            return getattr(bnb.optim, self.optimizer_name)(params, lr=1e-2)

    cb = QLoRACallback(r=4, compute_dtype="float32")
    assert cb.state_dict()["config"]["compute_dtype"] == "float32"
    assert json.dumps(cb.state_dict())  # JSON-friendly
    for name in ("PagedAdamW", "PagedAdamW8bit"):
        module = PagedLM(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes: paged memory is plain memory on CPU
            trainer = _lit.trainer(tmp_path, callbacks=[QLoRACallback(r=4, compute_dtype="float32")],
                                   max_steps=2)
            trainer.fit(module, _lit.loader())
        assert isinstance(trainer.optimizers[0], getattr(bnb.optim, name))
        adapters = dict(adapter_named_parameters(module))
        assert all(torch.count_nonzero(p) > 0 for n, p in adapters.items() if n.endswith("lora_B"))


@pytest.mark.gpu
def test_paged_optimizers_on_gpu(tmp_path):
    model = _tiny.llama().cuda()
    apply_qlora(model, r=8, target_modules="all-linear")
    ids = torch.randint(0, 96, (2, 16), device="cuda")
    for name in ("PagedAdamW", "PagedAdamW8bit"):
        opt = getattr(bnb.optim, name)([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        before = {n: p.detach().clone() for n, p in adapter_named_parameters(model)}
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        after = dict(adapter_named_parameters(model))
        assert any(not torch.equal(after[n], b) for n, b in before.items())


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,exc,arg", [
    ({"blocksize": 48}, ValueError, "blocksize"),
    ({"blocksize": True}, ValueError, "blocksize"),
    ({"compute_dtype": "int8"}, ValueError, "compute_dtype"),
    ({"compute_dtype": torch.float64}, ValueError, "compute_dtype"),
    ({"blocksize": None}, ValueError, "blocksize"),
    ({"blocksize": "64"}, ValueError, "blocksize"),
    ({"blocksize": 8192}, ValueError, "blocksize"),
    ({"compute_dtype": None}, ValueError, "compute_dtype"),
    ({"compute_dtype": "float64"}, ValueError, "compute_dtype"),
    ({"double_quant": "yes"}, TypeError, "double_quant"),
    ({"double_quant": "no"}, TypeError, "double_quant"),
    ({"double_quant": 1}, TypeError, "double_quant"),
    ({"r": 0}, ValueError, "r must"),
    ({"dropout": 1.0}, ValueError, "dropout"),
])
def test_bad_config_names_the_argument(kwargs, exc, arg):
    with pytest.raises(exc, match=arg):
        QLoRAConfig(**kwargs)
    with pytest.raises(exc, match=arg):
        QLoRACallback(**kwargs)
    with pytest.raises(exc, match=arg):
        apply_qlora(_tiny.llama(), **kwargs)


def test_bad_targets_and_arguments():
    model = _tiny.llama()
    with pytest.raises(ValueError, match="target_modules.*matched no module"):
        apply_qlora(model, target_modules=["nope"])
    with pytest.raises(ValueError, match="only nn.Linear"):
        apply_qlora(model, target_modules=r".*layers\.0\.mlp")
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules())
    with pytest.raises(TypeError, match="config must be a QLoRAConfig"):
        apply_qlora(model, config=LoRAConfig())
    with pytest.raises(ValueError, match="in_features"):
        NF4Linear(0, 4)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear(8, 4, blocksize=100)
    with pytest.raises(ValueError, match="compute_dtype"):
        NF4Linear(8, 4, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"weight must be \(4, 8\)"):
        NF4Linear(8, 4).quantize_(torch.zeros(8, 4))
    with pytest.raises(TypeError, match="linear must be"):
        NF4Linear.from_linear(nn.ReLU())
    with pytest.raises(ValueError, match="dtype"):
        merge_and_dequantize(model, torch.int8)
    apply_qlora(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="pass the model containing it"):
        merge_and_dequantize(model.model.layers[0].self_attn.q_proj)


def test_callback_builds_from_flat_json_arguments():
    args = {"r": 16, "alpha": 32.0, "target_modules": "all-linear", "compute_dtype": "float16",
            "blocksize": 128, "double_quant": False}
    cb = QLoRACallback(**json.loads(json.dumps(args)))
    assert cb.config.torch_compute_dtype == torch.float16 and cb.config.blocksize == 128
    module = nn.Sequential(nn.Linear(16, 16))
    cb.apply(module)
    assert module[0].base_layer.weight.blocksize == 128 and not module[0].base_layer.double_quant
    assert isinstance(cb, pl.Callback)


# ------------------------------------------------------------------ benchmark and example


def test_memory_benchmark_runs_tiny():
    from benchmarks import qlora_memory

    result = qlora_memory.main(["--hidden", "64", "--layers", "2", "--heads", "4",
                                "--intermediate", "128", "--vocab", "100", "--seq", "32", "--r", "4"])
    assert result["nf4_linear_layers"] == 14 and result["dtype"] == "float32"
    assert result["trainable_params"] == 2 * 4 * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert abs(result["loss"] - 4.605) < 0.05  # ln(100): random weights, std 0.02
    assert result["peak_rss_gib"] >= result["rss_before_step_gib"] > 0


def test_example_trains_qlora_and_reports_memory(tmp_path):
    import importlib.util

    from tests.test_example import ROOT, save_tiny_model

    spec = importlib.util.spec_from_file_location("finetune_qlora", ROOT / "examples" / "finetune_qlora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model_dir = save_tiny_model(tmp_path / "tiny")
    args = example.parse_args(["--model", str(model_dir), "--steps", "3", "--batch-size", "4",
                               "--eval-limit", "2", "--max-new-tokens", "3", "--r", "4",
                               "--threads", "1", "--out", str(tmp_path / "out")])
    result = example.run_one(args, "qlora")
    assert result["peak_train_gib"] > 0 and result["trainable_params"] > 0
    assert result["eval_records"] == 2 and 0.0 <= result["exact_match"] <= 1.0
    config = json.loads((tmp_path / "out" / "qlora" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


def test_qlora_with_dora_starts_at_the_4bit_base_and_trains():
    """``apply_qlora(..., use_dora=True)``: the magnitude is the norm of the 4-bit weight's rows,
    so a fresh model gives the QLoRA base's logits; the magnitude and the adapters train."""
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    plain, dora = _tiny.llama(), _tiny.llama()
    apply_qlora(plain, r=4, target_modules=["q_proj", "v_proj"], compute_dtype="float32")
    apply_qlora(dora, r=4, target_modules=["q_proj", "v_proj"], compute_dtype="float32", use_dora=True)
    with torch.no_grad():
        torch.testing.assert_close(dora(ids).logits, plain(ids).logits, rtol=0, atol=2e-5)
    layer = dora.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector.requires_grad and layer.lora_magnitude_vector.dtype == torch.float32
    loss = dora(ids, labels=ids).loss
    loss.backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_A.grad is not None


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_modes_train_the_biases_of_the_4bit_layers(bias, tmp_path):
    """``bias="lora_only"``/``"all"`` train the adapted layers' biases as apply_lora does (the
    4-bit base dropped the mark: none trained with "lora_only", and "all" could not be saved);
    the file round-trips."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    apply_qlora(model, r=2, target_modules=["0"], compute_dtype=torch.float32, bias=bias)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert trainable == (["0.base_layer.bias"] if bias == "lora_only" else ["0.base_layer.bias", "2.bias"])
    before = model[0].base_layer.bias.detach().clone()
    model(torch.randn(3, 16)).square().sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(model[0].base_layer.bias, before)
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["bias"] == bias
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    apply_qlora(other, r=2, target_modules=["0"], compute_dtype=torch.float32, bias=bias)
    load_adapter(other, tmp_path / "a")
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("use_dora, double_quant, dropout",
                         [(False, True, 0.0), (True, False, 0.0), (False, False, 0.1)])
def test_torch_compile_fullgraph_of_a_qlora_model(use_dora, double_quant, dropout):
    """``torch.compile(fullgraph=True)`` traces QLoRA and DoRA over a 4-bit base (the dequantize
    is one opaque op; it failed on ``Tensor.tolist()`` and the scratch buffer): outputs and every
    gradient equal eager's (with dropout, which draws other masks than eager while traced: the
    output's shape and finite, nonzero gradients for every adapter tensor)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 40))
    apply_qlora(model, r=4, alpha=8.0, dropout=dropout, target_modules=["0", "2"],
                compute_dtype=torch.float32, double_quant=double_quant, use_dora=use_dora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    twin = copy.deepcopy(model)
    x = torch.randn(5, 7, 64)

    def step(m, compiled):
        xi = x.clone().requires_grad_(True)
        f = torch.compile(m, fullgraph=True, backend="aot_eager") if compiled else m
        y = f(xi)
        y.square().mean().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        return y.detach(), xi.grad, grads

    if dropout:
        model.train()
        y, gx, grads = step(model, compiled=True)
        assert y.shape == (5, 7, 40) and torch.isfinite(gx).all()
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
                   for g in grads.values())
        return
    model.eval(), twin.eval()
    y0, gx0, g0 = step(model, compiled=False)
    y1, gx1, g1 = step(twin, compiled=True)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == (6 if use_dora else 4)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
