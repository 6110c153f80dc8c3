"""Translations of the ``hadaconv::*`` torch ops for ``torch.onnx.export(..., dynamo=True)``.

Two forms, chosen per export:

* **custom** (default): one ``com.hadaconv::HadamardAffine`` node per op, run by the op library
  ``libhadaconv_ort.so`` (see ``custom_ops/README.md`` for the contract).  The ``m x m`` core is
  written into the node's attributes from :func:`hadaconv.hadamard.hadamard_core`, so the C++
  side never rebuilds it.
* **portable**: standard ONNX ops only (runs in any ONNX Runtime, or any other ONNX backend).
  The Kronecker form: the row ``[..., n]`` is viewed as ``[rows, m, f_1, ..., f_r]`` and every
  factor is one MatMul with a small constant +-1 matrix (the Sylvester blocks ``H_f``, then the
  core ``H_m``), then ``Mul`` for a vector gamma or a batched ``MatMul`` over ``[n/b, b, b]``
  blocks, then ``Add`` for beta.  Chosen by measurement against radix-2 butterflies written in
  standard ops (``benchmarks/bench_e2e.py --portable-forms``): a few MatMuls make a few passes
  over memory where butterflies make ``log2 n`` passes of slices, concats and adds.

The translation functions are plain Python functions traced by the exporter: they read the
width from the input's static last dimension and emit the nodes for it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import numpy as np
import onnx.defs
import onnxscript
from onnxscript import ir
from onnxscript import opset18 as op

from hadaconv.errors import HadaconvError
from hadaconv.hadamard import factorize, hadamard_core, sylvester
from hadaconv.runtime import OP_DOMAIN as DOMAIN, OP_VERSION

__all__ = ["DOMAIN", "OPSET", "Form", "kronecker_factors", "translation_table"]

Form = Literal["custom", "portable"]
OPSET = 18  # the standard opset of every exported graph (LayerNorm/ReduceMean forms of 18 run in ORT >= 1.14)
#: Largest Sylvester factor multiplied in one MatMul in the portable form.  Two factors of
#: about sqrt(2^k) cover every width up to 2^14 with two small MatMuls (as benchmarked).
MAX_FACTOR = 128

_HALF = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def _schema() -> onnx.defs.OpSchema:
    """The op's schema, handed to onnxscript directly (nothing is registered globally)."""
    param, option, attr = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption, onnx.defs.OpSchema.Attribute
    kind = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        "HadamardAffine", DOMAIN, OP_VERSION,
        doc="Y = gamma (scale * H X) + beta over the last axis, H = H_m (x) H_{2^k}",
        inputs=[param("X", "T"), param("gamma", "T", param_option=option.Optional),
                param("beta", "T", param_option=option.Optional)],
        outputs=[param("Y", "T")],
        # Exactly the types the CPU and CUDA kernels implement.
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "floating-point tensors")],
        attributes=[attr("n", kind.INT, "width"), attr("m", kind.INT, "core order"),
                    attr("core", kind.INTS, "m x m +-1 core, row-major"), attr("scale", kind.FLOAT, "scale"),
                    attr("transpose", kind.INT, "1 applies H^T")],
    )


_HADAMARD_AFFINE = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, OP_VERSION), "HadamardAffine", _schema())


def _width(x: Any) -> int:
    """The static width of the transformed (last) axis."""
    n = x.shape[-1] if x.shape is not None else None
    if not isinstance(n, int):
        raise HadaconvError(f"a Hadamard transform over a dynamic last axis cannot be exported (shape {x.shape})")
    return n


def kronecker_factors(k: int) -> list[int]:
    """Orders of the Sylvester factors of ``H_{2^k}`` as multiplied: as few as possible, each at
    most MAX_FACTOR, balanced (2^10 -> [32, 32], 2^4 -> [16])."""
    if k == 0:
        return []
    count = math.ceil(k / int(math.log2(MAX_FACTOR)))
    sizes = [k // count + (i < k % count) for i in range(count)]
    return [1 << s for s in sizes]


def _const(array: np.ndarray) -> Any:
    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def _shape(*dims: int) -> Any:
    return _const(np.array(dims, dtype=np.int64))


def _custom(x, gamma, beta, scale: float, inverse: bool):
    if x.dtype == ir.DataType.DOUBLE:
        raise HadaconvError("the custom op has float32, float16 and bfloat16 kernels only: export a float64 model "
                            "with the portable form (form='portable') or convert it to float32 first")
    n = _width(x)
    f = factorize(n)
    core = hadamard_core(f.m).astype(np.int64).ravel().tolist()
    inputs = [x, gamma, beta]
    while inputs[-1] is None:  # trailing absent optionals are dropped; a middle one becomes ""
        inputs.pop()
    return _HADAMARD_AFFINE(*inputs, n=n, m=f.m, core=core, scale=float(scale), transpose=int(inverse))


def _portable(x, gamma, beta, scale: float, inverse: bool):
    n = _width(x)
    f = factorize(n)
    half = x.dtype in _HALF
    # Half types accumulate in float32, as the op contract says.
    dtype = np.float64 if x.dtype == ir.DataType.DOUBLE else np.float32
    y = op.Cast(x, to=ir.DataType.FLOAT) if half else x
    factors = kronecker_factors(f.k)
    for i, order in enumerate(reversed(factors)):  # the last factor first: it is the contiguous axis
        h = sylvester(order.bit_length() - 1).astype(dtype)  # symmetric: H^T = H
        if i == 0:
            h = h * dtype(scale)  # the scale rides on the first MatMul instead of a pass of its own
            y = op.MatMul(op.Reshape(y, _shape(-1, order)), _const(h))
        else:
            inner = math.prod(factors[len(factors) - i:])
            y = op.MatMul(_const(h), op.Reshape(y, _shape(-1, order, inner)))
    if f.m > 1:
        core = hadamard_core(f.m).astype(dtype)
        if not factors:
            core = core * dtype(scale)
            y = op.MatMul(op.Reshape(y, _shape(-1, f.m)), _const(core if inverse else core.T))
        else:
            y = op.MatMul(_const(core.T if inverse else core), op.Reshape(y, _shape(-1, f.m, n // f.m)))
    elif not factors:
        y = op.Mul(y, _const(np.array(scale, dtype=dtype)))
    if gamma is not None:
        g = op.Cast(gamma, to=ir.DataType.FLOAT) if half else gamma
        if gamma.shape is not None and len(gamma.shape) == 3:
            nb, b = int(gamma.shape[0]), int(gamma.shape[1])
            # [rows, nb, b] -> [nb, rows, b] @ gamma_i^T -> back: one batched MatMul of nb blocks.
            blocks = op.Transpose(op.Reshape(y, _shape(-1, nb, b)), perm=[1, 0, 2])
            y = op.Transpose(op.MatMul(blocks, op.Transpose(g, perm=[0, 2, 1])), perm=[1, 0, 2])
            y = op.Reshape(y, _shape(-1, n))
        else:
            y = op.Mul(op.Reshape(y, _shape(-1, n)), g)
    if beta is not None:
        y = op.Add(op.Reshape(y, _shape(-1, n)), op.Cast(beta, to=ir.DataType.FLOAT) if half else beta)
    y = op.Reshape(y, op.Shape(x))
    return op.CastLike(y, x) if half else y


def _fwht(translate: Callable) -> Callable:
    def fwht(x, scale: float, inverse: bool):
        return translate(x, None, None, scale, inverse)

    return fwht


def translation_table(form: Form = "custom") -> dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export`` covering both hadaconv ops."""
    import torch

    import hadaconv.ops  # noqa: F401  (registers torch.ops.hadaconv.*)

    if form not in ("custom", "portable"):
        raise HadaconvError(f"unknown export form {form!r}: expected 'custom' or 'portable'")
    translate = _custom if form == "custom" else _portable
    return {
        torch.ops.hadaconv.hadamard_affine.default: translate,
        torch.ops.hadaconv.fwht.default: _fwht(translate),
    }
