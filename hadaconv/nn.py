"""The Hadamard projection layer, square or rectangular."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hadaconv.errors import InputError
from hadaconv.hadamard import factorize
from hadaconv.ops import hadamard_affine
from hadaconv.ops.transform import apply_affine

__all__ = ["HadamardProjection", "parameters_saved"]


def parameters_saved(d_in: int, d_out: int, block: int, dense_bias: bool) -> int:
    """Parameters removed by replacing a dense d_out x d_in projection (with or without bias) by
    a HadamardProjection with output blocks of ``block`` and a bias: W and b out, gamma
    [d_out/block, block, block] and beta [d_out] in."""
    return d_out * d_in + (d_out if dense_bias else 0) - d_out * block - d_out


class HadamardProjection(nn.Module):
    """``y = G R (H x / sqrt(n)) + beta``: a parameter-light replacement for a dense projection.

    ``H`` is the fixed +-1 Hadamard matrix of order n (see :mod:`hadaconv.hadamard`); it holds no
    parameters.  ``G`` is diagonal (``block=1``, ``gamma`` of shape [d_out], the layer of the seed
    paper) or block-diagonal with ``block x block`` blocks on contiguous output channels
    (``gamma`` of shape [d_out/block, block, block]), the form the converter fits to trained
    weights.  Both start as the identity, so a fresh square layer is the plain orthonormal
    transform.

    Rectangular projections (``d_in = dim`` inputs, ``d_out = out_features`` outputs), as in
    Qwen3, Gemma and Mistral-Nemo, where heads x head_dim differs from the model width:

    * ``d_in < d_out``: n = d_out; x is zero-padded to n channels before the transform
      (R = identity), so ``G H [x; 0]``.
    * ``d_in > d_out``: n = d_in; R keeps the d_out transform coordinates listed in the buffer
      ``keep`` (ascending; chosen by the fit, see :mod:`hadaconv.fit`; the first d_out by
      default), then G acts on them.

    The transform itself is always the square op ``hadaconv::hadamard_affine`` (and in ONNX the
    square ``com.hadaconv::HadamardAffine``); padding and selection are standard ops around it
    (``F.pad`` / ``index_select``, exported as ONNX Pad / Gather).

    Args:
        dim: input width d_in.
        bias: whether to learn ``beta`` [d_out] (initialised to zero).
        block: output block size b; must divide d_out.
        out_features: output width d_out (default ``dim``: square).  max(d_in, d_out) must be a
            supported Hadamard order (``m * 2^k``).
    """

    def __init__(self, dim: int, bias: bool = True, block: int = 1, *, out_features: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        d_in, d_out = int(dim), int(out_features if out_features is not None else dim)
        self.n = max(d_in, d_out)
        factorize(self.n)
        if block < 1 or d_out % block:
            raise InputError(f"block size {block} must be a positive divisor of the output width {d_out}")
        self.dim, self.d_out, self.block = d_in, d_out, int(block)
        kw = {"device": device, "dtype": dtype}
        if block == 1:
            self.gamma = nn.Parameter(torch.ones(d_out, **kw))
        else:
            eye = torch.eye(block, **kw).expand(d_out // block, block, block)
            self.gamma = nn.Parameter(eye.clone())
        self.beta = nn.Parameter(torch.zeros(d_out, **kw)) if bias else None
        if d_in > d_out:
            self.register_buffer("keep", torch.arange(d_out, device=device))
        else:
            self.keep = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_to(x, self.gamma, self.beta)

    def _apply_to(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
        if self.keep is None:
            if self.dim < self.n:
                x = F.pad(x, (0, self.n - self.dim))
            return hadamard_affine(x, gamma, beta)
        z = hadamard_affine(x, None, None).index_select(-1, self.keep)
        return apply_affine(z, gamma, beta)

    @property
    def in_features(self) -> int:  # lets code written for nn.Linear read the widths
        return self.dim

    @property
    def out_features(self) -> int:
        return self.d_out

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense matrix W [d_out, d_in] (``y = W x + beta``), float64, for tests
        and inspection."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.gamma.device)
        return self._apply_to(eye, self.gamma.detach().double(), None).T

    def extra_repr(self) -> str:
        f = factorize(self.n)
        shape = f"dim={self.dim}" if self.dim == self.d_out else f"dim={self.dim}, out_features={self.d_out}"
        return f"{shape}, block={self.block}, bias={self.beta is not None}, hadamard={f}"

