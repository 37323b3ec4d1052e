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
    ``x86-64-v3``, AVX2: to measure what an AVX2 CPU would run) when this CPU has every
    instruction set it enables (a target beyond the CPU would stop the process with SIGILL at
    the first call: it is refused with a warning)."""
    wanted = os.environ.get(env)
    if not wanted or wanted == "native" or _isa_subset(wanted):
        return f"-march={wanted or 'native'}"
    import warnings

    warnings.warn(f"{env}={wanted!r} enables instructions this CPU lacks; building for it natively instead",
                  stacklevel=2)
    return "-march=native"


@functools.cache
def _isa_macros(target: str) -> frozenset[str] | None:
    """The instruction-set macros (``__AVX2__``, ``__FMA4__``, ...) the compiler defines for
    ``-march=<target>``, or None when it cannot tell."""
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        done = subprocess.run([compiler, f"-march={target}", "-dM", "-E", "-x", "c", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    names = (line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define __"))
    return frozenset(n for n in names if n.startswith(_ISA_MACROS))


_ISA_MACROS = ("__AVX", "__SSE", "__FMA", "__XOP", "__F16C", "__BMI", "__AMX", "__AES", "__PCLMUL",
               "__POPCNT", "__LZCNT", "__MOVBE", "__VAES", "__VPCLMUL", "__GFNI", "__SHA", "__ADX",
               "__RDSEED", "__ARM_FEATURE_", "__ARM_NEON")
"""Prefixes of the macros that name an instruction set a target enables."""


def _isa_subset(target: str) -> bool:
    """Whether ``-march=<target>`` enables no instruction-set macro that ``-march=native`` lacks
    (an unknown target is left to the compiler, which refuses it: the next variant is built)."""
    wanted, native = _isa_macros(target), _isa_macros("native")
    return wanted is None or native is None or wanted <= native


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_peft"


def compile_source(compiler: str, options: tuple[str, ...], source: str, target: Path) -> bool:
    """Build ``source`` into ``target`` (atomically: a temporary file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "source.c", Path(tmp) / "library.so"
        src.write_text(source, encoding="utf-8")  # (whatever the locale's encoding)
        try:
            done = subprocess.run([compiler, *options, "-o", str(lib), str(src)], capture_output=True,
                                  timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        if done.returncode != 0 or not lib.exists():
            return False
        with open(lib, "rb") as file:  # on disk before it is published under its name
            os.fsync(file.fileno())
        os.replace(lib, target)
    return True


def _usable(path: Path) -> bool:
    """Whether ``path`` may be loaded: a regular file of this user's that no one else can write,
    in a folder the same holds for (the temp folder is shared), and a whole ELF file (a file cut
    short maps pages past its end, and touching them kills the process with SIGBUS)."""
    import stat

    try:
        for entry in (path.parent, path):
            info = os.lstat(entry)
            if info.st_uid != os.getuid() or info.st_mode & 0o022 or stat.S_ISLNK(info.st_mode):
                return False
        with open(path, "rb") as file:
            header = file.read(64)
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return False
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit ELF only
        return False
    order = "little" if header[5] == 1 else "big"
    field = lambda at, n: int.from_bytes(header[at:at + n], order)  # noqa: E731
    return field(0x28, 8) + field(0x3A, 2) * field(0x3C, 2) <= size  # the section table at the end


def build(name: str, variants: Iterable[tuple[str, tuple[str, ...]]]
          ) -> tuple[ctypes.CDLL, Path, str, tuple[str, ...]] | None:
    """The first of ``variants`` (``(source, compiler options)``, best first) that compiles and
    loads, as ``(library, path, source, options)``, or ``None`` (no compiler, none compiles, or
    Windows). Built into the cache folder on first use, loaded from it afterwards."""
    if sys.platform == "win32":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    for source, options in variants:
        key = hashlib.sha256("\0".join((source, *options, compiler, cpu_flags(),
                                        platform.machine())).encode()).hexdigest()[:16]
        for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"lightning_peft-{os.getuid()}"):
            target = folder / f"{name}-{key}.so"
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                if target.exists() and not _usable(target):
                    target.unlink()                                    # cut short, or not ours
                if not target.exists() and not compile_source(compiler, options, source, target):
                    break                                              # this source/flags fail
                if not _usable(target):
                    continue                                           # a folder others can write
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
