"""The methods comparison harness (benchmarks/methods.py) on a tiny random Llama, two rows."""

from __future__ import annotations

import json

import pytest

from benchmarks import methods
from tests.test_example import save_tiny_model


def test_two_methods_give_table_json_and_chart(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny_llama")
    out = tmp_path / "results"
    rows = methods.main(["--model", str(model_dir), "--methods", "full,lora_qv", "--steps", "3",
                         "--batch-size", "4", "--eval-limit", "3", "--max-new-tokens", "4",
                         "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert [r["key"] for r in rows] == ["full", "lora_qv"]
    full, lora = rows
    assert full["trainable_params"] == full["total_params"]  # every parameter trains
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    assert lora["trainable_params"] == 2 * (8 * (32 + 32) + 8 * (32 + 16))  # r=8 on q (32->32), v (32->16)
    assert full["total_params"] == lora["total_params"] - lora["trainable_params"]
    assert full["saved_file"] == "model.safetensors" and lora["saved_file"] == "adapter_model.safetensors"
    assert lora["saved_mib"] < full["saved_mib"]
    for row in rows:
        assert 0.0 <= row["exact_match"] <= 1.0 and row["eval_records"] == 3
        assert row["train_seconds"] > 0 and row["peak_rss_growth_mib"] >= 0
        assert row["memory_method"] == "VmHWM reset at fit start"

    for line in ("Full fine-tuning", "LoRA r=8 (q, v)", "Trainable params", "Peak RSS growth"):
        assert line in printed
    markdown = (out / "methods.md").read_text()
    assert "| Method | Trainable params |" in markdown
    assert f"| LoRA r=8 (q, v) | {lora['trainable_params']:,} |" in markdown
    saved = json.loads((out / "methods.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["steps"] == 3
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --update: run only the QLoRA row; the earlier rows stay, in table order, with their command
    common = ["--model", str(model_dir), "--steps", "3", "--batch-size", "4", "--eval-limit", "3",
              "--max-new-tokens", "4", "--threads", "1", "--out", str(out)]
    with pytest.raises(SystemExit, match="other settings.*steps: 3 there, 4 now"):
        methods.main([*common[:2], "--steps", "4", *common[4:], "--methods", "qlora_all", "--update"])
    updated = methods.main([*common, "--methods", "qlora_all", "--update"])
    assert [r["key"] for r in updated] == ["full", "lora_qv", "qlora_all"]
    assert updated[:2] == rows
    qlora = updated[2]
    # r=8 on q, o (32->32), k, v (32->16), gate, up (32->64) and down (64->32), in 2 layers
    assert qlora["trainable_params"] == 2 * 8 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    assert qlora["total_params"] == full["total_params"] + qlora["trainable_params"]
    assert qlora["saved_file"] == "adapter_model.safetensors"
    markdown = (out / "methods.md").read_text()
    assert "| QLoRA r=8 (all linear, NF4) |" in markdown and "| LoRA r=8 (q, v) |" in markdown
    assert "--methods full,lora_qv" in markdown and "--methods qlora_all --update" in markdown
    assert json.loads((out / "methods.json").read_text())["rows"] == updated


def test_every_method_has_a_unique_key_and_builds_its_callbacks():
    keys = [m.key for m in methods.METHODS]
    assert len(keys) == len(set(keys)) and {"full", "lora_qv", "lora_all", "rslora_qv"} <= set(keys)
    assert methods.METHODS[0].callbacks() == []
    (rslora,) = next(m for m in methods.METHODS if m.key == "rslora_qv").callbacks()
    assert rslora.config.use_rslora and rslora.config.r == 64
    (qlora,) = next(m for m in methods.METHODS if m.key == "qlora_all").callbacks()
    assert type(qlora).__name__ == "QLoRACallback" and qlora.config.compute_dtype == "float32"


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "lora_qv,dora"], "--methods: unknown ['dora']"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--model", "/no/such/model"], "--model: no such file or directory"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        methods.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
