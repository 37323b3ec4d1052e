"""Small C loops compiled once per machine with the system C compiler, loaded with ctypes.

The sources are plain C (no torch headers, so compiling takes well under a second), built with
``-march=native`` so the compiler vectorizes them for the CPU they run on (AVX2, AVX-512, NEON:
nothing is written for one of them). A library is cached under ``$XDG_CACHE_HOME/lightning_peft``
(or ``~/.cache``, else the temp folder), keyed by its source, flags, the compiler and the CPU's
feature flags, and written atomically, so processes may race to build it. Without a working
compiler :func:`build` returns ``None`` and the callers keep their Torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for), or its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def march(env: str) -> str:
    """``-march=native``, or the target the environment variable ``env`` names (e.g.
    ``x86-64-v3``, AVX2: to measure what an AVX2 CPU would run)."""
    return f"-march={os.environ.get(env) or 'native'}"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_peft"


def compile_source(compiler: str, options: tuple[str, ...], source: str, target: Path) -> bool:
    """Build ``source`` into ``target`` (atomically: a temporary file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "source.c", Path(tmp) / "library.so"
        src.write_text(source)
        try:
            done = subprocess.run([compiler, *options, "-o", str(lib), str(src)], capture_output=True,
                                  timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        if done.returncode != 0 or not lib.exists():
            return False
        os.replace(lib, target)
    return True


def build(name: str, variants: Iterable[tuple[str, tuple[str, ...]]]
          ) -> tuple[ctypes.CDLL, Path, str, tuple[str, ...]] | None:
    """The first of ``variants`` (``(source, compiler options)``, best first) that compiles and
    loads, as ``(library, path, source, options)``, or ``None`` (no compiler, none compiles, or
    Windows). Built into the cache folder on first use, loaded from it afterwards."""
    if sys.platform == "win32":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    for source, options in variants:
        key = hashlib.sha256("\0".join((source, *options, compiler, cpu_flags(),
                                        platform.machine())).encode()).hexdigest()[:16]
        for folder in (cache_dir(), Path(tempfile.gettempdir()) / "lightning_peft"):
            target = folder / f"{name}-{key}.so"
            try:
                if not target.exists() and not compile_source(compiler, options, source, target):
                    break                                              # this source/flags fail
                return ctypes.CDLL(str(target)), target, source, options
            except OSError:
                continue                                               # folder not writable
    return None


def loader(env: str, build: Callable[[], T | None]) -> Callable[[], T | None]:
    """``library()`` for one compiled library: ``build()`` on the first call (one thread at a
    time), its result kept for the process; ``None`` whenever the environment variable ``env`` is
    ``"0"``."""
    lock = threading.Lock()

    @functools.cache
    def built() -> T | None:
        with lock:
            return build()

    def library() -> T | None:
        if os.environ.get(env, "1") == "0":
            return None
        return built()

    return library
