"""Run by test_fsdp: Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes with
LoRACallback and QLoRACallback (fp32 compute), or the same fit on 1 process (``single``) over the
same global batches. For each method: fit 3 steps (ModelCheckpoint writes a consolidated
adapter-only checkpoint at step 3) and write the adapter with ``adapter_dir``; then resume from
that checkpoint to step 5 (ModelCheckpoint writes a distributed, sharded checkpoint there) and
write the adapter again; then resume from that one to step 6.

With ``fsdp1``: Lightning's FSDPStrategy (on CPU through a test-only subclass), 3 steps, a sharded
checkpoint and the adapter, then a resume from that checkpoint to step 5.

usage: python tests/_lightning_fsdp_run.py mp|single|fsdp1 OUT
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parents[1]))

from lightning_peft import LoRACallback, QLoRACallback  # noqa: E402
from lightning_peft.callbacks import inject_adapters  # noqa: E402
from lightning_peft.fsdp import fully_shard_peft  # noqa: E402
from tests import _lit  # noqa: E402

GLOBAL_BATCH = 4


class ShardedLM(_lit.TinyLM):
    def __init__(self, world: int):
        super().__init__(build_in_configure_model=True)
        self.world = world

    def configure_model(self):
        super().configure_model()
        if self.world > 1 and not any(hasattr(p, "full_tensor") for p in self.model.parameters()):
            inject_adapters(self)
            fully_shard_peft(self.model, mesh=self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5, momentum=0.9)

    def train_dataloader(self):
        dataset = _lit.loader(n=24).dataset
        sampler = DistributedSampler(dataset, num_replicas=self.trainer.world_size,
                                     rank=self.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=GLOBAL_BATCH // self.trainer.world_size, sampler=sampler)


class Seed(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1234)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) on CPU, for this test only: Lightning refuses the class itself
    with a CPU accelerator (an exact type check) and wraps with ``device_id=None``, which torch's
    FSDP1 refuses without an accelerator; ``device_id=cpu`` runs. (Its "full" state dict gathers
    with ``offload_to_cpu=True``, which crashes torch's FSDP1 on CPU tensors, so only "sharded".)"""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy,
                                        device_id=torch.device("cpu"), **self.kwargs)


def fit(world, callback, out, steps, ckpt_path=None, distributed=False, fsdp1=False):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    save = ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=steps, save_top_k=-1)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=distributed) if world > 1 else "auto"
    if fsdp1:
        strategy = CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="sharded")
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps,
                         logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=out, callbacks=[Seed(), callback, save])
    trainer.fit(ShardedLM(1 if fsdp1 else world), ckpt_path=ckpt_path)
    return trainer


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    world = 1 if mode == "single" else 2
    for name, make in (("lora", lambda d: LoRACallback(r=4, target_modules="all-linear", adapter_dir=d)),
                       ("qlora", lambda d: QLoRACallback(r=4, target_modules="all-linear",
                                                         compute_dtype="float32", adapter_dir=d))):
        root = out / mode / name
        if mode == "fsdp1":  # 3 steps, a sharded adapter-only checkpoint, then resume from it to step 5
            fit(world, make(str(root / "adapter3")), root, 3, fsdp1=True)
            fit(world, make(str(root / "adapter5")), root / "5", 5, ckpt_path=root / "step=3.ckpt",
                fsdp1=True)
            continue
        fit(world, make(str(root / "adapter3")), root, 3)
        ckpt = root / "step=3.ckpt"  # written by ModelCheckpoint inside fit, filtered by the callback
        fit(world, make(str(root / "adapter5")), root, 5, ckpt_path=ckpt, distributed=True)
        fit(world, make(str(root / "adapter6")), root / "6", 6, ckpt_path=root / "step=5.ckpt")
