"""LoRA layer, apply_lora/targeting, merge, parameter counts; agreement with HF PEFT."""

import functools
import math
import re

import peft
import pytest
import torch
from torch import nn

import kernels
from kernels.lora import dropout_keep_mask
from lightning_peft import LoRALinear, apply_lora, merge_adapters, trainable_parameters, unmerge_adapters
from lightning_peft.methods.lora import LoRAConfig, ModulesToSave, lora_layers
from tests import _tiny


def _lora_names(model):
    return sorted(n for n, _ in lora_layers(model))


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize("conv1d", [False, True])
def test_layer_matches_formula_float64(conv1d):
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(23, 37).double()  # nf=out=23, nx=in=37, weight (in, out)
        w = base.weight.t()
    else:
        base = nn.Linear(37, 23).double()
        w = base.weight
    layer = LoRALinear(base, r=5, alpha=7.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 11, 37, dtype=torch.float64)
    expected = x @ w.t() + base.bias + (7.0 / 5) * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    assert layer.base_layer is base and layer.base_layer.weight is base.weight


def test_init_kaiming_gaussian_and_zero_b():
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=8, init="kaiming")
    bound = 1.0 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    torch.manual_seed(0)
    g = LoRALinear(nn.Linear(512, 8), r=16, init="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.01


def test_rslora_scaling():
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=8).scaling == pytest.approx(0.5)


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, dropout=0.5).train()
    x = torch.randn(6, 16)
    # B = 0: the output is the base output exactly, dropout or not
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    nn.init.normal_(layer.lora_B)
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)  # the branch is dropped at random in training
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_merge_unmerge_exact_over_cycles():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        base = nn.Linear(64, 48).to(dtype)
        original = base.weight.detach().clone()
        layer = LoRALinear(base, r=8, alpha=16)
        nn.init.normal_(layer.lora_B, std=0.3)
        x = torch.randn(5, 64, dtype=dtype)
        before = layer(x)
        for _ in range(25):
            layer.merge()
            assert layer.merged
            after = layer(x)
            tol = 1e-5 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(after, before, rtol=tol, atol=tol)
            layer.unmerge()
            assert torch.equal(base.weight, original)  # bit for bit, no drift
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_merge_conv1d_equivalent():
    model = _tiny.gpt2()
    apply_lora(model, r=4)
    _tiny.randomize_lora(model)
    ids = torch.randint(0, 50, (2, 9))
    before = model(ids).logits
    merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


# ---------------------------------------------------------------- apply_lora / targeting


def test_defaults_per_architecture():
    assert {n.rsplit(".", 1)[-1] for n in _lora_names(apply_lora(_tiny.llama()))} == {"q_proj", "v_proj"}
    assert {n.rsplit(".", 1)[-1] for n in _lora_names(apply_lora(_tiny.gpt2()))} == {"c_attn"}
    assert {n.rsplit(".", 1)[-1] for n in _lora_names(apply_lora(_tiny.bert()))} == {"query", "value"}


def test_all_linear_excludes_output_head():
    model = apply_lora(_tiny.llama(), target_modules="all-linear")
    leaves = {n.rsplit(".", 1)[-1] for n in _lora_names(model)}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.lm_head, LoRALinear)


def test_regex_exclude_and_plain_sequential():
    model = apply_lora(_tiny.llama(), target_modules=r".*layers\.1\..*proj",
                       exclude_modules=["down_proj"])
    names = _lora_names(model)
    assert names and all(".layers.1." in n for n in names) and not any("down_proj" in n for n in names)
    seq = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    apply_lora(seq, r=2, target_modules=["0", "2"])
    assert isinstance(seq[0], LoRALinear) and isinstance(seq[2], LoRALinear)


def test_only_adapters_trainable_and_base_params_kept():
    model = _tiny.llama()
    q = model.model.layers[0].self_attn.q_proj
    q_weight = q.weight
    apply_lora(model, r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    assert model.model.layers[0].self_attn.q_proj.base_layer is q
    assert q.weight is q_weight and not q_weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) or ".modules_to_save." in n
                             for n in trainable)
    assert isinstance(model.lm_head, ModulesToSave)
    assert model.lm_head.modules_to_save.weight.requires_grad
    assert not model.lm_head.original_module.weight.requires_grad


def test_apply_twice_is_idempotent():
    model = apply_lora(_tiny.llama(), r=4)
    params = [id(p) for p in model.parameters()]
    apply_lora(model, r=4)
    assert [id(p) for p in model.parameters()] == params
    assert not any(isinstance(m.base_layer, LoRALinear) for _, m in lora_layers(model))


@pytest.mark.parametrize("mode", ["none", "all", "lora_only"])
def test_bias_modes(mode):
    model = apply_lora(_tiny.gpt2(), r=2, bias=mode)
    trainable_bias = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    all_bias = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    if mode == "none":
        assert not trainable_bias
    elif mode == "all":
        assert trainable_bias == all_bias
    else:
        assert trainable_bias == {n for n in all_bias if n.endswith("c_attn.base_layer.bias")}


def test_trainable_parameters_summary():
    model = apply_lora(_tiny.llama(hidden=32, layers=2), r=4)
    trainable, total = trainable_parameters(model)
    # q_proj (32->32) and v_proj (32->16) per layer: r*(in+out)
    assert trainable == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert total == sum(p.numel() for p in model.parameters())
    line = str(trainable_parameters(model))
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", line)


@pytest.mark.parametrize("kwargs, arg", [
    ({"r": 0}, "r"), ({"r": -2}, "r"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"), ({"init": "xavier"}, "init"), ({"bias": "some"}, "bias"),
    ({"alpha": float("nan")}, "alpha"), ({"alpha": float("inf")}, "alpha"), ({"r": 2.0}, "r"),
    ({"dropout": float("nan")}, "dropout"), ({"use_rslora": "no"}, "use_rslora"),
    ({"use_rslora": "false"}, "use_rslora"), ({"use_rslora": 1}, "use_rslora"),
    ({"autocast_adapter_dtype": "yes"}, "autocast_adapter_dtype"), ({"target_modules": 5}, "target_modules"),
    ({"target_modules": ["q_proj", 3]}, "target_modules"), ({"target_modules": []}, "target_modules"),
    ({"exclude_modules": 5}, "exclude_modules"), ({"modules_to_save": 5}, "modules_to_save"),
    ({"init": ["kaiming"]}, "init"),
])
def test_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg} "):
        apply_lora(_tiny.llama(), **kwargs)
    with pytest.raises(ValueError, match=rf"^{arg} "):
        LoRAConfig(**kwargs)


def test_nothing_matched_lists_existing_modules():
    with pytest.raises(ValueError, match="target_modules") as err:
        apply_lora(_tiny.llama(), target_modules=["query"])
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)
    with pytest.raises(ValueError, match="matched no module"):
        apply_lora(_tiny.llama(), target_modules=r"nothing.*")


def test_unsupported_target_and_missing_default():
    with pytest.raises(ValueError, match="LlamaMLP"):
        apply_lora(_tiny.llama(), target_modules=["mlp"])
    with pytest.raises(ValueError, match="target_modules was not given"):
        apply_lora(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="modules_to_save"):
        apply_lora(_tiny.llama(), modules_to_save=["nope"])


def test_failed_apply_leaves_model_unchanged():
    model = _tiny.llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError):
        apply_lora(model, target_modules=["q_proj"], modules_to_save=["nope"])
    assert not lora_layers(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- agreement with HF PEFT


def _copy_ours_into_peft(ours, peft_model):
    peft_params = dict(peft_model.named_parameters())
    for name, layer in lora_layers(ours):
        peft_params[f"base_model.model.{name}.lora_A.default.weight"].data.copy_(layer.lora_A)
        peft_params[f"base_model.model.{name}.lora_B.default.weight"].data.copy_(layer.lora_B)


@pytest.mark.parametrize("build, targets, inputs", [
    (_tiny.llama, ["q_proj", "v_proj", "down_proj"], lambda: torch.randint(0, 96, (2, 7))),
    (_tiny.gpt2, ["c_attn", "c_proj"], lambda: torch.randint(0, 50, (2, 7))),
    (_tiny.bert, ["query", "value"], lambda: torch.randint(0, 60, (2, 7))),
])
@pytest.mark.parametrize("rslora", [False, True])
def test_logits_identical_to_hf_peft(build, targets, inputs, rslora):
    ours = apply_lora(build(), r=4, alpha=12, target_modules=targets, use_rslora=rslora)
    _tiny.randomize_lora(ours)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=targets, use_rslora=rslora,
        fan_in_fan_out=build is _tiny.gpt2))
    _copy_ours_into_peft(ours, theirs)
    ids = inputs()
    out = ours(ids).logits
    torch.testing.assert_close(out, theirs(ids).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(out, build()(ids).logits, atol=1e-3)  # the adapters do act


# ---------------------------------------------------------------- kernels.lora_linear (torch path)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3),
                                        (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("x_grad", [False, True])
def test_lora_linear_against_float64(dtype, tol, with_bias, x_grad):
    torch.manual_seed(0)
    m, k, n, r = 37, 50, 23, 3
    x64 = torch.randn(2, m, k, dtype=torch.float64)
    w64 = torch.randn(n, k, dtype=torch.float64) / 7
    a64 = torch.randn(r, k, dtype=torch.float64) / 7
    b64 = torch.randn(n, r, dtype=torch.float64) / 2
    bias64 = torch.randn(n, dtype=torch.float64) if with_bias else None
    leaves = [t.to(dtype).requires_grad_() for t in (a64, b64)]
    x = x64.to(dtype).requires_grad_(x_grad)
    bias = bias64.to(dtype).requires_grad_() if with_bias else None
    y = kernels.lora_linear(x, w64.to(dtype), *leaves, 0.8, bias=bias)
    ref_leaves = [t.clone().requires_grad_() for t in (a64, b64)]
    x_ref = x64.clone().requires_grad_(x_grad)
    bias_ref = bias64.clone().requires_grad_() if with_bias else None
    ref = x_ref @ w64.t() + 0.8 * (x_ref @ ref_leaves[0].t()) @ ref_leaves[1].t()
    if with_bias:
        ref = ref + bias_ref
    assert y.dtype == dtype and y.shape == (2, m, n)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    for ours, theirs in zip(leaves + ([x] if x_grad else []) + ([bias] if with_bias else []),
                            ref_leaves + ([x_ref] if x_grad else []) + ([bias_ref] if with_bias else [])):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=tol * 10, atol=tol * 10)


def test_lora_linear_dropout_gradcheck_and_weight_grad():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator()

    def f(x, w, a, b, bias):
        gen.manual_seed(3)
        return kernels.lora_linear(x, w, a, b, 0.7, bias, dropout_p=0.3, generator=gen)

    assert torch.autograd.gradcheck(f, (x, w, a, b, bias))
    # the dropout mask is that of torch.bernoulli with the same generator state
    gen.manual_seed(3)
    keep = dropout_keep_mask((10, 7), 0.3, gen).view(2, 5, 7)
    expected = x @ w.t() + bias + 0.7 * ((x * keep / 0.7) @ a.t()) @ b.t()
    torch.testing.assert_close(f(x, w, a, b, bias), expected)


@pytest.mark.parametrize("p", [0.1, 0.7])
def test_lora_linear_saves_no_extra_activation(p):
    """Saved for backward: x (shared with the caller), S (tokens x r) and the dropped positions
    (int64, one per dropped element; above p=0.5 a bool keep mask) - never a second x."""
    torch.manual_seed(0)
    x = torch.randn(64, 128, requires_grad=True)
    w = torch.randn(96, 128)
    a = torch.randn(4, 128, requires_grad=True)
    b = torch.zeros(96, 4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    gen = torch.Generator().manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.lora_linear(x, w, a, b, 2.0, dropout_p=p, generator=gen)
    new_bytes = sum(t.numel() * t.element_size() for t in saved
                    if t.untyped_storage().data_ptr() not in
                    {x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr(),
                     a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()})
    dropped = int((~dropout_keep_mask((64, 128), p, gen.manual_seed(5))).sum())
    assert abs(dropped - p * 64 * 128) < 5 * (p * (1 - p) * 64 * 128) ** 0.5
    drop_bytes = 8 * dropped if p <= 0.5 else 64 * 128
    assert new_bytes == 64 * 4 * 4 + drop_bytes  # S in fp32 + the dropped positions or bool mask


def test_lora_linear_bad_inputs():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="x has 5 features"):
        kernels.lora_linear(torch.randn(4, 5), w, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_a must be"):
        kernels.lora_linear(x, w, torch.randn(2, 7), b, 1.0)
    with pytest.raises(ValueError, match="lora_b must be"):
        kernels.lora_linear(x, w, a, torch.randn(6, 3), 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        kernels.lora_linear(x, w, a, b, 1.0, bias=torch.randn(5))
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.lora_linear(x, w, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="weight dtype"):
        kernels.lora_linear(x, w.double(), a, b, 1.0)


def test_lora_linear_autocast_cpu_bf16():
    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    a, b = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.lora_linear(x, w, a, b, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad is not None
    torch.testing.assert_close(y.float(), x @ w.t() + (x @ a.t()) @ b.t(), rtol=3e-2, atol=6e-2)


# ---------------------------------------------------------------- backend seam


def test_backend_selection(monkeypatch):
    assert kernels.get_backend() in ("auto", "torch", "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.set_backend("cuda")
    monkeypatch.setenv("LIGHTNING_PEFT_BACKEND", "bogus")
    with kernels.use_backend("torch"):
        assert kernels.get_backend() == "torch"
    with pytest.raises(ValueError, match="LIGHTNING_PEFT_BACKEND"):
        kernels.get_backend()
    monkeypatch.setenv("LIGHTNING_PEFT_BACKEND", "torch")
    assert kernels.get_backend() == "torch"


def test_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.lora_linear(x, w, a, b, 1.0)


def test_transformers_unaffected_by_our_kernels_package():
    """Our import package is called `kernels`, like the HF kernels hub library: transformers must not
    take ours for it (our version is outside the range it checks) and models must still run."""
    from transformers.utils import import_utils

    assert not import_utils.is_kernels_available()
    model = _tiny.llama()
    out = model(torch.randint(0, 96, (1, 5))).logits
    assert out.shape == (1, 5, 96) and torch.isfinite(out).all()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_dropout_keep_mask_rate_independence_and_reproducibility(p):
    gen = torch.Generator().manual_seed(0)
    mask = dropout_keep_mask((513, 257), p, gen)
    assert mask.dtype == torch.bool and mask.shape == (513, 257)
    n = mask.numel()
    drop = (~mask).view(-1).double()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(drop.mean().item() - p) < 5 * sd
    # i.i.d.: neighbours (in a row and across rows) are dropped together with probability p²
    for lag in (1, 2, 257):
        both = (drop[:-lag] * drop[lag:]).mean().item()
        assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / (n - lag)) ** 0.5, lag
    # runs of kept elements are geometric: P(run >= 3 | run >= 1) = (1-p)^2
    keep = mask.view(-1).double()
    starts = keep[1:] * (1 - keep[:-1])
    long_runs = (starts[:-2] * keep[2:-1] * keep[3:]).sum() / starts[:-2].sum()
    assert abs(long_runs.item() - (1 - p) ** 2) < 0.05
    assert torch.equal(dropout_keep_mask((513, 257), p, gen.manual_seed(0)), mask)
    assert not torch.equal(dropout_keep_mask((513, 257), p, gen), mask)


def test_dropout_positions_are_sorted_unique_and_in_range(monkeypatch):
    from kernels import lora as kl

    gen = torch.Generator().manual_seed(1)
    pos = kl.dropout_positions(10_007, 0.2, gen)
    assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all())
    assert 0 <= int(pos[0]) and int(pos[-1]) < 10_007
    assert kl.dropout_positions(0, 0.2).numel() == 0 and kl.bernoulli_positions(5, 0.0).numel() == 0
    assert torch.equal(kl.bernoulli_positions(7, 1.0), torch.arange(7))
    tiny = torch.cat([kl.bernoulli_positions(100_000, 1e-4, gen) for _ in range(50)])
    assert abs(tiny.numel() - 500) < 5 * 500 ** 0.5  # float64 uniforms for long gaps
    # too few gaps drawn in the first round: further rounds continue where the last one stopped
    monkeypatch.setattr(kl, "_MARGIN_SIGMAS", -40.0)
    short = kl.bernoulli_positions(50_000, 0.1, gen)
    assert bool((short[1:] > short[:-1]).all()) and int(short[-1]) < 50_000
    assert abs(short.numel() - 5000) < 5 * (5000 * 0.9) ** 0.5 and int(short[-1]) > 49_000
    # above p=0.5 the kept positions are drawn and the result is a bool keep mask
    keep = kl.dropout_positions(4000, 0.75, gen)
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.25) < 0.04




# ---------------------------------------------------------------- casts, precision, modules_to_save


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_unmerge_after_a_cast_restores_w0_in_the_new_dtype(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    original = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    apply_lora(model, r=4, target_modules=["0", "2"])
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.5)
    merge_adapters(model)
    model.to(dtype)
    assert all(layer.merged for _, layer in lora_layers(model))
    assert model[0].base_layer.weight.dtype == dtype
    unmerge_adapters(model)
    for (_, layer), w0 in zip(lora_layers(model), original):
        assert not layer.merged
        assert torch.equal(layer.base_layer.weight, w0.to(dtype))  # W0 exactly, in the new dtype
    with pytest.warns(UserWarning, match="not merged"):
        lora_layers(model)[0][1].unmerge()  # a retry changes nothing
    assert torch.equal(model[0].base_layer.weight, original[0].to(dtype))


def test_unmerge_after_weight_replaced_behind_our_back_leaves_a_true_flag():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(33, 17), r=4)
    nn.init.normal_(layer.lora_B, std=0.5)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.base_layer.weight.data = layer.base_layer.weight.data.half()  # not through Module._apply
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight.float(), w0, atol=2e-3, rtol=2e-3)


def test_adapters_stay_fp32_on_a_half_precision_base():
    from lightning_peft._base import restore_adapter_dtypes

    for dtype in (torch.bfloat16, torch.float16):
        model = _tiny.llama().to(dtype)
        apply_lora(model, r=4, target_modules=["q_proj", "v_proj"])
        for _, layer in lora_layers(model):
            assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
            assert layer.base_layer.weight.dtype == dtype and layer.adapter_dtype == torch.float32
        _tiny.randomize_lora(model)
        ids = torch.randint(0, 96, (2, 9))
        logits = model(ids).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        # a whole-model cast (Lightning's "bf16-true") is undone for the adapters, Parameters kept
        params = [layer.lora_A for _, layer in lora_layers(model)]
        model.to(dtype)
        assert lora_layers(model)[0][1].lora_A.dtype == dtype
        assert restore_adapter_dtypes(model) == 2 * len(params)
        assert all(p.dtype == torch.float32 and p is layer.lora_A
                   for p, (_, layer) in zip(params, lora_layers(model)))
    model = _tiny.llama().to(torch.bfloat16)
    apply_lora(model, r=4, autocast_adapter_dtype=False)
    assert all(layer.lora_A.dtype == torch.bfloat16 and layer.adapter_dtype is None
               for _, layer in lora_layers(model))
    model = _tiny.llama()  # fp32 base: fp32 adapters, kept fp32 through a later bf16 cast
    apply_lora(model, r=4)
    assert all(layer.adapter_dtype == torch.float32 for _, layer in lora_layers(model))


def _train_bf16_llama(autocast: bool, steps: int = 25) -> tuple[float, float, float]:
    """(loss before, loss after, fraction of lora_A elements that moved) for a bf16 tiny Llama."""
    torch.manual_seed(0)
    model = _tiny.llama(seed=3).to(torch.bfloat16)
    apply_lora(model, r=8, alpha=16, target_modules="all-linear", autocast_adapter_dtype=autocast)
    a0 = [layer.lora_A.detach().clone() for _, layer in lora_layers(model)]
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)
    with torch.no_grad():
        first = model(ids, labels=ids).loss.float().item()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = sum((layer.lora_A != a).sum().item() for (_, layer), a in zip(lora_layers(model), a0))
    with torch.no_grad():
        return first, model(ids, labels=ids).loss.float().item(), moved / sum(a.numel() for a in a0)


def test_fp32_adapters_train_at_least_as_well_as_bf16_adapters():
    start32, end32, moved32 = _train_bf16_llama(autocast=True)
    start16, end16, moved16 = _train_bf16_llama(autocast=False)
    assert start32 == start16  # both start from the base model
    assert end32 < start32
    assert end32 <= end16, (end32, end16)
    assert moved32 == 1.0 and moved16 < 0.5  # most bf16 updates of A (lr 1e-4) round away


def test_modules_to_save_buffers_are_adapter_buffers():
    from lightning_peft._base import adapter_named_buffers

    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    apply_lora(model, r=2, target_modules=["0", "2"], modules_to_save=["1"])
    names = dict(adapter_named_buffers(model))
    assert sorted(names) == ["1.modules_to_save.num_batches_tracked", "1.modules_to_save.running_mean",
                             "1.modules_to_save.running_var"]
    model.train()(torch.randn(16, 6))
    assert names["1.modules_to_save.num_batches_tracked"].item() == 1
    assert model[1].original_module.num_batches_tracked.item() == 0  # the base module is untouched


def test_all_linear_skips_a_one_linear_head_in_modules_to_save():
    model = _tiny.bert()
    apply_lora(model, r=2, target_modules="all-linear", modules_to_save=["classifier"])
    assert isinstance(model.classifier, ModulesToSave)
    assert not isinstance(model.classifier.modules_to_save, LoRALinear)
    assert "bert.encoder.layer.0.attention.self.query" in _lora_names(model)
    with pytest.raises(ValueError, match="modules_to_save and target_modules both select"):
        apply_lora(_tiny.bert(), target_modules=["classifier", "query"], modules_to_save=["classifier"])


def test_no_lora_inside_a_modules_to_save_module():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=60, hidden_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=40, num_labels=3)
    model = transformers.RobertaForSequenceClassification(cfg).eval()
    apply_lora(model, r=2, target_modules="all-linear", modules_to_save=["classifier"])
    head = model.classifier
    assert isinstance(head, ModulesToSave)
    assert not any(isinstance(m, LoRALinear) for m in head.modules())
    assert not any(p.requires_grad for p in head.original_module.parameters())
    assert all(p.requires_grad for p in head.modules_to_save.parameters())
    assert "roberta.encoder.layer.0.output.dense" in _lora_names(model)


def test_torch_compile_fullgraph_with_dropout():
    """``torch.compile(fullgraph=True)`` of the CPU op with dropout: the traced op draws a dense
    keep mask (no data-dependent loop). With A = I the branch exposes the mask: y - x·Wᵀ equals
    s/(1-p)·(x⊙keep)·Bᵀ; the drop rate is p; the gradients are those of that mask."""
    torch.manual_seed(0)
    k, n, p, s = 32, 48, 0.3, 0.5                                       # n > k: B has full column rank
    x = torch.randn(4, 50, k, requires_grad=True)
    w = torch.randn(n, k)
    a = torch.eye(k).requires_grad_(True)
    b = torch.randn(n, k).requires_grad_(True)

    def f(x, a, b):
        return kernels.lora_linear(x, w, a, b, s, dropout_p=p)

    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, a, b)
    branch = torch.linalg.lstsq(b.detach(), (y - x @ w.t()).detach().reshape(-1, n).t()).solution.t()
    keep = branch.abs() > 1e-4                                          # x is nonzero a.s.
    assert abs((~keep).float().mean().item() - p) < 6 * (p * (1 - p) / keep.numel()) ** 0.5
    x2 = x.detach().reshape(-1, k)
    torch.testing.assert_close(branch, s / (1 - p) * x2 * keep, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), gy)
    g2 = gy.reshape(-1, n)
    xd = s / (1 - p) * x2 * keep
    torch.testing.assert_close(gx.reshape(-1, k), g2 @ w + (s / (1 - p)) * (g2 @ b.detach()) * keep,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, g2.t() @ xd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ga, (s / (1 - p)) * ((g2 @ b.detach()).t() @ (x2 * keep)),
                               rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("apply_name", ["apply_lora", "apply_qlora"])
@pytest.mark.parametrize("first, targets, carried", [
    ("apply_ia3", None, "IA3Linear"),                    # IA3 on k, v, down; LoRA's q, v: v clashes
    ("apply_dylora", None, "DyLoRALinear"),              # DyLoRA on q, v: every LoRA target
    ("apply_adapters", "all-linear", "BottleneckAdapter"),  # adapter sites at o and down
])
def test_lora_refuses_another_methods_layer_and_leaves_the_model(apply_name, first, targets, carried):
    """LoRA (and QLoRA, through it) on a target another method already wraps is an error naming
    the layers and that method's layer type, raised before anything changes (it used to skip those
    targets silently: after DyLoRA on q and v, LoRA injected nothing and said nothing)."""
    import lightning_peft
    from lightning_peft._base import AdapterLayer

    model = getattr(lightning_peft, first)(_tiny.llama())
    apply = functools.partial(getattr(lightning_peft, apply_name),
                              **({"compute_dtype": torch.float32} if apply_name == "apply_qlora" else {}))
    modules = dict(model.named_modules())
    params = {n: (p, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"selects .*which already carr.*another method's layer "
                                         rf"\({carried}\); LoRA does not wrap"):
        apply(model, target_modules=targets)
    assert dict(model.named_modules()) == modules
    for n, p in model.named_parameters():
        before, grad, value = params[n]
        assert p is before and p.requires_grad == grad and torch.equal(p, value)
    # leaving the other method's layers out works: LoRA beside them, never around or inside them
    wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == carried})
    apply(model, target_modules=targets or ["q_proj", "k_proj", "v_proj"], exclude_modules=wrapped)
    layers = lora_layers(model)
    assert layers and {type(m).__name__ for m in model.modules()} >= {"LoRALinear", carried}
    assert not any(isinstance(m.base_layer, AdapterLayer) for _, m in layers)
    assert not any(type(m).__name__ == carried for _, layer in layers for m in layer.modules())


def test_all_linear_lora_beside_trainable_tokens():
    """``"all-linear"`` takes an adapter layer only where it wraps a linear: LoRA on every linear of
    a model whose embedding trains some rows wraps the 14 linears and leaves the embedding's layer
    to its method; naming the embedding is refused."""
    from lightning_peft import apply_trainable_tokens

    model = apply_trainable_tokens(_tiny.llama(), token_indices=[1, 5])
    with pytest.raises(ValueError, match=r"selects model\.embed_tokens, which already carries another "
                                         r"method's layer \(TrainableTokensLayer\)"):
        apply_lora(model, target_modules=["embed_tokens", "q_proj"])
    assert not lora_layers(model)
    apply_lora(model, target_modules="all-linear")
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == 14 and not any("embed" in n for n in names)
    assert type(model.get_submodule("model.embed_tokens")).__name__ == "TrainableTokensLayer"


@pytest.mark.parametrize("changed, shown", [
    ({"r": 16}, "r=8 there, 16 asked"),
    ({"alpha": 64}, "alpha=16.0 there, 64.0 asked"),
    ({"dropout": 0.1}, "dropout=0.0 there, 0.1 asked"),
    ({"use_rslora": True}, "use_rslora=False there, True asked"),
    ({"use_dora": True}, "use_dora=False there, True asked"),
])
def test_applying_lora_again_takes_the_same_settings(changed, shown):
    """Applying LoRA again keeps each layer's adapter and adds new targets; other settings for a
    layer that carries LoRA (they used to be ignored silently) are refused before anything changes,
    by QLoRA too (before any base is quantized)."""
    from lightning_peft import NF4Linear, apply_qlora

    model = apply_lora(_tiny.llama(), r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    layers = dict(lora_layers(model))
    for apply in (apply_lora, functools.partial(apply_qlora, compute_dtype=torch.float32)):
        with pytest.raises(ValueError, match=rf"self_attn\.q_proj.* already carry LoRA with other settings "
                                             rf"\({re.escape(shown)}\).*add_adapter"):
            apply(model, target_modules="all-linear", **{"r": 8, "alpha": 16, **changed})
        assert dict(lora_layers(model)) == layers
        assert not any(isinstance(m, NF4Linear) for m in model.modules())
    # the same settings: the LoRA layers stay (the same objects), the new targets are added
    apply_lora(model, r=8, alpha=16, target_modules="all-linear")
    now = dict(lora_layers(model))
    assert len(now) == 14 and all(now[n] is layer for n, layer in layers.items())


@pytest.mark.parametrize("build, first, targets, count", [
    # LLaMA-Adapter wraps the top layer's attention: its q/v used to be skipped silently
    (_tiny.llama, "apply_llama_adapter", ["q_proj", "v_proj"], 4),
    # parallel adapters wrap GPT-2's attn and mlp blocks: "all-linear" used to match nothing
    (_tiny.gpt2, "apply_adapters", "all-linear", 8),
])
def test_lora_reaches_the_linears_of_a_block_another_method_wraps(build, first, targets, count):
    """Another method's layer around a whole block (not one linear) leaves the block's linears
    targetable: LoRA applied after it adapts the same projections, with the same outputs and
    gradients, as LoRA applied before it."""
    import lightning_peft

    settings = {"apply_llama_adapter": {"adapter_len": 3, "adapter_layers": 1},
                "apply_adapters": {"bottleneck": 4, "placement": "parallel"}}[first]
    wrap = functools.partial(getattr(lightning_peft, first), **settings)
    after = apply_lora(wrap(build()), r=4, target_modules=targets)
    before = wrap(apply_lora(build(), r=4, target_modules=targets))
    names = [n for n, _ in lora_layers(after)]
    assert len(names) == count and names == [n for n, _ in lora_layers(before)]
    assert any(".base_layer." in n for n in names)                    # inside the wrapped block
    for model in (after, before):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(4))
    for _ in range(3):                                                 # shared-input fusion learns
        outs = [m(ids).logits for m in (after, before)]
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for out in outs:
        out.square().mean().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (after, before)]
    assert grads[0].keys() == grads[1].keys()
    for n, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][n], msg=n)


def test_injected_layers_take_the_models_train_or_eval_mode(tmp_path):
    """Layers are created in training mode; injected into a model in ``eval()`` (by apply_lora,
    load_adapter or P-tuning) they used to stay there, so dropout ran at inference and two eval
    forwards differed. They now take the mode of the module they wrap (or sit in)."""
    from lightning_peft import apply_p_tuning, load_adapter, save_adapter

    ids = torch.randint(0, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    source = apply_lora(_tiny.llama(), r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.3)
    _tiny.randomize_lora(source)
    save_adapter(source, tmp_path)
    prompted = apply_p_tuning(_tiny.llama(), num_virtual_tokens=3, encoder_type="LSTM", encoder_dropout=0.5)
    for model in (source, load_adapter(_tiny.llama(), tmp_path), prompted):
        assert not model.training and not any(m.training for m in model.modules())
        with torch.no_grad():
            assert torch.equal(model(ids).logits, model(ids).logits)
    trained = apply_lora(_tiny.llama().train(), r=4, target_modules=["q_proj"], dropout=0.3)
    assert all(layer.training for _, layer in lora_layers(trained))
    torch.testing.assert_close(load_adapter(_tiny.llama(), tmp_path)(ids).logits, source(ids).logits,
                               rtol=0, atol=0)
