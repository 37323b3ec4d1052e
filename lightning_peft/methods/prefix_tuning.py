"""Prefix tuning (Li and Liang 2021, arXiv 2101.00190) and P-tuning v2 (Liu et al. 2022,
arXiv 2110.07602): trainable key/value prefixes at every attention layer of a frozen model.

Every layer ``l`` attends, besides the keys and values of the real tokens, to ``n`` learned
virtual tokens ``P_k[l], P_v[l]`` (``n`` = ``num_virtual_tokens``), which no real token produced::

    attention_l(x) = softmax(q·[P_k[l]; K(x)]ᵀ / √d)·[P_v[l]; V(x)]

    prefix P: (n, num_layers·2·token_dim)         token_dim = num_key_value_heads·head_dim
    per layer l: keys  P[:, 2l]   -> (batch, kv_heads, n, head_dim)   (grouped-query attention:
                 values P[:, 2l+1] -> (batch, kv_heads, n, head_dim)    the kv heads, as HF PEFT)

    prefix_projection=False (P-tuning v2):  P = E                          E (n, num_layers·2·token_dim)
    prefix_projection=True  (prefix tuning): P = W2·tanh(W1·E + b1) + b2   E (n, token_dim),
                                             W1 (encoder_hidden_size, token_dim),
                                             W2 (num_layers·2·token_dim, encoder_hidden_size)

The reparameterisation (an MLP over a smaller embedding, HF PEFT's ``PrefixEncoder``) stabilises
training; after training only its output ``P`` matters. P-tuning v2 is prefix tuning without it.

How the prefix gets into a call, without the caller knowing: a forward pre-hook on the
transformers model (the hook is a method of the :class:`PrefixEncoder`, so a deep copy of the
model keeps a working hook) rewrites the call's arguments as HF PEFT's ``PeftModel`` does:

- no cache, or an empty one (the prefill step of ``generate``): a ``DynamicCache`` holding the
  batch-expanded prefix keys/values of every layer (in the model's dtype) is passed, so the real
  tokens are cached after the prefix and take positions ``n, n+1, ...``;
- a cache that already holds tokens (it holds the prefix: later ``generate`` steps, or a caller's
  own loop over the returned cache): left as it is, the prefix is never added twice;
- always: a 2-D ``attention_mask`` gets ``n`` ones in front, given ``position_ids`` are shifted
  by ``n`` (``generate`` counts positions without the prefix).

HF PEFT has no dropout on the prefix, nor has this. Works with decoder-only models that pass
transformers cache objects (Llama family, grouped-query attention included; GPT-2) in training,
in ``forward`` and in ``generate`` (KV cache on or off), and with BERT-family encoders
(``BertForSequenceClassification``: the prefix keys/values extend every self-attention; train the
head with ``modules_to_save=["classifier"]``, as HF PEFT's ``SEQ_CLS`` does). Not supported (a
``ValueError`` naming the model type): encoder-decoder models, models whose forward takes no
cache (DistilBERT, ...), layers of different key/value shapes, gradient checkpointing (the models
drop the cache there, as HF PEFT notes), static caches and chunked prefill.

Files are HF PEFT's (``peft_type`` ``"PREFIX_TUNING"``): ``adapter_model.safetensors`` holds
``prompt_embeddings`` at the top level, ``P`` as HF PEFT saves it: ``(n, num_layers·2·token_dim)``,
with ``prefix_projection`` the MLP's output (loading such a file gives an inference-mode prefix of
just ``P``, as ``PeftModel.from_pretrained`` does); modules trained in full as
``base_model.<path>.<param>``. ``adapter_config.json`` holds ``num_virtual_tokens``,
``token_dim``, ``num_layers``, ``num_attention_heads`` (the key/value heads), ``encoder_hidden_size``,
``prefix_projection``, ``num_transformer_submodules`` (1) and ``modules_to_save``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._base import AdapterLayer, ModulesToSave, freeze_all_but_adapters, inside_any
from lightning_peft.methods import Method, planned_injection, register
from lightning_peft.methods._virtual_tokens import PrefixModulesToSave, saved_module_names, task_type
from lightning_peft.targeting import check_module_names, find_modules, get_parent, peft_modules_to_save

ENCODER_NAME = "prefix_encoder"
"""Attribute of the transformers model that holds the :class:`PrefixEncoder`."""

_CACHE_ARGS = ("cache", "past_key_values")  # transformers 5's name first, the deprecated one second
_ONE_CALL = "_lightning_peft_prefix_only"  # marks a cache made for one call without use_cache


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class PrefixTuningConfig:
    """What :func:`apply_prefix_tuning` injects (HF PEFT's ``PrefixTuningConfig`` field names)."""

    num_virtual_tokens: int = 20
    """``n``, the number of virtual tokens (prefix positions) every layer attends to."""
    prefix_projection: bool = False
    """Reparameterise the prefix by an MLP (prefix tuning, Li and Liang); ``False``: learn the
    prefix keys/values directly (P-tuning v2)."""
    encoder_hidden_size: int | None = None
    """Hidden width of the MLP (``prefix_projection``); None: ``token_dim``, as HF PEFT."""
    token_dim: int | None = None
    """Width of one layer's keys (values): ``num_key_value_heads·head_dim``. None: from the model's
    config (HF PEFT's rule); a value must agree with it."""
    num_layers: int | None = None
    """Number of layers that get a prefix. None: the model's ``num_hidden_layers``; a value must
    agree with it."""
    num_attention_heads: int | None = None
    """Key/value heads of one layer. None: the model's (``num_key_value_heads`` under grouped-query
    attention); a value must agree with it."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, as trainable copies (a classifier head: ``["classifier"]``)."""
    init_weights: str | None = None
    """``None``: ``nn.Embedding``/``nn.Linear``'s default initialisation (HF PEFT's); ``"zero"``:
    the prefix (or the MLP's last layer) starts at zero. A fresh prefix is never without effect:
    zero keys still take attention."""
    inference_mode: bool = False
    """Hold only the prefix ``P`` (no MLP), as loaded from a file: what ``load_adapter`` injects for
    a file written with ``prefix_projection``."""

    def __post_init__(self) -> None:
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer (the prefix length), got "
                             f"{self.num_virtual_tokens!r}")
        for name in ("encoder_hidden_size", "token_dim", "num_layers", "num_attention_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None (from the model), got {value!r}")
        for flag in ("prefix_projection", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool (True or False), got {getattr(self, flag)!r}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None (default initialisation) or 'zero', got "
                             f"{self.init_weights!r}")
        self.modules_to_save = check_module_names(self.modules_to_save, "modules_to_save")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# The prefix and the hook that puts it into every call
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """The key/value layout of a model's attention layers."""

    num_layers: int
    num_heads: int  # key/value heads
    token_dim: int  # num_heads·head_dim


class PrefixEncoder(AdapterLayer):
    """The trainable prefix ``P`` (n, num_layers·2·token_dim) of every layer's keys and values,
    directly (``embedding``) or as an MLP's output (``embedding`` -> ``transform``), HF PEFT's
    ``PrefixEncoder``; held by the transformers model as ``prefix_encoder``. Its
    :meth:`inject` is the forward pre-hook that passes the prefix to the model."""

    no_merge = "prefixes the attention carries"

    runs_base_when_disabled = True

    keys_from_root = True  # HF PEFT's top-level ``prompt_embeddings``
    adapter_dtype = torch.float32  # created in fp32, as HF PEFT's prompt encoder; kept through casts

    def __init__(self, num_virtual_tokens: int, layout: _Layout, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None, init_weights: str | None = None,
                 inference_mode: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers, self.num_heads = layout.num_layers, layout.num_heads
        self.token_dim = layout.token_dim
        self.prefix_projection = prefix_projection
        self.encoder_hidden_size = encoder_hidden_size or layout.token_dim
        self.init_weights = init_weights
        self.inference_mode = inference_mode
        self.projecting = prefix_projection and not inference_mode
        width = layout.num_layers * 2 * layout.token_dim
        factory = {"device": device, "dtype": torch.float32}
        if self.projecting:
            self.embedding = nn.Embedding(num_virtual_tokens, layout.token_dim, **factory)
            self.transform = nn.Sequential(nn.Linear(layout.token_dim, self.encoder_hidden_size, **factory),
                                           nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, width, **factory))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width, **factory)
        self._call_args: tuple[str, ...] = ()  # the hooked forward's positional parameter names
        self._cache_arg = "cache"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Embedding``/``nn.Linear`` defaults; with ``init_weights="zero"`` the prefix (or the
        MLP's last layer) is zero, as HF PEFT does."""
        if self.embedding.weight.is_meta:
            return
        modules = [self.embedding, *(self.transform if self.projecting else ())]
        for module in modules:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if self.init_weights == "zero":
            with torch.no_grad():
                last = self.transform[-1] if self.projecting else self.embedding
                for param in last.parameters():
                    param.zero_()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        params = {"embedding.weight": self.embedding.weight}
        if self.projecting:
            params.update({f"transform.{n}": p for n, p in self.transform.named_parameters()})
        return params

    def file_key(self, name: str) -> str:
        return "prompt_embeddings" if name == "embedding.weight" else name

    def file_tensors(self) -> dict[str, Tensor] | None:
        """What the adapter file holds, when it is not the parameters: with a projecting MLP, its
        output ``P`` under ``prompt_embeddings`` (HF PEFT's ``get_prompt_embedding_to_save``)."""
        if not self.projecting:
            return None
        with torch.no_grad():
            return {"prompt_embeddings": self.prefix().detach()}

    def prefix(self) -> Tensor:
        """``P``: (n, num_layers·2·token_dim)."""
        if self.projecting:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def past_key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the prefix keys and values, each (batch, kv_heads, n, head_dim) in ``dtype``."""
        n, heads = self.num_virtual_tokens, self.num_heads
        p = self.prefix().to(dtype)  # (n, L·2·token_dim)
        p = p.view(n, 2 * self.num_layers, heads, self.token_dim // heads)  # (n, 2L, heads, head_dim)
        p = p.permute(1, 2, 0, 3).unsqueeze(1)  # (2L, 1, heads, n, head_dim)
        p = p.expand(-1, batch, -1, -1, -1)  # (2L, batch, heads, n, head_dim)
        return [(p[2 * layer], p[2 * layer + 1]) for layer in range(self.num_layers)]

    def bind(self, module: nn.Module) -> None:
        """Learn how the hooked ``module`` is called (its positional parameters, its cache's name)."""
        params = inspect.signature(module.forward).parameters
        self._call_args = tuple(name for name, p in params.items()
                                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        self._cache_arg = next(name for name in _CACHE_ARGS if name in params)

    def inject(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Forward pre-hook of the transformers model: the prefix in the cache (once), the mask
        and the positions extended by it. See the module docstring."""
        from transformers import Cache, DynamicCache

        if self.__dict__.get("_disabled", False):  # disable_adapters: the base model's call
            return args, kwargs
        kwargs = dict(kwargs)
        if len(args) > len(self._call_args):
            raise TypeError(f"{type(module).__name__}.forward takes at most {len(self._call_args)} "
                            f"positional arguments, {len(args)} were given")
        for name, value in zip(self._call_args, args):
            if name in kwargs:
                raise TypeError(f"{type(module).__name__}.forward got multiple values for argument {name!r}")
            kwargs[name] = value
        for name in _CACHE_ARGS:  # a cache passed under the other name (transformers renamed it)
            if name != self._cache_arg and name in kwargs:
                value = kwargs.pop(name)
                if kwargs.get(self._cache_arg) is None:
                    kwargs[self._cache_arg] = value
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs.get("inputs_embeds")
        if reference is None:
            return (), kwargs  # the model raises its own error
        if module.training and _checkpointing(module):
            raise ValueError(f"prefix tuning does not work with gradient checkpointing: "
                             f"{type(module).__name__} drops the cache (the prefix) in checkpointed "
                             f"layers; disable it with model.gradient_checkpointing_disable()")
        batch, n = reference.shape[0], self.num_virtual_tokens
        cache = kwargs.get(self._cache_arg)
        if getattr(cache, _ONE_CALL, False):  # made by this hook for a call without use_cache: the
            cache = None  # model returned it, generate(use_cache=False) passes it back; start afresh
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(f"prefix tuning needs a transformers Cache object as {self._cache_arg}, got "
                             f"{type(cache).__name__}")
        if cache is None or cache.get_seq_length() == 0:
            if cache is None:
                cache = DynamicCache(config=module.config)
                use_cache = kwargs.get("use_cache")
                if not (getattr(module.config, "use_cache", False) if use_cache is None else use_cache):
                    setattr(cache, _ONE_CALL, True)
            elif not isinstance(cache, DynamicCache):
                raise ValueError(f"prefix tuning fills a DynamicCache with the prefix; got a "
                                 f"{type(cache).__name__} (static caches are not supported)")
            dtype = module.dtype if module.dtype.is_floating_point else self.embedding.weight.dtype
            for layer, (keys, values) in enumerate(self.past_key_values(batch, dtype)):
                cache.update(keys.to(reference.device), values.to(reference.device), layer)
            kwargs[self._cache_arg] = cache
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise ValueError(f"prefix tuning extends a 2-D attention_mask (batch, length) by the prefix; "
                                 f"got {type(mask).__name__}"
                                 f"{'' if not isinstance(mask, Tensor) else f' of {mask.dim()} dimensions'}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            kwargs["position_ids"] = positions + n
        return (), kwargs


def _checkpointing(module: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on in the transformers ``module``."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5's first
        if hasattr(type(module), name):
            return bool(getattr(module, name))
    return False


# --------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------


def _root(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (``model`` itself, or the one a LightningModule
    holds), or a ``ValueError``."""
    from lightning_peft.io import _transformers_root

    _, root = _transformers_root(model)
    if getattr(root, "config", None) is None or not hasattr(root, "base_model"):
        raise ValueError(f"prefix tuning needs a transformers model (a PreTrainedModel with a config), "
                         f"got {type(model).__name__}")
    return root


def _config_value(config: Any, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_layout(root: nn.Module) -> _Layout:
    """The key/value layout of a transformers model, by HF PEFT's rules (``num_key_value_heads``
    and ``head_dim`` under grouped-query attention); a ``ValueError`` naming the model type where
    its attention cannot take a prefix."""
    config = root.config
    kind = getattr(config, "model_type", type(root).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"prefix tuning supports decoder-only and encoder-only models; model type "
                         f"{kind!r} is an encoder-decoder model")
    fields = config.to_dict()
    if fields.get("per_layer_config") or fields.get("global_head_dim"):
        raise ValueError(f"prefix tuning needs one key/value shape for every layer; model type {kind!r} has "
                         f"layers of different shapes")
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise ValueError(f"prefix tuning needs attention layers with a key/value cache; model type {kind!r} "
                         f"has {other} layers")
    layers = _config_value(config, ("num_hidden_layers", "num_layers", "n_layer"))
    hidden = _config_value(config, ("hidden_size", "n_embd", "d_model"))
    heads = _config_value(config, ("num_attention_heads", "n_head", "num_heads"))
    if not all(isinstance(v, int) and v > 0 for v in (layers, hidden, heads)):
        raise ValueError(f"model type {kind!r}: cannot read the number of layers, the hidden size and the "
                         f"attention heads from its config, which prefix tuning needs")
    token_dim = hidden
    if fields.get("num_key_value_heads"):
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        heads = config.num_key_value_heads
        token_dim = head_dim * heads
    if token_dim % heads:
        raise ValueError(f"model type {kind!r}: key width {token_dim} is not a multiple of its {heads} heads")
    return _Layout(layers, heads, token_dim)


def _entry_module(root: nn.Module) -> nn.Module:
    """The module whose forward takes the cache: the model itself, else its backbone (BERT's
    ``bert`` under ``BertForSequenceClassification``)."""
    for module in dict.fromkeys((root, root.base_model)):
        params = inspect.signature(module.forward).parameters
        if any(name in params for name in _CACHE_ARGS):
            return module
    kind = getattr(root.config, "model_type", type(root).__name__)
    raise ValueError(f"prefix tuning passes the prefix as a key/value cache, but the forward of model type "
                     f"{kind!r} ({type(root).__name__}) takes no cache")


def prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    """The :class:`PrefixEncoder` of ``model`` (or of the transformers model inside it), or None."""
    return next((m for m in model.modules() if isinstance(m, PrefixEncoder)), None)


def _plan(model: nn.Module, config: PrefixTuningConfig) -> tuple[nn.Module, _Layout, nn.Module, list[str]]:
    """Check ``config`` against ``model`` (read only): ``(transformers model, layout, hooked module,
    modules to train in full)``."""
    root = _root(model)
    layout = model_layout(root)
    given = {"token_dim": layout.token_dim, "num_layers": layout.num_layers,
             "num_attention_heads": layout.num_heads}
    for name, value in given.items():
        if getattr(config, name) is not None and getattr(config, name) != value:
            raise ValueError(f"{name} is {getattr(config, name)}, but model type "
                             f"{getattr(root.config, 'model_type', '?')!r} has {value} (leave it None)")
    max_positions = getattr(root.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and config.num_virtual_tokens >= max_positions:
        raise ValueError(f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for the input: the "
                         f"prefix takes the first positions and the model has {max_positions} "
                         f"(max_position_embeddings)")
    entry = _entry_module(root)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in root.modules()):
        raise ValueError(f"prefix tuning does not work with gradient checkpointing ({type(root).__name__} "
                         f"drops the cache in checkpointed layers); disable it first")
    existing = prefix_encoder(root)
    if existing is not None:
        have = (existing.num_virtual_tokens, existing.prefix_projection, existing.inference_mode)
        want = (config.num_virtual_tokens, config.prefix_projection, config.inference_mode)
        if have != want:
            raise ValueError(f"the model already carries a prefix (num_virtual_tokens, prefix_projection, "
                             f"inference_mode) = {have}, not {want}")
    saved = find_modules(root, config.modules_to_save, "modules_to_save") if config.modules_to_save else []
    saved = [s for s in saved if not inside_any(s, [ENCODER_NAME])]
    return root, layout, entry, saved


def apply_prefix_tuning(model: nn.Module, num_virtual_tokens: int = 20, prefix_projection: bool = False,
                        encoder_hidden_size: int | None = None, token_dim: int | None = None,
                        num_layers: int | None = None, num_attention_heads: int | None = None,
                        modules_to_save: Sequence[str] | None = None, init_weights: str | None = None,
                        inference_mode: bool = False, config: PrefixTuningConfig | None = None) -> nn.Module:
    """Give every attention layer of the transformers ``model`` (or of the one inside a
    LightningModule) ``num_virtual_tokens`` trainable key/value prefix positions, freeze everything
    else, and return ``model``.

    ``prefix_projection=True`` is prefix tuning (Li and Liang: the prefix is an MLP's output);
    ``False`` is P-tuning v2 (Liu et al.: the prefix itself is learned). Arguments are the fields of
    :class:`PrefixTuningConfig` (or pass ``config=`` alone). Callers change nothing: a forward
    pre-hook passes the prefix to every call (``forward``, ``generate`` with or without the KV
    cache, training). Applying twice is harmless. Everything is checked before the model changes.
    """
    keywords = {"num_virtual_tokens": num_virtual_tokens, "prefix_projection": prefix_projection,
                "encoder_hidden_size": encoder_hidden_size, "token_dim": token_dim, "num_layers": num_layers,
                "num_attention_heads": num_attention_heads, "modules_to_save": modules_to_save,
                "init_weights": init_weights, "inference_mode": inference_mode}
    if config is None:
        config = PrefixTuningConfig(**{**keywords, "modules_to_save": list(modules_to_save)
                                       if modules_to_save is not None and not isinstance(modules_to_save, str)
                                       else modules_to_save})
    elif not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"config must be a PrefixTuningConfig, got {type(config).__name__}")
    else:
        defaults = {f.name: f.default for f in PrefixTuningConfig.__dataclass_fields__.values()}
        given = [k for k, v in keywords.items() if v != defaults[k]]
        if given:
            raise ValueError(f"pass either config= or the keyword arguments, not both: {given} given "
                             f"beside config")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    root, layout, entry, saved = _plan(model, config)
    if prefix_encoder(root) is None:
        device = next((p.device for p in root.parameters()), None)
        encoder = PrefixEncoder(config.num_virtual_tokens, layout, prefix_projection=config.prefix_projection,
                                encoder_hidden_size=config.encoder_hidden_size,
                                init_weights=config.init_weights, inference_mode=config.inference_mode,
                                device=device)
        encoder.bind(entry)
        root.add_module(ENCODER_NAME, encoder)
        entry.register_forward_pre_hook(encoder.inject, with_kwargs=True)
    for name in saved:
        module = root.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            parent, child = get_parent(root, name)
            setattr(parent, child, PrefixModulesToSave(module, name))
    freeze_all_but_adapters(model)
    return model


# --------------------------------------------------------------------------------------------
# Files (the registry entry's hooks)
# --------------------------------------------------------------------------------------------


def _to_json(root: nn.Module) -> dict[str, Any]:
    """HF PEFT's ``PrefixTuningConfig`` fields describing the prefix of ``root``."""
    encoder = prefix_encoder(root)
    if encoder is None:
        raise ValueError(f"{type(root).__name__} has no prefix to save; apply_prefix_tuning(model, ...) "
                         f"first")
    return {  # io adds peft_type, base_model_name_or_path, revision, inference_mode
        "task_type": task_type(root),
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "token_dim": encoder.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": encoder.num_heads,
        "num_layers": encoder.num_layers,
        "encoder_hidden_size": encoder.encoder_hidden_size,
        "prefix_projection": encoder.prefix_projection,
        "init_weights": None,
        "modules_to_save": saved_module_names(root),
    }


def _config_from_json(model: nn.Module, config: dict[str, Any], where: str) -> PrefixTuningConfig:
    """Check every field of a PREFIX_TUNING ``adapter_config.json`` (a ``ValueError`` naming the field
    and ``where``) and build the inference-mode :class:`PrefixTuningConfig` it describes."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}, not 'PREFIX_TUNING'")
    for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                "encoder_hidden_size"):
        value = config.get(key)
        if key == "num_virtual_tokens" or value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise ValueError(f"{where}: num_transformer_submodules is {config['num_transformer_submodules']!r}; "
                         f"only 1 (decoder-only and encoder models) is supported")
    for key in ("prefix_projection", "inference_mode"):
        if key in config and not isinstance(config[key], bool):
            raise ValueError(f"{where}: {key} must be true or false (a JSON boolean), got {config[key]!r}")
    if config.get("init_weights") not in (None, "zero"):
        raise ValueError(f"{where}: init_weights must be null or 'zero', got {config['init_weights']!r}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) and s for s in saved)):
        raise ValueError(f"{where}: modules_to_save must be a list of module names or null, got {saved!r}")
    try:
        root = _root(model)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    entries = peft_modules_to_save(root, saved)
    try:
        return PrefixTuningConfig(num_virtual_tokens=config["num_virtual_tokens"],
                                  prefix_projection=config.get("prefix_projection", False),
                                  encoder_hidden_size=config.get("encoder_hidden_size"),
                                  token_dim=config.get("token_dim"), num_layers=config.get("num_layers"),
                                  num_attention_heads=config.get("num_attention_heads"),
                                  modules_to_save=entries or None, inference_mode=True)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    parsed = _config_from_json(model, config, where)
    return planned_injection(model, parsed, where, _plan, apply_prefix_tuning)


def _update_from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[], None]:
    """Loading into a model that already carries a prefix: the file's prefix must have its length,
    and a prefix computed by an MLP cannot take a file's values (HF PEFT cannot invert it either)."""
    parsed = _config_from_json(model, config, where)
    encoder = prefix_encoder(model)
    if encoder is not None and encoder.projecting:
        raise ValueError(f"{where}: the model's prefix is computed by an MLP (prefix_projection, training "
                         f"mode), which cannot take the saved prefix values; load the file into a model "
                         f"without a prefix")
    if encoder is not None and encoder.num_virtual_tokens != parsed.num_virtual_tokens:
        raise ValueError(f"{where}: num_virtual_tokens is {parsed.num_virtual_tokens}, the model's prefix "
                         f"has {encoder.num_virtual_tokens}")
    return lambda: None


def _detect(model: nn.Module) -> bool:
    return prefix_encoder(model) is not None


METHOD = register(Method(
    name="prefix_tuning",
    config_class=PrefixTuningConfig,
    peft_type="PREFIX_TUNING",
    apply=apply_prefix_tuning,
    detect=_detect,
    to_json=_to_json,
    from_json=_from_json,
    update_from_json=_update_from_json,
    bound_fields=("peft_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                  "modules_to_save"),
    file_prefix="",
    aliases=("p_tuning_v2",),
))

__all__ = ["METHOD", "PrefixEncoder", "PrefixTuningConfig", "apply_prefix_tuning", "model_layout",
           "prefix_encoder"]
