"""Proxy-tuning: steer a large frozen model at decoding time with the difference a fine-tuning made
to a small one (Liu et al., 2024, arXiv 2401.08565).

At every generation step the next-token logits of the large model are shifted by how much the
tuned small model's logits differ from the untuned small model's, on the same prefix:

    logits_t = L_large(x_<t) + α · (L_tuned(x_<t) − L_untuned(x_<t))        (α = 1 in the paper)

so the large model's weights are never touched (they may be out of reach: only its logits are
used). The three models must share a vocabulary (the same token ids). ``α`` scales the offset:
0 gives the large model's own decoding.

:class:`ProxyTuningLogitsProcessor` is a transformers ``LogitsProcessor`` for the large model's
``generate``: it runs the two small models on the same ids, each with its own KV cache carried
across steps (only the new token is fed after the first step), positions taken from the
attention mask as ``generate`` does, so left padding is handled. :func:`proxy_generate` wraps it.

    ids ──┬── large ────────────────────────┐
          ├── tuned small ───┐              + ──> next-token logits
          └── untuned small ─┴─ − ──> ·α ───┘
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

__all__ = ["ProxyTuningLogitsProcessor", "proxy_generate"]


def _vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's output layer (its logits' width), else ``config.vocab_size``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def _check_vocabulary(models: dict[str, nn.Module]) -> None:
    """The models' logits cover the same vocabulary and their special token ids agree; a
    ``ValueError`` naming the models otherwise."""
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name} must be a transformers causal LM (an nn.Module), got "
                             f"{type(model).__name__}")
    sizes = {name: _vocab_size(m) for name, m in models.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError("proxy-tuning adds the models' logits token by token, so they must share one "
                         "vocabulary; their vocabulary sizes differ: "
                         + ", ".join(f"{n} {s}" for n, s in sizes.items()))
    for key in ("bos_token_id", "eos_token_id"):
        ids = {n: getattr(getattr(m, "config", None), key, None) for n, m in models.items()}
        ids = {n: v for n, v in ids.items() if v is not None}
        if len({repr(v) for v in ids.values()}) > 1:
            raise ValueError(f"the models' tokenizers differ: {key} is "
                             + ", ".join(f"{v!r} in {n}" for n, v in ids.items())
                             + "; proxy-tuning needs the same token ids in all three")


def _forward_arguments(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The name of the forward's KV-cache argument (transformers 5's ``cache``, or the older
    ``past_key_values``) and ``logits_to_keep=1`` where the forward takes it (only the last
    position's logits are used)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


class ProxyTuningLogitsProcessor(LogitsProcessor):
    """Adds ``alpha · (L_tuned − L_untuned)`` to the scores of the model that generates.

    Args:
        tuned: The small model after fine-tuning (e.g. with a LoRA adapter).
        untuned: The same small model before fine-tuning.
        alpha: Scale of the offset (1 in the paper; 0 leaves the scores as they are).
        attention_mask: The prompt's attention mask ``(batch, prompt_len)`` when the prompts are
            padded (``generate`` does not pass it to processors); the generated tokens are
            attended, as ``generate`` does. ``None``: every prompt token is attended.
        use_cache: Keep each small model's KV cache across steps (feed only the new tokens);
            ``False`` runs full forwards every step (same result, slower).

    One instance follows one generation: when the ids it is called with do not extend the ones
    of its previous call (a new ``generate``), it starts over. The small models run under
    ``torch.no_grad`` in whatever train/eval mode they are in (put them in eval mode).
    Among ``generate``'s processors it runs after the built-in ones that do not sample
    (repetition penalty, min length: applied to the large model's scores) and before the
    sampling warpers (temperature, top-k, top-p: applied to the shifted scores).
    """

    def __init__(self, tuned: nn.Module, untuned: nn.Module, alpha: float = 1.0,
                 attention_mask: Tensor | None = None, use_cache: bool = True) -> None:
        _check_vocabulary({"tuned": tuned, "untuned": untuned})
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                           or attention_mask.dim() != 2):
            raise ValueError("attention_mask must be a (batch, prompt_len) tensor or None")
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache must be a bool, got {use_cache!r}")
        self.tuned, self.untuned = tuned, untuned
        self.alpha, self.attention_mask, self.use_cache = float(alpha), attention_mask, use_cache
        self.vocab_size = _vocab_size(tuned)
        self.reset()

    def reset(self) -> None:
        """Forget the ids seen and the KV caches (the next call starts a new generation)."""
        self._ids: Tensor | None = None
        self._caches: list[Any] = [None, None]

    def _mask(self, input_ids: Tensor) -> Tensor:
        """The attention mask of ``input_ids``: the prompt's, extended with ones."""
        batch, length = input_ids.shape
        mask = self.attention_mask
        if mask is None:
            return torch.ones_like(input_ids)
        if mask.shape[0] == 0 or batch % mask.shape[0] or mask.shape[1] > length:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not fit the ids "
                             f"{tuple(input_ids.shape)}: pass the prompt's mask to the processor")
        # generate repeats each prompt's row for num_return_sequences or num_beams
        mask = mask.to(input_ids.device, torch.long).repeat_interleave(batch // mask.shape[0], dim=0)
        return torch.cat([mask, mask.new_ones(batch, length - mask.shape[1])], dim=1)

    @torch.no_grad()
    def offset(self, input_ids: Tensor) -> Tensor:
        """``L_tuned − L_untuned`` (batch, vocab) at the last position of ``input_ids``."""
        mask = self._mask(input_ids)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them
        seen = self._ids
        incremental = (self.use_cache and seen is not None and seen.shape[0] == input_ids.shape[0]
                       and seen.shape[1] < input_ids.shape[1]
                       and torch.equal(input_ids[:, :seen.shape[1]], seen.to(input_ids.device)))
        start = seen.shape[1] if incremental else 0
        if not incremental:
            self._caches = [None, None]
        logits = []
        for i, model in enumerate((self.tuned, self.untuned)):
            device = _device(model)
            cache_arg, extra = _forward_arguments(model)
            out = model(input_ids=input_ids[:, start:].to(device), attention_mask=mask.to(device),
                        position_ids=positions[:, start:].to(device), use_cache=self.use_cache,
                        **{cache_arg: self._caches[i] if incremental else None}, **extra)
            cache = getattr(out, "cache", None)
            self._caches[i] = (cache if cache is not None else getattr(out, "past_key_values", None)) \
                if self.use_cache else None
            logits.append(out.logits[:, -1])  # (batch, vocab)
        self._ids = input_ids.detach().clone() if self.use_cache else None
        tuned, untuned = logits
        dtype = torch.promote_types(tuned.dtype, torch.float32)
        return tuned.to(dtype) - untuned.to(tuned.device, dtype)  # (batch, vocab)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[-1] != self.vocab_size:
            raise ValueError(f"the generating model's scores have {scores.shape[-1]} tokens but the "
                             f"small models' vocabulary has {self.vocab_size}; proxy-tuning needs "
                             f"one shared vocabulary")
        offset = self.offset(input_ids).to(scores.device)
        dtype = torch.promote_types(scores.dtype, offset.dtype)
        return (scores.to(dtype) + self.alpha * offset.to(dtype)).to(scores.dtype)


def proxy_generate(large: nn.Module, tuned: nn.Module, untuned: nn.Module, input_ids: Tensor,
                   attention_mask: Tensor | None = None, max_new_tokens: int = 32, alpha: float = 1.0,
                   use_cache: bool = True, **generate_kwargs: Any) -> Tensor:
    """Generate from ``large`` with its logits shifted by ``alpha · (L_tuned − L_untuned)`` at every
    step (proxy-tuning, arXiv 2401.08565); return ``large.generate``'s output (prompt + new ids).

    The three models must share a vocabulary (same logits width and special token ids; a
    ``ValueError`` otherwise). Prompts may be left-padded (pass ``attention_mask``). Decoding is
    greedy unless ``generate_kwargs`` say otherwise (``do_sample=True, temperature=...``: the
    temperature applies to the shifted logits). ``use_cache`` applies to all three models. The
    models are put in eval mode for the call and their modes restored afterwards.
    """
    _check_vocabulary({"large": large, "tuned": tuned, "untuned": untuned})
    if not hasattr(large, "generate"):
        raise ValueError(f"large must be a transformers model with generate(), got {type(large).__name__}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, length) tensor of token ids")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    processor = ProxyTuningLogitsProcessor(tuned, untuned, alpha=alpha, attention_mask=attention_mask,
                                           use_cache=use_cache)
    extra = generate_kwargs.pop("logits_processor", None) or []
    processors = LogitsProcessorList([processor, *extra])
    generate_kwargs.setdefault("do_sample", False)
    config = getattr(large, "generation_config", None)
    if generate_kwargs.get("pad_token_id") is None and getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        generate_kwargs["pad_token_id"] = eos[0] if isinstance(eos, list) and eos else eos
    modes = [(m, m.training) for m in (large, tuned, untuned)]
    for model, _ in modes:
        model.eval()
    try:
        device = _device(large)
        mask = None if attention_mask is None else attention_mask.to(device)
        with torch.no_grad():
            return large.generate(input_ids=input_ids.to(device), attention_mask=mask,
                                  max_new_tokens=max_new_tokens, logits_processor=processors,
                                  use_cache=use_cache, **generate_kwargs)
    finally:
        for model, training in modes:
            model.train(training)
