"""The one-page summary of ``benchmarks/gpu_suite.sh``: ``python -m benchmarks.gpu_summary OUTDIR``.

Reads ``OUTDIR/steps.tsv`` (each step's status), the benchmarks' JSON under ``OUTDIR`` (every
``"targets"`` list: ``{"target", "met", ...}``), the QLoRA memory line (target: a 7B-shape step
under 10 GiB of GPU memory) and the pytest JUnit files, of the steps that ran in this run only (a
step that did not leaves an earlier run's files in a reused OUTDIR), and writes
``OUTDIR/summary.md``: every step, every target met / not met / not run.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

QLORA_TARGET_GIB = 10.0
TARGET_SOURCES = {"kernels_lora": "lora.json", "kernels_nf4": "nf4.json"}


def _steps(out: Path) -> list[dict]:
    lines = (out / "steps.tsv").read_text().splitlines()[1:]
    keys = ("step", "status", "limit_s", "seconds", "command")
    return [dict(zip(keys, line.split("\t"))) for line in lines if line.strip()]


def _targets(out: Path, steps: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(target, state, detail)`` rows."""
    rows = []
    for step, filename in TARGET_SOURCES.items():
        found = []
        if steps.get(step) == "ok":  # a step that did not run leaves an earlier run's files, not its own
            for f in sorted(out.rglob(filename)):
                found += json.loads(f.read_text()).get("targets") or []
        if not found:
            rows.append((f"{step}: its targets", "not run", steps.get(step, "not in the plan")))
        for t in found:
            state = "met" if t.get("met") else "not met"
            detail = ", ".join(f"{k}={t[k]}" for k in t if k not in ("target", "met"))
            rows.append((f"{step}: {t.get('target')}", state, detail))
    mem = out / "qlora_memory.jsonl"
    if steps.get("qlora_memory") == "ok" and mem.is_file() and mem.read_text().strip():
        result = json.loads(mem.read_text().strip().splitlines()[-1])
        peak = result.get("step_peak_allocated_gib")  # CUDA only; a CPU run has RSS instead
        state = "not run" if peak is None else ("met" if peak < QLORA_TARGET_GIB else "not met")
        rows.append((f"qlora_memory: 7B step < {QLORA_TARGET_GIB:g} GiB", state, f"peak={peak}"))
    else:
        rows.append((f"qlora_memory: 7B step < {QLORA_TARGET_GIB:g} GiB", "not run",
                     steps.get("qlora_memory", "not in the plan")))
    for step in ("gpu_tests", "fsdp_deepspeed"):
        xml = out / f"{step}.xml"
        if xml.is_file() and steps.get(step, "").startswith(("ok", "failed")):  # failed tests: ran
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            bad = counts["failures"] + counts["errors"]
            rows.append((f"{step}: every test passes", "met" if bad == 0 and counts["tests"] else "not met",
                         ", ".join(f"{k}={v}" for k, v in counts.items())))
        else:
            rows.append((f"{step}: every test passes", "not run", steps.get(step, "not in the plan")))
    return rows


def write(out: Path) -> Path:
    steps = _steps(out)
    status = {s["step"]: s["status"] for s in steps}
    lines = ["# GPU suite summary", "", "| step | status | seconds (limit) |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} ({s['limit_s']}) |" for s in steps]
    lines += ["", "| target | state | detail |", "|---|---|---|"]
    lines += [f"| {t} | {state} | {detail} |" for t, state, detail in _targets(out, status)]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary",
                                     description="Summarise a GPU suite run (benchmarks/gpu_suite.sh) "
                                                 "into OUTDIR/summary.md and print it.")
    parser.add_argument("outdir", type=Path, help="the suite's output directory (holds steps.tsv)")
    args = parser.parse_args()
    if not (args.outdir / "steps.tsv").is_file():
        parser.error(f"{str(args.outdir)!r} holds no steps.tsv: pass the GPU suite's output directory")
    print(write(args.outdir).read_text())
