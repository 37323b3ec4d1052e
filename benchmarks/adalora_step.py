"""One AdaLoRA training step, ours against HF PEFT's AdaLoRA on the same Llama, in one process.

    python -m benchmarks.adalora_step [--hidden 256] [--layers 4] [--seq 128] [--batch 4]
                                      [--repeats 20] [--threads 1]
                                      [--json benchmarks/results/cpu-<vendor>/adalora_step.json]

A step is what a training loop does with AdaLoRA: forward with the loss and the orthogonality
penalty (PEFT adds it inside its forward; we add :func:`lightning_peft.adalora_orthogonal_penalty`),
backward, AdamW step, the rank allocation (``update_and_allocate``: importance scores and a mask
to the budget every step, the costliest schedule: ``tinit=0``, ``deltaT=1``), ``zero_grad``.
Both models start from the same weights and stay equal (the implementations agree bit for bit),
so they do the same work. Each round times one step of each back to back, in alternating order;
the result is the median of the per-round ratios ours / PEFT. Target: <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks import cpu_info, quartiles

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(hidden: int, layers: int, vocab: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(config).train()


def build(hidden: int, layers: int, vocab: int, init_r: int, target_r: int, seed: int = 0):
    """``(peft_model, ours)``: HF PEFT's AdaLoRA and ours over two copies of one Llama, with the
    same adapter weights."""
    from peft import AdaLoraConfig, get_peft_model

    from lightning_peft.methods.adalora import apply_adalora

    kwargs = dict(init_r=init_r, target_r=target_r, tinit=0, tfinal=0, deltaT=1, total_step=1_000_000)
    peft_model = get_peft_model(_llama(hidden, layers, vocab, seed), AdaLoraConfig(
        **kwargs, target_modules=TARGETS, lora_alpha=8, task_type="CAUSAL_LM"))
    ours = apply_adalora(_llama(hidden, layers, vocab, seed), **kwargs, target_modules=TARGETS, alpha=8.0)
    state = {k.replace("base_model.model.", "").replace(".default", ""): v
             for k, v in peft_model.state_dict().items()}
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                param.copy_(state[name])
    return peft_model, ours


def run(hidden: int = 256, layers: int = 4, seq: int = 128, batch: int = 4, vocab: int = 1000,
        init_r: int = 12, target_r: int = 8, repeats: int = 20, warmup: int = 2) -> dict:
    from lightning_peft.methods.adalora import adalora_orthogonal_penalty, adalora_update_and_allocate

    peft_model, ours = build(hidden, layers, vocab, init_r, target_r)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    opt_peft = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    steps = {"peft": 0, "ours": 0}

    def step_peft() -> float:
        loss = peft_model(ids, labels=ids).loss  # the penalty is added inside PEFT's forward
        loss.backward()
        opt_peft.step()
        peft_model.base_model.update_and_allocate(steps["peft"])
        opt_peft.zero_grad()
        steps["peft"] += 1
        return loss.item()

    def step_ours() -> float:
        loss = ours(ids, labels=ids).loss + adalora_orthogonal_penalty(ours)
        loss.backward()
        opt_ours.step()
        adalora_update_and_allocate(ours, steps["ours"])
        opt_ours.zero_grad()
        steps["ours"] += 1
        return loss.item()

    def timed(fn) -> tuple[float, float]:
        start = time.perf_counter()
        loss = fn()
        return time.perf_counter() - start, loss

    for _ in range(warmup):
        step_peft()
        step_ours()
    times: dict[str, list[float]] = {"peft": [], "ours": []}
    ratios, same = [], True
    for i in range(repeats):
        order = ("peft", "ours") if i % 2 == 0 else ("ours", "peft")
        got = {}
        for name in order:
            got[name] = timed(step_peft if name == "peft" else step_ours)
            times[name].append(got[name][0])
        ratios.append(got["ours"][0] / got["peft"][0])
        same = same and got["ours"][1] == got["peft"][1]
    q1, q2, q3 = quartiles(ratios)
    ratio = statistics.median(ratios)
    return {
        "settings": {"hidden": hidden, "layers": layers, "seq": seq, "batch": batch, "vocab": vocab,
                     "init_r": init_r, "target_r": target_r, "targets": TARGETS, "repeats": repeats,
                     "threads": torch.get_num_threads(), "cpu": cpu_info(), "device": "cpu",
                     "dtype": "float32",
                     "schedule": "tinit=0, deltaT=1: scores and a mask every step"},
        "rows": [
            {"impl": "HF PEFT AdaLoRA", "median_ms": round(1e3 * statistics.median(times["peft"]), 3)},
            {"impl": "lightning-peft AdaLoRA", "median_ms": round(1e3 * statistics.median(times["ours"]), 3),
             "ratio_to_peft": round(ratio, 4), "ratio_quartiles": [round(q, 4) for q in (q1, q2, q3)]},
        ],
        "same_losses": same,
        "target": "ratio_to_peft <= 1.0 (median of paired rounds)",
        "meets_target": ratio <= 1.0,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 256), ("layers", 4), ("seq", 128), ("batch", 4), ("vocab", 1000),
                          ("init-r", 12), ("target-r", 8), ("repeats", 20)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    for name in ("hidden", "layers", "seq", "batch", "vocab", "init_r", "target_r", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.target_r > args.init_r:
        p.error(f"--target-r must be at most --init-r={args.init_r}, got {args.target_r}")
    if args.hidden % 64 and args.hidden > 64:
        p.error(f"--hidden must be a multiple of 64 (the head size) or at most 64, got {args.hidden}")
    if args.threads < 0:
        p.error(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.hidden, args.layers, args.seq, args.batch, args.vocab, args.init_r, args.target_r,
                 args.repeats)
    peft_row, ours_row = result["rows"]
    print(f"AdaLoRA training step, CPU fp32, Llama hidden={args.hidden} layers={args.layers}, "
          f"batch {args.batch}x{args.seq}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} rounds")
    print(f"  {peft_row['impl']:<24} {peft_row['median_ms']:>10.3f} ms")
    print(f"  {ours_row['impl']:<24} {ours_row['median_ms']:>10.3f} ms   "
          f"ours/PEFT {ours_row['ratio_to_peft']:.4f} (quartiles {ours_row['ratio_quartiles']})  "
          f"same losses: {result['same_losses']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
