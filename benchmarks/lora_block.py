"""LoRA on an attention block's q/k/v projections (three layers reading one x), in one process.

    python -m benchmarks.lora_block [--tokens 1024] [--features 4096] [--r 16] [--repeats 21]

Times forward+backward of the frozen q/k/v ``nn.Linear`` layers (q: d->d, k and v: d->d/4, as
with grouped-query attention), our LoRA on them (the shared-input fusion reads x once for the
three ``A`` matrices, in both directions, with one dropout draw), our LoRA with that fusion turned
off (three separate ``lora_linear`` calls) and HF PEFT's LoRA layers, at dropout 0 and 0.05.
Each round times all four back to back, in alternating order; the ratio to the frozen base is the
median over rounds of that round's ratio. Also prints the bytes each saves for backward beyond x
and the parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.lora_layer import _peft_layer, _saved_bytes
from lightning_peft import apply_lora
from lightning_peft.lora import lora_layers

_NAMES = ("q_proj", "k_proj", "v_proj")


class QKV(nn.Module):
    """Three projections of the same input, returned as a tuple."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q, k, v

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class _Summed(nn.Module):
    """The block with one output (their flattened concatenation) for :func:`_saved_bytes`."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([y.flatten() for y in self.block(x)])


def _step(block: nn.Module, x: torch.Tensor, grads: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    torch.autograd.backward(block(x), grads)
    elapsed = time.perf_counter() - start
    x.grad = None
    for p in block.parameters():
        p.grad = None
    return elapsed


def _blocks(bases: list[nn.Linear], r: int, dropout: float) -> dict[str, nn.Module]:
    ours = apply_lora(QKV(*bases), r=r, alpha=2 * r, dropout=dropout, target_modules=list(_NAMES))
    unfused = apply_lora(QKV(*bases), r=r, alpha=2 * r, dropout=dropout, target_modules=list(_NAMES))
    for _, layer in lora_layers(unfused):
        layer.__dict__.pop("_shared_input_group", None)  # the fusion off: three single calls
    peft = QKV(*(_peft_layer(b, r, 2 * r, dropout) for b in bases))
    blocks = {"frozen base q/k/v": QKV(*bases), "lightning-peft (fused q/k/v)": ours,
              "lightning-peft (unfused)": unfused, "HF PEFT lora.Linear": peft}
    for block in blocks.values():
        block.train()
        for name, param in block.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.01)
    return blocks


def run(tokens: int = 1024, features: int = 4096, r: int = 16, repeats: int = 21,
        dropouts: tuple[float, ...] = (0.0, 0.05), seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    bases = [nn.Linear(features, n, bias=False).requires_grad_(False)
             for n in (features, features // 4, features // 4)]
    x = torch.randn(max(1, tokens // 128), min(tokens, 128), features, requires_grad=True)
    grads = [torch.randn(*x.shape[:-1], b.out_features) for b in bases]
    rows = []
    for p in dropouts:
        blocks = _blocks(bases, r, p)
        times: dict[str, list[float]] = {k: [] for k in blocks}
        for i in range(repeats + 3):  # the first rounds warm up (and teach the fusion its group)
            order = list(blocks.items()) if i % 2 == 0 else list(blocks.items())[::-1]
            for name, block in order:
                t = _step(block, x, grads)
                if i >= 3:
                    times[name].append(t)
        base_times = times["frozen base q/k/v"]
        for name, block in blocks.items():
            ratios = [t / b for t, b in zip(times[name], base_times)]
            rows.append({"dropout": p, "block": name,
                         "median_ms": round(statistics.median(times[name]) * 1e3, 3),
                         "ratio_to_base": round(statistics.median(ratios), 4),
                         "ratio_quartiles": [round(q, 4) for q in statistics.quantiles(ratios, n=4)],
                         "saved_activation_bytes": _saved_bytes(_Summed(block), x)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.features % 4 or min(args.tokens, args.features, args.r, args.repeats) < 1:
        parser.error("--tokens, --r, --repeats must be positive and --features a positive multiple of 4")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.tokens, args.features, args.r, args.repeats)
    print(f"CPU fp32, {args.tokens} tokens, q {args.features}->{args.features}, k/v "
          f"{args.features}->{args.features // 4}, r={args.r}, {torch.get_num_threads()} threads, "
          f"forward+backward, median of {args.repeats} rounds")
    print(f"{'dropout':>7}  {'block':<30} {'ms':>9} {'x base':>7} {'quartiles':>13} {'saved MiB':>10}")
    for row in rows:
        q1, _, q3 = row["ratio_quartiles"]
        print(f"{row['dropout']:>7}  {row['block']:<30} {row['median_ms']:>9.2f} "
              f"{row['ratio_to_base']:>7.3f} {q1:>6.3f}-{q3:<6.3f} "
              f"{row['saved_activation_bytes'] / 2**20:>10.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
