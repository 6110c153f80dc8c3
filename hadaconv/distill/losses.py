"""Distillation losses.  Every loss is a mean over tokens (or windows), so that scaling it by a
micro-batch's share of the global batch and summing gives the global batch's loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hadaconv.evaluate import kl_divergence
from hadaconv.rotation import is_rotated

__all__ = ["Outputs", "encoder_loss", "forward", "hidden_loss", "kl_loss", "relative_mse", "stream_rotation"]


@dataclass
class Outputs:
    main: torch.Tensor  # logits [B, L, V] of a causal LM, last hidden state [B, L, d] of an encoder
    hidden: tuple[torch.Tensor, ...] | None  # every layer's hidden state, when asked for


def forward(model: nn.Module, ids: torch.Tensor, kind: str, hidden: bool = False) -> Outputs:
    """Run a causal LM or an encoder on token windows (no padding, no cache)."""
    kwargs = {"use_cache": False} if kind == "causal-lm" else {}
    out = model(input_ids=ids, output_hidden_states=hidden, **kwargs)
    main = out.logits if kind == "causal-lm" else out.last_hidden_state
    return Outputs(main, tuple(out.hidden_states) if hidden else None)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``||s - t||^2 / ||t||^2``: scale-free, so layers and models of any width weigh alike."""
    s, t = student.float(), teacher.float()
    return (s - t).square().mean() / t.square().mean().clamp_min(1e-12)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, times T^2: :func:`hadaconv.evaluate.kl_divergence`."""
    return kl_divergence(student, teacher, temperature)


def encoder_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative MSE of the last hidden states plus ``1 - cos`` of the mean-pooled embeddings
    (windows hold no padding, so the mean is over all positions)."""
    cos = F.cosine_similarity(student.float().mean(1), teacher.float().mean(1), dim=-1)
    return relative_mse(student, teacher) + (1 - cos).mean()


def stream_rotation(student: nn.Module, teacher: nn.Module) -> torch.Tensor | None:
    """For a student whose residual stream convert rotated (:func:`hadaconv.rotation.is_rotated`),
    the orthogonal Q [d, d] (float32) with its hidden states ``h Q`` for the teacher's ``h``: its
    input embedding is the teacher's times Q (and stays near it in training), so Q is the
    orthogonal Procrustes solution ``polar(E_t^T E_s)`` on the two input embeddings.  None for a
    student that is not rotated, or whose embedding does not match the teacher's in shape."""
    if not is_rotated(student) or not hasattr(teacher, "get_input_embeddings"):
        return None
    e_s, e_t = student.get_input_embeddings().weight.detach(), teacher.get_input_embeddings().weight.detach()
    if e_s.shape != e_t.shape:
        return None
    cross = (e_t.float().T @ e_s.to(e_t.device).float()).double()  # d x d: the V x d tables are not copied in float64
    u, _, vt = torch.linalg.svd(cross)
    return (u @ vt).float()


def hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                rotation: torch.Tensor | None = None) -> torch.Tensor:
    """Mean relative MSE of the layers' hidden states (the embedding output, index 0, skipped).

    Summed over all tokens, so in models whose first token carries a massive activation it is
    mostly that token's (after SmolLM2's blocks 11-27: 84-99% of a 256-token window's squared
    norm).  KL plus a per-token variant (each token's own relative error) at weight 1 trained no
    better than KL alone in 60 steps (benchmarks/RESULTS.md, "The first token's massive
    activation").  ``rotation``: :func:`stream_rotation`'s Q, applied to the teacher's states; the
    last state is left out then (Hugging Face's is the final norm's output, whose weight the
    rotation moved into an untied head: it is not the teacher's times Q there)."""
    pairs = list(zip(student[1:], teacher[1:]))
    if rotation is not None:
        pairs = [(s, t @ rotation.to(t.device, t.dtype)) for s, t in pairs[:-1]]
    return sum(relative_mse(s, t) for s, t in pairs) / max(1, len(pairs))
