"""The compiled CPU dequantize loop (kernels/_nf4_cpu.py): bit for bit the NF4 formula in every
dtype and blocksize, on special scales (overflow, subnormals, NaN), from several threads, and the
clean fallback to the Torch path without a compiler or when switched off."""

from __future__ import annotations

import pytest
import torch

from kernels import _native, _nf4_cpu
from kernels import nf4 as _nf4
from kernels.nf4 import BLOCKSIZES, NF4Tensor, dequantize_nf4, nf4_linear, quantize_nf4

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
pytestmark = pytest.mark.skipif(_nf4_cpu.library() is None, reason="no C compiler on this machine")


def _formula(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``c[nibble]·absmax[block]`` written out independently: nibbles from the bytes, the fp32
    product, one rounding to ``dtype``."""
    code = torch.tensor(_nf4._NF4_CODE, dtype=torch.float32)
    b = q.packed.to(torch.int64)
    nib = torch.stack([b >> 4, b & 15], 1).view(-1)[: q.numel()]
    absmax = _nf4._absmax_torch(q)
    scale = absmax.repeat_interleave(q.blocksize)[: q.numel()]
    return (code[nib] * scale).to(dtype).view(q.shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except that any NaN equals any NaN (torch's own casts give NaN as 0x7fc0 or
    0xffff in bf16 depending on whether the loop was vectorized)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    keep = ~a.isnan()
    return torch.equal(a[keep].view(view), b[keep].view(view))


@pytest.fixture
def calls(monkeypatch):
    """Counts the blocks the compiled loop writes (so a test knows it ran)."""
    seen = []
    real = _nf4_cpu.dequantize_blocks

    def spy(lib, packed, absmax, code, out, b0, b1, bs):
        seen.append(b1 - b0)
        return real(lib, packed, absmax, code, out, b0, b1, bs)

    monkeypatch.setattr(_nf4_cpu, "dequantize_blocks", spy)
    return seen


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_native_matches_formula(blocksize, double_quant, calls):
    g = torch.Generator().manual_seed(blocksize)
    n = 3 * blocksize + 17                                             # a partial last block
    w = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4).mul(5)
    q = quantize_nf4(w.view(1, n), blocksize, double_quant)
    for dtype in FLOATS:
        assert _same_bits(dequantize_nf4(q, dtype), _formula(q, dtype)), dtype
    assert calls and all(c == 3 for c in calls)


def test_special_scales_match_torch_path(calls, monkeypatch):
    """Scales that overflow fp16/bf16, make subnormals, or are NaN/inf: the same bits as the Torch
    path (and the formula), NaN included."""
    g = torch.Generator().manual_seed(0)
    blocks, bs = 9, 64
    packed = torch.randint(0, 256, (blocks * bs // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.tensor([1e38, 7e4, 1e-5, 1e-8, 1e-40, 0.0, float("nan"), float("inf"), 3.0])
    q = NF4Tensor(packed, absmax, (blocks, bs), torch.float32, bs)
    native = {dt: dequantize_nf4(q, dt) for dt in FLOATS}
    assert len(calls) == len(FLOATS)
    monkeypatch.setenv("LIGHTNING_PEFT_NF4_NATIVE", "0")
    for dt in FLOATS:
        reference = dequantize_nf4(q, dt)
        assert _same_bits(native[dt], reference), dt
        assert _same_bits(native[dt], _formula(q, dt)), dt
    assert len(calls) == len(FLOATS)                                   # the switch took effect


def test_threads_split_the_blocks(monkeypatch, calls):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(_nf4, "_NATIVE_CHUNK", 64 * 5)                # 5 blocks per task
    w = torch.randn(123, 64 * 7 + 10, generator=torch.Generator().manual_seed(1))
    q = quantize_nf4(w, 64, True)
    out = torch.empty(w.numel() + 1, dtype=torch.bfloat16)[1:]        # unaligned out
    dequantize_nf4(q, torch.bfloat16, out=out)
    assert _same_bits(out.view(q.shape), _formula(q, torch.bfloat16))
    assert len(calls) > 4 and sum(calls) == w.numel() // 64


def test_nf4_linear_uses_native_and_stays_exact(calls):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 96, generator=g)
    q = quantize_nf4(w, 32, True)
    x = torch.randn(3, 5, 96, generator=g, requires_grad=True)
    y = nf4_linear(x, q)
    dense = _formula(q, torch.float32)
    torch.testing.assert_close(y, x.detach() @ dense.t(), rtol=0, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 5, 40) @ dense, rtol=0, atol=1e-5)
    assert len(calls) == 2                                             # forward and backward


def test_fallback_without_compiler(monkeypatch, tmp_path):
    """No compiler: no library, and dequantize takes the Torch path with the same result."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert _nf4_cpu._build() is None
    monkeypatch.setattr(_nf4_cpu, "library", lambda: None)
    q = quantize_nf4(torch.randn(17, 64, generator=torch.Generator().manual_seed(3)), 64, True)
    for dt in FLOATS:
        assert _same_bits(dequantize_nf4(q, dt), _formula(q, dt))


def test_build_caches_by_source_and_cpu(monkeypatch, tmp_path):
    """A fresh cache folder gets one library (built once), which then loads without compiling."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = _nf4_cpu._build()
    assert lib is not None and lib.path.parent == tmp_path / "lightning_peft"
    assert set(lib.functions) >= {torch.float32, torch.bfloat16}
    monkeypatch.setattr(_native, "compile_source", lambda *a: pytest.fail("compiled again"))
    assert _nf4_cpu._build().path == lib.path


def test_a_cached_library_cut_short_or_writable_by_others_is_rebuilt(monkeypatch, tmp_path):
    """A library file cut short (a crash while copying a cache) killed the process with SIGBUS
    when loaded; a file others can write (the shared temp folder) could be anyone's code. Both
    are built again instead of loaded."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = subprocess.run(  # built (and mapped) in another process: this one maps only the rebuilt file
        [sys.executable, "-c", "from kernels import _nf4_cpu; b = _nf4_cpu._build(); print(b and b.path)"],
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)}, capture_output=True, text=True,
        cwd=Path(__file__).parents[1])
    if built.stdout.split()[-1:] in ([], ["None"]):
        pytest.skip("no C compiler")
    path = Path(built.stdout.split()[-1])
    size = path.stat().st_size
    assert _native._usable(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: size // 3])
    assert not _native._usable(path)
    path.chmod(0o666)
    path.write_bytes(whole)
    assert not _native._usable(path)  # group/other-writable
    path.chmod(0o644)
    assert _native._usable(path)
    path.write_bytes(whole[: size // 3])
    rebuilt = _nf4_cpu._build()  # (loading the cut file would have been SIGBUS)
    assert rebuilt.path == path and path.stat().st_size == size and _native._usable(path)


def test_a_march_beyond_this_cpu_is_refused(monkeypatch):
    """A target enabling instructions the CPU lacks (FMA4 on Intel, AVX-512 on an AVX2 CPU)
    compiled, loaded and stopped the process with SIGILL at the first call."""
    if _native._isa_macros("native") is None:
        pytest.skip("no C compiler")
    beyond = "bdver4" if "fma4" not in _native.cpu_flags() else "sapphirerapids"
    if _native._isa_subset(beyond):
        pytest.skip(f"this CPU runs {beyond}")
    monkeypatch.setenv("LIGHTNING_PEFT_NF4_MARCH", beyond)
    with pytest.warns(UserWarning, match="enables instructions this CPU lacks"):
        assert _native.march("LIGHTNING_PEFT_NF4_MARCH") == "-march=native"
    monkeypatch.setenv("LIGHTNING_PEFT_NF4_MARCH", "x86-64")
    assert _native.march("LIGHTNING_PEFT_NF4_MARCH") == "-march=x86-64"


def test_sources_are_written_as_utf8_whatever_the_locale(tmp_path):
    """Under LC_ALL=C the NF4 source's '·' raised UnicodeEncodeError on every dequantize."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from pathlib import Path; from kernels import _native, _nf4_cpu; "
            "ok = _native.compile_source(_native._compiler() or 'cc', ('-O1', '-fPIC', '-shared'), "
            "_nf4_cpu._SOURCE, Path(sys.argv[1]) / 'x.so'); print(sys.getfilesystemencoding(), ok)")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii"}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0 and run.stdout.split()[-1] == "True", run.stderr
