"""The com.hadaconv::HadamardAffine op in ONNX Runtime (CPU) against its baselines.

For each width n, X is [rows, n] float32 (rows = 2048), gamma/beta are constants, and every
variant is one ONNX graph run by the same onnxruntime, 1 and 2 intra-op threads:

* ``Mul``    Y = X * c: one elementwise pass over memory, the floor for any transform;
* ``ours``   HadamardAffine with a vector gamma, and with the block gamma convert uses by
             default at this width (``convert.default_block``: 64 at 576);
* ``kron``   the best standard-op form: X as [rows*m*a, b], MatMul with the +-1 H_b, a batched
             MatMul with H_a, the m x m core MatMul, then gamma and beta;
* ``dense``  MatMul with the dense n x n matrix (what the projection replaces; 3 runs).

Mul / ours / blocks / kron alternate within every repeat (``common.alternate``) until each
ratio to Mul is known to +-2% (95% bootstrap interval, ``common.ratio``) or ``--budget`` is
spent.  Prints one table (median ms, ratios with their noise) and, with ``--write``, puts it
into benchmarks/RESULTS.md under ``## ONNX Runtime op (CPU)``.

    python benchmarks/bench_ort_op.py [--quick] [--write] [--threads 1 2] [--rows 1] [--no-dense]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, median_ms, ratio, timer  # noqa: E402

from hadaconv import runtime  # noqa: E402
from hadaconv.convert import default_block  # noqa: E402
from hadaconv.hadamard import factorize, hadamard_core, hadamard_matrix, sylvester  # noqa: E402
from hadaconv.progress import out as console  # noqa: E402

FULL = [512, 576, 768, 1024, 4096, 5120, 8192]
QUICK = [576, 4096]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## ONNX Runtime op (CPU)"
OPSETS = [helper.make_opsetid("", 18), helper.make_opsetid("com.hadaconv", 1)]


def _model(nodes, inits, n: int) -> bytes:
    graph = helper.make_graph(
        nodes, "bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32) if v.dtype != np.int64 else v, k)
         for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString()


def ours(n: int, gamma: np.ndarray, beta: np.ndarray) -> bytes:
    f = factorize(n)
    node = helper.make_node(
        "HadamardAffine", ["X", "gamma", "beta"], ["Y"], domain="com.hadaconv", n=n, m=f.m,
        core=hadamard_core(f.m).astype(np.int64).ravel().tolist(), scale=1.0 / math.sqrt(n), transpose=0)
    return _model([node], {"gamma": gamma, "beta": beta}, n)


def mul(n: int) -> bytes:
    return _model([helper.make_node("Mul", ["X", "c"], ["Y"])], {"c": np.full(n, 0.5)}, n)


def dense(n: int) -> bytes:
    return _model([helper.make_node("MatMul", ["X", "W"], ["Y"])],
                  {"W": hadamard_matrix(n, normalized=True).T}, n)


def kron(n: int, gamma: np.ndarray, beta: np.ndarray) -> bytes:
    """H = H_m (x) H_a (x) H_b with a * b = 2^k, a <= b, all as MatMuls on reshaped X."""
    f = factorize(n)
    kb = (f.k + 1) // 2
    a, b = 1 << (f.k - kb), 1 << kb
    i64 = lambda *s: np.array(s, dtype=np.int64)  # noqa: E731
    nodes = [helper.make_node("Reshape", ["X", "s1"], ["t1"]),           # [rows*m*a, b]
             helper.make_node("MatMul", ["t1", "hb"], ["t2"]),            # H_b, scale folded in
             helper.make_node("Reshape", ["t2", "s2"], ["t3"]),           # [rows*m, a, b]
             helper.make_node("MatMul", ["ha", "t3"], ["t4"])]            # H_a on axis 1
    inits = {"s1": i64(-1, b), "hb": sylvester(kb).astype(np.float32) / math.sqrt(n),
             "s2": i64(-1, a, b), "ha": sylvester(f.k - kb)}
    last = "t4"
    if f.m > 1:
        nodes += [helper.make_node("Reshape", ["t4", "s3"], ["t5"]),     # [rows, m, 2^k]
                  helper.make_node("MatMul", ["hm", "t5"], ["t6"])]      # the core on axis 1
        inits |= {"s3": i64(-1, f.m, a * b), "hm": hadamard_core(f.m)}
        last = "t6"
    nodes += [helper.make_node("Reshape", [last, "s4"], ["t7"]),
              helper.make_node("Mul", ["t7", "gamma"], ["t8"]),
              helper.make_node("Add", ["t8", "beta"], ["Y"])]
    inits |= {"s4": i64(-1, n), "gamma": gamma, "beta": beta}
    return _model(nodes, inits, n)


def check(sess, x: np.ndarray, ref: np.ndarray, what: str) -> None:
    y = sess.run(None, {"X": x[:64]})[0]
    err = np.abs(y - ref).max() / (np.abs(ref).max() + 1e-30)
    if err > 1e-4:
        raise SystemExit(f"{what}: wrong result (max relative error {err:.2e})")


def measure(n: int, rows: int, threads: int, with_dense: bool, budget_s: float) -> dict[str, tuple[float, float]]:
    """Per variant (mul, ours, ours_blk, kron): (median ms, its time over Mul's, that ratio's
    noise); "dense": (median ms,) of 3 runs; "block": the block size used for ours_blk."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, n), dtype=np.float32)
    block = default_block([n])
    gamma = rng.standard_normal(n).astype(np.float32)
    beta = rng.standard_normal(n).astype(np.float32)
    blocks = rng.standard_normal((n // block, block, block)).astype(np.float32)
    H = hadamard_matrix(n, normalized=True)
    z = x[:64].astype(np.float64) @ H.T
    ref_vec = z * gamma + beta
    ref_blk = np.einsum("ipq,riq->rip", blocks, z.reshape(len(z), n // block, block)).reshape(len(z), n) + beta

    # Idle sessions' worker threads must not spin while another variant is timed.
    opts = dict(intra_op_num_threads=threads, inter_op_num_threads=1,
                config_entries={"session.force_spinning_stop": "1"})
    sess = lambda model: runtime.session(model, providers=["CPUExecutionProvider"], **opts)  # noqa: E731
    variants = [("mul", mul(n), None), ("ours", ours(n, gamma, beta), ref_vec),
                ("ours_blk", ours(n, blocks, beta), ref_blk), ("kron", kron(n, gamma, beta), ref_vec)]
    fns = {}
    for name, model, ref in variants:
        s = sess(model)
        if ref is not None:
            check(s, x, ref, name)
        fns[name] = timer(lambda s=s: s.run(None, {"X": x}))
    times = alternate(fns, min_repeats=7, max_repeats=60, budget_s=budget_s, noise=0.02)
    out = {name: (statistics.median(t) * 1e3, *ratio(t, times["mul"])) for name, t in times.items()}
    out["block"] = block
    if with_dense:  # seconds per run at large n: a few runs, outside the alternation
        s = sess(dense(n))
        out["dense"] = (median_ms(lambda: s.run(None, {"X": x}), repeats=3, warmup=1, budget_s=60),)
    return out


COLUMNS = ["n", "factors", "threads", "Mul (floor)", "ours", "ours/floor", "ours blocks", "blocks/floor", "kron",
           "dense", "dense/ours"]


def cells(n: int, threads: int, r: dict) -> list[str]:
    d = r.get("dense")

    def x(name):
        return f"{r[name][1]:.2f}x (+-{r[name][2]:.0%})"

    return [str(n), str(factorize(n)).split(" (")[0], str(threads), f"{r['mul'][0]:.3f}", f"{r['ours'][0]:.3f}",
            x("ours"), f"b={r['block']}: {r['ours_blk'][0]:.3f}", x("ours_blk"), f"{r['kron'][0]:.2f}",
            "-" if d is None else f"{d[0]:.1f}", "-" if d is None else f"{d[0] / r['ours'][0]:.0f}x"]


def table(results, rows: int) -> Table:
    t = Table(title=f"HadamardAffine in ONNX Runtime (CPU), [{rows}, n] float32: median ms")
    for col in COLUMNS:
        t.add_column(col, justify="right")
    for (n, threads), r in results.items():
        t.add_row(*cells(n, threads, r))
    return t


def markdown(results, rows: int) -> str:
    import onnxruntime as ort

    lines = [HEADING, "",
             f"Machine: {machine()}; onnxruntime {ort.__version__}; X [{rows}, n] float32, gamma/beta constants; "
             "median ms per `session.run`, Mul / ours / blocks / kron alternating until each ratio to Mul is "
             "known to +-2% or the width's time budget is spent; `x (+-p%)` is the median per-repeat ratio and "
             "the half-width of its 95% bootstrap interval (the dense MatMul: 3 runs).  Mul is the one-pass floor; "
             "`ours` is HadamardAffine with a vector gamma, `ours blocks` with the block gamma convert uses "
             "by default at that width; `kron` the best standard-op form (two small +-1 MatMuls plus the core "
             "MatMul, then Mul/Add).  "
             f"Written by `python benchmarks/bench_ort_op.py --write`; load average at the end: "
             f"{os.getloadavg()[0]:.1f} (other jobs on the machine make the numbers noisy).", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if c == "factors" else "---:" for c in COLUMNS) + "|"]
    for (n, threads), r in results.items():
        lines.append("| " + " | ".join(cells(n, threads, r)) + " |")
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    """Add or replace our section of RESULTS.md, leaving the others as they are."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only n in {QUICK}")
    ap.add_argument("--rows", type=int, default=2048, help="rows of X (1: a decode-sized call)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts to measure")
    ap.add_argument("--sizes", type=int, nargs="+", help="widths to measure (default: the full list)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per width before it stops repeating")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense MatMul baseline")
    ap.add_argument("--write", action="store_true", help=f"write the table into {RESULTS.name}")
    args = ap.parse_args()

    sizes = args.sizes or (QUICK if args.quick else FULL)
    results = {}
    for threads in args.threads:
        for n in sizes:
            results[(n, threads)] = measure(n, args.rows, threads, not args.no_dense, args.budget)
    console.print(table(results, args.rows))
    console.print(machine())
    if args.write:
        write_results(markdown(results, args.rows))
        console.print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
