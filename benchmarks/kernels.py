"""Kernel microbenchmarks: ``python -m benchmarks.kernels {lora,nf4} [options]``.

Each suite lives in its own module (``benchmarks/kernels_lora.py``, ``benchmarks/kernels_nf4.py``)
with a ``main(argv)``; results go to ``benchmarks/results/<device>/``.
"""

from __future__ import annotations

import importlib
import sys

SUITES = ("lora", "nf4")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUITES:
        print(f"usage: python -m benchmarks.kernels {{{','.join(SUITES)}}} [options]",
              file=sys.stderr)
        return 2
    suite = importlib.import_module(f"benchmarks.kernels_{argv[0]}")
    return int(suite.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
