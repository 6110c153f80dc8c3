"""Error compensation in a dense neighbour: refit a map that writes into the residual stream so
that the converted block's output matches the teacher's, at no run-time cost.

After a block's attention output projection has been replaced, the block's output ``s`` differs
from the teacher's ``t``.  A dense map of the same block that writes into the residual stream
after the attention (the MLP down-projection ``y = W u + b``) can absorb part of that error: with
``z = t - s + W u + b`` (what the map would have to produce for the block to match the teacher),
the refit solves the ridge least squares

    min_W'  sum ||z - W' u - b'||^2 + lam ||[W' b'] - [W b]||_F^2

pulled towards the original weights (closed form ``[W' b'] = (Z U^T + lam W0)(U U^T + lam I)^-1``
with ``u`` augmented by a constant 1 when there is a bias).  ``lam = alpha * tr(U U^T) / D`` is
scale-free; ``alpha`` is chosen per layer on held-out windows from a grid (by generalized
cross-validation on the calibration tokens when there are none), and the original map is kept
when no ``alpha`` beats it there.  Same shapes, same parameter count: nothing changes at
run time.  The method is the layer-wise output-matching refit of OBC/GPTQ-style post-training
compression (Frantar et al. 2022), applied to a neighbour of the changed layer, as the
error-compensation step of SliceGPT/"Compensated" pruning does.

Pure math on accumulated sums: no model objects.  The loop that feeds it is
:func:`hadaconv.blockwise.convert_blockwise`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ALPHAS", "Compensation", "RidgeSums", "refit"]

#: Ridge strengths tried per layer, relative to the mean input power ``tr(U U^T) / D``.
ALPHAS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass
class RidgeSums:
    """Sums over tokens (float64) of one split: ``uu = sum u u^T`` [D', D'], ``zu = sum z u^T``
    [out, D'], ``zz = sum ||z||^2``, ``scale = sum ||t - x||^2`` (the teacher block's own change of
    the residual stream, the yardstick errors are reported against).  ``D' = D + 1`` when a bias
    is fitted (u augmented by 1).

    While fewer than ``D'`` tokens have been added they are kept as rows (``u_rows`` [N, D'],
    ``z_rows`` [N, out]) and ``uu`` stays None: then :func:`refit` solves in the N x N token
    space and no D' x D' matrix is formed.  That is what keeps compensation of a wide MLP within
    memory: at a 14,336-wide down-projection the Gram matrix alone is 1.6 GB in float64 and its
    eigendecomposition needs about three times that, where 2,048 calibration tokens as rows are
    0.2 GB.  Past ``D'`` tokens the rows are folded into the sums, the cheaper form from then on.
    """

    uu: torch.Tensor | None = None
    zu: torch.Tensor | None = None
    zz: float = 0.0
    scale: float = 0.0
    count: int = 0
    bias: bool = False
    u_rows: list[torch.Tensor] = field(default_factory=list)
    z_rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def as_rows(self) -> bool:
        """Whether the tokens are held as rows (fewer than D' of them so far)."""
        return self.uu is None

    def add(self, u: torch.Tensor, z: torch.Tensor, change: torch.Tensor | None = None) -> None:
        """Add tokens: map inputs ``u`` [N, D], targets ``z`` [N, out], teacher change [N, out]."""
        u = u.reshape(-1, u.shape[-1]).to(torch.float64)
        z = z.reshape(-1, z.shape[-1]).to(torch.float64)
        if self.bias:
            u = torch.cat([u, torch.ones(len(u), 1, dtype=u.dtype, device=u.device)], 1)
        self.zz += z.square().sum().item()
        if change is not None:
            self.scale += change.to(torch.float64).square().sum().item()
        self.count += len(u)
        if self.as_rows and self.count < u.shape[1]:
            self.u_rows.append(u)
            self.z_rows.append(z)
            return
        if self.as_rows:  # the rows now outnumber the columns: fold them into the sums
            self.uu = torch.zeros(u.shape[1], u.shape[1], dtype=torch.float64, device=u.device)
            self.zu = torch.zeros(z.shape[1], u.shape[1], dtype=torch.float64, device=u.device)
            for old_u, old_z in zip(self.u_rows, self.z_rows):
                self._fold(old_u, old_z)
            self.u_rows, self.z_rows = [], []
        self._fold(u, z)

    def _fold(self, u: torch.Tensor, z: torch.Tensor) -> None:
        self.uu.addmm_(u.T, u)
        self.zu.addmm_(z.T, u)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens held as rows: ``u`` [N, D'], ``z`` [N, out] (only while :attr:`as_rows`)."""
        return torch.cat(self.u_rows), torch.cat(self.z_rows)

    def power(self) -> float:
        """The mean input power ``tr(U U^T) / D'``."""
        if self.as_rows:
            return sum(u.square().sum().item() for u in self.u_rows) / self.u_rows[0].shape[1]
        return self.uu.diagonal().sum().item() / self.uu.shape[0]

    def error(self, w: torch.Tensor) -> float:
        """``sum ||z - w u||^2`` for an (augmented) weight ``w`` [out, D'], from the sums alone."""
        w = w.to(torch.float64)
        if self.as_rows:
            return sum((z - u @ w.T).square().sum().item() for u, z in zip(self.u_rows, self.z_rows))
        return max(0.0, self.zz - 2 * (w * self.zu).sum().item() + (w @ self.uu * w).sum().item())

    def relative(self, w: torch.Tensor) -> float:
        """The error of ``w`` relative to the teacher block's change: ``sqrt(error / scale)``."""
        return (self.error(w) / max(self.scale, 1e-300)) ** 0.5


@dataclass
class Compensation:
    """The refit map (``weight`` [out, D], ``bias`` [out] or None, float64), the chosen alpha
    (None: the original kept) and the held-out relative block errors before and after."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    alpha: float | None
    error_before: float
    error_after: float
    tried: dict[float, float] = field(default_factory=dict)


def _augmented(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    w = w.to(torch.float64)
    return torch.cat([w, b.to(torch.float64)[:, None]], 1) if b is not None else w


def refit(w: torch.Tensor, b: torch.Tensor | None, calib: RidgeSums, heldout: RidgeSums | None = None,
          alphas: tuple[float, ...] = ALPHAS) -> Compensation:
    """The ridge refit of ``y = w u + b`` (``w`` [out, D]) to the targets summed in ``calib``.

    Each ``alpha`` is scored on ``heldout``; without held-out tokens, on ``calib`` by generalized
    cross-validation (Golub, Heath & Wahba 1979: the calibration error divided by
    ``(1 - df / N)^2``, ``df = sum e / (e + lam)`` the fit's degrees of freedom, N the tokens),
    since the plain calibration error always favours the weakest ridge: with fewer tokens than
    inputs that interpolates them (a 448-token refit of SmolLM2's 1536-wide down-projection grew
    its largest weight to 309).  The best wins if it beats the original map there, else the
    original is kept.  The errors reported are these scores (relative, see :meth:`RidgeSums.relative`).
    Solved in the D' x D' input space from the sums, or in the N x N token space while ``calib``
    holds its N < D' tokens as rows (the same minimiser: ``(U^T U + lam I)^-1 U^T`` equals
    ``U^T (U U^T + lam I)^-1``).  Raises ValueError when ``calib`` holds no tokens or its bias
    setting differs from ``b``'s.
    """
    if calib.count == 0:
        raise ValueError("no tokens to refit on")
    if calib.bias != (b is not None):
        raise ValueError("the sums were collected with a different bias setting than the map has")
    score = heldout if heldout is not None and heldout.count else calib
    w0 = _augmented(w, b)
    solver = (_TokenSpace if calib.as_rows else _InputSpace)(w0, calib, score)
    power = calib.power()
    before = score.relative(w0)
    best, best_err, best_alpha, tried = w0, before, None, {}
    for alpha in alphas:
        err = solver.error(alpha * power)
        if score is calib:  # GCV: sqrt of the squared error's (1 - df/N)^-2
            left = 1 - (solver.evals / (solver.evals + alpha * power)).sum().item() / calib.count
            err = err / left if left > 0 else float("inf")
        tried[alpha] = err
        if err < best_err:
            best, best_err, best_alpha = solver.scored, err, alpha
    if best is None:  # the token space scores without forming W: form the winner's once
        best = solver.weight(best_alpha * power)
    weight, bias = (best[:, :-1], best[:, -1]) if b is not None else (best, None)
    return Compensation(weight, bias, best_alpha, before, best_err, tried)


class _InputSpace:
    """``W = (Z U^T + lam W0)(U U^T + lam I)^-1`` in the eigenbasis of ``U U^T``: one
    eigendecomposition serves every ``lam``."""

    def __init__(self, w0: torch.Tensor, calib: RidgeSums, score: RidgeSums) -> None:
        evals, self.vecs = torch.linalg.eigh(calib.uu)
        self.evals = evals.clamp_min(0)
        self.rhs, self.w0v, self.score = calib.zu @ self.vecs, w0 @ self.vecs, score
        self.scored: torch.Tensor | None = None  # the weight error() last scored, kept for the winner

    def weight(self, lam: float) -> torch.Tensor:
        return ((self.rhs + lam * self.w0v) / (self.evals + lam)) @ self.vecs.T

    def error(self, lam: float) -> float:
        self.scored = self.weight(lam)
        return self.score.relative(self.scored)


class _TokenSpace:
    """``W = W0 + R^T (U U^T + lam I)^-1 U`` with the residual ``R = Z - U W0^T`` [N, out] and
    ``U U^T = Q diag(e) Q^T`` [N, N]: one N x N eigendecomposition serves every ``lam``, and
    held-out rows are scored without forming W (their fit is ``Uh U^T Q diag(1/(e+lam)) Q^T R``)."""

    def __init__(self, w0: torch.Tensor, calib: RidgeSums, score: RidgeSums) -> None:
        u, z = calib.rows()
        evals, q = torch.linalg.eigh(u @ u.T)
        self.evals = evals.clamp_min(0)
        self.rq = (z - u @ w0.T).T @ q  # [out, N]
        self.qu = q.T @ u               # [N, D']
        self.w0, self.score, self.scored = w0, score, None
        if score.as_rows:
            uh, zh = score.rows()
            self.rh, self.m = zh - uh @ w0.T, uh @ self.qu.T  # [Nh, out], [Nh, N]

    def weight(self, lam: float) -> torch.Tensor:
        return self.w0 + (self.rq / (self.evals + lam)) @ self.qu

    def error(self, lam: float) -> float:
        if not self.score.as_rows:
            self.scored = self.weight(lam)
            return self.score.relative(self.scored)
        self.scored = None
        fit = (self.m / (self.evals + lam)) @ self.rq.T
        return ((self.rh - fit).square().sum().item() / max(self.score.scale, 1e-300)) ** 0.5
