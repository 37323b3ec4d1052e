"""Run by test_fsdp (only where deepspeed is installed): DeepSpeed ZeRO-3 on 2 CPU processes
(``DS_ACCELERATOR=cpu``, gloo) trains a tiny Llama with LoRA for 3 SGD steps; each rank checks
that the adapter is partitioned, that its losses equal a single process over the same global
batch, and ``save_adapter`` (called on both ranks) writes on rank 0 the full adapter, equal to
the single-process one. Writes ``OUT/ok`` on success.

usage: DS_ACCELERATOR=cpu python tests/_deepspeed_run.py OUT PORT
"""

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests._fsdp_run import ATOL, GLOBAL_BATCH, LR, RTOL, STEPS, batches, build, close, saved  # noqa: E402


def worker(rank, out, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from lightning_peft import save_adapter
    from lightning_peft._base import adapter_named_parameters

    deepspeed.init_distributed(dist_backend="gloo")
    ref = build("lora")
    model = copy.deepcopy(ref)
    params = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=LR),
                                      model_parameters=params, config=config)
    partitioned = [p for _, p in adapter_named_parameters(engine.module) if hasattr(p, "ds_tensor")]
    assert partitioned and all(p.ds_tensor.numel() < p.ds_numel for p in partitioned)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        ids = batches(step)
        loss = engine(ids[rank::2], labels=ids[rank::2]).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        ref_loss = ref(ids, labels=ids).loss
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(mean / 2, ref_loss.detach(), rtol=RTOL, atol=ATOL)
    save_adapter(engine, Path(out) / "zero3")
    if rank == 0:
        save_adapter(ref, Path(out) / "single")
    dist.barrier()
    written = saved(Path(out) / "zero3")
    close(written, saved(Path(out) / "single"), "ZeRO-3 saved adapter")
    assert any(v.count_nonzero() > 0 for k, v in written.items() if "lora_B" in k)
    if rank == 0:
        (Path(out) / "ok").write_text("ok")


if __name__ == "__main__":
    torch.multiprocessing.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
