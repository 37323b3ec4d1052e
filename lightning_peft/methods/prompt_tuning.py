"""Prompt tuning: n trainable "soft prompt" embeddings prepended to the input embeddings of a
frozen model (Lester et al., 2021, arXiv 2104.08691)::

    inputs_embeds = [ P ; E(x) ]          P (n, d) learned, E the frozen word embeddings

            x ──► E ──┐
                      ├──► [ P ; E(x) ] ──► frozen transformer ──► logits (B, n+L, V)
            P ────────┘   (mask +1s, labels -100 over P: the loss ignores the virtual tokens)

``P`` starts at random (``init="random"``: a standard normal, as ``nn.Embedding``), from the
embeddings of tokens sampled from the vocabulary (``"sample_vocab"``), or from the embeddings of
``init_text`` tokenised, repeated or cut to n tokens (``"text"``), as HF PEFT's
``PromptTuningInit``. The insertion (a forward pre-hook, KV-cached generation included) is
:mod:`lightning_peft.methods._virtual_tokens`.

Files are HF PEFT's (``peft_type`` ``"PROMPT_TUNING"``): ``prompt_embeddings`` (n, d) and
``adapter_config.json`` with ``num_virtual_tokens``, ``token_dim``, ``prompt_tuning_init``,
``prompt_tuning_init_text``, ``tokenizer_name_or_path`` and PEFT's other prompt-learning fields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.methods import Method, register
from lightning_peft.methods._virtual_tokens import (
    VirtualTokens,
    check_choice,
    check_common_json,
    check_num_virtual_tokens,
    common_json,
    init_token_ids,
    install,
    prompt_layer,
    read_modules_to_save,
    token_dim,
    tokenizer_name,
    transformers_root,
)
from lightning_peft.targeting import check_module_names

INITS = ("random", "sample_vocab", "text")


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


@dataclass
class PromptTuningConfig:
    """What :func:`apply_prompt_tuning` injects."""

    num_virtual_tokens: int = 20
    """n, the number of virtual tokens prepended to every input."""
    init: str = "random"
    """How the prompt starts: ``"random"`` (standard normal), ``"sample_vocab"`` (embeddings of
    tokens drawn uniformly from the vocabulary) or ``"text"`` (``init_text``'s token embeddings,
    repeated or cut to n), as HF PEFT's ``prompt_tuning_init``."""
    init_text: str | None = None
    """The text for ``init="text"``, e.g. ``"Classify the sentiment of this review:"``."""
    tokenizer_name_or_path: str | None = None
    """The tokenizer that tokenises ``init_text`` (a name or path for ``AutoTokenizer``), unless a
    tokenizer object is passed to :func:`apply_prompt_tuning`."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, as trainable copies (a fresh classifier head: ``["classifier"]``,
    as HF PEFT's ``SEQ_CLS``)."""

    def __post_init__(self) -> None:
        check_num_virtual_tokens(self.num_virtual_tokens)
        self.init = check_choice(self.init, "init", INITS)
        _check_text(self.init, self.init_text, self.tokenizer_name_or_path)
        self.modules_to_save = check_module_names(self.modules_to_save, "modules_to_save")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_text(init: str, init_text: Any, tokenizer: Any) -> None:
    if init_text is not None and (not isinstance(init_text, str) or not init_text.strip()):
        raise ValueError(f"init_text must be a non-empty string, got {init_text!r}")
    if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer):
        raise ValueError(f"tokenizer_name_or_path must be a non-empty string, got {tokenizer!r}")
    if init == "text" and init_text is None:
        raise ValueError("init='text' needs init_text (the text whose token embeddings start the prompt)")
    if init != "text" and init_text is not None:
        raise ValueError(f"init_text is only used with init='text', got init={init!r}")


# --------------------------------------------------------------------------------------------
# 2. Module
# --------------------------------------------------------------------------------------------


class PromptEmbedding(VirtualTokens):
    """The soft prompt ``embedding`` (n, d), float32; saved as HF PEFT's ``prompt_embeddings``."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, device: Any = None) -> None:
        super().__init__(num_virtual_tokens, token_dim)
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, token_dim, device=device,
                                                  dtype=torch.float32))  # (n, d)
        self.init, self.init_text, self.tokenizer_name_or_path = "random", None, None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.embedding.is_meta:
            with torch.no_grad():
                nn.init.normal_(self.embedding)  # nn.Embedding's default, PEFT's RANDOM

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"embedding": self.embedding}

    def prompt(self, batch_size: int, task_ids: Tensor | None) -> Tensor:
        return self.embedding.unsqueeze(0).expand(batch_size, -1, -1)  # (B, n, d)


def init_from_ids(param: nn.Parameter, root: nn.Module, ids: list[int] | None) -> None:
    """Set ``param`` (n, d) to the model's word embeddings of ``ids`` (n token ids), or of n
    tokens drawn uniformly from the vocabulary when ``ids`` is None (HF PEFT's SAMPLE_VOCAB)."""
    if param.is_meta:
        return
    embeddings = root.get_input_embeddings()
    vocab = embeddings.num_embeddings
    index = torch.randint(0, vocab, (param.shape[0],)) if ids is None else torch.tensor(ids)
    with torch.no_grad():
        param.copy_(embeddings.weight[index.to(embeddings.weight.device)].float())


def text_ids(root: nn.Module, text: str, tokenizer: Any, count: int) -> list[int]:
    """``text`` tokenised, repeated or cut to ``count`` ids, checked against the vocabulary."""
    ids = init_token_ids(text, tokenizer, count)
    vocab = root.get_input_embeddings().num_embeddings
    if max(ids) >= vocab or min(ids) < 0:
        raise ValueError(f"init_text gives token id {max(ids)}, outside the model's vocabulary of {vocab}: "
                         f"the tokenizer does not belong to the model")
    return ids


# --------------------------------------------------------------------------------------------
# 3. apply_prompt_tuning
# --------------------------------------------------------------------------------------------


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int = 20, init: str = "random",
                        init_text: str | None = None, tokenizer: Any = None,
                        modules_to_save: Sequence[str] | None = None,
                        config: PromptTuningConfig | None = None) -> nn.Module:
    """Prepend ``num_virtual_tokens`` trainable embeddings to every input of the transformers
    model in ``model`` (see the module docstring), freeze everything else, return ``model``.

    ``tokenizer`` (a tokenizer object or a name/path) tokenises ``init_text`` for ``init="text"``;
    by default ``config.tokenizer_name_or_path``. ``modules_to_save`` names modules trained in full
    (a classifier head). Everything is checked before the model changes; applying twice is harmless.
    """
    cfg = config if config is not None else PromptTuningConfig(
        num_virtual_tokens=num_virtual_tokens, init=init, init_text=init_text,
        tokenizer_name_or_path=tokenizer if isinstance(tokenizer, str) else None,
        modules_to_save=modules_to_save)
    tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer_name_or_path
    if cfg.init == "text" and tokenizer is None:
        raise ValueError("init='text' needs a tokenizer to tokenise init_text: pass tokenizer= (an object or "
                         "a name) or tokenizer_name_or_path")
    root = transformers_root(model)
    ids = None
    if cfg.init == "text" and prompt_layer(root) is None:  # tokenise before the model changes
        ids = text_ids(root, cfg.init_text, tokenizer, cfg.num_virtual_tokens)

    def build(root: nn.Module) -> PromptEmbedding:
        weight = root.get_input_embeddings().weight
        layer = PromptEmbedding(cfg.num_virtual_tokens, token_dim(root), device=weight.device)
        layer.init, layer.init_text = cfg.init, cfg.init_text
        layer.tokenizer_name_or_path = tokenizer_name(tokenizer, cfg.tokenizer_name_or_path)
        if cfg.init != "random":
            init_from_ids(layer.embedding, root, ids)
        return layer

    return install(model, PromptEmbedding, build, cfg.num_virtual_tokens,
                   modules_to_save=cfg.modules_to_save)


# --------------------------------------------------------------------------------------------
# 4. Registry entry
# --------------------------------------------------------------------------------------------


def init_json(init: str, init_text: str | None, tokenizer: str | None,
              upper: dict[str, str]) -> dict[str, Any]:
    """PEFT's init fields. PEFT refuses ``"TEXT"`` without a tokenizer name even in inference mode,
    where it does not initialise: a prompt started from a tokenizer object without a name is
    recorded as ``"RANDOM"`` (the file holds the trained prompt either way)."""
    value = upper[init]
    if value == "TEXT" and tokenizer is None:
        value = "RANDOM"
    return {"prompt_tuning_init": value, "prompt_tuning_init_text": init_text,
            "tokenizer_name_or_path": tokenizer, "tokenizer_kwargs": None}


def _to_json(root: nn.Module) -> dict[str, Any]:
    layer = prompt_layer(root)
    assert isinstance(layer, PromptEmbedding)
    return {**common_json(root, layer),
            **init_json(layer.init, layer.init_text, layer.tokenizer_name_or_path, _UPPER)}


_UPPER = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def read_init_json(config: dict[str, Any], where: str,
                   inits: dict[str, str]) -> tuple[str, str | None, str | None]:
    """``(init, init_text, tokenizer_name_or_path)`` from PEFT's fields, checked."""
    init = config.get("prompt_tuning_init", "RANDOM")
    lower = {v: k for k, v in inits.items()}
    if init not in lower:
        raise ValueError(f"{where}: prompt_tuning_init must be one of {sorted(lower)}, got {init!r}")
    text, tok = config.get("prompt_tuning_init_text"), config.get("tokenizer_name_or_path")
    for key, value in (("prompt_tuning_init_text", text), ("tokenizer_name_or_path", tok)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {key} must be a string or null, got {value!r}")
    return lower[init], text, tok


def _from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    root = transformers_root(model)
    n = check_common_json(root, config, where)
    init, text, tok = read_init_json(config, where, _UPPER)
    saved = read_modules_to_save(root, config, where)

    def inject(target: nn.Module) -> None:  # the weights come from the file: no initialisation
        apply_prompt_tuning(target, config=PromptTuningConfig(num_virtual_tokens=n, modules_to_save=saved))
        layer = prompt_layer(transformers_root(target))
        layer.init, layer.init_text, layer.tokenizer_name_or_path = init, text, tok

    return inject


def _update_from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[], None]:
    root = transformers_root(model)
    n = check_common_json(root, config, where)
    read_init_json(config, where, _UPPER)
    layer = prompt_layer(root)
    if layer.num_virtual_tokens != n:
        raise ValueError(f"{where}: num_virtual_tokens is {n} but the model's prompt has "
                         f"{layer.num_virtual_tokens}")
    return lambda: None


def _detect(model: nn.Module) -> bool:
    return any(isinstance(m, PromptEmbedding) for m in model.modules())


METHOD = register(Method(
    name="prompt_tuning",
    config_class=PromptTuningConfig,
    peft_type="PROMPT_TUNING",
    apply=apply_prompt_tuning,
    detect=_detect,
    to_json=_to_json,
    from_json=_from_json,
    update_from_json=_update_from_json,
    bound_fields=("peft_type", "num_virtual_tokens", "token_dim"),
    file_prefix="",
))

__all__ = ["METHOD", "PromptEmbedding", "PromptTuningConfig", "apply_prompt_tuning"]
