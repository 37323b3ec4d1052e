"""LoRACallback inside Lightning: injection timing, freezing, checkpoints, resume, precision, CLI."""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from lightning_peft import LoRACallback, LoRALinear, apply_lora, merge_adapters, unmerge_adapters
from lightning_peft._base import adapter_named_buffers, adapter_named_parameters
from tests import _lit


def _adapters(module):
    return {n: p.detach().clone() for n, p in adapter_named_parameters(module)}


def _frozen(module):
    keep = {n for n, _ in adapter_named_parameters(module)}
    return {n: t.detach().clone() for n, t in module.state_dict().items() if n not in keep}


class _Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.metrics = {}

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize("in_configure_model", [False, True])
def test_fit_trains_only_adapters(tmp_path, in_configure_model):
    module = _lit.TinyLM(build_in_configure_model=in_configure_model)
    if not in_configure_model:
        base_before = {n: t.clone() for n, t in module.state_dict().items()}
    recorder = _Recorder()
    trainer = _lit.trainer(tmp_path, logger=recorder, callbacks=[LoRACallback(r=4)])
    trainer.fit(module, _lit.loader())
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4  # q_proj, v_proj in 2 layers
    # the optimizer holds exactly the adapters
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]
                  if p.requires_grad}
    assert opt_params == {id(p) for _, p in adapter_named_parameters(module)}
    # the adapters moved, nothing else did
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in layers)
    if not in_configure_model:
        for name, tensor in module.state_dict().items():
            if "lora_" not in name:
                old = base_before[name.replace(".base_layer", "")]
                assert torch.equal(tensor, old), name
    assert recorder.metrics["peft/trainable_params"] == sum(p.numel() for _, p in
                                                            adapter_named_parameters(module))
    assert recorder.metrics["peft/total_params"] == sum(p.numel() for p in module.parameters())


def test_idempotent_over_repeated_stages(tmp_path):
    module = _lit.TinyLM(build_in_configure_model=True)
    cb = LoRACallback(r=4)
    trainer = _lit.trainer(tmp_path, callbacks=[cb], max_steps=2)
    trainer.fit(module, _lit.loader(), _lit.loader(n=4))
    ids = [id(p) for p in module.parameters()]
    trainer.validate(module, _lit.loader(n=4))
    trainer.test(module, _lit.loader(n=4))
    trainer2 = _lit.trainer(tmp_path, callbacks=[cb], max_steps=2)
    trainer2.fit(module, _lit.loader())
    assert [id(p) for p in module.parameters()] == ids
    assert module.configure_model_calls == 4  # fit, validate, test, fit
    assert "configure_model" not in module.__dict__  # unwrapped in teardown
    assert sum(isinstance(m, LoRALinear) for m in module.modules()) == 4


@pytest.mark.parametrize("weights_only", [False, True])
def test_checkpoints_hold_only_adapters_and_are_small(tmp_path, weights_only):
    def run(callbacks, root):
        module = _lit.TinyLM(hidden=64, vocab=512)
        ckpt = ModelCheckpoint(dirpath=root, save_weights_only=weights_only, save_last=True)
        trainer = _lit.trainer(root, callbacks=[*callbacks, ckpt], enable_checkpointing=True,
                               max_steps=2)
        trainer.fit(module, _lit.loader(vocab=512))
        return module, Path(ckpt.last_model_path)

    module, path = run([LoRACallback(r=2)], tmp_path / "lora")
    state = torch.load(path, weights_only=True)["state_dict"]
    assert set(state) == {n for n, _ in adapter_named_parameters(module)}
    _, full_path = run([], tmp_path / "full")
    assert full_path.stat().st_size > 20 * path.stat().st_size


def test_resume_from_ckpt_path_restores_adapters_and_optimizer(tmp_path):
    module = _lit.TinyLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4), ckpt], enable_checkpointing=True,
                           max_steps=3)
    trainer.fit(module, _lit.loader())
    trained = _adapters(module)
    opt_state = trainer.optimizers[0].state_dict()

    seen = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["adapters"] = _adapters(pl_module)
            seen["opt"] = copy.deepcopy(trainer.optimizers[0].state_dict())

    resumed = _lit.TinyLM(seed=5)  # different base init: only the adapters come from the ckpt
    trainer2 = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4), Spy()], max_steps=5)
    trainer2.fit(resumed, _lit.loader(), ckpt_path=ckpt.last_model_path)
    assert seen["adapters"].keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(seen["adapters"][name], value), name
    assert trainer2.global_step == 5
    steps = [s["step"] for s in seen["opt"]["state"].values()]
    assert steps and all(float(s) == 3 for s in steps)
    assert len(seen["opt"]["state"]) == len(opt_state["state"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_bit_exact_with_shared_input_fusion(dropout, tmp_path):
    """q/k/v (and gate/up) fuse their LoRA branches from the second pass on, once the groups have
    seen them read one tensor, and the fused backward sums the input gradient in another order:
    checkpoints keep what the groups learned, so a run resumed at step 4 fuses from its first
    step, as the uninterrupted run did there, and ends bit for bit where that run ends (it
    used to differ in the last bits). With dropout too: the callback state holds torch's random
    state, which the masks draw from and Lightning's checkpoints do not hold."""
    from lightning_peft.methods import _grouping

    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]

    def fit(steps, ckpt_path=None, callbacks=()):
        module = _lit.TinyLM()
        lora = LoRACallback(r=4, target_modules=targets, dropout=dropout)
        trainer = _lit.trainer(tmp_path, callbacks=[lora, *callbacks],
                               enable_checkpointing=bool(callbacks), max_steps=steps)
        trainer.fit(module, _lit.loader(), ckpt_path=ckpt_path)
        return module

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    whole = fit(8, callbacks=[ckpt])
    path = tmp_path / "epoch=0-step=4.ckpt"
    shared = torch.load(path, weights_only=True)["callbacks"]
    (state,) = [v for k, v in shared.items() if k.startswith("LoRACallback")]
    assert len(state["shared_input"]) == 4  # q/k/v and gate/up of two layers
    assert all(entry["first"] in entry["fused"] for entry in state["shared_input"].values())
    resumed = fit(8, ckpt_path=path)
    assert _grouping.learned_state(resumed) == _grouping.learned_state(whole)
    want, got = _adapters(whole), _adapters(resumed)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_resume_mid_epoch_with_the_data_module_is_bit_exact(tmp_path):
    """LoRA with dropout on the shipped data module and task, resumed from a checkpoint in the
    middle of the second epoch: the loader resumes after the consumed batches (it used to restart
    the epoch) and the run ends bit for bit where the uninterrupted run ends."""
    from lightning_peft.data import InstructionDataModule
    from lightning_peft.tasks import CausalLMModule
    from tests import _tiny
    from tests.test_data import RECORDS

    tok = _tiny.tokenizer([r["instruction"] + " " + r.get("input", "") + " " + r["output"]
                           for r in RECORDS], 400, True)

    def fit(ckpt_path=None, callbacks=()):
        module = CausalLMModule(_tiny.llama(0, vocab=len(tok)), lr=1e-2, warmup_steps=2)
        trainer = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4, dropout=0.1), *callbacks],
                               enable_checkpointing=bool(callbacks), max_steps=-1, max_epochs=2)
        trainer.fit(module, datamodule=InstructionDataModule(tok, RECORDS, batch_size=3, seed=1),
                    ckpt_path=ckpt_path)
        return module

    whole = fit(callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)])
    resumed = fit(ckpt_path=tmp_path / "epoch=1-step=4.ckpt")  # 3 batches an epoch: epoch 1's second
    want, got = _adapters(whole), _adapters(resumed)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_resume_with_wrong_checkpoint_names_the_tensors(tmp_path):
    module = _lit.TinyLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4), ckpt], enable_checkpointing=True,
                           max_steps=1)
    trainer.fit(module, _lit.loader())
    other = _lit.TinyLM()
    before = {n: t.clone() for n, t in other.state_dict().items()}
    trainer2 = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4, target_modules=["q_proj", "k_proj"])],
                            max_steps=2)
    with pytest.raises(ValueError, match=r"4 missing \(model\.model\.layers\.0\.self_attn\.k_proj.*"
                                         r"target_modules: None in the checkpoint, \['q_proj', 'k_proj'\]"):
        trainer2.fit(other, _lit.loader(), ckpt_path=ckpt.last_model_path)
    for name, tensor in other.state_dict().items():  # nothing was loaded
        if "lora_" not in name:
            assert torch.equal(tensor, before[name.replace(".base_layer", "")])


def test_save_checkpoint_after_fit_is_adapter_only_and_full_files_keep_the_base(tmp_path):
    """``trainer.save_checkpoint`` after a fit with ``merge_on_fit_end`` (the module's hooks are
    gone after teardown) writes the adapter only, as during fit (it wrote the whole model, merged
    base included); a checkpoint that holds frozen base tensors (such a file, or one written
    without the callback) loads its adapter and leaves the model's base as it is, with a warning
    (the merged base was loaded and the update applied twice)."""
    module = _lit.TinyLM()
    base = _frozen(module)
    trainer = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4, merge_on_fit_end=True)], max_steps=2)
    trainer.fit(module, _lit.loader())
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    state = torch.load(tmp_path / "after.ckpt", weights_only=True)["state_dict"]
    assert set(state) == set(_adapters(module))
    ids = torch.randint(0, _lit.VOCAB, (2, 6))
    module.eval()
    with torch.no_grad():
        trained = module(ids)

    full = torch.load(tmp_path / "after.ckpt", weights_only=True)
    full["state_dict"] = {k: v.clone() for k, v in module.state_dict().items()}  # merged base too
    assert any("base_layer" in k for k in full["state_dict"])
    torch.save(full, tmp_path / "full.ckpt")
    for name in ("after.ckpt", "full.ckpt"):
        fresh = _lit.TinyLM()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4)]).validate(
                fresh, _lit.loader(n=4), ckpt_path=tmp_path / name, verbose=False)
        ignored = [w for w in caught if "frozen base tensor(s)" in str(w.message)]
        assert bool(ignored) == (name == "full.ckpt"), name
        assert all(torch.equal(t, base[k.replace(".base_layer", "")])
                   for k, t in _frozen(fresh).items()), name
        fresh.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids), trained, rtol=1e-5, atol=1e-5)


def test_merge_on_fit_end(tmp_path):
    module = _lit.TinyLM()
    trainer = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4, merge_on_fit_end=True)], max_steps=2)
    trainer.fit(module, _lit.loader())
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.merged for m in layers)
    ids = torch.randint(0, _lit.VOCAB, (2, 6))
    merged = module(ids)
    for m in layers:
        m.unmerge()
    torch.testing.assert_close(module(ids), merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_keep_fp32_adapters_and_bf16_true_leaves_the_base_alone(tmp_path, precision):
    """"bf16-true" casts the whole module to bf16 after injection: the adapters are put back to
    fp32 (their values exactly, Parameter objects kept) and train; every other tensor is the
    original one cast to bf16 and does not move."""
    module = _lit.TinyLM()
    cb = LoRACallback(r=4)
    apply_lora(module, config=cb.config)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    ids = {n: id(p) for n, p in module.named_parameters()}
    trainer = _lit.trainer(tmp_path, callbacks=[cb], precision=precision, max_steps=3)
    trainer.fit(module, _lit.loader())
    adapters = dict(adapter_named_parameters(module))
    assert len(adapters) == 8
    assert {n: id(p) for n, p in module.named_parameters()} == ids
    base = torch.bfloat16 if precision == "bf16-true" else torch.float32
    for name, param in module.named_parameters():
        if name in adapters:
            assert param.dtype == torch.float32, name
            assert not torch.equal(param, before[name]), name
        else:
            assert param.dtype == base, name
            assert torch.equal(param, before[name].to(base)), name
    assert trainer.optimizers[0].state[adapters[next(iter(adapters))]]["exp_avg"].dtype == torch.float32


def test_bf16_true_resume_restores_the_fp32_adapters_exactly(tmp_path):
    module = _lit.TinyLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4), ckpt], enable_checkpointing=True,
                 precision="bf16-true", max_steps=2).fit(module, _lit.loader())
    saved = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert {t.dtype for t in saved.values()} == {torch.float32}
    seen = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(_adapters(pl_module))

    _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4), Spy()], precision="bf16-true",
                 max_steps=3).fit(_lit.TinyLM(), _lit.loader(), ckpt_path=ckpt.last_model_path)
    assert seen.keys() == saved.keys()
    for name, value in saved.items():
        assert seen[name].dtype == torch.float32 and torch.equal(seen[name], value), name


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qlora_adapters_keep_their_compute_dtype_through_bf16_true(compute_dtype, tmp_path):
    """QLoRA's adapters train in ``compute_dtype``: "bf16-true" casts the whole module, and fp32
    adapters used to come out of it bf16; they are put back, as LoRA's fp32 adapters are."""
    from lightning_peft import QLoRACallback

    module = _lit.TinyLM()
    _lit.trainer(tmp_path, max_steps=2, precision="bf16-true",
                 callbacks=[QLoRACallback(r=4, compute_dtype=compute_dtype)]).fit(module, _lit.loader())
    adapters = _adapters(module)
    assert adapters and {t.dtype for t in adapters.values()} == {compute_dtype}


def test_state_dict_and_state_key():
    a, b = LoRACallback(r=4), LoRACallback(r=8, target_modules=["k_proj"])
    assert a.state_dict()["config"]["r"] == 4
    assert a.state_key != b.state_key
    with pytest.raises(ValueError, match="^r must be"):
        LoRACallback(r=0)


def test_lightning_cli_builds_callback_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_peft.LoRACallback\n"
        "      init_args:\n"
        "        r: 4\n"
        "        alpha: 8\n"
        "        target_modules: [q_proj, k_proj]\n"
        "        use_rslora: true\n"
    )
    cli = LightningCLI(_lit.TinyLM, run=False, args=["--config", str(config)],
                       save_config_kwargs={"overwrite": True})
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRACallback)]
    assert cb.config.r == 4 and cb.config.alpha == 8 and cb.config.use_rslora
    assert cb.config.target_modules == ["q_proj", "k_proj"]


DDP_SCRIPT = Path(__file__).with_name("_ddp_run.py")


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for devices, batch in ((1, 8), (2, 4)):
        out = tmp_path / f"adapters_{devices}.safetensors"
        subprocess.run([sys.executable, str(DDP_SCRIPT), str(devices), str(batch), str(out)],
                       check=True, env=env, cwd=tmp_path, timeout=300)
    from safetensors.torch import load_file

    one, two = load_file(tmp_path / "adapters_1.safetensors"), load_file(tmp_path / "adapters_2.safetensors")
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    assert any(torch.count_nonzero(v) > 0 for k, v in one.items() if "lora_B" in k)


def test_adapter_dir_written_at_fit_end_and_loads_back(tmp_path):
    from lightning_peft import load_adapter
    from tests import _tiny

    module = _lit.TinyLM()
    cb = LoRACallback(r=4, adapter_dir=str(tmp_path / "adapter"))
    _lit.trainer(tmp_path, callbacks=[cb], max_steps=2).fit(module, _lit.loader())
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    fresh = load_adapter(_tiny.llama(0), tmp_path / "adapter")
    ids = torch.randint(0, _lit.VOCAB, (2, 6))
    module.eval()
    torch.testing.assert_close(fresh(ids).logits, module(ids), rtol=0, atol=1e-6)
    assert cb.save_adapter(tmp_path / "again") == tmp_path / "again"
    with pytest.raises(RuntimeError, match="after"):
        LoRACallback().save_adapter(tmp_path / "x")


# -- the callback leaves no trace on the module ----------------------------------------------------
_HOOKS = ("on_save_checkpoint", "on_load_checkpoint", "configure_model")


def _assert_no_trace(module, tmp_path):
    """No hook wrapper or marker is left on the module, ``strict_loading`` is back to Lightning's
    default, and a plain Trainer checkpoints (and strictly reloads) every tensor of the module."""
    assert [k for k in module.__dict__ if k in _HOOKS or "peft" in k] == []
    assert module._strict_loading is None and module.strict_loading
    trainer = _lit.trainer(tmp_path / "plain")
    trainer.validate(module, _lit.loader(n=4))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    state = torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"]
    assert set(state) == set(module.state_dict())
    _lit.trainer(tmp_path / "plain").validate(module, _lit.loader(n=4), ckpt_path=tmp_path / "plain.ckpt")


class _FailOnce(_lit.TinyLM):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fail = True

    def training_step(self, batch, batch_idx):
        if self.fail:
            self.fail = False
            raise RuntimeError("boom in training_step")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("where", ["setup", "configure_model", "training_step"])
def test_failed_fit_leaves_no_trace_and_wrappers_never_pile_up(tmp_path, where):
    if where == "training_step":
        module, cb, error = _FailOnce(), LoRACallback(r=4), r"boom"
    else:
        module = _lit.TinyLM(build_in_configure_model=where == "configure_model")
        cb, error = LoRACallback(r=4, target_modules=["nope"]), r"nope"
    with pytest.raises((ValueError, RuntimeError), match=error):
        _lit.trainer(tmp_path, callbacks=[cb]).fit(module, _lit.loader())
    _assert_no_trace(module, tmp_path / "after_failure")
    # a new callback on the same module wraps afresh, and undoes its own wrapping only
    saves = []
    module.on_save_checkpoint = lambda checkpoint: saves.append(1)  # a hook the user set on the instance
    user_hook = module.__dict__["on_save_checkpoint"]
    for i in range(2):
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ok{i}", save_last=True)
        _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4), ckpt], enable_checkpointing=True,
                     max_steps=1).fit(module, _lit.loader())
        assert module.__dict__["on_save_checkpoint"] is user_hook
        assert set(torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]) == \
            {n for n, _ in adapter_named_parameters(module)}
    assert len(saves) == 2 * 2  # once per save: ModelCheckpoint's step save and its "last" copy
    del module.on_save_checkpoint
    _assert_no_trace(module, tmp_path / "after_success")


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict"])
def test_every_stage_restores_the_module(tmp_path, stage):
    module = _lit.TinyLM(build_in_configure_model=True)
    trainer = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4)], max_steps=1)
    getattr(trainer, stage)(module, _lit.loader(n=4))
    assert sum(isinstance(m, LoRALinear) for m in module.modules()) == 4
    _assert_no_trace(module, tmp_path)


def test_two_peft_callbacks_on_one_module_are_refused_naming_both(tmp_path):
    module = _lit.TinyLM()
    before = {n: t.clone() for n, t in module.state_dict().items()}
    callbacks = [LoRACallback(r=4), LoRACallback(r=8, target_modules=["k_proj"])]
    with pytest.raises(ValueError, match=r"(?s)more than one PEFT callback on one module: "
                                         r"LoRACallback\(r=4,.* and LoRACallback\(r=8,.*'k_proj'"):
        _lit.trainer(tmp_path, callbacks=callbacks).fit(module, _lit.loader())
    assert not any(isinstance(m, LoRALinear) for m in module.modules())
    assert all(torch.equal(t, before[n]) for n, t in module.state_dict().items())
    _assert_no_trace(module, tmp_path)


# -- a checkpoint means one adapter ----------------------------------------------------------------
STAGES = ["fit", "validate", "test", "predict"]


def _fit_checkpoint(root, callback, module=None, weights_only=False, **trainer_kwargs) -> Path:
    """Fit ``module`` (a TinyLM by default) one step with ``callback``; the last checkpoint's path."""
    ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_weights_only=weights_only)
    kwargs = {"max_steps": 1, **trainer_kwargs}
    _lit.trainer(root, callbacks=[callback, ckpt], enable_checkpointing=True, **kwargs).fit(
        _lit.TinyLM() if module is None else module, _lit.loader())
    return Path(ckpt.last_model_path)


def _run(stage, tmp_path, module, callback, ckpt_path, **trainer_kwargs):
    trainer = _lit.trainer(tmp_path, callbacks=[callback], **{"max_steps": 2, **trainer_kwargs})
    return getattr(trainer, stage)(module, _lit.loader(n=4), ckpt_path=ckpt_path)


def _refused_untouched(stage, tmp_path, callback, ckpt_path, match):
    """Run ``stage`` from ``ckpt_path`` on a fresh TinyLM (its adapters already injected): refused
    with ``match``, every tensor of the module bit-identical, no trace left."""
    module = apply_lora(_lit.TinyLM(seed=3), config=callback.config)
    before = {n: t.clone() for n, t in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        _run(stage, tmp_path, module, callback, ckpt_path)
    assert module.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[n]) for n, t in module.state_dict().items())
    assert [k for k in module.__dict__ if k in _HOOKS] == [] and module._strict_loading is None


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "weights_only"])
def test_checkpoint_with_more_adapter_tensors_is_refused(tmp_path, stage, weights_only):
    path = _fit_checkpoint(tmp_path / "qv", LoRACallback(r=4), weights_only=weights_only)  # q_proj, v_proj
    config = "" if weights_only else r".*target_modules: None in the checkpoint"  # no callback state
    _refused_untouched(stage, tmp_path, LoRACallback(r=4, target_modules=["q_proj"]), path,
                       r"4 unexpected \(model\.model\.layers\.0\.self_attn\.v_proj\.lora_A.*"
                       r"Nothing was loaded" + config)


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_with_fewer_adapter_tensors_is_refused(tmp_path, stage):
    path = _fit_checkpoint(tmp_path / "q", LoRACallback(r=4, target_modules=["q_proj"]))
    _refused_untouched(stage, tmp_path, LoRACallback(r=4, target_modules=["q_proj", "v_proj"]), path,
                       r"4 missing \(model\.model\.layers\.0\.self_attn\.v_proj\.lora_A")


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_written_with_another_config_is_refused_naming_the_fields(tmp_path, stage):
    path = _fit_checkpoint(tmp_path / "a16", LoRACallback(r=4, alpha=16, use_rslora=False))
    _refused_untouched(stage, tmp_path, LoRACallback(r=4, alpha=64, use_rslora=True), path,
                       r"LoRACallback config: alpha: 16 in the checkpoint, 64 in this run; "
                       r"use_rslora: False in the checkpoint, True in this run")


def test_checkpoint_with_same_adapter_loads_in_every_stage(tmp_path):
    """The positive side of the checks above: same config (dropout may differ, it only changes
    training) -> every stage runs on the checkpoint's adapters."""
    path = _fit_checkpoint(tmp_path / "ok", LoRACallback(r=4, dropout=0.0))
    saved = torch.load(path, weights_only=True)["state_dict"]
    for stage in STAGES:
        module = _lit.TinyLM(seed=3)
        _run(stage, tmp_path, module, LoRACallback(r=4, dropout=0.1), path, max_steps=1)
        if stage != "fit":
            assert all(torch.equal(_adapters(module)[n], t) for n, t in saved.items()), stage


# -- merged models -----------------------------------------------------------------------------------
def _base_weights(module):
    return {n: m.base_layer.weight.detach().clone() for n, m in module.named_modules()
            if isinstance(m, LoRALinear)}


def test_second_fit_after_merge_unmerges_trains_and_merges_again(tmp_path):
    module = _lit.TinyLM()
    cb = LoRACallback(r=4, merge_on_fit_end=True)
    apply_lora(module, config=cb.config)
    w0 = _base_weights(module)
    _lit.trainer(tmp_path, callbacks=[cb], max_steps=2).fit(module, _lit.loader())
    first = _adapters(module)
    assert all(m.merged for m in module.modules() if isinstance(m, LoRALinear))
    _lit.trainer(tmp_path, callbacks=[cb], max_steps=2).fit(module, _lit.loader(seed=1))
    second = _adapters(module)
    assert all(not torch.equal(second[n], first[n]) for n in first if "lora_B" in n)
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.merged for m in layers)
    ids = torch.randint(0, _lit.VOCAB, (2, 6))
    module.eval()
    merged = module(ids)
    unmerge_adapters(module)
    assert all(torch.equal(w, w0[n]) for n, w in _base_weights(module).items())
    torch.testing.assert_close(module(ids), merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["validate", "fit"])
def test_ckpt_path_into_a_merged_model_loads_into_the_unmerged_layers(tmp_path, stage):
    path = _fit_checkpoint(tmp_path / "a", LoRACallback(r=4), max_steps=2)
    reference = apply_lora(_lit.TinyLM(), config=LoRACallback(r=4).config)
    reference.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=False)
    module = _lit.TinyLM()  # same base as the checkpoint's run, other adapters, merged
    cb = LoRACallback(r=4, merge_on_fit_end=True)
    apply_lora(module, config=cb.config)
    w0 = _base_weights(module)
    _lit.trainer(tmp_path, callbacks=[cb], max_steps=2).fit(module, _lit.loader(seed=3))
    if stage == "validate":
        (result,) = _run("validate", tmp_path, module, cb, path)
        (expected,) = _lit.trainer(tmp_path).validate(reference, _lit.loader(n=4))
        assert result["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
        assert all(torch.equal(_adapters(module)[n], t) for n, t in _adapters(reference).items())
    else:
        _run("fit", tmp_path, module, cb, path, max_steps=4)  # resumes at step 2, trains 2 more
        assert all(not torch.equal(_adapters(module)[n], t) for n, t in _adapters(reference).items()
                   if "lora_B" in n)
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert all(m.merged for m in layers)  # as it came in
    ids = torch.randint(0, _lit.VOCAB, (2, 6))
    module.eval()
    merged = module(ids)
    unmerge_adapters(module)
    assert all(torch.equal(w, w0[n]) for n, w in _base_weights(module).items())
    torch.testing.assert_close(module(ids), merged, rtol=1e-5, atol=1e-5)
    if stage == "validate":
        reference.eval()
        torch.testing.assert_close(merged, reference(ids), rtol=1e-5, atol=1e-5)
    merge_adapters(module)


# -- buffers of modules trained in full ----------------------------------------------------------------
def test_modules_to_save_buffers_are_checkpointed_checked_and_resumed(tmp_path):
    def callback():
        return LoRACallback(r=2, target_modules=["fc1", "fc2"], modules_to_save=["bn"])

    module = _lit.TinyBN()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _lit.trainer(tmp_path, callbacks=[callback(), ckpt], enable_checkpointing=True, max_steps=3).fit(
        module, _lit.regression_loader())
    buffers = {n: b.clone() for n, b in adapter_named_buffers(module)}
    assert set(buffers) == {"bn.modules_to_save.running_mean", "bn.modules_to_save.running_var",
                            "bn.modules_to_save.num_batches_tracked"}
    assert int(buffers["bn.modules_to_save.num_batches_tracked"]) == 3
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert set(state) == set(buffers) | {n for n, _ in adapter_named_parameters(module)}
    seen = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({n: b.clone() for n, b in adapter_named_buffers(pl_module)})

    _lit.trainer(tmp_path, callbacks=[callback(), Spy()], max_steps=4).fit(
        _lit.TinyBN(seed=1), _lit.regression_loader(), ckpt_path=ckpt.last_model_path)
    assert seen.keys() == buffers.keys()
    assert all(torch.equal(seen[n], b) for n, b in buffers.items())
    # a checkpoint without the running statistics is refused, naming them
    del state["bn.modules_to_save.running_var"]
    torch.save({**torch.load(ckpt.last_model_path, weights_only=True), "state_dict": state},
               tmp_path / "no_stats.ckpt")
    fresh = _lit.TinyBN(seed=1)
    with pytest.raises(ValueError, match=r"1 missing \(bn\.modules_to_save\.running_var\)"):
        _lit.trainer(tmp_path, callbacks=[callback()], max_steps=4).fit(
            fresh, _lit.regression_loader(), ckpt_path=tmp_path / "no_stats.ckpt")


def test_adapters_with_dropout_starting_training_in_eval_mode_warn(tmp_path):
    """transformers' from_pretrained returns eval mode and Lightning keeps submodules' modes, so
    LoRA layers injected into such a model trained without their dropout, silently (the README's
    quickstart did); the callback now says so, and a model put in train mode trains with it."""
    for train_mode in (False, True):
        module = _lit.TinyLM()
        module.model.train(train_mode)
        trainer = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=2, dropout=0.1)], max_steps=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, _lit.loader(n=4))
        said = [w for w in caught if "start training in eval mode" in str(w.message)]
        assert bool(said) == (not train_mode)
