"""Sharded training on CPU: FSDP2 (``fully_shard``) and FSDP1 on 2 gloo processes
(tests/_fsdp_run.py, started once for every scenario), and the shardable 4-bit layer in one process.

Tolerance of the 2-process runs against one process over the same global batch: rtol 1e-4,
atol 1e-5 (fp32; the two ranks' gradients are averaged in another order than one process sums)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_peft import trainable_parameters
from lightning_peft.fsdp import ShardableNF4Linear, clean_name, is_sharded, prepare_nf4_for_fsdp
from lightning_peft.methods.qlora import NF4Linear, apply_qlora
from tests import _tiny

torch.set_num_threads(1)
SCRIPT = Path(__file__).with_name("_fsdp_run.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), str(out), str(_free_port())], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("scenario", ["fsdp2_lora", "fsdp2_qlora", "fsdp1_lora", "fsdp1_qlora"])
def test_two_processes_train_save_and_resume_like_one(two_process_results, scenario):
    """Only adapters get gradients, the base stays bit-identical, losses and adapters after 3 SGD
    steps equal one process over the global batch, save_adapter (called on both ranks) writes on
    rank 0 the full adapter equal to the single process's; FSDP2 also: the adapter-only sharded
    (DCP) and full state dicts round-trip and training resumes from both."""
    _, results = two_process_results
    assert results[scenario] == "ok", results[scenario]


def test_fully_shard_before_injection_is_refused(two_process_results):
    _, results = two_process_results
    assert results["late_injection"] == "ok", results["late_injection"]


def test_inject_adapters_needs_a_peft_callback_and_fsdp1_needs_a_true_precision():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_peft.callbacks import _nf4_storage_dtype, inject_adapters
    from tests import _lit

    with pytest.raises(ValueError, match="PEFT callback"):
        inject_adapters(_lit.TinyLM())
    def storage(strategy, precision):
        return _nf4_storage_dtype(SimpleNamespace(strategy=strategy, precision=precision))

    assert storage(FSDPStrategy(), "bf16-true") == torch.bfloat16
    assert storage(FSDPStrategy(), "32-true") == torch.float32
    assert storage(ModelParallelStrategy(), "bf16-mixed") == torch.uint8
    assert storage(None, "32-true") is None
    with pytest.raises(ValueError, match="bf16-true"):
        storage(FSDPStrategy(), "bf16-mixed")


def test_nf4_base_splits_in_half_across_two_ranks(two_process_results):
    out, results = two_process_results
    assert results["nf4_shards"] == "ok", results["nf4_shards"]
    nf4 = json.loads((out / "nf4_bytes.json").read_text())
    assert sum(nf4["held_per_rank"]) == nf4["total"]
    assert all(abs(h - nf4["total"] / 2) <= 64 for h in nf4["held_per_rank"])


# ------------------------------------------------------------------ one process, no sharding
def _qlora_model(double_quant=True):
    model = _tiny.llama(0)
    torch.manual_seed(3)
    apply_qlora(model, r=4, compute_dtype="float32", double_quant=double_quant, target_modules="all-linear")
    _tiny.randomize_lora(model)
    return model


@pytest.mark.parametrize("storage_dtype", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_shardable_nf4_linear_is_the_same_layer(storage_dtype, double_quant):
    model = _qlora_model(double_quant)
    ids = torch.randint(0, 96, (2, 7))
    model(ids)  # a fresh model finds its q/k/v, gate/up groups in its first forward; then fuses
    before = model(ids).logits
    originals = {n: m.weight for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    counts = trainable_parameters(model)
    prepare_nf4_for_fsdp(model, storage_dtype)
    assert trainable_parameters(model) == counts
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ShardableNF4Linear)}
    assert layers.keys() == originals.keys()
    for name, layer in layers.items():
        q = layer.weight
        assert layer.is_whole() and layer.weight_packed.dtype == storage_dtype
        assert not layer.weight_packed.requires_grad and not layer.weight_absmax.requires_grad
        assert torch.equal(q.packed, originals[name].packed) and torch.equal(q.absmax, originals[name].absmax)
        assert torch.equal(q.dequantize(torch.float32), originals[name].dequantize(torch.float32))
    assert torch.equal(model(ids).logits, before)
    assert not is_sharded(model)


def test_shardable_nf4_dtype_casts_keep_the_bytes_and_state_dict_round_trips():
    model = prepare_nf4_for_fsdp(_qlora_model(), torch.uint8)
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    packed = layer.weight_packed.detach().clone()
    model.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and torch.equal(layer.weight_packed, packed)
    assert layer.weight_nested_code.dtype == torch.float32
    model.to(torch.float32)
    state = layer.state_dict()
    assert {"weight_packed", "weight_absmax", "weight_nested_absmax"} <= set(state)
    other = ShardableNF4Linear.from_nf4_linear(NF4Linear(layer.in_features, layer.out_features, bias=False,
                                                         compute_dtype=torch.float32))
    other.load_state_dict(state)
    assert torch.equal(other.weight.dequantize(torch.float32), layer.weight.dequantize(torch.float32))


def test_sharded_placeholder_and_bad_arguments():
    layer = prepare_nf4_for_fsdp(_qlora_model(), torch.uint8).model.layers[0].mlp.up_proj.base_layer
    whole = layer.weight
    shard = layer.weight_packed[:5].clone()
    layer._parameters["weight_packed"] = torch.nn.Parameter(shard, requires_grad=False)
    assert not layer.is_whole()
    placeholder = layer.weight  # a shard: the format and shape, on the meta device
    assert placeholder.device.type == "meta" and placeholder.shape == whole.shape
    with pytest.raises(ValueError, match="storage_dtype"):
        ShardableNF4Linear.from_nf4_linear(NF4Linear(4, 4), storage_dtype="uint8")
    with pytest.raises(TypeError, match="NF4Linear"):
        ShardableNF4Linear.from_nf4_linear(torch.nn.Linear(4, 4))


def test_clean_name_drops_wrapper_prefixes():
    assert clean_name("model._fsdp_wrapped_module.layers.0._fsdp_wrapped_module.q.lora_A") == \
        "model.layers.0.q.lora_A"
    assert clean_name("_orig_mod.a._checkpoint_wrapped_module.b") == "_orig_mod.a.b"  # compile keeps it


# ------------------------------------------------- Lightning ModelParallelStrategy (FSDP2) on CPU
LIGHTNING_SCRIPT = Path(__file__).with_name("_lightning_fsdp_run.py")


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_fsdp")
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1"}
    for mode in ("mp", "single", "fsdp1"):
        run = subprocess.run([sys.executable, str(LIGHTNING_SCRIPT), mode, str(out)], env=env, cwd=out,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_model_parallel_strategy_two_cpu_processes(lightning_runs, method):
    """ModelParallelStrategy(data_parallel_size=2) with LoRACallback / QLoRACallback: the adapter
    written by adapter_dir (gathered on rank 0) after 3 steps, after resuming from the consolidated
    adapter-only checkpoint to step 5 and from the distributed one to step 6 (SGD with momentum:
    the optimizer state resumes too) equals 1 process over the same global batches; the
    checkpoints (consolidated at step 3, distributed at step 5) hold only adapter tensors."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    for step in (3, 5, 6):
        two = load_file(lightning_runs / "mp" / method / f"adapter{step}" / "adapter_model.safetensors")
        one = load_file(lightning_runs / "single" / method / f"adapter{step}" / "adapter_model.safetensors")
        assert two.keys() == one.keys() and len(one) == 28  # 7 projections x 2 layers x (A, B)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
        assert any(v.count_nonzero() > 0 for k, v in one.items() if "lora_B" in k)
    consolidated = torch.load(lightning_runs / "mp" / method / "step=3.ckpt", weights_only=True)["state_dict"]
    sharded = FileSystemReader(str(lightning_runs / "mp" / method / "step=5.ckpt")).read_metadata()
    sharded_keys = {k for k in sharded.state_dict_metadata if k.startswith("state_dict.")}
    assert len(consolidated) == 28 and all("lora_" in k for k in consolidated)
    assert sharded_keys == {"state_dict." + k for k in consolidated}


# ------------------------------------------------------------- DeepSpeed ZeRO-3 on 2 CPU processes
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (optional: pip install deepspeed)")
def test_deepspeed_zero3_two_cpu_processes_save_the_full_adapter(tmp_path):
    """ZeRO-3 partitions the adapter; losses equal 1 process over the global batch; save_adapter
    on both ranks writes on rank 0 the full adapter (not ZeRO-3's empty placeholders), equal to the
    single process's."""
    path = os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    run = subprocess.run([sys.executable, str(SCRIPT.with_name("_deepspeed_run.py")), str(tmp_path),
                          str(_free_port())], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "ok").is_file()


def test_checkpoints_loaded_by_the_strategy_are_checked_from_their_file(tmp_path):
    """FSDP/ModelParallelStrategy/DeepSpeed load the weights before on_load_checkpoint, which gets no
    state_dict: the adapter keys are read from the file (a missing one named), a DeepSpeed
    directory is left to DeepSpeed, no file at all is no such checkpoint."""
    from types import SimpleNamespace

    from lightning_peft import LoRACallback, apply_lora

    model = apply_lora(_tiny.llama(0), r=2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    cb = LoRACallback(r=2)
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {n: torch.zeros(1) for n in names}}, full)
    cb._trainer = SimpleNamespace(ckpt_path=str(full))
    assert cb._check_strategy_loaded_checkpoint(model)
    torch.save({"state_dict": {n: torch.zeros(1) for n in names[1:]}}, full)
    with pytest.raises(ValueError, match="lacks 1 adapter tensors"):
        cb._check_strategy_loaded_checkpoint(model)
    (tmp_path / "deepspeed_dir").mkdir()
    cb._trainer = SimpleNamespace(ckpt_path=str(tmp_path / "deepspeed_dir"))
    assert cb._check_strategy_loaded_checkpoint(model)
    cb._trainer = SimpleNamespace(ckpt_path=None)
    assert not cb._check_strategy_loaded_checkpoint(model)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lightning_fsdp_strategy_two_cpu_processes(lightning_runs, method):
    """Lightning's FSDPStrategy (FSDP1, auto-wrapped decoder layers; on CPU through a test-only
    subclass) with LoRACallback / QLoRACallback (4-bit bytes in fp32 storage): the adapter written
    by adapter_dir on rank 0 after 3 steps equals 1 process, with the FSDP wrapper prefixes gone;
    the sharded checkpoint holds only adapter tensors (and the optimizer state), and resuming from it
    to step 5 (momentum state included) equals 1 process too."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    for step in (3, 5):
        two = load_file(lightning_runs / "fsdp1" / method / f"adapter{step}" / "adapter_model.safetensors")
        one = load_file(lightning_runs / "single" / method / f"adapter{step}" / "adapter_model.safetensors")
        assert two.keys() == one.keys() and len(one) == 28
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    three = load_file(lightning_runs / "fsdp1" / method / "adapter3" / "adapter_model.safetensors")
    assert not all(torch.equal(two[k], three[k]) for k in two)  # the resumed run trained on
    stored = FileSystemReader(str(lightning_runs / "fsdp1" / method / "step=3.ckpt")).read_metadata()
    model_keys = [k for k in stored.state_dict_metadata if k.startswith("model.")]
    assert len(model_keys) == 28 and all("lora_" in k for k in model_keys)


def test_save_adapter_without_distributed_support(tmp_path, monkeypatch):
    """A torch build without torch.distributed still saves (nothing can be sharded there)."""
    from lightning_peft import apply_lora, save_adapter
    from lightning_peft.fsdp import full_adapter_tensors

    model = apply_lora(_tiny.llama(0), r=2)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    assert not is_sharded(model)
    with full_adapter_tensors(model) as full:
        t = torch.ones(2)
        assert full(t) is t
    assert (save_adapter(model, tmp_path / "a") / "adapter_model.safetensors").is_file()
