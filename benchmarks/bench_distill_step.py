"""One distillation step on SmolLM2, the current implementation against the one it replaced, in the same run.

A step of ``hadaconv distill`` (the teacher's forward, the student's forward, the KL of their
next-token distributions, the backward pass, gradient clipping and the AdamW update) on a batch
of 4 windows of 256 tokens, three ways, alternating (:func:`common.alternate`), under bfloat16
autocast where the CPU multiplies it (distill's own default; ``--no-bf16`` for float32):

* ``before``: the KL as one autograd expression over the whole [tokens, vocabulary] logits
  (``log_softmax`` of both, ``exp``, the weighted difference; hadaconv up to 2026-12-04) and the
  per-tensor AdamW loop (PyTorch's CPU default);
* ``chunked KL``: :func:`hadaconv.evaluate.kl_divergence`, which computes the KL and its
  gradient a few rows at a time, with the per-tensor AdamW;
* ``chunked KL + fused AdamW``: what ``distill`` runs now.

Then the two parts alone, alternating the same way: the KL's forward and backward on the step's
logits, and one AdamW update of the student's 135M parameters, per-tensor loop against fused.

The student is SmolLM2 with every layer converted (fitted on 16 windows of Shakespeare: a step
costs the same whatever the fit's quality).  Prints seconds (median, min-max) and each
speed-up over ``before`` with its 95% bootstrap interval.

    python benchmarks/bench_distill_step.py [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, median_spread, ratio, smollm2_path  # noqa: E402

from hadaconv.calibrate import load_texts, text_windows  # noqa: E402
from hadaconv.convert import ConvertConfig, convert  # noqa: E402
from hadaconv.device import native_bf16  # noqa: E402
from hadaconv.evaluate import kl_divergence  # noqa: E402
from hadaconv.io import load_model  # noqa: E402
from hadaconv.progress import out as console  # noqa: E402


def unfused_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``hadaconv.evaluate.kl_divergence`` as it was up to 2026-12-04: one expression, autograd through it."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def adamw(params: list[torch.Tensor], fused: bool) -> torch.optim.AdamW:
    """PyTorch's fused AdamW, or its per-tensor loop (the CPU default before distill chose fused).
    A tiny learning rate: the weights barely move, so every repeat times the same arithmetic."""
    return torch.optim.AdamW(params, lr=1e-7, fused=fused or None, foreach=False if not fused else None)


def step_fn(student, teacher, ids, kl, fused: bool, bf16: bool):
    """A function running one distillation step and returning its seconds."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = adamw(params, fused)

    def once() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                target = teacher(input_ids=ids, use_cache=False).logits
            loss = kl(student(input_ids=ids, use_cache=False).logits, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return once


def kl_fn(logits: torch.Tensor, target: torch.Tensor, kl):
    """A function timing one KL forward and backward on fixed logits; returns its seconds."""
    def once() -> float:
        x = logits.detach().requires_grad_()
        t0 = time.perf_counter()
        kl(x, target).backward()
        return time.perf_counter() - t0
    return once


def adamw_fn(params: list[torch.Tensor], fused: bool):
    """A function timing one AdamW update of ``params`` (their gradients fixed); returns its seconds."""
    opt = adamw(params, fused)

    def once() -> float:
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0
    return once


def measure(variants: dict, repeats: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up: first-touch allocations, the optimizers' state
        fn()
    return alternate(variants, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=10, help="steps per variant, alternating")
    ap.add_argument("--no-bf16", action="store_true", help="float32 steps (distill's default on CPUs without bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = not args.no_bf16 and native_bf16(torch.device("cpu"))

    loaded = load_model(str(smollm2_path()))
    teacher, tok = loaded.model.eval(), loaded.tokenizer
    student = copy.deepcopy(teacher)
    convert(student, tok, ConvertConfig(calib=["shakespeare"], samples=16, sensitivity=False, progress=False))
    student.train()
    ids = text_windows(tok, "\n\n".join(load_texts(["shakespeare"])), 256, 4)
    groups = {}
    groups["one step"] = measure({
        "before": step_fn(student, teacher, ids, unfused_kl, fused=False, bf16=bf16),
        "chunked KL": step_fn(student, teacher, ids, kl_divergence, fused=False, bf16=bf16),
        "chunked KL + fused AdamW": step_fn(student, teacher, ids, kl_divergence, fused=True, bf16=bf16),
    }, args.repeats)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = student(input_ids=ids, use_cache=False).logits
        target = teacher(input_ids=ids, use_cache=False).logits
    groups["the KL alone (forward and backward)"] = measure(
        {"before": kl_fn(logits, target, unfused_kl), "chunked KL": kl_fn(logits, target, kl_divergence)}, args.repeats)
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    groups["the AdamW update alone"] = measure(
        {"before": adamw_fn(params, fused=False), "fused AdamW": adamw_fn(params, fused=True)}, args.repeats)

    table = Table(title=f"Distillation, SmolLM2-135M, 4 x 256 tokens, {'bfloat16 autocast' if bf16 else 'float32'}, "
                        f"{args.threads} thread(s), {args.repeats} alternating repeats")
    for col in ("what", "variant", "seconds, median (min-max, n)", "speed-up over before (95% CI)"):
        table.add_column(col, justify="right")
    for what, times in groups.items():
        for name, values in times.items():
            speed, half = ratio(times["before"], values)
            table.add_row(what if name == "before" else "", name, median_spread(values, 3),
                          "-" if name == "before" else f"{speed:.2f}x (+-{100 * half:.1f}%)")
    console.print(table)
    console.print(f"machine: {machine()}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
