"""custom_ops/bench/cpu_kernel_bench builds and runs (a smoke test: the numbers it prints are for
kernel work, measured by hand, never asserted here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parent.parent / "custom_ops"
LINE = re.compile(r"^\w+ n=(\d+) m=(\d+)  (\d+) rows: kernel [\d.]+ us/row, floor [\d.]+, ratio [\d.]+  \|  "
                  r"16 rows \(hot\): kernel [\d.]+, floor [\d.]+, ratio [\d.]+$")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:
        pytest.skip("cmake not found")
    build = tmp_path_factory.mktemp("bench")
    for cmd in ([cmake, "-S", str(OPS), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DHADACONV_CUDA=OFF",
                 "-DHADACONV_BENCH=ON"],
                [cmake, "--build", str(build), "--target", "cpu_kernel_bench", "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return build / "cpu_kernel_bench"


@pytest.mark.parametrize("n, m", [(64, 1), (576, 36), (48, 12)])
def test_runs(bench, n, m):
    done = subprocess.run([str(bench), str(n), str(m), "8", "3"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    match = LINE.match(done.stdout.strip())
    assert match and match.groups() == (str(n), str(m), "8"), done.stdout


@pytest.mark.parametrize("args", [[], ["576", "5"], ["48", "0"], ["100", "1"], ["576", "36", "0"]])
def test_bad_arguments(bench, args):
    done = subprocess.run([str(bench), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
