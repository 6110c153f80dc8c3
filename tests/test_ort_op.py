"""The com.hadaconv::HadamardAffine custom op in ONNX Runtime (CPU execution provider).

Every result is compared to a float64 numpy reference built from the dense
``hadaconv.hadamard.hadamard_matrix`` (and, for a few cases, to ``hadaconv.ops.hadamard_affine``).
Tolerances, per row of the output:

* float32: ``max |y - ref| <= 1e-5 * max(1, ||ref_row||_2)`` (fp32 accumulation over log2(n) + m
  terms of an orthonormal transform: the error grows like eps32 * sqrt(log n) * ||row||);
* float16: ``max |y - ref| <= 2**-10 * max|ref_row|``: one fp16 epsilon of the row's largest
  value (the kernel accumulates in fp32, so the output rounding dominates); the reference uses
  the fp16-rounded inputs.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from hadaconv import runtime  # noqa: E402
from hadaconv.errors import HadaconvError  # noqa: E402
from hadaconv.hadamard import factorize, hadamard_core, sylvester  # noqa: E402
from op_reference import reference  # noqa: E402

OPSETS = [helper.make_opsetid("", 18), helper.make_opsetid("com.hadaconv", 1)]
ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}


@pytest.fixture(scope="module", autouse=True)
def library():
    return runtime.get_library_path()


def make_model(n, dtype=np.float32, *, gamma=None, beta=False, transpose=0, x_shape=("B", "S", None),
               attrs=None) -> bytes:
    """One HadamardAffine node; ``gamma`` is a shape (or None), None in x_shape means n."""
    f = factorize(n) if attrs is None else None
    t = ONNX_TYPE[dtype]
    inputs = [helper.make_tensor_value_info("X", t, [n if d is None else d for d in x_shape])]
    names = ["X"]
    if gamma is not None:
        inputs.append(helper.make_tensor_value_info("gamma", t, list(gamma)))
        names.append("gamma")
    if beta:
        names += ["beta"] if gamma is not None else ["", "beta"]
        inputs.append(helper.make_tensor_value_info("beta", t, [n]))
    if attrs is None:
        attrs = dict(n=n, m=f.m, core=hadamard_core(f.m).astype(int).ravel().tolist(),
                     scale=1.0 / math.sqrt(n), transpose=transpose)
    node = helper.make_node("HadamardAffine", names, ["Y"], domain="com.hadaconv", **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", t, None)])
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString()


def assert_close(y, ref):
    assert y.shape == ref.shape
    if y.size == 0:
        return
    n = y.shape[-1]
    err = np.abs(y.astype(np.float64) - ref).reshape(-1, n).max(axis=1)
    rows = ref.reshape(-1, n)
    if y.dtype == np.float16:
        tol = 2.0**-10 * np.abs(rows).max(axis=1)
    else:
        tol = 1e-5 * np.maximum(1.0, np.linalg.norm(rows, axis=1))
    bad = np.nonzero(err > tol)[0]
    assert bad.size == 0, f"rows {bad[:5]}: error {err[bad[:5]]} > tolerance {tol[bad[:5]]}"


def run(model, feeds, **options):
    sess = runtime.session(model, providers=["CPUExecutionProvider"], **options)
    return sess, sess.run(None, feeds)[0]


def inputs(rng, shape, n, dtype, gamma_shape=None, beta=False):
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(gamma_shape).astype(dtype) if gamma_shape is not None else None
    b = rng.standard_normal(n).astype(dtype) if beta else None
    return x, g, b


def feeds_of(x, g, b):
    return {k: v for k, v in (("X", x), ("gamma", g), ("beta", b)) if v is not None}


# --------------------------------------------------------------------------- correctness

# Powers of two, and m * 2^k for the cores 12, 20, 28, 36 (with 2^k below and above the vector
# width, so both the SIMD and the portable row paths run).
SIZES = [1, 2, 64, 1024, 4096, 12, 48, 384, 576, 768, 896, 2560]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(n, dtype):
    rng = np.random.default_rng(n)
    x, g, b = inputs(rng, (2, 7, n), n, dtype, (n,), beta=True)
    sess, y = run(make_model(n, dtype, gamma=[n], beta=True), feeds_of(x, g, b))
    assert y.dtype == dtype
    assert_close(y, reference(x, g, b))
    # Symbolic leading dims survive shape inference: rank kept, last dim known.
    assert sess.get_outputs()[0].shape == ["B", "S", n]


def _cpu_has(isa: str) -> bool:
    """Whether this CPU runs the ``isa`` kernel (the flags select_isa checks, from /proc/cpuinfo)."""
    if isa == "portable":
        return True
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M).group(1).split())
    except (OSError, AttributeError):
        return False
    need = {"avx2", "fma", "f16c"} | ({"avx512f"} if isa == "avx512" else set())
    return need <= flags


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("n", [2, 48, 576, 4096])
def test_every_instruction_set(n, isa, monkeypatch, capfd):
    """HADACONV_CPU_ISA picks the kernel; HADACONV_CPU_ISA_LOG makes the library say which one ran.
    Segments narrower than a vector (2^k < the vector width: n = 2, 48) run the portable kernel."""
    if not _cpu_has(isa):
        pytest.skip(f"this CPU lacks {isa} (the library would fall back to a lower instruction set)")
    monkeypatch.setenv("HADACONV_CPU_ISA", isa)
    monkeypatch.setenv("HADACONV_CPU_ISA_LOG", "1")
    f = factorize(n)
    width = {"portable": 1, "avx2": 8, "avx512": 16}[isa]
    expected = isa if n // f.m >= width else "portable"
    rng = np.random.default_rng(1)
    bs = math.gcd(n, 4)
    # Blocks of 8 vectors of this instruction set run the widest block tiles (1 and 2 rows).
    wide = [(n // (8 * width), 8 * width, 8 * width)] if n % (8 * width) == 0 else []
    capfd.readouterr()
    runs = 0
    for dtype in (np.float32, np.float16):
        for gshape in [(n,), (n // bs, bs, bs)] + wide:
            x, g, b = inputs(rng, (5, n), n, dtype, gshape, beta=True)
            sess, y = run(make_model(n, dtype, gamma=list(gshape), beta=True, x_shape=("R", None)), feeds_of(x, g, b))
            assert_close(y, reference(x, g, b))
            for rows in (1, 2, 3):
                assert_close(sess.run(None, feeds_of(x[:rows], g, b))[0], reference(x[:rows], g, b))
            runs += 4
    ran = re.findall(r"HadamardAffine ran the (\w+) kernel", capfd.readouterr().err)
    assert len(ran) == runs and set(ran) == {expected}, ran


@pytest.mark.parametrize("n", [64, 384, 576, 2560])
@pytest.mark.parametrize("gamma", ["none", "vector", "b4", "b16", "b32", "b64", "b3"])
@pytest.mark.parametrize("beta", [False, True], ids=["nobeta", "beta"])
def test_affine_variants(n, gamma, beta):
    """Block gammas run 8 rows at a time with a tile width per row count: 17 rows = 8 + 8 + 1,
    then 1 to 8 rows (b64 is the convert default for n = 576; at 576 and 2560 such calls spread
    their blocks over the threads)."""
    if gamma == "b3" and n % 3:
        pytest.skip("b must divide n")
    b_ = {"none": None, "vector": None, "b4": 4, "b16": 16, "b32": 32, "b64": 64, "b3": 3}[gamma]
    gshape = (n,) if gamma == "vector" else None if b_ is None else (n // b_, b_, b_)
    rng = np.random.default_rng(7)
    x, g, b = inputs(rng, (17, n), n, np.float32, gshape, beta)
    sess, y = run(make_model(n, gamma=gshape, beta=beta, x_shape=("R", None)), feeds_of(x, g, b))
    assert_close(y, reference(x, g, b))
    for rows in range(1, 9):
        y = sess.run(None, feeds_of(x[:rows], g, b))[0]
        assert_close(y, reference(x[:rows], g, b))


@pytest.mark.parametrize("n", [384, 896, 4096])  # Paley I cores (12, 28) are not symmetric
def test_transpose_is_the_inverse(n):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, n)).astype(np.float32)
    _, z = run(make_model(n, x_shape=("R", None)), {"X": x})
    _, back = run(make_model(n, transpose=1, x_shape=("R", None)), {"X": z})
    assert_close(back, x.astype(np.float64))
    _, zt = run(make_model(n, transpose=1, x_shape=("R", None)), {"X": x})
    assert_close(zt, reference(x, transpose=1))
    if n != 4096:
        assert not np.allclose(z, zt, atol=1e-3)  # the transpose did matter


def test_matches_the_torch_op():
    torch = pytest.importorskip("torch")
    from hadaconv.ops import hadamard_affine

    rng = np.random.default_rng(5)
    for n, gshape, inverse in [(576, (n := 576,), False), (384, (96, 4, 4), True), (1024, (64, 16, 16), False)]:
        x, g, b = inputs(rng, (3, n), n, np.float32, gshape, beta=True)
        _, y = run(make_model(n, gamma=list(gshape), beta=True, transpose=int(inverse), x_shape=("R", None)),
                   feeds_of(x, g, b))
        want = hadamard_affine(torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(b), inverse=inverse)
        assert_close(y, want.double().numpy())


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (0, 0, 64)])
def test_zero_rows(shape):
    x = np.zeros(shape, np.float32)
    g = np.ones(64, np.float32)
    _, y = run(make_model(64, gamma=[64], x_shape=("A",) * (len(shape) - 1) + (None,)), {"X": x, "gamma": g})
    assert y.shape == shape


def test_an_x_of_unknown_shape_leaves_y_unknown():
    """X declared without a shape reaches the op's shape inference as rank 0, like a scalar.  Y
    was declared a scalar then, and ONNX Runtime folded Shape(Y) to [] and refused a Transpose
    of Y at session creation (found in review); Y's shape must stay unknown."""
    f = factorize(16)
    node = helper.make_node("HadamardAffine", ["X"], ["Y0"], domain="com.hadaconv", n=16, m=f.m,
                            core=hadamard_core(f.m).astype(int).ravel().tolist(), scale=0.25)
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    for post, want, out_type in ((helper.make_node("Shape", ["Y0"], ["Y"]), np.array([2, 16]), TensorProto.INT64),
                                 (helper.make_node("Transpose", ["Y0"], ["Y"], perm=[1, 0]), reference(x).T,
                                  TensorProto.FLOAT)):
        graph = helper.make_graph([node, post], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("Y", out_type, None)])
        _, y = run(helper.make_model(graph, opset_imports=OPSETS).SerializeToString(), {"X": x})
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def _symbolic_affine_model(gamma_rank: int) -> bytes:
    """X [R, 64] -> Y with gamma and beta graph inputs of symbolic shape (only the kernel can tell)."""
    graph = helper.make_graph(
        [helper.make_node("HadamardAffine", ["X", "gamma", "beta"], ["Y"], domain="com.hadaconv", n=64, m=1,
                          core=[1], scale=0.125)], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["R", 64]),
         helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [f"g{i}" for i in range(gamma_rank)]),
         helper.make_tensor_value_info("beta", TensorProto.FLOAT, ["K"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString()


@pytest.mark.parametrize("gamma, beta, fragments", [
    ((65,), (64,), ("gamma must be [64] or [n/b, b, b]", "[65]")),
    ((16, 4, 5), (64,), ("gamma must be [64] or [n/b, b, b]", "[16, 4, 5]")),
    ((16, 4, 4), (65,), ("beta must be [64], got [65]",)),
])
def test_zero_rows_still_check_gamma_and_beta(gamma, beta, fragments):
    """An empty X computes nothing, but a wrong graph-input gamma or beta is still refused (the
    kernel returned before its shape checks: fuzz case 123 of test_op_sanitizers)."""
    model = _symbolic_affine_model(len(gamma))
    x = np.zeros((0, 64), np.float32)
    _expect_error(model, {"X": x, "gamma": np.ones(gamma, np.float32), "beta": np.ones(beta, np.float32)},
                  *fragments)
    # The same node with right-shaped inputs returns the empty output.
    good = (64,) if len(gamma) == 1 else (16, 4, 4)
    _, y = run(model, {"X": x, "gamma": np.ones(good, np.float32), "beta": np.ones(64, np.float32)})
    assert y.shape == (0, 64)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("n", [2, 16, 1024])
def test_a_core_of_minus_one_negates(n, dtype, isa, monkeypatch):
    """m = 1 with core [-1] (a Hadamard matrix of order 1) is -H_n: both kernels skip the core
    product for m = 1 and once ran it as [1] (fuzz case 43 of test_op_sanitizers: float16, n = 16).
    With a vector gamma, a block gamma (the blocks path folds the scale separately) and beta."""
    if not _cpu_has(isa):
        pytest.skip(f"this CPU lacks {isa}")
    monkeypatch.setenv("HADACONV_CPU_ISA", isa)
    rng = np.random.default_rng(n)
    bs = math.gcd(n, 4)
    for gshape in [(n,), (n // bs, bs, bs)]:
        x, g, b = inputs(rng, (3, n), n, dtype, gshape, beta=True)
        for transpose in (0, 1):
            attrs = dict(n=n, m=1, core=[-1], scale=1 / math.sqrt(n), transpose=transpose)
            _, y = run(make_model(n, dtype, gamma=list(gshape), beta=True, x_shape=("R", None), attrs=attrs),
                       feeds_of(x, g, b))
            minus = reference(-x.astype(np.float64), g, b, transpose)  # -H x = H (-x)
            assert_close(y, minus)


def test_many_rows_use_the_thread_pool():
    rng = np.random.default_rng(11)
    x, g, b = inputs(rng, (3000, 256), 256, np.float32, (256,), beta=True)
    _, y = run(make_model(256, gamma=[256], beta=True, x_shape=("R", None)), feeds_of(x, g, b),
               intra_op_num_threads=2)
    assert_close(y, reference(x, g, b))


# --------------------------------------------------------------------------- constant parameters

ISAS = ["portable", "avx2", "avx512"]  # ones the CPU lacks fall back to the best it has


def const_model(n, dtype, gamma, beta, *, transpose=0, cast_bf16=False) -> bytes:
    """gamma / beta as initializers (prepared once at kernel creation); with ``cast_bf16`` the
    float32 X is cast to bfloat16 around the op (numpy has no bfloat16 feeds)."""
    from onnx import numpy_helper

    f = factorize(n)
    t = TensorProto.BFLOAT16 if cast_bf16 else ONNX_TYPE[dtype]
    inits, names = [], ["Xc" if cast_bf16 else "X"]
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v is None:
            names.append("")
            continue
        tensor = numpy_helper.from_array(v.astype(np.float32) if cast_bf16 else v.astype(dtype), name)
        if cast_bf16:
            tensor = helper.make_tensor(name, TensorProto.BFLOAT16, v.shape, _bf16_round(v).ravel().tolist())
        inits.append(tensor)
        names.append(name)
    while names[-1] == "":
        names.pop()
    node = helper.make_node("HadamardAffine", names, ["Yc" if cast_bf16 else "Y"], domain="com.hadaconv", n=n, m=f.m,
                            core=hadamard_core(f.m).astype(int).ravel().tolist(), scale=1.0 / math.sqrt(n),
                            transpose=transpose)
    nodes = [node]
    xt = TensorProto.FLOAT if cast_bf16 else t
    if cast_bf16:
        nodes = [helper.make_node("Cast", ["X"], ["Xc"], to=TensorProto.BFLOAT16), node,
                 helper.make_node("Cast", ["Yc"], ["Y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", xt, ["R", n])],
                              [helper.make_tensor_value_info("Y", xt, None)], inits)
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString()


def _bf16_round(v):
    import ml_dtypes

    return np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


GAMMAS = {"none": None, "vector": lambda n: (n,), "b4": lambda n: (n // 4, 4, 4), "b16": lambda n: (n // 16, 16, 16),
          "b3": lambda n: (n // 3, 3, 3)}


@pytest.mark.parametrize("isa", ISAS)
def test_largest_core_every_isa(isa, monkeypatch):
    """m = 128, the largest core the op takes, whose table offsets reach the top of the kernel's
    uint16 look-up slots; segments of 16 (AVX-512's row pairs) and 8 (AVX2's), an odd row
    count, against float64 (kron(C, H_L) / sqrt(n), then the affine)."""
    monkeypatch.setenv("HADACONV_CPU_ISA", isa)
    rng = np.random.default_rng(128)
    core = sylvester(7)  # H_128 (sylvester(k) is H of order 2^k)
    for k in (3, 4):
        L = 1 << k
        n = 128 * L
        attrs = dict(n=n, m=128, core=core.astype(int).ravel().tolist(), scale=1.0 / math.sqrt(n))
        x, g, b = inputs(rng, (5, n), n, np.float32, (n,), beta=True)
        _, y = run(make_model(n, gamma=[n], beta=True, x_shape=("R", None), attrs=attrs), feeds_of(x, g, b))
        full = np.kron(core, sylvester(k)) / math.sqrt(n)
        assert_close(y, (x.astype(np.float64) @ full.T) * g + b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [64, 576, 768, 4096, 4608, 5120, 8192, 10240, 96])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_constant_parameters_every_isa(n, dtype, isa, monkeypatch):
    """gamma / beta as initializers, every gamma form, both directions, odd row counts."""
    monkeypatch.setenv("HADACONV_CPU_ISA", isa)
    rng = np.random.default_rng(n)
    np_dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.float32}[dtype]
    for k, (gname, gfun) in enumerate(GAMMAS.items()):
        shape = None if gfun is None else gfun(n)
        if gname == "b3" and n % 3:
            continue
        transpose = k % 2
        x = rng.standard_normal((7 + k, n)).astype(np_dtype)
        g = None if shape is None else rng.standard_normal(shape).astype(np_dtype)
        b = None if gname == "vector" else rng.standard_normal(n).astype(np_dtype)
        model = const_model(n, np_dtype, g, b, transpose=transpose, cast_bf16=dtype == "bf16")
        _, y = run(model, {"X": x})
        if dtype == "bf16":
            # One bfloat16 epsilon (2^-8) of the row's largest value: the output rounding.
            ref = reference(_bf16_round(x), None if g is None else _bf16_round(g), None if b is None else _bf16_round(b),
                            transpose)
            err = np.abs(y - ref).max(axis=1)
            tol = 2.0**-8 * np.abs(ref).max(axis=1)
            assert (err <= tol).all(), f"{gname}: {err.max()} > {tol.min()}"
        else:
            assert_close(y, reference(x, g, b, transpose))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_rows_split_blocks_over_threads(isa, threads, monkeypatch):
    """Calls of 1 to 8 rows whose block gamma is several times 64 KB transform their rows once
    and spread the blocks over the intra-op threads (576 / 64: 2 tasks; 4096 / 64: 16; 4096 / 32
    with 16 blocks a task); each result against the float64 reference, every dtype."""
    monkeypatch.setenv("HADACONV_CPU_ISA", isa)
    rng = np.random.default_rng(threads)
    for n, blk in ((576, 64), (4096, 64), (4096, 32)):
        g = rng.standard_normal((n // blk, blk, blk)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        for dtype in ("f32", "f16", "bf16"):
            np_dtype = np.float16 if dtype == "f16" else np.float32
            sess = runtime.session(const_model(n, np_dtype, g, b, transpose=n == 576, cast_bf16=dtype == "bf16"),
                                   providers=["CPUExecutionProvider"], intra_op_num_threads=threads)
            for rows in range(1, 9):
                x = rng.standard_normal((rows, n)).astype(np_dtype)
                y = sess.run(None, {"X": x})[0]
                if dtype == "bf16":
                    ref = reference(_bf16_round(x), _bf16_round(g), _bf16_round(b), n == 576)
                    assert (np.abs(y - ref).max(axis=1) <= 2.0**-8 * np.abs(ref).max(axis=1)).all()
                elif dtype == "f16":
                    assert_close(y, reference(x, g.astype(np.float16), b.astype(np.float16), n == 576))
                else:
                    assert_close(y, reference(x, g, b, n == 576))


def test_constant_gamma_is_checked_at_session_creation():
    from onnx import numpy_helper

    n = 64
    node = helper.make_node("HadamardAffine", ["X", "gamma"], ["Y"], domain="com.hadaconv", n=n, m=1, core=[1],
                            scale=0.125)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["R", n])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((16, 4, 5), np.float32), "gamma")])
    with pytest.raises(Exception, match=r"HadamardAffine node .*gamma must be \[64\] or \[n/b, b, b\]"):
        runtime.session(helper.make_model(graph, opset_imports=OPSETS).SerializeToString(),
                        providers=["CPUExecutionProvider"])


_SESSION_PEAK = """
import resource, sys
from hadaconv import runtime
model = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sess = runtime.session(model, providers=["CPUExecutionProvider"])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_absent_gamma_and_beta_reserve_nothing_at_session_creation(tmp_path):
    """A graph of a few hundred bytes must not make ONNX Runtime reserve memory by the width its
    nodes declare: eight nodes of n = 2^26 without gamma and beta used to fill 4 GB of default
    vectors at session creation.  Their defaults now come with the first call."""
    n = 1 << 26
    nodes = [helper.make_node("HadamardAffine", [f"x{i}"], [f"x{i + 1}"], domain="com.hadaconv", n=n, m=1,
                              core=[1], scale=1.0) for i in range(8)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["R", n])],
                              [helper.make_tensor_value_info("x8", TensorProto.FLOAT, None)])
    (tmp_path / "m.onnx").write_bytes(helper.make_model(graph, opset_imports=OPSETS).SerializeToString())
    out = subprocess.run([sys.executable, "-c", _SESSION_PEAK, str(tmp_path / "m.onnx")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 256, f"session creation grew the peak RSS by {out.stdout.strip()} MiB"


def test_constant_parameters_many_rows_and_threads():
    """Several tasks share the kernel's scratch slots; two sessions run the same model at once."""
    n = 576
    rng = np.random.default_rng(4)
    g = rng.standard_normal((n // 16, 16, 16)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((1001, n)).astype(np.float32)
    sess = runtime.session(const_model(n, np.float32, g, b), providers=["CPUExecutionProvider"],
                           intra_op_num_threads=2)
    ref = reference(x, g, b)
    results: list = []

    def worker():
        results.append([sess.run(None, {"X": x})[0] for _ in range(3)])

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ys in results:
        for y in ys:
            assert_close(y, ref)


# --------------------------------------------------------------------------- errors

def _expect_error(model, feeds, *fragments):
    with pytest.raises(Exception) as info:
        run(model, feeds)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_errors_are_clear_and_survivable():
    x64 = np.ones((2, 64), np.float32)
    core12 = hadamard_core(12).astype(int).ravel().tolist()
    # Last dimension != n (the model leaves it symbolic, so only the kernel can tell).
    _expect_error(make_model(64, x_shape=("R", "C")), {"X": np.ones((2, 32), np.float32)},
                  "last dimension of X must be n = 64", "[2, 32]")
    # n is not m * 2^k.
    _expect_error(make_model(40, attrs=dict(n=40, m=4, core=[1] * 16, scale=0.1)), {"X": np.ones((1, 40), np.float32)},
                  "n = 40 is not m * 2^k")
    _expect_error(make_model(50, attrs=dict(n=50, m=12, core=core12, scale=0.1)), {"X": np.ones((1, 50), np.float32)},
                  "not a multiple of m = 12")
    # The core: wrong length, wrong entries, missing.
    _expect_error(make_model(384, attrs=dict(n=384, m=12, core=core12[:-1], scale=0.1)),
                  {"X": np.ones((1, 384), np.float32)}, "core has 143 entries, expected m * m = 144")
    _expect_error(make_model(384, attrs=dict(n=384, m=12, core=[2] * 144, scale=0.1)),
                  {"X": np.ones((1, 384), np.float32)}, "only +1 and -1")
    _expect_error(make_model(384, attrs=dict(n=384, m=12, scale=0.1)), {"X": np.ones((1, 384), np.float32)},
                  "missing attribute 'core'")
    _expect_error(make_model(64, attrs=dict(m=1, scale=0.1)), {"X": x64}, "missing attribute 'n'")
    # gamma / beta shapes.
    _expect_error(make_model(64, gamma=["G"], x_shape=("R", None)), {"X": x64, "gamma": np.ones(63, np.float32)},
                  "gamma must be [64] or [n/b, b, b]", "[63]")
    _expect_error(make_model(64, gamma=["A", "B", "C"], x_shape=("R", None)),
                  {"X": x64, "gamma": np.ones((16, 4, 5), np.float32)}, "gamma must be", "[16, 4, 5]")
    _expect_error(make_model(64, beta=True, x_shape=("R", None)), {"X": x64}, "beta")  # missing feed: ORT's error
    bad_beta = helper.make_model(helper.make_graph(
        [helper.make_node("HadamardAffine", ["X", "", "beta"], ["Y"], domain="com.hadaconv", n=64, m=1, core=[1],
                          scale=0.125)], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["R", 64]),
         helper.make_tensor_value_info("beta", TensorProto.FLOAT, ["K"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]), opset_imports=OPSETS).SerializeToString()
    _expect_error(bad_beta, {"X": x64, "beta": np.ones(65, np.float32)}, "beta must be [64], got [65]")
    # Unsupported types: ONNX Runtime refuses them when the session is created.
    with pytest.raises(Exception, match="double"):
        run(make_model(64, np.float64, x_shape=("R", None)), {"X": x64.astype(np.float64)})
    # The process is fine afterwards.
    _, y = run(make_model(64, x_shape=("R", None)), {"X": x64})
    assert_close(y, reference(x64))


def _refused_at_creation(attrs, *fragments):
    """A malformed node must fail when the session is created: it never gets to run."""
    n = attrs.get("n", 64)
    with pytest.raises(Exception) as info:
        runtime.session(make_model(n, x_shape=("R", n), attrs=attrs), providers=["CPUExecutionProvider"])
    msg = str(info.value)
    for frag in ("HadamardAffine", *fragments):
        assert frag in msg, msg


core4 = hadamard_core(4).astype(int).ravel().tolist()


@pytest.mark.parametrize("attrs, fragments", [
    # m = 2 and 3 are no Hadamard orders the kernels take (the 4-row core tiles read past them).
    (dict(n=64, m=2, core=[1, 1, 1, -1], scale=0.125), ["attribute m must be 1 or a multiple of 4", "got 2"]),
    (dict(n=96, m=3, core=[1] * 9, scale=0.1), ["attribute m must be 1 or a multiple of 4"]),
    (dict(n=264, m=132, core=[1] * 132 * 132, scale=0.1), ["up to 128"]),
    (dict(n=64, m=0, core=[1], scale=0.1), ["attribute m"]),
    (dict(n=64, m=-4, core=[1] * 16, scale=0.1), ["attribute m"]),
    (dict(n=0, m=1, core=[1], scale=0.1), ["attribute n must be in [1,"]),
    (dict(n=-64, m=1, core=[1], scale=0.1), ["attribute n must be in [1,"]),
    (dict(n=1 << 40, m=1, core=[1], scale=0.1), ["attribute n must be in [1,"]),
    (dict(n=64, m=4, core=[1] * 16, scale=0.1), ["not a Hadamard matrix"]),
    (dict(n=64, m=4, core=core4, scale=float("nan")), ["scale must be finite and positive"]),
    (dict(n=64, m=4, core=core4, scale=float("inf")), ["scale must be finite and positive"]),
    (dict(n=64, m=4, core=core4, scale=0.0), ["scale must be finite and positive"]),
    (dict(n=64, m=4, core=core4, scale=-0.125), ["scale must be finite and positive"]),
    (dict(n=64, m=4, core=core4, scale=0.125, transpose=2), ["transpose must be 0 or 1"]),
    # The right value with the wrong attribute type must not silently become the default.
    (dict(n=64, m=1, core=[1], scale=1), ["attribute scale must be a float"]),
    (dict(n=64, m=4, core=core4, scale=0.125, transpose=1.0), ["attribute transpose must be an int"]),
    (dict(n=64, m=4.0, core=core4, scale=0.125), ["attribute m must be an int"]),
    # ONNX Runtime reads a list of floats as an empty list of ints ("core has 0 entries" before).
    (dict(n=64, m=4, core=[float(c) for c in core4], scale=0.125), ["attribute core must be a list of ints"]),
])
def test_malformed_nodes_are_refused_at_session_creation(attrs, fragments):
    _refused_at_creation(attrs, *fragments)


def test_refusal_names_the_node():
    graph = helper.make_graph(
        [helper.make_node("HadamardAffine", ["X"], ["Y"], name="layers.3.o_proj.hadamard", domain="com.hadaconv",
                          n=64, m=2, core=[1, 1, 1, -1], scale=0.125)], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["R", 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    with pytest.raises(Exception, match=r"HadamardAffine node 'layers\.3\.o_proj\.hadamard': attribute m"):
        runtime.session(helper.make_model(graph, opset_imports=OPSETS).SerializeToString(),
                        providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- loading

def _header_api_version() -> int | None:
    cache = runtime.BUILD_DIR / "CMakeCache.txt"
    if not cache.is_file():
        return None
    m = re.search(r"^ORT_INCLUDE_DIR:PATH=(.*)$", cache.read_text(), re.M)
    header = os.path.join(m.group(1) if m and m.group(1) else
                          str(runtime.OPS_DIR / "third_party/onnxruntime/include"), "onnxruntime_c_api.h")
    if not os.path.isfile(header):
        return None
    v = re.search(r"#define ORT_API_VERSION (\d+)", open(header).read())
    return int(v.group(1)) if v else None


def test_library_loads_in_a_newer_runtime(library):
    """Built against the fetched 1.21 headers, loaded by the venv's onnxruntime (1.32 here)."""
    built = _header_api_version()
    running = int(ort.__version__.split(".")[1])
    if built is not None:
        assert built <= running
    _, y = run(make_model(64, x_shape=("R", None)), {"X": np.eye(64, dtype=np.float32)})
    assert_close(y, reference(np.eye(64)))


def test_no_cudart_dependency(library):
    """A CUDA build links cudart statically with hidden symbols: nothing CUDA in NEEDED, and
    RegisterCustomOps is the only export."""
    try:
        dyn = subprocess.run(["readelf", "-dW", str(library)], capture_output=True, text=True, check=True).stdout
        syms = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("binutils not available")
    assert "cudart" not in dyn and "libcuda" not in dyn
    exported = {line.split()[-1] for line in syms.splitlines() if line.strip()}
    assert exported == {"RegisterCustomOps"}


def test_one_session_shared_by_threads():
    """ONNX Runtime's Run is thread-safe on one session: the kernel object (prepared once) is
    shared, so nothing per call may live in it.  Each thread feeds its own inputs."""
    n, threads = 576, 4
    rng = np.random.default_rng(9)
    sess = runtime.session(make_model(n, gamma=[n // 16, 16, 16], beta=True, x_shape=("R", None)),
                           providers=["CPUExecutionProvider"], intra_op_num_threads=1)
    data = [inputs(rng, (64, n), n, np.float32, (n // 16, 16, 16), beta=True) for _ in range(threads)]
    refs = [reference(x, g, b) for x, g, b in data]
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(i):
        try:
            start.wait()
            for _ in range(20):
                assert_close(sess.run(None, feeds_of(*data[i]))[0], refs[i])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors


def test_get_library_path(monkeypatch, tmp_path, library):
    """A str, never a build: the override, the package's copy, the dev build, else one clear error."""
    assert isinstance(library, str) and os.path.isabs(library) and os.path.isfile(library)
    monkeypatch.setenv("HADACONV_OPS_LIB", library)
    assert runtime.get_library_path() == library
    monkeypatch.setenv("HADACONV_OPS_LIB", str(tmp_path / "missing.so"))
    with pytest.raises(HadaconvError, match="does not exist"):
        runtime.get_library_path()
    monkeypatch.delenv("HADACONV_OPS_LIB")
    monkeypatch.setattr(runtime, "PACKAGE_LIBRARY", tmp_path / "pkg" / runtime.LIBRARY_NAME)
    monkeypatch.setattr(runtime, "BUILD_DIR", tmp_path / "build")
    monkeypatch.setattr(runtime, "build_ops", lambda *a, **k: pytest.fail("get_library_path compiled"))
    with pytest.raises(HadaconvError, match="hadaconv build-ops"):
        runtime.get_library_path()


def test_build_ops_in_an_installed_wheel_says_there_is_nothing_to_build(monkeypatch, tmp_path, library):
    """Installed from a wheel there are no sources, and the library shipped with the package: a
    newcomer read "the sources are not here" as something missing."""
    monkeypatch.setattr(runtime, "OPS_DIR", tmp_path / "custom_ops")
    monkeypatch.setattr(runtime, "PACKAGE_LIBRARY", __import__("pathlib").Path(library))
    shipped = re.escape(library)
    with pytest.raises(HadaconvError, match=f"^nothing to build: this installation ships its op library, {shipped} "):
        runtime.build_ops()
    monkeypatch.setattr(runtime, "PACKAGE_LIBRARY", tmp_path / "pkg" / runtime.LIBRARY_NAME)
    with pytest.raises(HadaconvError, match="the op library sources are not here"):
        runtime.build_ops()


def test_session_options_and_config_entries():
    """Keyword options set SessionOptions attributes, ``config_entries`` ONNX Runtime's session
    config keys (the benchmarks stop idle worker threads spinning this way); an unknown
    attribute is one HadaconvError line."""
    from hadaconv.errors import HadaconvError

    opts = runtime.make_session_options(intra_op_num_threads=1,
                                        config_entries={"session.force_spinning_stop": "1"})
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(HadaconvError, match="no option 'not_an_option'"):
        runtime.make_session_options(not_an_option=1)


@pytest.mark.parametrize("n", [1, 4, 12, 64, 576, 768, 1024, 2 * 20 * 64])
def test_the_factored_reference_is_the_dense_matrix(n):
    """The float64 reference every op test compares with applies hadaconv's H_n by its
    Kronecker factors; here it is held to the dense matrix, both directions."""
    from hadaconv.hadamard import hadamard_matrix
    from op_reference import hadamard_rows

    x = np.random.default_rng(n).standard_normal((3, n))
    h = hadamard_matrix(n, normalized=True)
    np.testing.assert_allclose(hadamard_rows(x), x @ h.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(hadamard_rows(x, transpose=1), x @ h, rtol=0, atol=1e-12)
