"""Trainable tokens: train only some rows of the embedding (and of a tied output head).

The recipe of Chinese-LLaMA-Alpaca (Cui, Yang and Yao, 2023, arXiv 2304.08177) extends the
vocabulary and trains the new token embeddings: stage 1 the embeddings alone, stage 2 LoRA plus
the embeddings and the head. When only a handful of tokens are new, only their rows need to
train. For an embedding ``E`` (vocab, d) and the chosen token ids ``T = [t_1, ..., t_n]``::

    E'[t] = V[i]      if t = t_i        V (n, d) trained, starts as E[T] (so the model is unchanged)
    E'[t] = E[t]      otherwise         E frozen

The only trainable tensor is ``V`` (n, d): no (vocab, d) gradient, no mask. A lookup replaces the
rows of the chosen ids after the frozen lookup; an output head tied to the embedding (SmolLM2,
``tie_word_embeddings``) follows the same rows: its logits for the chosen ids become
``h·V[i] + b`` (computed as the frozen logits plus ``h·(V[i] - E[t_i])``, so a fresh layer gives
the base logits bit for bit). Merging writes ``V`` into ``E`` (exact); unmerging writes the kept
original rows back (bit for bit).

Files are HF PEFT's: ``peft_type`` ``"TRAINABLE_TOKENS"`` with ``token_indices`` and
``target_modules`` in ``adapter_config.json``, ``<embedding path>.trainable_tokens_delta`` (the rows'
values, not a difference, despite PEFT's name) in ``adapter_model.safetensors``, and for a tied
head the same values again under ``<head path>.trainable_tokens_delta``. Beside LoRA
(``LoRAConfig(trainable_token_indices=...)``), the rows are stored as
``<embedding path>.token_adapter.trainable_tokens_delta`` inside the LoRA file, as PEFT does.

:func:`add_tokens` extends a tokenizer and its model by new tokens, the new rows of the input
embedding (and of an untied head) set to the mean of the old rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft._base import AdapterLayer, WrapperLayer, freeze_all_but_adapters, inside_any
from lightning_peft.methods import Method, register
from lightning_peft.targeting import embedding_names

LORA_PART_ATTR = "_lightning_peft_lora_part"
"""Set (in ``__dict__``) on the token layers and the modules trained in full that ``apply_lora``
created: they belong to the LoRA adapter (its file and its ``detect``), not to a method of their
own."""


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


def check_token_indices(indices: Any, arg: str = "token_indices") -> list[int]:
    """``indices`` as a list of distinct non-negative ints, or a ``ValueError`` naming ``arg``."""
    if isinstance(indices, tuple) or (isinstance(indices, Tensor) and indices.dim() == 1):
        indices = [int(i) for i in indices.tolist()] if isinstance(indices, Tensor) else list(indices)
    if not isinstance(indices, list) or not indices:
        raise ValueError(f"{arg} must be a non-empty list of token ids (ints), got {indices!r}")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"{arg} must hold non-negative int token ids; these are not: {bad[:8]}")
    seen: set[int] = set()
    dup = sorted({i for i in indices if i in seen or seen.add(i)})
    if dup:
        raise ValueError(f"{arg} lists token ids more than once: {dup[:8]}; each id trains one row")
    return list(indices)


def check_token_spec(spec: Any, arg: str) -> list[int] | dict[str, list[int]]:
    """A list of token ids (for the input embedding) or ``{module name: token ids}``."""
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError(f"{arg} must not be an empty dict; give {{module name: [token ids]}}")
        out = {}
        for key, value in spec.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"{arg} keys must be module names (non-empty strings), got {key!r}")
            out[key] = check_token_indices(value, f"{arg}[{key!r}]")
        return out
    return check_token_indices(spec, arg)


@dataclass
class TrainableTokensConfig:
    """What :func:`apply_trainable_tokens` trains."""

    token_indices: list[int] | None = None
    """The token ids whose rows train (distinct, each below the embedding's number of rows), e.g.
    the ids :func:`add_tokens` returned."""
    target_modules: str | list[str] | None = None
    """The embedding(s) whose rows train: ``None`` for the model's input embedding (found by
    structure: ``get_input_embeddings()``, else the one ``nn.Embedding``), names (exact or dotted
    suffix) or a regex (full match) of ``nn.Embedding``/``nn.Linear`` modules (rows of the
    weight). A head tied to a targeted embedding (the same weight) follows its rows."""

    def __post_init__(self) -> None:
        self.token_indices = check_token_indices(self.token_indices, "token_indices")
        spec = self.target_modules
        if isinstance(spec, tuple):
            spec = list(spec)
        if spec is not None and not (isinstance(spec, str) and spec) and not (
                isinstance(spec, list) and spec and all(isinstance(s, str) and s for s in spec)):
            raise ValueError(f"target_modules must be None, a module name regex or a non-empty list of "
                             f"module names, got {self.target_modules!r}")
        if isinstance(spec, str):
            try:
                re.compile(spec)
            except re.error as err:
                raise ValueError(f"target_modules={spec!r} is not a valid regular expression: {err}") from err
        self.target_modules = spec

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# 2. The layer
# --------------------------------------------------------------------------------------------


class TrainableTokensLayer(WrapperLayer):
    """A frozen ``nn.Embedding`` or ``nn.Linear`` (``base_layer``, weight (rows, d)) whose rows
    ``token_indices`` are replaced by the trainable ``trainable_tokens_delta`` (n, d).

    A layer made with ``tied_to=`` (an output head that shares the embedding's weight) owns no
    tensor: it uses the rows of the layer it is tied to, and is merged when that one is.
    """

    runs_base_when_disabled = True

    def __init__(self, base_layer: nn.Module, token_indices: Sequence[int],
                 tied_to: TrainableTokensLayer | None = None, in_lora: bool = False) -> None:
        super().__init__()
        weight = getattr(base_layer, "weight", None)
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)) or not isinstance(weight, Tensor) \
                or weight.dim() != 2:
            raise ValueError(f"trainable tokens train rows of an nn.Embedding or nn.Linear weight, got "
                             f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self.token_indices = list(token_indices)
        self.in_lora = in_lora
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a submodule
        if tied_to is not None:
            return
        self._merged = False
        dtype = weight.dtype
        # fp32 rows on a base of at most 32 bits, kept through a later cast of the whole model
        # ("bf16-true": lightning_peft._base.restore_adapter_dtypes): small updates to bf16 rows round away
        floats = (torch.float16, torch.bfloat16, torch.float32)
        self.adapter_dtype = torch.float32 if dtype in floats else None
        rows = len(self.token_indices)
        factory = {"device": weight.device}
        index = torch.tensor(self.token_indices, dtype=torch.long, device=weight.device)
        self.register_buffer("index", index, persistent=False)  # (n,)
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, **factory)  # (rows,)
        slot[index] = torch.arange(rows, **factory)
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("trainable_tokens_original",
                             torch.empty(rows, weight.shape[1], dtype=dtype, **factory), persistent=False)
        self.trainable_tokens_delta = nn.Parameter(
            torch.empty(rows, weight.shape[1], dtype=self.adapter_dtype or dtype, **factory))  # (n, d)
        self.reset_parameters()

    @property
    def leader(self) -> TrainableTokensLayer:
        """The layer that owns the rows (itself unless tied)."""
        return self._tied[0] if self._tied else self

    @property
    def merged(self) -> bool:
        return self.leader._merged

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The rows start as the embedding's own rows: the layer computes the base model exactly."""
        if self._tied or self.trainable_tokens_delta.is_meta:
            return
        rows = self.base_layer.weight[self.index]  # (n, d)
        self.trainable_tokens_original.copy_(rows)
        self.trainable_tokens_delta.copy_(rows)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {} if self._tied else {"trainable_tokens_delta": self.trainable_tokens_delta}

    def file_tensors(self) -> dict[str, Tensor] | None:
        """A tied layer: PEFT's standalone files repeat the rows under the head's path; its LoRA
        files do not."""
        if not self._tied:
            return None
        return {} if self.in_lora else {"trainable_tokens_delta": self.leader.trainable_tokens_delta}

    def file_key(self, name: str) -> str:
        return f"token_adapter.{name}" if self.in_lora else name

    @torch.no_grad()
    def merge(self) -> None:
        """Write the trained rows into the base weight (shared with a tied head)."""
        lead = self.leader
        if lead._merged:
            return
        weight = lead.base_layer.weight
        weight.index_copy_(0, lead.index, lead.trainable_tokens_delta.to(weight.dtype))
        lead._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Write the original rows back: the base weight bit for bit."""
        lead = self.leader
        if not lead._merged:
            return
        weight = lead.base_layer.weight
        weight.index_copy_(0, lead.index, lead.trainable_tokens_original.to(weight.dtype))
        lead._merged = False

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or self.__dict__.get("_disabled", False):
            return out
        lead = self.leader
        rows = lead.trainable_tokens_delta
        if isinstance(self.base_layer, nn.Embedding):
            pos = lead.slot[x]  # (...,), -1 where the id does not train
            picked = rows[pos.clamp(min=0)].to(out.dtype)  # (..., d)
            scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma)
            if scale is not None:
                picked = picked * (scale.to(out.dtype) if isinstance(scale, Tensor) else scale)
            return torch.where((pos >= 0).unsqueeze(-1), picked, out)
        # an output head: logits of the chosen ids become h·V[i] + b
        change = (rows - lead.trainable_tokens_original.to(rows.dtype)).to(x.dtype)  # (n, d)
        return out.index_add(-1, lead.index, F.linear(x, change).to(out.dtype))  # (..., n) added

    def extra_repr(self) -> str:
        shown = self.token_indices[:8]
        more = f", ... ({len(self.token_indices)} in all)" if len(self.token_indices) > 8 else ""
        return f"token_indices={shown}{more}" + (", tied" if self._tied else "")


def token_layers(model: nn.Module) -> list[tuple[str, TrainableTokensLayer]]:
    """``(name, layer)`` of every trainable-tokens layer of ``model`` (tied ones included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokensLayer)]


# --------------------------------------------------------------------------------------------
# 3. Planning and injecting
# --------------------------------------------------------------------------------------------


def input_embedding_name(model: nn.Module) -> str:
    """The name of the input embedding of ``model``: ``get_input_embeddings()`` of the outermost
    transformers model inside, else the only ``nn.Embedding``; a ``ValueError`` otherwise."""
    names = embedding_names(model, "input")
    if names:
        return names[0]
    found = [n for n, m in model.named_modules()
             if n and isinstance(m, (nn.Embedding, TrainableTokensLayer))
             and not any(n.startswith(t + ".") for t, _ in token_layers(model))]
    if len(found) == 1:
        return found[0]
    raise ValueError(f"cannot tell the input embedding of {type(model).__name__} "
                     f"({len(found)} nn.Embedding modules: {found[:6]}); name it in target_modules")


def _rows_weight(module: nn.Module) -> Tensor | None:
    base = module.base_layer if isinstance(module, TrainableTokensLayer) else module
    return getattr(base, "weight", None) if isinstance(base, (nn.Embedding, nn.Linear)) else None


def plan_tokens(model: nn.Module, spec: list[int] | dict[str, list[int]],
                target_modules: str | list[str] | None, arg: str,
                ) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Check where token ids train on ``model`` (read only): ``({leader name: ids}, {tied head
    name: leader name})``. ``spec`` is a list (for ``target_modules``, default the input
    embedding) or ``{module name: ids}``. A ``ValueError`` names ``arg`` for ids out of range,
    modules that are not embeddings/linear layers, and tied heads given other ids."""
    names = [n for n, _ in model.named_modules() if n]
    inner = [n for n, m in token_layers(model)]
    free = [n for n in names if not any(n.startswith(t + ".") for t in inner)]
    if isinstance(spec, dict):
        wanted: dict[str, list[int]] = {}
        for key, ids in spec.items():
            hits = [n for n in free if n == key or n.endswith("." + key)]
            if not hits:
                raise ValueError(f"{arg} key {key!r} matches no module of {type(model).__name__}; "
                                 f"its embeddings are {_embeddings(model)}")
            for hit in hits:
                wanted[hit] = ids
    elif target_modules is None:
        wanted = {input_embedding_name(model): spec}
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        hits = [n for n in free if pattern.fullmatch(n)]
        if not hits:
            raise ValueError(f"target_modules={target_modules!r} matches no module; the embeddings are "
                             f"{_embeddings(model)}")
        wanted = dict.fromkeys(hits, spec)
    else:
        wanted = {}
        for entry in target_modules:
            hits = [n for n in free if n == entry or n.endswith("." + entry)]
            if not hits:
                raise ValueError(f"target_modules entry {entry!r} matches no module; the embeddings are "
                                 f"{_embeddings(model)}")
            wanted.update(dict.fromkeys(hits, spec))
    for name, ids in wanted.items():
        weight = _rows_weight(model.get_submodule(name))
        if weight is None:
            raise ValueError(f"{arg}: {name!r} is a {type(model.get_submodule(name)).__name__}; trainable "
                             f"tokens train rows of nn.Embedding or nn.Linear weights: {_embeddings(model)}")
        out = [i for i in ids if i >= weight.shape[0]]
        if out:
            raise ValueError(f"{arg}: token ids {out[:8]} are out of range for {name!r}, which has "
                             f"{weight.shape[0]} rows (valid ids 0..{weight.shape[0] - 1}); extend the "
                             f"vocabulary first (lightning_peft.add_tokens)")
    # heads tied to a targeted embedding (the same weight) follow it
    tied: dict[str, str] = {}
    leaders: dict[int, str] = {}
    for name in wanted:  # of names sharing one weight, the embedding leads
        key = id(_rows_weight(model.get_submodule(name)))
        if key not in leaders or _is_embedding(model.get_submodule(name)):
            leaders[key] = name
    wrappers = [n for n, m in model.named_modules()
                if n and isinstance(m, AdapterLayer) and not isinstance(m, TrainableTokensLayer)]
    for name in free:
        if name in leaders.values():
            continue
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokensLayer):
            weight = module.base_layer.weight
        elif isinstance(module, (nn.Linear, nn.Embedding)):  # a head, or another lookup (T5's
            weight = module.weight                           # encoder/decoder embed_tokens)
        else:
            continue
        lead = leaders.get(id(weight))
        if lead is None:
            continue
        outer = [w for w in wrappers if inside_any(name, [w])]
        if outer:
            raise ValueError(f"{arg}: {name!r} shares its weight with {lead!r} but is wrapped by "
                             f"{type(model.get_submodule(outer[0])).__name__} ({outer[0]!r}); a head tied to "
                             f"an embedding whose rows train cannot be adapted or trained in full as well")
        if name in wanted and wanted[name] != wanted[lead]:
            raise ValueError(f"{arg}: {name!r} shares its weight with {lead!r} but is given other token ids "
                             f"({wanted[name][:8]} vs {wanted[lead][:8]}); tied rows must be the same")
        wanted.pop(name, None)
        tied[name] = lead
    return wanted, tied


def _is_embedding(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, TrainableTokensLayer) else module
    return isinstance(base, nn.Embedding)


def _embeddings(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Embedding, TrainableTokensLayer))]


def check_token_layers(model: nn.Module, wanted: dict[str, list[int]], in_lora: bool, arg: str) -> None:
    """A module of ``wanted`` that already is a token layer must carry the same ids for the same
    owner (LoRA's or its own); a ``ValueError`` naming ``arg`` otherwise. Read only."""
    for name, ids in wanted.items():
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokensLayer) and module.token_indices == ids \
                and module.in_lora != in_lora:
            owner = "a LoRA adapter" if module.in_lora else "a trainable-tokens adapter of its own"
            raise ValueError(f"{arg}: {name!r} already trains token ids {module.token_indices[:8]} for "
                             f"{owner}; unload_trainable_tokens(model) first writes those rows into the "
                             f"weight (between Chinese-LLaMA's two stages), or apply into a fresh model")
        if isinstance(module, TrainableTokensLayer) and module.token_indices != ids:
            raise ValueError(f"{arg}: {name!r} already trains token ids {module.token_indices[:8]}"
                             + (" for a LoRA adapter" if module.in_lora else "")
                             + f"; load or apply into a fresh model to train {ids[:8]}")


def inject_tokens(model: nn.Module, wanted: dict[str, list[int]], tied: dict[str, str],
                  in_lora: bool, arg: str) -> None:
    """Replace the planned modules by token layers (a module that already is one must carry the
    same ids). Checks first, then changes."""
    check_token_layers(model, wanted, in_lora, arg)
    for name, ids in wanted.items():
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokensLayer):
            continue
        layer = TrainableTokensLayer(module, ids, in_lora=in_lora)
        if in_lora:
            layer.__dict__[LORA_PART_ATTR] = True
        _replace(model, name, layer)
    for name, lead in tied.items():
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokensLayer):
            continue
        layer = TrainableTokensLayer(module, model.get_submodule(lead).token_indices,
                                     tied_to=model.get_submodule(lead), in_lora=in_lora)
        if in_lora:
            layer.__dict__[LORA_PART_ATTR] = True
        _replace(model, name, layer)


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def apply_trainable_tokens(model: nn.Module, token_indices: Sequence[int] | None = None,
                           target_modules: str | list[str] | None = None,
                           config: TrainableTokensConfig | None = None) -> nn.Module:
    """Make only the rows ``token_indices`` of the input embedding (or of ``target_modules``)
    trainable, in place, and return ``model``; a head tied to the embedding follows the rows.

    Everything is checked before the model changes: ids out of range (a ``ValueError`` naming
    them and the number of rows), empty or repeated ids, targets that are not embeddings.
    Applying the same ids again is harmless; other ids on a layer that already trains some are
    refused.
    """
    if config is None:
        config = TrainableTokensConfig(token_indices=token_indices, target_modules=target_modules)
    elif not isinstance(config, TrainableTokensConfig):
        raise TypeError(f"config must be a TrainableTokensConfig, got {type(config).__name__}")
    wanted, tied = plan_tokens(model, config.token_indices, config.target_modules, "token_indices")
    inject_tokens(model, wanted, tied, in_lora=False, arg="token_indices")
    freeze_all_but_adapters(model)
    return model


def unload_trainable_tokens(model: nn.Module) -> nn.Module:
    """Write the trained rows into their embeddings (and tied heads) and put the plain modules
    back in place of the token layers (standalone and LoRA-owned alike): the model is then a
    plain model with the new rows, ready for a next stage (Chinese-LLaMA's stage 1 -> stage 2).
    Returns ``model``."""
    layers = token_layers(model)
    for _, layer in layers:
        layer.merge()
    for name, layer in sorted(layers, key=lambda item: -item[0].count(".")):
        _replace(model, name, layer.base_layer)
    return model


# --------------------------------------------------------------------------------------------
# 4. Extending the vocabulary
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def add_tokens(model: nn.Module, tokenizer: Any, tokens: Sequence[str], special: bool = False) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` and grow the model's input embedding (and an untied output
    head) to match; return the new tokens' ids, in the order given.

    Every new row is the mean of the old rows (the rows of the tokens the tokenizer had, computed
    in float64 and cast to the weight's dtype), in the input embedding and, separately, in an
    untied head (its bias too, if any); a tied head shares the embedding's rows. Nothing changes
    when a token is already in the vocabulary, repeated, or empty (a ``ValueError`` naming them),
    or when the model carries adapters already (extend first, then apply the method).
    ``special=True`` adds them as special tokens (never split, kept by ``skip_special_tokens=False``).
    """
    if isinstance(tokens, str) or not isinstance(tokens, Sequence) or not tokens:
        raise ValueError(f"tokens must be a non-empty list of strings, got {tokens!r}")
    bad = [t for t in tokens if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(f"tokens must be non-empty strings, got {bad[:8]}")
    dup = sorted({t for t in tokens if tokens.count(t) > 1})
    if dup:
        raise ValueError(f"tokens lists {dup[:8]} more than once")
    vocab = tokenizer.get_vocab()
    present = [t for t in tokens if t in vocab]
    if present:
        raise ValueError(f"tokens {present[:8]} are already in the tokenizer's vocabulary (ids "
                         f"{[vocab[t] for t in present[:8]]}); their rows are not new")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("the model carries adapters already; add tokens before applying a method")
    get_in = getattr(model, "get_input_embeddings", None)
    resize = getattr(model, "resize_token_embeddings", None)
    if not callable(get_in) or not callable(resize):
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings()/resize_token_embeddings(); "
                         f"add_tokens extends transformers models")
    emb = get_in()
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    old_rows = emb.weight.shape[0]
    known = min(len(tokenizer), old_rows)  # rows of real tokens (an embedding may be padded)
    emb_mean = emb.weight[:known].double().mean(0)  # (d,)
    untied = head is not None and head.weight is not emb.weight
    head_mean = head.weight[:known].double().mean(0) if untied else None
    head_bias = head.bias[:known].double().mean() if untied and head.bias is not None else None

    added = tokenizer.add_tokens(list(tokens), special_tokens=special)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    if added != len(tokens) or any(i is None for i in ids):
        raise RuntimeError(f"the tokenizer added {added} of {len(tokens)} tokens")
    needed = max(max(ids) + 1, old_rows)
    if needed > old_rows:
        resize(needed, mean_resizing=False)
    emb = get_in()
    index = torch.tensor(ids, dtype=torch.long, device=emb.weight.device)
    emb.weight[index] = emb_mean.to(emb.weight.dtype).expand(len(ids), -1)
    if untied:
        head = model.get_output_embeddings()
        head.weight[index.to(head.weight.device)] = head_mean.to(head.weight.dtype).expand(len(ids), -1)
        if head_bias is not None:
            head.bias[index.to(head.bias.device)] = head_bias.to(head.bias.dtype)
    return ids


# --------------------------------------------------------------------------------------------
# 5. Registry entry (HF PEFT's TRAINABLE_TOKENS files)
# --------------------------------------------------------------------------------------------


def _standalone(model: nn.Module) -> list[tuple[str, TrainableTokensLayer]]:
    return [(n, m) for n, m in token_layers(model) if not m.in_lora]


def _to_json(root: nn.Module) -> dict[str, Any]:
    leaders = [(n, m) for n, m in _standalone(root) if not m._tied]
    if not leaders:
        raise ValueError(f"{type(root).__name__} has no trainable tokens to save; apply_trainable_tokens "
                         f"first")
    ids = {tuple(m.token_indices) for _, m in leaders}
    if len(ids) > 1:
        raise ValueError("the trainable-token layers train different token ids, which one TRAINABLE_TOKENS "
                         "adapter_config.json cannot express")
    names = [n for n, _ in leaders]
    return {"token_indices": list(ids.pop()),
            "target_modules": names[0] if len(names) == 1 else sorted(names),
            "init_weights": True}


def _check_fields(cfg: dict[str, Any], where: str) -> TrainableTokensConfig:
    if "init_weights" in cfg and not isinstance(cfg["init_weights"], bool):
        raise ValueError(f"{where}: init_weights must be true or false, got {cfg['init_weights']!r}")
    target = cfg.get("target_modules")
    if target is not None and not isinstance(target, (str, list)):
        raise ValueError(f"{where}: target_modules must be a string, a list of names or null, got {target!r}")
    indices = cfg.get("token_indices")
    if not isinstance(indices, list):
        raise ValueError(f"{where}: token_indices must be a list of token ids, got {indices!r}")
    try:
        return TrainableTokensConfig(token_indices=indices, target_modules=target)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    config = _check_fields(cfg, where)
    try:
        plan_tokens(model, config.token_indices, config.target_modules, "token_indices")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return lambda target: apply_trainable_tokens(target, config=config)


def _update_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[], None]:
    config = _check_fields(cfg, where)
    try:
        wanted, _ = plan_tokens(model, config.token_indices, config.target_modules, "token_indices")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    carried = {n: m.token_indices for n, m in _standalone(model) if not m._tied}
    if carried != wanted:
        raise ValueError(f"{where}: the file trains {wanted} but the model carries trainable tokens "
                         f"{carried}; load it into a fresh model")
    return lambda: None


def check_tied_copies(model: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """The rows a file repeats for a tied head must equal the embedding's."""
    groups: dict[int, list[str]] = {}
    for key in tensors:
        if not key.endswith("trainable_tokens_delta"):
            continue
        path = key.rsplit(".trainable_tokens_delta", 1)[0].removesuffix(".token_adapter")
        try:
            weight = _rows_weight(model.get_submodule(path))
        except AttributeError:
            continue
        if weight is not None:
            groups.setdefault(id(weight), []).append(key)
    for keys in groups.values():
        first = tensors[keys[0]]
        differ = [k for k in keys[1:]
                  if tensors[k].shape != first.shape or not torch.equal(tensors[k], first)]
        if differ:
            raise ValueError(f"{where}: {differ} and {keys[0]} belong to one tied weight but hold different "
                             f"rows. Nothing was loaded; the model is unchanged.")


def _detect(model: nn.Module) -> bool:
    return any(not m.in_lora for _, m in token_layers(model))


METHOD = register(Method(
    name="trainable_tokens",
    config_class=TrainableTokensConfig,
    peft_type="TRAINABLE_TOKENS",
    apply=apply_trainable_tokens,
    detect=_detect,
    to_json=_to_json,
    from_json=_from_json,
    update_from_json=_update_from_json,
    check_tensors=check_tied_copies,
))

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "add_tokens", "apply_trainable_tokens",
           "token_layers", "unload_trainable_tokens"]
