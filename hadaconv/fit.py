"""Least-squares fits of a Hadamard projection to a trained dense projection.

Pure math on tensors: no model objects.  The dense layer is ``y = W x + b`` (W is d x d); its
input x has mean ``mu`` and second moment ``S = E[x x^T]`` on calibration data.  The replacement
is

    y' = G T V x + beta,        T = H / sqrt(d) (orthonormal Hadamard, hadaconv's convention)

with G diagonal (``block = 1``) or block-diagonal (b x b blocks on contiguous output channels),
and V a map that costs nothing at run time because it is folded into the value projection:
attention mixes tokens, never channels, so scaling or rotating a head's value channels is
exactly the same as applying that map to the head's slice of x.  The modes:

* ``affine``: V = I (G and beta only; the seed paper's layer for ``block = 1``);
* ``diag``: V a per-channel scale, shared by the query heads of a KV group;
* ``head``: V a full head_dim x head_dim matrix per KV group.

The objective is the mean squared output error E||y' - y||^2.  For any G, V the best beta is
``b + (W - G T V) mu``, which leaves ``tr(A C A^T)`` with ``A = G T V - W`` and C the input
covariance, ridge-damped by ``ridge * tr(C) / d``.  That is minimised *jointly* over G and V by
L-BFGS in whitened coordinates (C = L L^T, so the objective is ||G T V L - W L||_F^2 and one
evaluation costs O(d^2 (head_dim + log d + b)), never a d^3 product).  G enters linearly, so it
is solved in closed form inside every evaluation (variable projection) and L-BFGS only moves V,
starting from V = I (the affine solution).  A small ridge on G (``GAMMA_RIDGE``) chooses, among
the near-equal factorizations G T V, one whose G does not amplify float32 rounding.

Rectangular projections (W is d_out x d_in, d_in != d_out, as in Qwen3, Gemma, Mistral-Nemo).
The transform runs on n = max(d_in, d_out) and a fixed, parameter-free map R joins it to the
other side:

    y' = G R T V x + beta,      R T is d_out x d_in, G acts on d_out, V on d_in

* d_in < d_out = n: ``R T = T P`` with ``P = [I; 0]`` (n x d_in): x is zero-padded to n.  R T has
  orthonormal columns, so the padded transform loses nothing of x; G mixes n = d_out outputs.
* d_in = n > d_out: ``R T = S T`` with S the d_out rows ``keep`` of the identity: the transform
  of x, of which d_out coordinates ``z_j = (T x)_j`` are kept.  R T has orthonormal rows; the
  dropped coordinates are lost, so which ones are kept matters.  :func:`select_coordinates`
  keeps those with the largest ``Var[z_j] ||W T^T e_j||^2``: since ``W x = (W T^T) z``, this is
  the output energy coordinate j carries on its own (the covariance's off-diagonal terms are
  ignored: an upper bound, exact for uncorrelated z).  The rule was chosen by measurement
  against keeping the first d_out and against ``Var[z_j]`` alone (benchmarks/RESULTS.md,
  "Rectangular projections").  Folding pairs ``(z_2j + z_2j+1) / sqrt 2`` was not pursued: it
  needs d_in = 2 d_out (Gemma 3 maps 1024 into 640) and is a fixed choice the selection can
  match where it is good.  The kept indices are sorted, so each b x b block of G reads b kept
  coordinates in transform order.

Everything above carries over with T replaced by R T (the square case is R = I): the whitened
objective is ``||G R T V L - W L||_F^2`` (W L is d_out x d_in, L is d_in x d_in), the best beta
``b + (W - G R T V) mu``, G is solved per output block over the rows of R T V L, the gamma
ridge scales with the mean power of those d_out rows, and gradients and the alternating start
use the adjoint ``(R T)^T = T^T R^T`` (scatter the d_out rows into n, inverse transform, keep
the first d_in rows).  One implementation serves both: :class:`_Rotation` applies R T and its
adjoint.

The optional low-rank residual (``rank = r > 0``, off by default).  The layer becomes

    y' = G R T V x + beta + U D (V x),      U [d_out, r], D [r, d_in]

where ``V x`` is what the layer sees once V is folded into the value projection, so D acts on
those coordinates.  After G and V are fitted, (U, D) minimise the remaining mean squared error
``E||A x~ - U D V x~||^2`` (A = W - G R T V, x~ = x - mu; beta takes the mean as before, now
``b + (W - G R T V - U D V) mu``), i.e. ``tr((A - B V) C (A - B V)^T)`` over B = U D of rank r,
with C the damped covariance.  This is reduced-rank regression (Izenman 1975, "Reduced-rank
regression for the multivariate linear model") of the targets A x~ on the predictors V x~: the
unconstrained optimum is ``B = A C V^T (V C V^T)^-1`` and the rank-r optimum projects it onto
the top-r left singular subspace of ``B (V C V^T)^{1/2}``, i.e. the top-r eigenvectors U_r of
``N = B (V C V^T) B^T = A C V^T (V C V^T)^-1 V C A^T``; then ``U D = U_r U_r^T B``.  With V = I
this is the truncated SVD of the whitened remainder A L (C = L L^T), as SVD-LLM (Wang et al.
2024) factors a whole W.  :func:`reduced_rank` computes it in float64 with a few d^3 products and
one eigendecomposition of the d_out x d_out N (U and D share the singular values' square
roots, so neither is much larger than the other).  The rank-r optimum contains B = 0, and the
fit keeps U = 0 should the residual not lower the (undamped) calibration error.  Cost at run
time: ``r (d_in + d_out)`` parameters and multiply-adds per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from hadaconv.calibrate import Moments  # re-exported: the statistics the fits consume
from hadaconv.errors import InputError
from hadaconv.hadamard import factorize, sylvester
from hadaconv.nn import check_rank
from hadaconv.ops.transform import hadamard_transform_columns

Mode = Literal["affine", "diag", "head"]
MODES: tuple[Mode, ...] = ("affine", "diag", "head")

#: Default ``gamma_ridge``.  G T V has many near-optimal factorizations, some of them with V
#: nearly removing a direction and G amplifying it back (|G| of 1e3 to 1e4 where the others have
#: 10): equal in exact arithmetic, but float32 rounding in the value path is amplified as much.
#: Measured on SmolLM2-135M (block 16): without the ridge, layer 9's fit lands on |G| = 2159 to
#: 4685 and the converted model's float32 logits move 10x further from float64 than the dense
#: model's (4.4e-4 against 4.7e-5).  At 1e-3 every layer stays below |G| = 17 and the fit error
#: is unchanged to 3 digits (slightly lower on average, on the calibration text and on others).
GAMMA_RIDGE = 1e-3

#: Widths from which the iterative part of the fit runs in float32 by default.  Measured
#: (benchmarks/RESULTS.md, "The fit at d = 4096"): at d = 4096 float32 ends where float64 does
#: (relative error 0.081815 against 0.081816) in half the CPU time; at d = 576 forced float32
#: moved one of SmolLM2's four layers (0.51696 against 0.51676), so smaller widths keep float64.
FLOAT32_FROM = 2048

#: Default L-BFGS budget from ``FLOAT32_FROM`` channels.  Measured (benchmarks/bench_fit.py, d = 4096,
#: 32/8 heads of 128, block 16): 20 iterations end 0.04% above 40 (relative error 0.081815 against
#: 0.081785) in 20 s of CPU time instead of 31 s.
LARGE_ITERATIONS = 20

#: The closed-form start's alternating steps: at most START_STEPS, stopping at the first that
#: lowers the loss by less than START_GAIN (relative).  Stopping early costs at most 0.1% of
#: relative error on SmolLM2's layers (layer 9's head fit: 0.64194 against 0.64126 after all 30
#: steps; benchmarks/RESULTS.md, "The fit at d = 4096").
START_STEPS = 30
START_GAIN = 0.01

#: Rules for the d_out transform coordinates kept when d_in > d_out (:func:`select_coordinates`).
SELECTIONS = ("first", "input-energy", "output-energy")
#: Default rule, chosen by measurement (benchmarks/RESULTS.md, "Rectangular projections").
SELECTION = "output-energy"

__all__ = ["FLOAT32_FROM", "GAMMA_RIDGE", "MODES", "SELECTION", "SELECTIONS", "FitResult", "HeadLayout", "Moments",
           "damped_covariance", "dense_map", "fit_projection", "reduced_rank", "relative_error", "select_coordinates"]


@dataclass(frozen=True)
class HeadLayout:
    """x = concat of ``num_heads`` query heads of ``head_dim`` channels; head h reads KV group
    ``h // (num_heads // num_kv_heads)``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class FitResult:
    """The fitted replacement: ``y' = gamma (R T V x) + beta`` (R = I for a square W).

    ``value_map`` is None (affine), a per-KV-channel scale [kv * head_dim] (diag) or one matrix
    per KV group [kv, head_dim, head_dim] (head), to be folded into the value projection.
    ``error`` is the relative output error on the data the fit saw.  ``keep`` lists the kept
    transform coordinates (int64 [d_out], ascending) when d_in > d_out, else None.  ``up`` U
    [d_out, r] and ``down`` D [r, d_in] are the low-rank residual ``U D (V x)`` (module
    docstring), None when ``rank = 0``.
    """

    gamma: torch.Tensor
    beta: torch.Tensor
    value_map: torch.Tensor | None
    mode: Mode
    block: int
    error: float
    iterations: int
    keep: torch.Tensor | None = None  # [d_out] kept transform coordinates of a d_in > d_out fit
    up: torch.Tensor | None = None  # U [d_out, r] of the low-rank residual
    down: torch.Tensor | None = None  # D [r, d_in]

    @property
    def rank(self) -> int:
        """r, the rank of the low-rank residual (0: none)."""
        return 0 if self.up is None else self.up.shape[1]


# --------------------------------------------------------------------------- building blocks


class _Rotation:
    """R T (T = H_n / sqrt(n), n = max(d_in, d_out), R the padding or selection of the module
    docstring; R = I when square), applied to the columns of [d_in, k] matrices, and its adjoint,
    in the fit's dtype.

    When the head width hd is a power of two dividing the Sylvester part of n = m 2^k (n = 4096
    with heads of 128, not n = 576 = 36 x 16 with heads of 64), ``H_n = H_{n/hd} (x) H_hd``
    (Sylvester matrices are Kronecker powers of H_2), so ``T = A (x) B`` with B (hd x hd) acting
    inside each head and A (n/hd x n/hd) mixing heads.  Then ``T V L`` is one batched GEMM with
    the per-head maps ``B V_h`` and one GEMM with A, in the memory layout they already have:
    no transposing passes.  Zero-padding keeps this form (d_in is whole heads, so the padding is
    whole hd-blocks that B leaves at zero).  A and B are read off the transform itself and
    checked against it.  Otherwise ``within`` is None and ``mix`` is the full transform.
    """

    def __init__(self, d_in: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 d_out: int | None = None, keep: torch.Tensor | None = None) -> None:
        self.d_in, self.d_out = d_in, d_in if d_out is None else d_out
        self.n = d = max(self.d_in, self.d_out)
        self.keep = None if keep is None else keep.to(device)
        self.dtype, self.device = dtype, device
        self.within = self.across = None
        k = factorize(d).k
        if head_dim > 1 and head_dim & (head_dim - 1) == 0 and (1 << k) % head_dim == 0 and d > head_dim:
            h = d // head_dim
            probe = torch.zeros(d, h, dtype=torch.float64)
            probe[torch.arange(h) * head_dim, torch.arange(h)] = 1
            first = hadamard_transform_columns(probe, 1 / math.sqrt(d))  # T's column (h, 0) per head h
            within = torch.tensor(sylvester(head_dim.bit_length() - 1), dtype=torch.float64) / math.sqrt(head_dim)
            across = first[::head_dim] / within[0, 0]
            x = torch.randn(d, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            kron = (across @ (within @ x.reshape(h, head_dim, 2)).reshape(h, -1)).reshape(d, 2)
            if torch.allclose(kron, hadamard_transform_columns(x, 1 / math.sqrt(d)), atol=1e-12):
                self.within = within.to(device, dtype)
                self.across = across.to(device, dtype)

    def mix(self, z: torch.Tensor) -> torch.Tensor:
        """R (A (x) I) z, or R T z when T does not factor: z [d_in, k] -> [d_out, k]."""
        if self.d_in < self.n:
            z = torch.cat([z, z.new_zeros(self.n - self.d_in, z.shape[1])])
        if self.across is None:
            y = _transform(z)
        else:
            y = (self.across @ z.reshape(self.across.shape[0], -1)).reshape(z.shape)
        return y if self.keep is None else y[self.keep]

    def mix_t(self, y: torch.Tensor) -> torch.Tensor:
        """(A^T (x) I) R^T y, or (R T)^T y: y [d_out, k] -> [d_in, k]."""
        if self.keep is not None:
            y = y.new_zeros(self.n, y.shape[1]).index_copy_(0, self.keep, y)
        if self.across is None:
            z = _transform(y, inverse=True)
        else:
            z = (self.across.T @ y.reshape(self.across.shape[0], -1)).reshape(y.shape)
        return z[: self.d_in]

    def _inside(self, z: torch.Tensor, transpose: bool) -> torch.Tensor:
        if self.within is None:
            return z
        hd = self.within.shape[0]
        b = self.within.T if transpose else self.within
        return (b @ z.reshape(-1, hd, z.shape[-1])).reshape(z.shape)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """R T z for z [d_in, k] -> [d_out, k]."""
        return self.mix(self._inside(z, False))

    def apply_t(self, y: torch.Tensor) -> torch.Tensor:
        """(R T)^T y for y [d_out, k] -> [d_in, k]."""
        return self._inside(self.mix_t(y), True)

    def head_maps(self, value_map: torch.Tensor | None, layout: HeadLayout) -> torch.Tensor | None:
        """The per-query-head matrices ``B V_h`` [h, hd, hd] (V_h = diag(v_h) for a diagonal map,
        I for none); None when there is nothing to apply (no V and no B)."""
        if value_map is None and self.within is None:
            return None
        h, hd = layout.num_heads, layout.head_dim
        if value_map is None:
            maps = torch.eye(hd, dtype=self.dtype, device=self.device).expand(h, hd, hd)
        elif value_map.dim() == 1:
            maps = torch.diag_embed(_expand(value_map, layout, h * hd).reshape(h, hd))
        else:
            maps = _expand(value_map, layout, h * hd)
        return maps if self.within is None else self.within @ maps

    def project(self, value_map: torch.Tensor | None, lw: torch.Tensor, layout: HeadLayout | None) -> torch.Tensor:
        """R T V L for L [d_in, k] -> [d_out, k]: per-head maps, then the mix."""
        if layout is None:
            return self.apply(lw)
        maps = self.head_maps(value_map, layout)
        if maps is None:
            return self.mix(lw)
        h, hd = layout.num_heads, layout.head_dim
        return self.mix(torch.bmm(maps, lw.reshape(h, hd, -1)).reshape(lw.shape))


def _transform(z: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """T z (T^T z if ``inverse``): the orthonormal Hadamard transform of each column of z [n, k]."""
    return hadamard_transform_columns(z, 1.0 / math.sqrt(z.shape[0]), inverse)


def select_coordinates(weight: torch.Tensor, moments: Moments, rule: str = SELECTION) -> torch.Tensor:
    """The d_out of the n = d_in transform coordinates z = T x to keep, ascending (int64 [d_out]),
    for W [d_out, d_in] with d_in > d_out; on the device of ``moments.second``.

    * ``first``: coordinates 0..d_out-1 (no statistics);
    * ``input-energy``: the largest ``Var[z_j]``, the diagonal of T C T^T (C the covariance);
    * ``output-energy``: the largest ``Var[z_j] ||W T^T e_j||^2``: the energy coordinate j
      carries into the dense layer's output ``W x = (W T^T) z``, counting each coordinate alone.

    Raises InputError (a ValueError) for an unknown rule.
    """
    d_out = weight.shape[0]
    if rule not in SELECTIONS:
        raise InputError(f"unknown selection rule {rule!r}; choose one of {', '.join(SELECTIONS)}")
    dev = moments.second.device
    if rule == "first":
        return torch.arange(d_out, device=dev)
    c = moments.covariance.to(dev, torch.float64)  # the mean is beta's job
    energy = _transform(_transform(c).T).diagonal()  # diag(T C T^T)
    if rule == "output-energy":
        wt = _transform(weight.detach().to(dev, torch.float64).T)  # T W^T = (W T^T)^T: row j is column j
        energy = energy * wt.square().sum(1)
    return torch.sort(torch.topk(energy, d_out).indices).values


def _expand(value_map: torch.Tensor | None, layout: HeadLayout | None, d: int) -> torch.Tensor | None:
    """Per-query-head form of V: [d] for diag, [heads, hd, hd] for head."""
    if value_map is None:
        return None
    assert layout is not None
    if value_map.dim() == 1:
        return value_map.reshape(layout.num_kv_heads, 1, layout.head_dim).expand(
            -1, layout.group, -1).reshape(d)
    return value_map.repeat_interleave(layout.group, dim=0)


def _apply_g(gamma: torch.Tensor, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """G @ z (G^T @ z if ``transpose``) for z [d, k] (G diagonal or block-diagonal)."""
    if gamma.dim() == 1:
        return gamma[:, None] * z
    nb, b, _ = gamma.shape
    g = gamma.transpose(1, 2) if transpose else gamma
    return torch.bmm(g, z.reshape(nb, b, -1)).reshape(z.shape)


def _fit_gamma(p: torch.Tensor, target: torch.Tensor, block: int, lam: torch.Tensor | float) -> torch.Tensor:
    """argmin_G ||G p - target||_F^2 + lam ||G||_F^2 for G diagonal / block-diagonal (p, target:
    [d, k])."""
    d = p.shape[0]
    if block == 1:
        return (p * target).sum(1) / ((p * p).sum(1) + lam)
    nb = d // block
    pb, tb = p.reshape(nb, block, -1), target.reshape(nb, block, -1)
    gram = torch.baddbmm(torch.eye(block, dtype=p.dtype, device=p.device) * lam, pb, pb.transpose(1, 2))
    cross = tb @ pb.transpose(1, 2)
    # G_i gram_i = cross_i  ->  G_i = cross_i gram_i^{-1} (gram symmetric, positive definite
    # for lam > 0).  Cholesky, not torch.linalg.solve: the LU solve of a batch of two or more
    # blocks of 192 or more hangs in torch 2.13's MKL with two threads (blocks 192 and 288 of
    # SmolLM2's 576 never finished).
    return _solve_psd(gram, cross.transpose(1, 2)).transpose(1, 2)


def _gamma_lambda(power: torch.Tensor, damping: float) -> torch.Tensor:
    """``damping`` times ``power``, the mean channel power of p = T V L: a ridge relative to p's
    own scale, so the objective stays invariant under V -> c V, G -> G / c (which the fit
    cannot see)."""
    return damping * power + (power == 0)


def _objective(v, lw, target, layout, block, damping, rot, grad: bool = True):
    """The reduced objective ``min_G ||G R T V L - W L||^2 + lam ||G||^2`` at V = ``v`` and its
    gradient in v (None unless ``grad``).

    The gradient is written out rather than taped: by the envelope theorem G is held at its
    optimum, so dP = 2 G^T E + 2 damping ||G||^2 P / d_out (E the residual, the second term from
    lam's dependence on P), then back through the adjoint mix and the per-head maps.  Five d x d
    passes in all; autograd kept twice as many intermediates and took 2.4 s of a 4.7 s
    evaluation at d = 4096.
    """
    d = lw.shape[0]
    h, hd = layout.num_heads, layout.head_dim
    lh = lw.reshape(h, hd, d)
    p = rot.mix(torch.bmm(rot.head_maps(v, layout), lh).reshape(d, d))  # [d_out, d_in]
    power = p.square().sum() / rot.d_out
    lam = _gamma_lambda(power, damping)
    g = _fit_gamma(p, target, block, lam)
    r = _apply_g(g, p).sub_(target)
    g2 = g.square().sum()
    loss = r.square().sum() + lam * g2
    if not grad:
        return loss, None
    dp = _apply_g(g, r, transpose=True).mul_(2)
    del r
    if power > 0:
        dp.add_(p, alpha=2 * damping * g2.item() / rot.d_out)
    del p
    dm = torch.bmm(rot.mix_t(dp).reshape(h, hd, d), lh.transpose(1, 2))  # d loss / d(B V_h), via (R T)^T
    if rot.within is not None:
        dm = rot.within.T @ dm
    if v.dim() == 1:
        dv = dm.diagonal(dim1=1, dim2=2).reshape(layout.num_kv_heads, layout.group, hd).sum(1).reshape(-1)
    else:
        dv = dm.reshape(layout.num_kv_heads, layout.group, hd, hd).sum(1)
    return loss, dv


# --------------------------------------------------------------------------- the fit


def fit_projection(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    moments: Moments,
    *,
    mode: Mode = "head",
    block: int = 1,
    layout: HeadLayout | None = None,
    ridge: float = 1e-3,
    gamma_ridge: float = GAMMA_RIDGE,
    max_iter: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    selection: str | None = None,
    rank: int = 0,
    start: torch.Tensor | None = None,
) -> FitResult:
    """Fit ``gamma (R T V x) + beta`` to ``W x + b`` under the input statistics ``moments``
    (R = I for a square W; zero-padding or coordinate selection for a rectangular one, see the
    module docstring).

    Args:
        weight: W [d_out, d_in] (any float dtype and device); n = max(d_in, d_out) must be a
            Hadamard order (:func:`hadaconv.hadamard.factorize`).
        bias: b [d_out] or None.
        moments: statistics of the d_in inputs (``Moments.identity(d_in)`` for a data-free fit).
        mode: "affine", "diag" or "head" (see the module docstring).
        block: output block size b of G (1 = diagonal); must divide d_out.
        layout: head layout over the d_in inputs, required for "diag" and "head".
        ridge: damping relative to the mean eigenvalue of the input covariance.
        gamma_ridge: penalty ``lam ||G||_F^2`` on the gamma blocks, ``lam`` this fraction of the
            mean channel power of ``R T V L`` (see ``GAMMA_RIDGE``; 0 turns it off).
        max_iter: L-BFGS iterations for the joint fit ("diag", "head"); default 40 below
            ``FLOAT32_FROM`` channels (n), ``LARGE_ITERATIONS`` from there.
        dtype: dtype of the iterative part (the d x d whitened products); the covariance, its
            factor, beta and the returned error are float64 whatever it is.  Default: float64
            below ``FLOAT32_FROM`` channels, float32 from there (see that constant).
        device: where the fit runs; default the device of ``moments.second``.
        selection: for d_in > d_out, the rule choosing the kept coordinates
            (:func:`select_coordinates`, default ``SELECTION``); ignored otherwise.
        rank: r of the low-rank residual fitted after G and V (module docstring), 0 to
            min(d_in, d_out); 0 (the default) fits none.
        start: a value map to start L-BFGS from, in the form ``FitResult.value_map`` has (an
            earlier fit's, of a nearby W): it replaces the alternating start, so that a few
            iterations refine it (:func:`hadaconv.rotation.fit_rotation` refits each layer many
            times).  None: the alternating start from V = I.

    Returns:
        A FitResult with float64 gamma [d_out] or [d_out/b, b, b], beta [d_out], value map and
        ``keep``, and for ``rank > 0`` float64 ``up`` [d_out, r] and ``down`` [r, d_in], on
        ``device``.

    Raises:
        InputError (a ValueError): unknown mode or selection rule, b not dividing d_out, a
            missing head layout, or a rank outside 0..min(d_in, d_out).
    """
    if mode not in MODES:
        raise InputError(f"unknown fit mode {mode!r}; choose one of {', '.join(MODES)}")
    dev = torch.device(device) if device is not None else moments.second.device
    w = weight.detach().to(dev, torch.float64)
    d_out, d = w.shape
    if block < 1 or d_out % block:
        valid = ", ".join(str(d) for d in range(1, d_out + 1) if d_out % d == 0)
        raise InputError(f"block size {block} does not divide the output width {d_out} (it must be a positive divisor: "
                         f"{valid})")
    if layout is not None and layout.num_heads * layout.head_dim != d:
        if mode != "affine":
            raise InputError(f"mode {mode!r} needs a head layout covering the input width {d}")
        layout = None
    if mode != "affine" and layout is None:
        raise InputError(f"mode {mode!r} needs a head layout covering the input width {d}")
    check_rank(rank, d, d_out)
    keep = select_coordinates(w, moments, selection or SELECTION).to(dev) if d > d_out else None
    n = max(d, d_out)
    work = dtype or (torch.float32 if n >= FLOAT32_FROM else torch.float64)
    if max_iter is None:
        max_iter = LARGE_ITERATIONS if n >= FLOAT32_FROM else 40
    rot = _Rotation(d, layout.head_dim if layout is not None else 1, work, dev, d_out, keep)
    b = torch.zeros(d_out, dtype=torch.float64, device=dev) if bias is None else bias.detach().to(dev, torch.float64)
    mu = moments.mean.to(dev, torch.float64)
    cov, damp = damped_covariance(moments, ridge, dev)
    lw = _factor(cov).to(work)  # L L^T = C + damp I
    if not rank:
        cov = None
    w_work = w.to(work)
    target = w_work @ lw  # W L [d_out, d_in]: the one d^3 product of the fit

    value_map, iterations = None, 0
    if mode != "affine":
        # The first alternating step evaluates V = I, so the start is never worse than it.
        value_map = start.to(dev, work) if start is not None else \
            _alternating_start(w_work, lw, target, layout, block, gamma_ridge, rot, diagonal=mode == "diag")
        value_map, iterations = _joint_lbfgs(value_map, lw, target, layout, block, max_iter, gamma_ridge, rot)
        value_map = _normalized(value_map)
    fit = _finish(w, b, mu, value_map, lw, target, damp, layout, block, gamma_ridge, rot, mode, iterations)
    return fit if not rank else _with_residual(fit, w, b, mu, cov, damp, layout, rank)


def _finish(w, b, mu, value_map, lw, target, damp, layout, block, gamma_ridge, rot, mode, iterations) -> FitResult:
    """G for the final V, beta, and the error from the whitened quantities (no d^3 product):
    beta removes the mean error, so E||y' - y||^2 = tr(A C A^T) = ||A L||^2 - damp ||A||^2 with
    A = G R T V - W, and E||y||^2 = ||W L||^2 - damp ||W||^2 + ||W mu + b||^2."""
    p = rot.project(value_map, lw, layout)
    gamma = _fit_gamma(p, target, block, _gamma_lambda(p.square().sum() / rot.d_out, gamma_ridge))
    residual = _apply_g(gamma, p).sub_(target)  # (G R T V - W) L
    del p
    err = _sum_squares(residual)
    del residual
    gamma = gamma.to(torch.float64)
    value_map = None if value_map is None else value_map.to(torch.float64)
    a = _dense(gamma, value_map, layout, w.shape, rot.keep).sub_(w)  # G R T V - W
    a_norm = a.square().sum()
    a_mu = a @ mu
    del a
    beta = b - a_mu  # b + (W - G R T V) mu
    w_mu = w @ mu
    ref = _sum_squares(target) - damp * w.square().sum() + (w_mu + b).square().sum()
    error = math.sqrt(max((err - damp * a_norm).item(), 0.0) / max(ref.item(), 1e-300))
    return FitResult(gamma, beta, value_map, mode, block, error, iterations, rot.keep)


def _with_residual(fit: FitResult, w, b, mu, cov, damp: float, layout, rank: int) -> FitResult:
    """``fit`` with the rank-r residual (U, D) added, beta and the error updated (module
    docstring); U = 0 where the residual would not lower the undamped calibration error.  The
    errors are tr(A C A^T) with the undamped C, computed directly (a d^3 product each): the
    difference of the whitened sums would lose the digits of a near-exact fit."""
    d_out, d = w.shape
    vmat = _value_matrix(fit.value_map, layout, d)
    a = w - _dense(fit.gamma, fit.value_map, layout, (d_out, d), fit.keep)  # the remainder W - G R T V
    up, down = reduced_rank(a, cov, rank, vmat)
    a_r = a - _residual(up, down, vmat)  # W - G R T V - U D V
    plain = cov.clone()
    plain.diagonal().sub_(damp)
    err0, err_r = _quadratic(a, plain), _quadratic(a_r, plain)
    if not err_r < err0:
        up, a_r, err_r = torch.zeros_like(up), a, err0
    w_mu = w @ mu
    ref = _quadratic(w, plain) + (w_mu + b).square().sum()
    error = math.sqrt(max(err_r.item(), 0.0) / max(ref.item(), 1e-300))
    return replace(fit, beta=b + a_r @ mu, error=error, up=up, down=down)


def _value_matrix(value_map: torch.Tensor | None, layout: HeadLayout | None, d: int) -> torch.Tensor | None:
    """V as a dense float64 [d, d] matrix over the query-head channels (None for V = I)."""
    if value_map is None:
        return None
    v = _expand(value_map.to(torch.float64), layout, d)
    return torch.diag(v) if v.dim() == 1 else torch.block_diag(*v)


def _residual(up: torch.Tensor, down: torch.Tensor, vmat: torch.Tensor | None) -> torch.Tensor:
    """The residual's map on the unfolded input, U D V [d_out, d_in] (V = I when ``vmat`` is None)."""
    return up @ (down if vmat is None else down @ vmat)


def reduced_rank(a: torch.Tensor, cov: torch.Tensor, rank: int, vmat: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank regression (module docstring; Izenman 1975): the rank-r U [d_out, r] and
    D [r, d_in] that minimise tr((A - U D V) C (A - U D V)^T), for float64 A [d_out, d_in], C
    [d_in, d_in] positive definite (e.g. :func:`damped_covariance`) and V [d_in, d_in] (``vmat``;
    None for I).  U D = U_r U_r^T B with B = A C V^T (V C V^T)^-1 and U_r the top-r
    eigenvectors of N = B (V C V^T) B^T; for V = I, the activation-aware truncated SVD of
    SVD-LLM (Wang et al. 2024).  U and D each carry the square roots of the singular values."""
    if vmat is None:
        bt, pa = a.T, cov @ a.T  # B^T = A^T; C A^T
    else:
        p = vmat @ cov  # V C
        pa = p @ a.T  # V C A^T
        bt = _solve_psd(p @ vmat.T, pa)  # (V C V^T)^-1 V C A^T = B^T
    n = pa.T @ bt  # A C V^T (V C V^T)^-1 V C A^T = B (V C V^T) B^T
    s2, vecs = torch.linalg.eigh((n + n.T) / 2)  # ascending
    s2, vecs = s2.flip(0)[:rank].clamp_min(0), vecs.flip(1)[:, :rank]
    root = s2.sqrt().sqrt()  # square roots of B's singular values in the V C V^T metric
    # A direction N does not have (rank > rank of B) stays zero: its eigenvalue is rounding.
    live = s2 > s2.max() * n.shape[0] * torch.finfo(torch.float64).eps
    down = (bt @ vecs).T / torch.where(live, root, 1.0)[:, None]
    return vecs * torch.where(live, root, 0.0), down


def _solve_psd(c: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """c^-1 rhs for a symmetric positive semi-definite c [..., k, k] (a batch of them): Cholesky,
    or the pseudo-inverse where some c is numerically singular (a value map that removes a
    direction, a fit without gamma ridge)."""
    chol, info = torch.linalg.cholesky_ex(c)
    if not info.any():
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.pinv(c, hermitian=True) @ rhs


def _sum_squares(x: torch.Tensor) -> torch.Tensor:
    """sum(x^2) accumulated in float64, a slab at a time (x may be a large float32 matrix)."""
    return sum(chunk.to(torch.float64).square().sum() for chunk in x.split(512))


def damped_covariance(moments: Moments, ridge: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(C + damp I, damp) on ``device`` in float64, C [d, d] the covariance of ``moments``,
    ``damp = ridge * tr(C) / d``."""
    second = moments.second.to(device, torch.float64)
    mean = moments.mean.to(device, torch.float64)
    c = second - torch.outer(mean, mean)
    d = c.shape[0]
    damp = ridge * max(c.trace().item(), 1e-30) / d
    c.diagonal().add_(damp)
    return c, damp


def _factor(c: torch.Tensor) -> torch.Tensor:
    """L with L L^T = c (float64): Cholesky, d^3/3 flops (16x faster than ``eigh`` at d = 4096
    on this project's CPU); an eigendecomposition when c is numerically not positive definite
    (possible with ``ridge = 0`` and few calibration tokens), clamping the spectrum at zero."""
    lw, info = torch.linalg.cholesky_ex(c)
    if info.item() == 0:
        return lw
    eigval, eigvec = torch.linalg.eigh(c)
    return eigvec * eigval.clamp_min(0).sqrt()


def whitening(moments: Moments, ridge: float) -> torch.Tensor:
    """L with L L^T = C + ridge * tr(C)/d * I (C the covariance), float64 [d, d]."""
    return _factor(damped_covariance(moments, ridge, moments.second.device)[0])


def _joint_lbfgs(value_map, lw, target, layout, block, max_iter, damping, rot):
    """Minimise min_G ||G R T V L - W L||^2 over V with L-BFGS (variable projection).

    G is eliminated in closed form at every evaluation, so the optimiser only sees V and the
    reduced objective (see :func:`_objective`).  This converges far better than optimising the
    bilinear objective in (G, V) together, whose conditioning follows the spread of G.
    """
    v = value_map.clone().requires_grad_()
    best = [math.inf, value_map.clone()]
    scale = _sum_squares(target).item() or 1.0

    def closure():
        loss, grad = _objective(v.detach(), lw, target, layout, block, damping, rot)
        loss = loss / scale
        v.grad = grad / scale
        if loss.item() < best[0]:
            best[:] = [loss.item(), v.detach().clone()]
        return loss

    # L-BFGS stops early when its line search stalls on this non-convex problem; a fresh start
    # with an empty history goes on, so restart until the budget is spent or nothing improves.
    # The best point evaluated is returned: near an exact solution the last step can be worse.
    # The tolerances follow the dtype: float32 evaluations cannot resolve changes below ~1e-7.
    eps = torch.finfo(lw.dtype).eps
    done, last = 0, math.inf
    while done < max_iter:
        opt = torch.optim.LBFGS([v], lr=1, max_iter=min(50, max_iter - done), history_size=50,
                                tolerance_grad=1e-14 if eps < 1e-10 else 1e-9,
                                tolerance_change=1e-24 if eps < 1e-10 else eps * 1e-2,
                                line_search_fn="strong_wolfe")
        opt.step(closure)
        steps = opt.state[v].get("n_iter", 0)
        done += max(steps, 1)
        if steps <= 1 or best[0] > last * (1 - max(1e-9, 10 * eps)):
            break
        last = best[0]
    return best[1], done


def _alternating_start(w, lw, target, layout, block, damping, rot, *, diagonal: bool) -> torch.Tensor:
    """A starting V from cheap alternation: G by least squares, then each head's V as the
    matching diagonal block of (R T)^T G^{-1} W (averaged over a KV group's query heads; its
    diagonal for a diagonal V).

    The V step ignores the input statistics, so on its own it stops short of the true optimum,
    but it lands next to exact solutions (W = G T V) that L-BFGS from V = I can miss.  (A V step
    weighted by the input covariance was tried: on exact structures it stalls at 6e-4 relative
    error where L-BFGS from this start reaches 1e-6.)  The steps stop at the first that lowers
    the reduced loss by less than ``START_GAIN`` (relative), or after ``START_STEPS``; the best V
    seen is returned, [kv, hd, hd] (or [kv * hd] when ``diagonal``).  Each step is O(d^2 hd).
    """
    h, hd, kv = layout.num_heads, layout.head_dim, layout.num_kv_heads
    d_out, d = w.shape
    v = torch.eye(hd, dtype=w.dtype, device=w.device).repeat(kv, 1, 1)
    if diagonal:
        v = v.diagonal(dim1=1, dim2=2).reshape(-1)
    best = (math.inf, v)
    for _ in range(START_STEPS):
        loss, _ = _objective(v, lw, target, layout, block, damping, rot, grad=False)
        if loss.item() >= best[0]:
            break
        gain, best = 1 - loss.item() / best[0], (loss.item(), v)
        if gain < START_GAIN:
            break
        p = rot.project(v, lw, layout)
        g = _fit_gamma(p, target, block, _gamma_lambda(p.square().sum() / d_out, damping))
        del p
        if g.dim() == 1:
            g_inv_w = w * (g / (g * g + 1e-12 * g.abs().max() ** 2))[:, None]
        else:
            nb, b, _ = g.shape
            g_inv_w = (torch.linalg.pinv(g) @ w.reshape(nb, b, d)).reshape(d_out, d)
        r = rot.apply_t(g_inv_w)  # (R T)^T G^-1 W
        del g_inv_w
        blocks = r.reshape(h, hd, h, hd).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        v = blocks.reshape(kv, layout.group, hd, hd).mean(1)
        if diagonal:
            v = v.diagonal(dim1=1, dim2=2).reshape(-1)
        v = _normalized(v)
    return best[1]


def _normalized(value_map: torch.Tensor) -> torch.Tensor:
    """V scaled to the RMS of the identity.

    G T (c V) = (G / c) T V: the objective cannot see a global scale of V, so without this it
    drifts (to 1e15 on a tiny model), and the folded value weights lose precision.
    """
    size = value_map.shape[0] * value_map.shape[-1]  # kv * head_dim: ||I||_F^2 either way
    rms = value_map.square().sum().div(size).sqrt()
    return value_map / rms if rms > 0 else value_map


def _dense(gamma: torch.Tensor, value_map: torch.Tensor | None, layout: HeadLayout | None, shape: tuple[int, int],
           keep: torch.Tensor | None) -> torch.Tensor:
    """The d_out x d_in matrix G R T V in float64 (``shape`` = (d_out, d_in), ``value_map`` in
    its KV form, ``keep`` the kept coordinates when d_in > d_out)."""
    dev = gamma.device
    d_out, d = shape
    rot = _Rotation(d, layout.head_dim if layout is not None else 1, torch.float64, dev, d_out, keep)
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    vm = None if value_map is None else value_map.to(dev, torch.float64)
    return _apply_g(gamma.to(torch.float64), rot.project(vm, eye, layout))


def dense_map(fit: FitResult, layout: HeadLayout | None, shape: tuple[int, int],
              device: torch.device | str | None = None) -> torch.Tensor:
    """The fitted layer's linear part as one float64 matrix [d_out, d_in]: ``G R T V`` (+ ``U D V``
    with a low-rank residual), so that ``y' = dense_map(...) @ x + beta``; on ``device`` (default
    gamma's).  ``shape`` is W's, ``layout`` the one the fit was given."""
    dev = torch.device(device) if device is not None else fit.gamma.device
    d = shape[1]
    vm = None if fit.value_map is None else fit.value_map.to(dev)
    a = _dense(fit.gamma.to(dev), vm, layout, shape, None if fit.keep is None else fit.keep.to(dev))
    if fit.up is not None:
        a += _residual(fit.up.to(dev, torch.float64), fit.down.to(dev, torch.float64), _value_matrix(vm, layout, d))
    return a


def relative_error(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fit: FitResult | None,
    moments: Moments,
    layout: HeadLayout | None = None,
) -> float:
    """``sqrt(E||y' - y||^2 / E||y||^2)`` on data with the given moments, from statistics alone.

    ``fit=None`` measures the best constant predictor (the mean output), a useful floor to beat.
    Computed on the device of ``moments.second``: in float64, except the one d^3 product
    ``A S`` from ``FLOAT32_FROM`` channels on, which runs in float32 (its sum in float64; the
    error keeps about 6 significant digits).
    """
    dev = moments.second.device
    w = weight.detach().to(dev, torch.float64)
    d_out, d = w.shape
    if layout is not None and layout.num_heads * layout.head_dim != d:
        layout = None
    b = torch.zeros(d_out, dtype=torch.float64, device=dev) if bias is None else bias.detach().to(dev, torch.float64)
    mu, s = moments.mean.to(dev, torch.float64), moments.second.to(torch.float64)
    if fit is None:
        a, c = -w, w @ mu  # y' = E[y]: A = -W, beta - b = W mu
    else:
        a = dense_map(fit, layout, (d_out, d), dev) - w
        c = fit.beta.to(dev, torch.float64) - b
    err = _quadratic(a, s) + 2 * c @ (a @ mu) + c @ c
    ref = _quadratic(w, s) + 2 * b @ (w @ mu) + b @ b
    return math.sqrt(max(err.item(), 0.0) / max(ref.item(), 1e-300))


def _quadratic(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """tr(A S A^T) (float64 result)."""
    if a.shape[0] < FLOAT32_FROM:
        return (a @ s * a).sum()
    s32 = s.to(torch.float32)
    return sum(((rows.to(torch.float32) @ s32).to(torch.float64) * rows).sum() for rows in a.split(1024))
