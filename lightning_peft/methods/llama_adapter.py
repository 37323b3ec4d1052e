"""LLaMA-Adapter (Zhang et al. 2023, arXiv 2303.16199): learnable adaption prompts with
zero-initialised gating in the top layers of a Llama-architecture model (HF PEFT's
``ADAPTION_PROMPT``).

Each of the top ``adapter_layers`` attention modules gets a prompt P (``adapter_len`` vectors of
the model's width) and a scalar gate g (zero at first). The frozen k/v projections turn P into
keys and values; the layer's own queries (rotary-embedded, as the attention computes them) attend
over them in a separate softmax, and the gated result goes through the frozen ``o_proj`` and is
added to the attention's output::

    K_p = P·W_kᵀ (+ b_k)   V_p = P·W_vᵀ (+ b_v)        (adapter_len, kv_heads·d), shared by the batch
    S   = Q·K_pᵀ / √d                                    (batch, heads, tokens, adapter_len)
    out <- out + (g · softmax(S)) · V_p · W_oᵀ           grouped-query heads: K_p, V_p repeated per group

As in HF PEFT 0.21 the gate multiplies the softmax directly (no tanh), the softmax runs in
float32, the adapter's attention ignores the attention mask (every token sees the whole prompt),
P starts standard normal and g at zero: a fresh adapter leaves the outputs bit-identical. The
prompt is not part of the KV cache: it is projected again at every step, so generation with the
cache equals generation without it. The update is nonlinear in P and g: it does not merge into
the weights (``merge_adapters`` leaves it).

Two deliberate differences from PEFT, where PEFT would be wrong: the number of key/value heads
is read from the config (PEFT divides ``k_proj``'s widths, wrong when heads·head_dim differs from
the hidden size), and ``o_proj``'s bias (Llama with ``attention_bias=True``) is not added a
second time (PEFT adds it, so its "zero-init" adapter is not zero there).

Where it goes: the attention module named ``target_modules`` (``"self_attn"``) of every decoder
layer of a Llama, Mistral, Mixtral or Qwen2 model (q/k/v/o projections, rotary embeddings given
to the attention as ``position_embeddings``); the top ``adapter_layers`` of them (all by
default) are wrapped in place. Files are PEFT's: ``adapter_config.json`` with ``peft_type
"ADAPTION_PROMPT"``, ``adapter_len``, ``adapter_layers``, ``target_modules``, and
``base_model.model.<layer path>.self_attn.adaption_prompt`` (1, adapter_len, hidden) and
``.adaption_gate`` (1,) in ``adapter_model.safetensors``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft._base import AdapterLayer, WrapperLayer, freeze_all_but_adapters
from lightning_peft.methods import Method, planned_injection, register
from lightning_peft.targeting import get_parent, model_type

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2")
"""transformers ``model_type`` values whose attention layout LLaMA-Adapter handles (HF PEFT 0.21
has llama and mistral, plus GPT-2, which is not supported here)."""


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class LlamaAdapterConfig:
    """What :func:`apply_llama_adapter` injects (HF PEFT's ``AdaptionPromptConfig``)."""

    adapter_len: int = 10
    """Number of prompt vectors per adapted layer (the paper uses 10)."""
    adapter_layers: int | None = None
    """How many layers, counted from the top, get a prompt (the paper: 30 of LLaMA-7B's 32);
    ``None``: every layer."""
    target_modules: str = "self_attn"
    """Attribute name of the attention module inside each decoder layer."""

    def __post_init__(self) -> None:
        if not _positive_int(self.adapter_len):
            raise ValueError(f"adapter_len must be a positive integer (prompt vectors per layer, e.g. 10), "
                             f"got {self.adapter_len!r}")
        if self.adapter_layers is not None and not _positive_int(self.adapter_layers):
            raise ValueError(f"adapter_layers must be a positive integer (layers from the top that get a "
                             f"prompt) or None for every layer, got {self.adapter_layers!r}")
        if not isinstance(self.target_modules, str) or not self.target_modules.isidentifier():
            raise ValueError(f"target_modules must be the attribute name of the attention module in each "
                             f"decoder layer (e.g. 'self_attn'), got {self.target_modules!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# 2. Module
# --------------------------------------------------------------------------------------------


def _rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension, halves as Llama's rotary embedding splits it."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAdapterAttention(WrapperLayer):
    """A Llama-style attention module (``base_layer``) plus an adaption prompt and its gate; the
    gated attention over the prompt is added to the attention's output (see the module
    docstring). Attributes the layer lacks are read from the wrapped attention."""

    no_merge = "its adaption prompts are attended to, not a weight update"

    def __init__(self, base_layer: nn.Module, adapter_len: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        config = base_layer.config
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        weight = base_layer.q_proj.weight
        kw = {"device": weight.device,
              "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, config.hidden_size, **kw))
        self.adaption_gate = nn.Parameter(torch.empty(1, **kw))
        self.reset_parameters()

    @property
    def adapter_len(self) -> int:
        return self.adaption_prompt.shape[1]

    def reset_parameters(self) -> None:
        """P standard normal (the official code's nn.Embedding init), g zero."""
        if self.adaption_prompt.is_meta:
            return
        with torch.no_grad():
            self.adaption_prompt.normal_()
            self.adaption_gate.zero_()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"adaption_prompt": self.adaption_prompt, "adaption_gate": self.adaption_gate}

    def prompt_attention(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """The gated attention of the layer's queries over the prompt, through ``o_proj``."""
        attn = self.base_layer
        bsz, tokens, _ = hidden_states.shape
        d, heads, kv_heads = attn.head_dim, self.num_heads, self.num_kv_heads
        q = attn.q_proj(hidden_states).view(bsz, tokens, heads, d).transpose(1, 2)  # (b, h, t, d)
        cos, sin = (e.unsqueeze(1) for e in position_embeddings)  # (b, 1, t, d)
        q = q * cos + _rotate_half(q) * sin
        prompt = self.adaption_prompt
        k = attn.k_proj(prompt).view(1, self.adapter_len, kv_heads, d).transpose(1, 2)  # (1, kv, L, d)
        v = attn.v_proj(prompt).view(1, self.adapter_len, kv_heads, d).transpose(1, 2)  # (1, kv, L, d)
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # (1, h, L, d)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3).to(q.dtype)) / math.sqrt(d)  # (b, h, t, L)
        probs = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, tokens, heads * d)  # (b, t, h·d)
        out = attn.o_proj(out)  # (b, t, hidden)
        bias = getattr(attn.o_proj, "bias", None)
        return out if bias is None else out - bias  # the attention's output has its bias already

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        position_embeddings = args[1] if len(args) > 1 else kwargs.get("position_embeddings")
        if position_embeddings is None:
            raise ValueError(f"{type(self.base_layer).__name__} was called without position_embeddings; "
                             f"LLaMA-Adapter needs the rotary (cos, sin) the decoder layer passes")
        output, *rest = self.base_layer(*args, **kwargs)
        dtype = output.dtype
        output = output + self.prompt_attention(hidden_states, position_embeddings)
        return (output.to(dtype), *rest)


    def extra_repr(self) -> str:
        return f"adapter_len={self.adapter_len}"


# --------------------------------------------------------------------------------------------
# 3. apply_llama_adapter
# --------------------------------------------------------------------------------------------


def llama_adapter_layers(model: nn.Module) -> list[tuple[str, LlamaAdapterAttention]]:
    """``(name, layer)`` of every LLaMA-Adapter layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LlamaAdapterAttention)]


def _unsupported(model: nn.Module, detail: str) -> ValueError:
    kind = model_type(model)
    return ValueError(f"LLaMA-Adapter supports the attention of Llama-architecture models (model types "
                      f"{list(SUPPORTED_MODEL_TYPES)}: q_proj/k_proj/v_proj/o_proj with rotary position "
                      f"embeddings); {type(model).__name__} is model type {kind!r}: {detail}")


def _check_attention(model: nn.Module, name: str, module: nn.Module) -> None:
    if isinstance(module, LlamaAdapterAttention):
        module = module.base_layer
    elif isinstance(module, AdapterLayer):
        raise ValueError(f"{name!r} is already wrapped by {type(module).__name__} (another method); "
                         f"LLaMA-Adapter wraps the attention module itself")
    config = getattr(module, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(model, f"{name!r} ({type(module).__name__}) belongs to model type {kind!r}")
    missing = [a for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim") if not hasattr(module, a)]
    if missing:
        raise _unsupported(model, f"{name!r} ({type(module).__name__}) has no {missing}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"{name!r}: num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")


def plan_llama_adapter(model: nn.Module, config: LlamaAdapterConfig) -> list[str]:
    """The attention modules of ``model`` that ``config`` wraps (the top ``adapter_layers`` of
    those named ``target_modules``), checked; read only. A ``ValueError`` for a model without
    supported attention, too few layers, or one that carries another LLaMA-Adapter."""
    adapters = [n for n, _ in llama_adapter_layers(model)]
    found = [n for n, _ in model.named_modules() if n.rpartition(".")[2] == config.target_modules
             and not any(n.startswith(a + ".") for a in adapters)]
    if not found:
        raise _unsupported(model, f"no module is named {config.target_modules!r} (target_modules)")
    for name in found:
        _check_attention(model, name, model.get_submodule(name))
    count = config.adapter_layers if config.adapter_layers is not None else len(found)
    if count > len(found):
        raise ValueError(f"adapter_layers={count} but {type(model).__name__} has {len(found)} attention "
                         f"modules named {config.target_modules!r}; pass at most {len(found)}")
    chosen = found[len(found) - count:]
    if adapters:
        lengths = {m.adapter_len for _, m in llama_adapter_layers(model)}
        if adapters != chosen or lengths != {config.adapter_len}:
            raise ValueError(f"the model already carries a LLaMA-Adapter (adapter_len={sorted(lengths)}, "
                             f"{len(adapters)} layers); adapter_len={config.adapter_len}, adapter_layers="
                             f"{count} describe another. Prompts do not stack: use a fresh model")
    return chosen


def _inject(model: nn.Module, names: list[str], config: LlamaAdapterConfig) -> None:
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LlamaAdapterAttention):
            parent, child = get_parent(model, name)
            setattr(parent, child, LlamaAdapterAttention(module, config.adapter_len))
    freeze_all_but_adapters(model)


def apply_llama_adapter(model: nn.Module, adapter_len: int = 10, adapter_layers: int | None = None,
                        target_modules: str = "self_attn",
                        config: LlamaAdapterConfig | None = None) -> nn.Module:
    """Give the top ``adapter_layers`` attention modules of a Llama-architecture ``model`` an
    adaption prompt of ``adapter_len`` vectors with a zero gate, in place; freeze everything else;
    return ``model``. ``config`` (a :class:`LlamaAdapterConfig`) replaces the other arguments.
    Everything is checked before the model changes; applying the same adapter again is harmless."""
    if config is None:
        config = LlamaAdapterConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                    target_modules=target_modules)
    elif not isinstance(config, LlamaAdapterConfig):
        raise TypeError(f"config must be a LlamaAdapterConfig, got {type(config).__name__}")
    _inject(model, plan_llama_adapter(model, config), config)
    return model


# --------------------------------------------------------------------------------------------
# 4. Registry entry
# --------------------------------------------------------------------------------------------


def _to_json(root: nn.Module) -> dict[str, Any]:
    """PEFT's ``AdaptionPromptConfig`` fields describing the LLaMA-Adapter of ``root``."""
    layers = llama_adapter_layers(root)
    if not layers:
        raise ValueError(f"{type(root).__name__} carries no LLaMA-Adapter; apply_llama_adapter(model) first")
    targets = {n.rpartition(".")[2] for n, _ in layers}
    lengths = {m.adapter_len for _, m in layers}
    if len(targets) > 1 or len(lengths) > 1:
        raise ValueError(f"the model's LLaMA-Adapter layers differ in target module {sorted(targets)} or "
                         f"adapter_len {sorted(lengths)}; one adapter file holds one setting")
    config = LlamaAdapterConfig(adapter_len=lengths.pop(), adapter_layers=len(layers),
                                target_modules=targets.pop())
    try:
        plan_llama_adapter(root, config)  # the layers are the top ones, as the file says
    except ValueError as err:
        raise ValueError(f"the model's LLaMA-Adapter layers are not the top {len(layers)} ones, which is "
                         f"all PEFT's format can say: {err}") from err
    return {"adapter_len": config.adapter_len, "adapter_layers": config.adapter_layers,
            "target_modules": config.target_modules}


def _config_from_json(cfg: dict[str, Any], where: str) -> LlamaAdapterConfig:
    """Check an ``ADAPTION_PROMPT`` config's fields (other PEFT fields, such as ``peft_version``,
    are ignored) and build the config."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got {type(cfg).__name__}")
    for key in ("adapter_len", "adapter_layers"):
        if not _positive_int(cfg.get(key)):
            raise ValueError(f"{where}: {key} must be a positive integer, got {cfg.get(key)!r}")
    target = cfg.get("target_modules")
    try:
        return LlamaAdapterConfig(adapter_len=cfg["adapter_len"], adapter_layers=cfg["adapter_layers"],
                                  target_modules="self_attn" if target is None else target)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    return planned_injection(model, _config_from_json(cfg, where), where, plan_llama_adapter,
                             apply_llama_adapter)


def _update_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[], None]:
    """A model that carries a LLaMA-Adapter takes only a file of the same layers and length."""
    config = _config_from_json(cfg, where)
    try:
        plan_llama_adapter(model, config)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return lambda: None


def _detect(model: nn.Module) -> bool:
    return any(isinstance(m, LlamaAdapterAttention) for m in model.modules())


METHOD = register(Method(
    name="llama_adapter",
    config_class=LlamaAdapterConfig,
    peft_type="ADAPTION_PROMPT",
    apply=lambda model, config: apply_llama_adapter(model, config=config),
    detect=_detect,
    to_json=_to_json,
    from_json=_from_json,
    update_from_json=_update_from_json,
    aliases=("adaption_prompt", "llama-adapter"),
))

__all__ = ["SUPPORTED_MODEL_TYPES", "LlamaAdapterAttention", "LlamaAdapterConfig", "apply_llama_adapter",
           "llama_adapter_layers", "plan_llama_adapter"]
