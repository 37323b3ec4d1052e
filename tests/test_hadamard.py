"""kernels.hadamard_transform: the PyTorch path, the radix-2 reference and the Triton kernel
(under ``TRITON_INTERPRET=1`` on CPU, set by conftest) against a dense float64 Sylvester matrix;
gradients; bad sizes."""

import pytest
import torch

import kernels
from kernels.hadamard import RADIX, hadamard_matrix, hadamard_transform, hadamard_transform_reference

torch.set_num_threads(1)
SIZES = [1 << k for k in range(13)]  # 1 .. 4096
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3}  # x max|ref|


def _sylvester(n: int) -> torch.Tensor:
    """H_n by the recursion H_2n = [[H, H], [H, -H]], float64 (independent of hadamard_matrix)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _check(got, x, normalize=False):
    n = x.shape[-1]
    want = x.double() @ _sylvester(n) / (n ** 0.5 if normalize else 1.0)
    assert got.dtype == x.dtype and got.shape == x.shape
    if not want.numel():
        return
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[x.dtype] * scale, (n, x.dtype, err, scale)


def test_hadamard_matrix_is_sylvester():
    for n in (1, 2, 8, 64):
        assert torch.equal(hadamard_matrix(n, torch.float64), _sylvester(n))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_path_and_reference_against_dense(n, dtype):
    g = torch.Generator().manual_seed(n)
    with kernels.use_backend("torch"):
        for shape in [(n,), (3, 5, n), (0, n)]:
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            _check(hadamard_transform(x), x)
            _check(hadamard_transform(x, normalize=True), x, normalize=True)
            _check(hadamard_transform_reference(x), x)


def test_sizes_above_the_radix_take_several_passes():
    n = 1 << 14  # three passes: 32 x 32 x 16; the radix-2 butterfly (dense-checked above) is the reference
    assert n > RADIX ** 2
    x = torch.randn(2, n, dtype=torch.float64)
    with kernels.use_backend("torch"):
        assert torch.allclose(hadamard_transform(x), hadamard_transform_reference(x), atol=1e-10)


def test_fp16_on_the_torch_path_rounds_once():
    x = torch.randn(3, 5, 256, dtype=torch.float64).half()
    with kernels.use_backend("torch"):
        _check(hadamard_transform(x), x)


def test_normalized_transform_is_orthogonal_and_its_own_inverse():
    x = torch.randn(4, 512, dtype=torch.float64)
    y = hadamard_transform(x, normalize=True)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    assert torch.allclose(hadamard_transform(y, normalize=True), x, atol=1e-12)


def test_input_is_not_modified_and_output_is_fresh():
    x = torch.randn(3, 64)
    copy = x.clone()
    y = hadamard_transform(x)
    assert torch.equal(x, copy) and y.data_ptr() != x.data_ptr()
    one = torch.randn(5, 1)
    assert torch.equal(hadamard_transform(one), one) and hadamard_transform(one).data_ptr() != one.data_ptr()


@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_float64(normalize):
    with kernels.use_backend("torch"):
        for shape in [(1,), (2, 8), (3, 2, 64)]:
            x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda t: hadamard_transform(t, normalize=normalize), (x,))


def test_gradient_is_the_transform_of_the_incoming_gradient():
    x = torch.randn(3, 128, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 128, dtype=torch.float64)
    hadamard_transform(x, normalize=True).backward(dy)
    assert torch.allclose(x.grad, dy @ _sylvester(128) / 128 ** 0.5, atol=1e-12)


@pytest.mark.parametrize("n", [12, 3, 0, 100])
def test_bad_sizes_are_a_value_error(n):
    with pytest.raises(ValueError, match=r"x's last dimension .* must be a power of two"):
        hadamard_transform(torch.randn(2, n))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform_reference(torch.randn(2, n))


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="at least one dimension"):
        hadamard_transform(torch.tensor(1.0))
    with pytest.raises(ValueError, match="floating-point"):
        hadamard_transform(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="normalize must be True or False"):
        hadamard_transform(torch.randn(4), normalize=1)
    with pytest.raises(ValueError, match="n must be a power of two"):
        hadamard_matrix(6)


# ---- the Triton kernel (interpreted on CPU) ----------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n", [1, 2, 4, 16, 128, 1024, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_against_dense(n, dtype):
    g = torch.Generator().manual_seed(n)
    with kernels.use_backend("triton"):
        for shape in [(3, 5, n), (1, n)]:
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)
            _check(hadamard_transform(x).cpu(), x.cpu())
            _check(hadamard_transform(x, normalize=True).cpu(), x.cpu(), normalize=True)


def test_triton_rows_longer_than_one_program_split_by_kronecker(monkeypatch):
    from kernels import _hadamard_triton as T

    monkeypatch.setattr(T, "MAX_N", 16)  # 256 = 16 x 16: two kernel passes and the transposes
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(3, 256, dtype=torch.float64).to(DEVICE, dtype)
        with kernels.use_backend("triton"):
            _check(hadamard_transform(x).cpu(), x.cpu())
        x = torch.randn(2, 1024, dtype=torch.float64).to(DEVICE, dtype)  # 1024 = 64 x 16: recursion
        with kernels.use_backend("triton"):
            _check(hadamard_transform(x, normalize=True).cpu(), x.cpu(), normalize=True)


def test_triton_backward_matches_the_torch_path():
    x = torch.randn(3, 64, dtype=torch.float32, device=DEVICE, requires_grad=True)
    dy = torch.randn(3, 64, dtype=torch.float32, device=DEVICE)
    with kernels.use_backend("triton"):
        hadamard_transform(x, normalize=True).backward(dy)
    got = x.grad.clone()
    x.grad = None
    with kernels.use_backend("torch"):
        hadamard_transform(x, normalize=True).backward(dy)
    assert torch.allclose(got, x.grad, atol=1e-5)
