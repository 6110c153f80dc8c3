"""The ONNX bundle: a folder that runs on its own.

::

    model.onnx              the graph (weights as external data ``model.onnx.data`` beyond 2 GB)
    libhadaconv_ort.so      the op library, custom form only: a copy for runtimes without
                            hadaconv (onnxruntime-genai); hadaconv's own runtime registers the
                            installed library instead (see :func:`open_bundle`)
    tokenizer files         when the model has a tokenizer
    genai_config.json       causal LMs with the KV cache: onnxruntime-genai's configuration, so
                            ``onnxruntime_genai.Model(bundle)`` runs the folder as it is
                            (see :mod:`hadaconv.export.genai`)
    hadaconv_onnx.json      the metadata below

``hadaconv_onnx.json``: ``format`` ("hadaconv-onnx"), ``version`` (1), ``hadaconv`` (version that
wrote it), ``kind`` (causal-lm, encoder, classifier, module), ``form`` (custom, portable), ``opset`` (the
standard ONNX opset), ``custom_opsets`` ({"com.hadaconv": 1} or {}; with ``"com.microsoft": 1`` added
when the graph was fused for ONNX Runtime), ``fusions`` (the ONNX Runtime fusions applied, by name
and count, or null: :mod:`hadaconv.export.fusions`), ``op_library`` (file name
or null), ``inputs``/``outputs`` (name, element type and shape, symbolic axes by name), ``cache``
(num_layers, num_kv_heads, head_dim, value_head_dim, position_ids; causal LMs with the cache),
``tokenizer`` (bool), ``eos_token_id``, ``pad_token_id``, ``hadamard_layers`` (how many
converted projections the graph holds), ``labels``, ``problem_type`` and ``segment_types``
(classifiers: the label names by index, or null; the head's ``problem_type``; the model's
``type_vocab_size``, or null: with two or more the graph takes ``token_type_ids``), ``source``,
``validation`` (per output max abs/rel difference against PyTorch, with the tolerance) and
``genai_config`` (its file name, or null).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from hadaconv import atomic
from hadaconv._version import __version__
from hadaconv.errors import HadaconvError, ModelFormatError, OutputError, check_path, command
from hadaconv.io.files import plain_name, read_json
from hadaconv.runtime import OP_DOMAIN, OP_VERSION, session

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

__all__ = ["FORMAT", "METADATA", "MODEL", "VERSION", "Bundle", "atomic_folder", "check_bundle_output", "context_length",
           "label_names", "open_bundle", "positive_int", "read_metadata", "tokenizer_missing"]

METADATA = "hadaconv_onnx.json"
MODEL = "model.onnx"
FORMAT = "hadaconv-onnx"
#: The bundle layout version :func:`hadaconv.export_onnx` writes; a newer one is refused on reading.
VERSION = 1


def check_bundle_output(out: str | os.PathLike, overwrite: bool,
                        inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """:func:`hadaconv.atomic.check_output` for a bundle folder, which also refuses to replace a
    model's folder (config.json, no bundle metadata) even with ``overwrite``: an ``-o`` typo would
    lose the weights of a converted or distilled model to its bundle.  Raises OutputError."""
    folder = Path(out)
    if overwrite and os.fspath(out).strip() and (folder / "config.json").is_file() \
            and not (folder / METADATA).is_file():
        atomic.check_not_input(folder, inputs)  # "is the input" says more than "holds a model"
        raise OutputError(f"{folder} holds a model (config.json), not a bundle: --overwrite replaces only an "
                          "earlier export; give another -o")
    return atomic.check_output(out, overwrite, folder=True, inputs=inputs)


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``out`` that becomes ``out`` when the block succeeds
    (:func:`hadaconv.atomic.atomic_folder`), after :func:`check_bundle_output`; on failure
    nothing is left behind (and an existing ``out`` is untouched)."""
    with atomic.atomic_folder(check_bundle_output(out, overwrite)) as tmp:
        yield tmp


def _export_step() -> str:
    return command("`hadaconv export --onnx`", "hadaconv.export_onnx")


def positive_int(value: Any) -> int | None:
    """``value`` where it is a positive integer (not a bool) below 2^31, else None: a count read
    from an untrusted bundle file, never an error (and the sizes export records, checked by the
    same rule the metadata is read with)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2 ** 31 else None


def context_length(folder: str | os.PathLike, meta: dict[str, Any]) -> int | None:
    """The context length (tokens, the prompt included) stated by the bundle's
    ``genai_config.json``, as onnxruntime-genai sizes its KV cache by it; None where the bundle
    has none or it states no positive integer (an untrusted file: never an error)."""
    name = meta.get("genai_config")
    if not plain_name(name):
        return None
    try:
        data = read_json(Path(folder) / name)
    except ModelFormatError:
        return None
    model = data.get("model")
    return positive_int(model.get("context_length")) if isinstance(model, dict) else None


def read_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The bundle's ``hadaconv_onnx.json``, checked; one clear line for anything that is not a bundle."""
    folder = Path(folder)
    if folder.is_file():
        raise HadaconvError(f"{folder} is a file; a bundle is the folder {_export_step()} writes")
    if not folder.is_dir():
        raise HadaconvError(f"no such bundle folder: {folder}")
    path = folder / METADATA
    if not path.is_file():
        raise HadaconvError(f"{folder} is not a hadaconv ONNX bundle: no {METADATA} (export one with {_export_step()})")
    try:
        meta = read_json(path)
    except ModelFormatError as exc:
        raise ModelFormatError(f"cannot read the bundle's metadata: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ModelFormatError(f"{path} is not hadaconv ONNX metadata")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFormatError(f"{path}: its version is not a positive integer, so the metadata is damaged: "
                               "export the bundle again")
    if version > VERSION:
        raise ModelFormatError(f"{folder} is a version {version} bundle, and this hadaconv ({__version__}) reads "
                               f"version {VERSION}: upgrade hadaconv, or export it again with this one")
    # ONNX Runtime opens the graph and any external data file it names: a FIFO there would block it.
    odd = next((p for p in sorted(folder.iterdir()) if not (p.is_file() or p.is_dir())), None)
    if odd is not None:
        raise ModelFormatError(f"{odd} is not a regular file (a bundle holds files)")
    if not (folder / MODEL).is_file():
        raise ModelFormatError(f"{folder} has no {MODEL}")
    _check_fields(path, meta)
    return meta


KINDS = ("causal-lm", "encoder", "classifier", "module")


def label_names(v: Any) -> bool:
    """Whether ``v`` is what a bundle may hold as a classifier's label names: a non-empty list of
    distinct, printable, non-empty strings, bounded (the file is untrusted, and the names are printed
    a line per text: a newline or a terminal escape in one would forge output)."""
    return (isinstance(v, list) and 0 < len(v) <= 1 << 20
            and all(isinstance(x, str) and 0 < len(x) <= 1000 and x.isprintable() for x in v) and len(set(v)) == len(v))


def _check_fields(path: Path, meta: dict[str, Any]) -> None:
    """The fields hadaconv acts on have the types :func:`hadaconv.export_onnx` writes (the file
    is untrusted: a token id of 1.5 or 10**30 would otherwise fail deep inside generation)."""
    def token_id(v: Any) -> bool:  # bundles of older exports may hold -1 for "none"
        return isinstance(v, int) and not isinstance(v, bool) and -1 <= v < 2 ** 31

    def io_list(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in v)

    eos = meta.get("eos_token_id")
    opsets = meta.get("custom_opsets", {})
    checks = {
        "custom_opsets": isinstance(opsets, dict) and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in opsets.values()),
        "kind": meta.get("kind", "module") in KINDS,
        "tokenizer": isinstance(meta.get("tokenizer", False), bool),
        "eos_token_id": eos is None or token_id(eos) or (isinstance(eos, list) and all(map(token_id, eos))),
        "pad_token_id": meta.get("pad_token_id") is None or token_id(meta["pad_token_id"]),
        "inputs": io_list(meta.get("inputs", [])),
        "outputs": io_list(meta.get("outputs", [])),
        # absent (older bundles) or null (unknown) is fine; a value is a length, not a guess
        "context_length": meta.get("context_length") is None or positive_int(meta["context_length"]) is not None,
        "vocab_size": meta.get("vocab_size") is None or positive_int(meta["vocab_size"]) is not None,
        "labels": meta.get("labels") is None or label_names(meta["labels"]),
        "problem_type": meta.get("problem_type") is None or isinstance(meta["problem_type"], str),
        "segment_types": meta.get("segment_types") is None or (type(meta["segment_types"]) is int
                                                               and meta["segment_types"] >= 0),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ModelFormatError(f"{path}: {bad[0]} is not what hadaconv export writes ({meta.get(bad[0])!r:.60})")


@dataclass
class Bundle:
    """An opened bundle: the session, the tokenizer (or None) and the metadata."""

    path: Path
    session: "onnxruntime.InferenceSession"
    tokenizer: Any | None
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "module"))


def tokenizer_missing() -> str | None:
    """Why a bundle's tokenizer files cannot be read in this installation, or None: they need
    transformers, which the ``ort`` extra alone does not install."""
    if importlib.util.find_spec("transformers") is None:
        return ("reading a bundle's tokenizer needs transformers, which is not installed: pip install "
                "'hadaconv[hf]' (token ids run without it)")
    return None


def open_bundle(folder: str | os.PathLike, providers: str | list[Any] | None = "auto",
                **session_options: Any) -> Bundle:
    """Open a bundle written by :func:`hadaconv.export_onnx`: its session, its tokenizer and its
    metadata.  ``providers`` and the keyword arguments are :func:`hadaconv.runtime.session`'s
    ("auto", "cpu", "cuda", ...; ``intra_op_num_threads=2``, ...).

    A custom-form graph runs with this installation's op library (:func:`hadaconv.get_library_path`),
    never with the bundle's copy: a shared library is native code, and a bundle is untrusted
    input (the copy is there for runtimes without hadaconv, such as onnxruntime-genai).  Raises
    HadaconvError (one line) for a folder that is not a bundle, metadata that names a library
    outside it, a graph that needs a newer op version than :data:`hadaconv.runtime.OP_VERSION`
    (ONNX Runtime itself would run it with this library's kernel), or a missing op library;
    ModelFormatError for a graph ONNX Runtime refuses."""
    check_path(folder, "folder")
    folder = Path(folder)
    meta = read_metadata(folder)
    if meta.get("op_library") is None and OP_DOMAIN in meta.get("custom_opsets", {}):
        raise ModelFormatError(f"{folder / METADATA} declares {OP_DOMAIN} ops (custom_opsets) and names no op "
                               f"library (op_library): the metadata is damaged, export the bundle again")
    sess = session(folder / MODEL, providers, library=_needs_library(folder, meta), **session_options)
    tokenizer = None
    if meta.get("tokenizer") and tokenizer_missing() is None:  # without transformers: token ids still run
        from hadaconv.io import load_tokenizer

        tokenizer = load_tokenizer(folder)
        if tokenizer is None:
            raise HadaconvError(f"{folder}: the metadata promises a tokenizer but its files are missing")
    return Bundle(folder, sess, tokenizer, meta)


def _needs_library(folder: Path, meta: dict[str, Any]) -> bool:
    name = meta.get("op_library")
    if name is None:
        return False  # the portable form: standard ops only
    if not plain_name(name):
        raise ModelFormatError(f"{folder / METADATA}: op_library must be the file name of the bundle's copy, "
                               f"got {name!r}")
    # ONNX Runtime would run a newer version's nodes with this library's kernel, whatever they mean.
    # Bundles record the version they need; one that names none (hand-built, or exported before the
    # field existed: every hadaconv export writes it) gets version 1, whose kernel checks every
    # attribute, so a metadata file that lies costs a wrong answer at worst, never memory safety.
    version = meta.get("custom_opsets", {}).get(OP_DOMAIN, OP_VERSION)
    if version > OP_VERSION:
        raise HadaconvError(f"{folder} needs version {version} of {OP_DOMAIN}::HadamardAffine and this hadaconv's "
                            f"op library implements version {OP_VERSION}: upgrade hadaconv")
    return True  # this installation's library, never the copy in the folder


def io_description(model_path: Path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of a saved graph: name, element type, shape (axis names for symbolic axes)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims})
        return out

    return describe(model.graph.input), describe(model.graph.output)


def write_metadata(folder: Path, meta: dict[str, Any]) -> None:
    (folder / METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
