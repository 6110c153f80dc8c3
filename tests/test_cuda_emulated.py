"""The CUDA kernel's logic on every CI run, without a GPU.

custom_ops/src/hadamard_cuda.cu and its test harness cuda_harness.cu are compiled unchanged by
the host C++ compiler against tests/cuda_emu (our own stand-ins for the CUDA headers: each CUDA
thread of a block a fiber, ``__syncthreads`` a barrier, dynamic shared memory one NaN-filled
buffer per block, ``__half`` / ``__nv_bfloat16`` from custom_ops/src/half.h), launched on the
CPU and compared with a float64 reference.  Every case runs under two thread schedules
(ascending thread order, then a seeded shuffle at every barrier), so a missing barrier or a
wrong index shows as a wrong result.  The emulated device has 16 KiB of opt-in shared memory
and one multiprocessor, so long rows take the kernel's device-scratch path with a capped grid
(several rows per block).

Tolerances, per row, against float64 on the inputs as rounded to the dtype: float32
``1e-5 * max(1, ||ref||)``, float16 ``2^-10 * max|ref|``, bfloat16 ``2^-8 * max|ref|`` (fp32
accumulation; the output rounding dominates for the half types).
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hadaconv.hadamard import factorize, hadamard_core
from op_reference import reference

ml_dtypes = pytest.importorskip("ml_dtypes")

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "custom_ops" / "src"
EMU = Path(__file__).resolve().parent / "cuda_emu"
SMEM_LIMIT = 16 * 1024
DTYPES = {"f32": (0, np.float32), "f16": (1, np.float16), "bf16": (2, ml_dtypes.bfloat16)}
SCHEDULES = [0, 12345]


def build(out_dir: Path, sources=(SRC / "hadamard_cuda.cu", SRC / "cuda_harness.cu")) -> Path:
    """The emulated kernel as a shared library (about 10 s with -O1)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    lib = out_dir / "libhadaconv_cuda_emu.so"
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas", "-x", "c++",
           "-include", str(EMU / "emu.h"), f"-I{EMU}", f"-I{SRC}", *map(str, sources), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return lib


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = ctypes.CDLL(str(build(tmp_path_factory.mktemp("cuda_emu"))))
    f = lib.hadaconv_harness_run
    f.restype = ctypes.c_char_p
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                  ctypes.c_void_p]
    lib.cuda_emu_set_smem_limit(SMEM_LIMIT)
    return lib


def run_emulated(lib, x, n, *, gamma=None, beta=None, transpose=0, schedule=0, y_offset=0):
    """Y from the emulated kernel; ``y_offset`` elements shift the output off 16-byte alignment."""
    code = {np.dtype(v[1]): v[0] for v in DTYPES.values()}[x.dtype]
    f = factorize(n)
    core = np.ascontiguousarray(hadamard_core(f.m), dtype=np.int8)
    rows = x.size // n
    buf = np.zeros(rows * n + y_offset, x.dtype)
    y = buf[y_offset:]
    ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    gamma_b = 0 if gamma is None else (1 if gamma.ndim == 1 else gamma.shape[1])
    lib.cuda_emu_set_schedule(schedule)
    err = lib.hadaconv_harness_run(code, ptr(x), ptr(y), rows, n, f.m, core.ctypes.data, transpose,
                                   1.0 / math.sqrt(n), ptr(gamma), gamma_b, ptr(beta), None)
    assert err is None, err.decode()
    return y.reshape(x.shape)


def assert_close(y, ref, dtype: str):
    y = y.astype(np.float64).reshape(ref.shape)
    err = np.abs(y - ref).max(axis=1)
    if dtype == "f32":
        tol = 1e-5 * np.maximum(1.0, np.linalg.norm(ref, axis=1))
    else:
        tol = (2.0**-10 if dtype == "f16" else 2.0**-8) * np.abs(ref).max(axis=1)
    bad = np.nonzero(~(err <= tol))[0]
    assert bad.size == 0, f"rows {bad[:5]}: error {err[bad[:5]]} > tolerance {tol[bad[:5]]}"


# (n, rows, gamma, beta, transpose, dtype): every dtype, both directions, no / vector / block gamma,
# odd row counts, pass 0 without the 8-wide path (L < 8), rows in shared memory and rows in
# device scratch (n = 8192, and 2560 with blocks: 2n floats > 16 KiB) with a capped grid.
CASES = [
    (64, 3, "vector", True, 0, "f32"),
    (64, 1, None, False, 1, "f16"),
    (2, 5, "vector", True, 0, "f32"),
    (12, 3, "vector", True, 1, "f32"),
    (48, 7, "b4", True, 0, "bf16"),
    (96, 2, "b3", False, 1, "f32"),
    (384, 3, "b4", True, 1, "f16"),
    (576, 5, "vector", True, 0, "f32"),
    (576, 3, "b16", True, 1, "f32"),
    (576, 1, None, True, 0, "bf16"),
    (576, 4, "b16", False, 0, "f16"),
    (768, 3, "vector", False, 1, "bf16"),
    (1024, 3, "b16", True, 0, "f32"),
    (2560, 3, "vector", True, 0, "f16"),
    (2560, 5, "b16", True, 1, "f32"),
    (2560, 3, "b4", False, 0, "bf16"),
    (4096, 3, "vector", True, 1, "f32"),
    (4096, 2, "b16", True, 0, "f16"),
    (8192, 5, "vector", True, 0, "f32"),
    (8192, 3, None, False, 1, "bf16"),
    (8192, 3, "b16", True, 1, "f16"),
    (5120, 3, "b16", True, 0, "f32"),
]


@pytest.mark.parametrize("n, rows, gamma, beta, transpose, dtype", CASES,
                         ids=[f"n{c[0]}-r{c[1]}-{c[2]}-{'beta' if c[3] else 'nobeta'}-t{c[4]}-{c[5]}" for c in CASES])
def test_emulated_kernel_matches_float64(emu, n, rows, gamma, beta, transpose, dtype):
    rng = np.random.default_rng(n * 10 + rows)
    np_dtype = DTYPES[dtype][1]
    gshape = {None: None, "vector": (n,), "b3": (n // 3, 3, 3), "b4": (n // 4, 4, 4), "b16": (n // 16, 16, 16)}[gamma]
    x = rng.standard_normal((rows, n)).astype(np_dtype)
    g = None if gshape is None else rng.standard_normal(gshape).astype(np_dtype)
    b = rng.standard_normal(n).astype(np_dtype) if beta else None
    ref = reference(x, g, b, transpose)
    first = None
    for schedule in SCHEDULES:
        y = run_emulated(emu, x, n, gamma=g, beta=b, transpose=transpose, schedule=schedule)
        assert_close(y, ref, dtype)
        if first is None:
            first = y
        else:  # fp32 arithmetic in a fixed order per element: schedules must agree bit for bit
            assert np.array_equal(first.view(np.uint8), y.view(np.uint8))


def test_unaligned_rows_take_the_scalar_path(emu):
    """16-byte loads need aligned rows: an output 1 element off still gives the right result."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    g = rng.standard_normal(576).astype(np.float32)
    y = run_emulated(emu, x, 576, gamma=g, y_offset=1, schedule=7)
    assert_close(y, reference(x, g, None, 0), "f32")
