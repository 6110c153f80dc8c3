"""FWHT in PyTorch on the CPU against its baselines, measured in the same run.

For each width n, rows = 4096, float32: ``x.clone()`` (one pass over memory, the floor),
``hadaconv.fwht`` and ``hadaconv.hadamard_affine`` with b = 16 blocks, and ``F.linear`` with
the dense n x n matrix (what the Hadamard projection replaces).  Prints one table.

    python benchmarks/bench_fwht.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_ms  # noqa: E402

import hadaconv  # noqa: E402
from hadaconv.progress import out as console  # noqa: E402

FULL = [256, 384, 512, 576, 768, 1024, 2048, 3072, 4096, 5120, 8192, 16384]
QUICK = [256, 576, 1024, 4096]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only n in {QUICK} (for make demo)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dense-max", type=int, default=16384, help="skip the dense baseline above this n")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    table = Table(title=f"FWHT, PyTorch CPU, rows={args.rows}, float32, {args.threads} thread(s): median ms")
    for col in ("n", "factor", "clone", "fwht", "affine b=16", "dense F.linear", "fwht / clone", "dense / fwht"):
        table.add_column(col, justify="right")
    for n in QUICK if args.quick else FULL:
        x = torch.randn(args.rows, n)
        gamma, beta = torch.randn(n // 16, 16, 16), torch.randn(n)
        t_clone = median_ms(lambda: x.clone())
        t_fwht = median_ms(lambda: hadaconv.fwht(x))
        t_aff = median_ms(lambda: hadaconv.hadamard_affine(x, gamma, beta))
        if n <= args.dense_max:
            w = torch.randn(n, n) / n**0.5
            t_dense = median_ms(lambda: F.linear(x, w), repeats=3 if n >= 4096 else 7, budget_s=30)
            del w
            dense, ratio = f"{t_dense:.2f}", f"{t_dense / t_fwht:.1f}x"
        else:
            dense = ratio = "-"
        table.add_row(str(n), str(hadaconv.factorize(n)).split(" = ")[1], f"{t_clone:.2f}", f"{t_fwht:.2f}",
                      f"{t_aff:.2f}", dense, f"{t_fwht / t_clone:.1f}x", ratio)
    console.print(table)
    console.print(f"machine: {machine()}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
