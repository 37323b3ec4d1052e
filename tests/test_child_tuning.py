"""Child-tuning (arXiv 2109.05687): only a child network of the weights trains, through a gradient
mask between backward and the optimizer's update (F: fresh Bernoulli(p) each step, scaled 1/p;
D: the top-p weights by Fisher information); no optimizer moves a masked weight."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from lightning_peft import (
    ChildTuningConfig,
    apply_child_tuning,
    attach_child_tuning,
    child_tuning_changed,
    child_tuning_fisher_masks,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from lightning_peft._base import TRAIN_PARAMS_ATTR, ModulesToSave, adapter_named_parameters
from lightning_peft.methods import get_method, method_for_config
from lightning_peft.methods.child_tuning import (
    CHILD_TUNING_ATTR,
    child_tuned_parameters,
    child_tuning_from_json,
    child_tuning_to_json,
    child_tuning_touched,
)
from tests import _lit, _tiny

WHERE = "adapter/adapter_config.json"


def _ids(seed: int = 0, batch: int = 3, seq: int = 10, vocab: int = 96):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def _mlp_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def _mlp_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


# --------------------------------------------------------------------------------------------
# config and selection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(p=0), r"p must be a number in \(0, 1\]"),
    (dict(p=0.0), r"p must be a number in \(0, 1\]"),
    (dict(p=1.5), r"p must be a number in \(0, 1\]"),
    (dict(p=-0.2), r"p must be a number in \(0, 1\]"),
    (dict(p=float("nan")), r"p must be a number in \(0, 1\]"),
    (dict(p=True), r"p must be a number in \(0, 1\]"),
    (dict(mode="X"), r"mode must be 'F' .* or 'D'"),
    (dict(mode="f"), r"mode must be 'F' .* or 'D'"),
    (dict(fisher_batches=0), r"fisher_batches must be an integer >= 1"),
    (dict(fisher_batches=-3), r"fisher_batches must be an integer >= 1"),
    (dict(fisher_batches=2.0), r"fisher_batches must be an integer >= 1"),
    (dict(seed="1"), r"seed must be an integer or None"),
    (dict(target_modules=[]), r"target_modules must be"),
    (dict(exclude_modules="("), r"exclude_modules='\(' is not a valid regular expression"),
    (dict(trainable_modules=[""]), r"trainable_modules must be a list of module names"),
])
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChildTuningConfig(**kwargs)
    model = _mlp()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        apply_child_tuning(model, **kwargs)
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    assert not any(CHILD_TUNING_ATTR in m.__dict__ for m in model.modules())
    from lightning_peft.callbacks import ChildTuningCallback

    with pytest.raises(ValueError, match=message):
        ChildTuningCallback(**kwargs)


def test_default_child_tunes_every_parameter_and_marks_tied_ones_once():
    model = _tiny.llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    apply_child_tuning(model)
    params = child_tuned_parameters(model)
    assert list(params) == [n for n, _ in model.named_parameters()]  # each tensor once
    assert "lm_head.weight" not in params and "model.embed_tokens.weight" in params
    assert model.model.embed_tokens.__dict__[TRAIN_PARAMS_ATTR] == ("weight",)
    assert TRAIN_PARAMS_ATTR not in model.lm_head.__dict__
    assert dict(adapter_named_parameters(model)).keys() == params.keys()
    counts = trainable_parameters(model)
    assert counts.trainable == counts.total == sum(p.numel() for p in model.parameters())
    # idempotent
    before = {n: m.__dict__.get(CHILD_TUNING_ATTR) for n, m in model.named_modules()}
    apply_child_tuning(model)
    assert before == {n: m.__dict__.get(CHILD_TUNING_ATTR) for n, m in model.named_modules()}


def test_target_exclude_and_trainable_modules_select_the_parameters():
    model = _tiny.llama()
    apply_child_tuning(model, target_modules=["q_proj"], mode="D")
    assert sorted(child_tuned_parameters(model)) == ["model.layers.0.self_attn.q_proj.weight",
                                                     "model.layers.1.self_attn.q_proj.weight"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(child_tuned_parameters(model))
    model = _tiny.llama()
    apply_child_tuning(model, target_modules="all-linear", exclude_modules=["mlp"])
    chosen = set(child_tuned_parameters(model))
    assert chosen and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in chosen)
    model = _tiny.llama()
    apply_child_tuning(model, target_modules=r"model\.layers\.1\.mlp")  # a regex: everything inside
    assert sorted(child_tuned_parameters(model)) == [f"model.layers.1.mlp.{k}_proj.weight"
                                                     for k in ("down", "gate", "up")]
    bert = _tiny.bert()
    apply_child_tuning(bert, trainable_modules=["classifier"])
    assert isinstance(bert.classifier, ModulesToSave)
    assert not any(".classifier." in n or n.startswith("classifier") for n in child_tuned_parameters(bert))
    owned = dict(adapter_named_parameters(bert))
    assert "classifier.modules_to_save.weight" in owned and "bert.embeddings.word_embeddings.weight" in owned
    with pytest.raises(ValueError, match="target_modules entry 'nope' matches no module"):
        apply_child_tuning(_tiny.llama(), target_modules=["q_proj", "nope"])
    with pytest.raises(ValueError, match="trainable_modules and target_modules both select"):
        apply_child_tuning(_tiny.bert(), target_modules=["classifier"], trainable_modules=["classifier"])
    with pytest.raises(ValueError, match="trainable_modules entry 'head' matches no module"):
        apply_child_tuning(_tiny.bert(), trainable_modules=["head"])


# --------------------------------------------------------------------------------------------
# the masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.3, 0.25, 0.7])
def test_f_mask_keeps_about_p_and_scales_by_exactly_one_over_p(p):
    model = nn.Linear(300, 200, bias=False)  # 60,000 weights
    apply_child_tuning(model, mode="F", p=p)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(5)
    reference = torch.Generator().manual_seed(5)
    handle = attach_child_tuning(model, optimizer, generator=generator, mask_in_pre_hook=False)
    masks = []
    for step in range(2):
        grad = torch.randn(model.weight.shape, generator=torch.Generator().manual_seed(step)) + 0.01
        model.weight.grad = grad.clone()
        handle.mask_gradients()
        keep = torch.rand(model.weight.shape, generator=reference) < p  # the same draw
        expected = torch.where(keep, grad.double() / p, 0.0).float()  # float64 reference
        assert torch.equal(model.weight.grad, expected)
        assert abs(keep.float().mean().item() - p) < 0.01  # ~5 standard deviations
        masks.append(keep)
        optimizer.step()
    assert not torch.equal(masks[0], masks[1])  # a fresh mask every step
    assert torch.equal(child_tuning_touched(model)["weight"], masks[0] | masks[1])
    assert child_tuning_changed(model) == int((masks[0] | masks[1]).sum())
    handle.remove()


def _direct_fisher(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for batch in batches:
        grads = torch.autograd.grad(_mlp_loss(model, batch), [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += g.square()
    return {n: t / len(batches) for n, t in total.items()}


def test_d_mask_is_the_top_p_fisher_over_all_parameters():
    model = _mlp()
    apply_child_tuning(model, mode="D", p=0.3, exclude_modules=["4"])
    names = list(child_tuned_parameters(model))
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    batches = [_mlp_batch(s) for s in range(3)]
    masks = child_tuning_fisher_masks(model, batches, lambda b: _mlp_loss(model, b))
    fisher = _direct_fisher(model, names, batches)
    count = sum(f.numel() for f in fisher.values())
    k = round(0.3 * count)
    assert sum(int(m.sum()) for m in masks.values()) == k
    flat = torch.cat([fisher[n].flatten() for n in names])
    chosen = torch.cat([masks[n].flatten() for n in names])
    assert flat[chosen].min() >= flat[~chosen].max()  # the k largest, over all tensors together
    assert torch.equal(chosen, torch.zeros_like(chosen).index_fill_(0, flat.topk(k).indices, True))
    assert all(p.grad is None for p in model.parameters())  # the estimate leaves no gradient


@pytest.mark.parametrize("mode", ["F", "D"])
@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW])
def test_masked_entries_stay_bit_identical_under_weight_decay_and_momentum(mode, optimizer_class):
    model = _mlp()
    apply_child_tuning(model, mode=mode, p=0.4, target_modules=["0", "2"], exclude_modules=["4"])
    batches = [_mlp_batch(s) for s in range(4)]
    masks = None
    if mode == "D":
        masks = child_tuning_fisher_masks(model, batches[:2], lambda b: _mlp_loss(model, b))
    optimizer = optimizer_class(model.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    reference = torch.Generator().manual_seed(1)
    handle = attach_child_tuning(model, optimizer, masks=masks, generator=generator)
    params = child_tuned_parameters(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in params}
    first = {n: p.detach().clone() for n, p in params.items()}
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        loss = _mlp_loss(model, batches[step % 4])
        losses.append(loss.item())
        loss.backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        optimizer.step()
        for n, p in params.items():
            keep = (torch.rand(p.shape, generator=reference) < 0.4) if mode == "F" else masks[n]
            assert torch.equal(p[~keep], before[n][~keep]), f"{n} moved where masked at step {step}"
            moved = p != before[n]
            assert bool(moved[keep].all()), f"{n}: a kept weight did not move at step {step}"
    if mode == "D":  # never unmasked: bit for bit the start
        assert all(torch.equal(p[~masks[n]], first[n][~masks[n]]) for n, p in params.items())
        assert child_tuning_changed(model) == sum(int(m.sum()) for m in masks.values())
    for n, p in model.named_parameters():  # outside the method: frozen, untouched
        if n in frozen:
            assert not p.requires_grad and torch.equal(p, frozen[n])
    assert losses[-1] < losses[0] or losses[-2] < losses[1]
    handle.remove()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


class _AddOne(torch.optim.Optimizer):
    """An optimizer that moves every parameter, with a gradient or not."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1.0)


def test_any_optimizer_and_parameters_without_a_gradient_and_modules_trained_in_full():
    model = _mlp()
    apply_child_tuning(model, mode="D", p=0.5, target_modules=["0", "2"], trainable_modules=["4"])
    masks = child_tuning_fisher_masks(model, [_mlp_batch()], lambda b: _mlp_loss(model, b))
    optimizer = _AddOne([p for p in model.parameters() if p.requires_grad])
    attach_child_tuning(model, optimizer, masks=masks)
    params = child_tuned_parameters(model)
    head = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("4.modules_to_save")}
    assert head and not set(head) & set(params)
    _mlp_loss(model, _mlp_batch()).backward()
    model[2].bias.grad = None  # no gradient at this step: restored whole
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer.step()
    for n, p in params.items():
        if n == "2.bias":
            assert torch.equal(p, before[n])
        else:
            assert torch.equal(p[~masks[n]], before[n][~masks[n]])
            assert torch.equal(p[masks[n]], before[n][masks[n]] + 1)
    for n, p in model.named_parameters():  # the module trained in full is not masked
        if n in head:
            assert torch.equal(p, head[n] + 1)


def test_attach_checks_its_arguments():
    model = apply_child_tuning(_mlp(), mode="D", p=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="mode 'D' needs masks"):
        attach_child_tuning(model, optimizer)
    with pytest.raises(ValueError, match="masks are for mode 'D'"):
        attach_child_tuning(model, optimizer, mode="F", masks={})
    with pytest.raises(ValueError, match=r"masks do not match .*missing.*mis-shaped"):
        attach_child_tuning(model, optimizer, masks={"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"p must be a number in \(0, 1\]"):
        attach_child_tuning(model, optimizer, mode="F", p=0)
    with pytest.raises(ValueError, match="mode must be 'F' or 'D'"):
        attach_child_tuning(model, optimizer, mode="E")
    with pytest.raises(ValueError, match="carries no Child-tuning"):
        attach_child_tuning(_mlp(), optimizer)
    handle = attach_child_tuning(model, optimizer, mode="F", mask_in_pre_hook=False)
    with pytest.raises(RuntimeError, match="without masking the gradients first"):
        optimizer.step()
    handle.remove()


def test_training_a_tiny_llama_lowers_the_loss():
    for mode in ("F", "D"):
        model = _tiny.llama().train()
        apply_child_tuning(model, mode=mode, p=0.3)
        ids = _ids()
        masks = None
        if mode == "D":
            masks = child_tuning_fisher_masks(model, [ids], lambda b, m=model: m(b, labels=b).loss)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        attach_child_tuning(model, optimizer, masks=masks, generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(8):
            optimizer.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.2, (mode, losses)
        total = sum(p.numel() for p in model.parameters())
        changed = child_tuning_changed(model)
        if mode == "D":
            assert changed <= round(0.3 * total)
        else:  # 1 - 0.7^8 of the weights were unmasked at some step
            assert abs(changed / total - (1 - 0.7 ** 8)) < 0.02


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = _tiny.llama().train()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: saved once
    apply_child_tuning(model, mode="D", p=0.2, target_modules=["self_attn", "embed_tokens"])
    ids = _ids()
    masks = child_tuning_fisher_masks(model, [ids], lambda b: model(b, labels=b).loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    attach_child_tuning(model, optimizer, masks=masks)
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    save_adapter(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "adapter_config.json").read_text())
    assert config["peft_type"] == "CHILD_TUNING" and config["mode"] == "D" and config["p"] == 0.2
    assert config["target_parameters"] == list(child_tuned_parameters(model))
    assert config["trainable_modules"] is None
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ct" / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted("base_model.model." + n for n in child_tuned_parameters(model))
    fresh = _tiny.llama()
    fresh.lm_head.weight = fresh.model.embed_tokens.weight
    load_adapter(fresh, tmp_path / "ct")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert child_tuning_to_json(fresh) == child_tuning_to_json(model)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(child_tuned_parameters(model))
    load_adapter(fresh, tmp_path / "ct")  # again, into the model that carries it
    # a BERT with its head trained in full
    bert = _tiny.bert()
    apply_child_tuning(bert, p=0.5, trainable_modules=["classifier"], target_modules=["attention"])
    with torch.no_grad():
        for _, param in adapter_named_parameters(bert):
            param.add_(0.1)
    save_adapter(bert, tmp_path / "bert")
    other = load_adapter(_tiny.bert(), tmp_path / "bert")
    x = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(other(x).logits, bert(x).logits)
    assert isinstance(other.classifier, ModulesToSave)


def test_from_json_checks_every_field():
    model = _tiny.llama()
    good = child_tuning_to_json(apply_child_tuning(_tiny.llama(), target_modules=["q_proj"]))
    child_tuning_from_json(model, good, WHERE)  # plans, changes nothing
    assert not any(CHILD_TUNING_ATTR in m.__dict__ for m in model.modules())
    for change, message in [
        (dict(mode="X"), "mode must be 'F' or 'D'"),
        (dict(p=0), r"p must be a number in \(0, 1\]"),
        (dict(p="0.3"), r"p must be a number in \(0, 1\]"),
        (dict(target_parameters=[]), "target_parameters must be a non-empty list"),
        (dict(target_parameters=["model.nope.weight"]), "target_parameters names parameters LlamaForCausalLM "
                                                        "does not have"),
        (dict(target_parameters=["lm_head.weight", "lm_head.weight"]), "more than once"),
        (dict(trainable_modules=["head"]), "trainable_modules names modules LlamaForCausalLM does not have"),
        (dict(r=4), r"unknown Child-tuning config fields \['r'\]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(WHERE) + ".*" + message):
            child_tuning_from_json(model, {**good, **change}, WHERE)
    with pytest.raises(ValueError, match=re.escape(WHERE) + ": p is missing"):
        child_tuning_from_json(model, {k: v for k, v in good.items() if k != "p"}, WHERE)


def test_registry_entry():
    method = get_method("child_tuning")
    assert method.peft_type == "CHILD_TUNING" and method_for_config(ChildTuningConfig()) is method
    model = _mlp()
    assert not method.detect(model)
    assert method.detect(apply_child_tuning(model))


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


def _fit(tmp_path, callback, steps: int, ckpt_path=None, every: int | None = None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _lit.TinyLM()
    callbacks = [callback]
    if every is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="ct-{step}", every_n_train_steps=every,
                                         save_top_k=-1))
    trainer = _lit.trainer(tmp_path, callbacks=callbacks, max_steps=steps,
                           enable_checkpointing=every is not None)
    trainer.fit(module, _lit.loader(n=4, batch_size=4), ckpt_path=ckpt_path)  # one batch per epoch
    return module


@pytest.mark.parametrize("mode", ["F", "D"])
def test_callback_trains_the_child_network_and_resumes_exactly(tmp_path, mode):
    from lightning_peft.callbacks import ChildTuningCallback

    base = {n: p.detach().clone() for n, p in _lit.TinyLM().named_parameters()}
    full = ChildTuningCallback(mode=mode, p=0.3, fisher_batches=2)
    whole = _fit(tmp_path, full, steps=4, every=2)
    params = child_tuned_parameters(whole)
    assert len(params) == len(base)
    touched = child_tuning_touched(whole)
    for n, p in params.items():  # never unmasked: bit for bit the base
        assert torch.equal(p[~touched[n]], base[n][~touched[n]]), n
    assert not full._handles  # the optimizer hooks were removed at teardown
    if mode == "D":
        assert set(full.masks) == set(params)
        assert all(torch.equal(touched[n], full.masks[n]) for n in params)
        total = sum(p.numel() for p in params.values())
        assert sum(int(m.sum()) for m in full.masks.values()) == round(0.3 * total)
    state = torch.load(tmp_path / "ct-step=2.ckpt", weights_only=True)
    key = next(k for k in state["callbacks"] if k.startswith("ChildTuningCallback"))
    saved = state["callbacks"][key]
    assert (saved["masks"] is not None) == (mode == "D")
    assert isinstance(saved["seed"], int) == (mode == "F")
    assert isinstance(saved["generator"], torch.Tensor) == (mode == "F")

    again = ChildTuningCallback(mode=mode, p=0.3, fisher_batches=2)
    resumed = _fit(tmp_path / "b", again, steps=4, ckpt_path=tmp_path / "ct-step=2.ckpt")
    for n, p in resumed.named_parameters():  # the same masks (D) and draws (F): the same weights
        assert torch.equal(p, dict(whole.named_parameters())[n]), n
    if mode == "D":
        assert all(torch.equal(again.masks[n], full.masks[n]) for n in full.masks)
        # the child network comes from the checkpoint, not from a new Fisher estimate
        flipped = {n: ~m for n, m in saved["masks"].items()}
        torch.save({**state, "callbacks": {**state["callbacks"], key: {**saved, "masks": flipped}}},
                   tmp_path / "flipped.ckpt")
        other = ChildTuningCallback(mode=mode, p=0.3, fisher_batches=2)
        moved = _fit(tmp_path / "c", other, steps=4, ckpt_path=tmp_path / "flipped.ckpt")
        assert all(torch.equal(other.masks[n], flipped[n]) for n in flipped)
        start = state["state_dict"]
        for n, p in child_tuned_parameters(moved).items():
            assert torch.equal(p[~flipped[n]], start[n][~flipped[n]]), n
            assert not torch.equal(p[flipped[n]], start[n][flipped[n]]), n


def test_callback_through_configure_model_and_adapter_dir(tmp_path):
    from lightning_peft.callbacks import ChildTuningCallback

    module = _lit.TinyLM(build_in_configure_model=True)
    callback = ChildTuningCallback(mode="D", p=0.5, target_modules=["mlp"], fisher_batches=1,
                                   adapter_dir=str(tmp_path / "adapter"))
    _lit.trainer(tmp_path, callbacks=[callback], max_steps=2).fit(module, _lit.loader(n=8))
    assert callback.masks and all(".mlp." in n for n in callback.masks)
    fresh = load_adapter(_tiny.llama(), tmp_path / "adapter")
    ids = _ids()
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, module.model(ids).logits)
