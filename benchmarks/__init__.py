"""Benchmarks: kernel microbenchmarks, the methods tables and end-to-end runs (see each module)."""

from __future__ import annotations

import platform
import re
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (results measured on different machines are not comparable in time)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


FORCING = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "LIGHTNING_PEFT_LORA_MARCH",
           "LIGHTNING_PEFT_NF4_MARCH")
"""Environment variables that make this CPU run another instruction set's code paths (used to
measure what an AVX2 CPU runs, on an AVX-512 one)."""


def cpu_info() -> dict:
    """What a CPU timing depends on: the model name, the vendor, whether the CPU has AVX-512 and
    AVX2, the instruction set torch's kernels dispatch to (``ATEN_CPU_CAPABILITY`` can lower it),
    ``forced`` (the variables of :data:`FORCING` that are set, which lower what torch, MKL or our
    compiled loops use), the CPU family and model numbers (a virtual machine's model name, "AMD
    EPYC", can stand for several generations) and ``slug``, the results folder: the model name's
    first words and the widest vector instruction set (``cpu-intel-xeon-avx512``,
    ``cpu-amd-epyc-avx2``), so that two CPUs sold under one name but running different code
    paths do not share a folder."""
    import os
    import re

    import torch

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    model = cpu_model()
    vendor = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(fields.get("vendor_id", ""),
                                                                  fields.get("vendor_id") or "unknown")
    words = [w for w in re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*", " ", model.lower()).split()
             if w.isalpha()][:2]
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    return {"model": model, "vendor": vendor, "family": fields.get("cpu family"),
            "model_number": fields.get("model"), "avx512": "avx512f" in flags,
            "avx2": "avx2" in flags, "amx": "amx_tile" in flags,
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "forced": {k: os.environ[k] for k in FORCING if os.environ.get(k)},
            "slug": "cpu-" + "-".join((words or ["unknown"]) + ([isa] if isa else []))}


def quartiles(values: list[float]) -> list[float]:
    """The three quartiles of ``values`` (a single value is all three: one round has no spread)."""
    import statistics

    return list(statistics.quantiles(values, n=4)) if len(values) > 1 else [values[0]] * 3


RESULTS = Path(__file__).resolve().parent / "results"
"""Where results are committed: ``RESULTS/<device slug>/<stem>.{json,md}``."""


def result_stem(name: str, info: dict) -> str:
    """The file stem of a CPU result named ``name``: ``name``, or ``<name>_forced_<target>`` when
    :func:`cpu_info` saw forcing variables (``nf4_forced_avx2`` with ``ATEN_CPU_CAPABILITY=avx2``,
    else the first variable's value), so a forced run never overwrites the machine's own results."""
    forced = info.get("forced") or {}
    if not forced:
        return name
    target = forced.get("ATEN_CPU_CAPABILITY") or next(iter(forced.values()))  # avx2, x86-64-v3, ...
    return f"{name}_forced_{re.sub(r'[^a-z0-9.-]+', '-', str(target).lower())}"


def write_result(out: Path, stem: str, result: dict, markdown) -> None:
    """Write ``result`` as ``<out>/<stem>.json`` and, through ``markdown(result, path)``, as
    ``<out>/<stem>.md``; say where."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown(result, out / f"{stem}.md")
    print(f"Wrote {out / f'{stem}.md'}, {out / f'{stem}.json'}")
