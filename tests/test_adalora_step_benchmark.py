"""The AdaLoRA step benchmark (benchmarks/adalora_step.py) at tiny sizes: both implementations
run the same training steps (equal losses), paired ratios, the JSON it writes."""

from __future__ import annotations

import json

import pytest

from benchmarks import adalora_step


def test_step_benchmark_rows(tmp_path, capsys):
    out = tmp_path / "results" / "adalora_step.json"
    assert adalora_step.main(["--hidden", "32", "--layers", "1", "--seq", "8", "--batch", "2",
                              "--vocab", "50", "--init-r", "4", "--target-r", "2", "--repeats", "3",
                              "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    peft_row, ours_row = result["rows"]
    assert peft_row["impl"] == "HF PEFT AdaLoRA" and ours_row["impl"] == "lightning-peft AdaLoRA"
    assert peft_row["median_ms"] > 0 and ours_row["median_ms"] > 0
    q1, q2, q3 = ours_row["ratio_quartiles"]
    assert 0 < q1 <= q2 <= q3 and ours_row["ratio_to_peft"] > 0
    assert result["same_losses"] is True  # the two do the same work, step for step
    assert result["meets_target"] == (ours_row["ratio_to_peft"] <= 1.0)
    assert result["settings"]["threads"] == 1
    assert "ours/PEFT" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--hidden", "0"], ["--repeats", "-1"], ["--threads", "-2"],
                                  ["--init-r", "2", "--target-r", "4"], ["--hidden", "100"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        adalora_step.main(argv)
    assert info.value.code == 2
    assert argv[-2] in capsys.readouterr().err
