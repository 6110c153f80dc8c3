"""The float64 reference of ``com.hadaconv::HadamardAffine`` that every op test compares against
(ONNX Runtime's CPU kernel, the sanitizer build, the emulated CUDA kernel)."""

from __future__ import annotations

import functools

import numpy as np

from hadaconv.hadamard import factorize, hadamard_core, sylvester


def affine(z: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None) -> np.ndarray:
    """float64 ``gamma z + beta`` per row: gamma a vector [n] or blocks [n/b, b, b] on contiguous
    output channels, beta [n]; either may be None."""
    if gamma is not None:
        g = gamma.astype(np.float64)
        if g.ndim == 1:
            z = z * g
        else:
            nb, b, _ = g.shape
            z = np.einsum("ipq,...iq->...ip", g, z.reshape(*z.shape[:-1], nb, b)).reshape(z.shape)
    if beta is not None:
        z = z + beta.astype(np.float64)
    return z


def transform(x: np.ndarray, h: np.ndarray, scale: float = 1.0, transpose: int = 0) -> np.ndarray:
    """float64 ``scale H x`` per row over the last dimension (``H^T`` for transpose=1)."""
    return scale * (x.astype(np.float64) @ (h if transpose else h.T))


@functools.lru_cache(maxsize=None)
def _factors(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hadaconv's H_n = H_m (x) H_{2^k} as three small float64 factors, H_m (x) H_{2^k1} (x)
    H_{2^k2} (Sylvester's H_{2^k} is H_2's k-fold Kronecker power, so any split of k gives it)."""
    f = factorize(n)
    half = f.k // 2
    return tuple(np.array(a, dtype=np.float64) for a in (hadamard_core(f.m), sylvester(half), sylvester(f.k - half)))


def hadamard_rows(x: np.ndarray, transpose: int = 0) -> np.ndarray:
    """float64 ``H x / sqrt(n)`` per row (``H^T`` for transpose=1), as the dense matrix
    ``hadamard_matrix(n)`` gives it, by the Kronecker identity (A (x) B (x) C) vec X =
    vec(A, B, C applied on X's three axes): the dense matrix of a wide row takes a second and
    hundreds of MB (n = 10240: 800 MB), the factors a few KB."""
    n = x.shape[-1]
    a, b, c = (f.T if transpose else f for f in _factors(n))
    z = x.astype(np.float64).reshape(*x.shape[:-1], len(a), len(b), len(c))
    z = np.einsum("ai,bj,ck,...ijk->...abc", a, b, c, z, optimize=True)
    return z.reshape(x.shape) / np.sqrt(n)


def reference(x, gamma=None, beta=None, transpose=0) -> np.ndarray:
    """float64 ``gamma (H x / sqrt(n)) + beta`` per row with hadaconv's order-n matrix."""
    return affine(hadamard_rows(x, transpose), gamma, beta)
