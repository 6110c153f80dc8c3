"""The Hadamard transform in plain PyTorch, O(n log n), on any device.

``H_n = H_m (x) H_{f_1} (x) ... (x) H_{f_r}`` with ``f_1 ... f_r = 2^k`` (Sylvester blocks of at
most ``MAX_RADIX``).  A row of length n is viewed as a tensor with one axis per factor, and each
factor is applied as one large GEMM along the last axis, after which that axis is rotated to the
front: after all factors the axes are back in order.  This is the radix-f butterfly: it never
builds an n x n matrix, costs ``n (m + f_1 + ... + f_r)`` multiply-adds per row, and needs only
``r + 1`` passes over memory instead of the ``log2 n`` of radix-2 butterflies, which is what
matters for a memory-bound transform in eager PyTorch.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from hadaconv.hadamard import factorize, hadamard_core, sylvester
from hadaconv.ops import triton_kernel

#: Largest Sylvester block applied in one GEMM.  Measured on a 2-core x86 CPU (rows=4096): 32 and
#: 64 were within noise of each other and 2-5x faster than radix-2 butterflies from n = 1024 up.
MAX_RADIX = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types accumulate in float32; float32 and float64 keep their precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _radices(n: int) -> tuple[int, tuple[int, ...]]:
    f = factorize(n)
    factors, rest = [], 1 << f.k
    while rest > 1:
        r = min(MAX_RADIX, rest)
        factors.append(r)
        rest //= r
    return f.m, tuple(factors)


@functools.lru_cache(maxsize=256)
def _factor_matrix(order: int, core: bool, transpose: bool, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The matrix M such that ``y @ M`` applies H (or H^T) along the last axis."""
    h = hadamard_core(order) if core else sylvester(order.bit_length() - 1)
    # y @ H^T applies H; Sylvester blocks are symmetric so only the core cares.
    mat = h if transpose else np.ascontiguousarray(h.T)
    # Cached for later calls: an inference tensor could never be saved for a backward pass.
    with torch.inference_mode(False):
        return torch.tensor(mat, dtype=dtype, device=device)


@functools.lru_cache(maxsize=1)
def _warn_accelerator_once() -> None:
    warnings.warn(
        "hadaconv: the Triton Hadamard kernel does not cover this tensor (Triton missing, float64, "
        "or a core order above 64); using the PyTorch path (small GEMMs, one pass per factor)",
        RuntimeWarning, stacklevel=3)


def hadamard_transform(x: torch.Tensor, scale: float, inverse: bool = False) -> torch.Tensor:
    """``scale * H x`` (``scale * H^T x`` if inverse) over the last axis, in the compute dtype.

    Returns a new contiguous tensor of dtype ``compute_dtype(x.dtype)`` and the shape of x.
    """
    if x.device.type != "cpu":
        if triton_kernel.supports(x):
            return triton_kernel.hadamard_transform(x, scale, inverse)
        _warn_accelerator_once()
    return gemm_transform(x, scale, inverse)


@functools.lru_cache(maxsize=None)
def _axes(n: int) -> tuple[tuple[int, bool], ...]:
    """``(order, is_core)`` of each Kronecker factor of H_n: the core (if m > 1), then the
    Sylvester blocks."""
    m, radices = _radices(n)
    return ((m, True),) * (m > 1) + tuple((f, False) for f in radices)


def gemm_transform(x: torch.Tensor, scale: float, inverse: bool = False) -> torch.Tensor:
    """The PyTorch path of :func:`hadamard_transform` on any device: one GEMM per factor."""
    n = x.shape[-1]
    dtype = compute_dtype(x.dtype)
    rows = x.numel() // n if n else 0
    axes = _axes(n)
    y = x.to(dtype).reshape(rows, *(a for a, _ in axes))
    if not axes or rows == 0:
        return (y * scale).reshape(x.shape)
    device = str(x.device)
    for i, (order, core) in enumerate(reversed(axes)):
        mat = _factor_matrix(order, core, inverse, dtype, device)
        if i == 0:
            mat = mat * scale  # folding the scale into the first GEMM saves a pass
        y = y @ mat
        if len(axes) > 1:
            y = y.movedim(-1, 1).contiguous()
    return y.reshape(x.shape)


def hadamard_transform_columns(z: torch.Tensor, scale: float, inverse: bool = False) -> torch.Tensor:
    """``scale * H @ z`` (``scale * H^T @ z`` if inverse): the transform of every column of z.

    The same factors as ``hadamard_transform``, applied from the left, so each GEMM has all the
    columns as its wide dimension: for a square float64 matrix this is several times faster than
    transposing into rows and back.  Plain differentiable PyTorch (autograd sees the GEMMs), in
    z's dtype; the least-squares fit uses it on float64 matrices.
    """
    n = z.shape[0]
    axes = _axes(n)
    if not axes:
        return z * scale
    y = z.reshape(*(a for a, _ in axes), -1)
    device = str(z.device)
    for i, (order, core) in enumerate(axes):
        # H @ y needs H itself, which _factor_matrix hands out as the "transpose" of its y @ M form.
        mat = _factor_matrix(order, core, not inverse, z.dtype, device)
        if i == 0:
            mat = mat * scale
        shape = y.shape
        y = (mat @ y.reshape(order, -1)).reshape(shape)
        if len(axes) > 1:
            y = y.movedim(0, len(axes) - 1).contiguous()
    return y.reshape(z.shape)


def apply_affine(z: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> torch.Tensor:
    """``gamma z + beta`` per row: gamma is [n] (diagonal) or [n/b, b, b] (block-diagonal)."""
    if gamma is not None:
        gamma = gamma.to(z.dtype)
        if gamma.dim() == 1:
            z = z * gamma
        else:
            nb, b, _ = gamma.shape
            blocks = z.reshape(-1, nb, b)
            z = torch.einsum("ipq,riq->rip", gamma, blocks).reshape(z.shape)
    if beta is not None:
        z = z + beta.to(z.dtype)
    return z
