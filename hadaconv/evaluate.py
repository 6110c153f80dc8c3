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

from hadaconv.adapters import check_seq_len
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


#: Elements of [rows, V] the KL works on at a time: on a CPU, chunks of 1 Mi elements (4 MiB per
#: float32 temporary; 21 rows of SmolLM2's 49,152) are walked while they are still in the cache
#: instead of streaming whole [N, V] tensors through memory once per operation; a GPU wants fewer,
#: larger kernels.  benchmarks/bench_distill_step.py measures the KL alone against the unfused form.
_KL_CHUNK = {"cpu": 1 << 20}
_KL_CHUNK_OTHER = 1 << 24


class _ChunkedKL(torch.autograd.Function):
    """KL(teacher || student) of logits [N, V], a chunk of rows at a time, with its gradient.

    The gradient of ``T^2 KL / N`` with respect to the student logits has the closed form
    ``T (softmax(s / T) - softmax(t / T)) / N`` (the cross-entropy gradient with soft targets), so
    the forward computes it chunk by chunk while the chunk is in cache and keeps only that, in the
    logits' dtype.  Autograd through the unfused expression instead materialises half a dozen
    float32 [N, V] intermediates and walks each of them twice."""

    @staticmethod
    def forward(ctx, student, teacher, temperature: float):
        """student, teacher: logits [N, V], any float dtype (read as float32); returns the float32
        scalar ``T^2 KL / N``, and keeps its gradient [N, V] in the student's dtype if it needs one."""
        rows, vocab = student.shape
        step = max(1, _KL_CHUNK.get(student.device.type, _KL_CHUNK_OTHER) // vocab)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        with torch.autocast(student.device.type, enabled=False):
            for i in range(0, rows, step):
                s, t = student[i:i + step].float(), teacher[i:i + step].float()
                if temperature != 1:
                    s, t = s / temperature, t / temperature
                log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
                p_t = log_t.exp()
                total += (p_t * (log_t - log_s)).sum()
                if grad is not None:
                    grad[i:i + step] = log_s.exp_().sub_(p_t).mul_(temperature / rows)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total * (temperature**2 / rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream):
        """The kept gradient times the upstream scalar, multiplied as a Python float so that a
        bfloat16 gradient is rounded once, not scaled by a bfloat16-rounded factor."""
        (grad,) = ctx.saved_tensors
        return grad * float(upstream), None, None


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions given by logits [..., V], mean per
    token, in nats, times T^2 (so a distillation gradient's scale does not depend on T; Hinton et
    al. 2015).  A float32 scalar; differentiable in ``student`` (the teacher takes no gradient).
    Computed in float32 whatever the logits' dtype, a chunk of tokens at a time (see
    :class:`_ChunkedKL`); the gradient is stored in the student logits' dtype.

    Raises:
        InputError: the two shapes differ, or the logits are empty.
    """
    if student.shape != teacher.shape or student.numel() == 0:
        raise InputError(f"KL needs logits of one shape, not empty, got {list(student.shape)} and {list(teacher.shape)}")
    vocab = student.shape[-1]
    if not torch.is_grad_enabled():  # evaluation: compute no gradient, whatever requires_grad says
        student = student.detach()
    return _ChunkedKL.apply(student.reshape(-1, vocab), teacher.detach().reshape(-1, vocab), float(temperature))


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
    check_seq_len(model, windows.shape[1])
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None)
    low, high = int(windows.min()), int(windows.max())
    if low < 0:
        raise InputError(f"token ids must be >= 0, got {low}")
    if vocab is not None and high >= vocab:
        raise InputError(f"token ids run from {low} to {high}, outside the model's vocabulary of {vocab}")


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, *, inference: bool = True,
               progress: str | None = "perplexity", reference: nn.Module | None = None) -> Perplexity:
    """Perplexity of a causal LM on token windows [N, L] (see the module docstring).  Windows are
    moved to the model's device; the model is left in the mode it was in.  ``progress``: the
    description of a progress bar over the batches, on stderr (off a terminal, a line every 30 s
    once it has run 5 s; None: none; SmolLM2's 64 windows of 256 tokens take about 2 minutes on
    2 CPU cores).  ``reference``: a model (the
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
            :func:`perplexity` measures it), or windows longer than either model's context.
    """
    for m in (model, reference):
        check_encoder(m)
        check_seq_len(m, windows.shape[-1])
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
