"""Test setup: Triton kernels run on CPU tensors under the interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here, before
any test imports a kernel module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def count_grouped(monkeypatch):
    """The member counts of every ``kernels.lora_linear_grouped`` call made during the test."""
    import kernels

    calls = []
    original = kernels.lora_linear_grouped

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "lora_linear_grouped", spy)
    return calls


@pytest.fixture
def unforced(monkeypatch):
    """No forcing variable (``ATEN_CPU_CAPABILITY``, ``LIGHTNING_PEFT_LORA_MARCH``, ...) in the
    environment, so a benchmark writes its machine's own file names (``step.md``, not
    ``step_forced_avx2.md``) even when the suite runs forced to another instruction set."""
    from benchmarks import FORCING

    for name in FORCING:
        monkeypatch.delenv(name, raising=False)
