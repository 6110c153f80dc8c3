"""Reading untrusted model files: JSON configs, safetensors headers (checked against the file's
size before any tensor is read) and data, shard indexes; the names of a converted folder's files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

from hadaconv.errors import ModelFormatError

__all__ = ["META_KEY", "SENTENCE_CONFIG", "SHARD_INDEX", "TIED_KEY", "TOKENIZER_FILES", "WEIGHTS",
           "check_safetensors", "converted_meta", "file_identity", "first_line", "folder_weights", "open_regular",
           "plain_name", "read_json", "read_safetensors", "shard_map", "source_key"]


WEIGHTS = "model.safetensors"


#: sentence-transformers' settings of its Transformer module, beside the model's files: its
#: ``max_seq_length`` is how many tokens the model reads (:func:`hadaconv.io.converted.load_tokenizer`),
#: so it travels with the tokenizer's files.
SENTENCE_CONFIG = "sentence_bert_config.json"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "generation_config.json",
    SENTENCE_CONFIG,
)

#: The files of TOKENIZER_FILES that hold a vocabulary: a folder without one of them has no
#: tokenizer to load, whatever else it holds (a chat template or a tokenizer_config.json left
#: behind when the others were deleted).
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")


#: safetensors metadata: {alias: stored name} for tensors stored once.  It also marks a converted
#: model's weights for :func:`hadaconv.io.check_model_config`: save_converted always writes it, and a streamed
#: conversion's shards carry "{}" (nothing tied) since 2026-12-05; older shards are known by their
#: folder.
TIED_KEY = "hadaconv.tied"


SHARD_INDEX = "model.safetensors.index.json"


def file_identity(path: Path) -> tuple[str, int, int, int]:
    """What keys a file read once per process (its resolved path, inode, size and modification
    time): a file written again, or renamed over, is another."""
    stat = path.stat()
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


def source_key(source: str | os.PathLike, *, config: str | os.PathLike | None = None,
               dtype: Any = "auto", device: str = "cpu") -> str | None:
    """A name (32 hex digits) for the model at ``source`` as its files are now, read in ``dtype``
    onto a ``device`` type (a conversion on the CPU computes half precision in float32): a hash of
    the identities (:func:`file_identity`) of ``source`` (a file, or every file in the folder) and
    of ``config`` (a config.json or its folder), so that a file written again gives another name.
    None where they cannot be read (a missing path)."""
    paths = [Path(source)] + ([Path(config)] if config is not None else [])
    try:
        files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
        identities = [file_identity(f) for f in files]
    except OSError:
        return None
    if not identities:
        return None
    text = json.dumps([identities, str(dtype).removeprefix("torch."), device])  # "bfloat16", torch.bfloat16 alike
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


#: The most bytes :func:`read_json` reads: hadaconv's JSON files (config.json, report.json with its
#: per-layer table, a shard index, bundle metadata) are kilobytes; a shard index of a 400B model is
#: under a megabyte.
JSON_LIMIT = 64 << 20


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading in binary, if it is a regular file: a FIFO (which a folder
    unpacked from a tar archive can hold) would block the open until a writer comes, and a
    device such as /dev/zero never ends.

    Raises:
        ModelFormatError: not a regular file.  OSError: the open itself failed.
    """
    if path.exists() and not path.is_file():  # a device or FIFO is not opened at all
        raise ModelFormatError(f"{path} is not a regular file")
    # Opened without blocking and checked again on the open file: one swapped in meanwhile cannot stall us.
    f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY), "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ModelFormatError(f"{path} is not a regular file")
    return f


def read_json(path: Path, limit: int = JSON_LIMIT) -> dict:
    """The JSON object in ``path`` (an untrusted file): at most ``limit`` bytes are read, and only
    from a regular file (a link to /dev/zero would never end).

    Raises:
        ModelFormatError: unreadable, not a regular file or over ``limit``, not UTF-8 JSON
            (nesting deeper than Python's stack included), or not an object.
    """
    try:
        with open_regular(path) as f:
            raw = f.read(limit + 1)
        if len(raw) > limit:
            raise ModelFormatError(f"{path} is larger than {limit:,} bytes")
        data = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror or first_line(exc)}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError, as
        # is an integer past Python's 4300 digits; RecursionError: nesting past Python's stack
        raise ModelFormatError(f"{path} is not a JSON file: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} does not hold a JSON object")
    return data


#: The key of a converted model's config.json under which hadaconv records the conversion
#: (:func:`hadaconv.io.converted.hadaconv_meta`).
META_KEY = "hadaconv"


def converted_meta(config: dict | str | os.PathLike, where: str | os.PathLike = "config.json") -> dict | None:
    """The ``hadaconv`` section of a converted model's config: ``config`` is the parsed dict (read
    from the file ``where``, named in the error), a JSON file (read as JSON whatever its name) or
    the folder holding config.json.  None where there is none: no such file, no section, or a
    section that is null.  The one test of whether a model is a converted one, from its config.

    Raises:
        ModelFormatError: the file unreadable (:func:`read_json`), or a section that is not a
            JSON object.
    """
    if not isinstance(config, dict):
        where = Path(config) / "config.json" if Path(config).is_dir() else Path(config)
        if not where.is_file():
            return None
        config = read_json(where)
    meta = config.get(META_KEY)
    if meta is not None and not isinstance(meta, dict):
        raise ModelFormatError(f"the {META_KEY!r} section of {where} is not a JSON object")
    return meta


def check_safetensors(path: Path) -> dict:
    """Check a safetensors file's header and that its data is all there (a truncated download
    otherwise fails late, or deep inside a library); returns the header."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if not all(isinstance(end, int) and end >= 0 for end in ends):
            raise ValueError("data_offsets must be byte offsets")
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        raise ModelFormatError(f"{path} is not a valid safetensors file ({first_line(exc)})") from None
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ModelFormatError(f"{path} is truncated: {size} bytes, its header describes {expected}")
    return header


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with tied aliases (see save_converted) restored."""
    from safetensors import safe_open

    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ModelFormatError(f"cannot read {path}: {first_line(exc)}") from None
    try:
        for alias, name in json.loads(metadata.get(TIED_KEY, "{}")).items():
            tensors[alias] = tensors[name]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:  # untrusted metadata
        raise ModelFormatError(f"{path}: its {TIED_KEY} metadata does not name stored tensors "
                               f"({first_line(exc)})") from None
    return tensors


def plain_name(name: Any) -> bool:
    """Whether ``name`` (from an untrusted file) is the name of an entry in a folder: a string,
    not empty, no path separator, not ``.`` or ``..``, so that ``folder / name`` stays inside."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def shard_map(folder: Path, name: str = SHARD_INDEX) -> dict[str, Path]:
    """{tensor name: shard file} from the shard index ``folder / name``.  The index is
    untrusted: every shard must be a plain file name, so nothing outside ``folder`` is read.
    Raises ModelFormatError (one line) for an index that breaks this, is empty or does not parse."""
    index = folder / name
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{index} has no weight_map")
    for tensor, shard in weight_map.items():
        if not plain_name(shard):
            raise ModelFormatError(f"{index}: the shard of {tensor} must be a file name in the folder, got {shard!r}")
    return {tensor: folder / shard for tensor, shard in weight_map.items()}


def folder_weights(path: Path) -> list[Path]:
    """A Hugging Face folder's weight files (safetensors, else .bin), each safetensors header
    checked (:func:`check_safetensors` raises for a damaged one) and its shard indexes, if any,
    too (:func:`shard_map`: transformers would follow them)."""
    for index in path.glob("*.index.json"):  # model.safetensors.index.json, pytorch_model.bin.index.json
        shard_map(path, index.name)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    for file in weights:
        if file.suffix == ".safetensors":
            check_safetensors(file)
    return weights
