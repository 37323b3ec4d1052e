"""NF4 kernel benchmark: ``python -m benchmarks.kernels nf4 [--tiny] [--out DIR] [--repeats N]``.

Dequantize (bf16 output, blocksize 64, double quantization) of Llama-sized weights against
bitsandbytes' ``dequantize_4bit`` and our Torch reference, in GB/s and in percent of the
device's measured copy bandwidth; bytes moved = packed codes + absmax statistics + output.
4-bit matmul ``x·Wᵀ`` for M in {1, 16, 256, 4096} against bitsandbytes' ``matmul_4bit`` and a
bf16 ``x·Wᵀ`` on a dense weight. On a CPU the "ours" column is the Torch implementation (the one
``kernels`` dispatches to there). Results: ``<out>/<device-slug>/nf4.json`` and ``nf4.md``.

Targets: CPU, dequantize no slower than bitsandbytes (ratio <= 1.0). GPU, dequantize >= 85 % of
copy bandwidth and >= 2x bitsandbytes; M = 1 GEMV >= 2.5x faster than the bf16 GEMV.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import cpu_info, result_stem
from kernels import _nf4_cpu, use_backend
from kernels import nf4 as _nf4
from lightning_peft.tasks import positive_int

DEQUANT_SHAPES = [(4096, 4096), (4096, 11008), (8192, 28672)]
MATMUL_SHAPE = (4096, 4096)
MATMUL_M = [1, 16, 256, 4096]
TINY_DEQUANT_SHAPES = [(64, 128), (96, 320)]
TINY_MATMUL_SHAPE = (64, 128)
TINY_MATMUL_M = [1, 16, 33]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """``cpu-amd-epyc-avx512`` / ``cuda-nvidia-h100-80gb-hbm3``: the results folder of a device."""
    if device.type == "cpu":
        return cpu_info()["slug"]
    name = _device_name(device).split(" (")[0]
    return f"{device.type}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _load_average() -> str:
    """The 1-minute load average (a shared CPU makes every timing noisy), or "n/a"."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_all(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int
              ) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin (fair under load)."""
    for f in fns.values():                                             # warm-up / compile
        f()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            _sync(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                f()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = _time_all({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]
    return 2 * nbytes / t / 1e9


def _random_nf4(shape: tuple[int, int], device: torch.device, seed: int) -> _nf4.NF4Tensor:
    """A valid double-quantized NF4 weight with random codes (quantizing 235M floats on a CPU
    only to benchmark the dequantizer would dominate the run)."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    blocks = n // 64
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(blocks, generator=g) * 0.1 + 0.01
    offset = absmax.mean()
    qabs, nested = _nf4._quantize_absmax_torch(absmax - offset, _nf4._tables(packed.device))
    q = _nf4.NF4Tensor(packed, qabs, shape, torch.bfloat16, 64, nested_absmax=nested,
                       nested_code=_nf4._dynamic_map(), nested_offset=offset)
    return q.to(device)


def _bench_dequantize_shape(shape, seed, device, repeats, copy_gbps) -> list[dict]:
    import bitsandbytes.functional as F

    q = _random_nf4(shape, device, seed)
    packed, state = q.to_bitsandbytes()
    state.dtype = torch.bfloat16
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)

    def torch_reference():
        with use_backend("torch"):
            return _nf4.dequantize_nf4(q, torch.bfloat16, out=out)

    fns = {
        "ours": lambda: _nf4.dequantize_nf4(q, torch.bfloat16),
        "ours_out": lambda: _nf4.dequantize_nf4(q, torch.bfloat16, out=out),
        "bitsandbytes": lambda: F.dequantize_4bit(packed, state),
    }
    if device.type == "cuda":
        fns["torch_reference"] = torch_reference
    assert torch.equal(fns["ours"](), fns["bitsandbytes"]().view(shape))
    times = _time_all(fns, device, repeats)
    moved = q.nbytes + 2 * q.numel()                                   # read 4-bit + write bf16
    rows = []
    for name, t in times.items():
        gbps = moved / t / 1e9
        rows.append({"shape": list(shape), "impl": name, "ms": t * 1e3, "gbps": gbps,
                     "pct_copy_bw": 100 * gbps / copy_gbps,
                     "ratio_vs_bitsandbytes": t / times["bitsandbytes"]})
    return rows


def bench_dequantize(shapes, device, repeats, copy_gbps) -> list[dict]:
    rows = []
    for i, shape in enumerate(shapes):
        rows += _bench_dequantize_shape(shape, i, device, repeats, copy_gbps)
    return rows


def _bench_matmul_m(m, q, wd, device, repeats) -> list[dict]:
    import bitsandbytes as bnb

    n, k = q.shape
    packed, state = q.to_bitsandbytes()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, torch.bfloat16)
    fns = {
        "ours": lambda: _nf4.nf4_linear(x, q),
        "bitsandbytes": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state),
        "bf16_dense": lambda: x @ wd.t(),
    }
    with torch.no_grad():
        times = _time_all(fns, device, repeats)
    return [{"m": m, "n": n, "k": k, "impl": name, "ms": t * 1e3,
             "tflops": 2 * m * n * k / t / 1e12,
             "speedup_vs_bf16": times["bf16_dense"] / t,
             "speedup_vs_bitsandbytes": times["bitsandbytes"] / t} for name, t in times.items()]


def bench_matmul(shape, ms, device, repeats) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=torch.bfloat16)
    q = _nf4.quantize_nf4(w, 64, True)
    wd = q.dequantize(torch.bfloat16)
    rows = []
    for m in ms:
        rows += _bench_matmul_m(m, q, wd, device, repeats)
    return rows


def _targets(result: dict, cpu: bool) -> list[dict]:
    """The issue's targets, measured, one ``{"target", "value", "met"}`` row each (the form
    :mod:`benchmarks.gpu_summary` reads): CPU, ours/bitsandbytes dequantize time <= 1.0 (worst
    shape); GPU, >= 85 % of copy bandwidth, >= 2x bitsandbytes, M = 1 >= 2.5x the bf16 GEMV."""
    ours = [r for r in result["dequantize"] if r["impl"] == "ours"]
    worst_ratio = max(r["ratio_vs_bitsandbytes"] for r in ours)
    if cpu:
        return [{"target": "dequantize time / bitsandbytes <= 1.0 (worst shape)", "value": worst_ratio,
                 "met": worst_ratio <= 1.0}]
    pct = min(r["pct_copy_bw"] for r in ours)
    gemv = [r for r in result["matmul"] if r["impl"] == "ours" and r["m"] == 1]
    gemv_speedup = min((r["speedup_vs_bf16"] for r in gemv), default=float("nan"))
    return [{"target": "dequantize >= 85 % of copy bandwidth", "value": pct, "met": pct >= 85},
            {"target": "dequantize >= 2x bitsandbytes", "value": 1 / worst_ratio,
             "met": 1 / worst_ratio >= 2},
            {"target": "M = 1 nf4_linear >= 2.5x the bf16 GEMV", "value": gemv_speedup,
             "met": gemv_speedup >= 2.5}]


def _markdown(result: dict) -> str:
    lines = [f"# NF4 kernels on {result['device']}", "",
             f"torch {result['torch']}, bitsandbytes {result['bitsandbytes']}; copy bandwidth "
             f"{result['copy_gbps']:.1f} GB/s; load average {result['load_average']}.", "",
             *([f"CPU: {json.dumps(result['cpu'])}; ours on CPU: {result['ours_cpu_path']}.", ""]
               if "cpu" in result else []),
             f"Targets: {json.dumps(result['targets'])}", "",
             "## Dequantize to bf16 (blocksize 64, double quant)", "",
             "| shape | impl | ms | GB/s | % copy BW | time / bitsandbytes |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["dequantize"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['impl']} | {r['ms']:.3f} | "
                     f"{r['gbps']:.1f} | {r['pct_copy_bw']:.1f} | "
                     f"{r['ratio_vs_bitsandbytes']:.2f} |")
    lines += ["", "## 4-bit matmul x·Wᵀ (bf16)", "",
              "| M | N x K | impl | ms | TFLOP/s | speedup vs bf16 | speedup vs bitsandbytes |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for r in result["matmul"]:
        lines.append(f"| {r['m']} | {r['n']}x{r['k']} | {r['impl']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.3f} | {r['speedup_vs_bf16']:.2f} | "
                     f"{r['speedup_vs_bitsandbytes']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels nf4", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed calls per impl (default 5 on a CPU, 50 on a GPU)")
    parser.add_argument("--m", type=positive_int, nargs="*", default=None, help="matmul batch sizes")
    parser.add_argument("--skip-matmul", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    import bitsandbytes

    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    cpu = device.type == "cpu"
    repeats = args.repeats if args.repeats is not None else (5 if cpu else 50)
    shapes = TINY_DEQUANT_SHAPES if args.tiny else DEQUANT_SHAPES
    mm_shape = TINY_MATMUL_SHAPE if args.tiny else MATMUL_SHAPE
    ms = args.m if args.m is not None else (TINY_MATMUL_M if args.tiny else
                                            [m for m in MATMUL_M if not cpu or m <= 256])
    copy_gbps = copy_bandwidth(device, (1 << 20) if args.tiny else (1 << 28), repeats)
    result = {
        "device": _device_name(device), "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__, "copy_gbps": copy_gbps,
        "dequantize": bench_dequantize(shapes, device, repeats, copy_gbps),
        "matmul": [] if args.skip_matmul else bench_matmul(mm_shape, ms, device, repeats),
        "load_average": _load_average(), "repeats": repeats,
    }
    if cpu:
        native = _nf4_cpu.library()
        result["cpu"] = cpu_info()
        result["ours_cpu_path"] = (f"compiled C loop ({' '.join(_nf4_cpu.flags())})" if native
                                   else "Torch ops (no C compiler)")
    result["targets"] = _targets(result, cpu)
    folder = Path(args.out) / device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    stem = result_stem("nf4", result["cpu"]) if cpu else "nf4"  # a forced-AVX2 run: nf4_forced_avx2
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _markdown(result)
    (folder / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {folder / f'{stem}.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
