"""LoRACallback inside Lightning: injection timing, freezing, checkpoints, resume, precision, CLI."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from lightning_peft import LoRACallback, LoRALinear
from lightning_peft._base import adapter_named_parameters
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
    with pytest.raises(ValueError, match=r"missing \(e\.g\. \['model\.model\.layers\.0\.self_attn\.k_proj"):
        trainer2.fit(other, _lit.loader(), ckpt_path=ckpt.last_model_path)
    for name, tensor in other.state_dict().items():  # nothing was loaded
        if "lora_" not in name:
            assert torch.equal(tensor, before[name.replace(".base_layer", "")])


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
def test_bf16_precisions(tmp_path, precision):
    module = _lit.TinyLM()
    trainer = _lit.trainer(tmp_path, callbacks=[LoRACallback(r=4)], precision=precision, max_steps=3)
    trainer.fit(module, _lit.loader())
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in layers)
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert all(m.lora_A.dtype == expected for m in layers)


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
