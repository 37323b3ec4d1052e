"""benchmarks/prefix_generation.py on a tiny random Llama: the output files and the structure checks
(cached generation equals uncached, the prefix is in the cache once). No timed assertion."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import prefix_generation
from tests.test_example import save_tiny_model


def test_main_writes_the_table_and_json(tmp_path, unforced):
    model_dir = save_tiny_model(tmp_path / "tiny_llama")
    out = tmp_path / "results"
    result = prefix_generation.main(["--model", str(model_dir), "--virtual-tokens", "4",
                                     "--prompt-tokens", "8", "--new-tokens", "4", "--rounds", "2",
                                     "--warmup", "0", "--out", str(out)])
    saved = json.loads((out / "prefix_generation.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("command", "cpu", "torch", "load_average_start_end"):
        assert saved[key]
    assert saved["command"].startswith("python -m benchmarks.prefix_generation --model")
    assert saved["torch"] == torch.__version__
    assert saved["checks"] == {"cache_equals_no_cache": True, "cache_length_after_prefill": 12,
                               "expected_cache_length": 12}
    rows = {r["config"]: r for r in saved["rows"]}
    assert set(rows) == {"base", "prefix"} and rows["base"]["ratio_to_base"] == 1.0
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and len(row["tokens_per_s_rounds"]) == 2
        q1, q2, q3 = row["ratio_quartiles"]
        assert q1 <= q2 <= q3
    markdown = (out / "prefix_generation.md").read_text()
    assert "| Prefix n (P-tuning v2), prompt L |" in markdown and "Command: `python -m" in markdown


@pytest.mark.parametrize("argv", [["--virtual-tokens", "0"], ["--rounds", "0"], ["--warmup", "-1"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        prefix_generation.main(argv)
