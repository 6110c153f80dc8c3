"""The float64 reference of ``com.hadaconv::HadamardAffine`` that every op test compares against
(ONNX Runtime's CPU kernel, the sanitizer build, the emulated CUDA kernel)."""

from __future__ import annotations

import numpy as np

from hadaconv.hadamard import hadamard_matrix


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


def reference(x, gamma=None, beta=None, transpose=0) -> np.ndarray:
    """float64 ``gamma (H x / sqrt(n)) + beta`` per row with hadaconv's order-n matrix."""
    h = hadamard_matrix(x.shape[-1], normalized=True)
    return affine(transform(x, h, transpose=transpose), gamma, beta)
