"""A rotation of the residual stream chosen for the Hadamard fits, and the surgery that applies it.

Pre-norm decoders with RMSNorm (the Llama family) compute exactly the same function after an
orthogonal change of basis ``h -> Q^T h`` of their residual stream: RMSNorm divides by the RMS of
``h``, which Q keeps, so once each norm's weight g is folded into the maps that read its output,
every reader ``W_in`` becomes ``W_in diag(g / s) Q``, every writer (o_proj, the MLP's
down-projection, the embedding) ``Q^T W`` and each norm's weight the constant ``s``, the power of
two nearest the RMS of its g (a constant commutes with Q; :func:`rotate_model` says why not 1).
SliceGPT (Ashkboos et al. 2024, "computational invariance") introduced this to delete directions
of the stream; QuaRot and SpinQuant rotate it to spread outliers before quantization.  hadaconv
rotates it so that the converted layers fit better.

A converted o_proj writes ``G T V x`` (:mod:`hadaconv.fit`), G block-diagonal on contiguous
output channels: each block of b outputs is served by b transform coordinates.  In the rotated
stream the layer approximates ``Q^T W`` instead of W, so each block of G serves one of d/b
orthogonal b-dimensional subspaces that Q chooses, instead of a block of coordinates.  One Q
serves every converted layer, so it is fitted to all of them:

    min over Q, G_l, V_l of   sum_l ||Q G_l T V_l L_l - W_l L_l||_F^2 / ||W_l L_l||_F^2

(C_l = L_l L_l^T the damped covariance of layer l's input: each layer's relative error in
whitened coordinates, the fit's own objective, every layer weighted alike).  Alternating
minimisation: with Q fixed, each layer's fit on ``Q^T W_l`` (:func:`hadaconv.fit.fit_projection`,
warm-started from the last value map); with the fits fixed, Q is the orthogonal Procrustes
solution (Schönemann 1966, "A generalized solution of the orthogonal Procrustes problem"):
``Q = U V^T`` from the SVD of ``K = sum_l W_l C_l M_l^T / ||W_l L_l||^2``, M_l the fitted dense map.
The Procrustes step is exact and the warm-started fits nearly so, so the objective falls step by
step; the best Q seen is kept.
Measured on SmolLM2-135M's ten least sensitive layers (benchmarks/RESULTS.md, "A rotation of the
residual stream"): the mean relative error falls from 0.50 to 0.41 in 40 iterations.

The price, on a model whose head is tied to its embedding (SmolLM2): the head reads the final
norm's output through the embedding, ``E diag(g) norm(h)``; the rotated embedding is ``E Q``, so
the final norm's weight becomes the d x d map ``Q^T diag(g / s) Q`` (:class:`MappedNorm`): d^2
parameters and multiply-adds per token (331,776 on SmolLM2, about one o_proj).  An untied head
absorbs it (``W_head diag(g / s) Q``) at no cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from hadaconv.adapters.base import ResidualStream
from hadaconv.calibrate import Moments
from hadaconv.errors import HadaconvError, InputError
from hadaconv.fit import GAMMA_RIDGE, HeadLayout, Mode, damped_covariance, dense_map, fit_projection

__all__ = ["ITERATIONS", "NOT_DATA_FREE", "NOT_STREAMED", "MappedNorm", "RotationFit", "RotationProblem",
           "added_parameters", "costs_more", "fit_rotation", "is_rotated", "map_final_norm", "mark_rotated",
           "rotate_model", "why_not_rotatable"]

#: Alternating steps of :func:`fit_rotation`: the mean error still falls by about 0.1% a step at
#: 40 on SmolLM2 (0.504 at 0, 0.433 at 10, 0.421 at 20, 0.413 at 40), at 0.3 s a layer a step.
ITERATIONS = 40

#: Why a conversion cannot rotate (the report's ``rotate_skipped``, the plan's), where the model
#: is not the reason (:func:`why_not_rotatable`).
NOT_STREAMED = "a streamed conversion holds one block at a time, and the rotation changes them all"
NOT_DATA_FREE = "a data-free fit has no statistics to fit it to"

#: Rows of the embedding rotated at a time (float64 copies of 8,192 x d).
EMBEDDING_ROWS = 8192

#: L-BFGS iterations of each warm-started refit inside the alternation (the first fit of each
#: layer runs the fit's own default).
INNER_ITERATIONS = 10


@dataclass(frozen=True)
class RotationProblem:
    """One converted layer as the rotation sees it: its dense weight W [d_out, d_in] (d_out the
    residual width), its input statistics, head layout and fit mode (as :func:`fit_projection`
    takes them)."""

    weight: torch.Tensor
    moments: Moments
    layout: HeadLayout | None
    mode: Mode = "head"


@dataclass
class RotationFit:
    """The fitted rotation: ``q`` [d, d] float64 orthogonal (the stream becomes ``Q^T h``);
    ``before`` and ``after`` each layer's relative whitened error on the damped covariance with
    Q = I and with ``q`` (from the fits inside the alternation: the first with the fit's default
    budget, later ones warm-started, so not the conversion's own fits); ``step`` the Procrustes
    step that gave ``q`` (0: the identity)."""

    q: torch.Tensor
    before: list[float]
    after: list[float]
    step: int

    def gain(self) -> float:
        """The relative drop of the summed squared error, ``1 - sum(after^2) / sum(before^2)``."""
        return 1 - sum(e * e for e in self.after) / max(sum(e * e for e in self.before), 1e-300)


def fit_rotation(problems: Sequence[RotationProblem], *, block: int = 1, ridge: float = 1e-3,
                 gamma_ridge: float = GAMMA_RIDGE, rank: int = 0, iterations: int = ITERATIONS,
                 step: Callable[[], None] | None = None) -> RotationFit:
    """The Q that minimises the summed relative fit errors of ``problems`` (module docstring).

    The fit options are those of :func:`hadaconv.fit.fit_projection`.  ``step`` is called after
    each of the ``iterations`` rounds of fits that follow the first, unrotated ones (a progress
    bar).  Runs in float64 on the statistics' device; each round costs one fit and two d^3
    products per layer.  The best Q
    seen is returned (the identity where no step lowers the objective).

    Raises:
        InputError: as :func:`fit_projection`, or layers of unequal output width.
    """
    widths = {p.weight.shape[0] for p in problems}
    if len(widths) != 1:
        raise InputError(f"a rotation needs layers writing one residual stream, got output widths {sorted(widths)}")
    dev = problems[0].moments.second.device

    def operands(p: RotationProblem) -> tuple[torch.Tensor, torch.Tensor]:  # made again each round: no d^2 copies kept
        return p.weight.detach().to(dev, torch.float64), damped_covariance(p.moments, ridge, dev)[0]

    ref = [torch.trace(w @ c @ w.T) for w, c in map(operands, problems)]
    q = torch.eye(widths.pop(), dtype=torch.float64, device=dev)
    starts: list[torch.Tensor | None] = [None] * len(problems)
    best: tuple[float, torch.Tensor, list[float], int] = (math.inf, q, [], 0)
    before: list[float] = []
    for it in range(iterations + 1):
        k, errors = torch.zeros_like(q), []
        for i, p in enumerate(problems):
            w, cov = operands(p)
            fit = fit_projection(q.T @ w, None, p.moments, mode=p.mode, block=block, layout=p.layout, ridge=ridge,
                                 gamma_ridge=gamma_ridge, rank=rank, start=starts[i],
                                 max_iter=None if starts[i] is None else INNER_ITERATIONS)
            starts[i] = fit.value_map
            m = dense_map(fit, p.layout, tuple(w.shape), dev)
            a = q @ m - w
            errors.append(math.sqrt(max(torch.trace(a @ cov @ a.T).item(), 0.0) / max(ref[i].item(), 1e-300)))
            k += w @ cov @ m.T / ref[i]
        before = before or errors
        total = sum(e * e for e in errors)
        if total < best[0]:
            best = (total, q, errors, it)
        if step is not None and it > 0:
            step()
        if it < iterations:
            u, _, vt = torch.linalg.svd(k)
            q = u @ vt
    return RotationFit(best[1], before, best[2], best[3])


class MappedNorm(nn.Module):
    """A final RMSNorm whose weight became a d x d map: ``y = norm(x) @ M^T`` (``norm`` with
    a constant weight, ``map`` an ``nn.Linear(d, d, bias=False)``), where a head tied to the embedding
    cannot absorb ``M = Q^T diag(g / s) Q`` (module docstring)."""

    def __init__(self, norm: nn.Module, d: int) -> None:
        super().__init__()
        self.norm = norm
        weight = norm.weight
        # Uninitialised: its values are always assigned (rotate_model, or the load of a saved one).
        self.map = nn.Linear(d, d, bias=False, device="meta", dtype=weight.dtype).to_empty(device=weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map(self.norm(x))


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_rms_norm(module: nn.Module | None) -> bool:
    """An RMSNorm with a weight [d] and nothing else learned (its class says RMSNorm: LayerNorm
    subtracts the mean, which a rotation does not keep; Gemma's 1 + w is another adapter's)."""
    return (module is not None and "RMSNorm" in type(module).__name__ and isinstance(getattr(module, "weight", None),
            nn.Parameter) and getattr(module, "bias", None) is None)


def why_not_rotatable(model: nn.Module, stream: ResidualStream | None, adapter: str = "") -> str:
    """Why ``model``'s residual stream cannot be rotated, in words for a note; "" where it can:
    an adapter that describes the stream (``stream``; ``adapter`` its name, for the note where
    there is none), RMSNorms, dense readers and writers (``nn.Linear``: not already converted),
    an embedding and a head."""
    if stream is None and adapter.startswith("target:"):  # a Llama model may be behind --target
        return ("--target converts layers by name, and that adapter does not know the residual stream's norms and "
                "maps (without --target a Llama-family model is rotated)")
    if stream is None:
        return ("only Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM) can be rotated so far"
                + (f", and this is {'an' if adapter[:1] in 'aeiou' else 'a'} {adapter} model" if adapter else ""))
    if isinstance(_get(model, stream.final_norm), MappedNorm):
        return "its residual stream is already rotated"
    if not isinstance(_get(model, stream.embedding), nn.Embedding) or not isinstance(_get(model, stream.head),
                                                                                  nn.Linear):
        return "it has no embedding and head where its adapter expects them (a model without an LM head)"
    blocks = _get(model, stream.blocks)
    for block in [] if blocks is None else blocks:
        for norm, readers in stream.reads:
            if not _is_rms_norm(_get(block, norm)):
                return f"{norm} is not an RMSNorm (a rotation keeps RMSNorm's output, not LayerNorm's)"
            if not all(type(_get(block, r)) is nn.Linear for r in readers):
                return f"{', '.join(readers)} are not all dense Linear layers"
        if not all(type(_get(block, path)) is nn.Linear for path in stream.writes):  # exactly: not a converted layer
            return f"{', '.join(stream.writes)} are not all dense Linear layers (some are converted already)"
    if blocks is None or not _is_rms_norm(_get(model, stream.final_norm)):
        return "its blocks or final norm are not where its adapter expects them"
    return ""


def added_parameters(model: nn.Module, stream: ResidualStream) -> int:
    """Parameters :func:`rotate_model` adds to ``model`` (rotatable: :func:`why_not_rotatable`):
    the final norm's d x d map where the head is tied to the embedding, else 0."""
    embedding = model.get_submodule(stream.embedding)
    tied = model.get_submodule(stream.head).weight is embedding.weight
    return embedding.weight.shape[1] ** 2 if tied else 0


def costs_more(added: int, removed: int, layers: int) -> str:
    """Why a conversion does not rotate where the final norm's map (``added`` parameters) would
    cost at least what its ``layers`` converted layers remove (``removed``): a smaller model is
    the point, and such a rotation would leave it no smaller; "" where it pays."""
    if added < removed:
        return ""
    return (f"the final norm's map it needs would add {added:,} parameters, no fewer than the {removed:,} that "
            f"{layers} converted layer{'s' if layers != 1 else ''} remove{'s' if layers == 1 else ''} (it pays where "
            "more layers are converted)")


@torch.no_grad()
def rotate_model(model: nn.Module, stream: ResidualStream, q: torch.Tensor) -> None:
    """Rotate ``model``'s residual stream by ``q`` [d, d] (orthogonal) in place: the same function,
    up to rounding, with each norm's weight folded into its readers (module docstring).  A head
    tied to the embedding keeps the tie, and the final norm becomes a :class:`MappedNorm`.  The
    arithmetic runs in float64; each weight keeps its dtype and device.

    Each norm keeps s, the power of two nearest the RMS of its weight g, as a constant weight, and
    its readers take ``g / s``, not g: the same function, and each reader keeps about its scale
    (SmolLM2's first q_proj: weights of RMS 0.28, 0.56 after).  AdamW steps each weight by about
    the learning rate whatever its size, so a reader shrunk by g (to RMS 0.018 there, whose g has
    RMS 0.04) would take 16x larger relative steps in distillation than its teacher's did: ten
    minutes of it ended 11-14% worse in perplexity (benchmarks/RESULTS.md, "Distilling a
    rotated model").

    Raises:
        HadaconvError: :func:`why_not_rotatable` says why not.
    """
    why = why_not_rotatable(model, stream)
    if why:
        raise HadaconvError(f"cannot rotate the residual stream: {why}")

    def put(param: nn.Parameter, value: torch.Tensor) -> None:
        param.copy_(value.to(param.dtype))

    def rotated(weight: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:  # W diag(g) Q
        w = weight.double()
        return (w if g is None else w * g) @ q.to(weight.device)

    embedding, head = model.get_submodule(stream.embedding), model.get_submodule(stream.head)
    tied = head.weight is embedding.weight
    table = embedding.weight
    for start in range(0, table.shape[0], EMBEDDING_ROWS):  # a float64 copy of the whole table could be GBs
        put(table[start:start + EMBEDDING_ROWS], rotated(table[start:start + EMBEDDING_ROWS]))
    for block in model.get_submodule(stream.blocks):
        for norm, readers in stream.reads:
            g = block.get_submodule(norm).weight
            s = _scale(g)
            for path in readers:
                reader = block.get_submodule(path)
                put(reader.weight, rotated(reader.weight, g.double() / s))
            g.fill_(s)
        for path in stream.writes:
            writer = block.get_submodule(path)
            qt = q.to(writer.weight.device).T
            put(writer.weight, qt @ writer.weight.double())
            if writer.bias is not None:
                put(writer.bias, qt @ writer.bias.double())
    final = model.get_submodule(stream.final_norm)
    s = _scale(final.weight)
    g = final.weight.double() / s
    if tied:
        mapped = MappedNorm(final, q.shape[0])
        qd = q.to(g.device)
        put(mapped.map.weight, qd.T @ torch.diag(g) @ qd)
        model.set_submodule(stream.final_norm, mapped)
    else:
        put(head.weight, rotated(head.weight, g))
    final.weight.fill_(s)
    mark_rotated(model)


def _scale(g: torch.Tensor) -> float:
    """The power of two nearest the RMS of a norm's weight g (in log scale), 1 where g is all
    zeros: exact in every float dtype, so that a norm stored in bfloat16 keeps exactly the constant
    its readers were divided by (an RMS rounded to bfloat16 would scale them all by up to 0.2%),
    and within a factor of sqrt(2) of the RMS, which is all that keeping the readers' scale asks."""
    rms = g.double().pow(2).mean().sqrt().item()
    return 2.0 ** round(math.log2(rms)) if rms > 0 and math.isfinite(rms) else 1.0


def map_final_norm(model: nn.Module, stream: ResidualStream) -> None:
    """Give a rebuilt model the :class:`MappedNorm` a rotated one was saved with (its weights are
    loaded after), so that :func:`hadaconv.load` can assign the stored ``map``."""
    final = model.get_submodule(stream.final_norm)
    if not isinstance(final, MappedNorm):
        model.set_submodule(stream.final_norm, MappedNorm(final, final.weight.shape[0]))


def mark_rotated(model: nn.Module) -> None:
    """Mark ``model`` as one whose residual stream is rotated (:func:`is_rotated`): set by
    :func:`rotate_model`, and by :func:`hadaconv.load` for a folder that records it."""
    model.hadaconv_rotated = True


def is_rotated(model: nn.Module) -> bool:
    """Whether ``model``'s residual stream was rotated: its hidden states are not the original's,
    and the shapes of its norms' weights sit in the maps that read them (what distillation's
    hidden-state comparisons must know)."""
    return bool(getattr(model, "hadaconv_rotated", False))
