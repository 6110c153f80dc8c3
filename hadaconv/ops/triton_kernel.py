"""The Hadamard transform as one Triton kernel, for GPU tensors.

A row of length n is viewed as three axes, the core m and the Sylvester factors (each <= 64;
``m * f1 * f2``, or ``f1 * f2 * f3`` when m = 1), and R rows are loaded once as a tile
``[R, a0, a1, a2]``.  Each factor is applied as one ``tl.dot`` along the tile's last
axis, after which that axis is rotated to the front (the radix-f butterfly of
:mod:`hadaconv.ops.transform`, but with the tile in registers: one read and one write of the row
instead of a pass per factor).  Axes shorter than 16 are zero-padded to 16 for ``tl.dot``: the
padded inputs are masked to zero and the padded outputs never stored.  Accumulation is float32
with IEEE products (no TF32), whatever the input dtype.

Used by :func:`hadaconv.ops.transform.hadamard_transform` for CUDA tensors of float32 / float16 /
bfloat16 when Triton is installed and the padded row fits one program (core m <= 64, at most
8192 elements after padding: every power of two up to 8192, 576, 768, 2560, 3072, 5120, ...);
anything else takes the PyTorch path.  ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors, which is how
the tests check it on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from hadaconv.hadamard import factorize, hadamard_core, sylvester

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

#: Largest factor applied by one tl.dot.
MAX_FACTOR = 64
#: Elements of a program's tile: R rows are batched until about this many.
TILE_ELEMENTS = 8192
#: Largest padded row one program holds (fp32 in registers; beyond it, spills or no launch).
MAX_TILE = 8192


def available() -> bool:
    """Whether the Triton kernel can run here (Triton installed; a GPU, or the interpreter)."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def plan(n: int) -> tuple[tuple[int, int, bool], ...] | None:
    """``((size, padded, is_core), ...)`` for the three axes of a row, or None if the kernel does
    not cover n.  The axes are the core (when m > 1) and the Sylvester factors (<= 64 each);
    absent axes have size 1."""
    f = factorize(n)
    slots = 3 - (f.m > 1)
    if f.m > MAX_FACTOR or f.k > 6 * slots:
        return None
    parts = max(1, -(-f.k // 6))  # as few Sylvester factors as possible, as even as possible
    ks = [f.k // parts + (i < f.k % parts) for i in range(parts)] if f.k else []
    axes = ([(f.m, True)] if f.m > 1 else []) + [(1 << k, False) for k in ks]
    axes += [(1, False)] * (3 - len(axes))
    padded = tuple((s, 1 if s == 1 else max(16, triton_next_pow2(s)), core) for s, core in axes)
    if padded[0][1] * padded[1][1] * padded[2][1] > MAX_TILE:
        return None  # a row would not fit one program's registers: the PyTorch path
    return padded


def triton_next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


@functools.lru_cache(maxsize=64)
def _matrices(n: int, inverse: bool, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per axis, the zero-padded float32 matrix M with ``y = x @ M`` (H^T, or H for the inverse)."""
    mats = []
    for size, padded, core in plan(n):
        mat = torch.zeros(padded, padded, dtype=torch.float32)
        if size > 1:
            h = torch.tensor(hadamard_core(size) if core else sylvester(size.bit_length() - 1), dtype=torch.float32)
            mat[:size, :size] = h if inverse else h.T
        mats.append(mat.to(device))
    return tuple(mats)


if triton is not None:

    @triton.jit
    def _apply_last(x, m_ptr, R: tl.constexpr, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
        """x [R, A, B, C] -> (x @ M along C) rotated to [R, C, A, B]."""
        if C > 1:
            idx = tl.arange(0, C)
            mat = tl.load(m_ptr + idx[:, None] * C + idx[None, :])
            y = tl.dot(tl.reshape(x, [R * A * B, C]), mat, input_precision="ieee")
            x = tl.reshape(y, [R, A, B, C])
        return tl.permute(x, [0, 3, 1, 2])

    @triton.jit
    def _hadamard_kernel(
        x_ptr, y_ptr, m0_ptr, m1_ptr, m2_ptr, rows, stride_x, stride_y, scale,
        S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
        P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, R: tl.constexpr,
    ):
        r = tl.program_id(0) * R + tl.arange(0, R)
        o0 = tl.arange(0, P0)
        o1 = tl.arange(0, P1)
        o2 = tl.arange(0, P2)
        col = (o0[None, :, None, None] * (S1 * S2) + o1[None, None, :, None] * S2 + o2[None, None, None, :])
        mask = ((r[:, None, None, None] < rows) & (o0[None, :, None, None] < S0)
                & (o1[None, None, :, None] < S1) & (o2[None, None, None, :] < S2))
        x = tl.load(x_ptr + r[:, None, None, None].to(tl.int64) * stride_x + col, mask=mask, other=0.0)
        x = x.to(tl.float32)
        x = _apply_last(x, m2_ptr, R, P0, P1, P2)  # [R, P2, P0, P1]
        x = _apply_last(x, m1_ptr, R, P2, P0, P1)  # [R, P1, P2, P0]
        x = _apply_last(x, m0_ptr, R, P1, P2, P0)  # [R, P0, P1, P2]
        y = x * scale
        tl.store(y_ptr + r[:, None, None, None].to(tl.int64) * stride_y + col, y.to(y_ptr.dtype.element_ty),
                 mask=mask)


def supports(x: torch.Tensor) -> bool:
    """Whether :func:`hadamard_transform` takes this tensor."""
    return (triton is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (x.is_cuda or (interpreting() and x.device.type == "cpu"))
            and x.shape[-1] > 1 and plan(x.shape[-1]) is not None)


def hadamard_transform(x: torch.Tensor, scale: float, inverse: bool = False) -> torch.Tensor:
    """``scale * H x`` (``H^T`` if inverse) over the last axis; float32 out for half inputs, like
    the PyTorch path, so that a following affine sees the float32 result."""
    n = x.shape[-1]
    axes = plan(n)
    rows = x.numel() // n
    x2 = x.reshape(rows, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((rows, n), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y.reshape(x.shape)
    (s0, p0, _), (s1, p1, _), (s2, p2, _) = axes
    tile = p0 * p1 * p2
    # Each tl.dot needs at least 16 rows: R * (the two other axes) >= 16.
    smallest = min(p0 * p1, p1 * p2, p0 * p2)
    r = max(triton_next_pow2(max(1, -(-16 // smallest))), min(64, max(1, TILE_ELEMENTS // tile)))
    r = min(r, max(triton_next_pow2(rows), triton_next_pow2(max(1, -(-16 // smallest)))))
    m0, m1, m2 = _matrices(n, inverse, str(x.device))
    grid = (triton.cdiv(rows, r),)
    # Triton launches on the current device: make it x's.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _hadamard_kernel[grid](x2, y, m0, m1, m2, rows, x2.stride(0), y.stride(0), float(scale),
                               S0=s0, S1=s1, S2=s2, P0=p0, P1=p1, P2=p2, R=r)
    return y.reshape(x.shape)
