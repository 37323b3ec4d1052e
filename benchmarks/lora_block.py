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

import torch
from torch import nn

from benchmarks.lora_layer import _peft_layer, init_lora_b, paired_rows, parser, report, token_batch
from lightning_peft import apply_lora
from lightning_peft.methods.lora import lora_layers

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


def _blocks(bases: list[nn.Linear], r: int, dropout: float) -> dict[str, nn.Module]:
    ours = apply_lora(QKV(*bases), r=r, alpha=2 * r, dropout=dropout, target_modules=list(_NAMES))
    unfused = apply_lora(QKV(*bases), r=r, alpha=2 * r, dropout=dropout, target_modules=list(_NAMES))
    for _, layer in lora_layers(unfused):
        layer.__dict__.pop("_shared_input_group", None)  # the fusion off: three single calls
    peft = QKV(*(_peft_layer(b, r, 2 * r, dropout) for b in bases))
    blocks = {"frozen base q/k/v": QKV(*bases), "lightning-peft (fused q/k/v)": ours,
              "lightning-peft (unfused)": unfused, "HF PEFT lora.Linear": peft}
    init_lora_b(blocks.values())
    return blocks


def run(tokens: int = 1024, features: int = 4096, r: int = 16, repeats: int = 21,
        dropouts: tuple[float, ...] = (0.0, 0.05), seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    bases = [nn.Linear(features, n, bias=False).requires_grad_(False)
             for n in (features, features // 4, features // 4)]
    x = token_batch(tokens, features)
    grads = [torch.randn(*x.shape[:-1], b.out_features) for b in bases]
    rows = []
    for p in dropouts:  # the warm-up rounds also teach the fusion its group
        rows += paired_rows(_blocks(bases, r, p), x, grads, repeats, "block", saved_of=_Summed,
                            dropout=p)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, repeats=21)
    args = p.parse_args(argv)
    if args.features % 4 or min(args.tokens, args.features, args.r, args.repeats) < 1:
        p.error("--tokens, --r, --repeats must be positive and --features a positive multiple of 4")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.tokens, args.features, args.r, args.repeats)
    report(rows, "block", f"CPU fp32, {args.tokens} tokens, q {args.features}->{args.features}, "
           f"k/v {args.features}->{args.features // 4}, r={args.r}, {torch.get_num_threads()} "
           f"threads, forward+backward, median of {args.repeats} rounds", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
