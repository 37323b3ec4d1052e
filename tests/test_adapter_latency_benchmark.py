"""benchmarks/adapter_latency.py on a tiny random Llama: the output files and the structure checks
(merged LoRA computes what unmerged LoRA does, fresh adapters leave the base's outputs as they
are). No timed assertion: only that every configuration was timed."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from benchmarks import adapter_latency
from lightning_peft import BottleneckAdapter, LoRALinear
from tests.test_example import save_tiny_model


def _tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def test_main_writes_the_table_and_json(tmp_path, unforced):
    model_dir = save_tiny_model(tmp_path / "tiny_llama")
    out = tmp_path / "results"
    result = adapter_latency.main(["--model", str(model_dir), "--tokens", "16", "--threads", "1",
                                   "--rounds", "2", "--calls", "2", "--warmup", "1", "--out", str(out)])
    saved = json.loads((out / "adapter_latency.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("command", "cpu", "torch", "load_average_start_end"):
        assert saved[key]
    assert saved["command"].startswith("python -m benchmarks.adapter_latency --model")
    assert saved["torch"] == torch.__version__
    # every configuration timed in both cases, its ratio taken against the base of the same rounds
    rows = {(r["case"], r["config"]): r for r in saved["rows"]}
    assert set(rows) == {(c, k) for c in adapter_latency.CASES for k in adapter_latency.CONFIGS}
    for (case, key), row in rows.items():
        assert row["threads"] == 1 and row["median_ms"] > 0 and row["ratio_to_base"] > 0
        assert row["calls_per_round"] == (2 if case == "decode" else 1)
        if key == "base":
            assert row["ratio_to_base"] == 1.0
    checks = saved["checks"]
    assert checks["lora_merged_max_abs_diff"] < 1e-4 < checks["lora_changes_logits_by"]
    assert checks["fresh_adapters_equal_base"] == {k: True for k in adapter_latency.ADAPTERS}
    assert saved["adapter_sites"] == {"adapter_houlsby": 4, "adapter_pfeiffer": 2, "adapter_parallel": 2}
    markdown = (out / "adapter_latency.md").read_text()
    assert "## Prefill, 1 thread" in markdown and "## Decode, 1 thread" in markdown
    assert "| LoRA r=8 (all linear), merged |" in markdown and "CPU: " in markdown
    assert "torch " + torch.__version__ in markdown and saved["command"] in markdown


def test_configurations_compute_what_they_claim():
    base = _tiny_llama()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    models, checks = adapter_latency.build_configs(base, ids)
    assert list(models) == list(adapter_latency.CONFIGS)
    assert models["base"] is base and all(not m.training for m in models.values())
    assert not any(p.requires_grad for m in models.values() for p in m.parameters())
    merged, unmerged = models["lora_merged"], models["lora_unmerged"]
    lora_layers = [m for m in merged.modules() if isinstance(m, LoRALinear)]
    assert len(lora_layers) == 2 * 7 and all(m.merged for m in lora_layers)  # q k v o gate up down
    assert not any(m.merged for m in unmerged.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        merged_logits, unmerged_logits = merged(input_ids=ids).logits, unmerged(input_ids=ids).logits
        # the adapters' up-projections are drawn at random after the check: they change the outputs now
        adapted = {k: models[k](input_ids=ids).logits for k in adapter_latency.ADAPTERS}
    torch.testing.assert_close(merged_logits, unmerged_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmerged_logits, reference, atol=1e-3)  # B is not zero: merging did something
    assert torch.equal(models["base"](input_ids=ids).logits, reference)  # the base itself is untouched
    assert checks["fresh_adapters_equal_base"] == {k: True for k in adapter_latency.ADAPTERS}
    for key, logits in adapted.items():
        assert not torch.equal(logits, reference), key
        layers = [m for m in models[key].modules() if isinstance(m, BottleneckAdapter)]
        assert {m.placement for m in layers} == {adapter_latency.ADAPTERS[key]["placement"]}
        assert len(layers) == (4 if key == "adapter_houlsby" else 2)


@pytest.mark.parametrize(("argv", "message"), [
    (["--threads", "0"], "--threads must be comma-separated positive integers"),
    (["--threads", "a"], "--threads must be comma-separated positive integers"),
    (["--rounds", "0"], "--rounds must be a positive integer"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        adapter_latency.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
