"""Run by test_fsdp_gpu (CUDA only): fit a tiny Llama for 3 steps with LoRACallback or QLoRACallback
under Lightning's ``strategy="fsdp"`` (FSDP1, state_dict_type full or sharded),
``ModelParallelStrategy`` (FSDP2) or DeepSpeed ZeRO-3, on every visible GPU (at most 2), write
the adapter with ``adapter_dir`` (gathered on rank 0), resume from the step-3 checkpoint to step 5
(an adapter-only sharded checkpoint too: the callback narrows what the strategy asks of it).

usage: python tests/_gpu_strategies_run.py STRATEGY METHOD OUT
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from lightning_peft import LoRACallback, QLoRACallback  # noqa: E402
from lightning_peft.callbacks import inject_adapters  # noqa: E402
from lightning_peft.fsdp import fully_shard_peft  # noqa: E402
from tests import _lit  # noqa: E402


class LM(_lit.TinyLM):
    def __init__(self, fsdp2: bool):
        super().__init__(build_in_configure_model=True, hidden=64)
        self.fsdp2 = fsdp2

    def configure_model(self):
        super().configure_model()
        if self.fsdp2 and not any(hasattr(p, "full_tensor") for p in self.model.parameters()):
            inject_adapters(self)
            fully_shard_peft(self.model, mesh=self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def strategy(name, devices):
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if name.startswith("fsdp1"):
        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type=name.split("_")[1])
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return DeepSpeedStrategy(stage=3, exclude_frozen_parameters=True)


def fit(name, method, root, steps, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    devices = min(2, torch.cuda.device_count())
    cb = (LoRACallback(r=4, target_modules="all-linear", adapter_dir=str(root / f"adapter{steps}"))
          if method == "lora" else
          QLoRACallback(r=4, target_modules="all-linear", compute_dtype="bfloat16",
                        adapter_dir=str(root / f"adapter{steps}")))
    save = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=steps, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cuda", devices=devices, strategy=strategy(name, devices),
                         precision="bf16-true", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[cb, save])
    trainer.fit(LM(name == "fsdp2"), _lit.loader(n=24), ckpt_path=ckpt_path)


if __name__ == "__main__":
    name, method, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    fit(name, method, out, 3)
    fit(name, method, out, 5, ckpt_path=out / "step=3.ckpt")
