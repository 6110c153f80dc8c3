"""The Hadamard transform as PyTorch custom ops.

Two ops are registered in the ``hadaconv`` namespace, each with a fake (meta) implementation so
that torch.compile, torch.export and the ONNX exporter see them as single nodes, and with an
autograd formula whose backward applies the *transposed* transform (the right adjoint also for
non-symmetric cores H_m):

* ``hadaconv::fwht(x, scale, inverse)``: ``scale * H x``.
* ``hadaconv::hadamard_affine(x, gamma, beta, scale, inverse)``: ``gamma (scale * H x) + beta``,
  gamma a vector [n] or b x b blocks [n/b, b, b]; this is what layers call and what the exporter
  maps to the ONNX Runtime op ``com.hadaconv::HadamardAffine``.

Half-precision inputs are computed in float32 and cast back; float64 stays float64.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import numpy as np
import torch

from hadaconv.errors import InputError
from hadaconv.hadamard import factorize
from hadaconv.ops.transform import apply_affine, hadamard_transform

__all__ = ["fwht", "hadamard_affine"]

Tensor = torch.Tensor


def _check(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor]) -> None:
    for name, t in (("x", x), ("gamma", gamma), ("beta", beta)):
        if t is not None and not (isinstance(t, Tensor) and t.is_floating_point()):
            # An integer tensor would be transformed in integer arithmetic and come back truncated.
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"{name} must be a floating-point tensor, got {got}")
    if x.dim() == 0:
        raise InputError("x must have at least one dimension (the transform runs along the last)")
    n = x.shape[-1]
    if not torch.compiler.is_compiling():  # Dynamo would trace through its lru_cache; the op itself checks too
        factorize(n)  # one clear line for unsupported widths
    if gamma is not None:
        ok = gamma.shape == (n,) or (gamma.dim() == 3 and gamma.shape[1] == gamma.shape[2]
                                     and gamma.shape[0] * gamma.shape[1] == n)
        if not ok:
            raise InputError(f"gamma must be [{n}] or [{n}/b, b, b], got {list(gamma.shape)}")
    if beta is not None and beta.shape != (n,):
        raise InputError(f"beta must be [{n}], got {list(beta.shape)}")


def _scalars(n: int, scale: Any, inverse: Any) -> tuple[float, bool]:
    """(scale, inverse) as the ops take them; ``scale`` None is the orthonormal ``1/sqrt(n)``.
    A string would otherwise fail in float() and any non-empty one would read as inverse=True.
    Not checked while compiling: a scale traced from a symbolic shape is no plain number."""
    if scale is None:
        scale = 1.0 / math.sqrt(n)
    elif not torch.compiler.is_compiling():
        if getattr(scale, "ndim", None) == 0 and callable(getattr(scale, "item", None)):
            scale = scale.item()  # a 0-d tensor or array holds one number
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise InputError(f"scale must be a finite number, got {scale!r}")
    flag = isinstance(inverse, (bool, np.bool_)) or (isinstance(inverse, (int, np.integer)) and inverse in (0, 1))
    if not flag and not torch.compiler.is_compiling():  # 0 and 1 too: ONNX's transpose attribute is an int
        raise InputError(f"inverse must be True or False, got {inverse!r}")
    return float(scale), bool(inverse)


# --------------------------------------------------------------------------- hadaconv::fwht


@torch.library.custom_op("hadaconv::fwht", mutates_args=())
def _fwht(x: Tensor, scale: float, inverse: bool) -> Tensor:
    return hadamard_transform(x, scale, inverse).to(x.dtype)


@_fwht.register_fake
def _(x: Tensor, scale: float, inverse: bool) -> Tensor:
    return x.new_empty(x.shape)


def _fwht_setup(ctx, inputs, output) -> None:
    _, ctx.scale, ctx.inverse = inputs


def _fwht_backward(ctx, grad: Tensor):
    return _fwht(grad, ctx.scale, not ctx.inverse), None, None


_fwht.register_autograd(_fwht_backward, setup_context=_fwht_setup)


# --------------------------------------------------------------------------- hadaconv::hadamard_affine


@torch.library.custom_op("hadaconv::hadamard_affine", mutates_args=())
def _hadamard_affine(
    x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], scale: float, inverse: bool
) -> Tensor:
    z = hadamard_transform(x, scale, inverse)
    return apply_affine(z, gamma, beta).to(x.dtype)


@_hadamard_affine.register_fake
def _(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], scale: float, inverse: bool) -> Tensor:
    return x.new_empty(x.shape)


def _affine_setup(ctx, inputs, output) -> None:
    x, gamma, beta, ctx.scale, ctx.inverse = inputs
    ctx.has_beta = beta is not None
    ctx.save_for_backward(x, gamma)


def _affine_backward(ctx, grad: Tensor):
    # The transform output z is recomputed instead of saved: one more cheap transform in the
    # backward pass saves an activation the size of the output.  Transforms go through the op
    # (not the eager implementation) so that compile/export can trace this backward.
    x, gamma = ctx.saved_tensors
    n = x.shape[-1]
    g = grad.to(torch.float64 if grad.dtype == torch.float64 else torch.float32).reshape(-1, n)
    grad_gamma = grad_beta = None
    if ctx.has_beta and ctx.needs_input_grad[2]:
        grad_beta = g.sum(0)
    if gamma is None:
        g_z = g
    else:
        gam = gamma.to(g.dtype)
        if ctx.needs_input_grad[1]:
            z = _fwht(x.to(g.dtype), ctx.scale, ctx.inverse).reshape(-1, n)
            if gam.dim() == 1:
                grad_gamma = (g * z).sum(0)
            else:
                nb, b, _ = gam.shape
                grad_gamma = torch.einsum("rip,riq->ipq", g.reshape(-1, nb, b), z.reshape(-1, nb, b))
            grad_gamma = grad_gamma.to(gamma.dtype)
        if gam.dim() == 1:
            g_z = g * gam
        else:
            nb, b, _ = gam.shape
            g_z = torch.einsum("ipq,rip->riq", gam, g.reshape(-1, nb, b)).reshape(-1, n)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _fwht(g_z, ctx.scale, not ctx.inverse).reshape(x.shape).to(x.dtype)
    if grad_beta is not None:
        grad_beta = grad_beta.to(grad.dtype)
    return grad_x, grad_gamma, grad_beta, None, None


_hadamard_affine.register_autograd(_affine_backward, setup_context=_affine_setup)


# --------------------------------------------------------------------------- public functions


def fwht(x: Tensor, *, scale: float | None = None, inverse: bool = False) -> Tensor:
    """Hadamard transform over the last dimension: ``scale * H x`` per row.

    ``H = H_m (x) H_{2^k}`` (see :mod:`hadaconv.hadamard`); ``scale`` defaults to ``1/sqrt(n)``,
    which makes the transform orthonormal.  ``inverse=True`` applies ``H^T``, so
    ``fwht(fwht(x), inverse=True) == x`` with the default scale.

    Raises:
        InputError: ``x`` not floating point, or 0-dimensional; ``scale`` not a finite number,
            ``inverse`` not a bool (nor 0 or 1).
        UnsupportedSizeError: no Hadamard matrix is known for the width ``n = x.shape[-1]``.
    """
    _check(x, None, None)
    return _fwht(x, *_scalars(x.shape[-1], scale, inverse))


def hadamard_affine(
    x: Tensor,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    scale: float | None = None,
    inverse: bool = False,
) -> Tensor:
    """Fused ``gamma (H x / sqrt(n)) + beta`` over the last dimension.

    ``gamma`` is a vector [n] (the diagonal affine of the seed paper) or block-diagonal
    [n/b, b, b], block i mapping transformed channels ``i*b:(i+1)*b`` to output channels
    ``i*b:(i+1)*b``.  ``beta`` is [n].  Either may be None.

    Raises:
        InputError: a tensor not floating point, or of another shape than these; ``scale`` not a
            finite number, ``inverse`` not a bool (nor 0 or 1).
        UnsupportedSizeError: no Hadamard matrix is known for the width ``n = x.shape[-1]``.
    """
    _check(x, gamma, beta)
    return _hadamard_affine(x, gamma, beta, *_scalars(x.shape[-1], scale, inverse))
