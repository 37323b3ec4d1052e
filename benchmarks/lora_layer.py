"""LoRA layer cost against its frozen base layer and HF PEFT's LoRA layer, in one process.

    python -m benchmarks.lora_layer [--tokens 1024] [--features 4096] [--r 16] [--repeats 30]

Times forward+backward (x requires grad, as inside a network) of: the frozen base ``nn.Linear``,
our ``LoRALinear`` and ``peft.tuners.lora.Linear``, at dropout 0 and 0.05. Each round times the
three back to back (in alternating order), so a slow spell of a shared machine hits a round's
layers alike; the ratio to the frozen base is the median over rounds of that round's ratio (the
median times are printed too), with the bytes each saves for backward beyond its inputs and
parameters. Targets on CPU fp32 (4096x4096, r=16, 8x128
tokens): ours <= 1.02x the base without dropout, <= 1.08x with dropout 0.05, and no more saved
activation bytes than PEFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from benchmarks import quartiles
from lightning_peft import LoRALinear
from lightning_peft.tasks import non_negative_int, positive_int


def _peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer = PeftLinear(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=dropout)
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
    return layer


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of tensors autograd keeps for backward that are not x or a parameter."""
    known = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


def _step(module: nn.Module, x: torch.Tensor, grads: torch.Tensor | list[torch.Tensor]) -> float:
    """Seconds of one forward+backward (``module`` may return one tensor or several)."""
    start = time.perf_counter()
    torch.autograd.backward(module(x), grads)
    elapsed = time.perf_counter() - start
    x.grad = None
    for p in module.parameters():
        p.grad = None
    return elapsed


def paired_rows(modules: dict[str, nn.Module], x: torch.Tensor,
                grads: torch.Tensor | list[torch.Tensor], repeats: int, key: str,
                saved_of: Callable[[nn.Module], nn.Module] = lambda m: m, **fields: object) -> list[dict]:
    """Time ``modules`` (the first is the baseline) in ``repeats`` rounds after 3 warm-up rounds,
    all back to back within a round in alternating order; one row per module with its median ms,
    the median and quartiles of its per-round ratio to the baseline, and the bytes
    ``saved_of(module)`` saves for backward. ``fields`` are added to every row."""
    times: dict[str, list[float]] = {k: [] for k in modules}
    for i in range(repeats + 3):
        order = list(modules.items()) if i % 2 == 0 else list(modules.items())[::-1]
        for name, module in order:
            t = _step(module, x, grads)
            if i >= 3:
                times[name].append(t)
    base_times = next(iter(times.values()))
    rows = []
    for name, module in modules.items():
        ratios = [t / b for t, b in zip(times[name], base_times)]
        rows.append({**fields, key: name,
                     "median_ms": round(statistics.median(times[name]) * 1e3, 3),
                     "ratio_to_base": round(statistics.median(ratios), 4),
                     "ratio_quartiles": [round(q, 4) for q in quartiles(ratios)],
                     "saved_activation_bytes": _saved_bytes(saved_of(module), x)})
    return rows


def token_batch(tokens: int, features: int) -> torch.Tensor:
    """A random input of exactly ``tokens`` rows, requiring grad: sequences of 128 when they
    divide it (``8x128``), else one sequence of ``tokens``."""
    shape = (tokens // 128, 128) if tokens % 128 == 0 else (1, tokens)
    return torch.randn(*shape, features, requires_grad=True)


def init_lora_b(modules: Iterable[nn.Module]) -> None:
    """Train mode and a nonzero ``lora_B`` (zero would let a backend skip work)."""
    for module in modules:
        module.train()
        for name, param in module.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.01)


def run(tokens: int = 1024, features: int = 4096, r: int = 16, repeats: int = 30,
        dropouts: tuple[float, ...] = (0.0, 0.05), seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    base = nn.Linear(features, features, bias=False).requires_grad_(False)
    x = token_batch(tokens, features)
    grad = torch.randn(*x.shape[:-1], features)
    rows = []
    for p in dropouts:
        layers = {"frozen base nn.Linear": base,
                  "lightning-peft LoRALinear": LoRALinear(base, r=r, alpha=2 * r, dropout=p),
                  "HF PEFT lora.Linear": _peft_layer(base, r, 2 * r, p)}
        init_lora_b(layers.values())
        rows += paired_rows(layers, x, grad, repeats, "layer", dropout=p)
    return rows


def parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options both layer benchmarks take."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--tokens", type=positive_int, default=1024)
    p.add_argument("--features", type=positive_int, default=4096)
    p.add_argument("--r", type=positive_int, default=16)
    p.add_argument("--repeats", type=positive_int, default=repeats)
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p


def report(rows: list[dict], key: str, title: str, json_path: Path | None) -> None:
    """Print the rows as a table under ``title`` and write them to ``json_path`` if given."""
    width = max(len(r[key]) for r in rows) + 2
    print(title)
    print(f"{'dropout':>7}  {key:<{width}} {'ms':>9} {'x base':>7} {'quartiles':>13} {'saved MiB':>10}")
    for row in rows:
        q1, _, q3 = row["ratio_quartiles"]
        print(f"{row['dropout']:>7}  {row[key]:<{width}} {row['median_ms']:>9.2f} "
              f"{row['ratio_to_base']:>7.3f} {q1:>6.3f}-{q3:<6.3f} "
              f"{row['saved_activation_bytes'] / 2**20:>10.2f}")
    if json_path:
        write_rows(rows, json_path)


def write_rows(rows: list[dict], json_path: Path) -> None:
    """Write ``rows`` to ``json_path``, each with what the timings depend on: the CPU model,
    vendor, family and model numbers, AVX-512, torch's dispatch level, forcing variables and
    torch's thread count."""
    from benchmarks import cpu_info

    info = cpu_info()
    for row in rows:
        row.update(cpu=info["model"], cpu_vendor=info["vendor"], cpu_family=info["family"],
                   cpu_model_number=info["model_number"], avx512=info["avx512"],
                   torch_cpu_capability=info["torch_capability"], forced=info["forced"],
                   threads=torch.get_num_threads())
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rows, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, repeats=30).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.tokens, args.features, args.r, args.repeats)
    report(rows, "layer", f"CPU fp32, {args.tokens} tokens, {args.features}x{args.features}, "
           f"r={args.r}, {torch.get_num_threads()} threads, forward+backward, median of "
           f"{args.repeats} rounds", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
