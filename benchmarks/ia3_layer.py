"""IA3 layer cost against its frozen base layer and HF PEFT's IA3 layer, in one process.

    python -m benchmarks.ia3_layer [--tokens 1024] [--features 4096] [--repeats 30] [--threads 1]
                                   [--json benchmarks/results/cpu-<vendor>/ia3_layer.json]

Times forward+backward (x requires grad, as inside a network) of: the frozen base ``nn.Linear``,
our ``IA3Linear`` and ``peft.tuners.ia3.Linear``, for an output-scaling target (keys, values) and
a feed-forward (input-scaling) one, with the paired rounds of :mod:`benchmarks.lora_layer`: each
round times the three back to back in alternating order and the ratio to the frozen base is the
median of the per-round ratios, beside the bytes each saves for backward beyond its inputs and
parameters. Target on CPU fp32 (4096x4096, 8x128 tokens): ours <= 1.02x the frozen base, whose
forward+backward is two GEMMs; IA3 adds only elementwise passes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from benchmarks.lora_layer import paired_rows, report, token_batch, write_rows
from lightning_peft.methods.ia3 import IA3Linear

KINDS = ("output", "feedforward")
"""What the vector scales: a key/value target's output, or a feed-forward target's input."""


def _peft_layer(base: nn.Linear, feedforward: bool) -> nn.Module:
    from peft import IA3Config
    from peft.tuners.ia3 import Linear as PeftLinear

    layer = PeftLinear(base, "default", config=IA3Config(), is_feedforward=feedforward)
    for name, p in layer.named_parameters():
        p.requires_grad_("ia3_l" in name)
    return layer


def _perturb(modules) -> None:
    """Vectors near, but not at, ones (so no backend can skip a multiplication by one)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if "ia3_l" in name:
                    param.copy_(1 + 0.01 * torch.randn(param.shape, generator=g))


def run(tokens: int = 1024, features: int = 4096, repeats: int = 30, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    base = nn.Linear(features, features, bias=False).requires_grad_(False)
    x = token_batch(tokens, features)
    grad = torch.randn(*x.shape[:-1], features)
    rows = []
    for kind in KINDS:
        feedforward = kind == "feedforward"
        layers = {"frozen base nn.Linear": base,
                  "lightning-peft IA3Linear": IA3Linear(base, is_feedforward=feedforward),
                  "HF PEFT ia3.Linear": _peft_layer(base, feedforward)}
        _perturb(layers.values())
        # IA3 has no dropout: the column report() prints is 0.0 on every row
        rows += paired_rows(layers, x, grad, repeats, "layer", scales=kind, dropout=0.0)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    for name in ("tokens", "features", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.threads < 0:
        p.error(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.tokens, args.features, args.repeats)
    for kind in KINDS:
        report([r for r in rows if r["scales"] == kind], "layer",
               f"IA3 scaling the {kind if kind == 'output' else 'input (feed-forward)'}: CPU fp32, "
               f"{args.tokens} tokens, {args.features}x{args.features}, {torch.get_num_threads()} "
               f"threads, forward+backward, median of {args.repeats} rounds", None)
    if args.json:
        write_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
