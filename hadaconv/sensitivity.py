"""How much converting each layer alone moves the model's output: the ranking behind
``--max-layers`` / ``--max-loss``.

For causal LMs the measure is KL(original || converted) of the next-token distributions, per
token, in nats (:func:`hadaconv.evaluate.kl_divergence`); for other models the relative squared
error of the output.  Converting layer i cannot change what the blocks before it compute, so
their outputs from the reference pass are replayed instead of recomputed: on a deep model this
halves the cost.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from hadaconv.adapters import AttentionLayer, block_list, holds
from hadaconv.evaluate import kl_divergence
from hadaconv.fit import FitResult
from hadaconv.progress import progress
from hadaconv.swap import apply_fit

__all__ = ["METRIC", "Probe", "metric", "model_output", "output_divergences", "sensitivities"]

METRIC = {"causal-lm": "KL(original || converted) per token, nats"}
OTHER_METRIC = "relative squared error of the output"


def metric(kind: str) -> str:
    """The name of what :func:`sensitivities` measures for a model of ``kind``, for reports."""
    return METRIC.get(kind, OTHER_METRIC)


def model_output(model: nn.Module, batch: dict, kind: str) -> torch.Tensor:
    """Logits of a causal LM, else the last hidden state (or the plain tensor a module returns)."""
    out = model(**batch)
    if kind == "causal-lm":
        return out.logits
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> float:
    if kind == "causal-lm":
        return kl_divergence(student, teacher).item()
    return ((student - teacher).square().sum() / teacher.square().sum().clamp_min(1e-30)).item()


def _position(blocks: list[nn.Module], layer: AttentionLayer) -> int:
    return next((pos for pos, blk in enumerate(blocks) if holds(blk, layer)), 0)


class Probe:
    """The original model's outputs on the ``probe`` batches, and every block's, recorded once,
    to measure one layer at a time against (:meth:`divergence`).  Holds them until it is
    dropped: for a causal LM windows x seq_len x vocab logits, plus windows x seq_len x d hidden
    states per block, in the model's dtype (4 windows of 256 tokens of SmolLM2 in float32:
    0.2 GB of logits, 0.07 GB of hidden states)."""

    def __init__(self, model: nn.Module, layers: list[AttentionLayer], probe: list[dict], kind: str) -> None:
        if kind == "causal-lm":
            probe = [{**b, "use_cache": False} for b in probe]  # replayed blocks write no KV cache
        self.model, self.batches, self.kind = model, probe, kind
        found = block_list(model, layers)
        self.blocks = list(found[1]) if found else None
        self.replay = [dict() for _ in probe]  # per probe batch: block position -> its output

        def recorder(store, pos):
            return lambda module, args, output: store.__setitem__(pos, output)

        with torch.inference_mode():
            self.reference = []
            for batch, store in zip(probe, self.replay):
                hooks = [blk.register_forward_hook(recorder(store, pos)) for pos, blk in enumerate(self.blocks or [])]
                try:
                    self.reference.append(model_output(model, batch, kind))
                finally:
                    for h in hooks:
                        h.remove()
        # Each batch's divergence is a mean over its positions: weighted by them, a last, shorter
        # batch counts as much per token as the others.
        self.weights = [ref.numel() / max(1, ref.shape[-1]) for ref in self.reference]

    def divergence(self, layer: AttentionLayer, fit: FitResult) -> float:
        """The output's divergence with ``layer`` alone taking ``fit``, mean per position over the
        probe: for causal LMs KL(original || converted) in nats per token, else the relative
        squared error of the output; the model is restored after.  The blocks before ``layer``'s
        are replayed from the record, so they may have changed since (the block loop measures each
        layer just before its own block is converted); the blocks from it on must still be the
        original's."""
        skip = self.blocks[:_position(self.blocks, layer)] if self.blocks else []
        undo = apply_fit(layer, fit)
        try:
            div = [_replayed(self.model, batch, ref, store, skip, self.kind)
                   for batch, ref, store in zip(self.batches, self.reference, self.replay)]
        finally:
            undo()
        return sum(d * w for d, w in zip(div, self.weights)) / sum(self.weights)


def sensitivities(model: nn.Module, layers: list[AttentionLayer], fits: dict[int, FitResult], probe: list[dict],
                  kind: str, show: bool = True) -> list[float]:
    """One value per layer of ``layers``: the output's divergence on the ``probe`` batches (mean
    per position over all of them) when that layer alone takes its fit (the model is restored
    after each)."""
    original = Probe(model, layers, probe, kind)
    values = []
    with progress(len(layers), "sensitivity", show) as step:
        for layer in layers:
            values.append(original.divergence(layer, fits[layer.index]))
            step()
    return values


def output_divergences(model: nn.Module, blocks: list[nn.Module], batches: list[dict], finals: list,
                       students: dict[int, list[torch.Tensor]], kind: str, show: bool = True) -> dict[int, float]:
    """Each student's output divergence from the original's, mean per position over ``batches``
    (as :meth:`Probe.divergence` measures it), from last-block outputs alone: ``finals[b]`` is
    what the original's last block returned for batch b, ``students[key][b]`` a student's hidden
    state in its place.  Every block replays that output, so of the model only what runs
    outside the blocks (embedding, final norm, head) must hold weights: a streamed conversion
    measures its layers this way (:mod:`hadaconv.stream`)."""
    sums, total = dict.fromkeys(students, 0.0), 0.0
    with progress(len(batches) * (len(students) + 1), "sensitivity", show) as step:
        for b, (batch, final) in enumerate(zip(batches, finals)):
            with _replaying(blocks, dict.fromkeys(range(len(blocks)), final)), torch.inference_mode():
                ref = model_output(model, batch, kind)
            step()
            weight = ref.numel() / max(1, ref.shape[-1])
            for key, hidden in students.items():
                out = _with_hidden(final, hidden[b])
                with _replaying(blocks, dict.fromkeys(range(len(blocks)), out)), torch.inference_mode():
                    sums[key] += _divergence(model_output(model, batch, kind), ref, kind) * weight
                step()
            total += weight
    return {key: value / total for key, value in sums.items()}


def _with_hidden(output, hidden: torch.Tensor):
    """A block's output with its hidden state replaced (a block returns it alone or first)."""
    return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden


def _replayed(model, batch, ref, store, skip, kind) -> float:
    with _replaying(skip, store), torch.inference_mode():
        return _divergence(model_output(model, batch, kind), ref, kind)


@contextmanager
def _replaying(blocks: list[nn.Module], store: dict):
    """Each of ``blocks`` (by position) returns ``store[pos]`` instead of computing."""
    # An instance may already carry its own forward (accelerate's hooks do).
    own = [vars(blk).get("forward") for blk in blocks]
    try:
        for pos, blk in enumerate(blocks):
            blk.forward = (lambda out: lambda *a, **k: out)(store[pos])
        yield
    finally:
        for blk, fwd in zip(blocks, own):
            if fwd is None:
                vars(blk).pop("forward", None)  # back to the class's forward
            else:
                blk.forward = fwd
