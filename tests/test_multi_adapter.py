"""Named LoRA adapters (issue 14 items 1-3): switching, disabling, gradients of the active set only,
mixed-adapter batches, combining (linear, cat, svd, ties, dare) against float64 references on the
updates, merge-switching that restores W0 bit for bit, HF PEFT's multi-adapter files both ways, and
refusals that leave the model unchanged."""

import copy
import json

import peft
import pytest
import torch

from lightning_peft import (
    active_adapters,
    adapter_names_for_rows,
    adapter_state_dict,
    add_adapter,
    apply_lora,
    apply_qlora,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    load_adapter_state_dict,
    merge_adapters,
    save_adapter,
    set_adapter,
    unmerge_adapters,
)
from lightning_peft.methods.lora import LoRAConfig, lora_layers
from tests import _tiny

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _model(dora: bool = False, dtype: torch.dtype = torch.float32):
    """A tiny Llama with a default adapter (r=4) and named adapters b (r=2, all targets) and c
    (r=3, rsLoRA, q_proj only), all with nonzero updates."""
    model = _tiny.llama().to(dtype)
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS)
    add_adapter(model, "b", r=2, alpha=4, use_dora=dora)
    add_adapter(model, "c", LoRAConfig(r=3, alpha=3, use_rslora=True, target_modules=["q_proj"]))
    _tiny.randomize_lora(model, 1)
    return model


def _ids(rows: int = 4, seed: int = 0):
    return torch.randint(0, 96, (rows, 7), generator=torch.Generator().manual_seed(seed))


def _alone(model, name: str):
    """A fresh base model carrying only adapter ``name`` of ``model``, as its default adapter."""
    fresh = _tiny.llama().to(next(model.parameters()).dtype)
    layers = [(n, m) for n, m in lora_layers(model) if m.holds(name)]
    for n, layer in layers:
        slot = layer.slot(name)
        apply_lora(fresh, r=slot.r, alpha=slot.alpha, use_rslora=slot.use_rslora, use_dora=slot.use_dora,
                   target_modules=[n])
    with torch.no_grad():
        for n, layer in layers:
            own, dest = layer.slot(name), fresh.get_submodule(n)
            dest.lora_A.copy_(own.lora_A)
            dest.lora_B.copy_(own.lora_B)
            if own.lora_magnitude_vector is not None:
                dest.lora_magnitude_vector.copy_(own.lora_magnitude_vector)
    return fresh


@torch.no_grad()
def _logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


@pytest.mark.parametrize("dora", [False, True])
def test_switching_equals_a_model_with_that_adapter_alone(dora):
    model, ids = _model(dora), _ids()
    assert active_adapters(model) == ["default"] and list_adapters(model) == ["default", "b", "c"]
    for name in ("default", "b", "c"):
        set_adapter(model, name)
        assert active_adapters(model) == [name]
        want = _logits(_alone(model, name), ids)
        torch.testing.assert_close(_logits(model, ids), want, atol=1e-6, rtol=1e-6)


def test_active_set_sums_the_updates_and_disable_gives_the_base_bit_for_bit():
    model, ids = _model(), _ids()
    base = _logits(_tiny.llama(), ids)
    with disable_adapters(model):
        assert torch.equal(_logits(model, ids), base)
    set_adapter(model, ["b", "c"])
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    want = x @ layer.weight.t()
    for name in ("b", "c"):
        s = layer.slot(name)
        want = want + s.scaling * (x @ s.lora_A.t()) @ s.lora_B.t()
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    merge_adapters(model)  # disabling a merged model restores W0 for the block
    with disable_adapters(model):
        assert torch.equal(_logits(model, ids), base)
    assert all(m.merged for _, m in lora_layers(model) if m.holds("b"))
    unmerge_adapters(model)


def test_disable_covers_modules_to_save_and_checkpoints_see_every_adapter():
    model, ids = _tiny.llama(), _ids()
    base = _logits(model, ids)
    apply_lora(model, r=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    add_adapter(model, "b", r=2)
    _tiny.randomize_lora(model, 1)
    with torch.no_grad():
        model.lm_head.modules_to_save.weight.add_(1.0)
    set_adapter(model, "b")
    with disable_adapters(model):
        assert torch.equal(_logits(model, ids), base)
    state = adapter_state_dict(model)
    assert any(".lora_adapters.b.lora_B" in k for k in state) and "lm_head.modules_to_save.weight" in state
    want = _logits(model, ids)
    fresh = _tiny.llama()
    apply_lora(fresh, r=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    add_adapter(fresh, "b", r=2)
    load_adapter_state_dict(fresh, state)
    set_adapter(fresh, "b")
    assert torch.equal(_logits(fresh, ids), want)


def test_only_active_adapters_train():
    model, ids = _model(), _ids()
    set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_adapters.b." in n for n in trainable)
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS)  # re-freezing keeps inactive adapters frozen
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    model.train()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    set_adapter(model, ["default", "c"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".lora_A") and "lora_adapters" not in n for n in trainable)
    assert any(".lora_adapters.c." in n for n in trainable)
    assert not any(".lora_adapters.b." in n for n in trainable)


def test_mixed_batch_rows_equal_per_adapter_runs():
    model, ids = _model(), _ids(6)
    names = ["b", "__base__", "default", "c", "b", "default"]
    runs = {}
    for name in ("default", "b", "c"):
        set_adapter(model, name)
        runs[name] = _logits(model, ids)
    with disable_adapters(model):
        runs["__base__"] = _logits(model, ids)
    want = torch.stack([runs[n][i] for i, n in enumerate(names)])
    set_adapter(model, "default")
    with adapter_names_for_rows(model, names):
        torch.testing.assert_close(_logits(model, ids), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(model, ids, adapter_names=names), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(model, ids), runs["default"], atol=0, rtol=0)  # cleared after
    with adapter_names_for_rows(model, ["c", "__base__"]):  # generation, the KV cache included
        out = model.generate(ids[:2, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row, name in enumerate(["c", "__base__"]):
        prompt = ids[row:row + 1, :3]
        if name == "__base__":
            with disable_adapters(model):
                alone = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        else:
            set_adapter(model, name)
            alone = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row], alone[0])
    with pytest.raises(ValueError, match="rows"), adapter_names_for_rows(model, ["b", "c"]):
        model(ids)
    with pytest.raises(ValueError, match="unknown adapter"):
        model(ids, adapter_names=["b", "nope", "c", "b", "b", "b"])
    torch.testing.assert_close(_logits(model, ids), runs["c"], atol=0, rtol=0)


def test_mixed_batch_on_a_4bit_base():
    model = _tiny.llama()
    apply_qlora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], compute_dtype=torch.float32)
    add_adapter(model, "b", r=2, alpha=4)
    _tiny.randomize_lora(model, 3)
    ids = _ids(3)
    runs = {}
    for name in ("default", "b"):
        set_adapter(model, name)
        runs[name] = _logits(model, ids)
    with disable_adapters(model):
        runs["__base__"] = _logits(model, ids)
    names = ["b", "__base__", "default"]
    want = torch.stack([runs[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(_logits(model, ids, adapter_names=names), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ combining


def _delta64(slot):
    return (slot.lora_B.detach().double() @ slot.lora_A.detach().double()) * slot.scaling


def _svd64(m, k):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _ties64(deltas, weights, density):
    trimmed = []
    for d, w in zip(deltas, weights):
        flat = d.reshape(-1)
        k = int(density * flat.numel())
        keep = torch.zeros_like(flat)
        order = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))[:k]
        keep[order] = 1.0
        trimmed.append(w * (flat * keep).reshape(d.shape))
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(stacked) == elected).double()
    return (stacked * agree).sum(0) / agree.sum(0).clamp_min(1.0)


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "ties", "dare"])
def test_combinations_against_float64_references(method):
    model = _model()
    names, weights = ["default", "b", "c"], [0.5, -1.5, 2.0]
    kwargs = {"density": 0.4} if method in ("ties", "dare") else {}
    if method == "dare":
        kwargs["seed"] = 7
    before = {n: p.clone() for n, p in model.state_dict().items()}
    combine_adapters(model, names, weights, method=method, name="mix", **kwargs)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items() if n in before)
    generator = torch.Generator().manual_seed(7)
    for lname, layer in lora_layers(model):
        held = [(layer.slot(n), w) for n, w in zip(names, weights) if layer.holds(n)]
        deltas = [_delta64(s) for s, _ in held]
        ws = [w for _, w in held]
        ranks = [s.r for s, _ in held]
        total = sum(w * d for d, w in zip(deltas, ws))
        if method in ("linear", "cat"):
            want = total
        elif method == "svd":
            want = _svd64(total, max(ranks))
        elif method == "ties":
            want = _svd64(_ties64(deltas, ws, 0.4), min(sum(ranks), *total.shape))
        else:
            dropped = sum(w * d * (torch.rand(d.shape, generator=generator, dtype=torch.float64) < 0.4) / 0.4
                          for d, w in zip(deltas, ws))
            want = _svd64(dropped, min(sum(ranks), *total.shape))
        got = _delta64(layer.slot("mix")).detach()
        assert layer.slot("mix").scaling == 1.0
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0, msg=lname)
    # the new adapter is an ordinary named adapter: it runs, saves and loads
    set_adapter(model, "mix")
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(_alone(model, "mix"), ids), atol=1e-6, rtol=1e-6)


def test_combine_explicit_rank_and_seeded_dare_is_reproducible():
    a, b = _model(), _model()
    combine_adapters(a, ["default", "b"], [1.0, 1.0], method="dare", name="d", density=0.5, seed=3, rank=5)
    combine_adapters(b, ["default", "b"], [1.0, 1.0], method="dare", name="d", density=0.5, seed=3, rank=5)
    for (_, la), (_, lb) in zip(lora_layers(a), lora_layers(b)):
        assert la.slot("d").r == 5 and torch.equal(la.slot("d").lora_B, lb.slot("d").lora_B)


def test_combine_refusals_leave_the_model_unchanged():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"\['default', 'b', 'c'\]"):
        combine_adapters(model, ["b", "zzz"], [1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be a list of 2"):
        combine_adapters(model, ["b", "c"], [1.0])
    with pytest.raises(ValueError, match="density"):
        combine_adapters(model, ["b", "c"], [1.0, 1.0], method="ties")
    with pytest.raises(ValueError, match="method must be one of"):
        combine_adapters(model, ["b", "c"], [1.0, 1.0], method="magic")
    with pytest.raises(ValueError, match="exists already"):
        combine_adapters(model, ["b", "c"], [1.0, 1.0], name="b")
    assert list_adapters(model) == ["default", "b", "c"]
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


# ------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_switching_restores_w0_bit_for_bit(dtype):
    model, ids = _model(dtype=dtype), _ids()
    w0 = {n: m.base_layer.weight.clone() for n, m in lora_layers(model)}
    for name in ("b", "default", "c", ["b", "c"]):
        set_adapter(model, name)
        want = _logits(model, ids)
        merge_adapters(model, name)
        tol = 1e-5 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(_logits(model, ids), want, atol=tol, rtol=tol)
        unmerge_adapters(model)
        for n, m in lora_layers(model):
            assert torch.equal(m.base_layer.weight, w0[n]), (name, n)


def test_merge_a_dora_named_adapter_and_back():
    model, ids = _model(dora=True), _ids()
    w0 = {n: m.base_layer.weight.clone() for n, m in lora_layers(model)}
    set_adapter(model, "b")
    want = _logits(model, ids)
    merge_adapters(model, "b")
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    unmerge_adapters(model)
    assert all(torch.equal(m.base_layer.weight, w0[n]) for n, m in lora_layers(model))
    with pytest.raises(ValueError, match="DoRA"):
        merge_adapters(model, ["b", "c"])
    assert all(torch.equal(m.base_layer.weight, w0[n]) and not m.merged for n, m in lora_layers(model))


def test_delete_adapter():
    model, ids = _model(), _ids()
    set_adapter(model, ["default", "b"])
    delete_adapter(model, "b")
    assert list_adapters(model) == ["default", "c"] and active_adapters(model) == ["default"]
    assert not any("lora_adapters.b" in n for n in model.state_dict())
    want = _logits(_alone(model, "default"), ids)
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot be deleted"):
        delete_adapter(model, "default")
    with pytest.raises(ValueError, match=r"\['default', 'c'\]"):
        delete_adapter(model, "b")


# ------------------------------------------------------------------------------ files


def test_save_and_load_named_adapters(tmp_path):
    model, ids = _model(dora=True), _ids()
    save_adapter(model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files >= {"adapter_config.json", "adapter_model.safetensors", "b", "c"}
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["use_rslora"] and cfg["target_modules"] == ["q_proj"]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    top = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any("lora_adapters" in k or ".b." in k for k in top)
    fresh = _tiny.llama()
    load_adapter(fresh, tmp_path)
    load_adapter(fresh, tmp_path, adapter_name="b")
    load_adapter(fresh, tmp_path / "c", adapter_name="c")
    assert list_adapters(fresh) == ["default", "b", "c"] and active_adapters(fresh) == ["default"]
    for name in ("default", "b", "c"):
        set_adapter(model, name)
        set_adapter(fresh, name)
        torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), atol=0, rtol=0)
    only = tmp_path / "only"
    assert save_adapter(model, only, adapter_name="c") == only / "c"
    assert not (only / "adapter_config.json").exists()
    load_adapter(fresh, only, adapter_name="c")  # into the existing adapter


def _peft_pair(tmp_path):
    base = _tiny.llama()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, use_rslora=True,
                                            target_modules=["q_proj"], lora_dropout=0.1))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path)
    return pm.eval()


def test_peft_multi_adapter_directory_loads_per_adapter(tmp_path):
    pm, ids = _peft_pair(tmp_path), _ids()
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    ours = _tiny.llama()
    load_adapter(ours, tmp_path)
    load_adapter(ours, tmp_path, adapter_name="other")
    ours.eval()  # "other" has dropout
    for name in ("default", "other"):
        pm.set_adapter(name)
        set_adapter(ours, name)
        torch.testing.assert_close(_logits(ours, ids), _logits(pm, ids), atol=1e-5, rtol=1e-5)


def test_ours_saved_per_name_loads_in_peft(tmp_path):
    _peft_pair(tmp_path / "peft")
    ids = _ids()
    ours = _tiny.llama()
    load_adapter(ours, tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft", adapter_name="other")
    ours.eval()
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_tiny.llama(), tmp_path / "ours")
    back.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    back.eval()
    for name in ("default", "other"):
        back.set_adapter(name)
        set_adapter(ours, name)
        torch.testing.assert_close(_logits(back, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_and_the_model_unchanged(tmp_path):
    model, ids = _model(), _ids()
    before = copy.deepcopy(model.state_dict())
    want = _logits(model, ids)
    with pytest.raises(ValueError, match=r"unknown adapter.*\['default', 'b', 'c'\]"):
        set_adapter(model, "nope")
    with pytest.raises(ValueError, match=r"\['default', 'b', 'c'\]"):
        merge_adapters(model, "nope")
    with pytest.raises(ValueError, match=r"\['default', 'b', 'c'\]"):
        save_adapter(model, tmp_path / "x", adapter_name="nope")
    with pytest.raises(ValueError, match="exists already"):
        add_adapter(model, "b", r=2)
    with pytest.raises(ValueError, match="adapter_name must be"):
        add_adapter(model, "a.b", r=2)
    with pytest.raises(ValueError, match="carry no LoRA"):
        add_adapter(model, "d", r=2, target_modules=["k_proj"])
    # an adapter of another base (hidden size 48): shapes differ
    other = _tiny.llama(hidden=48)
    apply_lora(other, r=4, target_modules=TARGETS)
    add_adapter(other, "e", r=2)
    save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match="mis-shaped"):
        load_adapter(model, tmp_path / "other", adapter_name="e")
    with pytest.raises(ValueError, match="mis-shaped"):
        load_adapter(model, tmp_path / "other", adapter_name="b")  # into an existing one
    assert list_adapters(model) == ["default", "b", "c"]
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert set(before) == set(model.state_dict())
    torch.testing.assert_close(_logits(model, ids), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="load the default adapter first"):
        load_adapter(_tiny.llama(), tmp_path / "other", adapter_name="e")


def test_single_adapter_files_unchanged(tmp_path):
    """A model without named adapters saves exactly as before: no subdirectories, PEFT's keys."""
    model = _tiny.llama()
    apply_lora(model, r=4, target_modules=TARGETS)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_gpt2_conv1d_and_dora_rows_merge_and_mix():
    """GPT-2's Conv1D (weights stored transposed) with a DoRA named adapter: mixed rows equal the
    per-adapter runs, and merge-switching restores W0 bit for bit."""
    model = _tiny.gpt2()
    apply_lora(model, r=4, alpha=8, target_modules=["c_attn", "c_fc"])
    add_adapter(model, "d", r=2, alpha=4, use_dora=True)
    _tiny.randomize_lora(model, 4)
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    w0 = {n: m.base_layer.weight.clone() for n, m in lora_layers(model)}
    runs = {}
    for name in ("default", "d"):
        set_adapter(model, name)
        runs[name] = _logits(model, ids)
        merge_adapters(model, name)
        torch.testing.assert_close(_logits(model, ids), runs[name], atol=1e-5, rtol=1e-5)
        unmerge_adapters(model)
        assert all(torch.equal(m.base_layer.weight, w0[n]) for n, m in lora_layers(model))
    with disable_adapters(model):
        runs["__base__"] = _logits(model, ids)
    names = ["d", "__base__", "default"]
    want = torch.stack([runs[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(_logits(model, ids, adapter_names=names), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("first, kwargs", [
    ("apply_adapters", {"bottleneck": 4}),
    ("apply_prefix_tuning", {"num_virtual_tokens": 3}),
    ("apply_prompt_tuning", {"num_virtual_tokens": 3}),
    ("apply_llama_adapter", {"adapter_len": 3}),
    ("apply_ia3", {}),
    ("apply_trainable_tokens", {"token_indices": [1, 5]}),
])
def test_disable_adapters_runs_the_base_model_beside_other_methods(first, kwargs):
    """LoRA beside another method's layers: inside ``disable_adapters`` the model is the base model
    bit for bit (those layers used to keep running: a bottleneck adapter moved the logits by 0.5,
    a prompt still lengthened them), and after the block it is the adapted model again."""
    import lightning_peft
    from lightning_peft import disable_adapters

    ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = _tiny.llama()(ids).logits
        model = getattr(lightning_peft, first)(_tiny.llama(), **kwargs)
        apply_lora(model, r=2, target_modules=["q_proj"], exclude_modules=None)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        adapted = model(ids).logits
        structure = [(n, type(m)) for n, m in model.named_modules()]
        with disable_adapters(model):
            off = model(ids).logits
        assert off.shape == base.shape and torch.equal(off, base)
        assert [(n, type(m)) for n, m in model.named_modules()] == structure
        assert torch.equal(model(ids).logits, adapted) and not torch.equal(adapted[:, -7:], base)


def _structure(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return [(n, type(m)) for n, m in model.named_modules()], state


def _same(model, before):
    modules, state = before
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["/tmp/outside", "a\\\\b", "x\\0"])
def test_adapter_names_are_not_paths(name, tmp_path):
    """A named adapter's name is a subdirectory of the saved directory: a path in it would have
    written the adapter elsewhere (``/tmp/outside``)."""
    model = _model()
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string without dots or path"):
        add_adapter(model, name, r=2)
    assert list_adapters(model) == ["default", "b", "c"]


def test_combine_adapters_that_fails_leaves_the_model_as_it_was(monkeypatch):
    """Weights that overflow the combined update are refused by name; a failure while the combined
    adapter is written (here the third layer) leaves no half-built adapter in the others."""
    from lightning_peft.methods.lora import LoRALinear

    model = _model()
    before = _structure(model)
    for method in ("linear", "svd"):
        with pytest.raises(ValueError, match=r"weights=\[1e\+308, 1e\+308\] make the combined update"):
            combine_adapters(model, ["default", "b"], [1e308, 1e308], method=method, name="k")
        _same(model, before)
    calls = []
    original = LoRALinear.add_named

    def third_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "add_named", third_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        combine_adapters(model, ["default", "b"], [1.0, 0.5], name="k")
    _same(model, before)
    assert list_adapters(model) == ["default", "b", "c"]


def test_a_sharded_model_is_refused_by_load_and_combine(monkeypatch, tmp_path):
    """Load, combine, merge and unmerge write whole tensors, which a sharded (FSDP2 DTensor)
    parameter refuses in the middle of the copy; they refuse up front, the model unchanged, and
    a callback with ``merge_on_fit_end`` refuses a sharded module when fit starts, not after."""
    model = _model()
    save_adapter(model, tmp_path)
    before = _structure(model)
    monkeypatch.setattr("lightning_peft.fsdp.is_sharded", lambda m: True)
    calls = (lambda: load_adapter(model, tmp_path), lambda: load_adapter(model, tmp_path, adapter_name="b"),
             lambda: combine_adapters(model, ["default", "b"], [1.0, 1.0], name="k"),
             lambda: merge_adapters(model), lambda: unmerge_adapters(model))  # (merge: a DTensor error)
    for call in calls:
        with pytest.raises(ValueError, match=r"works on an unsharded model.*fully_shard_peft"):
            call()
        _same(model, before)
    from lightning_peft import LoRACallback

    with pytest.raises(ValueError, match=r"LoRACallback\(merge_on_fit_end=True\) works on an unsharded"):
        LoRACallback(r=2, merge_on_fit_end=True).on_fit_start(None, model)


@pytest.mark.parametrize("bad", [None, 1, 2.5])
def test_a_non_name_is_an_unknown_adapter_naming_the_argument(bad):
    """``set_adapter``/``merge_adapters`` with something that is neither a name nor a list of
    names: the ValueError their siblings give, naming the argument and the adapters (a bare
    TypeError from ``list()`` before); the model is unchanged."""
    model = apply_lora(_tiny.llama(), r=2)
    add_adapter(model, "math", r=2)
    with pytest.raises(ValueError, match=r"adapter_name: unknown adapter.*\['default', 'math'\]"):
        set_adapter(model, bad)
    if bad is not None:  # (merge_adapters(model, None) merges every layer)
        with pytest.raises(ValueError, match=r"adapter_names=.*unknown adapters.*\['default', 'math'\]"):
            merge_adapters(model, bad)
    assert active_adapters(model) == ["default"]
    assert not any(getattr(m, "merged", False) for m in model.modules())
