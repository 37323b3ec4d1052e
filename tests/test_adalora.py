"""AdaLoRA (arXiv 2303.10512): the layer, importance scores, budget schedule and penalty against
naive float64 references; step-for-step parity with HF PEFT 0.21.2's AdaLoRA; PEFT's files both
ways (with a rank_pattern); the Lightning callback; argument checks."""

import copy
import json
import math

import pytest
import torch

from lightning_peft import load_adapter, save_adapter
from lightning_peft.callbacks import AdaLoRACallback
from lightning_peft.methods.adalora import (
    AdaLoRAConfig,
    AdaLoRALinear,
    adalora_layers,
    adalora_orthogonal_penalty,
    adalora_prune,
    adalora_ranks,
    adalora_update_and_allocate,
    apply_adalora,
    budget_schedule,
    triplet_scores,
)
from tests import _lit, _tiny

TARGETS = ["q_proj", "v_proj"]


def _randomize(model, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adalora_layers(model):
            for p in layer.adapter_parameters().values():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# -------------------------------------------------------------------------------- the equations


@pytest.mark.parametrize("make", [_tiny.llama, _tiny.gpt2])
def test_layer_is_w0x_plus_scaled_p_lambda_q_x_in_float64(make):
    model = make()
    apply_adalora(model, init_r=5, target_r=2, alpha=6.0, target_modules="all-linear", total_step=10)
    _randomize(model)
    for _, layer in adalora_layers(model)[:3]:
        x = torch.randn(3, 4, layer.in_features)
        w0 = layer.weight.detach().double()                                  # (out, in)
        q, lam, p = (t.detach().double() for t in (layer.lora_A, layer.lora_E, layer.lora_B))
        ref = x.double() @ w0.T + (x.double() @ q.T @ torch.diag(lam[:, 0]) @ p.T) * 6.0 / (5 + 1e-5)
        if layer.bias is not None:
            ref = ref + layer.bias.double()
        torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_fresh_layer_starts_at_the_base_and_merge_unmerge_is_exact():
    model = _tiny.llama()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    apply_adalora(model, init_r=4, target_r=2, target_modules=TARGETS)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    _randomize(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        trained = model(ids).logits
        for _, layer in adalora_layers(model):
            layer.merge()
        torch.testing.assert_close(model(ids).logits, trained, atol=1e-4, rtol=1e-4)
        for _, layer in adalora_layers(model):
            layer.unmerge()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "base_layer" in n)


def test_importance_scores_follow_the_paper_in_float64():
    model = apply_adalora(_tiny.llama(), init_r=4, target_r=2, target_modules=TARGETS, beta1=0.7,
                          beta2=0.6, total_step=100, tinit=50)
    layers = [m for _, m in adalora_layers(model)]
    g = torch.Generator().manual_seed(0)
    ema_i: dict = {}
    ema_u: dict = {}
    for step in range(3):
        for layer in layers:
            for p in layer.adapter_parameters().values():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g))
                p.grad = torch.randn(p.shape, generator=g)
        adalora_update_and_allocate(model, step)  # step <= tinit: scores only
        for layer in layers:
            for name, p in layer.adapter_parameters().items():
                key = (id(layer), name)
                sens = (p.detach().double() * p.grad.double()).abs()          # I = |θ·∇θ|
                ema_i[key] = 0.7 * ema_i.get(key, 0) + 0.3 * sens             # Ī
                ema_u[key] = 0.6 * ema_u.get(key, 0) + 0.4 * (sens - ema_i[key]).abs()  # Ū
    for layer in layers:  # a step with a non-finite gradient (skipped by fp16's GradScaler) is ignored
        layer.lora_A.grad[0, 0] = float("inf")
    adalora_update_and_allocate(model, 3)
    for layer in layers:
        s = {name: ema_i[(id(layer), name)] * ema_u[(id(layer), name)]
             for name in ("lora_A", "lora_E", "lora_B")}
        ref = s["lora_E"][:, 0] + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)  # S_i
        torch.testing.assert_close(triplet_scores(layer).double(), ref, atol=1e-6, rtol=1e-5)


def test_budget_schedule_is_flat_then_cubic_then_final():
    init, target, tinit, tfinal, total, delta = 48, 16, 10, 20, 100, 3
    for step in range(total + 5):
        budget, mask = budget_schedule(step, init, target, tinit, tfinal, total, delta)
        if step <= tinit:
            assert (budget, mask) == (init, False)
        elif step > total - tfinal:
            assert (budget, mask) == (target, True)
        else:
            frac = (step - tinit) / (total - tfinal - tinit)
            assert budget == math.floor(target + (init - target) * (1 - frac) ** 3)
            assert mask == (step % delta == 0)
            assert target <= budget < init


def test_orthogonal_penalty_in_float64():
    model = apply_adalora(_tiny.llama(), init_r=3, target_r=2, target_modules=TARGETS, orth_reg_weight=0.3)
    _randomize(model)
    terms = []
    for _, layer in adalora_layers(model):
        q, p = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        terms.append(torch.linalg.matrix_norm(q @ q.T - torch.eye(3, dtype=torch.float64)))
        terms.append(torch.linalg.matrix_norm(p.T @ p - torch.eye(3, dtype=torch.float64)))
    ref = 0.3 * torch.stack(terms).mean()
    penalty = adalora_orthogonal_penalty(model)
    torch.testing.assert_close(penalty.double(), ref, atol=1e-6, rtol=1e-6)
    penalty.backward()
    assert all(layer.lora_A.grad.abs().sum() > 0 for _, layer in adalora_layers(model))


# -------------------------------------------------------------------------------- HF PEFT parity


def _peft_and_ours(**kwargs):
    from peft import AdaLoraConfig, get_peft_model

    peft_model = get_peft_model(_tiny.llama(), AdaLoraConfig(
        **kwargs, target_modules=TARGETS, lora_alpha=8, task_type="CAUSAL_LM"))
    ours = apply_adalora(_tiny.llama(), **kwargs, target_modules=TARGETS, alpha=8.0)
    state = {k.replace("base_model.model.", "").replace(".default", ""): v
             for k, v in peft_model.state_dict().items()}
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                param.copy_(state[name])
    return peft_model, ours


def test_training_matches_peft_step_for_step_and_meets_the_budget():
    kwargs = dict(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=2, total_step=10)
    peft_model, ours = _peft_and_ours(**kwargs)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    opt_peft = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(10):
        loss_peft = peft_model(ids, labels=ids).loss  # PEFT adds the penalty inside forward
        loss_peft.backward()
        opt_peft.step()
        peft_model.base_model.update_and_allocate(step)
        opt_peft.zero_grad()
        loss = ours(ids, labels=ids).loss + adalora_orthogonal_penalty(ours)
        loss.backward()
        opt_ours.step()
        adalora_update_and_allocate(ours, step)
        opt_ours.zero_grad()
        assert loss.item() == loss_peft.item(), step
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pattern = peft_model.peft_config["default"].rank_pattern
    for name, layer in adalora_layers(ours):
        assert layer.rank_mask.tolist() == pattern[f"{name}.lora_E.default"]
        assert torch.equal(layer.lora_E, peft_model.base_model.model.get_submodule(name).lora_E["default"])
    ranks = adalora_ranks(ours)
    assert sum(ranks.values()) == 2 * 4  # target_r · layers
    assert len(set(ranks.values())) > 1  # shared by importance, not evenly


def test_files_both_ways_with_a_rank_pattern(tmp_path):
    from peft import PeftModel

    kwargs = dict(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6)
    peft_model, ours = _peft_and_ours(**kwargs)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    for model, peft_side in ((peft_model, True), (ours, False)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        for step in range(6):
            loss = model(ids, labels=ids).loss
            if not peft_side:
                loss = loss + adalora_orthogonal_penalty(model)
            loss.backward()
            opt.step()
            if peft_side:
                model.base_model.update_and_allocate(step)
            else:
                adalora_update_and_allocate(model, step)
            opt.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        want_peft = peft_model(ids).logits
        want_ours = ours(ids).logits

    # PEFT -> ours
    peft_model.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and not all(all(v) for v in config["rank_pattern"].values())
    loaded = load_adapter(_tiny.llama(), tmp_path / "peft")
    with torch.no_grad():
        # to float32 rounding: PEFT multiplies (A*E), B and the scale in another order, and some
        # CPUs' BLAS (MKL on AMD) rounds those products differently
        torch.testing.assert_close(loaded(ids).logits, want_peft)
    assert {f"{n}.lora_E": m.pattern for n, m in adalora_layers(loaded)} == config["rank_pattern"]

    # ours -> PEFT: saving needs the masked triplets dropped first
    with pytest.raises(ValueError, match=r"call adalora_prune\(model\) first"):
        save_adapter(ours, tmp_path / "ours")
    ranks = adalora_prune(ours)
    assert sum(ranks.values()) == 2 * 4
    with torch.no_grad():
        # pruning changes nothing (to float32 rounding: the products now run over fewer ranks)
        pruned = ours(ids).logits
    torch.testing.assert_close(pruned, want_ours)
    save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()} == ranks
    theirs = PeftModel.from_pretrained(_tiny.llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, pruned)   # PEFT: to float32 rounding
    again = load_adapter(_tiny.llama(), tmp_path / "ours")
    with torch.no_grad():
        again(ids)  # a fresh model finds its sibling groups in its first forward, then fuses
        assert torch.equal(again(ids).logits, pruned)
        for _, layer in adalora_layers(again):
            layer.lora_E.zero_()
    load_adapter(again, tmp_path / "ours")  # into the layers it already has
    with torch.no_grad():
        assert torch.equal(again(ids).logits, pruned)


def test_a_bad_rank_pattern_is_refused_and_the_model_is_unchanged(tmp_path):
    model = apply_adalora(_tiny.llama(), init_r=3, target_r=2, target_modules=TARGETS, total_step=5)
    _randomize(model)
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    from safetensors.torch import load_file, save_file

    weights = str(tmp_path / "a" / "adapter_model.safetensors")
    save_file(load_file(weights), weights)  # no metadata: as if HF PEFT had written it
    victim = _tiny.llama()
    state = {k: v.clone() for k, v in victim.state_dict().items()}
    layer0 = "model.layers.0.self_attn.q_proj"
    for bad, match in (({f"{layer0}.lora_E": [True, False]}, "must be a list of init_r=3"),
                       ({"model.layers.0.mlp.up_proj.lora_E": [True] * 3}, "does not adapt"),
                       ({layer0: [True] * 3}, "must name a layer's lora_E")):
        path.write_text(json.dumps({**config, "rank_pattern": bad}))
        with pytest.raises(ValueError, match=match):
            load_adapter(victim, tmp_path / "a")
        assert victim.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in victim.state_dict().items())


# -------------------------------------------------------------------------------- the callback


def test_callback_trains_allocates_to_the_budget_and_saves_the_ranks(tmp_path):
    torch.manual_seed(0)
    module = _lit.TinyLM(lr=0.1)
    loader = _lit.loader(n=8, batch_size=4)
    with torch.no_grad():
        before = torch.stack([module._loss(b) for b in loader]).mean()
    callback = AdaLoRACallback(init_r=4, target_r=2, target_modules=TARGETS, tinit=2, tfinal=3, deltaT=1,
                               adapter_dir=str(tmp_path / "adapter"))
    trainer = _lit.trainer(tmp_path, max_steps=12, callbacks=[callback])
    trainer.fit(module, loader)
    assert callback.total_step == 12  # from trainer.estimated_stepping_batches
    with torch.no_grad():
        after = torch.stack([module._loss(b) for b in loader]).mean()
    assert after < before - 0.05
    ranks = adalora_ranks(module.model)
    assert sum(ranks.values()) == 2 * 4 and all(m.rank_mask is None for _, m in adalora_layers(module.model))
    assert trainer.callback_metrics["adalora/budget"] == 8
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 12
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()} == ranks
    other = load_adapter(_tiny.llama(), tmp_path / "adapter")
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, module.model.eval()(ids).logits)


def test_callback_adds_the_orthogonality_penalty(tmp_path):
    def orth_error(weight):
        module = _lit.TinyLM(lr=3e-2)
        callback = AdaLoRACallback(init_r=4, target_r=4, target_modules=TARGETS, orth_reg_weight=weight)
        _lit.trainer(tmp_path, max_steps=6, callbacks=[callback]).fit(module, _lit.loader(n=8))
        model = module.model
        return adalora_orthogonal_penalty(model, weight=1.0).item()

    assert orth_error(5.0) < 0.9 * orth_error(0.0)


# -------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(init_r=4, target_r=8), "target_r must be at most init_r"),
    (dict(tinit=5, tfinal=5, total_step=10), "tinit \\+ tfinal must be less than total_step"),
    (dict(init_r=0), "init_r must be a positive integer"),
    (dict(target_r=1.5), "target_r must be a positive integer"),
    (dict(deltaT=0), "deltaT must be a positive integer"),
    (dict(tinit=-1), "tinit must be a non-negative integer"),
    (dict(tfinal=True), "tfinal must be a non-negative integer"),
    (dict(beta1=1.0), "beta1 must be a number in \\(0, 1\\)"),
    (dict(beta2=0), "beta2 must be a number in \\(0, 1\\)"),
    (dict(orth_reg_weight=-0.1), "orth_reg_weight must be a finite number >= 0"),
    (dict(total_step=0), "total_step must be a positive integer"),
    (dict(alpha=float("nan")), "alpha must be a finite positive number"),
    (dict(dropout=1.0), "dropout must be a number in \\[0, 1\\)"),
    (dict(autocast_adapter_dtype=1), "autocast_adapter_dtype must be a bool"),
    (dict(target_modules=""), "target_modules"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaLoRAConfig(**kwargs)
    with pytest.raises(ValueError, match=field):
        AdaLoRACallback(**kwargs)
    model = _tiny.llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=field):
        apply_adalora(model, **kwargs)
    assert not adalora_layers(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_allocation_needs_total_step_and_gradients(tmp_path):
    model = apply_adalora(_tiny.llama(), init_r=3, target_r=2, target_modules=TARGETS)
    with pytest.raises(ValueError, match="total_step is not known"):
        adalora_update_and_allocate(model, 0)
    with pytest.raises(ValueError, match="needs the gradients"):
        adalora_update_and_allocate(model, 0, total_step=10)
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        adalora_update_and_allocate(model, -1, total_step=10)
    adalora_layers(model)[0][1].merge()
    with pytest.raises(ValueError, match="the AdaLoRA layers are merged"):
        adalora_update_and_allocate(model, 0, total_step=10)
    with pytest.raises(ValueError, match="tinit \\+ tfinal must be less than total_step"):
        trainer = _lit.trainer(tmp_path, max_steps=3, callbacks=[AdaLoRACallback(tinit=2, tfinal=1)])
        trainer.fit(_lit.TinyLM(), _lit.loader())
    assert isinstance(adalora_layers(model)[0][1], AdaLoRALinear)


def _adalora_run(tmp_path, max_steps, every, schedule, batch_size=4, ckpt_path=None):
    """A TinyLM trained by AdaLoRACallback (``schedule``: tinit, tfinal, total_step), with a
    checkpoint every ``every`` steps; resumed from ``ckpt_path`` when given."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    module = _lit.TinyLM(lr=0.1)
    tinit, tfinal, total_step = schedule
    callback = AdaLoRACallback(init_r=4, target_r=2, target_modules=TARGETS, tinit=tinit, tfinal=tfinal,
                               total_step=total_step)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
    trainer = _lit.trainer(tmp_path, max_steps=max_steps, callbacks=[callback, checkpoint],
                           enable_checkpointing=True)
    trainer.fit(module, _lit.loader(n=8, batch_size=batch_size), ckpt_path=ckpt_path)
    return module


def test_a_run_resumed_in_the_final_phase_keeps_its_mask(tmp_path):
    full = _adalora_run(tmp_path, 10, 8, (1, 4, 10))
    resumed = _adalora_run(tmp_path, 10, 8, (1, 4, 10),
                           ckpt_path=tmp_path / "ckpt" / "epoch=3-step=8.ckpt")  # 8 > 10 - 4
    assert adalora_ranks(resumed.model) == adalora_ranks(full.model)
    for (_, a), (_, b) in zip(adalora_layers(resumed.model), adalora_layers(full.model), strict=True):
        torch.testing.assert_close(a.lora_E, b.lora_E)


def test_a_run_resumed_in_the_budget_phase_ranks_as_the_uninterrupted_run(tmp_path):
    """Checkpoints hold the smoothed importance and uncertainty (Ī, Ū) of every layer: a run
    resumed while the budget still falls chooses the same triplets, with the same adapter bit for
    bit, as the uninterrupted run (it used to restart the averages from zero and keep others)."""
    full = _adalora_run(tmp_path, 8, 4, (2, 1, 8), batch_size=2)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("AdaLoRACallback")]
    assert len(state["importance"]) == 4 and all(len(ts) == 6 for ts in state["importance"].values())
    resumed = _adalora_run(tmp_path, 8, 4, (2, 1, 8), batch_size=2,
                           ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")  # budget falls over 3..6
    assert adalora_ranks(resumed.model) == adalora_ranks(full.model)
    for (_, a), (_, b) in zip(adalora_layers(resumed.model), adalora_layers(full.model), strict=True):
        for name in ("lora_A", "lora_E", "lora_B"):  # pruned to the kept triplets at the end
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_the_pruned_module_takes_its_own_runs_checkpoints(tmp_path):
    """``fit`` prunes the layers when it ends, but its checkpoints hold ``init_r`` triplets: the
    same module takes them for ``validate``/``test`` (``ckpt_path="best"`` after ``fit``) with the
    outputs of a fresh module loaded from them, and resumes from one in a second ``fit`` ending bit
    for bit where the uninterrupted run ends (both used to be refused as mis-shaped); a refused
    checkpoint leaves the pruned layers as they were."""
    full = _adalora_run(tmp_path, 8, 4, (2, 1, 8), batch_size=2)
    assert any(m.pattern is not None and m.r < 4 for _, m in adalora_layers(full.model))
    ids = torch.randint(0, _lit.VOCAB, (2, 6))

    def logits(module):
        module.eval()
        with torch.no_grad():
            return module.model(ids).logits

    mid = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"  # budget phase: another mask than the end's
    fresh = _lit.TinyLM()
    callback = lambda: AdaLoRACallback(init_r=4, target_r=2, target_modules=TARGETS, tinit=2, tfinal=1,  # noqa: E731
                                       total_step=8)
    _lit.trainer(tmp_path, callbacks=[callback()]).validate(fresh, _lit.loader(n=4), ckpt_path=mid)
    pruned = copy.deepcopy(full)
    _lit.trainer(tmp_path, callbacks=[callback()]).validate(pruned, _lit.loader(n=4), ckpt_path=mid)
    torch.testing.assert_close(logits(pruned), logits(fresh), rtol=0, atol=0)

    before = {n: t.clone() for n, t in full.state_dict().items()}
    ranks = adalora_ranks(full.model)
    other = AdaLoRACallback(init_r=4, target_r=2, target_modules=TARGETS, tinit=2, tfinal=1, total_step=8,
                            alpha=3.0)
    with pytest.raises(ValueError, match="alpha"):
        _lit.trainer(tmp_path, callbacks=[other]).validate(full, _lit.loader(n=4), ckpt_path=mid)
    assert adalora_ranks(full.model) == ranks
    assert full.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[n]) for n, t in full.state_dict().items())

    # a second fit of the pruned module from the mid-run checkpoint ends as the uninterrupted run
    resumed = copy.deepcopy(full)
    resumed.train()
    trainer = _lit.trainer(tmp_path, max_steps=8, callbacks=[callback()])
    trainer.fit(resumed, _lit.loader(n=8, batch_size=2), ckpt_path=mid)
    assert adalora_ranks(resumed.model) == adalora_ranks(full.model)
    for (_, a), (_, b) in zip(adalora_layers(resumed.model), adalora_layers(full.model), strict=True):
        for name in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
