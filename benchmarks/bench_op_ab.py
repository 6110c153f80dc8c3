"""Two builds of the op library against each other: is a kernel change faster?

For each case (width, gamma form, threads), X [rows, n] float32 goes through HadamardAffine
with constant gamma / beta; every measurement is a fresh process that loads one library, warms
up and times ``session.run`` (median of ``--runs``), and the two libraries alternate process by
process, ``--repeats`` times.  Fresh processes on purpose: two builds of the op in one process
(two sessions) read differently from each on its own, since each session's buffers evict the
other's from the caches.  Prints, per case, both medians and new / base with the range over
the repeats.

    python benchmarks/bench_op_ab.py --base OLD.so [--new NEW.so] [--cases 576:v:1 576:b64:1 ...]

``--new`` defaults to the library hadaconv would load (``runtime.get_library_path``).  Build
the base from another commit with cmake directly (``hadaconv build-ops`` builds the sources of
the installed package, not of another checkout):

    git worktree add /tmp/base REV
    cmake -S /tmp/base/custom_ops -B /tmp/base/build -DCMAKE_BUILD_TYPE=Release -DHADACONV_CUDA=OFF
    cmake --build /tmp/base/build        # then --base /tmp/base/build/libhadaconv_ort.so

A case is ``n:g:threads``, g ``v`` (vector gamma) or ``bB`` (blocks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CASES = ["576:v:1", "576:b64:1", "768:b64:1", "4096:v:1", "4096:b64:1", "5120:b64:1"]


def child(n: int, gamma: str, threads: int, rows: int, runs: int) -> None:
    """One measurement in this process (the library comes from HADACONV_OPS_LIB)."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ort_op import ours
    from common import median_ms

    from hadaconv import runtime

    rng = np.random.default_rng(0)
    shape = (n,) if gamma == "v" else (n // int(gamma[1:]), int(gamma[1:]), int(gamma[1:]))
    g = rng.standard_normal(shape).astype(np.float32)
    beta = rng.standard_normal(n).astype(np.float32)
    sess = runtime.session(ours(n, g, beta), providers=["CPUExecutionProvider"], intra_op_num_threads=threads)
    x = {"X": rng.standard_normal((rows, n)).astype(np.float32)}
    print(median_ms(lambda: sess.run(None, x), repeats=runs, warmup=runs // 5, budget_s=float("inf")))


def measure(lib: str, case: str, rows: int, runs: int) -> float:
    n, gamma, threads = case.split(":")
    env = dict(os.environ, HADACONV_OPS_LIB=lib)
    out = subprocess.run([sys.executable, __file__, "--child", n, gamma, threads, str(rows), str(runs)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: case {case} with {lib} failed: {last}")
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the op library to compare against (required)")
    ap.add_argument("--new", help="the op library under test (default: this checkout's)")
    ap.add_argument("--cases", nargs="+", default=CASES, help="n:g:threads, g = v or bB (default: %(default)s)")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per process")
    ap.add_argument("--repeats", type=int, default=3, help="processes per library and case")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n, gamma, threads, rows, runs = args.child
        return child(int(n), gamma, int(threads), int(rows), int(runs))
    if not args.base:
        ap.error("--base is required")
    from hadaconv import runtime
    from hadaconv.errors import HadaconvError

    try:
        new = args.new or runtime.get_library_path()
    except HadaconvError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"base {args.base}\nnew  {new}\n[{args.rows}, n] float32, median ms per run of {args.runs}, "
          f"{args.repeats} processes each, alternating")
    for case in args.cases:
        base_ms, new_ms = [], []
        for _ in range(args.repeats):
            base_ms.append(measure(args.base, case, args.rows, args.runs))
            new_ms.append(measure(new, case, args.rows, args.runs))
        ratios = sorted(b / a for a, b in zip(base_ms, new_ms))
        print(f"{case:>12}  base {statistics.median(base_ms):8.3f}  new {statistics.median(new_ms):8.3f}  "
              f"new/base {statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})", flush=True)


if __name__ == "__main__":
    main()
