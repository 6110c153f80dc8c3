"""hadaconv: replace the dense attention output projections of trained transformers with
fast Walsh-Hadamard projections, and deploy them."""

from hadaconv._version import __version__
from hadaconv.errors import HadaconvError
from hadaconv.hadamard import factorize, hadamard_matrix
from hadaconv.nn import HadamardProjection
from hadaconv.ops import fwht, hadamard_affine

__all__ = [
    "HadaconvError",
    "HadamardProjection",
    "__version__",
    "factorize",
    "fwht",
    "hadamard_affine",
    "hadamard_matrix",
]
