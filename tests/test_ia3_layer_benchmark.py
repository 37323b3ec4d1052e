"""The IA3 layer benchmark (benchmarks/ia3_layer.py) at tiny sizes: rows, paired ratios, saved
bytes."""

from __future__ import annotations

import json

import pytest

from benchmarks import ia3_layer


def test_layer_benchmark_rows_and_saved_bytes(tmp_path, capsys):
    out = tmp_path / "results" / "ia3_layer.json"
    assert ia3_layer.main(["--tokens", "64", "--features", "48", "--repeats", "4", "--threads", "1",
                           "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["scales"], r["layer"].split()[0]) for r in rows] == [
        ("output", "frozen"), ("output", "lightning-peft"), ("output", "HF"),
        ("feedforward", "frozen"), ("feedforward", "lightning-peft"), ("feedforward", "HF")]
    for row in rows:
        q1, q2, q3 = row["ratio_quartiles"]
        assert row["median_ms"] > 0 and q1 <= q2 <= q3
        if row["layer"].startswith("frozen"):
            assert row["ratio_to_base"] == 1.0 and row["saved_activation_bytes"] == 0
    ours = {r["scales"]: r for r in rows if r["layer"].startswith("lightning-peft")}
    peft = {r["scales"]: r for r in rows if r["layer"].startswith("HF")}
    # output scaling keeps the unscaled output (64x48 fp32) for dl, as PEFT's autograd does;
    # input scaling keeps nothing beyond x and the vector
    assert ours["output"]["saved_activation_bytes"] == 64 * 48 * 4 <= peft["output"]["saved_activation_bytes"]
    assert ours["feedforward"]["saved_activation_bytes"] == 0
    printed = capsys.readouterr().out
    assert "IA3 scaling the output" in printed and "IA3 scaling the input (feed-forward)" in printed
    assert "lightning-peft IA3Linear" in printed


@pytest.mark.parametrize("argv", [["--tokens", "0"], ["--repeats", "-1"], ["--threads", "-2"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        ia3_layer.main(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err
