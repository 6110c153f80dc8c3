"""Hadamard construction: every supported core is a Hadamard matrix, factorization is right."""

import numpy as np
import pytest
import torch

import hadaconv
from hadaconv.hadamard import (
    UnsupportedSizeError,
    factorize,
    hadamard_core,
    hadamard_matrix,
    is_supported,
    MAX_ORDER,
    nearest_supported,
    supported_cores,
)

CORES = supported_cores(300)


def test_core_list_covers_the_classical_orders():
    # Paley I (q = 3 mod 4), Paley II (q = 1 mod 4), prime powers 27 and 25 included.
    for m in (12, 20, 28, 36, 44, 52, 60, 68, 76, 84):
        assert m in CORES, m
    # 92 has no Paley construction (91 and 45 are not prime powers).
    assert 92 not in CORES
    assert len(CORES) > 40


@pytest.mark.parametrize("m", CORES)
def test_every_core_is_hadamard(m):
    h = hadamard_core(m).astype(np.int64)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))


@pytest.mark.parametrize(
    "n, m, k",
    [(384, 12, 5), (576, 36, 4), (768, 12, 6), (2560, 20, 7), (3584, 28, 7), (5120, 20, 8),
     (1024, 1, 10), (1, 1, 0), (12, 12, 0), (104, 52, 1)],
)
def test_real_model_widths_factorize(n, m, k):
    f = factorize(n)
    assert (f.n, f.m, f.k) == (n, m, k)


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_sylvester_is_the_walsh_matrix(k):
    """Entry (i, j) of the Sylvester matrix is (-1)^popcount(i & j): a definition independent
    of the Kronecker construction (any sign convention there keeps the matrices orthogonal, so
    orthogonality alone, and every reference built from it, would not notice a flipped sign)."""
    from hadaconv.hadamard import sylvester

    i = np.arange(2**k)
    walsh = 1 - 2 * (np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :]) % 2)
    np.testing.assert_array_equal(sylvester(k), walsh)
    np.testing.assert_array_equal(hadamard_matrix(2**k), walsh)


@pytest.mark.parametrize("n", [1, 2, 12, 48, 96, 384, 576, 768, 1024, 2560, 3584, 4096])
def test_dense_matrix_is_orthonormal(n):
    h = hadamard_matrix(n)
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    hn = hadamard_matrix(n, normalized=True)
    np.testing.assert_allclose(np.abs(hn), 1 / np.sqrt(n), rtol=1e-12)


@pytest.mark.parametrize("n", [8192, 12 * 2048, 65536])
def test_large_sizes_are_orthonormal(n):
    # Too large for a dense n x n check: apply the transform to a batch of basis vectors (each
    # output is a column of H / sqrt(n)) and check those columns are +-1/sqrt(n) and orthonormal,
    # then that the transform preserves norms and inverts on random data.
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:48]
    basis = torch.zeros(len(idx), n, dtype=torch.float64)
    basis[torch.arange(len(idx)), idx] = 1.0
    cols = hadaconv.fwht(basis)
    torch.testing.assert_close(cols.abs(), torch.full_like(cols, n**-0.5), rtol=1e-12, atol=0)
    torch.testing.assert_close(cols @ cols.T, torch.eye(len(idx), dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(4, n, dtype=torch.float64)
    y = hadaconv.fwht(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(hadaconv.fwht(y, inverse=True), x, rtol=0, atol=1e-12)


def test_unsupported_size_names_neighbours():
    with pytest.raises(UnsupportedSizeError) as e:
        factorize(92)
    msg = str(e.value)
    assert "\n" not in msg and "88" in msg and "96" in msg
    assert nearest_supported(92) == (88, 96)
    assert not is_supported(92) and not is_supported(0)
    with pytest.raises(UnsupportedSizeError):
        factorize(0)


def test_orders_stop_at_the_op_limit():
    """Orders above MAX_ORDER (the op library's n limit) are refused before any factoring; below
    it, a core whose q is a large prime is recognised by trial division up to sqrt(q) only."""
    with pytest.raises(UnsupportedSizeError, match="above 2\\^26"):
        factorize(MAX_ORDER + 4)
    assert not is_supported(10**20) and nearest_supported(MAX_ORDER + 4) == (MAX_ORDER, None)
    assert factorize(MAX_ORDER).m == 1
    # 2 * (q + 1) with q = 8388593, a prime = 1 (mod 4): a paley2 core of order 16777188.
    f = factorize(4 * 16777188)
    assert (f.m, f.k) == (16777188, 2) and f.construction == "paley2(8388593)"


def test_paley1_core_is_not_symmetric():
    # Non-symmetric cores are why the inverse is the transpose (and the backward pass too).
    h = hadamard_core(12)
    assert not np.array_equal(h, h.T)


def test_matrices_are_read_only_and_cached():
    h = hadamard_core(20)
    assert hadamard_core(20) is h
    with pytest.raises(ValueError):
        h[0, 0] = 0
