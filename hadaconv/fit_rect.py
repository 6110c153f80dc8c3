"""Least-squares fits of a *rectangular* Hadamard projection (W is d_out x d_in, d_in != d_out).

:func:`hadaconv.fit.fit_projection` hands rectangular weights to :func:`fit_projection` here.
This is the float64 CPU form of the fit as it stood before :mod:`hadaconv.fit` gained its
large-width (float32, device) path; the two should become one (the geometry R below is all
that differs); until then its helpers repeat the old square ones.

The square objective, the modes (affine, diag, head), variable projection and the gamma ridge
are as described in :mod:`hadaconv.fit`.

Rectangular projections (W is d_out x d_in, as in Qwen3, Gemma, Mistral-Nemo).  The transform
runs on n = max(d_in, d_out) and a fixed, parameter-free map R (:class:`Geometry`) joins it to
the other side:

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

Everything above carries over with T replaced by R T: the whitened objective is
``||G R T V L - W L||_F^2`` (W L is d_out x d_in), the best beta ``b + (W - G R T V) mu``, the
closed-form G solves per output block over the rows of R T V L, and the alternating start
uses the adjoint ``(R T)^T = T^T R^T`` (scatter into n, inverse transform, first d_in rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hadaconv.calibrate import Moments
from hadaconv.errors import InputError
from hadaconv.fit import GAMMA_RIDGE, MODES, FitResult, HeadLayout, Mode
from hadaconv.ops.transform import hadamard_transform_columns


__all__ = ["SELECTION", "SELECTIONS", "Geometry", "fit_projection", "relative_error", "select_coordinates"]


# --------------------------------------------------------------------------- rectangular geometry


@dataclass(frozen=True)
class Geometry:
    """How the n x n transform meets a d_out x d_in projection: ``R T`` is d_out x d_in.

    * square (d_in = d_out = n): R = I;
    * d_in < d_out = n: ``R T = T P`` with P = [I; 0] the zero-padding of x to n channels;
    * d_in = n > d_out: ``R T = S T`` with S the rows ``keep`` of the identity (ascending).
    """

    d_in: int
    d_out: int
    keep: torch.Tensor | None = None  # [d_out] int64, only when d_in > d_out

    @classmethod
    def of(cls, weight: torch.Tensor, keep: torch.Tensor | None = None) -> "Geometry":
        d_out, d_in = weight.shape
        if d_in > d_out:
            keep = torch.arange(d_out) if keep is None else keep.to(torch.long)
            if keep.shape != (d_out,):
                raise InputError(f"keep must list {d_out} coordinates, got {list(keep.shape)}")
        else:
            keep = None
        return cls(d_in, d_out, keep)

    @property
    def n(self) -> int:
        return max(self.d_in, self.d_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``R T z`` for z [d_in, k] -> [d_out, k]."""
        if self.d_in < self.n:
            z = torch.cat([z, z.new_zeros(self.n - self.d_in, z.shape[1])])
        y = _transform_cols(z)
        return y[self.keep] if self.keep is not None else y

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(R T)^T y`` for y [d_out, k] -> [d_in, k]."""
        if self.keep is not None:
            y = y.new_zeros(self.n, y.shape[1]).index_copy(0, self.keep, y)
        return _transform_cols(y, inverse=True)[: self.d_in]


#: Rules for the d_out transform coordinates kept when d_in > d_out (:func:`select_coordinates`).
SELECTIONS = ("first", "input-energy", "output-energy")
#: Default rule, chosen by measurement (benchmarks/RESULTS.md, "Rectangular projections").
SELECTION = "output-energy"


def select_coordinates(weight: torch.Tensor, moments: Moments, rule: str = SELECTION) -> torch.Tensor:
    """The d_out of the n = d_in transform coordinates z = T x to keep, ascending (int64 [d_out]).

    * ``first``: coordinates 0..d_out-1 (no statistics);
    * ``input-energy``: the largest ``Var[z_j]``, the diagonal of T C T^T (C the covariance);
    * ``output-energy``: the largest ``Var[z_j] ||W T^T e_j||^2``: the energy coordinate j
      carries into the dense layer's output ``W x = (W T^T) z``, counting each coordinate alone.
    """
    d_out, d_in = weight.shape
    if rule not in SELECTIONS:
        raise InputError(f"unknown selection rule {rule!r}; choose one of {', '.join(SELECTIONS)}")
    if rule == "first":
        return torch.arange(d_out)
    c = moments.covariance.to(torch.float64)  # the mean is beta's job
    energy = _transform_cols(_transform_cols(c).T).diagonal()  # diag(T C T^T)
    if rule == "output-energy":
        wt = _transform_cols(weight.detach().to(torch.float64).T)  # T W^T = (W T^T)^T: row j is column j
        energy = energy * wt.square().sum(1)
    return torch.sort(torch.topk(energy, d_out).indices).values


# --------------------------------------------------------------------------- building blocks


def _expand(value_map: torch.Tensor | None, layout: HeadLayout | None, d: int) -> torch.Tensor | None:
    """Per-query-head form of V: [d] for diag, [heads, hd, hd] for head."""
    if value_map is None:
        return None
    assert layout is not None
    if value_map.dim() == 1:
        return value_map.reshape(layout.num_kv_heads, 1, layout.head_dim).expand(
            -1, layout.group, -1).reshape(d)
    return value_map.repeat_interleave(layout.group, dim=0)


def _apply_v(v_full: torch.Tensor | None, z: torch.Tensor, layout: HeadLayout | None) -> torch.Tensor:
    """V @ z for z [d, k] (V block-diagonal by head)."""
    if v_full is None:
        return z
    if v_full.dim() == 1:
        return v_full[:, None] * z
    h, hd = layout.num_heads, layout.head_dim
    return torch.bmm(v_full, z.reshape(h, hd, -1)).reshape(z.shape)


def _apply_g(gamma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """G @ z for z [d, k] (G diagonal or block-diagonal)."""
    if gamma.dim() == 1:
        return gamma[:, None] * z
    nb, b, _ = gamma.shape
    return torch.bmm(gamma, z.reshape(nb, b, -1)).reshape(z.shape)


def _transform_cols(z: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """T @ z (T^T @ z if inverse): the orthonormal Hadamard transform of each column."""
    return hadamard_transform_columns(z, 1.0 / math.sqrt(z.shape[0]), inverse)


def _fit_gamma(p: torch.Tensor, target: torch.Tensor, block: int, damping: float) -> torch.Tensor:
    """argmin_G ||G p - target||_F^2 + lam ||G||_F^2 for G diagonal / block-diagonal (p, target:
    [d, k]), ``lam = _gamma_lambda(p, damping)``."""
    d = p.shape[0]
    lam = _gamma_lambda(p, damping)
    if block == 1:
        return (p * target).sum(1) / ((p * p).sum(1) + lam)
    nb = d // block
    pb, tb = p.reshape(nb, block, -1), target.reshape(nb, block, -1)
    gram = pb @ pb.transpose(1, 2) + lam * torch.eye(block, dtype=p.dtype)
    cross = tb @ pb.transpose(1, 2)
    # G_i gram_i = cross_i  ->  G_i = cross_i gram_i^{-1} (gram symmetric)
    return torch.linalg.solve(gram, cross.transpose(1, 2)).transpose(1, 2)


def _gamma_lambda(p: torch.Tensor, damping: float) -> torch.Tensor:
    """``damping`` times the mean channel power of p: a ridge relative to p's own scale, so the
    objective stays invariant under V -> c V, G -> G / c (which the fit cannot see)."""
    power = p.square().sum() / p.shape[0]
    return damping * power + (power == 0)


def _penalized_loss(g: torch.Tensor, p: torch.Tensor, target: torch.Tensor, damping: float) -> torch.Tensor:
    """||G p - target||^2 + lam ||G||^2: the objective the damped gamma minimises."""
    return (_apply_g(g, p) - target).square().sum() + _gamma_lambda(p, damping) * g.square().sum()


def whitening(moments: Moments, ridge: float) -> torch.Tensor:
    """L with L L^T = C + ridge * tr(C)/d * I (C the covariance)."""
    c = moments.covariance
    d = c.shape[0]
    damp = ridge * max(c.trace().item(), 1e-30) / d
    c = c + damp * torch.eye(d, dtype=c.dtype)
    eigval, eigvec = torch.linalg.eigh(c)
    # An eigendecomposition instead of Cholesky: C can be numerically semi-definite when the
    # calibration set is small, and clamping keeps the square root real.
    return eigvec * eigval.clamp_min(damp).sqrt()


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
    max_iter: int = 40,
    selection: str = SELECTION,
) -> FitResult:
    """Fit ``gamma (R T V x) + beta`` to ``W x + b`` under the input statistics ``moments``.

    Args:
        weight: W [d_out, d_in] (any float dtype; computed in float64); max(d_in, d_out) must
            be a Hadamard order (checked by the caller).
        bias: b [d_out] or None.
        moments: statistics of the d_in inputs (``Moments.identity(d_in)`` for a data-free fit).
        mode: "affine", "diag" or "head" (see the module docstring).
        block: output block size b of G (1 = diagonal); must divide d_out.
        layout: head layout over the d_in inputs, required for "diag" and "head".
        ridge: damping relative to the mean eigenvalue of the input covariance.
        gamma_ridge: penalty ``lam ||G||_F^2`` on the gamma blocks, ``lam`` this fraction of the
            mean channel power of ``R T V L`` (see ``GAMMA_RIDGE``; 0 turns it off).
        max_iter: L-BFGS iterations for the joint fit ("diag", "head").
        selection: for d_in > d_out, the rule choosing the kept coordinates
            (:func:`select_coordinates`); ignored otherwise.

    Raises InputError (a ValueError) for a block that does not divide d_out or a layout not
    covering d_in.
    """
    if mode not in MODES:
        raise InputError(f"unknown fit mode {mode!r}; choose one of {', '.join(MODES)}")
    w = weight.detach().to(torch.float64)
    d_out, d = w.shape
    if block < 1 or d_out % block:
        raise InputError(f"block size {block} does not divide the output width {d_out}")
    if mode != "affine" and (layout is None or layout.num_heads * layout.head_dim != d):
        raise InputError(f"mode {mode!r} needs a head layout covering the input width {d}")
    keep = select_coordinates(w, moments, selection) if d > d_out else None
    geo = Geometry.of(w, keep)
    b = torch.zeros(d_out, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    mu = moments.mean.to(torch.float64)

    lw = whitening(moments, ridge)  # [d, d]
    target = w @ lw  # W L
    scale = target.square().sum().item() or 1.0

    def gamma_for(v_full: torch.Tensor | None) -> torch.Tensor:
        return _fit_gamma(geo.forward(_apply_v(v_full, lw, layout)), target, block, gamma_ridge)

    gamma = gamma_for(None)
    value_map, iterations = None, 0
    if mode != "affine":
        kv, hd = layout.num_kv_heads, layout.head_dim
        eye = torch.eye(hd, dtype=torch.float64).repeat(kv, 1, 1)
        starts = [eye, _alternating_start(w, gamma_for, layout, geo)]
        if mode == "diag":
            starts = [v.diagonal(dim1=1, dim2=2).reshape(-1) for v in starts]
        value_map = min(starts, key=lambda v: _reduced_loss(v, lw, target, layout, block, gamma_ridge, geo))
        value_map, iterations = _joint_lbfgs(value_map, lw, target, layout, block, scale, max_iter,
                                             gamma_ridge, geo)
        value_map = _normalized(value_map)
        gamma = gamma_for(_expand(value_map, layout, d))

    v_full = _expand(value_map, layout, d)
    dense = _dense(gamma, v_full, layout, geo)
    beta = b + (w - dense) @ mu
    result = FitResult(gamma, beta, value_map, mode, block, float("nan"), iterations, geo.keep)
    result.error = relative_error(w, bias, result, moments, layout)
    return result


def _joint_lbfgs(value_map, lw, target, layout, block, scale, max_iter, damping, geo):
    """Minimise min_G ||G R T V L - W L||^2 over V with L-BFGS (variable projection).

    G is eliminated in closed form at every evaluation, so the optimiser only sees V and the
    reduced objective; by the envelope theorem its gradient is the partial gradient at the
    optimal G.  This converges far better than optimising the bilinear objective in (G, V)
    together, whose conditioning follows the spread of G.
    """
    d = lw.shape[0]
    v = value_map.clone().requires_grad_()
    best = [math.inf, value_map.clone()]

    def closure():
        opt.zero_grad()
        p = geo.forward(_apply_v(_expand(v, layout, d), lw, layout))
        with torch.no_grad():
            g = _fit_gamma(p, target, block, damping)
        loss = _penalized_loss(g, p, target, damping) / scale
        loss.backward()
        if loss.item() < best[0]:
            best[:] = [loss.item(), v.detach().clone()]
        return loss

    # L-BFGS stops early when its line search stalls on this non-convex problem; a fresh start
    # with an empty history goes on, so restart until the budget is spent or nothing improves.
    # The best point evaluated is returned: near an exact solution the last step can be worse.
    done, last = 0, math.inf
    with torch.enable_grad():
        while done < max_iter:
            opt = torch.optim.LBFGS([v], lr=1, max_iter=min(50, max_iter - done), history_size=50,
                                    tolerance_grad=1e-14, tolerance_change=1e-24,
                                    line_search_fn="strong_wolfe")
            opt.step(closure)
            steps = opt.state[v].get("n_iter", 0)
            done += max(steps, 1)
            if steps <= 1 or best[0] > last * (1 - 1e-9):
                break
            last = best[0]
    return best[1], done


def _reduced_loss(v, lw, target, layout, block, damping, geo) -> float:
    p = geo.forward(_apply_v(_expand(v, layout, lw.shape[0]), lw, layout))
    return _penalized_loss(_fit_gamma(p, target, block, damping), p, target, damping).item()


def _alternating_start(w, gamma_for, layout, geo, steps: int = 30) -> torch.Tensor:
    """A starting V from cheap alternation: G by least squares, then each head's V as the
    matching diagonal block of (R T)^T G^{-1} W (averaged over a KV group's query heads).

    The V step ignores the input statistics, so on its own it stops short of the true optimum,
    but it lands next to exact solutions (W = G T V) that L-BFGS from V = I can miss.
    """
    h, hd, kv = layout.num_heads, layout.head_dim, layout.num_kv_heads
    d = geo.d_in
    v = torch.eye(hd, dtype=torch.float64).repeat(kv, 1, 1)
    for _ in range(steps):
        g = gamma_for(_expand(v, layout, d))
        if g.dim() == 1:
            g_inv_w = w * (g / (g * g + 1e-12 * g.abs().max() ** 2))[:, None]
        else:
            nb, b, _ = g.shape
            g_inv_w = (torch.linalg.pinv(g) @ w.reshape(nb, b, d)).reshape(geo.d_out, d)
        r = geo.adjoint(g_inv_w)  # (R T)^T G^-1 W
        diag_blocks = r.reshape(h, hd, h, hd).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        v = _normalized(diag_blocks.reshape(kv, layout.group, hd, hd).mean(1))
    return v


def _normalized(value_map: torch.Tensor) -> torch.Tensor:
    """V scaled to the RMS of the identity.

    G T (c V) = (G / c) T V: the objective cannot see a global scale of V, so without this it
    drifts (to 1e15 on a tiny model), and the folded value weights lose precision.
    """
    size = value_map.shape[0] * value_map.shape[-1]  # kv * head_dim: ||I||_F^2 either way
    rms = value_map.square().sum().div(size).sqrt()
    return value_map / rms if rms > 0 else value_map


def _dense(gamma: torch.Tensor, v_full: torch.Tensor | None, layout: HeadLayout | None, geo: Geometry) -> torch.Tensor:
    """The d_out x d_in matrix G R T V."""
    eye = torch.eye(geo.d_in, dtype=torch.float64)
    return _apply_g(gamma.to(torch.float64), geo.forward(_apply_v(v_full, eye, layout)))


def relative_error(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fit: FitResult | None,
    moments: Moments,
    layout: HeadLayout | None = None,
) -> float:
    """``sqrt(E||y' - y||^2 / E||y||^2)`` on data with the given moments, from statistics alone.

    ``fit=None`` measures the best constant predictor (the mean output), a useful floor to beat.
    """
    w = weight.detach().to(torch.float64)
    d_out, d = w.shape
    b = torch.zeros(d_out, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    mu, s = moments.mean.to(torch.float64), moments.second.to(torch.float64)
    if fit is None:
        a, c = -w, w @ mu  # y' = E[y]: A = -W, beta - b = W mu
    else:
        geo = Geometry.of(w, fit.keep)
        a = _dense(fit.gamma, _expand(fit.value_map, layout, d), layout, geo) - w
        c = fit.beta.to(torch.float64) - b
    err = (a @ s * a).sum() + 2 * c @ (a @ mu) + c @ c
    ref = (w @ s * w).sum() + 2 * b @ (w @ mu) + b @ b
    return math.sqrt(max(err.item(), 0.0) / max(ref.item(), 1e-300))
