"""benchmarks/gpu_suite.sh stays runnable on a CPU: without CUDA (and with GPU_SUITE_DRY_RUN=1)
it records every step, writes the summary, and exits 0; the summary reads targets met / not met."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
STEPS = ["gpu_tests", "kernels_lora", "kernels_nf4", "qlora_memory", "fsdp_deepspeed"]


def _run(tmp_path, **env):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out)], cwd=ROOT,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return out


def test_without_cuda_every_step_is_skipped_and_summarised(tmp_path):
    out = _run(tmp_path)
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == STEPS
    assert all(r[1] == "skipped (no CUDA device)" for r in rows)
    summary = (out / "summary.md").read_text()
    assert summary.count("not run") == 5 and "qlora_memory: 7B step < 10 GiB" in summary


def test_dry_run_plans_each_step_with_its_limit_under_8_minutes(tmp_path):
    out = _run(tmp_path, GPU_SUITE_DRY_RUN="1")
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert all(r[1] == "planned" for r in rows)
    assert sum(int(r[2]) + 10 for r in rows) < 8 * 60  # limits plus each timeout's kill grace


def test_summary_reads_targets(tmp_path):
    from benchmarks import gpu_summary

    (tmp_path / "steps.tsv").write_text("step\tstatus\tlimit_s\tseconds\tcommand\n"
                                        "kernels_lora\tok\t100\t50\tx\nqlora_memory\tok\t90\t40\ty\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "lora.json").write_text(json.dumps({"targets": [
        {"target": "fused fwd", "ratio": 1.1, "met": True}, {"target": "bwd", "ratio": 1.9, "met": False}]}))
    (tmp_path / "qlora_memory.jsonl").write_text(json.dumps({"step_peak_allocated_gib": 9.2}) + "\n")
    summary = gpu_summary.write(tmp_path).read_text()
    assert "| kernels_lora: fused fwd | met |" in summary and "| kernels_lora: bwd | not met |" in summary
    assert "| qlora_memory: 7B step < 10 GiB | met | peak=9.2 |" in summary
    assert "| kernels_nf4: its targets | not run | not in the plan |" in summary
