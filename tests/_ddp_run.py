"""Run by test_callbacks: fit with LoRACallback on N CPU processes (strategy="ddp") and save the
adapters, so the test can compare 2 processes x batch B with 1 process x batch 2B."""

import sys

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from lightning_peft import LoRACallback
from lightning_peft._base import adapter_named_parameters
from tests import _lit


class SGDTinyLM(_lit.TinyLM):
    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        """Rank r takes samples r, r+W, ...: its batches together are the 1-process batches."""
        dataset = _lit.loader(n=24).dataset
        sampler = DistributedSampler(dataset, num_replicas=self.trainer.world_size,
                                     rank=self.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


class SeedBeforeInjection(pl.Callback):
    """Same adapter init in both runs: seed right before LoRACallback.setup draws lora_A."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1234)


if __name__ == "__main__":
    devices, batch, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    module = SGDTinyLM(batch)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False,
                         callbacks=[SeedBeforeInjection(), LoRACallback(r=4)])
    trainer.fit(module)
    if trainer.is_global_zero:
        save_file({n: p.detach().contiguous() for n, p in adapter_named_parameters(module)}, out)
