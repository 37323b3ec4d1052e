"""ReLoRA (arXiv 2307.05695): the reset (continuity, merge, re-initialisation), the total update's
rank growing past r, magnitude pruning of exactly the adapters' optimizer state, the jagged cosine,
ReLoRACallback (training, resets at the right steps, checkpoints that resume exactly, the adapter
warning) and every bad argument."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.callbacks import ReLoRACallback
from lightning_peft.methods import get_method, method_for_config, methods_in
from lightning_peft.methods.lora import LoRAConfig, LoRALinear, apply_lora
from lightning_peft.methods.qlora import apply_qlora
from lightning_peft.methods.relora import (
    JaggedCosine,
    ReLoRAConfig,
    apply_relora,
    jagged_cosine,
    jagged_cosine_schedule,
    prune_optimizer_state,
    relora_layers,
    relora_reset,
    relora_resets,
)
from tests import _lit, _tiny

IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in relora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def _base_weight(layer):  # (out, in)
    w = layer.base_layer.weight
    return w.t() if layer.fan_in_fan_out else w


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs, field", [
    (dict(reset_every=0), "reset_every"), (dict(reset_every=-3), "reset_every"),
    (dict(reset_every=2.5), "reset_every"), (dict(reset_every=True), "reset_every"),
    (dict(optimizer_keep=0.0), "optimizer_keep"), (dict(optimizer_keep=-0.1), "optimizer_keep"),
    (dict(optimizer_keep=1.5), "optimizer_keep"), (dict(optimizer_keep=float("nan")), "optimizer_keep"),
    (dict(optimizer_keep=True), "optimizer_keep"),
    (dict(reset_every=10, restart_warmup=10), "restart_warmup"),
    (dict(reset_every=10, restart_warmup=11), "restart_warmup"),
    (dict(restart_warmup=-1), "restart_warmup"), (dict(restart_warmup=1.0), "restart_warmup"),
    (dict(r=0), "r"), (dict(alpha=float("inf")), "alpha"),
])
def test_bad_config_arguments_are_value_errors_naming_them(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        ReLoRAConfig(**kwargs)
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        ReLoRACallback(**kwargs)
    model = _tiny.llama()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        apply_relora(model, **kwargs)
    assert model.state_dict().keys() == before.keys() and not relora_layers(model)


@pytest.mark.parametrize("kwargs, field", [
    (dict(total_steps=0), "total_steps"), (dict(total_steps=10.0), "total_steps"),
    (dict(reset_every=0), "reset_every"), (dict(restart_warmup=5), "restart_warmup"),
    (dict(restart_warmup=-1), "restart_warmup"), (dict(warmup_steps=20), "warmup_steps"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(min_lr_ratio=-0.5), "min_lr_ratio"),
])
def test_bad_schedule_arguments_are_value_errors_naming_them(kwargs, field):
    args = dict(total_steps=20, reset_every=5, restart_warmup=2, warmup_steps=2, min_lr_ratio=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        JaggedCosine(**args)
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        jagged_cosine(0, **args)


@pytest.mark.parametrize("kwargs, field", [
    (dict(lr_schedule="cosine"), "lr_schedule"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"), (dict(total_steps=0), "total_steps"),
    (dict(total_steps=100, warmup_steps=100), "warmup_steps"),
])
def test_bad_callback_arguments_are_value_errors_naming_them(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        ReLoRACallback(reset_every=10, restart_warmup=2, **kwargs)


def test_registry_entry_and_files_are_lora_files():
    method = get_method("relora")
    assert method.file_format == "lora" and method.peft_type == "LORA"
    assert method_for_config(ReLoRAConfig(r=2)) is method
    model = apply_relora(_tiny.llama(), r=2)
    assert sorted(m.name for m in methods_in(model)) == ["lora", "relora"]
    assert not get_method("relora").detect(apply_lora(_tiny.llama(), r=2))  # plain LoRA is not ReLoRA


# ------------------------------------------------------------------------------------- reset
@pytest.mark.parametrize("build", [_tiny.llama, _tiny.gpt2], ids=["llama", "gpt2-conv1d"])
def test_outputs_are_unchanged_at_the_instant_of_a_reset(build):
    with torch.no_grad():
        base_only = build()(IDS).logits
    model = apply_relora(build(), r=2, alpha=4.0, target_modules="all-linear", reset_every=10,
                         restart_warmup=1)
    _randomize(model)
    layers = relora_layers(model)
    old = {name: (_base_weight(m).detach().double().clone(), m.lora_A.detach().clone(),
                  m.lora_B.detach().double() @ m.lora_A.detach().double() * m.scaling) for name, m in layers}
    with torch.no_grad():
        before = model(IDS).logits
    assert (before - base_only).abs().max() > 1e-2  # the adapters change the outputs
    assert relora_reset(model) == len(layers) and relora_resets(model) == 1
    with torch.no_grad():
        after = model(IDS).logits
    torch.testing.assert_close(after, before, rtol=0, atol=2e-5)
    for name, m in layers:
        w0, a0, delta = old[name]
        torch.testing.assert_close(_base_weight(m).double(), w0 + delta, rtol=0, atol=1e-6)  # merged
        assert not torch.any(m.lora_B) and not torch.equal(m.lora_A, a0) and not m.merged  # fresh A, B = 0
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform(a=√5) of an (r, in) matrix
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > bound / 2


def test_total_update_rank_exceeds_r_after_several_resets():
    torch.manual_seed(0)
    model = apply_relora(_tiny.llama(), r=2, target_modules=["q_proj"], reset_every=3, restart_warmup=1)
    original = {n: _base_weight(m).detach().double().clone() for n, m in relora_layers(model)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    ranks = []
    for _ in range(4):
        for _step in range(3):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        relora_reset(model, optimizer)
        ranks.append([int(torch.linalg.matrix_rank(_base_weight(m).double() - original[n], rtol=1e-5))
                      for n, m in relora_layers(model)])
    # one cycle is a rank-r update; every reset adds up to r more directions
    assert ranks == [[2 * k, 2 * k] for k in range(1, 5)], ranks


def _trained_optimizer(model, steps=2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("keep", [0.01, 0.2, 1.0])
def test_reset_prunes_the_optimizer_state_of_exactly_the_adapters_by_magnitude(keep):
    torch.manual_seed(0)
    model = apply_relora(_tiny.llama(), r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                         reset_every=5, restart_warmup=1, optimizer_keep=keep)
    optimizer = _trained_optimizer(model)
    before = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    adapters = {id(p) for _, m in relora_layers(model) for p in (m.lora_A, m.lora_B)}
    head = model.lm_head.modules_to_save.weight
    assert head in optimizer.state and len(adapters) == 8
    relora_reset(model, optimizer)
    pruned = 0
    for param, state in optimizer.state.items():
        old = before[param]
        assert torch.equal(state["step"], old["step"])  # the step count (bias correction) stays
        if id(param) not in adapters:  # the head trains on through resets: its state is kept
            assert all(torch.equal(state[k], old[k]) for k in ("exp_avg", "exp_avg_sq"))
            continue
        # one mask per parameter: the entries largest in the second moment, in both moments
        kept = state["exp_avg_sq"] != 0
        assert int(kept.sum()) == math.ceil(keep * param.numel())  # ~1%, at least one entry
        if not kept.all():
            assert old["exp_avg_sq"][kept].min() >= old["exp_avg_sq"][~kept].max()
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][kept], old[key][kept]), key  # kept values are kept
            assert not torch.any(state[key][~kept]), key  # the rest is zero
            pruned += 1
    assert pruned == 16
    _trained_optimizer(model, steps=1)  # training goes on


def test_prune_optimizer_state_skips_scalars_and_params_without_state():
    param = torch.nn.Parameter(torch.zeros(10, 10))
    other = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param, other], lr=0.1, momentum=0.9)
    param.grad = torch.arange(100.0).reshape(10, 10) - 50
    optimizer.step()
    assert prune_optimizer_state(optimizer, [param, other], keep=0.05) == 1
    momentum = optimizer.state[param]["momentum_buffer"]
    assert sorted(momentum[momentum != 0].tolist()) == [-50.0, -49.0, -48.0, 48.0, 49.0]
    with pytest.raises(ValueError, match=r"^keep must be a number in \(0, 1\]"):
        prune_optimizer_state(optimizer, [param], keep=0)


def test_reset_refuses_what_it_cannot_do_and_changes_nothing():
    with pytest.raises(ValueError, match="has no ReLoRA layers; inject them first"):
        relora_reset(apply_lora(_tiny.llama(), r=2))
    model = apply_relora(_tiny.llama(), r=2, reset_every=5, restart_warmup=1)
    _randomize(model)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    other = torch.optim.SGD(_tiny.llama().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the optimizer holds none of the ReLoRA parameters"):
        relora_reset(model, other)
    with pytest.raises(ValueError, match=r"^optimizer_keep must be a number in \(0, 1\]"):
        relora_reset(model, optimizer_keep=1.5)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        relora_reset(model, [object()])
    name, layer = relora_layers(model)[0]
    layer.merge()
    with pytest.raises(ValueError, match=rf"{name}.*merged LoRA layers; unmerge_adapters\(model\) first"):
        relora_reset(model)
    layer.unmerge()
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items()) and relora_resets(model) == 0


def test_a_4bit_base_is_refused_before_anything_changes():
    model = apply_qlora(_tiny.llama(), r=2, compute_dtype="float32")
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"ReLoRA refuses a 4-bit base \(model.layers.0.self_attn.q_proj"):
        apply_relora(model, r=2)
    assert not relora_layers(model)
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


def test_applying_twice_keeps_layers_and_reset_counts():
    model = apply_relora(_tiny.llama(), r=2, reset_every=5, restart_warmup=1)
    layers = [m for _, m in relora_layers(model)]
    relora_reset(model)
    apply_relora(model, config=ReLoRAConfig(r=2, reset_every=5, restart_warmup=1, optimizer_keep=0.5))
    assert [m for _, m in relora_layers(model)] == layers and relora_resets(model) == 1
    assert all(isinstance(m, LoRALinear) for m in layers)
    with pytest.raises(TypeError, match="config must be a ReLoRAConfig"):
        apply_relora(model, config=LoRAConfig(r=2))


# ---------------------------------------------------------------------------------- schedule
def test_jagged_cosine_values():
    f = JaggedCosine(total_steps=20, reset_every=5, restart_warmup=2, warmup_steps=2, min_lr_ratio=0.1)

    def cosine(t):  # warmup (t+1)/2, then 1 -> 0.1 along half a cosine, reached at step 19
        return (t + 1) / 2 if t < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 17))

    expected = [cosine(t) for t in range(20)]
    for k in (5, 10, 15):  # after each reset: 2 warmup steps ramping up to the cosine it left
        expected[k], expected[k + 1] = 0.5 * cosine(k + 1), cosine(k + 1)
    values = [f(t) for t in range(20)]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[0] == 0.5 and values[1] == 1.0 and values[19] == pytest.approx(0.1)
    assert all(values[k] < values[k - 1] / 2 for k in (5, 10, 15))  # the jags
    assert jagged_cosine(7, 20, 5, 2, 2, 0.1) == f(7)
    # without a restart warmup the schedule is the plain cosine
    assert [jagged_cosine(t, 20, 5, 0, 2, 0.1) for t in range(20)] == pytest.approx(
        [cosine(t) for t in range(20)], abs=1e-12)


def test_jagged_cosine_schedule_steps_the_learning_rate_and_checkpoints():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = jagged_cosine_schedule(optimizer, total_steps=12, reset_every=4, restart_warmup=2)
    f = JaggedCosine(12, 4, 2)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5 * f(t) for t in range(7)])
    again = jagged_cosine_schedule(torch.optim.SGD([param], lr=0.5), total_steps=12, reset_every=4,
                                   restart_warmup=2)
    again.load_state_dict(scheduler.state_dict())
    assert again.lr_lambdas[0] == f and again.last_epoch == 7


# ---------------------------------------------------------------------------------- callback
class _LRs(Callback):
    """The learning rate of every optimizer step, and the ReLoRA resets seen after each."""

    def __init__(self):
        self.lrs, self.resets = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.resets.append((trainer.global_step, relora_resets(pl_module)))


def _counting_loader(n=16, seq=12, batch_size=4):
    """Sequences that count up (mod 96) from different starts: the next token is learnable."""
    ids = (torch.arange(n).unsqueeze(1) * 5 + torch.arange(seq)) % _lit.VOCAB
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def _mean_loss(module):
    module.eval()
    with torch.no_grad():
        loss = sum(float(module._loss(batch)) for batch in _counting_loader()) / 4
    module.train()
    return loss


def test_callback_trains_a_tiny_model_with_resets_and_the_jagged_cosine(tmp_path):
    torch.manual_seed(0)
    module = _lit.TinyLM(lr=1e-2)
    base = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    start = _mean_loss(module)
    spy = _LRs()
    callback = ReLoRACallback(r=4, target_modules="all-linear", reset_every=8, restart_warmup=2,
                              warmup_steps=2, min_lr_ratio=0.1)
    trainer = _lit.trainer(tmp_path, max_steps=32, callbacks=[callback, spy])
    trainer.fit(module, _counting_loader())
    assert _mean_loss(module) < 0.95 * start  # 4.57 -> 4.27
    assert relora_resets(module) == 4  # after steps 8, 16, 24, 32
    assert [r for s, r in spy.resets if s % 8 == 1] == [0, 1, 2, 3]
    f = JaggedCosine(32, 8, 2, 2, 0.1)
    assert spy.lrs == pytest.approx([1e-2 * f(t) for t in range(32)])
    adapted = {f"{n}.base_layer.weight".removeprefix("model.") for n, _ in relora_layers(module)}
    for name, param in module.model.named_parameters():
        if name in adapted:  # the resets merged the cycles' updates into the base
            assert not torch.equal(param, base[name.replace(".base_layer", "")]), name
        elif name in base:
            assert torch.equal(param, base[name]), name


def test_callback_replaces_a_module_scheduler_with_a_warning_or_keeps_it(tmp_path):
    class Scheduled(_lit.TinyLM):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": optimizer, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5), "interval": "step"}}

    spy = _LRs()
    trainer = _lit.trainer(tmp_path, max_steps=4, callbacks=[ReLoRACallback(r=2, reset_every=2,
                                                                            restart_warmup=1), spy])
    with pytest.warns(UserWarning, match=r"replaces the module's learning-rate scheduler \(StepLR\)"):
        trainer.fit(Scheduled(), _lit.loader())
    assert spy.lrs == pytest.approx([0.1 * JaggedCosine(4, 2, 1)(t) for t in range(4)])
    spy = _LRs()
    trainer = _lit.trainer(tmp_path, max_steps=4, callbacks=[
        ReLoRACallback(r=2, reset_every=2, restart_warmup=1, lr_schedule="module"), spy])
    trainer.fit(Scheduled(), _lit.loader())
    assert spy.lrs == pytest.approx([0.1, 0.05, 0.025, 0.0125])


def test_gradient_accumulation_resets_once_per_cycle(tmp_path):
    spy = _LRs()
    module = _lit.TinyLM()
    trainer = _lit.trainer(tmp_path, max_steps=6, accumulate_grad_batches=2, callbacks=[
        ReLoRACallback(r=2, reset_every=3, restart_warmup=1), spy])
    trainer.fit(module, _lit.loader())
    assert relora_resets(module) == 2 and len(spy.lrs) == 6


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class _AfterReset(Callback):
    """The parameters when training starts, and the ReLoRA A right after the reset at ``step``."""

    def __init__(self, step):
        self.step, self.start, self.fresh_a = step, None, None

    def on_train_start(self, trainer, pl_module):
        self.start = (_params(pl_module), relora_resets(pl_module))

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            self.fresh_a = {n: m.lora_A.detach().clone() for n, m in relora_layers(pl_module)}


def test_checkpoints_hold_the_merged_bases_and_resume_exactly(tmp_path):
    def callback():
        return ReLoRACallback(r=2, target_modules=["q_proj", "v_proj"], reset_every=3, restart_warmup=1,
                              total_steps=8)

    torch.manual_seed(0)
    straight, spy = _lit.TinyLM(), _AfterReset(6)
    _lit.trainer(tmp_path / "a", max_steps=8, callbacks=[callback(), spy]).fit(straight, _lit.loader())

    torch.manual_seed(0)
    first = _lit.TinyLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    _lit.trainer(tmp_path / "b", max_steps=4, callbacks=[callback(), ckpt],
                 enable_checkpointing=True).fit(first, _lit.loader())
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    adapted = {f"{n}.base_layer.weight" for n, _ in relora_layers(first)}
    adapters = {f"{n}.{a}" for n, _ in relora_layers(first) for a in ("lora_A", "lora_B")}
    assert set(state) == adapted | adapters and len(adapted) == 4  # no other frozen tensor

    torch.manual_seed(123)  # another process state: the resets' A come from the checkpointed seed
    resumed, again = _lit.TinyLM(), _AfterReset(6)
    _lit.trainer(tmp_path / "c", max_steps=8, callbacks=[callback(), again]).fit(
        resumed, _lit.loader(), ckpt_path=ckpt.last_model_path)
    params, resets = again.start
    assert resets == 1  # the reset after step 3
    expected = _params(first)  # the merged bases, the adapters and the untouched rest
    assert params.keys() == expected.keys()
    assert all(torch.equal(params[n], expected[n]) for n in expected)
    assert again.fresh_a.keys() == spy.fresh_a.keys()
    assert all(torch.equal(again.fresh_a[n], spy.fresh_a[n]) for n in spy.fresh_a)  # same A after step 6
    assert relora_resets(resumed) == 2

    # a checkpoint without the merged bases is refused before anything loads
    broken = torch.load(ckpt.last_model_path, weights_only=True)
    missing = sorted(adapted)[0]
    del broken["state_dict"][missing]
    torch.save(broken, tmp_path / "broken.ckpt")
    victim = _lit.TinyLM()
    with pytest.raises(ValueError, match=rf"1 missing \({missing}\).*also holds the base weights"):
        _lit.trainer(tmp_path / "d", callbacks=[callback()]).validate(
            victim, _lit.loader(n=4), ckpt_path=tmp_path / "broken.ckpt")


def test_a_run_resumed_at_a_reset_step_under_accumulation_does_not_reset_again(tmp_path):
    """With ``accumulate_grad_batches=2`` the first batch of a run resumed from the checkpoint of
    reset step 2 still sees ``global_step == 2``: it used to reset a second time (3 resets counted,
    not 2). The resumed run now ends where the uninterrupted one ends, counts included."""
    def fit(steps, root, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        module = _lit.TinyLM()
        callback = ReLoRACallback(r=2, target_modules=["q_proj", "v_proj"], reset_every=2, restart_warmup=1,
                                  total_steps=4)
        _lit.trainer(root, max_steps=steps, accumulate_grad_batches=2, callbacks=[callback, *callbacks],
                     enable_checkpointing=bool(callbacks)).fit(module, _lit.loader(), ckpt_path=ckpt_path)
        return module

    straight = fit(4, tmp_path / "a")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=2, save_top_k=-1)
    fit(2, tmp_path / "b", callbacks=[ckpt])
    resumed = fit(4, tmp_path / "c", ckpt_path=tmp_path / "b" / "epoch=0-step=2.ckpt")
    assert relora_resets(straight) == relora_resets(resumed) == 2
    want = _params(straight)
    assert all(torch.equal(p, want[n]) for n, p in _params(resumed).items())


def test_adapter_written_after_a_reset_comes_with_a_warning(tmp_path):
    module = _lit.TinyLM()
    callback = ReLoRACallback(r=2, reset_every=2, restart_warmup=1, adapter_dir=str(tmp_path / "early"))
    _lit.trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, _lit.loader())
    assert (tmp_path / "early" / "adapter_model.safetensors").exists()  # no reset yet: no warning
    callback = ReLoRACallback(r=2, reset_every=2, restart_warmup=1)
    _lit.trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(_lit.TinyLM(), _lit.loader())
    with pytest.warns(UserWarning, match=r"1 reset\(s\) merged .* last cycle's LoRA over that merged base"):
        callback.save_adapter(tmp_path / "late")


def test_reset_on_a_bf16_base_rounds_once():
    model = apply_relora(_tiny.llama().to(torch.bfloat16), r=2, target_modules=["q_proj"], reset_every=5,
                         restart_warmup=1)
    _randomize(model)
    layer = relora_layers(model)[0][1]
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    delta = (layer.lora_B @ layer.lora_A) * layer.scaling  # fp32
    expected = (layer.base_layer.weight.float() + delta).to(torch.bfloat16)
    twice = layer.base_layer.weight + delta.to(torch.bfloat16)
    assert not torch.equal(expected, twice)  # rounding the update first would differ
    relora_reset(model)
    assert torch.equal(layer.base_layer.weight, expected)


def test_dora_is_refused():
    with pytest.raises(ValueError, match="^use_dora must be False for ReLoRA"):
        ReLoRAConfig(use_dora=True)
    model = apply_lora(_tiny.llama(), r=2, use_dora=True)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*: DoRA layers; a ReLoRA reset"):
        apply_relora(model, r=2)
    assert not relora_layers(model) and all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
