"""Prompt formatting and generation-based evaluation for instruction-tuned causal LMs.

Plain PyTorch (no Lightning import), so a Fabric user or a hand-written loop can use it. The
prompt functions here are the single definition of what the model sees before its answer:
``lightning_peft.data`` builds its training examples on top of :func:`encode_prompt`, so the
prompt a model is trained on and the prompt it is evaluated with are the same token ids.

A record is a mapping with string fields ``instruction`` and ``input`` (``input`` may be empty
or absent) and, for training and scoring, ``output``. The user turn is the instruction, followed
by a blank line and the input when the input is not empty. With a tokenizer that has a chat
template the prompt is that template applied to the single user turn with the generation prompt
(``add_generation_prompt=True``); without one it is the Alpaca template
(:data:`ALPACA_TEMPLATE` / :data:`ALPACA_TEMPLATE_NO_INPUT`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "encode_prompt",
    "exact_match",
    "format_prompt",
    "generate_answers",
]

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""Prompt for a record with a non-empty input when the tokenizer has no chat template."""

ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
"""Prompt for a record with an empty input when the tokenizer has no chat template."""


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, instruction: str, input: str = "") -> str:
    """Return the prompt text up to where the answer starts.

    With a chat template: the template applied to one user turn (instruction, a blank line, the
    input) with the generation prompt appended. Without one: the Alpaca template.
    """
    if not isinstance(instruction, str):
        raise ValueError(f"instruction must be a string, got {type(instruction).__name__}")
    if not isinstance(input, str):
        raise ValueError(f"input must be a string, got {type(input).__name__}")
    has_input = input.strip() != ""
    if _has_chat_template(tokenizer):
        user = f"{instruction}\n\n{input}" if has_input else instruction
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):
            raise ValueError(
                f"tokenizer.apply_chat_template(tokenize=False) returned "
                f"{type(text).__name__}, expected a string"
            )
        return text
    if has_input:
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


def encode_prompt(tokenizer: Any, instruction: str, input: str = "") -> list[int]:
    """Token ids of :func:`format_prompt`, exactly as training and generation use them.

    A chat template already writes its special tokens, so its text is encoded without adding
    any. The Alpaca text is encoded with the tokenizer's own special tokens at the start (a BOS
    for Llama-style tokenizers, nothing for GPT-2-style ones); an EOS the tokenizer appends is
    removed, since the answer follows the prompt.
    """
    text = format_prompt(tokenizer, instruction, input)
    if _has_chat_template(tokenizer):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if ids and eos is not None and ids[-1] == eos:
        ids.pop()
    return ids


def _prompt_fields(record: Any, where: str) -> tuple[str, str]:
    """The (instruction, input) of a record; a ValueError naming ``where`` if malformed."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a mapping with an 'instruction' field, "
                         f"got {type(record).__name__}")
    if "instruction" not in record:
        raise ValueError(f"{where}: missing field 'instruction'")
    instruction = record["instruction"]
    input_text = record.get("input", "")
    if input_text is None:
        input_text = ""
    for name, value in (("instruction", instruction), ("input", input_text)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} must be a string, "
                             f"got {type(value).__name__}")
    return instruction, input_text


def _model_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers of a Hugging Face causal LM to instruction records, in input order.

    Prompts are built with :func:`encode_prompt` (the same ids training uses), grouped by length
    into batches of ``batch_size``, left-padded, and decoded greedily with the KV cache under
    ``torch.inference_mode``. Only the newly generated tokens are decoded (special tokens
    skipped), and each answer is stripped of surrounding whitespace. Generation of a sequence
    stops at ``tokenizer.eos_token_id`` or after ``max_new_tokens`` tokens. The model's
    train/eval mode is restored afterwards.
    """
    if not hasattr(model, "generate"):
        raise ValueError(
            f"model must be a Hugging Face causal LM with a generate() method, "
            f"got {type(model).__name__}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token_id; generation needs one to stop")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = eos_id

    prompts = [
        encode_prompt(tokenizer, *_prompt_fields(record, f"records[{i}]"))
        for i, record in enumerate(records)
    ]
    # Batching prompts of similar length keeps left padding (wasted compute) small.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    device = _model_device(model)

    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids = prompts[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                )
                new_tokens = output[:, width:].cpu().tolist()  # (batch, <= max_new_tokens)
                for i, tokens in zip(batch, new_tokens, strict=True):
                    if eos_id in tokens:  # what follows the first EOS is padding
                        tokens = tokens[: tokens.index(eos_id)]
                    answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalisation.

    Leading and trailing whitespace is dropped and every run of whitespace inside becomes one
    space; case and punctuation count.
    """
    for name, texts in (("predictions", predictions), ("references", references)):
        if isinstance(texts, (str, bytes)):  # a str is a sequence of characters: not one answer
            raise ValueError(f"{name} must be a list of strings (one per example), got a single "
                             f"{type(texts).__name__}; wrap one answer as [{name[:-1]}]")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, "
            f"got {len(predictions)} and {len(references)}"
        )
    if len(predictions) == 0:
        raise ValueError("predictions is empty; exact match of no examples is undefined")
    for name, texts in (("predictions", predictions), ("references", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{name}[{i}] must be a string, got {type(text).__name__}")
    hits = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)
