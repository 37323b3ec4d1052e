"""LoRA linear microbenchmarks: ``python -m benchmarks.kernels lora [--smoke] [--out DIR] ...``.

Times, per (M, K, N, r), forward and forward+backward of:

- ``fused``: ``kernels.lora_linear`` on the Triton backend (``kernels/_lora_triton.py``),
- ``reference``: ``kernels.lora.lora_linear_reference`` (pure PyTorch),
- ``peft``: HF PEFT's ``peft.tuners.lora.Linear`` wrapping an ``nn.Linear``,
- ``base``: the frozen ``nn.Linear`` alone, with x requiring grad (the floor to compare with),

the LoRA ones with dropout 0 and 0.1. Prints a table (ms, ratio to base, achieved TFLOP/s, where
FLOPs are the op's useful ones: ``2MNK`` per base GEMM plus the LoRA GEMMs), checks the targets
below, and writes ``lora.json`` and ``lora.png`` under ``benchmarks/results/<device>/`` (or
``--out``). On a GPU timings come from ``triton.testing.do_bench`` (CUDA events, median). Without
CUDA it runs one smoke size in fp32 under the Triton interpreter, to test the harness itself.

Targets (bf16, M=8192, K=N=4096, r=16, forward+backward): fused <= 1.05x base; fused at least
1.3x faster than PEFT; fused with dropout 0.1 <= 1.02x fused without.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

M_SWEEP = (512, 1024, 2048, 4096, 8192, 16384)
SHAPE_SWEEP = ((4096, 4096), (4096, 11008), (8192, 8192))
RANK_SWEEP = (8, 16, 64)
IMPLS = ("fused", "reference", "peft", "base")
MODES = ("fwd", "fwd+bwd")
TARGET = {"M": 8192, "K": 4096, "N": 4096, "r": 16}


def _number_list(convert, ok, kind: str):
    """An ``argparse`` type: comma-separated values each converted and checked (``kind`` in the
    error)."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"must be comma-separated {kind}, got {text!r}")
        return values
    return parse


def _shape(text: str) -> tuple[int, int]:
    k, _, n = text.lower().partition("x")
    return int(k), int(n)


def _parse(argv: list[str]) -> argparse.Namespace:
    ints = _number_list(int, lambda v: v >= 1, "positive integers")
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="one tiny size (M=64, K=N=64, r=8; fp32 without CUDA, the default there)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results/<device>/)")
    ap.add_argument("--m", type=ints, default=M_SWEEP, help="comma-separated token counts")
    ap.add_argument("--shapes", type=_number_list(_shape, lambda kn: min(kn) >= 1, "KxN shapes (4096x4096)"),
                    default=SHAPE_SWEEP, help="comma-separated KxN, e.g. 4096x4096,4096x11008")
    ap.add_argument("--ranks", type=ints, default=RANK_SWEEP)
    ap.add_argument("--impls", type=lambda s: tuple(s.split(",")), default=IMPLS)
    ap.add_argument("--dropout", type=_number_list(float, lambda p: 0.0 <= p < 1.0, "numbers in [0, 1)"),
                    default=(0.0, 0.1))
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        ap.error(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
    return args


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _flops(m: int, k: int, n: int, r: int, impl: str, mode: str) -> float:
    """Useful FLOPs: the base GEMM (and dX GEMM) plus, for LoRA, the rank-r GEMMs."""
    base = 2 * m * n * k * (2 if mode == "fwd+bwd" else 1)
    if impl == "base":
        return base
    lora = 2 * m * r * (k + n)                    # S = x·Aᵀ, S·Bᵀ
    if mode == "fwd+bwd":
        lora += 2 * m * r * (2 * n + 2 * k)       # dS, dB, dA, dS·A
    return base + lora


class _Timer:
    """``triton.testing.do_bench`` on CUDA; the wall clock of one call elsewhere."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, grad_to_none) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100,
                                                 grad_to_none=grad_to_none,
                                                 return_mode="median"))
        start = time.perf_counter()  # the interpreter compiles nothing: one call is enough
        fn()
        return (time.perf_counter() - start) * 1e3


def _build(impl: str, m: int, k: int, n: int, r: int, p: float, dtype, device):
    """(callable(x) -> y, trainable tensors) for one implementation."""
    import torch

    import kernels
    from kernels.lora import lora_linear_reference

    g = torch.Generator(device="cpu").manual_seed(0)
    base = torch.nn.Linear(k, n, bias=True).to(device, dtype).requires_grad_(False)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(n, r, generator=g) / r**0.5).to(device, dtype).requires_grad_()
    scaling = 2.0
    if impl == "base":
        return base, []
    if impl == "fused":
        def fused(x):
            with kernels.use_backend("triton"):
                return kernels.lora_linear(x, base.weight, a, b, scaling, base.bias, p)
        return fused, [a, b]
    if impl == "reference":
        return (lambda x: lora_linear_reference(x, base.weight, a, b, scaling, base.bias, p)), \
            [a, b]
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    layer = PeftLinear(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p),
                       r=r, lora_alpha=2 * r)
    layer = layer.to(device, dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    layer.train()
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def _measure(args, m, k, n, r, impl, p, dtype, device, timer) -> list[dict]:
    import torch

    fn, params = _build(impl, m, k, n, r, p, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(m, k, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(m, n, generator=g).to(device, dtype)
    rows = []
    for mode in MODES:
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    fn(x)
            ms = timer(step, [])
        else:
            def step():
                fn(x).backward(dy)
            ms = timer(step, [x, *params])
        rows.append({"impl": impl, "mode": mode, "M": m, "K": k, "N": n, "r": r,
                     "dropout": 0.0 if impl == "base" else p, "dtype": str(dtype).split(".")[-1],
                     "ms": ms, "tflops": _flops(m, k, n, r, impl, mode) / ms / 1e9})
    return rows


def _with_ratios(results: list[dict]) -> None:
    base = {(row["M"], row["K"], row["N"], row["r"], row["mode"]): row["ms"]
            for row in results if row["impl"] == "base"}
    for row in results:
        ref = base.get((row["M"], row["K"], row["N"], row["r"], row["mode"]))
        row["ratio_to_base"] = row["ms"] / ref if ref else None


def _targets(results: list[dict], smoke: bool) -> list[dict]:
    """The GPU targets, evaluated at the target size (or at the smoke size, for information)."""
    def ms(impl, p, mode="fwd+bwd"):
        for row in results:
            at = smoke or all(row[key] == val for key, val in TARGET.items())
            if at and row["impl"] == impl and row["mode"] == mode and row["dropout"] == p:
                return row["ms"]
        return None

    checks = [
        ("fused fwd+bwd / base fwd+bwd", ms("fused", 0.0), ms("base", 0.0), "<=", 1.05),
        ("peft fwd+bwd / fused fwd+bwd", ms("peft", 0.0), ms("fused", 0.0), ">=", 1.3),
        ("fused dropout 0.1 / dropout 0 (fwd+bwd)", ms("fused", 0.1), ms("fused", 0.0), "<=",
         1.02),
    ]
    out = []
    for name, num, den, op, bound in checks:
        ratio = num / den if num and den else None
        ok = None if ratio is None or smoke else (ratio <= bound if op == "<=" else ratio >= bound)
        out.append({"target": name, "ratio": ratio, "bound": f"{op} {bound}", "met": ok})
    return out


def _print(results: list[dict], targets: list[dict], device_name: str, smoke: bool) -> None:
    print(f"LoRA linear on {device_name}" + (" (smoke: interpreter timings are meaningless)"
                                            if smoke else ""))
    head = f"{'M':>6} {'K':>5} {'N':>6} {'r':>3} {'impl':>9} {'p':>4} {'mode':>8} " \
           f"{'ms':>9} {'x base':>7} {'TFLOP/s':>8}"
    print(head)
    print("-" * len(head))
    for row in results:
        ratio = "" if row["ratio_to_base"] is None else f"{row['ratio_to_base']:.3f}"
        print(f"{row['M']:>6} {row['K']:>5} {row['N']:>6} {row['r']:>3} {row['impl']:>9} "
              f"{row['dropout']:>4.2g} {row['mode']:>8} {row['ms']:>9.3f} {ratio:>7} "
              f"{row['tflops']:>8.2f}")
    where = "at the smoke size" if smoke else \
        "at M={M}, K={K}, N={N}, r={r}".format(**TARGET)
    print(f"\nTargets ({where}, fwd+bwd):")
    for t in targets:
        state = ("not evaluated (smoke)" if smoke else "not measured") if t["met"] is None \
            else ("met" if t["met"] else "MISSED")
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
        print(f"  {t['target']:<42} {ratio:>7} (want {t['bound']}): {state}")


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(row["K"], row["N"]) for row in results})
    ranks = sorted({row["r"] for row in results})
    fig, axes = plt.subplots(len(ranks), len(shapes), squeeze=False,
                             figsize=(4.5 * len(shapes), 3.5 * len(ranks)))
    for i, r in enumerate(ranks):
        for j, (k, n) in enumerate(shapes):
            ax = axes[i][j]
            for impl in IMPLS:
                for p in sorted({row["dropout"] for row in results}):
                    pts = sorted((row["M"], row["ratio_to_base"]) for row in results
                                 if row["impl"] == impl and row["dropout"] == p
                                 and row["mode"] == "fwd+bwd" and row["r"] == r
                                 and (row["K"], row["N"]) == (k, n)
                                 and row["ratio_to_base"] is not None)
                    if pts and impl != "base":
                        ax.plot(*zip(*pts), marker="o", label=f"{impl} p={p:g}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"K={k} N={n} r={r}, fwd+bwd")
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("time / base")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        # Triton runs on CPU tensors only under the interpreter, read when kernels are defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.smoke = True
    if args.smoke:
        args.m, args.shapes, args.ranks = (64,), ((64, 64),), (8,)
        if not cuda:
            args.dtype = "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu-triton-interpreter"
    out = args.out or Path(__file__).resolve().parent / "results" / _slug(device_name)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer(cuda)

    results = []
    for (k, n) in args.shapes:
        for r in args.ranks:
            for m in args.m:
                for impl in args.impls:
                    for p in ((0.0,) if impl == "base" else args.dropout):
                        results += _measure(args, m, k, n, r, impl, p, dtype, device, timer)
                        if cuda:
                            torch.cuda.empty_cache()
    _with_ratios(results)
    targets = _targets(results, args.smoke)
    _print(results, targets, device_name, args.smoke)
    meta = {"device": device_name, "dtype": args.dtype, "smoke": args.smoke,
            "torch": torch.__version__}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    (out / "lora.json").write_text(json.dumps({"meta": meta, "results": results,
                                               "targets": targets}, indent=1))
    if not args.no_plot:
        _plot(results, out / "lora.png")
    print(f"\nwrote {out / 'lora.json'}" + ("" if args.no_plot else f" and {out / 'lora.png'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
