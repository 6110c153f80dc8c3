"""The op library under AddressSanitizer and UndefinedBehaviorSanitizer, and a fuzz of malformed nodes.

An ONNX file is untrusted input and the op library runs inside other people's servers, so:

* ``test_fuzzed_nodes_are_refused_or_exact``: seeded random HadamardAffine nodes and inputs
  (n, m, the core's contents and length, scale including nan / inf / 0 / negative, transpose,
  gamma / beta / X shapes, dtypes).  Each node whose attributes break the op contract must fail
  when the session is created; each valid node must run, and either compute the float64
  reference (``scale * (core (x) H_{2^k})`` applied per row, then gamma and beta) or, for inputs
  of the wrong shape, fail with an error.  It runs in the plain suite too.
* ``test_op_tests_under_sanitizers``: builds the library once with ``-DHADACONV_SANITIZE=ON``
  (into ``custom_ops/build-asan/``; CMake keeps it incremental) and runs tests/test_ort_op.py and
  the fuzz above in a subprocess with the ASan runtime preloaded.  Any sanitizer report fails it.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from hadaconv import runtime  # noqa: E402
from hadaconv.hadamard import hadamard_core, supported_cores, sylvester  # noqa: E402
from op_reference import affine, transform  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INSIDE = "HADACONV_UNDER_SANITIZERS"  # set in the sanitized subprocess
OPSETS = [helper.make_opsetid("", 18), helper.make_opsetid("com.hadaconv", 1)]
ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}
VALID_M = [m for m in supported_cores(40)] + [8, 16, 32]  # Paley cores and Sylvester cores
CASES = 160


@dataclass
class Case:
    attrs: dict
    dtype: type = np.float32
    x_shape: tuple = ()
    gamma_shape: tuple | None = None
    beta_shape: tuple | None = None
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        short = {k: (f"[{len(v)} ints]" if isinstance(v, list) else v) for k, v in self.attrs.items()}
        return (f"attrs={short} dtype={np.dtype(self.dtype).name} X={self.x_shape} gamma={self.gamma_shape} "
                f"beta={self.beta_shape} ({', '.join(self.notes) or 'valid'})")


def _true_core(m: int, rng) -> np.ndarray:
    """A Hadamard matrix of order m, with random row/column permutations and sign flips (still Hadamard)."""
    base = sylvester(int(math.log2(m))) if m & (m - 1) == 0 else hadamard_core(m)
    h = base.astype(np.int64)[rng.permutation(m)][:, rng.permutation(m)]
    return h * rng.choice([-1, 1], m)[:, None] * rng.choice([-1, 1], m)[None, :]


def _attrs(rng) -> tuple[dict, list[str]]:
    """Attributes of one node; mostly valid, with some corruption in about half of them."""
    m = int(rng.choice(VALID_M))
    n = m * 2 ** int(rng.integers(0, int(math.log2(4096 // m)) + 1))
    core = _true_core(m, rng)
    attrs = dict(n=n, m=m, core=core.ravel().tolist(), scale=float(rng.uniform(0.05, 1.0)),
                 transpose=int(rng.integers(0, 2)))
    notes = []
    if rng.random() < 0.15:
        del attrs["scale"]  # defaults to 1/sqrt(n)
    if rng.random() < 0.15:
        del attrs["transpose"]
    if m == 1 and rng.random() < 0.5:
        del attrs["core"]
    if rng.random() < 0.5:
        what = rng.choice(["m", "n", "core-entry", "core-length", "core-value", "scale", "transpose", "no-n",
                           "no-core", "n-big", "type"])
        notes.append(str(what))
        if what == "m":
            attrs["m"] = int(rng.choice([0, 2, 3, 5, -4, 132, 256]))
        elif what == "n":
            attrs["n"] = int(rng.choice([0, -n, n + 1, 3 * n, n - m if n > m else n + m // 2 + 1]))
        elif what == "n-big":
            attrs["n"] = int(rng.choice([1 << 27, 1 << 40, -(1 << 62)]))
        elif what == "core-entry" and m > 1:
            i = int(rng.integers(m * m))
            attrs["core"][i] = -attrs["core"][i]  # one flipped sign breaks orthogonality
        elif what == "core-length":
            attrs["core"] = attrs.get("core", [1])[: max(0, m * m - int(rng.integers(1, 4)))] or [1, 1]
        elif what == "core-value":
            attrs["core"] = [int(rng.choice([0, 2, -2, 3]))] + attrs.get("core", [1])[1:]
        elif what == "scale":
            attrs["scale"] = float(rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.5]))
        elif what == "transpose":
            attrs["transpose"] = int(rng.choice([2, -1, 7]))
        elif what == "no-n":
            del attrs["n"]
        elif what == "no-core" and m > 1:
            del attrs["core"]
        elif what == "type":  # the right value with the wrong attribute type
            name = _pick(rng, [k for k in ("n", "m", "scale", "transpose", "core") if k in attrs])
            value = attrs[name]
            attrs[name] = [float(v) for v in value] if name == "core" else (
                int(value) if name == "scale" else float(value))
        else:
            notes.pop()
    return attrs, notes


def _attrs_valid(a: dict) -> bool:
    """The op contract (DESIGN.md, "The ONNX op contract") for the attributes alone."""
    types = {"n": int, "m": int, "transpose": int, "scale": float, "core": list}
    if "n" not in a or any(not isinstance(v, types[k]) for k, v in a.items()):
        return False
    if "core" in a and not all(isinstance(v, int) for v in a["core"]):
        return False
    n, m = a["n"], a.get("m", 1)
    if not 1 <= n <= 1 << 26 or not (m == 1 or (4 <= m <= 128 and m % 4 == 0)):
        return False
    if n % m or (n // m) & (n // m - 1):
        return False
    if not np.isfinite(a.get("scale", 1.0)) or not a.get("scale", 1.0) > 0:
        return False
    if a.get("transpose", 0) not in (0, 1):
        return False
    core = np.array(a.get("core", [1] if m == 1 else []), dtype=np.int64)
    if core.size != m * m or not np.isin(core, (-1, 1)).all():
        return False
    core = core.reshape(m, m)
    return bool((core @ core.T == m * np.eye(m, dtype=np.int64)).all())


def _pick(rng, options: list):
    return options[int(rng.integers(len(options)))]


def _case(rng) -> Case:
    attrs, notes = _attrs(rng)
    n = attrs.get("n", 64)
    width = n if 1 <= n <= 4096 else 64
    dtype = _pick(rng, [np.float32, np.float32, np.float16, np.float64])
    if dtype is np.float64:
        notes.append("float64")
    last = width
    if rng.random() < 0.1:
        last = int(rng.choice([width + 1, max(1, width - 1), 2 * width]))
        notes.append("X last dim")
    lead = tuple(int(d) for d in rng.integers(0, 4, int(rng.integers(0, 3))))
    x_shape = lead + (last,)
    gamma_shape = None
    r = rng.random()
    if r < 0.3:
        gamma_shape = (width,)
    elif r < 0.7:
        blocks = [b for b in (1, 2, 3, 4, 8, 16, 12, 32) if width % b == 0]
        b = int(rng.choice(blocks))
        gamma_shape = (width // b, b, b)
    if gamma_shape is not None and rng.random() < 0.1:
        gamma_shape = _pick(rng, [(width + 1,), (width, 1), (1, width, width + 1), (0,)])
        notes.append("gamma shape")
    beta_shape = (width,) if rng.random() < 0.5 else None
    if beta_shape is not None and rng.random() < 0.1:
        beta_shape = _pick(rng, [(width + 1,), (1, width), ()])
        notes.append("beta shape")
    return Case(attrs, dtype, x_shape, gamma_shape, beta_shape, notes)


def _model(case: Case) -> bytes:
    """One node, every input dimension symbolic so that the kernel itself sees bad shapes."""
    t = ONNX_TYPE[case.dtype]
    inputs = [helper.make_tensor_value_info("X", t, [f"x{i}" for i in range(len(case.x_shape))])]
    names = ["X"]
    for name, shape in (("gamma", case.gamma_shape), ("beta", case.beta_shape)):
        if shape is None:
            names.append("")
            continue
        names.append(name)
        inputs.append(helper.make_tensor_value_info(name, t, [f"{name}{i}" for i in range(len(shape))]))
    while names[-1] == "":
        names.pop()
    node = helper.make_node("HadamardAffine", names, ["Y"], domain="com.hadaconv", **case.attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", t, None)])
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString()


def _reference(x, attrs, gamma, beta) -> np.ndarray:
    """float64 ``gamma (scale (core (x) H_{2^k}) x) + beta`` per row (the transpose for transpose=1)."""
    n, m = attrs["n"], attrs.get("m", 1)
    core = np.array(attrs.get("core", [1]), dtype=np.float64).reshape(m, m)
    h = np.kron(core, sylvester(int(math.log2(n // m))).astype(np.float64))
    z = transform(x, h, attrs.get("scale", 1 / math.sqrt(n)), attrs.get("transpose", 0))
    return affine(z, gamma, beta)


def _close(y, ref, dtype) -> bool:
    """The tolerances of tests/test_ort_op.py, per row."""
    if y.shape != ref.shape:
        return False
    if y.size == 0:
        return True
    n = y.shape[-1]
    err = np.abs(y.astype(np.float64) - ref).reshape(-1, n).max(axis=1)
    rows = ref.reshape(-1, n)
    tol = 2.0**-10 * np.abs(rows).max(axis=1) if dtype is np.float16 else 1e-5 * np.maximum(
        1.0, np.linalg.norm(rows, axis=1))
    return bool((err <= tol).all())


def _check(case: Case, rng) -> str | None:
    """None when the op behaved as the contract says, else what went wrong."""
    attrs_ok = _attrs_valid(case.attrs) and case.dtype is not np.float64
    try:
        sess = runtime.session(_model(case), providers=["CPUExecutionProvider"], intra_op_num_threads=1)
    except Exception as exc:  # onnxruntime's own exception types
        return None if not attrs_ok else f"a valid node was refused: {str(exc).splitlines()[0]}"
    if not attrs_ok:
        return "a malformed node was accepted at session creation"
    x = rng.standard_normal(case.x_shape).astype(case.dtype)
    g = rng.standard_normal(case.gamma_shape).astype(case.dtype) if case.gamma_shape is not None else None
    b = rng.standard_normal(case.beta_shape).astype(case.dtype) if case.beta_shape is not None else None
    feeds = {k: v for k, v in (("X", x), ("gamma", g), ("beta", b)) if v is not None}
    inputs_ok = not any(note in case.notes for note in ("X last dim", "gamma shape", "beta shape"))
    try:
        y = sess.run(None, feeds)[0]
    except Exception as exc:  # onnxruntime's own exception types
        return None if not inputs_ok else f"valid inputs failed: {str(exc).splitlines()[0]}"
    if not inputs_ok:
        return "inputs of the wrong shape ran"
    if not _close(y, _reference(x, case.attrs, g, b), case.dtype):
        return "the output differs from the float64 reference"
    return None


def test_fuzzed_nodes_are_refused_or_exact():
    """Its two findings, now fixed and kept as tests of their own in tests/test_ort_op.py: case 43
    (m = 1 with a core of [-1] ran as [1]: test_a_core_of_minus_one_negates) and case 123 (an
    empty X skipped the gamma shape check: test_zero_rows_still_check_gamma_and_beta)."""
    rng = np.random.default_rng(16)
    failures, kinds = [], {"valid": 0, "refused": 0}
    for i in range(CASES):
        case = _case(rng)
        kinds["valid" if _attrs_valid(case.attrs) and case.dtype is not np.float64 else "refused"] += 1
        problem = _check(case, rng)
        if problem:
            failures.append(f"case {i}: {problem}: {case}")
    assert not failures, "\n".join(failures[:10])
    # The generator must exercise both sides of the contract.
    assert kinds["valid"] >= CASES // 4 and kinds["refused"] >= CASES // 4, kinds


# --------------------------------------------------------------------------- sanitizers


def _asan_runtime() -> tuple[str, str] | None:
    """(libasan, libstdc++) of the compiler that builds the library, or None."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        return None
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            return None
        libs.append(path)
    return libs[0], libs[1]


@pytest.mark.skipif(os.environ.get(INSIDE) == "1", reason="already inside the sanitized run")
def test_op_tests_under_sanitizers(tmp_path):
    preload = _asan_runtime()
    if preload is None or shutil.which("cmake") is None:
        pytest.skip("needs cmake and a compiler with AddressSanitizer (libasan)")
    lib = runtime.build_ops(sanitize=True)
    needed = subprocess.run(["readelf", "-dW", str(lib)], capture_output=True, text=True).stdout
    assert "libasan" in needed and "libubsan" in needed, "the library was not built with the sanitizers"
    logs = tmp_path / "sanitizer"
    env = {
        **os.environ,
        INSIDE: "1",
        "HADACONV_OPS_LIB": str(lib),
        # libstdc++ too: ASan's __cxa_throw interceptor needs it loaded before the library is.
        "LD_PRELOAD": " ".join(preload),
        # CPython's own allocations look like leaks at exit; reports go to files, since pytest
        # captures stderr and a sanitizer abort would lose it.
        "ASAN_OPTIONS": f"detect_leaks=0:abort_on_error=0:log_path={logs}.asan",
        "UBSAN_OPTIONS": f"halt_on_error=1:print_stacktrace=1:log_path={logs}.ubsan",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_ort_op.py",
         "tests/test_op_sanitizers.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    reports = sorted(tmp_path.glob("sanitizer.*"))
    text = "\n".join(p.read_text(errors="replace")[:3000] for p in reports)
    assert not reports, f"sanitizer reports:\n{text}"
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]
