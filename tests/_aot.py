"""Ahead-of-time compilation of Triton kernels for a GPU the machine does not have (ptxas only)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_ahead(script: str, **env: str) -> list[dict]:
    """Run ``script`` in a fresh interpreter without ``TRITON_INTERPRET`` (plus ``env``) and return
    the JSON list it prints on its last line, one record per compiled kernel."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    environ.update(env)
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=environ,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
