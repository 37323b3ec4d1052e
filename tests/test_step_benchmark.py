"""The training-step benchmark (benchmarks/step.py) on a tiny Llama: the five models do the same
work (same adapters, same first loss for ours and PEFT), the frozen baselines train nothing but
still get input gradients, and the result files name the CPU."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
import torch

from benchmarks import step
from lightning_peft import NF4Linear
from tests._tiny import llama


def test_build_gives_the_same_adapters_and_frozen_baselines():
    torch.manual_seed(0)
    models = step.build(llama(hidden=64), r=4, qlora=True)
    assert list(models) == ["frozen", "lightning-peft LoRA", "HF PEFT LoRA", "frozen NF4",
                            "lightning-peft QLoRA"]
    assert {name: base for name, (_, base) in models.items()} == {
        "frozen": "frozen", "lightning-peft LoRA": "frozen", "HF PEFT LoRA": "frozen",
        "frozen NF4": "frozen NF4", "lightning-peft QLoRA": "frozen NF4"}
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad)
                 for name, (m, _) in models.items()}
    assert trainable["frozen"] == trainable["frozen NF4"] == 0
    assert trainable["lightning-peft LoRA"] == trainable["HF PEFT LoRA"] == \
        trainable["lightning-peft QLoRA"] > 0
    nf4 = [m for m in models["frozen NF4"][0].modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 2 * len(step.TARGETS)                          # 2 layers x 7 projections
    ours = {n: p for n, p in models["lightning-peft LoRA"][0].named_parameters() if "lora_B" in n}
    assert all(p.abs().sum() > 0 for p in ours.values())              # nothing can be skipped


def test_steps_compute_input_gradients_and_equal_losses():
    torch.manual_seed(0)
    base = llama(hidden=64)
    models = step.build(base, r=4, qlora=False)
    ids = torch.randint(0, base.config.vocab_size, (2, 8))
    embeds = base.get_input_embeddings()(ids).detach()
    seen = []
    for m, _ in models.values():
        layer = next(mod for name, mod in m.named_modules() if name.endswith("layers.0"))
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].requires_grad))
    losses = {name: step.step_fn(m, embeds, ids)() for name, (m, _) in models.items()}
    assert seen == [True, True, True]                                 # activation grads everywhere
    assert abs(losses["lightning-peft LoRA"] - losses["HF PEFT LoRA"]) < 1e-5
    assert losses["lightning-peft LoRA"] != losses["frozen"]          # B is nonzero


def test_report_writes_rows_and_cpu(tmp_path, capsys, monkeypatch, unforced):
    monkeypatch.setenv("LIGHTNING_PEFT_NF4_MARCH", "x86-64-v3")  # recorded (read only when building)
    torch.manual_seed(0)
    args = argparse.Namespace(batch=2, seq=8, r=4, repeats=3, warmup=1, threads=[1], no_qlora=False,
                              out=tmp_path)
    assert step.report(llama(hidden=64), args, "tiny llama", ["--threads", "1"]) == 0
    folder = next(tmp_path.iterdir())
    assert folder.name.startswith("cpu-")
    result = json.loads((folder / "step_forced_x86-64-v3.json").read_text())  # never over step.json
    assert result["cpu"]["slug"] == folder.name and isinstance(result["cpu"]["avx512"], bool)
    rows = result["threads"]["1"]
    assert [r["model"] for r in rows][0] == "frozen" and len(rows) == 5
    by = {row["model"]: row for row in rows}
    for row in rows:
        q1, q3 = row["overhead_quartiles_pct"]
        assert row["median_ms"] > 0 and q1 <= q3 and len(row["round_ms"]) == args.repeats
        assert row["median_ms"] == pytest.approx(statistics.median(row["round_ms"]), abs=0.02)
        t, b = min(row["round_ms"]), min(by[row["baseline"]]["round_ms"])   # rounded to 1 us
        lo, hi = 100 * ((t - 5e-4) / (b + 5e-4) - 1), 100 * ((t + 5e-4) / (b - 5e-4) - 1)
        assert lo - 0.005 <= row["fastest_overhead_pct"] <= hi + 0.005
        if row["model"] == row["baseline"]:
            assert row["overhead_pct"] == 0.0 and row["fastest_overhead_pct"] == 0.0
    assert set(result["targets"]["1 threads"]) == {"lightning-peft LoRA", "lightning-peft QLoRA"}
    text = (folder / "step_forced_x86-64-v3.md").read_text()
    assert "| lightning-peft QLoRA | frozen NF4 |" in text
    assert result["cpu"]["forced"] == {"LIGHTNING_PEFT_NF4_MARCH": "x86-64-v3"}
    assert "Forced to other code paths on this CPU" in text and "`LIGHTNING_PEFT_NF4_MARCH=x86-64-v3`" in text
    assert "lightning-peft LoRA" in capsys.readouterr().out


def test_breakdown_row_computes_the_frozen_loss_and_steps_over_the_adapters(tmp_path, unforced):
    """The diagnostic copy does the base products only: the frozen model's loss, input gradients,
    and zero gradients for every adapter tensor (so the optimizer still steps over all of them)."""
    torch.manual_seed(0)
    base = llama(hidden=64)
    models = step.build(base, r=4, qlora=False, breakdown=True)
    assert models[step.BREAKDOWN][1] == "frozen"
    ids = torch.randint(0, base.config.vocab_size, (2, 8))
    embeds = base.get_input_embeddings()(ids).detach()
    model = models[step.BREAKDOWN][0]
    x = embeds.clone().requires_grad_(True)
    loss = model(inputs_embeds=x, labels=ids).loss
    loss.backward()
    frozen_x = embeds.clone().requires_grad_(True)
    frozen_loss = models["frozen"][0](inputs_embeds=frozen_x, labels=ids).loss
    frozen_loss.backward()
    torch.testing.assert_close(loss, frozen_loss)
    torch.testing.assert_close(x.grad, frozen_x.grad)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert len(adapters) == 2 * 2 * len(step.TARGETS)                 # A and B, 2 layers x 7
    assert all(p.grad is not None and not p.grad.any() for p in adapters)
    args = argparse.Namespace(batch=2, seq=8, r=4, repeats=3, warmup=1, threads=[1], no_qlora=True,
                              breakdown=True, out=tmp_path)
    assert step.report(base, args, "tiny llama", ["--breakdown"]) == 0
    text = next(tmp_path.iterdir()).joinpath("step.md").read_text()
    assert step.BREAKDOWN in text and "the rank-r products" in text


def test_matmul_flops_counts_the_lora_products_exactly():
    """The FLOP column: the frozen model's matrix products (attention included) plus, for a LoRA
    model, exactly the six rank-r products per adapted layer, 2·M·r·(3·in + 3·out) FLOPs; our
    LoRA and PEFT's count the same; the count leaves no gradients behind."""
    torch.manual_seed(0)
    base = llama(hidden=64)
    models = step.build(base, r=16, qlora=True)           # a rank the compiled dS/dB loop runs
    ids = torch.randint(0, base.config.vocab_size, (2, 8))
    embeds = base.get_input_embeddings()(ids).detach()
    flops = {name: step.matmul_flops(m, embeds, ids) for name, (m, _) in models.items()}
    frozen = models["frozen"][0]
    m_tokens, r = ids.numel(), 16
    lora = sum(2 * m_tokens * r * 3 * (mod.in_features + mod.out_features)
               for name, mod in frozen.named_modules()
               if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in step.TARGETS)
    linear = sum(2 * m_tokens * mod.in_features * mod.out_features
                 for mod in frozen.modules() if isinstance(mod, torch.nn.Linear))
    assert flops["frozen"] > 2 * linear                               # forward + input grads + attention
    assert flops["lightning-peft LoRA"] - flops["frozen"] == lora
    assert flops["HF PEFT LoRA"] == flops["lightning-peft LoRA"] == flops["lightning-peft QLoRA"]
    assert flops["frozen NF4"] == flops["frozen"]
    assert all(p.grad is None for m, _ in models.values() for p in m.parameters())
