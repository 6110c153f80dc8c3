"""Text sampled from the model itself: calibration and distillation data of the model's own domain.

A conversion fitted on one kind of text (the default corpus is Shakespeare) keeps that kind of
text well and others badly: the least-squares fit only sees the activations the calibration
text produces.  Text the original model generates from scratch covers what the model has
learned to produce, whatever it was trained on, and needs no dataset (the "data-free"
distillation of LLM-QAT, Liu et al. 2023).

Each sequence starts from one token drawn uniformly from the vocabulary (special tokens
excluded), so sequences do not all open the same way, then samples the model's next-token
distribution at the given temperature, with the KV cache.  The result is plain text, written
as JSONL (``{"text": ...}`` per line), which every ``--calib`` / ``--data`` option reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hadaconv.atomic import atomic_file
from hadaconv.errors import HadaconvError
from hadaconv.progress import progress as progress_bar

__all__ = ["check_output", "sample_texts", "write_jsonl"]


def _start_tokens(tokenizer: Any, count: int, generator: torch.Generator, limit: int | None = None) -> torch.Tensor:
    """``count`` ordinary token ids, uniformly (below ``limit``, the model's vocabulary size)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    size = len(tokenizer) if limit is None else min(len(tokenizer), limit)
    vocab = [i for i in range(size) if i not in special]
    if not vocab:
        raise HadaconvError("the tokenizer has no ordinary tokens to start sampling from")
    pick = torch.randint(len(vocab), (count,), generator=generator)
    return torch.tensor(vocab)[pick]


@torch.inference_mode()
def sample_texts(
    model: nn.Module,
    tokenizer: Any,
    *,
    samples: int = 128,
    seq_len: int = 256,
    batch_size: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Sample ``samples`` sequences of ``seq_len`` tokens from a causal LM; return them decoded.

    Args:
        model: a Hugging Face causal LM (its ``forward`` takes ``input_ids`` and a ``cache``).
        tokenizer: its tokenizer (decodes the samples; gives the vocabulary to start from).
        temperature: softmax temperature of the sampling (1 = the model's own distribution).
        seed: the same seed, model and settings give the same text.
    """
    if temperature <= 0:
        raise HadaconvError(f"temperature must be > 0, got {temperature}")
    if samples < 1 or seq_len < 2:
        raise HadaconvError("sampling needs at least one sequence of at least 2 tokens")
    from transformers import DynamicCache

    from hadaconv.adapters import find_adapter

    kind = find_adapter(model).kind(model)
    if kind != "causal-lm":
        raise HadaconvError(f"sampling text needs a causal LM, not a {kind!r} model")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    starts = _start_tokens(tokenizer, samples, gen, getattr(getattr(model, "config", None), "vocab_size", None))
    texts: list[str] = []
    batches = range(0, samples, batch_size)
    with progress_bar(len(batches) * (seq_len - 1), "sampling text from the model", progress) as step:
        for b0 in batches:
            ids = starts[b0:b0 + batch_size, None].to(device)
            out, cache = [ids], DynamicCache()
            for _ in range(seq_len - 1):
                res = model(input_ids=ids, cache=cache, use_cache=True)
                cache = res.cache
                probs = torch.softmax(res.logits[:, -1].float() / temperature, dim=-1).cpu()
                ids = torch.multinomial(probs, 1, generator=gen).to(device)
                out.append(ids)
                step()
            texts += tokenizer.batch_decode(torch.cat(out, dim=1).cpu(), skip_special_tokens=True)
    return [t for t in texts if t.strip()]


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any sampling) on an output file that cannot or may not be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise HadaconvError(f"{path} already exists (use --overwrite to replace it)")
    if not path.parent.is_dir():
        raise HadaconvError(f"the folder {path.parent} does not exist")
    return path


def write_jsonl(texts: list[str], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write texts as JSONL (one ``{"text": ...}`` per line), atomically."""
    path = check_output(path, overwrite)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path
