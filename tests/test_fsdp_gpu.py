"""Lightning's sharded strategies on CUDA (gpu-marked: skipped without CUDA; run by
``bash benchmarks/gpu_suite.sh``). With one GPU each strategy still runs its own code path
(devices=1); with 2 or more GPUs, 2 processes. Each case: 3 steps, the adapter written by
``adapter_dir`` (gathered on rank 0) is complete and trained (lora_B non-zero), the checkpoint holds
only adapter tensors, and fit resumes from it to step 5."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("_gpu_strategies_run.py")
CASES = [("fsdp1_full", "lora"), ("fsdp1_sharded", "lora"), ("fsdp1_full", "qlora"), ("fsdp2", "qlora"),
         ("deepspeed", "lora")]  # FSDP2 + LoRA runs on CPU in test_fsdp.py


@pytest.mark.gpu
@pytest.mark.parametrize(("strategy", "method"), CASES)
def test_sharded_strategy_trains_saves_and_resumes(tmp_path, strategy, method):
    from safetensors.torch import load_file

    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed)")
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    run = subprocess.run([sys.executable, str(SCRIPT), strategy, method, str(tmp_path)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    for step in (3, 5):
        tensors = load_file(tmp_path / f"adapter{step}" / "adapter_model.safetensors")
        assert len(tensors) == 28 and all(v.numel() > 0 for v in tensors.values())
        assert all(v.count_nonzero() > 0 for k, v in tensors.items() if "lora_B" in k)
    ckpt = tmp_path / "step=3.ckpt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
        assert state and all("lora_" in k for k in state)
    elif (ckpt / ".metadata").is_file():
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        keys = [k for k in stored if k.startswith(("state_dict.", "model."))]
        assert keys and all("lora_" in k for k in keys)
