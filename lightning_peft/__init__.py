"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning.

Plain-PyTorch functions (``apply_lora``, ``merge_adapters``, ``save_adapter``, ...) work on any
``nn.Module``; the Lightning callbacks (``LoRACallback``) are thin sequences of them.
"""

from lightning_peft._base import trainable_parameters
from lightning_peft.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    merge_adapters,
    unmerge_adapters,
)

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "merge_adapters",
    "trainable_parameters",
    "unmerge_adapters",
]
