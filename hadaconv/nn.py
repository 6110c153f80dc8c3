"""The Hadamard projection layer, square or rectangular."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hadaconv.errors import InputError, option
from hadaconv.hadamard import factorize
from hadaconv.ops import hadamard_affine
from hadaconv.ops.transform import apply_affine

__all__ = ["HadamardProjection", "check_rank", "check_saves", "parameters_saved", "saving_blocks"]


def parameters_saved(d_in: int, d_out: int, block: int, dense_bias: bool, rank: int = 0) -> int:
    """Parameters removed by replacing a dense d_out x d_in projection (with or without bias) by
    a HadamardProjection with output blocks of ``block``, a bias and a rank-``rank`` residual:
    W and b out, gamma [d_out/block, block, block], beta [d_out], D [rank, d_in] and U
    [d_out, rank] in.  Zero or negative where the replacement is no smaller."""
    return d_out * d_in + (d_out if dense_bias else 0) - d_out * block - d_out - rank * (d_in + d_out)


def saving_blocks(d_in: int, d_out: int, dense_bias: bool) -> list[int]:
    """The block sizes (ascending) that divide ``d_out`` and remove parameters from a dense
    d_out x d_in projection (:func:`parameters_saved` above 0, no residual)."""
    return [b for b in range(1, d_out + 1) if d_out % b == 0 and parameters_saved(d_in, d_out, b, dense_bias) > 0]


def check_saves(name: str, d_in: int, d_out: int, dense_bias: bool, block: int, rank: int = 0, *,
                block_given: bool = True) -> None:
    """Refuse a block size, or a residual rank, at which the d_out x d_in projection ``name``
    would keep as many parameters as its dense form (one line naming the largest block, or
    rank, that still saves some).  ``block_given``: the user chose ``block`` (else it is the
    default, which the message says).

    Raises:
        InputError: :func:`parameters_saved` is 0 or less.
    """
    if parameters_saved(d_in, d_out, block, dense_bias, rank) > 0:
        return
    if (saved := parameters_saved(d_in, d_out, block, dense_bias)) <= 0:
        dense = d_out * d_in + (d_out if dense_bias else 0)
        named = option("block", block) if block_given else f"the default block {block} ({option('block')})"
        raise InputError(f"{named} saves no parameters at {name} ({d_out}x{d_in}): gamma and beta "
                         f"keep {dense - saved:,} against the dense {dense:,}; the largest block that saves any is "
                         f"{max(saving_blocks(d_in, d_out, dense_bias), default=1)}")
    most = max(0, (saved - 1) // (d_in + d_out))
    raise InputError(f"{option('rank', rank)} saves no parameters at {name} ({d_out}x{d_in}, block {block}): "
                     f"the residual keeps {rank * (d_in + d_out):,}; the largest rank that saves any is {most}")


def check_rank(rank: int, d_in: int, d_out: int) -> None:
    """Raise InputError unless ``rank`` is an integer (not a bool) from 0 to min(d_in, d_out):
    the ranks a low-rank residual U [d_out, r] D [r, d_in] can have."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(d_in, d_out):
        raise InputError(f"rank {rank!r} must be an integer from 0 to min(d_in, d_out) = {min(d_in, d_out)}")


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

    An optional low-rank residual (``rank = r > 0``) adds ``U (D x)``: D [r, d_in] (``down``) and
    U [d_out, r] (``up``), two plain matrix products (ONNX MatMul) costing ``r (d_in + d_out)``
    multiply-adds per token; fitted by :func:`hadaconv.fit.fit_projection`.  U starts at zero, so
    a fresh layer is unchanged; D starts random (as LoRA's down-projection), so training moves both.

    Args:
        dim: input width d_in.
        bias: whether to learn ``beta`` [d_out] (initialised to zero).
        block: output block size b; must divide d_out.
        out_features: output width d_out (default ``dim``: square).  max(d_in, d_out) must be a
            supported Hadamard order (``m * 2^k``).
        rank: r of the low-rank residual (0: none), at most min(d_in, d_out).

    Raises:
        InputError: a block not dividing d_out, or a rank outside 0..min(d_in, d_out); in forward,
            an input whose last dimension is not d_in.
    """

    def __init__(self, dim: int, bias: bool = True, block: int = 1, *, out_features: int | None = None,
                 rank: int = 0, device=None, dtype=None) -> None:
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
        check_rank(rank, d_in, d_out)
        self.rank = rank
        self.down = self.up = None
        if rank:
            self.down = nn.Parameter(torch.randn(rank, d_in, **kw) / d_in ** 0.5)
            self.up = nn.Parameter(torch.zeros(d_out, rank, **kw))
        # The adapter's index of the layer this replaced, set by hadaconv.swap.install_projection
        # (hadaconv.io.save reads it); a plain attribute, never in the state dict.
        self.layer_index: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:  # the op would name gamma's shape, which is not what is wrong
            raise InputError(f"HadamardProjection(dim={self.dim}) takes inputs [..., {self.dim}], got "
                             f"{list(x.shape)}")
        y = self._apply_to(x, self.gamma, self.beta)
        return y if self.up is None else y + F.linear(F.linear(x, self.down), self.up)

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
        w = self._apply_to(eye, self.gamma.detach().double(), None).T
        return w if self.up is None else w + self.up.detach().double() @ self.down.detach().double()

    def extra_repr(self) -> str:
        f = factorize(self.n)
        shape = f"dim={self.dim}" if self.dim == self.d_out else f"dim={self.dim}, out_features={self.d_out}"
        rank = f", rank={self.rank}" if self.rank else ""
        return f"{shape}, block={self.block}{rank}, bias={self.beta is not None}, hadamard={f}"

