"""Time and error of one layer's least-squares fit at real widths, against the previous fit.

The problem is synthetic but shaped like a trained model's: W = G0 T V0 + E (a Hadamard-
structured part plus unstructured residue, scaled so the fit error lands near 0.5 like
SmolLM2-135M's layers), and input moments with a power-law spectrum (eigenvalue k ~ k^-1.2, four
outlier directions 30x stronger, a small mean), as attention-output inputs have.  The baseline
is the fit as it is on another git revision (``--baseline-rev``, default ``main``), loaded from
that revision's source in the same process, run alternately with the current one.

    python benchmarks/bench_fit.py --width 4096 --heads 32 --kv-heads 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hadaconv import fit as current  # noqa: E402
from hadaconv.hadamard import hadamard_matrix  # noqa: E402


def baseline_module(rev: str) -> types.ModuleType:
    """hadaconv/fit.py as of git revision ``rev``, as a module (None if the revision lacks it)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:hadaconv/fit.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"fit_{rev}")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:hadaconv/fit.py", "exec"), mod.__dict__)
    return mod


def problem(d: int, heads: int, kv: int, block: int, seed: int = 0):
    """(W, b, Moments) of the synthetic layer described in the module docstring (float64)."""
    g = torch.Generator().manual_seed(seed)
    hd = d // heads
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -1.2
    lam[:4] *= 30
    mean = 0.05 * torch.randn(d, generator=g, dtype=torch.float64)
    second = (q * lam) @ q.T + torch.outer(mean, mean)
    gamma = torch.block_diag(*torch.randn(d // block, block, block, generator=g, dtype=torch.float64)) / math.sqrt(block)
    v = torch.eye(hd, dtype=torch.float64) + 0.3 * torch.randn(kv, hd, hd, generator=g, dtype=torch.float64) / math.sqrt(hd)
    t = torch.from_numpy(hadamard_matrix(d, normalized=True))
    structured = gamma @ t @ torch.block_diag(*v.repeat_interleave(heads // kv, 0))
    noise = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    w = structured + 0.5 * noise * structured.norm() / noise.norm()
    b = 0.01 * torch.randn(d, generator=g, dtype=torch.float64)
    return w, b, current.Moments(mean, second, 1)


def run(mod, w, b, mom, layout, args, **extra):
    start, cpu = time.perf_counter(), time.process_time()
    fit = mod.fit_projection(w, b, mod.Moments(mom.mean, mom.second, mom.count), mode=args.mode,
                             block=args.block, layout=mod.HeadLayout(*layout),
                             **({} if args.max_iter is None else {"max_iter": args.max_iter}), **extra)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    exact = current.relative_error(w, b, fit, mom, current.HeadLayout(*layout))
    return {"wall_s": round(seconds, 2), "cpu_s": round(cpu, 2), "error": exact, "reported_error": fit.error,
            "iterations": fit.iterations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--mode", default="head")
    ap.add_argument("--max-iter", type=int, default=None, help="L-BFGS budget [default: each fit's own]")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--baseline-rev", default="main", help="git revision of the baseline fit ('' = none)")
    ap.add_argument("--dtypes", default="float32,float64", help="work dtypes of the current fit to run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layout = (args.heads, args.kv_heads, args.width // args.heads)
    w, b, mom = problem(args.width, args.heads, args.kv_heads, args.block)
    base = baseline_module(args.baseline_rev) if args.baseline_rev else None
    rows = []
    for rep in range(args.repeats):
        if base is not None:
            rows.append({"fit": f"baseline ({args.baseline_rev})", "repeat": rep, **run(base, w, b, mom, layout, args)})
            print(json.dumps(rows[-1]), flush=True)
        for name in args.dtypes.split(","):
            rows.append({"fit": f"current, {name}", "repeat": rep,
                         **run(current, w, b, mom, layout, args, dtype=getattr(torch, name))})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
