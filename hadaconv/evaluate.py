"""Quality measures that work on original and converted models alike.

* Causal LMs: perplexity over fixed, non-overlapping windows of ``seq_len`` tokens (the text is
  tokenized as one stream, cut into consecutive windows, the last partial window dropped:
  :func:`hadaconv.calibrate.text_windows`); every token but the first of each window is
  predicted from the ones before it in its window, and the perplexity is ``exp`` of the mean
  negative log-likelihood over all predicted tokens.  No striding, so numbers are cheap and
  comparable between models, if somewhat higher than with a sliding window.
* KL(teacher || student) of next-token distributions, per token: what sensitivity ranking and
  distillation both use.
* Encoders: the cosine between the mean-pooled embeddings of a model and a reference model,
  averaged over text windows.

Every measure runs under ``torch.inference_mode`` by default; ``inference=False`` uses
``torch.no_grad`` instead (FSDP2 reuses its unsharded parameter buffers in the training forward,
and inference tensors cannot be updated there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hadaconv.calibrate import text_windows
from hadaconv.errors import InputError, check_int
from hadaconv.progress import progress as progress_bar

__all__ = ["Perplexity", "check_encoder", "embedding_cosine", "kl_divergence", "lm_logits", "perplexity", "text_windows"]


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # predicted tokens
    windows: int
    #: KL(reference || model) per token position, nats, where a reference model was given.
    kl: float | None = None

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per predicted token, nats."""
        return math.log(self.perplexity)


def _grad_mode(inference: bool):
    return torch.inference_mode() if inference else torch.no_grad()


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] of a causal LM on token windows (no padding, no KV cache kept)."""
    return model(input_ids=ids, use_cache=False).logits


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions given by logits [..., V], mean per
    token, in nats, times T^2 (so a distillation gradient's scale does not depend on T)."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def _check_windows(model: nn.Module, windows, batch_size) -> None:
    """What the loop would otherwise fail on deep inside the model (an embedding lookup out of
    range is an IndexError, or a device assert on CUDA)."""
    if not isinstance(windows, torch.Tensor) or windows.dtype.is_floating_point or windows.dtype.is_complex \
            or windows.dtype == torch.bool:
        raise InputError(f"perplexity needs token ids as an integer tensor [N, L], got "
                         f"{getattr(windows, 'dtype', type(windows).__name__)}")
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise InputError(f"perplexity needs token windows [N >= 1, L >= 2], got shape {list(windows.shape)}")
    check_int("batch_size", batch_size, 1)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None)
    low, high = int(windows.min()), int(windows.max())
    if low < 0:
        raise InputError(f"token ids must be >= 0, got {low}")
    if vocab is not None and high >= vocab:
        raise InputError(f"token ids run from {low} to {high}, outside the model's vocabulary of {vocab}")


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, *, inference: bool = True,
               progress: str | None = None, reference: nn.Module | None = None) -> Perplexity:
    """Perplexity of a causal LM on token windows [N, L] (see the module docstring).  Windows are
    moved to the model's device; the model is left in the mode it was in.  ``progress``: the
    description of a progress bar over the batches (None: none).  ``reference``: a model (the
    teacher) whose KL to this one, per token position, is measured in the same pass
    (:attr:`Perplexity.kl`); it must sit on the same device, in eval mode.

    Raises:
        InputError: ``windows`` is not an integer tensor [N >= 1, L >= 2] of ids the model's
            embedding holds, or ``batch_size`` is not a positive integer.
    """
    _check_windows(model, windows, batch_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count, kl, positions = 0.0, 0, 0.0, 0
    starts = range(0, len(windows), batch_size)
    try:
        with _grad_mode(inference), progress_bar(len(starts), progress or "", progress is not None) as step:
            for i in starts:
                batch = windows[i:i + batch_size].to(device)
                logits = lm_logits(model, batch).float()
                target = batch[:, 1:]
                nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       reduction="sum").item()
                count += target.numel()
                if reference is not None:
                    kl += kl_divergence(logits, lm_logits(reference, batch)).item() * batch.numel()
                    positions += batch.numel()
                step()
    finally:
        model.train(was_training)
    return Perplexity(math.exp(nll / count), count, len(windows), kl / positions if reference is not None else None)


def check_encoder(model: nn.Module) -> None:
    """Raise InputError for a model that generates text: a causal LM returns logits, not the
    hidden states :func:`embedding_cosine` compares (:func:`perplexity` measures it)."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        raise InputError(f"embedding cosine compares text encoders, and {type(model).__name__} is a causal LM: "
                         "measure its perplexity instead (without a reference)")


def embedding_cosine(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                     *, inference: bool = True) -> float:
    """Mean cosine similarity of mean-pooled last hidden states, model vs reference (encoders).

    Raises:
        InputError: a model that generates text (a causal LM returns logits, not hidden states:
            :func:`perplexity` measures it).
    """
    for m in (model, reference):
        check_encoder(m)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sims = []
    try:
        with _grad_mode(inference):
            for i in range(0, len(windows), batch_size):
                batch = windows[i:i + batch_size].to(device)
                a = model(input_ids=batch).last_hidden_state.mean(1)
                b = reference(input_ids=batch).last_hidden_state.mean(1)
                sims.append(F.cosine_similarity(a.double(), b.double(), dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(sims).mean().item()
