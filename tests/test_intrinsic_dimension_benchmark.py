"""benchmarks/intrinsic_dimension.py on a tiny random BERT: the sweep, d90, the files."""

import json

import pytest

from benchmarks import intrinsic_dimension as bench
from tests.test_methods import PAIRS, _save_tiny_bert, _write_jsonl


def test_d90_definitions():
    points = [(10, 0.5), (100, 0.80), (1000, 0.90), (10000, 0.97)]
    assert bench.d90(points, 0.98) == 1000  # 0.9 x 0.98 = 0.882
    assert bench.d90(points, 0.98, chance=0.5) == 10000  # 0.5 + 0.9 x 0.48 = 0.932
    assert bench.d90(points[:2], 0.98) is None


def test_sweep_on_a_tiny_bert_writes_table_json_and_plot(tmp_path):
    model = _save_tiny_bert(tmp_path / "tiny_bert")
    train = _write_jsonl(tmp_path / "train.jsonl", PAIRS)
    held = _write_jsonl(tmp_path / "eval.jsonl", PAIRS[:5])
    out = tmp_path / "results"
    result = bench.main(["--model", str(model), "--train", str(train), "--eval", str(held), "--steps", "2",
                         "--batch-size", "3", "--warmup", "1", "--dims", "50,10", "--kinds", "said,did",
                         "--out", str(out)])
    keys = [r["key"] for r in result["rows"]]
    assert keys == ["full", "said_d50", "did_d10", "did_d50"]  # SAID needs d > m = 38 tensors here
    assert [e["key"] for e in result["skipped"]] == ["said_d10"]
    for row in result["rows"][1:]:
        assert row["trainable_params"] == row["d"] and 0 <= row["accuracy"] <= 1
        assert row["eval_records"] == 5
    saved = json.loads((out / "intrinsic_dimension.json").read_text())
    assert saved["rows"] == result["rows"] and set(saved["d90"]) == {"said", "did"}
    assert saved["paper_d90"]["RoBERTa-Large"]["said"]["MRPC"] == 207
    text = (out / "intrinsic_dimension.md").read_text()
    assert "| DID d=10 | 10 |" in text and "MiniLM-L6 DID" in text and "said_d10 | skipped" in text
    assert (out / "intrinsic_dimension.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--dims", "0,10"], "--dims must be integers >= 1"),
    (["--dims", "a"], "--dims must be comma-separated integers"),
    (["--kinds", "lora"], "--kinds must be a comma-separated subset of said,did"),
    (["--skip-full"], "--skip-full needs --full-accuracy"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_step_cost_on_a_tiny_bert(tmp_path):
    model = _save_tiny_bert(tmp_path / "tiny_bert")
    train = _write_jsonl(tmp_path / "train.jsonl", PAIRS)
    out = tmp_path / "results"
    result = bench.main(["--step-cost", "--model", str(model), "--train", str(train), "--batch-size", "4",
                         "--dims", "60,200", "--rounds", "2", "--out", str(out)])
    assert set(result["seconds_per_step"]) == {"full", "frozen (head only)", "SAID d=60", "SAID d=200"}
    assert result["over_frozen"]["frozen (head only)"] == 1.0 and result["batch"] == 4
    assert set(result["projection_fwd_bwd_seconds"]) == {"60", "200"}
    assert "| SAID d=60 |" in (out / "intrinsic_dimension_step.md").read_text()
    assert json.loads((out / "intrinsic_dimension_step.json").read_text()) == result
