"""DoRA (arXiv 2402.09353): the op against a naive float64 reference, the layer, merging, HF PEFT's
files both ways, training, and the refusals of bad arguments."""

import json

import peft
import pytest
import torch
from torch import nn

from kernels.lora import dora_linear, dora_weight_norm, dropout_keep_mask
from lightning_peft import (
    LoRACallback,
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from lightning_peft.methods import _grouping
from lightning_peft.methods.lora import LoRAConfig, lora_layers
from tests import _lit, _tiny


def _naive(x, w, a, b, s, m, bias=None, keep=None, p=0.0, detach=True):
    """DoRA written out: y = m/||W0 + s·B·A|| ⊙ (x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ) + b, the update
    built in full and the norm taken directly (detached unless ``detach=False``)."""
    norm = (w + s * b @ a).norm(dim=1)
    if detach:
        norm = norm.detach()
    xd = x if keep is None else x * keep / (1.0 - p)
    y = (m / norm) * (x @ w.t() + s * (xd @ a.t()) @ b.t())
    return y if bias is None else y + bias


def _randomize_magnitudes(model, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.5 * torch.rand(p.shape, generator=g))


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("out_features, in_features, r", [(11, 13, 3), (40, 7, 9), (1, 33, 2)])
def test_norm_from_low_rank_algebra_equals_the_norm_of_the_built_update(out_features, in_features, r):
    g = torch.Generator().manual_seed(out_features)
    w = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    a = torch.randn(r, in_features, generator=g, dtype=torch.float64)
    b = torch.randn(out_features, r, generator=g, dtype=torch.float64)
    expected = (w + 0.7 * b @ a).norm(dim=1)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 0.7), expected, rtol=1e-12, atol=0)
    cached = w.square().sum(1)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 0.7, cached), expected, rtol=1e-12, atol=0)
    # fp32 inputs: fp32 result close to the float64 norm
    got32 = dora_weight_norm(w.float(), a.float(), b.float(), 0.7)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
def test_dora_linear_and_its_gradients_against_float64(dtype, tol, with_bias, p):
    g = torch.Generator().manual_seed(0)
    s, n_out, n_in, r = 0.9, 19, 23, 5
    ref = {"x": torch.randn(2, 7, n_in, generator=g, dtype=torch.float64),
           "w": torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * 0.3,
           "a": torch.randn(r, n_in, generator=g, dtype=torch.float64) * 0.3,
           "b": torch.randn(n_out, r, generator=g, dtype=torch.float64) * 0.3,
           "m": torch.rand(n_out, generator=g, dtype=torch.float64) + 0.5,
           "bias": torch.randn(n_out, generator=g, dtype=torch.float64) if with_bias else None}
    ref = {k: None if v is None else v.requires_grad_() for k, v in ref.items()}
    ours = {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in ref.items()}
    y = dora_linear(ours["x"], ours["w"], ours["a"], ours["b"], s, ours["m"], ours["bias"], dropout_p=p,
                    generator=torch.Generator().manual_seed(5))
    keep = None if p == 0.0 else dropout_keep_mask(ref["x"].shape, p, torch.Generator().manual_seed(5))
    expected = _naive(ref["x"], ref["w"], ref["a"], ref["b"], s, ref["m"], ref["bias"], keep, p)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    names = [k for k, v in ref.items() if v is not None]
    got = torch.autograd.grad(y, [ours[k] for k in names], dy.to(dtype))
    want = torch.autograd.grad(expected, [ref[k] for k in names], dy)
    for name, gg, ww in zip(names, got, want):
        assert gg.dtype == dtype, name
        torch.testing.assert_close(gg.double(), ww, rtol=tol, atol=tol * 10, msg=f"d{name}")


def test_the_norm_is_detached_as_in_section_4_3():
    """dA and dB leave out the norm's own derivative: they differ from the undetached one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    w = torch.randn(6, 9, generator=g, dtype=torch.float64)
    a = torch.randn(3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(6, generator=g, dtype=torch.float64) + 1
    got = torch.autograd.grad(dora_linear(x, w, a, b, 0.5, m).sum(), (a, b))
    detached = torch.autograd.grad(_naive(x, w, a, b, 0.5, m).sum(), (a, b))
    full = torch.autograd.grad(_naive(x, w, a, b, 0.5, m, detach=False).sum(), (a, b))
    for ours, det, undet in zip(got, detached, full):
        torch.testing.assert_close(ours, det, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(ours, undet, atol=1e-3)


def test_dora_linear_bad_arguments_name_the_argument():
    x, w, a, b = torch.randn(2, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="magnitude"):
        dora_linear(x, w, a, b, 1.0, torch.ones(4))
    with pytest.raises(ValueError, match="magnitude"):
        dora_linear(x, w, a, b, 1.0, None)
    with pytest.raises(ValueError, match="weight_norm_sq"):
        dora_linear(x, w, a, b, 1.0, torch.ones(5), weight_norm_sq=torch.ones(5, 1))
    with pytest.raises(ValueError, match="scaling"):
        dora_linear(x, w, a, b, float("nan"), torch.ones(5))
    with pytest.raises(ValueError, match="dropout_p"):
        dora_linear(x, w, a, b, 1.0, torch.ones(5), dropout_p=1.0)
    with pytest.raises(ValueError, match="lora_b"):
        dora_linear(x, w, a, b.t(), 1.0, torch.ones(5))


def _saved_bytes(fn, x, params):
    known = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in known:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


def test_saves_one_output_sized_tensor_and_fewer_bytes_than_peft():
    torch.manual_seed(0)
    tokens, features, r = 64, 48, 4
    base = nn.Linear(features, features, bias=False).requires_grad_(False)
    ours = LoRALinear(base, r=r, alpha=8, use_dora=True)
    theirs = peft.tuners.lora.Linear(base, "default", r=r, lora_alpha=8, use_dora=True,
                                     config=peft.LoraConfig(r=r, lora_alpha=8, use_dora=True))
    x = torch.randn(tokens, features, requires_grad=True)
    mine = _saved_bytes(ours, x, list(ours.parameters()))
    peft_bytes = _saved_bytes(theirs, x, list(theirs.parameters()))
    # u (tokens, out) for dm, S (tokens, r) and two (out,) vectors
    assert mine == 4 * (tokens * features + tokens * r + 2 * features)
    assert mine < peft_bytes
    ours.lora_magnitude_vector.requires_grad_(False)  # no dm: u is not kept
    assert _saved_bytes(ours, x, list(ours.parameters())) == 4 * (tokens * r + 2 * features)


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize("conv1d", [False, True])
def test_layer_starts_at_the_base_and_matches_the_formula(conv1d):
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(23, 37).double()
        w = base.weight.t()
    else:
        base = nn.Linear(37, 23).double()
        w = base.weight
    layer = LoRALinear(base, r=5, alpha=7.0, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector, w.norm(dim=1), rtol=1e-14, atol=0)
    x = torch.randn(3, 11, 37, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-13, atol=1e-13)
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(23, dtype=torch.float64) + 0.5)
    expected = _naive(x, w, layer.lora_A, layer.lora_B, 7.0 / 5, layer.lora_magnitude_vector, base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert set(layer.adapter_parameters()) == {"lora_A", "lora_B", "lora_magnitude_vector"}
    assert layer.file_key("lora_magnitude_vector") == "lora_magnitude_vector"


def test_base_norm_cache_follows_changes_of_the_base_weight():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8).requires_grad_(False), r=2, use_dora=True)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    layer(x)
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)  # in place: the version counter moves
    expected = _naive(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling,
                      layer.lora_magnitude_vector, layer.base_layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_nf4_base():
    from lightning_peft.methods.qlora import NF4Linear

    torch.manual_seed(0)
    dense = nn.Linear(64, 24)
    base = NF4Linear.from_linear(dense, compute_dtype=torch.float32)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True)
    w = base.weight.dequantize(torch.float32)
    torch.testing.assert_close(layer.lora_magnitude_vector, w.norm(dim=1), rtol=1e-6, atol=0)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    expected = _naive(x, w, layer.lora_A, layer.lora_B, 2.0, layer.lora_magnitude_vector, dense.bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and x.grad is not None
    q = base.weight
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    merged = base.weight.dequantize(torch.float32)  # W' re-quantized: NF4's rounding only
    scale = layer.lora_magnitude_vector / (w + 2.0 * layer.lora_B @ layer.lora_A).norm(dim=1)
    target = scale[:, None] * (w + 2.0 * layer.lora_B @ layer.lora_A)
    assert ((merged - target).norm() / target.norm()).item() < 0.1
    assert ((layer(x) - y).norm() / y.norm()).item() < 0.1
    layer.unmerge()
    assert layer.base_layer.weight is q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_unmerge_exact(dtype, conv1d):
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(48, 64).to(dtype)
    else:
        base = nn.Linear(64, 48).to(dtype)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True)
    nn.init.normal_(layer.lora_B, std=0.2)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(48) + 0.5)
    x = torch.randn(6, 64, dtype=dtype)
    y = layer(x)
    for _ in range(3):
        layer.merge()
        assert layer.merged
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(layer(x), y, rtol=tol, atol=tol)
        assert not torch.equal(base.weight, original)
        layer.unmerge()
        assert torch.equal(base.weight, original) and not layer.merged
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_dora_layers_are_not_fused_with_their_siblings():
    model = apply_lora(_tiny.llama(), r=4, target_modules=["q_proj", "k_proj", "v_proj"], use_dora=True)
    assert all(_grouping.group_of(m) is None for _, m in lora_layers(model))
    plain = apply_lora(_tiny.llama(), r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    assert any(_grouping.group_of(m) is not None for _, m in lora_layers(plain))


def test_config_apply_and_callback_take_use_dora():
    assert LoRACallback(use_dora=True).config.use_dora is True
    model = apply_lora(_tiny.llama(), r=4, target_modules=["q_proj"], use_dora=True)
    layers = lora_layers(model)
    assert layers and all(m.use_dora and m.lora_magnitude_vector.requires_grad for _, m in layers)
    assert "dora=True" in repr(layers[0][1])


@pytest.mark.parametrize("make", [
    lambda: LoRAConfig(use_dora="yes"),
    lambda: LoRAConfig(use_dora=1),
    lambda: apply_lora(_tiny.llama(), use_dora=None),
    lambda: LoRALinear(nn.Linear(4, 4), use_dora="true"),
    lambda: LoRACallback(use_dora=0),
])
def test_bad_use_dora_is_a_value_error_naming_it(make):
    with pytest.raises(ValueError, match="use_dora"):
        make()


# ---------------------------------------------------------------- HF PEFT's files, both ways


_CASES = [(_tiny.llama, ["q_proj", "v_proj", "down_proj"], 96), (_tiny.gpt2, ["c_attn", "c_proj"], 50)]


@pytest.mark.parametrize("build, targets, vocab", _CASES)
def test_our_file_loads_in_peft_with_identical_logits(tmp_path, build, targets, vocab):
    ours = apply_lora(build(), r=4, alpha=12, target_modules=targets, use_dora=True)
    _tiny.randomize_lora(ours)
    _randomize_magnitudes(ours)
    ids = torch.randint(0, vocab, (2, 9))
    logits = ours(ids).logits
    assert not torch.allclose(logits, build()(ids).logits, atol=1e-3)  # the adapter acts
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    magnitudes = [n for n, _ in theirs.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == len(lora_layers(ours))
    torch.testing.assert_close(theirs(ids).logits, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("build, targets, vocab", _CASES)
def test_peft_file_loads_here_with_identical_logits(tmp_path, build, targets, vocab):
    theirs = peft.get_peft_model(build(), peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=targets, use_dora=True, fan_in_fan_out=build is _tiny.gpt2))
    _tiny.randomize_lora(theirs)
    _randomize_magnitudes(theirs)
    theirs.eval()
    ids = torch.randint(0, vocab, (2, 9))
    expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path)
    ours = build()
    load_adapter(ours, tmp_path)
    assert all(m.use_dora for _, m in lora_layers(ours))
    torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=1e-5)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters()}
    merge_adapters(ours)
    torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=1e-5)
    unmerge_adapters(ours)
    assert all(torch.equal(weights[n], p) for n, p in ours.named_parameters())


def test_bad_files_and_mixtures_are_refused_naming_use_dora(tmp_path):
    ours = apply_lora(_tiny.llama(), r=4, target_modules=["q_proj"], use_dora=True)
    save_adapter(ours, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["use_dora"] = "true"
    path.write_text(json.dumps(config))
    fresh = _tiny.llama()
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(fresh, tmp_path)
    assert not lora_layers(fresh) and all(torch.equal(before[n], p) for n, p in fresh.named_parameters())
    config["use_dora"] = True
    path.write_text(json.dumps(config))
    plain = apply_lora(_tiny.llama(), r=4, target_modules=["q_proj"])  # carries plain LoRA already
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(plain, tmp_path)
    mixed = apply_lora(_tiny.llama(), r=4, target_modules=["q_proj"], use_dora=True)
    apply_lora(mixed, r=4, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="use_dora"):
        save_adapter(mixed, tmp_path / "mixed")


# ---------------------------------------------------------------- training


def test_training_with_the_callback_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    module = _lit.TinyLM(lr=3e-2)
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    batch = next(iter(_lit.loader()))
    with torch.no_grad():
        before = module._loss(batch).item()
    callback = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    _lit.trainer(tmp_path, callbacks=[callback], max_steps=24, max_epochs=6).fit(module, _lit.loader())
    layers = lora_layers(module.model)
    assert layers and all(m.use_dora for _, m in layers)
    module.model.eval()
    with torch.no_grad():
        after = module._loss(batch).item()
    assert after < before - 0.05  # plain LoRA on q, v lowers it by about as much here
    moved = [n for n, m in layers if not torch.allclose(m.lora_magnitude_vector, m.weight.norm(dim=1))]
    assert moved  # the magnitudes trained
    for name, p in module.model.named_parameters():
        if "lora_" not in name:
            base_name = name.replace(".base_layer", "")
            assert torch.equal(p, frozen[base_name]), name


# ---------------------------------------------------------------- the Triton path (interpreter on CPU)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias, m_grad", [(True, True), (False, False)])
def test_triton_epilogue_against_float64(p, with_bias, m_grad):
    import kernels
    from kernels import _lora_triton

    g = torch.Generator().manual_seed(0)
    s, n_out, n_in, r, tokens = 0.7, 29, 45, 5, 37  # no size a multiple of the 16-wide tiles
    ref = {"x": torch.randn(tokens, n_in, generator=g, dtype=torch.float64),
           "w": torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * 0.3,
           "a": torch.randn(r, n_in, generator=g, dtype=torch.float64) * 0.3,
           "b": torch.randn(n_out, r, generator=g, dtype=torch.float64) * 0.3,
           "m": torch.rand(n_out, generator=g, dtype=torch.float64) + 0.5,
           "bias": torch.randn(n_out, generator=g, dtype=torch.float64) if with_bias else None}
    grads = [k for k in ("x", "a", "b", "m", "bias") if ref[k] is not None and (k != "m" or m_grad)]
    for k in grads:
        ref[k].requires_grad_()
    ours = {k: None if v is None else v.detach().float().requires_grad_(k in grads) for k, v in ref.items()}
    with kernels.use_backend("triton"):
        y = dora_linear(ours["x"], ours["w"], ours["a"], ours["b"], s, ours["m"], ours["bias"],
                        dropout_p=p, generator=torch.Generator().manual_seed(3))
    keep = None
    if p:  # the Philox mask the kernels derive from the seed drawn from the generator
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=torch.Generator().manual_seed(3))
        keep = _lora_triton.dropout_keep_mask(seed, tokens, n_in, p)
    expected = _naive(ref["x"], ref["w"], ref["a"], ref["b"], s, ref["m"], ref["bias"], keep, p)
    torch.testing.assert_close(y.double(), expected, rtol=2e-5, atol=2e-5)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, [ours[k] for k in grads], dy.float())
    want = torch.autograd.grad(expected, [ref[k] for k in grads], dy)
    for name, gg, ww in zip(grads, got, want):
        torch.testing.assert_close(gg.double(), ww, rtol=2e-5, atol=2e-4, msg=f"d{name}")


def test_triton_layer_matches_the_torch_layer():
    import kernels

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(40, 24), r=4, alpha=8, use_dora=True).eval()
    nn.init.normal_(layer.lora_B, std=0.3)
    x = torch.randn(2, 9, 40)
    expected = layer(x)
    with kernels.use_backend("triton"):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
