"""The Hadamard projection layer."""

from __future__ import annotations

import torch
from torch import nn

from hadaconv.hadamard import factorize
from hadaconv.ops import hadamard_affine

__all__ = ["HadamardProjection"]


class HadamardProjection(nn.Module):
    """``y = G (H x / sqrt(n)) + beta``: a parameter-light replacement for a dense n x n projection.

    ``H`` is the fixed +-1 Hadamard matrix of order n (see :mod:`hadaconv.hadamard`); it holds no
    parameters.  ``G`` is diagonal (``block=1``, ``gamma`` of shape [n], the layer of the seed
    paper) or block-diagonal with ``block x block`` blocks on contiguous output channels
    (``gamma`` of shape [n/block, block, block]), the form the converter fits to trained weights.
    Both start as the identity, so a fresh layer is the plain orthonormal transform.

    Args:
        dim: width n; must be a supported Hadamard order (``m * 2^k``).
        bias: whether to learn ``beta`` (initialised to zero).
        block: output block size b; must divide ``dim``.
    """

    def __init__(self, dim: int, bias: bool = True, block: int = 1, *, device=None, dtype=None) -> None:
        super().__init__()
        factorize(dim)
        if block < 1 or dim % block:
            raise ValueError(f"block size {block} must be a positive divisor of the width {dim}")
        self.dim, self.block = int(dim), int(block)
        kw = {"device": device, "dtype": dtype}
        if block == 1:
            self.gamma = nn.Parameter(torch.ones(dim, **kw))
        else:
            eye = torch.eye(block, **kw).expand(dim // block, block, block)
            self.gamma = nn.Parameter(eye.clone())
        self.beta = nn.Parameter(torch.zeros(dim, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_affine(x, self.gamma, self.beta)

    @property
    def in_features(self) -> int:  # lets code written for nn.Linear read the width
        return self.dim

    @property
    def out_features(self) -> int:
        return self.dim

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense matrix W (``y = W x + beta``), for tests and inspection."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.gamma.device)
        gamma = self.gamma.detach().double()
        return hadamard_affine(eye, gamma, None).T

    def extra_repr(self) -> str:
        f = factorize(self.dim)
        return f"dim={self.dim}, block={self.block}, bias={self.beta is not None}, hadamard={f}"
