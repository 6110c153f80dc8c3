"""Quality measures that work on original and converted models alike.

* Causal LMs: perplexity over fixed, non-overlapping windows of ``seq_len`` tokens (the text is
  tokenized as one stream, cut into consecutive windows, the last partial window dropped); every
  token but the first of each window is predicted from the ones before it in its window, and the
  perplexity is ``exp`` of the mean negative log-likelihood over all predicted tokens.  No
  striding, so numbers are cheap and comparable between models, if somewhat higher than with a
  sliding window.
* Encoders: the cosine between the mean-pooled embeddings of a model and a reference model,
  averaged over text windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hadaconv.errors import HadaconvError

__all__ = ["Perplexity", "embedding_cosine", "perplexity", "text_windows"]


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # predicted tokens
    windows: int


def text_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [N, seq_len] of the tokenized text."""
    ids: list[int] = []
    for start in range(0, len(text), 200_000):
        ids += tokenizer(text[start:start + 200_000], add_special_tokens=False, verbose=False)["input_ids"]
        if max_windows and len(ids) >= max_windows * seq_len:
            break
    n = len(ids) // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise HadaconvError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> Perplexity:
    """Perplexity of a causal LM on token windows (see the module docstring)."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return Perplexity(math.exp(nll / count), count, len(windows))


@torch.inference_mode()
def embedding_cosine(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean cosine similarity of mean-pooled last hidden states, model vs reference."""
    sims = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        a = model(input_ids=batch).last_hidden_state.mean(1)
        b = reference(input_ids=batch).last_hidden_state.mean(1)
        sims.append(F.cosine_similarity(a.double(), b.double(), dim=-1))
    return torch.cat(sims).mean().item()
