"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning.

Plain-PyTorch functions (``apply_lora``, ``merge_adapters``, ``save_adapter``, ...) work on any
``nn.Module``; the Lightning callbacks (``LoRACallback``) are thin sequences of them. The callbacks
and the data module import Lightning lazily, on first access, so the plain functions never do.
"""

from importlib import import_module

from lightning_peft._base import merge_adapters, trainable_parameters, unmerge_adapters
from lightning_peft.lorahub import LoRAHubResult, lorahub  # eager: the function takes the module's name
from lightning_peft.methods import apply_peft
from lightning_peft.methods.adalora import (
    AdaLoRAConfig,
    adalora_orthogonal_penalty,
    adalora_prune,
    adalora_update_and_allocate,
    apply_adalora,
)
from lightning_peft.methods.adapter_fusion import (
    AdapterFusionConfig,
    AdapterFusionLayer,
    apply_adapter_fusion,
)
from lightning_peft.methods.bitfit import BitFitConfig, apply_bitfit
from lightning_peft.methods.bottleneck import AdapterConfig, BottleneckAdapter, apply_adapters
from lightning_peft.methods.child_tuning import (
    ChildTuningConfig,
    apply_child_tuning,
    attach_child_tuning,
    child_tuning_changed,
    child_tuning_fisher_masks,
)
from lightning_peft.methods.dylora import DyLoRAConfig, apply_dylora, dylora_sample_rank, truncate_rank
from lightning_peft.methods.fishmask import FishMaskConfig, SparseUpdate, apply_fishmask, fishmask_scores
from lightning_peft.methods.ia3 import IA3Config, IA3Linear, apply_ia3
from lightning_peft.methods.intrinsic_dimension import (
    IntrinsicDimensionConfig,
    IntrinsicDimensionLayer,
    IntrinsicProjection,
    apply_intrinsic,
)
from lightning_peft.methods.llama_adapter import LlamaAdapterConfig, apply_llama_adapter
from lightning_peft.methods.lora import LoRAConfig, LoRALinear, apply_lora
from lightning_peft.methods.multitask_prompt_tuning import (
    MultitaskPromptTuningConfig,
    apply_multitask_prompt_tuning,
    use_task_ids,
)
from lightning_peft.methods.p_tuning import PTuningConfig, apply_p_tuning, verbalizer_logits
from lightning_peft.methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig, apply_prefix_tuning
from lightning_peft.methods.prompt_tuning import PromptTuningConfig, apply_prompt_tuning
from lightning_peft.methods.qlora import NF4Linear, QLoRAConfig, apply_qlora, merge_and_dequantize
from lightning_peft.methods.relora import ReLoRAConfig, apply_relora, jagged_cosine_schedule, relora_reset
from lightning_peft.methods.trainable_tokens import (
    TrainableTokensConfig,
    TrainableTokensLayer,
    add_tokens,
    apply_trainable_tokens,
    unload_trainable_tokens,
)
from lightning_peft.multi_adapter import (
    active_adapters,
    adapter_names_for_rows,
    add_adapter,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    set_adapter,
)

__version__ = "0.1.0"

_LAZY = {
    "AdaLoRACallback": "lightning_peft.callbacks",
    "AdapterCallback": "lightning_peft.callbacks",
    "AdapterFusionCallback": "lightning_peft.callbacks",
    "BitFitCallback": "lightning_peft.callbacks",
    "ChildTuningCallback": "lightning_peft.callbacks",
    "DyLoRACallback": "lightning_peft.callbacks",
    "FishMaskCallback": "lightning_peft.callbacks",
    "IntrinsicDimensionCallback": "lightning_peft.callbacks",
    "ReLoRACallback": "lightning_peft.callbacks",
    "IA3Callback": "lightning_peft.callbacks",
    "LlamaAdapterCallback": "lightning_peft.callbacks",
    "LoRACallback": "lightning_peft.callbacks",
    "MultitaskPromptTuningCallback": "lightning_peft.callbacks",
    "PromptTuningCallback": "lightning_peft.callbacks",
    "PTuningCallback": "lightning_peft.callbacks",
    "peft_callback": "lightning_peft.callbacks",
    "PEFTCallback": "lightning_peft.callbacks",
    "PrefixTuningCallback": "lightning_peft.callbacks",
    "QLoRACallback": "lightning_peft.callbacks",
    "TrainableTokensCallback": "lightning_peft.callbacks",
    "save_adapter": "lightning_peft.io",
    "load_adapter": "lightning_peft.io",
    "adapter_state_dict": "lightning_peft.io",
    "load_adapter_state_dict": "lightning_peft.io",
    "InstructionDataModule": "lightning_peft.data",
    "ClassificationDataModule": "lightning_peft.data",
    "CausalLMModule": "lightning_peft.tasks",
    "SequenceClassificationModule": "lightning_peft.tasks",
    "ProxyTuningLogitsProcessor": "lightning_peft.proxy_tuning",
    "proxy_generate": "lightning_peft.proxy_tuning",
    "inject_adapters": "lightning_peft.callbacks",
    "fully_shard_peft": "lightning_peft.fsdp",
    "prepare_nf4_for_fsdp": "lightning_peft.fsdp",
    "ShardableNF4Linear": "lightning_peft.fsdp",
}

__all__ = [
    "AdaLoRACallback",
    "AdaLoRAConfig",
    "AdapterCallback",
    "AdapterConfig",
    "AdapterFusionCallback",
    "AdapterFusionConfig",
    "AdapterFusionLayer",
    "BitFitCallback",
    "BitFitConfig",
    "BottleneckAdapter",
    "CausalLMModule",
    "ChildTuningCallback",
    "ChildTuningConfig",
    "ClassificationDataModule",
    "DyLoRACallback",
    "DyLoRAConfig",
    "FishMaskCallback",
    "FishMaskConfig",
    "IntrinsicDimensionCallback",
    "IntrinsicDimensionConfig",
    "IntrinsicDimensionLayer",
    "IntrinsicProjection",
    "IA3Callback",
    "IA3Config",
    "IA3Linear",
    "InstructionDataModule",
    "LlamaAdapterCallback",
    "LlamaAdapterConfig",
    "LoRACallback",
    "LoRAConfig",
    "LoRAHubResult",
    "LoRALinear",
    "MultitaskPromptTuningCallback",
    "MultitaskPromptTuningConfig",
    "NF4Linear",
    "PEFTCallback",
    "PTuningCallback",
    "PTuningConfig",
    "PrefixEncoder",
    "PrefixTuningCallback",
    "PrefixTuningConfig",
    "PromptTuningCallback",
    "PromptTuningConfig",
    "ProxyTuningLogitsProcessor",
    "QLoRACallback",
    "QLoRAConfig",
    "ReLoRACallback",
    "ReLoRAConfig",
    "SequenceClassificationModule",
    "ShardableNF4Linear",
    "SparseUpdate",
    "TrainableTokensCallback",
    "TrainableTokensConfig",
    "TrainableTokensLayer",
    "active_adapters",
    "adalora_orthogonal_penalty",
    "adalora_prune",
    "adalora_update_and_allocate",
    "adapter_names_for_rows",
    "adapter_state_dict",
    "add_adapter",
    "add_tokens",
    "apply_adalora",
    "apply_adapter_fusion",
    "apply_adapters",
    "apply_bitfit",
    "apply_child_tuning",
    "apply_dylora",
    "apply_fishmask",
    "apply_intrinsic",
    "apply_ia3",
    "apply_llama_adapter",
    "apply_lora",
    "apply_multitask_prompt_tuning",
    "apply_p_tuning",
    "apply_peft",
    "apply_prefix_tuning",
    "apply_prompt_tuning",
    "apply_qlora",
    "apply_relora",
    "apply_trainable_tokens",
    "attach_child_tuning",
    "child_tuning_changed",
    "child_tuning_fisher_masks",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "dylora_sample_rank",
    "fishmask_scores",
    "fully_shard_peft",
    "jagged_cosine_schedule",
    "list_adapters",
    "load_adapter",
    "load_adapter_state_dict",
    "inject_adapters",
    "lorahub",
    "merge_adapters",
    "merge_and_dequantize",
    "peft_callback",
    "prepare_nf4_for_fsdp",
    "proxy_generate",
    "relora_reset",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "truncate_rank",
    "unload_trainable_tokens",
    "unmerge_adapters",
    "use_task_ids",
    "verbalizer_logits",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
