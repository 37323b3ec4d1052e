"""Smoke run of examples/lorahub.py end to end on a tiny random Llama saved to a local directory."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from tests.test_example import _load, save_tiny_model

pytest.importorskip("nevergrad")


def test_lorahub_example_runs_end_to_end(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    example = _load("lorahub")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results = example.main(["--model", str(model_dir), "--steps", "2", "--batch-size", "2",
                                "--r", "2", "--targets", "q_proj,v_proj", "--shots", "4",
                                "--budget", "5", "--eval-limit", "3", "--max-new-tokens", "3",
                                "--threads", "1", "--out", str(out)])
    printed = stdout.getvalue()
    assert "LoRAHub weights" in printed and "Uniform mix" in printed
    saved = json.loads((out / "lorahub.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["shots"] == 4 and saved["held_out"] == 3
    assert set(saved["weights"]) == {"personal", "work", "company"}
    assert set(saved["held_out_exact_match"]) == {"uniform", "lorahub"}
    assert saved["few_shot_loss"]["lorahub"] <= saved["few_shot_loss"]["uniform"] + 0.05 * 3 * 1.5
    for name in ("personal", "work", "company"):
        config = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 2
    config = json.loads((out / "lorahub_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 6 and config["lora_alpha"] == 6
    # the composed adapter is a plain LoRA: it loads into the base model
    from transformers import AutoModelForCausalLM

    from lightning_peft import load_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_adapter(model, out / "lorahub_adapter")


def test_sibling_tasks_partition_the_shipped_data():
    example = _load("lorahub")
    from lightning_peft.data import load_records

    records = load_records(example.DATA / "triples_train.jsonl")
    tasks = example.split_tasks(records)
    assert {k: len(v) for k, v in tasks.items()} == {"personal": 144, "work": 112, "company": 96, "mixed": 48}
    for record in tasks["mixed"]:
        rels = example.relations(record)
        assert rels & example.FAMILIES["personal"] and rels & example.FAMILIES["work"]


@pytest.mark.parametrize(("argv", "option"), [
    (["--l1", "nan"], "--l1"), (["--l1=-1"], "--l1"), (["--l1", "inf"], "--l1"),
    (["--targets", "q_proj,,v"], "--targets")])
def test_bad_arguments_fail_before_the_model_loads(argv, option, monkeypatch, capsys):
    """``--l1`` must be a finite number >= 0 (nan failed after training all three adapters)."""
    from tests.test_example import _fails_fast

    _fails_fast(_load("lorahub"), argv, option, monkeypatch, capsys)


def test_unknown_targets_fail_after_loading_before_training(tmp_path, monkeypatch, capsys):
    """A ``--targets`` entry that matches nothing is a usage error right after the model loads
    (it was a traceback, reached before the first adapter's training only by luck of the order)."""
    example = _load("lorahub")

    def refuse(*args, **kwargs):
        raise AssertionError("trained although --targets names a module that does not exist")

    monkeypatch.setattr(example, "train_adapter", refuse)
    with pytest.raises(SystemExit) as info:
        example.main(["--model", str(save_tiny_model(tmp_path / "tiny")), "--targets", "q_proj,v_prj",
                      "--threads", "1", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--targets" in err and "v_prj" in err and "k_proj" in err
