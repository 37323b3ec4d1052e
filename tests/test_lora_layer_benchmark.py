"""The layer and q/k/v block benchmarks (benchmarks/lora_layer.py, lora_block.py) at tiny sizes:
rows, paired ratios, saved bytes, the fusion actually running."""

from __future__ import annotations

import json

import pytest

from benchmarks import lora_layer


def test_layer_benchmark_rows_and_saved_bytes(tmp_path, capsys, monkeypatch, unforced):
    monkeypatch.setenv("LIGHTNING_PEFT_NF4_MARCH", "x86-64-v3")  # recorded (read only when building)
    out = tmp_path / "layer.json"
    assert lora_layer.main(["--tokens", "64", "--features", "48", "--r", "4", "--repeats", "4",
                            "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["dropout"], r["layer"].split()[0]) for r in rows] == [
        (0.0, "frozen"), (0.0, "lightning-peft"), (0.0, "HF"),
        (0.05, "frozen"), (0.05, "lightning-peft"), (0.05, "HF")]
    for row in rows:
        q1, q2, q3 = row["ratio_quartiles"]
        assert row["median_ms"] > 0 and q1 <= q2 <= q3
        assert row["forced"] == {"LIGHTNING_PEFT_NF4_MARCH": "x86-64-v3"} and row["threads"] == 1
        if row["layer"].startswith("frozen"):
            assert row["ratio_to_base"] == 1.0 and row["saved_activation_bytes"] == 0
    ours = {r["dropout"]: r for r in rows if r["layer"].startswith("lightning-peft")}
    peft = {r["dropout"]: r for r in rows if r["layer"].startswith("HF")}
    # dropout: S (64x4 fp32) plus the int64 positions of the ~5% dropped elements (drawn with a
    # margin), less than even a bool mask of x (64x48 bytes); PEFT keeps the dropped copy of x
    assert 64 * 4 * 4 < ours[0.05]["saved_activation_bytes"] < 64 * 4 * 4 + 64 * 48
    assert peft[0.05]["saved_activation_bytes"] >= 64 * 48 * 4
    assert ours[0.0]["saved_activation_bytes"] <= peft[0.0]["saved_activation_bytes"]
    assert "lightning-peft LoRALinear" in capsys.readouterr().out


def test_block_benchmark_fuses_qkv_and_saves_less(tmp_path, count_grouped):
    from benchmarks import lora_block

    out = tmp_path / "block.json"
    assert lora_block.main(["--tokens", "64", "--features", "48", "--r", "4", "--repeats", "3",
                            "--threads", "1", "--json", str(out)]) == 0
    rows = {(r["dropout"], r["block"]): r for r in json.loads(out.read_text())}
    assert len(rows) == 8 and count_grouped and set(count_grouped) == {3}  # one call for q, k, v
    fused = rows[(0.05, "lightning-peft (fused q/k/v)")]["saved_activation_bytes"]
    unfused = rows[(0.05, "lightning-peft (unfused)")]["saved_activation_bytes"]
    peft = rows[(0.05, "HF PEFT lora.Linear")]["saved_activation_bytes"]
    assert fused < unfused < peft  # one set of dropped positions instead of three; PEFT: copies of x
    assert rows[(0.0, "frozen base q/k/v")]["ratio_to_base"] == 1.0


def test_block_benchmark_refuses_bad_sizes():
    from benchmarks import lora_block

    with pytest.raises(SystemExit):
        lora_block.main(["--features", "50"])


@pytest.mark.parametrize("module, argv, says", [
    ("lora_layer", ["--r", "0"], "argument --r: must be a positive integer"),
    ("lora_layer", ["--repeats", "0"], "argument --repeats: must be a positive integer"),
    ("lora_layer", ["--threads", "-3"], "argument --threads: must be an integer >= 0"),
    ("dora_layer", ["--r", "0"], "argument --r: must be a positive integer"),
    ("step", ["--threads", "0"], "argument --threads: must be a positive integer"),
])
def test_benchmark_arguments_are_checked_before_measuring(module, argv, says, capsys):
    """They used to fail after (or in the middle of) measuring: a division by zero at r=0, no
    median of zero repeats, torch refusing 0 threads."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"benchmarks.{module}").main(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_gpu_summary_names_its_argument():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_summary"], capture_output=True, text=True)
    assert done.returncode == 2 and "the following arguments are required: outdir" in done.stderr
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_summary", "--help"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "usage: python -m benchmarks.gpu_summary" in done.stdout
