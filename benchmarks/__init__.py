"""Benchmarks: kernel microbenchmarks, the methods tables and end-to-end runs (see each module)."""

from __future__ import annotations

import platform
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


def write_result(out: Path, stem: str, result: dict, markdown) -> None:
    """Write ``result`` as ``<out>/<stem>.json`` and, through ``markdown(result, path)``, as
    ``<out>/<stem>.md``; say where."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown(result, out / f"{stem}.md")
    print(f"Wrote {out / f'{stem}.md'}, {out / f'{stem}.json'}")
