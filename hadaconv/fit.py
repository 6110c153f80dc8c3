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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hadaconv.calibrate import Moments  # re-exported: the statistics the fits consume
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

#: Widths from which the iterative part of the fit runs in float32 by default.  MEASURED_FLOAT32
FLOAT32_FROM = 2048

#: The closed-form start's alternating steps: at most START_STEPS, stopping at the first that
#: lowers the loss by less than START_GAIN (relative).  MEASURED_START
START_STEPS = 30
START_GAIN = 0.01

__all__ = ["FLOAT32_FROM", "GAMMA_RIDGE", "MODES", "FitResult", "HeadLayout", "Moments", "fit_projection", "relative_error"]


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
    """The fitted replacement: ``y' = gamma (T V x) + beta``.

    ``value_map`` is None (affine), a per-KV-channel scale [kv * head_dim] (diag) or one matrix
    per KV group [kv, head_dim, head_dim] (head), to be folded into the value projection.
    ``error`` is the relative output error on the data the fit saw.
    """

    gamma: torch.Tensor
    beta: torch.Tensor
    value_map: torch.Tensor | None
    mode: Mode
    block: int
    error: float
    iterations: int


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
    gram = pb @ pb.transpose(1, 2) + lam * torch.eye(block, dtype=p.dtype, device=p.device)
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
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> FitResult:
    """Fit ``gamma (T V x) + beta`` to ``W x + b`` under the input statistics ``moments``.

    Args:
        weight: W [d, d] (any float dtype and device).
        bias: b [d] or None.
        moments: input statistics (``Moments.identity(d)`` for a data-free fit).
        mode: "affine", "diag" or "head" (see the module docstring).
        block: output block size b of G (1 = diagonal).
        layout: head layout, required for "diag" and "head".
        ridge: damping relative to the mean eigenvalue of the input covariance.
        gamma_ridge: penalty ``lam ||G||_F^2`` on the gamma blocks, ``lam`` this fraction of the
            mean channel power of ``T V L`` (see ``GAMMA_RIDGE``; 0 turns it off).
        max_iter: L-BFGS iterations for the joint fit ("diag", "head").
        dtype: dtype of the iterative part (the d x d whitened products); the covariance, its
            factor and the returned error are float64 whatever it is.  Default: float64 below
            ``FLOAT32_FROM`` channels, float32 from there (see that constant).
        device: where the fit runs; default the device of ``moments.second``.

    Returns:
        A FitResult with float64 gamma [d] or [d/b, b, b], beta [d] and value map, on ``device``.

    Raises:
        ValueError: unknown mode, non-square W, b not dividing d, or a missing head layout.
    """
    if mode not in MODES:
        raise ValueError(f"unknown fit mode {mode!r}; choose one of {', '.join(MODES)}")
    dev = torch.device(device) if device is not None else moments.second.device
    w = weight.detach().to(dev, torch.float64)
    d = w.shape[0]
    if w.shape != (d, d):
        raise ValueError(f"the projection must be square to become a Hadamard projection, got {list(w.shape)}")
    if d % block:
        raise ValueError(f"block size {block} does not divide the width {d}")
    if mode != "affine" and (layout is None or layout.num_heads * layout.head_dim != d):
        raise ValueError(f"mode {mode!r} needs a head layout covering the width {d}")
    work = dtype or (torch.float32 if d >= FLOAT32_FROM else torch.float64)
    b = torch.zeros(d, dtype=torch.float64, device=dev) if bias is None else bias.detach().to(dev, torch.float64)
    mu = moments.mean.to(dev, torch.float64)
    cov, damp = _damped_covariance(moments, ridge, dev)
    lw = _factor(cov).to(work)  # L L^T = C + damp I
    w_work = w.to(work)
    target = w_work @ lw  # W L: the one d^3 product of the fit
    scale = target.square().sum().item() or 1.0

    value_map, iterations = None, 0
    if mode != "affine":
        # The first alternating step evaluates V = I, so the start is never worse than it.
        value_map = _alternating_start(w_work, cov.to(work), lw, target, layout, block, gamma_ridge,
                                       diagonal=mode == "diag")
        value_map, iterations = _joint_lbfgs(value_map, lw, target, layout, block, scale, max_iter, gamma_ridge)
        value_map = _normalized(value_map)

    v_full = _expand(value_map, layout, d)
    p = _transform_cols(_apply_v(v_full, lw, layout))
    gamma = _fit_gamma(p, target, block, gamma_ridge)
    residual = _apply_g(gamma, p).sub_(target)  # (G T V - W) L
    del p
    gamma = gamma.to(torch.float64)
    value_map = None if value_map is None else value_map.to(torch.float64)
    v_full = _expand(value_map, layout, d)
    a_mu = _apply_g(gamma, _transform_cols(_apply_v(v_full, mu[:, None], layout)))[:, 0] - w @ mu
    beta = b - a_mu  # b + (W - G T V) mu
    # E||y' - y||^2 = tr(A C A^T) (beta removes the mean error), and L L^T = C + damp I.
    dense = _dense(gamma, v_full, layout, d, work)
    a_norm = (dense.to(torch.float64) - w).square().sum()
    err = _sum_squares(residual) - damp * a_norm
    del residual, dense
    w_mu = w @ mu
    ref = _sum_squares(target) - damp * w.square().sum() + w_mu @ w_mu + 2 * b @ w_mu + b @ b
    error = math.sqrt(max(err.item(), 0.0) / max(ref.item(), 1e-300))
    return FitResult(gamma, beta, value_map, mode, block, error, iterations)


def _sum_squares(x: torch.Tensor) -> torch.Tensor:
    """sum(x^2) accumulated in float64, a slab at a time (x may be a large float32 matrix)."""
    return sum(chunk.to(torch.float64).square().sum() for chunk in x.split(512))


def _damped_covariance(moments: Moments, ridge: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(C + damp I, damp) in float64 with ``damp = ridge * tr(C) / d``."""
    second = moments.second.to(device, torch.float64)
    mean = moments.mean.to(device, torch.float64)
    c = second - torch.outer(mean, mean)
    d = c.shape[0]
    damp = ridge * max(c.trace().item(), 1e-30) / d
    c.diagonal().add_(damp)
    return c, damp


def _factor(c: torch.Tensor) -> torch.Tensor:
    """L with L L^T = c (float64): Cholesky, d^3/3 flops (36x faster than ``eigh`` at d = 4096
    on this project's CPU); an eigendecomposition when c is numerically not positive definite
    (possible with ``ridge = 0`` and few calibration tokens), clamping the spectrum at zero."""
    lw, info = torch.linalg.cholesky_ex(c)
    if info.item() == 0:
        return lw
    eigval, eigvec = torch.linalg.eigh(c)
    return eigvec * eigval.clamp_min(0).sqrt()


def whitening(moments: Moments, ridge: float) -> torch.Tensor:
    """L with L L^T = C + ridge * tr(C)/d * I (C the covariance), float64 [d, d]."""
    return _factor(_damped_covariance(moments, ridge, moments.second.device)[0])


def _joint_lbfgs(value_map, lw, target, layout, block, scale, max_iter, damping):
    """Minimise min_G ||G T V L - W L||^2 over V with L-BFGS (variable projection).

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
        p = _transform_cols(_apply_v(_expand(v, layout, d), lw, layout))
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
    # The tolerances follow the dtype: float32 evaluations cannot resolve changes below ~1e-7.
    tiny = torch.finfo(lw.dtype).eps
    done, last = 0, math.inf
    with torch.enable_grad():
        while done < max_iter:
            opt = torch.optim.LBFGS([v], lr=1, max_iter=min(50, max_iter - done), history_size=50,
                                    tolerance_grad=1e-14 if tiny < 1e-10 else 1e-9,
                                    tolerance_change=1e-24 if tiny < 1e-10 else tiny * 1e-2,
                                    line_search_fn="strong_wolfe")
            opt.step(closure)
            steps = opt.state[v].get("n_iter", 0)
            done += max(steps, 1)
            if steps <= 1 or best[0] > last * (1 - max(1e-9, 10 * tiny)):
                break
            last = best[0]
    return best[1], done


def _alternating_start(w, cov, lw, target, layout, block, damping, *, diagonal: bool) -> torch.Tensor:
    """A starting V from alternating steps: G by least squares, then V by least squares for that
    G with G's weighting of the outputs ignored, which decouples by KV group:

        min_V sum_h ||V_g(h) L_h - R_h L||^2,   R = T^T G^-1 W,  L_h = head h's rows of L,

    so ``V_g = (sum_h R_h C[:, h]) (sum_h C[h, h])^-1`` over the query heads h of group g (C the
    damped covariance; diagonal V: the same ratio of diagonals).  Each step costs O(d^2 head_dim).
    The steps stop when one gains less than ``START_GAIN`` of the reduced loss (or after
    ``START_STEPS``); the best V seen is returned, [kv, hd, hd] (or [kv * hd] when ``diagonal``).
    """
    h, hd, kv = layout.num_heads, layout.head_dim, layout.num_kv_heads
    d = w.shape[0]
    cov_rows = cov.reshape(h, hd, d)
    den = cov.reshape(h, hd, h, hd).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # C[h, h]
    den = den.reshape(kv, layout.group, hd, hd).sum(1)
    v = torch.eye(hd, dtype=w.dtype, device=w.device).repeat(kv, 1, 1)
    if diagonal:
        v = v.diagonal(dim1=1, dim2=2).reshape(-1)
    best = (math.inf, v)
    for _ in range(START_STEPS):
        p = _transform_cols(_apply_v(_expand(v, layout, d), lw, layout))
        g = _fit_gamma(p, target, block, damping)
        loss = _penalized_loss(g, p, target, damping).item()
        del p
        if loss < best[0]:
            gain, best = 1 - loss / best[0], (loss, v)
            if gain < START_GAIN:
                break
        else:
            break
        if g.dim() == 1:
            g_inv_w = w * (g / (g * g + 1e-12 * g.abs().max() ** 2))[:, None]
        else:
            nb, b, _ = g.shape
            g_inv_w = (torch.linalg.pinv(g) @ w.reshape(nb, b, d)).reshape(d, d)
        r = _transform_cols(g_inv_w, inverse=True)  # T^T G^-1 W
        del g_inv_w
        num = torch.bmm(r.reshape(h, hd, d), cov_rows.transpose(1, 2))  # R_h C[:, h]
        num = num.reshape(kv, layout.group, hd, hd).sum(1)
        if diagonal:
            v = (num.diagonal(dim1=1, dim2=2) / den.diagonal(dim1=1, dim2=2)).reshape(-1)
        else:
            v = torch.linalg.solve(den, num.transpose(1, 2)).transpose(1, 2)  # num den^-1
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


def _dense(gamma: torch.Tensor, v_full: torch.Tensor | None, layout: HeadLayout | None, d: int,
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The d x d matrix G T V (in ``dtype``)."""
    eye = torch.eye(d, dtype=dtype, device=gamma.device)
    v_full = None if v_full is None else v_full.to(dtype)
    return _apply_g(gamma.to(dtype), _transform_cols(_apply_v(v_full, eye, layout)))


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
    dev = moments.second.device
    w = weight.detach().to(dev, torch.float64)
    d = w.shape[0]
    b = torch.zeros(d, dtype=torch.float64, device=dev) if bias is None else bias.detach().to(dev, torch.float64)
    mu, s = moments.mean.to(dev, torch.float64), moments.second.to(torch.float64)
    if fit is None:
        a, c = -w, w @ mu  # y' = E[y]: A = -W, beta - b = W mu
    else:
        vm = None if fit.value_map is None else fit.value_map.to(dev)
        a = _dense(fit.gamma.to(dev), _expand(vm, layout, d), layout, d) - w
        c = fit.beta.to(dev, torch.float64) - b
    err = (a @ s * a).sum() + 2 * c @ (a @ mu) + c @ c
    ref = (w @ s * w).sum() + 2 * b @ (w @ mu) + b @ b
    return math.sqrt(max(err.item(), 0.0) / max(ref.item(), 1e-300))
