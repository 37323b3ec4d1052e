"""Ops for parameter-efficient fine-tuning: fused LoRA matmul (and DoRA's), (IA)³ scaling, NF4
4-bit quantization and the Walsh-Hadamard transform.

Every op has a pure-PyTorch reference (the CPU fallback and the specification); the LoRA, DoRA,
NF4 and Hadamard ops also have Triton kernels, and :func:`set_backend` picks between the two
((IA)³ is one elementwise product around ``nn.Linear``'s call and runs its PyTorch op on every
backend). Only torch is imported here; triton is imported lazily on the Triton path.
"""

from kernels._backend import get_backend, set_backend, use_backend
from kernels.hadamard import hadamard_transform
from kernels.ia3 import ia3_linear
from kernels.lora import dora_linear, dora_weight_norm, lora_linear, lora_linear_grouped
from kernels.nf4 import NF4Tensor, dequantize_nf4, nf4_linear, quantize_nf4

__version__ = "0.1.0"

__all__ = [
    "dora_linear",
    "dora_weight_norm",
    "NF4Tensor",
    "dequantize_nf4",
    "get_backend",
    "hadamard_transform",
    "ia3_linear",
    "lora_linear",
    "lora_linear_grouped",
    "nf4_linear",
    "quantize_nf4",
    "set_backend",
    "use_backend",
]
