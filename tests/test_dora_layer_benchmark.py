"""The DoRA layer benchmark (benchmarks/dora_layer.py) at tiny sizes: rows, paired ratios and the
saved bytes beside HF PEFT's DoRA."""

from __future__ import annotations

import json

from benchmarks import dora_layer


def test_dora_layer_benchmark_rows_and_saved_bytes(tmp_path, capsys):
    out = tmp_path / "dora.json"
    tokens, features, r = 64, 48, 4
    assert dora_layer.main(["--tokens", str(tokens), "--features", str(features), "--r", str(r),
                            "--repeats", "3", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(row["dropout"], row["layer"].split()[0]) for row in rows] == [
        (0.0, "frozen"), (0.0, "lightning-peft"), (0.0, "HF"),
        (0.05, "frozen"), (0.05, "lightning-peft"), (0.05, "HF")]
    for row in rows:
        q1, q2, q3 = row["ratio_quartiles"]
        assert row["median_ms"] > 0 and q1 <= q2 <= q3
        if row["layer"].startswith("frozen"):
            assert row["ratio_to_base"] == 1.0 and row["saved_activation_bytes"] == 0
    saved = {(row["dropout"], row["layer"].split()[0]): row["saved_activation_bytes"] for row in rows}
    ours = {p: saved[(p, "lightning-peft")] for p in (0.0, 0.05)}
    peft = {p: saved[(p, "HF")] for p in (0.0, 0.05)}
    # without dropout: u (tokens, out) for dm, S (tokens, r) and two (out,) vectors, all fp32
    assert ours[0.0] == 4 * (tokens * features + tokens * r + 2 * features)
    # with dropout: the positions of the ~5% dropped elements (int64) on top, not a copy of x
    assert ours[0.0] < ours[0.05] < ours[0.0] + tokens * features
    for p in (0.0, 0.05):
        assert ours[p] < peft[p]
    assert "LoRALinear(use_dora=True)" in capsys.readouterr().out
