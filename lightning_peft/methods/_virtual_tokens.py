"""What the three prompt-learning methods share (prompt tuning, P-tuning, multitask prompt
tuning): n virtual token embeddings inserted into the input of a frozen transformers model.

The prompt lives in a :class:`VirtualTokens` layer registered as the submodule ``prompt_encoder``
of the transformers model (the root :func:`lightning_peft.io._transformers_root` finds), and a
forward pre-hook on that model rewrites every call, so that no caller needs to know the virtual
tokens are there (a LightningModule calling ``model(**batch)``, ``model.generate()``,
:func:`lightning_peft.evaluation.generate_answers`)::

    input_ids (B, L) ──► word embeddings ──► [ P (B, n, d) ; E (B, L, d) ] ──► inputs_embeds (B, n+L, d)
    attention_mask (B, L)                    [ 1 … 1 ; mask ]               (B, n+L)
    labels (B, L)                            [ -100 … -100 ; labels ]       (B, n+L): no loss on P
    token_type_ids (B, L)                    [ 0 … 0 ; token_type_ids ]     (B, n+L)
    position_ids (B, L)                      [ 0 … n-1 ; position_ids + n ] (B, n+L)

This is HF PEFT's ``PeftModelForCausalLM``/``PeftModelForSequenceClassification`` prompt-learning
forward, so the outputs (logits over the n+L positions included) equal PEFT's for the same
adapter. PEFT drops ``position_ids``; we shift them, which is the same thing for unpadded input
(``arange``) and keeps the positions of left-padded rows right. Class labels (one per row) are not
touched. With a KV cache (``generate``) the prompt is inserted on the prefill step only (empty
cache); on later steps the attention mask is extended and the positions shifted by n.

Adapter files are HF PEFT's: ``prompt_embeddings`` (n, d) at the top level (``file_prefix=""``,
``keys_from_root``), and PEFT's ``PromptLearningConfig`` fields (``num_virtual_tokens``,
``token_dim``, ``num_transformer_submodules``, ``num_attention_heads``, ``num_layers``,
``modules_to_save``). A module named by ``modules_to_save`` (a fresh classifier head, as HF PEFT's
``SEQ_CLS`` adds) is trained in full as a :class:`PrefixModulesToSave` copy, saved under PEFT's
prompt-learning keys ``base_model.<path>.<param>``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._base import AdapterLayer, ModulesToSave, freeze_all_but_adapters, inside_any
from lightning_peft.targeting import find_modules, get_parent, peft_modules_to_save

PROMPT_ATTR = "prompt_encoder"
"""Name of the prompt layer as a submodule of the transformers model."""

TEMPLATES = ("prefix", "mask")
"""Where the virtual tokens go: ``"prefix"`` before the input (HF PEFT's layout), ``"mask"``
around the input's [MASK] token as P-tuning's (P1, x, P2, [MASK], P3) for a bidirectional model."""


def check_num_virtual_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` as one of ``choices`` (case-insensitive), else a ``ValueError`` naming ``name``."""
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def transformers_root(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` that gets the prompt (it must have input
    embeddings); a ``ValueError`` when there is none."""
    from lightning_peft.io import _transformers_root

    _, root = _transformers_root(model)
    get = getattr(root, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(f"prompt methods need a transformers model with input embeddings (one "
                         f"PreTrainedModel inside {type(model).__name__}); found {type(root).__name__}")
    config = getattr(root, "config", None)
    if getattr(config, "is_encoder_decoder", False):  # generate calls the encoder past the prompt
        kind = getattr(config, "model_type", type(root).__name__)
        raise ValueError(f"prompt methods support decoder-only and encoder-only models; model type "
                         f"{kind!r} is an encoder-decoder model")
    return root


def token_dim(root: nn.Module) -> int:
    return int(root.get_input_embeddings().weight.shape[1])


def is_causal_lm(root: nn.Module) -> bool:
    return type(root).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def task_type(root: nn.Module) -> str | None:
    """HF PEFT's ``task_type`` for the model (which PeftModel class loads the file). For
    ``SEQ_CLS`` PEFT's class always trains and saves the head (``classifier``/``score``) and
    loads a file only with it: a warning says so when the model's head is not saved."""
    name = type(root).__name__
    if is_causal_lm(root):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        heads = [p for p in saved_module_names(root) or [] if p.rpartition(".")[2] in ("classifier", "score")]
        if not heads:
            warnings.warn(f"{name}: HF PEFT loads a SEQ_CLS prompt-learning file only with the "
                          "classification head in it (its PeftModelForSequenceClassification trains and "
                          "saves 'classifier'/'score'); this head is frozen, not in modules_to_save, so "
                          "the file loads here but not with peft's PeftModel.from_pretrained. Apply with "
                          "modules_to_save=['classifier'] (or 'score') to train and save it as HF PEFT "
                          "does", stacklevel=3)
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def prompt_layer(model: nn.Module) -> VirtualTokens | None:
    return next((m for m in model.modules() if isinstance(m, VirtualTokens)), None)


def common_json(root: nn.Module, layer: VirtualTokens) -> dict[str, Any]:
    """HF PEFT's ``PromptLearningConfig`` fields for ``layer`` on ``root``."""
    config = getattr(root, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"task_type": task_type(root), "num_virtual_tokens": layer.num_virtual_tokens,
            "token_dim": layer.token_dim, "num_transformer_submodules": 1,
            "num_attention_heads": getattr(text, "num_attention_heads", None),
            "num_layers": getattr(text, "num_hidden_layers", None),
            "modules_to_save": saved_module_names(root)}


def check_common_json(root: nn.Module, config: dict[str, Any], where: str) -> int:
    """Check the ``PromptLearningConfig`` fields of a file against ``root``; return
    ``num_virtual_tokens``."""
    try:
        n = check_num_virtual_tokens(config.get("num_virtual_tokens"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    dim = config.get("token_dim")
    if dim is not None and dim != token_dim(root):
        raise ValueError(f"{where}: token_dim is {dim!r} but the model's embeddings are "
                         f"{token_dim(root)} wide")
    subs = config.get("num_transformer_submodules")
    if subs not in (None, 1):
        raise ValueError(f"{where}: num_transformer_submodules must be 1 (encoder-decoder prompts are not "
                         f"supported), got {subs!r}")
    read_modules_to_save(root, config, where)
    return n


# --------------------------------------------------------------------------------------------
# Modules trained in full beside the prompt (a classifier head: ``modules_to_save``)
# --------------------------------------------------------------------------------------------


class PrefixModulesToSave(ModulesToSave):
    """A module trained in full beside a prompt or prefix, keyed in files as HF PEFT's
    prompt-learning models key it: ``base_model.<path>.<param>`` (``path`` from the transformers
    model)."""

    keys_from_root = True

    def __init__(self, module: nn.Module, path: str) -> None:
        super().__init__(module)
        self.path = path

    def file_key(self, name: str) -> str:
        return f"base_model.{self.path}.{super().file_key(name)}"


def saved_module_names(root: nn.Module) -> list[str] | None:
    """The paths (from ``root``) of the modules trained in full, sorted, or None."""
    return sorted(m.path for m in root.modules() if isinstance(m, PrefixModulesToSave)) or None


def plan_modules_to_save(root: nn.Module, names: Sequence[str] | None, skip: Sequence[str] = (PROMPT_ATTR,)
                         ) -> list[str]:
    """The paths of the modules of ``root`` that ``names`` (``modules_to_save``) select, none inside
    the prompt layer (``skip``); a ``ValueError`` naming an entry that matches nothing. Read only."""
    saved = find_modules(root, names, "modules_to_save") if names else []
    return [s for s in saved if not inside_any(s, skip)]


def wrap_modules_to_save(root: nn.Module, paths: Sequence[str]) -> None:
    """Replace each module of ``root`` at ``paths`` by a :class:`PrefixModulesToSave` (once)."""
    for name in paths:
        module = root.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            parent, child = get_parent(root, name)
            setattr(parent, child, PrefixModulesToSave(module, name))


def read_modules_to_save(root: nn.Module, config: dict[str, Any], where: str) -> list[str] | None:
    """A file's ``modules_to_save``, checked, as the full names of the modules HF PEFT selects with
    it (:func:`~lightning_peft.targeting.peft_modules_to_save`)."""
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) and s for s in saved)):
        raise ValueError(f"{where}: modules_to_save must be a list of module names or null, got {saved!r}")
    return peft_modules_to_save(root, saved) or None


# --------------------------------------------------------------------------------------------
# The layer and its hook
# --------------------------------------------------------------------------------------------


class VirtualTokens(AdapterLayer):
    """A prompt of ``num_virtual_tokens`` embeddings of width ``token_dim`` (kept in float32, as
    HF PEFT keeps them) that a forward pre-hook on the transformers model inserts into its input.
    Subclasses compute the prompt in :meth:`prompt`."""

    no_merge = "virtual tokens the input carries"

    runs_base_when_disabled = True

    keys_from_root = True
    adapter_dtype = torch.float32

    def __init__(self, num_virtual_tokens: int, token_dim: int, template: str = "prefix",
                 template_split: Sequence[int] | None = None, mask_token_id: int | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens, self.token_dim = num_virtual_tokens, token_dim
        self.template = template
        self.template_split = tuple(template_split) if template_split is not None else None
        self.mask_token_id = mask_token_id
        self._arg_names: tuple[str, ...] = ()

    def prompt(self, batch_size: int, task_ids: Tensor | None) -> Tensor:
        """The virtual token embeddings, (batch_size, n, d)."""
        raise TypeError(f"{type(self).__name__} must define prompt()")

    def file_key(self, name: str) -> str:
        return {"embedding": "prompt_embeddings"}.get(name, name)

    def attach(self, root: nn.Module) -> None:
        """Register on ``root`` (once) and put the forward pre-hook on it."""
        setattr(root, PROMPT_ATTR, self)
        self._arg_names = tuple(inspect.signature(root.forward).parameters)
        root.register_forward_pre_hook(self._rewrite, with_kwargs=True)

    # -- the hook ------------------------------------------------------------------------------
    def _rewrite(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Rewrite a call of the transformers model: input_ids -> inputs_embeds with the prompt
        inserted, masks, labels and positions extended to match (see the module docstring)."""
        if getattr(model, PROMPT_ATTR, None) is not self:
            return args, kwargs  # detached (another layer took the model's place)
        if self.__dict__.get("_disabled", False):  # disable_adapters: the base model's call
            return args, {k: v for k, v in kwargs.items() if k != "task_ids"}
        kwargs = dict(kwargs)
        if len(args) > len(self._arg_names):
            raise TypeError(f"{type(model).__name__} called with {len(args)} positional arguments")
        for name, value in zip(self._arg_names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"{type(model).__name__} got multiple values for argument {name!r}")
            kwargs[name] = value
        task_ids = kwargs.pop("task_ids", None)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            return (), kwargs
        batch, length = (ids if ids is not None else embeds).shape[:2]
        n = self.num_virtual_tokens
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        decoding = cache is not None and _cache_length(cache) > 0
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError("prompt methods need a 2D attention mask (batch, sequence) or none; a 4D mask "
                             "or a static (compilable) cache is not supported")
        if decoding:  # the prompt is in the cache already: extend the mask, shift the positions
            if self.template != "prefix":
                raise ValueError(f"template={self.template!r} does not support generation with a cache")
            if mask is not None:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            for key in ("position_ids", "cache_position"):
                if kwargs.get(key) is not None:
                    kwargs[key] = kwargs[key] + n
            return (), kwargs
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)  # (B, L, d)
        prompt = self.prompt(batch, task_ids).to(embeds.dtype)  # (B, n, d)
        if self.template == "prefix":
            insert = _prepend
        else:
            if ids is None:
                raise ValueError("template='mask' finds the [MASK] token in input_ids; pass input_ids")
            if kwargs.get("position_ids") is not None:
                raise ValueError("template='mask' does not support position_ids")
            index = self._mask_layout(ids)  # (B, L+n) into [input (L) ; prompt (n)]

            def insert(virtual: Tensor, real: Tensor) -> Tensor:
                both = torch.cat([real, virtual.to(real.device)], dim=1)
                gather = index.to(both.device).view(*index.shape, *([1] * (both.dim() - 2)))
                return torch.gather(both, 1, gather.expand(-1, -1, *both.shape[2:]))
        kwargs["inputs_embeds"] = insert(prompt, embeds)
        kwargs["input_ids"] = None
        if mask is not None:
            kwargs["attention_mask"] = insert(mask.new_ones(batch, n), mask)
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor) and labels.dim() >= 2 and labels.shape[:2] == (batch, length) \
                and not labels.is_floating_point():  # token labels, not multi-label class targets
            kwargs["labels"] = insert(labels.new_full((batch, n, *labels.shape[2:]), -100), labels)
        types = kwargs.get("token_type_ids")
        if isinstance(types, Tensor) and types.shape[:2] == (batch, length):
            kwargs["token_type_ids"] = insert(types.new_zeros(batch, n), types)
        positions = kwargs.get("position_ids")
        if isinstance(positions, Tensor):
            virtual = torch.arange(n, device=positions.device, dtype=positions.dtype)
            virtual = virtual.expand(*positions.shape[:-1], n)
            kwargs["position_ids"] = torch.cat([virtual, positions + n], dim=-1)
        position = kwargs.get("cache_position")
        if isinstance(position, Tensor):
            virtual = torch.arange(n, device=position.device, dtype=position.dtype)
            kwargs["cache_position"] = torch.cat([virtual, position + n])
        return (), kwargs

    # -- the (P1, x, P2, [MASK], P3) layout ----------------------------------------------------
    def split(self) -> tuple[int, int, int]:
        """(n1, n2, n3): the virtual tokens before the input, before [MASK], after [MASK]."""
        if self.template_split is not None:
            return self.template_split  # type: ignore[return-value]
        n = self.num_virtual_tokens
        return n - 2 * (n // 3), n // 3, n // 3

    def mask_index(self, input_ids: Tensor) -> Tensor:
        """Position of the [MASK] token of each row of ``input_ids`` (B,); a ``ValueError`` when
        a row has none."""
        if self.mask_token_id is None:
            raise ValueError("mask_token_id is not set: pass mask_token_id (the tokenizer's mask_token_id)")
        hits = input_ids == self.mask_token_id
        if not bool(hits.any(dim=1).all()):
            rows = (~hits.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"rows {rows[:5]} of input_ids hold no [MASK] token (id {self.mask_token_id})")
        return hits.int().argmax(dim=1)

    def output_positions(self, input_ids: Tensor) -> Tensor:
        """Where the [MASK] token of each row of ``input_ids`` ends up once the prompt is
        inserted (B,)."""
        n1, n2, _ = self.split() if self.template == "mask" else (self.num_virtual_tokens, 0, 0)
        return self.mask_index(input_ids) + n1 + n2

    def _mask_layout(self, ids: Tensor) -> Tensor:
        batch, length = ids.shape
        n1, n2, n3 = self.split()
        m = self.mask_index(ids).tolist()
        rows = []
        for pos in m:
            virtual = [length + k for k in range(n1 + n2 + n3)]
            rows.append([*virtual[:n1], *range(pos), *virtual[n1:n1 + n2], pos, *virtual[n1 + n2:],
                         *range(pos + 1, length)])
        return torch.tensor(rows, dtype=torch.long, device=ids.device)

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}, "
                f"template={self.template}")


def _prepend(virtual: Tensor, real: Tensor) -> Tensor:
    return torch.cat([virtual.to(real.device), real], dim=1)


def _cache_length(cache: Any) -> int:
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuples
        return int(cache[0][0].shape[-2])
    return 0


def install(model: nn.Module, layer_class: type[VirtualTokens], build, num_virtual_tokens: int,
            settings: dict[str, Any] | None = None,
            modules_to_save: Sequence[str] | None = None) -> nn.Module:
    """Add the prompt layer ``build(root)`` to the transformers model of ``model`` unless it is
    there already (idempotent), check that no other prompt method is, wrap the modules named by
    ``modules_to_save`` as trainable copies, freeze the rest. Everything is checked first."""
    root = transformers_root(model)
    saved = plan_modules_to_save(root, modules_to_save)
    existing = prompt_layer(root)
    if existing is not None and not isinstance(existing, layer_class):
        raise ValueError(f"the model already carries a {type(existing).__name__} prompt; one prompt method "
                         f"at a time")
    if existing is not None and existing.num_virtual_tokens != num_virtual_tokens:
        raise ValueError(f"the model already carries a {type(existing).__name__} prompt of "
                         f"num_virtual_tokens={existing.num_virtual_tokens}, not {num_virtual_tokens}; "
                         f"prompts do not stack: use a fresh model")
    if existing is not None:  # ``settings``: layer attributes a second call must agree with (None: any)
        differ = {k: (getattr(existing, k, None), v) for k, v in (settings or {}).items()
                  if v is not None and getattr(existing, k, None) is not None and getattr(existing, k) != v}
        if differ:
            raise ValueError(f"the model already carries a {type(existing).__name__} prompt with "
                             f"{', '.join(f'{k}={a!r}' for k, (a, _) in differ.items())}, not "
                             f"{', '.join(f'{k}={b!r}' for k, (_, b) in differ.items())}; prompts do not "
                             f"stack: use a fresh model")
    max_positions = getattr(getattr(root, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and num_virtual_tokens >= max_positions:
        raise ValueError(f"num_virtual_tokens={num_virtual_tokens} leaves no room for the input: the model "
                         f"has {max_positions} positions (max_position_embeddings)")
    if existing is None:
        layer = build(root)
        layer.attach(root)
    wrap_modules_to_save(root, saved)
    freeze_all_but_adapters(model)
    return model


def init_token_ids(text: str, tokenizer: Any, count: int) -> list[int]:
    """``text`` tokenised, repeated or cut to ``count`` ids (HF PEFT's TEXT init)."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"init_text {text!r} gives no token; give a non-empty text")
    reps = -(-count // len(ids))
    return (ids * reps)[:count]


def tokenizer_name(tokenizer: Any, fallback: str | None) -> str | None:
    if isinstance(tokenizer, str):
        return tokenizer
    name = getattr(tokenizer, "name_or_path", None)
    return name if isinstance(name, str) and name else fallback


__all__ = ["PROMPT_ATTR", "TEMPLATES", "PrefixModulesToSave", "VirtualTokens", "install", "prompt_layer",
           "transformers_root"]
