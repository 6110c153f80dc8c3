"""Validation of an exported graph against PyTorch, on real inputs (what Optimum does).

Each output is compared as ``max |ort - torch|`` (absolute, the pass/fail criterion) and
``max |ort - torch| / max |torch|`` (relative to the output's scale, for reading: an elementwise
relative difference explodes on values near zero).

Default tolerance: ``DEFAULT_ATOL = 1e-3`` absolute.  Optimum uses 1e-4 to 3e-4 on fp32 logits
of small models; deep models have logits of 10 to 30 whose fp32 rounding differs between two
correct implementations (ONNX Runtime's fused kernels, the op's summation order) by about 1e-5
relative, which is 1e-4 to 3e-4 absolute already (1.3e-4 measured on dense SmolLM2-135M).  1e-3
leaves headroom for that and still catches any real mistake (a wrong transform, a missing
affine, a misplaced cache), which moves logits by 1e-1 or more.

Half-precision exports (``export_onnx(..., dtype="float16")``) are compared with the model run
in **float32** by PyTorch (the float16 graph gets the same inputs rounded to float16), at
``DEFAULT_ATOL_FLOAT16 = 0.125`` absolute.  Measured on SmolLM2-135M (logits up to 29-31):
ONNX Runtime's float16 graph is within 0.047 (dense) and 0.060 (converted, custom op) of float32
on one prompt, 0.073 on the validation's padded batch of two (decode step 0.018, every present
within 0.021), while PyTorch's own CPU float16 forward is 0.13 / 0.17 away from float32 on the
same prompt: PyTorch in float16 is the worse of the two, so it is not the reference.  0.125 is
1.7x the worst measured error, 8 units in the last place of a float16 logit between 16 and 32
(2^-6 = 0.016 apart).

Entries at padded positions are not compared (see ``_valid``).  Causal LMs with the cache are
checked twice: a prefill with an empty past (batch 2, the second
row left-padded), then one decode step fed the PyTorch presents, so each step's error is seen
on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hadaconv.errors import HadaconvError
from hadaconv.export.wrappers import ExportSpec, model_dtype

__all__ = ["DEFAULT_ATOL", "DEFAULT_ATOL_FLOAT16", "OutputDiff", "default_atol", "validate", "validation_feeds"]

DEFAULT_ATOL = 1e-3
DEFAULT_ATOL_FLOAT16 = 0.125


def default_atol(dtype: torch.dtype) -> float:
    """The default tolerance for an export in ``dtype`` (see the module docstring)."""
    return DEFAULT_ATOL_FLOAT16 if dtype in (torch.float16, torch.bfloat16) else DEFAULT_ATOL
PROMPTS = ("The capital of France is", "Hadamard matrices are square matrices whose entries are plus or minus one, and")


@dataclass
class OutputDiff:
    """One output's difference in one validation run."""

    step: str
    name: str
    max_abs: float
    max_rel: float

    def __str__(self) -> str:
        return f"{self.step:8s} {self.name:28s} max abs diff {self.max_abs:.3e}  max rel diff {self.max_rel:.3e}"


def _token_batch(model: Any, tokenizer: Any, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, padded (left for generation, right for encoders)."""
    if tokenizer is not None:
        side, pad = tokenizer.padding_side, tokenizer.pad_token
        try:
            tokenizer.padding_side = "left" if left else "right"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            enc = tokenizer(list(PROMPTS), return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
            if pad is None:
                tokenizer.pad_token = pad
        return enc["input_ids"], enc["attention_mask"]
    vocab = int(getattr(model.config, "vocab_size", 1000))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(min(100, vocab - 1), vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    if left:
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return ids, mask


def positions(mask: torch.Tensor, past: int = 0) -> torch.Tensor:
    """Position ids from a (past + new) attention mask, for the new tokens (as HF generate does:
    padded slots get 1)."""
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    return pos[:, past:]


def validation_feeds(spec: ExportSpec, model: Any, tokenizer: Any) -> list[tuple[str, tuple]]:
    """(step name, torch args for ``spec.module``) pairs; the decode step is built later from
    the prefill's presents."""
    if spec.kind == "module":
        return [("example", spec.args)]
    ids, mask = _token_batch(model, tokenizer, left=spec.kind == "causal-lm")
    if spec.kind in ("encoder", "classifier"):
        if "token_type_ids" in spec.input_names:  # a sentence pair: each row's second half is segment 1
            half = mask.sum(1, keepdim=True) // 2
            return [("encode", (ids, mask, (torch.arange(ids.shape[1]) >= half).long() * mask))]
        return [("encode", (ids, mask))]
    pos = positions(mask) if (spec.cache or spec.extra).get("position_ids") else None
    if spec.cache is None:
        return [("forward", (ids, mask, pos))]
    c = spec.cache
    b = ids.shape[0]
    dt = model_dtype(model)
    past = tuple((torch.zeros(b, c["num_kv_heads"], 0, c["head_dim"], dtype=dt),
                  torch.zeros(b, c["num_kv_heads"], 0, c["value_head_dim"], dtype=dt)) for _ in range(c["num_layers"]))
    return [("prefill", (ids, mask, pos, past))]


def _flat(args: tuple) -> list[Any]:
    out: list[Any] = []
    for a in args:
        if a is None:
            continue
        if isinstance(a, (tuple, list)):
            out += _flat(tuple(a))
        else:
            out.append(a)
    return out


def _valid(name: str, value: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The entries of an output that belong to real tokens.  Padded positions are left out:
    their queries may see no key at all (left padding), where two correct implementations
    legitimately disagree, and nothing downstream reads them."""
    if mask is None:
        return value
    keep = mask.astype(bool)
    if name.startswith("present.") and value.ndim == 4:  # [batch, heads, total, head_dim]
        return value.transpose(0, 2, 1, 3)[keep]
    if name in ("logits", "last_hidden_state") and value.ndim == 3:  # [batch, new, ...]
        return value[keep[:, -value.shape[1]:]]
    return value


def _run(spec: ExportSpec, session: Any, step: str, args: tuple,
         feed_dtype: torch.dtype | None) -> tuple[list[OutputDiff], tuple]:
    with torch.no_grad():
        ref = spec.module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)

    def feed(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        return (t.to(feed_dtype) if feed_dtype is not None and t.is_floating_point() else t).numpy()

    feeds = {name: feed(t) for name, t in zip(spec.input_names, _flat(args))}
    try:
        got = session.run(spec.output_names, feeds)
    except Exception as exc:
        raise HadaconvError(f"validation: ONNX Runtime failed on the {step} inputs: {str(exc).strip().splitlines()[0]}") from None
    mask = feeds.get("attention_mask") if spec.kind != "module" else None
    diffs = []
    for name, r, g in zip(spec.output_names, ref, got):
        r = r.detach().float().cpu().numpy()
        g = np.asarray(g, dtype=np.float32)
        if r.shape != g.shape:
            raise HadaconvError(f"validation: output {name} has shape {list(g.shape)} in ONNX Runtime, {list(r.shape)} in PyTorch")
        r, g = _valid(name, r, mask), _valid(name, g, mask)
        err = float(np.abs(g - r).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        diffs.append(OutputDiff(step, name, err, err / scale if scale > 0 else err))
    return diffs, ref


def validate(spec: ExportSpec, session: Any, model: Any, tokenizer: Any = None, atol: float = DEFAULT_ATOL,
             feed_dtype: torch.dtype | None = None) -> list[OutputDiff]:
    """Run every validation step in ONNX Runtime and PyTorch; return the differences, or raise
    HadaconvError naming the first output over ``atol`` (the worst one).

    ``spec`` / ``model`` are the PyTorch reference; ``feed_dtype`` (None: as the reference's)
    is the exported graph's floating precision, its floating inputs (the past) are rounded to it:
    a float16 export is checked against its float32 model (see the module docstring)."""
    diffs: list[OutputDiff] = []
    for step, args in validation_feeds(spec, model, tokenizer):
        step_diffs, ref = _run(spec, session, step, args, feed_dtype)
        diffs += step_diffs
        if step == "prefill":
            # One decode step on PyTorch's presents: the greedy next token of each row.
            ids, mask, pos, _ = args
            nxt = ref[0][:, -1].argmax(-1, keepdim=True)
            mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
            past = tuple((ref[1 + 2 * i], ref[2 + 2 * i]) for i in range(spec.cache["num_layers"]))
            pos2 = positions(mask2, mask.shape[1]) if pos is not None else None
            diffs += _run(spec, session, "decode", (nxt, mask2, pos2, past), feed_dtype)[0]
    bad = [d for d in diffs if not d.max_abs <= atol]  # `not <=` also catches NaN
    if bad:
        worst = max(bad, key=lambda d: d.max_abs if d.max_abs == d.max_abs else float("inf"))
        raise HadaconvError(
            f"validation failed: output {worst.name} ({worst.step}) differs from PyTorch by {worst.max_abs:.3e} "
            f"(max abs; relative {worst.max_rel:.3e}) > atol {atol:g}"
        )
    return diffs
