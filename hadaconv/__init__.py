"""hadaconv: replace the dense attention output projections of trained transformers with
fast Walsh-Hadamard projections, and deploy them."""

from hadaconv import distill
from hadaconv._version import __version__
from hadaconv.swap import patch
from hadaconv.errors import HadaconvError
from hadaconv.export import export_onnx
from hadaconv.hadamard import factorize, hadamard_matrix
from hadaconv.io import load
from hadaconv.nn import HadamardProjection
from hadaconv.runtime import get_library_path
from hadaconv.ops import fwht, hadamard_affine

__all__ = [
    "HadaconvError",
    "HadamardProjection",
    "__version__",
    "distill",
    "export_onnx",
    "factorize",
    "fwht",
    "get_library_path",
    "hadamard_affine",
    "hadamard_matrix",
    "load",
    "patch",
]
