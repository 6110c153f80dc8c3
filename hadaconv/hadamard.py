"""Hadamard matrices of order n = m * 2^k.

The convention used everywhere in hadaconv (Python, ONNX export and the C++/CUDA kernels):

    H_n = H_m (x) H_{2^k}

a Kronecker product of a small +-1 "core" matrix H_m and the Sylvester matrix H_{2^k} in
natural order.  Index i of a length-n vector is ``i = a * 2^k + b`` with ``a < m``, ``b < 2^k``.
The orthonormal transform is ``H_n / sqrt(n)``.  H_m may be non-symmetric (Paley I cores are
skew-type), so the inverse of the orthonormal transform is its *transpose*, not itself.

Cores come from three classical constructions:

* Sylvester: m = 1 (the pure power-of-two case).
* Paley I: order q + 1 for a prime power q = 3 (mod 4).
* Paley II: order 2 (q + 1) for a prime power q = 1 (mod 4).

Prime powers need arithmetic in GF(p^e) (for example 28 = 27 + 1 and 52 = 2 (25 + 1)), which
this module implements with small polynomial tables.  For a given n the smallest constructible
core m is chosen, because the dense m x m step is the only part that costs more than O(log n)
per element.

Everything here is pure and cached; the matrices returned are read-only numpy arrays.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from hadaconv.errors import HadaconvError

__all__ = [
    "MAX_ORDER",
    "Factorization",
    "UnsupportedSizeError",
    "factorize",
    "hadamard_core",
    "hadamard_matrix",
    "is_supported",
    "nearest_supported",
    "supported_cores",
]


#: The largest order hadaconv builds: the op library's limit on n (``kMaxWidth`` in
#: custom_ops/src/hadamard_op.cc), far above any model width.
MAX_ORDER = 1 << 26


class UnsupportedSizeError(HadaconvError, ValueError):
    """No Hadamard construction is known to hadaconv for this order."""


@dataclass(frozen=True)
class Factorization:
    """``n = m * 2**k`` with the core built by ``construction``."""

    n: int
    m: int
    k: int
    construction: str  # "sylvester", "paley1(q)" or "paley2(q)"

    def __str__(self) -> str:
        if self.m == 1:
            return f"{self.n} = 2^{self.k}"
        return f"{self.n} = {self.m} x 2^{self.k} ({self.construction})"


# --------------------------------------------------------------------------- finite fields


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return (p, e) with q = p**e for a prime p, or None."""
    if q < 2:
        return None
    # Trial division up to sqrt(q): a prime q near MAX_ORDER takes 8,192 steps, not 67 million.
    # Plain int arithmetic, no math.isqrt: torch.compile traces this (from the op's width check)
    # and cannot trace isqrt.
    p, d = q, 2
    while d * d <= q:
        if q % d == 0:
            p = d
            break
        d += 1
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of polynomial a modulo monic f over GF(p); coefficients low to high."""
    a = [c % p for c in a]
    d = len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i]
        if c:
            for j in range(d + 1):
                a[i - d + j] = (a[i - d + j] - c * f[j]) % p
    return (a + [0] * d)[:d]


def _is_irreducible(f: list[int], p: int) -> bool:
    d = len(f) - 1
    for deg in range(1, d // 2 + 1):
        for low in itertools.product(range(p), repeat=deg):
            if not any(_polymod(f, list(low) + [1], p)):
                return False
    return True


@functools.lru_cache(maxsize=None)
def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """For GF(q): the table diff[i, j] = index of (x_i - x_j) and chi[x] (0, +1 or -1).

    Elements are numbered by their base-p digits (polynomial coefficients, low first).
    """
    p, e = _prime_power(q)  # type: ignore[misc]
    digits = np.array(list(itertools.product(range(p), repeat=e)), dtype=np.int64)[:, ::-1]
    weights = p ** np.arange(e, dtype=np.int64)
    if e == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        f = next(
            list(low) + [1]
            for low in itertools.product(range(p), repeat=e)
            if low[0] != 0 and _is_irreducible(list(low) + [1], p)
        )
        squares = set()
        for row in digits[1:]:
            sq = np.convolve(row, row) % p
            squares.add(int(np.dot(_polymod(sq.tolist(), f, p), weights)))
    chi = np.full(q, -1, dtype=np.int64)
    chi[0] = 0
    chi[sorted(squares)] = 1
    diff = (((digits[:, None, :] - digits[None, :, :]) % p) * weights).sum(-1)
    return diff, chi


def _jacobsthal(q: int) -> np.ndarray:
    diff, chi = _quadratic_character(q)
    return chi[diff]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q = 3 (mod 4): H = I + S with S skew-symmetric."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2 (q + 1), q = 1 (mod 4), from the symmetric conference matrix."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(
        np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])
    )


def _core_construction(m: int) -> str | None:
    """Name the construction of a core of order m (not a power of two), or None."""
    if m == 1:
        return "sylvester"
    if m % 4:
        return None
    pp = _prime_power(m - 1)
    if pp and (m - 1) % 4 == 3:
        return f"paley1({m - 1})"
    pp = _prime_power(m // 2 - 1)
    if pp and (m // 2 - 1) % 4 == 1:
        return f"paley2({m // 2 - 1})"
    return None


# --------------------------------------------------------------------------- public API


@functools.lru_cache(maxsize=None)
def _factorize(n: int) -> Factorization | None:
    if n < 1 or n > MAX_ORDER:
        return None
    t = (n & -n).bit_length() - 1
    odd = n >> t
    if odd == 1:
        return Factorization(n, 1, t, "sylvester")
    for j in range(t + 1):
        m = odd << j
        construction = _core_construction(m)
        if construction:
            return Factorization(n, m, t - j, construction)
    return None


def is_supported(n: int) -> bool:
    """Whether hadaconv can build a Hadamard matrix of order n."""
    return _factorize(int(n)) is not None


def nearest_supported(n: int) -> tuple[int | None, int | None]:
    """The nearest supported orders strictly below and above n (below is None for n <= 1, above
    for n >= MAX_ORDER)."""
    below = next((c for c in range(min(n, MAX_ORDER + 1) - 1, 0, -1) if is_supported(c)), None)
    above = next((c for c in range(max(n + 1, 1), MAX_ORDER + 1) if is_supported(c)), None)
    return below, above


def factorize(n: int) -> Factorization:
    """Split n into ``m * 2**k`` with the smallest constructible core m.

    Raises UnsupportedSizeError (one line, naming the nearest supported sizes) otherwise.
    """
    if int(n) < 1:
        raise UnsupportedSizeError(f"a Hadamard order is a positive size, got {n}")
    if int(n) > MAX_ORDER:
        raise UnsupportedSizeError(f"Hadamard orders above 2^26 = {MAX_ORDER:,} are not supported "
                                   f"(the op library's limit), got {n}")
    f = _factorize(int(n))
    if f is None:
        below, above = nearest_supported(int(n))
        near = f"{below} or {above}" if below else str(above)
        raise UnsupportedSizeError(
            f"no Hadamard matrix of order {n} can be built (supported orders are m * 2^k with "
            f"m = 1, q+1 or 2(q+1) for a prime power q); nearest supported sizes: {near}"
        )
    return f


@functools.lru_cache(maxsize=None)
def hadamard_core(m: int) -> np.ndarray:
    """The m x m +-1 core matrix (int8, read-only); m = 1 gives [[1]].

    Its rows are mutually orthogonal: ``H H^T = m I``.
    """
    construction = _core_construction(m)
    if construction is None:
        raise UnsupportedSizeError(f"{m} is not a Hadamard core order hadaconv can build")
    if m == 1:
        h = np.ones((1, 1), dtype=np.int64)
    elif construction.startswith("paley1"):
        h = _paley1(m - 1)
    else:
        h = _paley2(m // 2 - 1)
    out = h.astype(np.int8)
    out.setflags(write=False)
    return out


def sylvester(k: int) -> np.ndarray:
    """The 2^k x 2^k Sylvester matrix in natural order (int8)."""
    h = np.ones((1, 1), dtype=np.int8)
    base = np.array([[1, 1], [1, -1]], dtype=np.int8)
    for _ in range(k):
        h = np.kron(base, h)
    return h


def hadamard_matrix(n: int, *, normalized: bool = False, dtype=np.float64) -> np.ndarray:
    """The dense n x n matrix ``H_m (x) H_{2^k}`` (divided by sqrt(n) if ``normalized``).

    Dense matrices are for references and tests; the transform itself never builds one.
    """
    f = factorize(n)
    h = np.kron(hadamard_core(f.m), sylvester(f.k)).astype(dtype)
    return h / np.sqrt(n) if normalized else h


def supported_cores(limit: int) -> list[int]:
    """All core orders m <= limit that hadaconv can build (1 included)."""
    return [m for m in range(1, limit + 1) if _core_construction(m)]
