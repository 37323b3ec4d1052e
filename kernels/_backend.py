"""Backend selection for the ops in :mod:`kernels`.

``"torch"`` always runs the pure-PyTorch reference. ``"triton"`` always runs the Triton kernels
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). ``"auto"`` (the default) runs Triton
for CUDA tensors when triton imports, and the reference otherwise. The environment variable
``LIGHTNING_PEFT_BACKEND`` sets the initial value.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
_ENV = "LIGHTNING_PEFT_BACKEND"
_backend: str | None = None


def _check(name: object, what: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Select the backend of every op in :mod:`kernels`: ``"auto"``, ``"torch"`` or ``"triton"``."""
    global _backend
    _backend = _check(name, "backend")


_ENV_PARSED: tuple[str, str] = ("auto", "auto")  # (raw $LIGHTNING_PEFT_BACKEND, checked value)


def get_backend() -> str:
    """The backend in force: the last :func:`set_backend`, else ``$LIGHTNING_PEFT_BACKEND``, else "auto"."""
    global _ENV_PARSED
    if _backend is not None:
        return _backend
    raw = os.environ.get(_ENV, "auto")
    if raw != _ENV_PARSED[0]:  # read on every call (it may change), checked when it does
        _ENV_PARSED = (raw, _check(raw, f"${_ENV}"))
    return _ENV_PARSED[1]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend for its body and restores the previous one."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """Whether the ``triton`` package imports on this machine (checked once; a plain cached bool,
    not ``functools.cache``, so torch.compile traces callers without a warning)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:
            _TRITON_OK = False
        else:
            _TRITON_OK = True
    return _TRITON_OK


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETER_LOCK = threading.RLock()


def interpreter_lock() -> contextlib.AbstractContextManager:
    """What a Triton launch holds: one process-wide lock under the CPU interpreter (it patches
    ``triton.language`` while a kernel runs, so interpreted launches must not overlap), nothing
    on a GPU (launches share no state there)."""
    return _INTERPRETER_LOCK if interpreting() else contextlib.nullcontext()


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide whether an op on ``tensors`` runs its Triton kernel under the current backend.
    Float64 operands always run the PyTorch reference: the kernels accumulate in fp32 (on fp64
    operands ``tl.dot`` into an fp32 accumulator gave garbage)."""
    backend = get_backend()
    if backend == "torch" or any(t.dtype == torch.float64 for t in tensors):
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(
            "kernels backend 'triton' was selected but triton does not import; "
            "install it (`pip install triton`) or call kernels.set_backend('auto')"
        )
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"kernels backend 'triton' needs CUDA tensors, got tensors on {devices}; move them to a "
            "GPU, set TRITON_INTERPRET=1 before importing kernels to run Triton on the CPU, or call "
            "kernels.set_backend('auto') to use the PyTorch reference here"
        )
    return True
