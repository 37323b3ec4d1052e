"""DoRA layer cost against its frozen base layer and HF PEFT's DoRA layer, in one process.

    python -m benchmarks.dora_layer [--tokens 1024] [--features 4096] [--r 16] [--repeats 20]
                                    [--threads 1] [--json benchmarks/results/cpu-<vendor>/dora_layer.json]

Times forward+backward (x requires grad, as inside a network) of: the frozen base ``nn.Linear``,
our ``LoRALinear(use_dora=True)`` and ``peft.tuners.lora.Linear(use_dora=True)``, at dropout 0 and
0.05, with the paired rounds of :mod:`benchmarks.lora_layer`: each round times the three back to
back in alternating order and the ratio to the frozen base is the median of the per-round ratios,
beside the bytes each saves for backward beyond its inputs and parameters. DoRA (arXiv
2402.09353) adds to LoRA the per-row norms ``||W0 + s·B·A||`` (here from low-rank algebra,
``r·in·out`` multiply-adds, never the (out, in) update; PEFT builds the update through an
(in, in) identity) and the per-row scale ``m/norm`` (here the epilogue that writes the output).
Target on CPU fp32 (4096x4096, r=16, 8x128 tokens): ours <= 1.15x the frozen base (PEFT's DoRA
measured 1.57x on this machine kind), with fewer saved activation bytes than PEFT's DoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.lora_layer import init_lora_b, paired_rows, parser, report, token_batch
from lightning_peft import LoRALinear


def _peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True)
    layer = PeftLinear(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=dropout,
                       use_dora=True)
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
    return layer


def run(tokens: int = 1024, features: int = 4096, r: int = 16, repeats: int = 20,
        dropouts: tuple[float, ...] = (0.0, 0.05), seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    base = nn.Linear(features, features, bias=False).requires_grad_(False)
    x = token_batch(tokens, features)
    grad = torch.randn(*x.shape[:-1], features)
    rows = []
    for p in dropouts:
        layers = {"frozen base nn.Linear": base,
                  "lightning-peft LoRALinear(use_dora=True)": LoRALinear(base, r=r, alpha=2 * r, dropout=p,
                                                                         use_dora=True),
                  "HF PEFT lora.Linear(use_dora=True)": _peft_layer(base, r, 2 * r, p)}
        init_lora_b(layers.values())
        rows += paired_rows(layers, x, grad, repeats, "layer", dropout=p)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, repeats=20).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.tokens, args.features, args.r, args.repeats)
    report(rows, "layer", f"DoRA, CPU fp32, {args.tokens} tokens, {args.features}x{args.features}, "
           f"r={args.r}, {torch.get_num_threads()} threads, forward+backward, median of "
           f"{args.repeats} rounds", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
