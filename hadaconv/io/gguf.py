"""A pre-check of a GGUF file's metadata, before gguf-py parses it.

gguf-py (which transformers reads GGUF files with) builds several numpy views per element of every
metadata array: 2,000,000 empty strings, 16 MB of file, took 3.5 GB and 45 s to parse (a security
review).  The header's key-value section is walked here with bounded reads (format: ggml's
docs/gguf.md, "File Structure") and the total of array elements is capped.  Anything else that is
wrong with the file is left to the load, which reports it in one line.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from hadaconv.errors import ModelFormatError
from hadaconv.io.files import file_identity, open_regular

#: Metadata array elements a file may hold in all.  Real vocabularies stay far under it: Gemma 3's
#: 262,144 tokens with their scores and types are 786,432 elements, Llama 3's tokens, types and
#: 280,147 merges 536,659, Qwen2.5's about 455,000.
MAX_ARRAY_ELEMENTS = 1_500_000

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_STRING, _ARRAY = 8, 9

_checked: set[tuple] = set()


class _Short(Exception):
    """The header ends early or lies: the load's own reader says how."""


def _read(f: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) < size:
        raise _Short
    return struct.unpack(fmt, raw)[0]


def _skip(f: BinaryIO, size: int, end: int) -> None:
    if size < 0 or f.tell() + size > end:
        raise _Short
    f.seek(size, 1)


def _skip_value(f: BinaryIO, kind: int, end: int, depth: int = 0) -> int:
    """Skip one value of ``kind``; returns the array elements it held (nested ones included)."""
    if kind in _FIXED:
        _skip(f, _FIXED[kind], end)
        return 0
    if kind == _STRING:
        _skip(f, _read(f, "<Q"), end)
        return 0
    if kind != _ARRAY or depth > 4:
        raise _Short
    inner, count = _read(f, "<I"), _read(f, "<Q")
    if count > MAX_ARRAY_ELEMENTS:
        return count
    if inner in _FIXED:
        _skip(f, _FIXED[inner] * count, end)
        return count
    total = count
    for _ in range(count):
        total += _skip_value(f, inner, end, depth + 1)
        if total > MAX_ARRAY_ELEMENTS:
            break
    return total


def check_metadata(path: Path) -> None:
    """Refuse a GGUF file whose metadata arrays hold more than :data:`MAX_ARRAY_ELEMENTS`
    elements in all (ModelFormatError), reading only its header; once per file identity."""
    key = file_identity(path)
    if key in _checked:
        return
    with open_regular(path) as f:
        end = f.seek(0, 2)
        f.seek(0)
        total = 0
        try:
            if f.read(4) != b"GGUF" or _read(f, "<I") < 2:
                raise _Short
            _read(f, "<Q")  # tensor count: the load checks the tensors
            for _ in range(_read(f, "<Q")):
                _skip(f, _read(f, "<Q"), end)  # the key
                total += _skip_value(f, _read(f, "<I"), end)
                if total > MAX_ARRAY_ELEMENTS:
                    raise ModelFormatError(
                        f"{path}: its metadata arrays hold more than {MAX_ARRAY_ELEMENTS:,} elements, more than any "
                        "model's vocabulary (reading them would take gigabytes)")
        except _Short:
            return
    _checked.add(key)
