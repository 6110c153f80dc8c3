"""A pre-check of a GGUF file's header, before gguf-py parses it.

gguf-py (which transformers reads GGUF files with) builds several numpy views per metadata entry
and per element of every metadata array: 2,000,000 empty strings, 16 MB of file, took 3.5 GB and
45 s to parse, and 200,000 plain entries 630 MB (a security review).  The header (format:
ggml's docs/gguf.md, "File Structure") is walked here with bounded reads, in either byte order,
and its counts are capped.  A header the walk cannot follow is left to the load, which reports
it in one line, except arrays nested deeper than any model writes, which are refused here.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from hadaconv.errors import ModelFormatError
from hadaconv.io.files import file_identity, open_regular

__all__ = ["MAX_ARRAY_ELEMENTS", "MAX_ENTRIES", "MAX_TENSORS", "check_metadata"]

#: Metadata array elements a file may hold in all.  Real vocabularies stay far under it: Gemma 3's
#: 262,144 tokens with their scores and types are 786,432 elements, Llama 3's tokens, types and
#: 280,147 merges 536,659, Qwen2.5's 455,259, SmolLM2's 147,205.
MAX_ARRAY_ELEMENTS = 1_500_000
#: Metadata entries (key-value pairs): real files hold a few dozen (SmolLM2's 37).
MAX_ENTRIES = 10_000
#: Tensors: a Llama of 126 blocks has about 1,140; MoE files keep each layer's experts in one.
MAX_TENSORS = 65_536
#: Array nesting: models write arrays of numbers or strings (depth 1).
MAX_DEPTH = 4

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_STRING, _ARRAY = 8, 9

_checked: set[tuple] = set()


class _Short(Exception):
    """The header ends early or holds an unknown type: the load's own reader says how."""


class _Header:
    """Bounded reads of one file's header in its byte order."""

    def __init__(self, f: BinaryIO, end: int, order: str, path: Path) -> None:
        self.f, self.end, self.order, self.path = f, end, order, path

    def number(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) < size:
            raise _Short
        return struct.unpack(self.order + fmt, raw)[0]

    def skip(self, size: int) -> None:
        if size < 0 or self.f.tell() + size > self.end:
            raise _Short
        self.f.seek(size, 1)

    def value(self, kind: int, depth: int = 0) -> int:
        """Skip one value of ``kind``; returns the array elements it held (nested ones included)."""
        if kind in _FIXED:
            self.skip(_FIXED[kind])
            return 0
        if kind == _STRING:
            self.skip(self.number("Q"))
            return 0
        if kind != _ARRAY:
            raise _Short
        if depth >= MAX_DEPTH:
            raise ModelFormatError(f"{self.path}: its metadata nests arrays deeper than {MAX_DEPTH}, which no model "
                                   "writes")
        inner, count = self.number("I"), self.number("Q")
        _cap(self.path, count, MAX_ARRAY_ELEMENTS, "metadata array elements")
        if inner in _FIXED:
            self.skip(_FIXED[inner] * count)
            return count
        total = count
        for _ in range(count):
            total += self.value(inner, depth + 1)
            _cap(self.path, total, MAX_ARRAY_ELEMENTS, "metadata array elements")
        return total


def _cap(path: Path, count: int, most: int, what: str) -> None:
    if count > most:
        raise ModelFormatError(f"{path}: its header declares more than {most:,} {what}, more than any model has "
                               "(reading them would take gigabytes)")


def check_metadata(path: Path) -> None:
    """Refuse a GGUF file whose header declares more tensors, metadata entries or metadata array
    elements than any model has, or nests arrays deeper than :data:`MAX_DEPTH`
    (ModelFormatError), reading only its header; once per file identity."""
    key = file_identity(path)
    if key in _checked:
        return
    with open_regular(path) as f:
        end = f.seek(0, 2)
        f.seek(0)
        try:
            if f.read(4) != b"GGUF":
                raise _Short
            raw = f.read(4)
            # gguf-py's rule: a version whose low half is zero was written big-endian.
            order = ">" if len(raw) == 4 and struct.unpack("<I", raw)[0] & 0xFFFF == 0 else "<"
            header = _Header(f, end, order, path)
            _cap(path, header.number("Q"), MAX_TENSORS, "tensors")
            entries = header.number("Q")
            _cap(path, entries, MAX_ENTRIES, "metadata entries")
            total = 0
            for _ in range(entries):
                header.skip(header.number("Q"))  # the key
                total += header.value(header.number("I"))
                _cap(path, total, MAX_ARRAY_ELEMENTS, "metadata array elements")
        except _Short:
            return
    _checked.add(key)
