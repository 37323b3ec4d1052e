"""Smoke run of examples/new_tokens.py (the two-stage new-token recipe) on a tiny random Llama."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tests.test_example import _load, save_tiny_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))
    out = tmp_path_factory.mktemp("new_tokens")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results = _load("new_tokens").main([
            "--model", str(model_dir), "--stage1-steps", "2", "--stage2-steps", "2", "--eval-limit", "3",
            "--max-new-tokens", "4", "--r", "2", "--threads", "1", "--out", str(out)])
    return out, results, stdout.getvalue()


def test_relation_names_become_tokens():
    example = _load("new_tokens")
    records, tokens = example.with_relation_tokens([
        {"instruction": "i", "input": "x", "output": "(A B | born in | C); (A B | works for | D)"},
        {"instruction": "i", "input": "y", "output": "(E | born in | F)"}])
    assert records[0]["output"] == "(A B | <born_in> | C); (A B | <works_for> | D)"
    assert tokens == ["<born_in>", "<works_for>"]


def test_example_runs_both_stages_and_writes_numbers_and_adapter(run):
    out, results, printed = run
    assert "after stage 1" in printed and "after stage 2" in printed
    ids = list(results["new_tokens"].values())
    assert len(ids) == 7 and ids == sorted(ids)
    saved = json.loads((out / "new_tokens.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for stage in ("before", "stage1", "stage2"):
        assert saved[stage]["held_out_loss"] > 0 and 0.0 <= saved[stage]["exact_match"] <= 1.0
    assert saved["stage1"]["trainable_params"] == 7 * 32  # the new rows only (the tiny head is untied)
    assert saved["stage2"]["trainable_params"] > 7 * 32
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == ids
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    rows = tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert rows.shape == (7, 32)


def test_example_rejects_bad_steps_before_loading(monkeypatch, capsys):
    example = _load("new_tokens")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although an argument is invalid")

    monkeypatch.setattr(example, "load_causal_lm", refuse)
    for argv, option in ((["--stage1-steps", "0"], "--stage1-steps"), (["--stage2-lr", "-1"], "--stage2-lr")):
        with pytest.raises(SystemExit):
            example.main(argv)
        assert option in capsys.readouterr().err
