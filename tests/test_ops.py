"""The FWHT custom ops against float64 dense references."""

import math

import pytest
import torch

import hadaconv
from hadaconv.hadamard import hadamard_matrix, supported_cores

CORES = supported_cores(60)
SIZES = sorted({m * 2**k for m in CORES for k in (0, 1, 3, 5)} | {1, 2, 4096})
# Tolerances relative to the row norm: the float32 transform accumulates log(n) roundings,
# half types are rounded once on the way out.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.2e-2, torch.float16: 1.5e-3}


def dense(n, inverse=False):
    h = torch.tensor(hadamard_matrix(n, normalized=True))
    return h.T if inverse else h


def rel_err(got, want):
    return ((got.double() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("inverse", [False, True])
def test_fwht_matches_dense_float64(n, inverse):
    x = torch.randn(3, n, dtype=torch.float64)
    want = x @ dense(n, inverse).T
    assert rel_err(hadaconv.fwht(x, inverse=inverse), want) < TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [12, 20, 28, 36, 576, 768, 1024, 3584])
def test_fwht_dtypes(dtype, n):
    x = torch.randn(5, n, dtype=torch.float64)
    xd = x.to(dtype)
    y = hadaconv.fwht(xd)
    assert y.dtype == dtype and y.shape == x.shape
    # Reference on the same rounded input, so the test measures the transform alone.
    assert rel_err(y, xd.double() @ dense(n).T) < TOL[dtype]


def test_transform_matrix_entries_and_inverse():
    for n in (12, 52, 104, 768):
        t = hadaconv.fwht(torch.eye(n, dtype=torch.float64)).T  # column j = T e_j
        torch.testing.assert_close(t.abs(), torch.full_like(t, n**-0.5), rtol=1e-12, atol=0)
        torch.testing.assert_close(t @ t.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
        x = torch.randn(7, n, dtype=torch.float64)
        torch.testing.assert_close(hadaconv.fwht(hadaconv.fwht(x), inverse=True), x, atol=1e-12, rtol=0)


def test_scale_leading_shapes_noncontiguous_and_empty():
    n = 48
    x = torch.randn(2, 3, 5, 2 * n, dtype=torch.float64)[..., ::2]  # non-contiguous last dim
    assert not x.is_contiguous()
    want = x @ dense(n).T * math.sqrt(n) * 0.5
    torch.testing.assert_close(hadaconv.fwht(x, scale=0.5), want, atol=1e-10, rtol=1e-10)
    empty = torch.empty(0, 4, n)
    assert hadaconv.fwht(empty).shape == empty.shape
    assert hadaconv.hadamard_affine(empty, torch.ones(n), torch.zeros(n)).shape == empty.shape


@pytest.mark.parametrize("n, b", [(12, 1), (36, 4), (576, 16), (384, 32), (64, 64)])
def test_hadamard_affine_matches_dense(n, b):
    x = torch.randn(4, 3, n, dtype=torch.float64)
    gamma = torch.randn(n, dtype=torch.float64) if b == 1 else torch.randn(n // b, b, b, dtype=torch.float64)
    beta = torch.randn(n, dtype=torch.float64)
    g = torch.diag(gamma) if b == 1 else torch.block_diag(*gamma)
    w = g @ dense(n)
    torch.testing.assert_close(hadaconv.hadamard_affine(x, gamma, beta), x @ w.T + beta, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(hadaconv.hadamard_affine(x, gamma, None), x @ w.T, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(hadaconv.hadamard_affine(x, None, beta), x @ dense(n).T + beta, atol=1e-12, rtol=1e-12)


def test_half_input_with_float32_parameters():
    n = 768
    x = torch.randn(6, n).to(torch.bfloat16)
    gamma, beta = torch.randn(n // 16, 16, 16), torch.randn(n)
    y = hadaconv.hadamard_affine(x, gamma, beta)
    assert y.dtype == torch.bfloat16
    want = x.double() @ (torch.block_diag(*gamma.double()) @ dense(n)).T + beta.double()
    assert rel_err(y, want) < TOL[torch.bfloat16]


@pytest.mark.parametrize("n", [12, 20, 40, 16])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck_fwht(n, inverse):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hadaconv.fwht(t, inverse=inverse), (x,))


@pytest.mark.parametrize("n, b", [(12, 1), (12, 4), (20, 5), (24, 24)])
def test_gradcheck_affine(n, b):
    # Non-symmetric cores (12, 20) make a wrong (untransposed) backward fail this test.
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    shape = (n,) if b == 1 else (n // b, b, b)
    gamma = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hadaconv.hadamard_affine, (x, gamma, beta))
    assert torch.autograd.gradcheck(lambda t, g: hadaconv.hadamard_affine(t, g, None), (x, gamma))
    assert torch.autograd.gradgradcheck(lambda t: hadaconv.fwht(t), (x,))


def test_float32_backward_matches_float64():
    n = 576
    x = torch.randn(8, n, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(n // 16, 16, 16, dtype=torch.float64, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    g32 = gamma.detach().float().requires_grad_()
    hadaconv.hadamard_affine(x, gamma, None).square().sum().backward()
    hadaconv.hadamard_affine(x32, g32, None).square().sum().backward()
    assert rel_err(x32.grad, x.grad) < 1e-5
    assert rel_err(g32.grad.reshape(36, -1), gamma.grad.reshape(36, -1)) < 1e-5


def test_bad_shapes_are_clear_errors():
    with pytest.raises(hadaconv.HadaconvError, match="order 92"):
        hadaconv.fwht(torch.randn(2, 92))
    with pytest.raises(ValueError, match="gamma must be"):
        hadaconv.hadamard_affine(torch.randn(2, 16), torch.ones(8))
    with pytest.raises(ValueError, match="gamma must be"):
        hadaconv.hadamard_affine(torch.randn(2, 16), torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="beta must be"):
        hadaconv.hadamard_affine(torch.randn(2, 16), None, torch.ones(15))


def test_compile_with_dynamic_shapes_traces_the_width_check():
    """Under dynamic shapes the op's width check (hadamard.factorize) is traced with a symbolic
    width; math.isqrt there broke fullgraph compilation (seen when test_nn compiled the layer first)."""
    layer = hadaconv.HadamardProjection(80, block=4)  # 80 = 20 x 4: paley1(19), a prime to trial-divide
    x = torch.randn(3, 80)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


def test_compile_traces_a_scale_computed_from_a_symbolic_width():
    """The scale and inverse checks stand aside under compilation: 1/sqrt(n) of a dynamic width is a
    traced float, not a number they could test (math.isfinite on it broke fullgraph compilation)."""
    import math

    def f(x):
        return hadaconv.fwht(x, scale=1 / math.sqrt(x.shape[-1]), inverse=1)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="eager")
    for x in (torch.randn(3, 64), torch.randn(5, 128)):
        torch.testing.assert_close(compiled(x), hadaconv.fwht(x, inverse=True), atol=1e-6, rtol=1e-6)


def test_compile_and_export_match_eager():
    layer = hadaconv.HadamardProjection(48, block=4)
    with torch.no_grad():
        layer.gamma.normal_()
        layer.beta.normal_()
    x = torch.randn(2, 5, 48)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)
    ep = torch.export.export(layer, (x,))
    ops = {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}
    assert "hadaconv.hadamard_affine.default" in ops  # one node, not a decomposition
    torch.testing.assert_close(ep.module()(x), eager, atol=0, rtol=0)


def test_opcheck():
    x = torch.randn(3, 24)
    gamma, beta = torch.randn(6, 4, 4, requires_grad=True), torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.hadaconv.fwht.default, (x, 0.2, False))
    torch.library.opcheck(torch.ops.hadaconv.hadamard_affine.default, (x.requires_grad_(), gamma, beta, 0.2, True))


@pytest.mark.parametrize("n", [1, 12, 20, 28, 64, 576, 4096])
@pytest.mark.parametrize("inverse", [False, True])
def test_column_transform_matches_dense_float64(n, inverse):
    from hadaconv.ops.transform import hadamard_transform_columns

    h = torch.tensor(hadamard_matrix(n))
    z = torch.randn(n, 7, 3, dtype=torch.float64)
    want = torch.einsum("ij,jab->iab", h.T if inverse else h, z) * 0.5
    got = hadamard_transform_columns(z, 0.5, inverse)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * math.sqrt(n))
    if n > 64:
        return  # gradcheck costs n * columns forward passes
    zz = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: hadamard_transform_columns(t, 1 / math.sqrt(n), inverse), (zz,))
