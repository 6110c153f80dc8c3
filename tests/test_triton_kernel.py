"""The Triton Hadamard kernel, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1), in a
subprocess so that the setting cannot leak into other tests.  On a GPU machine,
benchmarks/gpu_check.py runs the same comparison compiled."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CHECK = r"""
import json, math, sys
import torch
from hadaconv.hadamard import hadamard_matrix
from hadaconv.ops import triton_kernel as tk

out = []
for n, rows, dtype, inverse in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    h = torch.tensor(hadamard_matrix(n, normalized=True))
    x = torch.randn(rows, n).to(dtype)
    assert tk.supports(x), n
    y = tk.hadamard_transform(x.reshape(rows, 1, n)[:, 0], 1 / math.sqrt(n), inverse)
    want = x.double() @ (h if inverse else h.T)
    err = ((y.double() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-300)).max().item() if rows else 0.0
    out.append([n, rows, str(dtype), inverse, err, str(y.dtype), list(y.shape)])
print(json.dumps(out))
"""

CASES = [[n, rows, "float32", inverse] for n, rows in ((2, 5), (12, 33), (20, 1), (28, 17), (64, 40), (128, 3),
                                                      (576, 19), (768, 9), (1024, 4), (4096, 2), (2560, 3), (5120, 1), (8192, 1))
         for inverse in (False, True)] + [[576, 7, "bfloat16", False], [1024, 6, "float16", True], [576, 0, "float32", False]]


def test_triton_kernel_matches_dense_float64_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(CASES)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for n, rows, dtype, inverse, err, out_dtype, shape in results:
        # float32 accumulation; half inputs are rounded once on the way in
        tol = 1e-6 if dtype == "torch.float32" else 1e-2
        assert err < tol, (n, rows, dtype, inverse, err)
        assert out_dtype == "torch.float32" and shape == [rows, n]


def test_plan_covers_model_widths_and_declines_the_rest():
    from hadaconv.ops import triton_kernel as tk

    for n in (64, 576, 768, 1024, 2048, 2560, 3072, 4096, 5120, 8192):
        axes = tk.plan(n)
        assert axes is not None and math_prod(s for s, _, _ in axes) == n
        assert all(p == 1 or (p >= 16 and p & (p - 1) == 0 and p >= s) for s, p, _ in axes)
    assert tk.plan(368) is None  # core 368 is above the kernel's 64: the PyTorch path
    assert tk.plan(1 << 14) is None and tk.plan(12 * 1024) is None  # rows too long for one program


def math_prod(values):
    p = 1
    for v in values:
        p *= v
    return p
