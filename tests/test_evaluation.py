"""Generation-based evaluation: batched greedy answers on a tiny Llama, and exact match."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_peft.evaluation import encode_prompt, exact_match, generate_answers
from tests import _tiny

RECORDS = [
    {"instruction": "Extract the triples.", "input": "Marie Curie was born in Warsaw."},
    {"instruction": "Say hello.", "input": ""},
    {"instruction": "Extract the triples from this much longer text, please.",
     "input": "Ada Lovelace lives in London and studied at home with tutors."},
    {"instruction": "Name a colour."},
    {"instruction": "Extract the triples.", "input": "Alan Turing studied at Cambridge.",
     "output": "(Alan Turing | studied at | Cambridge)"},
]


def _tiny_tokenizer(chat_template: bool):
    corpus = [r["instruction"] + " " + r.get("input", "") for r in RECORDS]
    return _tiny.tokenizer(corpus, 300, chat_template)


def _tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


class _AlwaysToken(nn.Module):
    """An lm_head whose logits always put ``token`` first."""

    def __init__(self, vocab_size: int, token: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.token = token

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.new_zeros(*hidden.shape[:-1], self.vocab_size)
        logits[..., self.token] = 1.0
        return logits


@pytest.fixture(scope="module")
def tok():
    return _tiny_tokenizer(chat_template=True)


def _greedy_unbatched(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Reference: greedy decoding of one unpadded prompt, full forward pass per token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == eos:
                break
            ids.append(nxt)
    return ids[len(prompt):]


@pytest.mark.parametrize("chat", [True, False])
def test_batched_generation_matches_unbatched_greedy(chat):
    tok = _tiny_tokenizer(chat_template=chat)
    model = _tiny_llama(len(tok))
    answers = generate_answers(model, tok, RECORDS, max_new_tokens=6, batch_size=3)
    assert isinstance(answers, list) and len(answers) == len(RECORDS)
    assert all(isinstance(a, str) for a in answers)
    for record, answer in zip(RECORDS, answers, strict=True):
        prompt = encode_prompt(tok, record["instruction"], record.get("input", ""))
        expected = _greedy_unbatched(model, prompt, 6, tok.eos_token_id)
        assert answer == tok.decode(expected, skip_special_tokens=True).strip()
    # Left padding does not change the answers: one prompt per batch gives the same ones.
    assert generate_answers(model, tok, RECORDS, max_new_tokens=6, batch_size=1) == answers


def test_decodes_only_new_tokens_up_to_max_new_tokens(tok):
    model = _tiny_llama(len(tok))
    model.lm_head = _AlwaysToken(len(tok), tok.convert_tokens_to_ids("x"))
    answers = generate_answers(model, tok, RECORDS[:3], max_new_tokens=4, batch_size=2)
    assert answers == ["xxxx"] * 3


def test_stops_at_eos_and_restores_training_mode(tok):
    model = _tiny_llama(len(tok))
    model.lm_head = _AlwaysToken(len(tok), tok.eos_token_id)
    model.train()
    assert generate_answers(model, tok, RECORDS, max_new_tokens=5) == [""] * len(RECORDS)
    assert model.training


def test_generate_answers_rejects_bad_arguments(tok):
    model = _tiny_llama(len(tok))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate_answers(model, tok, RECORDS, max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        generate_answers(model, tok, RECORDS, batch_size=0)
    with pytest.raises(ValueError, match=r"records\[1\]: missing field 'instruction'"):
        generate_answers(model, tok, [RECORDS[0], {"input": "x"}])
    with pytest.raises(ValueError, match=r"records\[0\]: field 'input' must be a string"):
        generate_answers(model, tok, [{"instruction": "x", "input": 3}])
    with pytest.raises(ValueError, match="generate"):
        generate_answers(nn.Linear(2, 2), tok, RECORDS)


def test_exact_match_normalises_whitespace_only():
    refs = ["(Marie Curie | born in | Warsaw)", "(A | b | C); (D | e | F)", "x"]
    assert exact_match(refs, refs) == 1.0
    spaced = ["  (Marie  Curie |\tborn in | Warsaw)\n", "(A | b | C);\n(D | e | F)", " x "]
    assert exact_match(spaced, refs) == 1.0
    assert exact_match(["(marie curie | born in | warsaw)", "(A | b | C)", "x"], refs) == 1 / 3
    assert exact_match(["(MarieCurie | born in | Warsaw)", "", "y"], refs) == 0.0
    assert exact_match(["(A|b|C); (D | e | F)", "a", "x"], [refs[1], "a", "x"]) == 2 / 3


def test_exact_match_rejects_bad_input():
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="predictions is empty"):
        exact_match([], [])
    with pytest.raises(ValueError, match=r"references\[1\] must be a string"):
        exact_match(["a", "b"], ["a", None])
    # one answer as a bare string was scored character by character ("Paris" vs "paris": 0.8)
    with pytest.raises(ValueError, match=r"predictions must be a list of strings .* \[prediction\]"):
        exact_match("Paris", "paris")
    with pytest.raises(ValueError, match=r"references must be a list of strings"):
        exact_match(["Paris"], "Paris")


def test_evaluation_does_not_import_lightning():
    code = "import sys, lightning_peft.evaluation; sys.exit('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
