"""How long torch's idle OpenMP threads spin, on a quiet machine and a shared one (SmolLM2, CPU).

torch's CPU build runs its parallel regions on GNU OpenMP (libgomp).  A thread that finishes
its share of a region busy-waits for the next one, 300,000 spins by default, before it sleeps
(GOMP_SPINCOUNT in the libgomp manual).  On a machine whose cores another program also uses,
the spinning threads take the cores from the threads with work to do; short regions, as in the
KV-cached sampling loop of ``hadaconv sample`` (one token per step), then wait on descheduled
threads at every step.  ``hadaconv``'s CLI sets ``GOMP_SPINCOUNT`` (where the user has not) before
torch loads; this script measures what that setting costs on a quiet machine and buys on a
shared one.

For each setting (the default, i.e. the variable unset, and the values of ``--spin``), a fresh
process (libgomp reads the variable once, when it loads) runs, on SmolLM2-135M-Instruct:

* ``sample``: ``hadaconv.sample.sample_texts`` of 16 sequences of 128 tokens (the decode loop
  every first ``convert`` runs), in tokens/s;
* ``forward``: one forward pass over 4 windows of 256 tokens (calibration, evaluation: large
  matrix products), in seconds.

It does so on the quiet machine and again next to a competing process (two threads multiplying
1024 x 1024 matrices without pause, as another torch job would), the settings alternated
(:func:`common.alternate`), and prints each median with its spread and its ratio to the default
with a 95% bootstrap interval.

    python benchmarks/bench_spin.py [--threads 2] [--repeats 3] [--spin 10000]

``--ort BUNDLE`` measures ONNX Runtime's own spinning instead (its session config
``session.intra_op.allow_spinning`` on and off; ONNX Runtime has no spin count in between):
greedy decode of 48 tokens at batch 1, 5 alternating runs each, quiet and shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, median_spread, ratio  # noqa: E402

#: What the competing process runs: another torch program keeping ``threads`` cores busy.
COMPETITOR = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(1024, 1024)
while True:
    a = (a @ a).clamp_(-1, 1)
"""

#: What one measured process runs (the model loads before the clock starts).
WORKLOAD = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
from common import smollm2_path
from hadaconv.io import load_model
from hadaconv.sample import sample_texts
torch.set_num_threads(int(sys.argv[1]))
lm = load_model(str(smollm2_path()))
model, tok = lm.model.eval(), lm.tokenizer
t = time.perf_counter()
sample_texts(model, tok, samples=16, seq_len=128, progress=False)
tokens_s = 16 * 127 / (time.perf_counter() - t)
ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(input_ids=ids)
    t = time.perf_counter()
    model(input_ids=ids)
forward_s = time.perf_counter() - t
print(json.dumps({"sample": tokens_s, "forward": forward_s}))
"""


def _environment() -> dict[str, str]:
    """This environment without the caller's own spin settings."""
    return {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}


def measure(spin: str | None, threads: int) -> dict[str, float]:
    """One fresh process under ``GOMP_SPINCOUNT=spin`` (None: unset): its two measurements."""
    env = _environment()
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    done = subprocess.run([sys.executable, "-c", WORKLOAD, str(threads), str(Path(__file__).resolve().parent)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def competing(condition: str, threads: int) -> Iterator[None]:
    """Nothing for "quiet"; the competing process for "shared", killed on leaving."""
    if condition != "shared":
        yield
        return
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(threads)], env=_environment())
    try:
        time.sleep(2)
        yield
    finally:
        competitor.kill()
        competitor.wait()


def run(condition: str, settings: dict[str, str | None], args) -> dict[str, list[dict]]:
    """Every setting ``args.repeats`` times, alternated, quiet or next to the competitor."""
    results: dict[str, list[dict]] = {name: [] for name in settings}

    def one(name: str):
        def call() -> float:
            results[name].append(measure(settings[name], args.threads))
            print(f"  {condition}, {name}: {results[name][-1]}", flush=True)
            return results[name][-1]["forward"]
        return call

    with competing(condition, args.threads):
        alternate({name: one(name) for name in settings}, repeats=args.repeats)
    return results


def run_ort(bundle: str, args) -> None:
    """ONNX Runtime's intra-op spinning on and off: greedy decode of 48 tokens at batch 1 from
    ``bundle``, 5 alternating runs each, quiet and next to the competitor."""
    from hadaconv.export.bundle import open_bundle
    from hadaconv.generate import generate

    sessions = {v: open_bundle(bundle, config_entries={"session.intra_op.allow_spinning": v}) for v in ("1", "0")}
    print("\n| session.intra_op.allow_spinning | machine | decode, tokens/s | x default |")
    print("|---|---|---:|---:|")
    for condition in ("quiet", "shared"):
        with competing(condition, args.threads):
            speed = alternate({v: lambda v=v: generate(sessions[v], "Hello", max_new_tokens=48).tokens_per_s
                               for v in sessions}, repeats=5)
        for v, values in speed.items():
            r, noise = ratio(values, speed["1"])
            print(f"| {v}{' (the default)' if v == '1' else ''} | {condition} | {median_spread(values)} "
                  f"| {'-' if v == '1' else f'{r:.2f} +-{noise:.0%}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the measured process")
    parser.add_argument("--repeats", type=int, default=3, help="processes per setting and condition")
    parser.add_argument("--spin", default="10000", help="GOMP_SPINCOUNT values to compare with the default, comma-separated")
    parser.add_argument("--ort", metavar="BUNDLE", help="instead: ONNX Runtime's spinning on and off, decoding from "
                        "this bundle (hadaconv export)")
    args = parser.parse_args()
    if args.ort:
        print(f"machine: {machine()}")
        return run_ort(args.ort, args)
    settings: dict[str, str | None] = {"default (300000)": None}
    settings.update({f"GOMP_SPINCOUNT={s}": s for s in args.spin.split(",")})
    print(f"machine: {machine()}; torch threads {args.threads}; {args.repeats} processes per setting and condition")
    table = {condition: run(condition, settings, args) for condition in ("quiet", "shared")}
    base = next(iter(settings))
    print("\n| setting | machine | sample, tokens/s | x default | forward 4 x 256, s | x default |")
    print("|---|---|---:|---:|---:|---:|")
    for condition, results in table.items():
        for name, rows in results.items():
            tok = [r["sample"] for r in rows]
            fwd = [r["forward"] for r in rows]
            base_tok = [r["sample"] for r in results[base]]
            base_fwd = [r["forward"] for r in results[base]]
            # speed-ups: tokens/s over the default's; the default's seconds over these
            t_ratio, t_noise = ratio(tok, base_tok)
            f_ratio, f_noise = ratio(base_fwd, fwd)
            same = name == base
            print(f"| {name} | {condition} | {median_spread(tok, 0)} | {'-' if same else f'{t_ratio:.2f} +-{t_noise:.0%}'} "
                  f"| {median_spread(fwd, 2)} | {'-' if same else f'{f_ratio:.2f} +-{f_noise:.0%}'} |")


if __name__ == "__main__":
    main()
