"""Check and time the CUDA kernel of com.hadaconv::HadamardAffine on a GPU machine.

One prepared script for a lent GPU machine (H100/H200, CUDA 12 or 13, torch with CUDA):

1. builds ``custom_ops/`` into ``custom_ops/build-gpu`` with the CUDA kernel and the test
   harness ``libhadaconv_cuda_harness.so`` (the launcher behind one C function).  Such machines
   may have no network: bring the ONNX Runtime headers (``custom_ops/third_party``, fetched by
   ``custom_ops/fetch_ort_headers.sh`` here) or set ``ORT_INCLUDE_DIR``;
2. checks every type (float32, float16, bfloat16), many sizes m * 2^k up to 32768 * m (rows too
   long for shared memory take the device-scratch path), no/vector/block gamma, beta, and the
   transpose, against a float64 reference (hadaconv.ops.hadamard_affine on the CPU).  Through
   ORT's CUDA execution provider when this onnxruntime has it, else through the harness (said
   in the output);
3. times the kernel against a device-to-device copy (the floor) and cuBLAS with the dense
   n x n matrix (torch.matmul), with CUDA events;
4. compiles the Triton kernel behind ``hadaconv.fwht`` for CUDA tensors, checks it against the
   float64 reference (every dtype, forward and transpose) and times it against the PyTorch
   path it replaces and the copy floor.

Exit status 0 when every check passed.  Writes ``gpu_check.md`` into ``--out`` (default: $OUT
or the current directory).

    python benchmarks/gpu_check.py [--skip-build] [--quick] [--rows 16384] [--out DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "custom_ops" / "build-gpu"
sys.path.insert(0, str(ROOT))

# (n, why): powers of two, the cores 12/20/28/36, the largest 2^k, and rows long enough to
# leave shared memory (36 * 32768 floats = 4.5 MiB).
CHECK_SIZES = [1, 2, 8, 64, 384, 576, 768, 896, 1024, 2560, 4096, 5120, 8192, 16384, 32768,
               12 * 4096, 20 * 32768, 36 * 32768]
QUICK_SIZES = [8, 576, 4096, 32768, 36 * 32768]
TIME_SIZES = [512, 576, 768, 1024, 2048, 4096, 5120, 8192, 16384]
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


def build() -> None:
    cmd = ["cmake", "-S", str(ROOT / "custom_ops"), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
           "-DHADACONV_CUDA=ON", "-DHADACONV_CUDA_HARNESS=ON"]
    for c in (cmd, ["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 4)]):
        print("$", " ".join(c), flush=True)
        subprocess.run(c, check=True)
    if "HADACONV_WITH_CUDA:INTERNAL=ON" not in (BUILD / "CMakeCache.txt").read_text() and \
            not (BUILD / "libhadaconv_cuda_harness.so").exists():
        raise SystemExit("the build found no CUDA compiler")


class Harness:
    """ctypes view of hadaconv_harness_run (see custom_ops/src/cuda_harness.cu)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        f = self.lib.hadaconv_harness_run
        f.restype = ctypes.c_char_p
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        self.fn = f

    def __call__(self, x, y, m, core, transpose, scale, gamma=None, beta=None):
        import torch

        n = x.shape[-1]
        gb = 0 if gamma is None else (1 if gamma.dim() == 1 else gamma.shape[1])
        err = self.fn(DTYPES[str(x.dtype).split(".")[1]], x.data_ptr(), y.data_ptr(), x.numel() // n, n, m,
                      core.ctypes.data, int(transpose), float(scale),
                      None if gamma is None else gamma.data_ptr(), gb,
                      None if beta is None else beta.data_ptr(), torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(err.decode())


def ort_cuda_runner():
    """A function running the op through ORT's CUDA provider, or None without that provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    import numpy as np
    from onnx import TensorProto, helper

    os.environ["HADACONV_OPS_LIB"] = str(BUILD / "libhadaconv_ort.so")
    from hadaconv import runtime

    types = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
    cache = {}

    def run(x, m, core, transpose, scale, gamma, beta):
        import torch

        name = str(x.dtype).split(".")[1]
        if name not in types:
            return None  # numpy has no bfloat16: the harness covers it
        n = x.shape[-1]
        key = (name, n, transpose, None if gamma is None else tuple(gamma.shape), beta is None)
        if key not in cache:
            t = types[name]
            ins = [helper.make_tensor_value_info("X", t, ["R", n])]
            names = ["X", "gamma" if gamma is not None else "", "beta" if beta is not None else ""]
            if gamma is not None:
                ins.append(helper.make_tensor_value_info("gamma", t, list(gamma.shape)))
            if beta is not None:
                ins.append(helper.make_tensor_value_info("beta", t, [n]))
            node = helper.make_node("HadamardAffine", names, ["Y"], domain="com.hadaconv", n=n, m=m,
                                    core=core.astype(int).ravel().tolist(), scale=scale, transpose=transpose)
            g = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("Y", t, ["R", n])])
            model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                                         helper.make_opsetid("com.hadaconv", 1)])
            cache[key] = runtime.session(model.SerializeToString(),
                                         providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        feeds = {"X": x.cpu().numpy()}
        if gamma is not None:
            feeds["gamma"] = gamma.cpu().numpy()
        if beta is not None:
            feeds["beta"] = beta.cpu().numpy()
        return torch.from_numpy(np.asarray(cache[key].run(None, feeds)[0]))

    return run


def check(harness: Harness, sizes, ort_run) -> list[str]:
    import numpy as np
    import torch

    from hadaconv.hadamard import factorize, hadamard_core
    from hadaconv.ops import hadamard_affine

    failures, gen = [], torch.Generator().manual_seed(0)
    tol = {"float32": 2e-5, "float16": 2.0**-10, "bfloat16": 2.0**-7}
    for n in sizes:
        f = factorize(n)
        core = np.ascontiguousarray(hadamard_core(f.m), dtype=np.int8)
        rows = max(2, min(64, (1 << 21) // n))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            name = str(dtype).split(".")[1]
            for gkind in ("none", "vector", "b16", "b4"):
                if gkind.startswith("b") and n % int(gkind[1:]):
                    continue
                for transpose in (0, 1) if f.m > 1 and gkind == "vector" else (0,):
                    x = torch.randn(rows, n, generator=gen).to(dtype)
                    gamma = {"none": None, "vector": torch.randn(n, generator=gen),
                             "b16": torch.randn(n // 16, 16, 16, generator=gen) / 4,
                             "b4": torch.randn(n // 4, 4, 4, generator=gen) / 2}[gkind]
                    gamma = None if gamma is None else gamma.to(dtype)
                    beta = torch.randn(n, generator=gen).to(dtype) if gkind != "none" else None
                    ref = hadamard_affine(x.double(), None if gamma is None else gamma.double(),
                                          None if beta is None else beta.double(), inverse=bool(transpose))
                    scale = 1.0 / math.sqrt(n)
                    xd = x.cuda()
                    y = torch.empty_like(xd)
                    try:
                        harness(xd, y, f.m, core, transpose, scale,
                                None if gamma is None else gamma.cuda(), None if beta is None else beta.cuda())
                        torch.cuda.synchronize()
                        outs = [("harness", y.cpu())]
                        if ort_run is not None:
                            o = ort_run(x, f.m, core, transpose, scale, gamma, beta)
                            if o is not None:
                                outs.append(("ort-cuda", o))
                    except Exception as e:  # noqa: BLE001 - reported in the summary
                        failures.append(f"n={n} {name} gamma={gkind} T={transpose}: {e}")
                        continue
                    for how, out in outs:
                        err = ((out.double() - ref).abs().amax(dim=1) / ref.abs().amax(dim=1).clamp_min(1e-3)).max()
                        if not torch.isfinite(err) or err > tol[name] * (4 if f.m > 1 else 2):
                            failures.append(f"n={n} {name} gamma={gkind} T={transpose} via {how}: "
                                            f"relative error {float(err):.2e}")
        print(f"checked n={n} ({f})", flush=True)
    return failures


def cuda_ms(fn, repeats=20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def timings(harness: Harness, rows: int) -> list[list[str]]:
    import numpy as np
    import torch

    from hadaconv.hadamard import factorize, hadamard_core, hadamard_matrix

    table = []
    for n in TIME_SIZES:
        f = factorize(n)
        core = np.ascontiguousarray(hadamard_core(f.m), dtype=np.int8)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.randn(rows, n, device="cuda").to(dtype)
            y = torch.empty_like(x)
            gamma = torch.randn(n, device="cuda").to(dtype)
            beta = torch.randn(n, device="cuda").to(dtype)
            blocks = torch.randn(n // 16, 16, 16, device="cuda").to(dtype)
            copy = cuda_ms(lambda: y.copy_(x))
            ours = cuda_ms(lambda: harness(x, y, f.m, core, 0, 1 / math.sqrt(n), gamma, beta))
            ours_b = cuda_ms(lambda: harness(x, y, f.m, core, 0, 1 / math.sqrt(n), blocks, beta))
            h = torch.tensor(hadamard_matrix(n, normalized=True), device="cuda").to(dtype)
            dense = cuda_ms(lambda: torch.matmul(x, h.T), repeats=5)
            gbps = 2 * x.numel() * x.element_size() / (ours * 1e-3) / 1e9
            table.append([str(n), str(dtype).split(".")[1], f"{copy:.3f}", f"{ours:.3f}", f"{ours / copy:.2f}x",
                          f"{ours_b:.3f}", f"{dense:.3f}", f"{dense / ours:.1f}x", f"{gbps:.0f}"])
            print(" | ".join(table[-1]), flush=True)
    return table


def triton_section(rows: int, timing: bool) -> tuple[list[str], list[str]]:
    """Check and time hadaconv's Triton kernel (the fwht op on CUDA tensors)."""
    import torch

    from hadaconv.hadamard import hadamard_matrix
    from hadaconv.ops import transform, triton_kernel

    if not triton_kernel.available():
        return ["triton is not installed: Triton kernel not checked"], []
    failures, table = [], []
    for n in (12, 20, 64, 576, 768, 1024, 2048, 4096, 5120, 8192):
        h = torch.tensor(hadamard_matrix(n, normalized=True), dtype=torch.float64)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for inverse in (False, True):
                x = torch.randn(257, n).to(dtype)
                want = x.double() @ (h if inverse else h.T)
                got = triton_kernel.hadamard_transform(x.cuda(), 1 / math.sqrt(n), inverse).double().cpu()
                err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
                if not err < (2e-6 if dtype == torch.float32 else 1e-2):
                    failures.append(f"triton n={n} {dtype} inverse={inverse}: relative error {err:.2e}")
        if timing:
            x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(rows, n, device="cuda", dtype=torch.float32)  # the kernel writes float32
            copy = cuda_ms(lambda: y.copy_(x))
            ours = cuda_ms(lambda: triton_kernel.hadamard_transform(x, 1.0))
            torch_path = cuda_ms(lambda: transform.gemm_transform(x, 1.0))  # the path it replaces
            clone = cuda_ms(lambda: x.clone())
            dense_h = torch.tensor(hadamard_matrix(n, normalized=True), device="cuda", dtype=torch.bfloat16)
            dense = cuda_ms(lambda: torch.nn.functional.linear(x, dense_h), repeats=5)
            table.append([str(n), f"{clone:.3f}", f"{copy:.3f}", f"{ours:.3f}", f"{ours / copy:.2f}x", f"{torch_path:.3f}",
                          f"{torch_path / ours:.1f}x", f"{dense:.3f}", f"{dense / ours:.1f}x"])
            print("triton | " + " | ".join(table[-1]), flush=True)
    return failures, table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-build", action="store_true", help="use an existing custom_ops/build-gpu")
    ap.add_argument("--quick", action="store_true", help=f"check only n in {QUICK_SIZES}")
    ap.add_argument("--rows", type=int, default=16384, help="rows for the timings")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device visible to torch: nothing to check", file=sys.stderr)
        return 2
    if not args.skip_build:
        build()
    start = time.time()
    harness = Harness(BUILD / "libhadaconv_cuda_harness.so")
    ort_run = ort_cuda_runner()
    device = torch.cuda.get_device_name()
    route = "ORT CUDA execution provider and the harness" if ort_run else \
        "the harness only (this onnxruntime has no CUDA execution provider)"
    print(f"device: {device}; checking through {route}", flush=True)
    failures = check(harness, QUICK_SIZES if args.quick else CHECK_SIZES, ort_run)
    table = [] if args.no_timing else timings(harness, args.rows)
    triton_failures, triton_table = triton_section(args.rows, not args.no_timing)
    failures += triton_failures

    lines = ["## CUDA kernel (gpu_check.py)", "", f"Device: {device}; torch {torch.__version__}; CUDA "
             f"{torch.version.cuda}; checked through {route}; {len(failures)} failures; "
             f"{time.time() - start:.0f} s.", ""]
    lines += [f"- FAIL {f}" for f in failures]
    if table:
        lines += ["", f"[{args.rows}, n], median ms (CUDA events); ours: vector gamma + beta; b=16: blocks + beta; "
                  "dense: torch.matmul with the n x n matrix.", "",
                  "| n | dtype | copy (floor) | ours | ours/copy | ours b=16 | dense | dense/ours | ours GB/s |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in table]
    if triton_table:
        lines += ["", f"Triton kernel (hadaconv.fwht on CUDA tensors), [{args.rows}, n] bfloat16, median ms: the copy "
                  "floor, the kernel, and the PyTorch path it replaces (one GEMM per factor).", "",
                  "| n | x.clone() | copy bf16 -> fp32 (floor) | triton | triton/copy | PyTorch path | vs PyTorch | "
                  "F.linear dense (bf16) | vs dense |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in triton_table]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
