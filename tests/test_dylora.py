"""DyLoRA (arXiv 2210.07558): per-step rank sampling, exact truncation against a float64
reference, truncation quality against plain LoRA, merging, files, the callback, bad arguments."""

import copy
import json

import pytest
import torch
from torch import nn

from lightning_peft._base import adapter_named_parameters, merge_adapters, unmerge_adapters
from lightning_peft.callbacks import DyLoRACallback
from lightning_peft.io import load_adapter, save_adapter
from lightning_peft.methods import get_method, method_for_config
from lightning_peft.methods.dylora import (
    DyLoRAConfig,
    DyLoRALinear,
    apply_dylora,
    draw_rank,
    dylora_layers,
    dylora_sample_rank,
    dylora_set_rank,
    truncate_rank,
)
from lightning_peft.methods.lora import apply_lora
from tests import _lit, _tiny

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomize(model, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dylora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r must"), (dict(r=True), "r must"), (dict(r=2.0), "r must"),
    (dict(r_min=0), "r_min must be an integer >= 1"), (dict(r_min=1.5), "r_min must"),
    (dict(r=4, r_min=5), r"r_min must be at most r=4"),
    (dict(alpha=0), "alpha must"), (dict(alpha=float("nan")), "alpha must"),
    (dict(distribution="normal"), "distribution must be one of"),
    (dict(seed=-1), "seed must"), (dict(seed=1.0), "seed must"),
    (dict(dropout=1.0), "dropout must"), (dict(use_rslora="yes"), "use_rslora must"),
    (dict(init="xavier"), "init must"), (dict(bias="some"), "bias must"),
    (dict(target_modules=""), "target_modules must"), (dict(modules_to_save=[""]), "modules_to_save must"),
])
def test_every_bad_config_argument_is_a_value_error_naming_it(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DyLoRAConfig(**kwargs)
    model = _tiny.llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=field):
        apply_dylora(model, **kwargs)
    assert not dylora_layers(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("b", [0, 5, -1, 2.0, True, None])
def test_truncate_rank_refuses_b_outside_1_r_and_changes_nothing(b):
    model = apply_dylora(_tiny.llama(), r=4)
    before = {n: p for n, p in adapter_named_parameters(model)}
    with pytest.raises(ValueError, match=r"b must be an integer in \[1, r=4\]"):
        truncate_rank(model, b)
    assert {n: p for n, p in adapter_named_parameters(model)} == before  # the same Parameter objects
    assert all(m.r == 4 for _, m in dylora_layers(model))
    if b is not None:
        with pytest.raises(ValueError, match=r"b must be an integer in \[1, r=4\]"):
            dylora_set_rank(model, b)
        assert all(m.rank_in_use is None for _, m in dylora_layers(model))


def test_functions_refuse_a_model_without_dylora_and_apply_refuses_conflicts():
    model = _tiny.llama()
    for call in (lambda: truncate_rank(model, 1), lambda: dylora_sample_rank(model),
                 lambda: dylora_set_rank(model, 1)):
        with pytest.raises(ValueError, match="carries no DyLoRA layers"):
            call()
    with pytest.raises(ValueError, match=r"not both: \['r'\]"):
        apply_dylora(model, r=4, config=DyLoRAConfig())
    with pytest.raises(TypeError, match="config must be a DyLoRAConfig"):
        apply_dylora(model, config={"r": 4})
    apply_lora(model, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already carries a LoRALinear"):
        apply_dylora(model, target_modules=["q_proj", "v_proj"])
    assert not dylora_layers(model)

    model = apply_dylora(_tiny.llama(), r=4, target_modules=["q_proj"])
    params = dict(adapter_named_parameters(model))
    apply_dylora(model, r=4, target_modules=["q_proj"])  # idempotent
    assert dict(adapter_named_parameters(model)) == params
    with pytest.raises(ValueError, match=r"r=8, but the model's DyLoRA layers have r=\[4\]"):
        apply_dylora(model, r=8, target_modules=["v_proj"])
    with pytest.raises(ValueError, match=r"r_min=2, but the model's DyLoRA layers have r_min=\[1\]"):
        apply_dylora(model, r=4, r_min=2, target_modules=["v_proj"])
    assert len(dylora_layers(model)) == 2  # the two q_proj layers only


# ------------------------------------------------------------------------------ the layer


def test_fresh_adapter_gives_the_base_outputs_and_only_adapters_train():
    model = _tiny.llama(seed=2)
    base = _logits(model)
    apply_dylora(model, r=4, target_modules="all-linear")
    assert torch.equal(_logits(model), base)
    model.train()
    dylora_set_rank(model, 2)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)  # B = 0 at every rank
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in adapter_named_parameters(model)}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert method_for_config(DyLoRAConfig()) is get_method("dylora")


@pytest.mark.parametrize("arch, use_rslora", [("llama", False), ("llama", True), ("gpt2", False)])
def test_truncate_rank_is_exactly_the_rank_b_layer_against_float64(arch, use_rslora):
    model = _tiny.llama() if arch == "llama" else _tiny.gpt2()
    r, b, alpha = 8, 3, 12.0
    apply_dylora(model, r=r, alpha=alpha, use_rslora=use_rslora, target_modules="all-linear")
    _randomize(model)
    layers = dylora_layers(model)
    full = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in layers}
    x = torch.randn(5, layers[0][1].in_features, generator=torch.Generator().manual_seed(4))

    model.train()
    dylora_set_rank(model, b)  # training at rank b runs the rank-b layer
    name, layer = layers[0]
    trained_at_b = layer(x).detach()
    model.eval()
    truncate_rank(model, b)
    scale = alpha / b ** 0.5 if use_rslora else alpha / b
    for name, layer in dylora_layers(model):
        a, bb = full[name]
        assert layer.r == b and layer.lora_A.shape == (b, layer.in_features)
        assert layer.lora_B.shape == (layer.out_features, b)
        assert torch.equal(layer.lora_A, a[:b]) and torch.equal(layer.lora_B, bb[:, :b])
        assert layer.scaling == pytest.approx(scale) and layer.lora_A.requires_grad
        w0 = layer.weight.double()  # (out, in), Conv1D read transposed
        w = w0 + scale * bb[:, :b].double() @ a[:b].double()
        xi = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(5))
        bias = 0 if layer.bias is None else layer.bias.double()
        ref = xi.double() @ w.t() + bias
        torch.testing.assert_close(layer(xi).double(), ref, rtol=1e-5, atol=1e-5)
        # and not the rank-r layer: the truncation changed the function
        assert not torch.allclose(ref, xi.double() @ (w0 + scale * bb.double() @ a.double()).t() + bias,
                                  atol=1e-3)
    torch.testing.assert_close(layers[0][1](x), trained_at_b, rtol=1e-6, atol=1e-6)


def test_merge_and_unmerge_are_exact_at_the_active_rank():
    model = apply_dylora(_tiny.llama(), r=6, target_modules="all-linear")
    _randomize(model)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in dylora_layers(model)}
    unmerged = _logits(model)
    merge_adapters(model)
    assert all(m.merged for _, m in dylora_layers(model))
    torch.testing.assert_close(_logits(model), unmerged, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="unmerge"):
        dylora_set_rank(model, 2)
    model.double()  # a cast of a merged layer is done unmerged and merged again at the same rank
    model.float()
    unmerge_adapters(model)
    assert all(torch.equal(m.base_layer.weight, weights[n]) for n, m in dylora_layers(model))

    model.train()
    dylora_set_rank(model, 2)
    with torch.no_grad():
        at_two = model(IDS).logits
    merge_adapters(model)  # in training: merged at the rank in use
    assert {m._merged_rank for _, m in dylora_layers(model)} == {2}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, at_two, rtol=1e-4, atol=1e-4)
    model.eval()  # a merged layer keeps the rank it was merged at
    torch.testing.assert_close(_logits(model), at_two, rtol=1e-4, atol=1e-4)
    truncate_rank(model, 1)  # merged: unmerged, cut, merged again at rank <= 1
    assert all(m.merged and m._merged_rank == 1 and m.r == 1 for _, m in dylora_layers(model))
    unmerge_adapters(model)
    assert all(torch.equal(m.base_layer.weight, weights[n]) for n, m in dylora_layers(model))


# ------------------------------------------------------------------------------ sampling


def test_one_rank_per_step_for_the_whole_model_seeded_and_eval_at_full_rank():
    model = apply_dylora(_tiny.llama(), r=6, r_min=2, target_modules="all-linear")
    _randomize(model)
    eval_logits = _logits(model)
    model.train()
    draws = []
    for gen in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)):
        drawn = []
        for _ in range(300):
            b = dylora_sample_rank(model, gen)
            assert {m.rank_in_use for _, m in dylora_layers(model)} == {b}
            drawn.append(b)
        draws.append(drawn)
    assert draws[0] == draws[1]  # the generator decides
    counts = torch.bincount(torch.tensor(draws[0]), minlength=7)
    assert counts[:2].sum() == 0 and (counts[2:] > 40).all()  # uniform on [2, 6]
    model.eval()  # eval ignores the drawn rank
    assert torch.equal(_logits(model), eval_logits)

    log = [draw_rank(1, 8, "log-uniform", torch.Generator().manual_seed(s)) for s in range(400)]
    freq = torch.bincount(torch.tensor(log), minlength=9)
    assert freq[0] == 0 and freq[1] > 2 * freq[8] and freq[1:].sum() == 400

    dylora_layers(model)[0][1].truncate(3)  # layers that disagree cannot share one draw
    with pytest.raises(ValueError, match=r"disagree on \(r_min, r, distribution\)"):
        dylora_sample_rank(model, torch.Generator())


# ------------------------------------------------------------------------------ training


def _regression_task(d: int = 16):
    """A frozen Linear whose target adds a rank-8 update with decaying singular values."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    singular = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.12, 0.06, 0.03] + [0.0] * (d - 8))
    x = torch.randn(512, d, generator=g)
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(d, d))
    with torch.no_grad():
        y = base(x) + x @ (u @ torch.diag(singular) @ v.t()).t()
    return base, x, y


def _fit(model, x, y, dylora: bool, steps: int = 300) -> None:
    """Adam with the learning rate decayed linearly to 0 (a hand-written loop: one draw per step)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        if dylora:
            dylora_sample_rank(model, gen)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()


def test_truncated_dylora_keeps_much_more_quality_than_truncated_lora():
    base, x, y = _regression_task()

    def mse(model) -> float:
        with torch.no_grad():
            return float((model(x) - y).pow(2).mean())

    r, b, alpha = 8, 2, 8.0  # truncated to r/4
    start = mse(base)
    dy = apply_dylora(_regression_task()[0], r=r, alpha=alpha, target_modules=["0"])
    lo = apply_lora(_regression_task()[0], r=r, alpha=alpha, target_modules=["0"])
    _fit(dy, x, y, dylora=True)
    _fit(lo, x, y, dylora=False)
    dy_full, lo_full = mse(dy), mse(lo)
    assert dy_full < 0.05 * start and lo_full < 0.05 * start  # both learned the task at rank r
    truncate_rank(dy, b)
    layer = lo[0]
    with torch.no_grad():  # plain LoRA cut the same way (A[:b], B[:, :b], alpha/b), and with alpha/r kept
        same_way, scale_kept = (float((layer.base_layer(x) + s * x @ layer.lora_A[:b].t()
                                       @ layer.lora_B[:, :b].t() - y).pow(2).mean())
                                for s in (alpha / b, alpha / r))
    dy_loss = (mse(dy) - dy_full, mse(dy))
    assert dy_loss[0] < 0.3 * (same_way - lo_full), (dy_loss, same_way, lo_full)
    assert dy_loss[1] < 0.6 * scale_kept, (dy_loss, scale_kept)
    assert dy_loss[1] < 0.3 * start and same_way > 0.9 * start  # cut LoRA is no better than no adapter


def test_hand_written_loop_lowers_the_loss_at_every_rank():
    base, x, y = _regression_task()
    model = apply_dylora(base, r=8, alpha=8.0, target_modules=["0"])
    with torch.no_grad():
        before = float((model(x) - y).pow(2).mean())
    _fit(model, x, y, dylora=True, steps=150)
    for b in (8, 4, 2, 1):
        cut = truncate_rank(copy.deepcopy(model), b)
        with torch.no_grad():
            after = float((cut(x) - y).pow(2).mean())
        assert after < 0.6 * before, (b, before, after)
    with torch.no_grad():
        assert float((model(x) - y).pow(2).mean()) < 0.05 * before


def test_callback_draws_one_seeded_rank_per_batch_and_training_lowers_the_loss(tmp_path):
    module = _lit.TinyLM(lr=2e-2)
    data = _lit.loader(n=8, batch_size=4)
    ids = torch.cat([batch[0] for batch in data])
    with torch.no_grad():  # a fresh DyLoRA adapter gives the base outputs
        before = float(module.model(ids, labels=ids).loss)
    seen: list[set] = []

    def record(model, args) -> None:
        if model.training:
            seen.append({m.active_rank for _, m in dylora_layers(model)})

    module.model.register_forward_pre_hook(record)
    callback = DyLoRACallback(r=4, r_min=1, seed=3, target_modules=["q_proj", "v_proj", "o_proj"])
    trainer = _lit.trainer(tmp_path, max_steps=40, callbacks=[callback])
    trainer.fit(module, data)
    module.eval()
    with torch.no_grad():
        after = float(module.model(ids, labels=ids).loss)
    assert after < before - 0.03, (before, after)
    assert len(seen) == 40 and all(len(s) == 1 for s in seen)  # one rank for the whole model per batch
    ranks = [s.pop() for s in seen]
    expected = torch.Generator().manual_seed(3)
    assert ranks == [draw_rank(1, 4, "uniform", expected) for _ in range(40)]  # the seeded generator
    assert set(ranks) == {1, 2, 3, 4}
    assert all(m.rank_in_use is None for _, m in dylora_layers(module.model))  # full rank after fit

    state = callback.state_dict()
    assert state["config"]["r"] == 4 and state["config"]["seed"] == 3
    other = DyLoRACallback(r=4, r_min=1, seed=3, target_modules=["q_proj", "v_proj", "o_proj"])
    other.load_state_dict(state)  # a resumed run continues the sequence
    assert [draw_rank(1, 4, "uniform", other.generator) for _ in range(8)] == \
        [draw_rank(1, 4, "uniform", expected) for _ in range(8)]


def test_callback_merges_on_fit_end_at_the_full_rank_and_fits_again(tmp_path):
    """``merge_on_fit_end=True`` merges at the full rank when fit ends and the callback tears down
    cleanly (teardown used to set the rank on the merged layers, so every such fit raised at its
    end and left its hooks on the module); a second fit unmerges, trains and merges again."""
    module = _lit.TinyLM(lr=2e-2)
    ids = torch.randint(0, _lit.VOCAB, (2, 6))
    for _ in range(2):
        trainer = _lit.trainer(tmp_path, max_steps=3,
                               callbacks=[DyLoRACallback(r=4, seed=1, merge_on_fit_end=True)])
        trainer.fit(module, _lit.loader(n=8))
        assert trainer.state.status == "finished"
        layers = dylora_layers(module.model)
        assert layers and all(m.merged for _, m in layers)
        assert "on_save_checkpoint" not in module.__dict__  # the callback's hooks are gone
        module.eval()
        with torch.no_grad():
            merged = module.model(ids).logits
            unmerge_adapters(module.model)
            assert all(m.rank_in_use is None for _, m in layers)
            torch.testing.assert_close(module.model(ids).logits, merged, rtol=1e-5, atol=1e-5)
            merge_adapters(module.model)
        module.train()


# ------------------------------------------------------------------------------ files


def test_save_load_round_trip_and_truncated_adapters_save_at_their_rank(tmp_path):
    model = apply_dylora(_tiny.llama(seed=2), r=8, r_min=2, alpha=10.0, distribution="log-uniform",
                         target_modules=["q_proj", "v_proj"])
    _randomize(model)
    save_adapter(model, tmp_path / "full")
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert config["peft_type"] == "DYLORA" and config["r"] == 8 and config["r_min"] == 2
    assert config["distribution"] == "log-uniform" and config["lora_alpha"] == 10
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    fresh = load_adapter(_tiny.llama(seed=2), tmp_path / "full")
    assert torch.equal(_logits(fresh), _logits(model))
    assert {(m.r, m.r_min, m.distribution) for _, m in dylora_layers(fresh)} == {(8, 2, "log-uniform")}

    truncate_rank(model, 1)
    save_adapter(model, tmp_path / "cut")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (1, 32) and len(tensors) == 8
    assert all(t.shape[0] == 1 for k, t in tensors.items() if "lora_A" in k)
    assert all(t.shape[1] == 1 for k, t in tensors.items() if "lora_B" in k)
    cut = json.loads((tmp_path / "cut" / "adapter_config.json").read_text())
    assert cut["r"] == 1 and cut["r_min"] == 1
    loaded = load_adapter(_tiny.llama(seed=2), tmp_path / "cut")
    assert torch.equal(_logits(loaded), _logits(model))

    # into a model that already carries DyLoRA: the same rank loads, another is refused
    load_adapter(fresh, tmp_path / "full")
    with pytest.raises(ValueError, match=r"r is 1, but the model's DyLoRA layers have r=\[8\]"):
        load_adapter(fresh, tmp_path / "cut")


@pytest.mark.parametrize("field, value, message", [
    ("r_min", 9, r"r_min must be at most r=8"), ("r_min", 0, "r_min must be an integer >= 1"),
    ("distribution", "normal", "distribution must be one of"),
    ("lora_dropout", 2, "lora_dropout must be a number in"), ("init", 1, "init must be one of"),
    ("fan_in_fan_out", "no", "fan_in_fan_out must be true or false"),
])
def test_a_bad_config_file_is_refused_naming_the_field_and_the_model_is_unchanged(tmp_path, field, value,
                                                                                    message):
    model = apply_dylora(_tiny.llama(seed=2), r=8, target_modules=["q_proj"])
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = value  # not a field the weights' metadata binds
    path.write_text(json.dumps(config))
    victim = _tiny.llama(seed=2)
    state = {k: v.clone() for k, v in victim.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_adapter(victim, tmp_path)
    assert not dylora_layers(victim) and victim.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in victim.state_dict().items())


def test_dylora_layer_wraps_only_dense_linear_layers_and_checks_its_arguments():
    with pytest.raises(ValueError, match="wraps a dense nn.Linear"):
        DyLoRALinear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="r_min must be at most r=2"):
        DyLoRALinear(nn.Linear(4, 3), r=2, r_min=3)
    with pytest.raises(ValueError, match="1 <= r_min <= r"):
        draw_rank(3, 2, "uniform")
    with pytest.raises(ValueError, match="distribution must be one of"):
        draw_rank(1, 2, "normal")
    layer = DyLoRALinear(nn.Linear(4, 3).to(torch.bfloat16), r=2)
    assert layer.lora_A.dtype == torch.float32 and layer.adapter_dtype == torch.float32
    assert layer(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_biases_and_modules_trained_in_full_round_trip(tmp_path, bias):
    ids = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    model = apply_dylora(_tiny.bert(), r=4, bias=bias, modules_to_save=["classifier"])
    _randomize(model)
    with torch.no_grad():
        for name, param in adapter_named_parameters(model):
            if not name.endswith(("lora_A", "lora_B")):
                param.add_(0.5)
        out = model(ids).logits
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["bias"] == bias and config["modules_to_save"] == ["classifier"]
    assert sorted(config["target_modules"]) == ["query", "value"]  # BERT's default targets
    loaded = load_adapter(_tiny.bert(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    assert {n for n, _ in adapter_named_parameters(loaded)} == {n for n, _ in adapter_named_parameters(model)}


def test_an_exception_during_fit_leaves_the_layers_at_full_rank(tmp_path):
    """The rank drawn for a step is undone when ``fit`` fails in that step (it used to stay: a
    merge afterwards merged the drawn rank, not the adapter)."""
    from tests import _lit

    class Boom(_lit.TinyLM):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        trainer = _lit.trainer(tmp_path, max_steps=3, callbacks=[DyLoRACallback(r=8, seed=1)])
        trainer.fit(module, _lit.loader())
    layers = dylora_layers(module)
    assert layers and all(layer.rank_in_use is None and layer.active_rank == 8 for _, layer in layers)
    ids = _lit.loader().dataset.tensors[0][:2]
    module.eval()
    with torch.no_grad():
        before = module(ids)
        merge_adapters(module)
        torch.testing.assert_close(module(ids), before, rtol=1e-5, atol=1e-5)
