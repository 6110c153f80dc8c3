"""Loading a model to convert, from any accepted input, never modifying it (see :mod:`hadaconv.io`
for the list); the checks that refuse a missing, ignored or misread config before any load."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from hadaconv.errors import HadaconvError, InputError, ModelFormatError, check_path, command, option
from hadaconv.io.build import (HeadDropped, build_empty, builder, causal_lm_class, check_depth, check_finite,
                               check_size, config_file, hf_config, hf_from_config, load_weights, model_class,
                               model_from_config, refuse_missing)
from hadaconv.io.converted import has_tokenizer, load, load_tokenizer, original_path, refuse_bundle
from hadaconv.io.files import (SHARD_INDEX, TIED_KEY, WEIGHTS, check_safetensors, converted_meta, file_identity,
                               first_line, folder_weights, open_regular, read_json, read_safetensors, shard_map)
from hadaconv.io.gguf import check_metadata
from hadaconv.progress import status

__all__ = ["TORCH_MODULE_TOKENIZER", "Loaded", "carries_config", "check_format", "check_model_config",
           "check_seq_len_early", "load_model", "recorded_config", "recorded_source", "same_file", "skeleton",
           "source_tokenizer"]


#: Why a ``torch.save``d module comes without a tokenizer, and the way round.
TORCH_MODULE_TOKENIZER = ("a torch.save'd module carries none: save the model with save_pretrained and its "
                          "tokenizer beside it")


@dataclass
class Loaded:
    """A loaded model and what came with it.

    Attributes:
        model: the model, in eval mode.
        tokenizer: its tokenizer, or None (pixel models, plain torch modules, no files).
        source: a human-readable description of the input, for reports.
        format: "hf-folder", "gguf", "safetensors", "state-dict", "torch-module" or "hadaconv".
        tokenizer_source: a folder whose tokenizer files a converted folder should copy, or None.
        meta: the ``hadaconv`` section of a converted folder's config.json, else None.
    """

    model: nn.Module
    tokenizer: Any | None
    source: str
    format: str
    tokenizer_source: Path | None = None
    meta: dict | None = None  # a converted folder's hadaconv section (format "hadaconv")


_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}


def _suffix(path: Path) -> str:
    """The extension the format is told by, in lower case: ``MODEL.GGUF`` is a GGUF file too."""
    return path.suffix.lower()


def load_model(
    source: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = "cpu",
    config_option: str | None = None,
) -> Loaded:
    """Load a model to convert (the accepted inputs: :mod:`hadaconv.io`).

    Args:
        source: a folder or a file.
        config: for a bare weights file, a config.json or a folder holding one (refused for
            anything else, and when it is a converted model's: :func:`check_model_config`).
        trust_pickle: allow arbitrary unpickling of a ``torch.save``d module (it can run code).
        dtype: floating-point dtype of the loaded model: "auto" (or None) keeps the checkpoint's
            own (GGUF: float32, as dequantized), else a torch dtype or one of
            :data:`hadaconv.device.DTYPES`.
        device: where the model goes ("cpu", "cuda", "cuda:N"; None: a GPU when present).
        config_option: how errors name ``config`` where the caller calls it otherwise
            (``convert_file``'s ``model_config``, ``distill_file``'s ``teacher_config``); None:
            ``config`` (``--config`` on the command line).

    Every bad input raises a HadaconvError with one line.
    """
    from hadaconv.device import resolve_device, resolve_dtype

    check_path(source, "source")
    dtype, dev = resolve_dtype(dtype), resolve_device(device)
    path = Path(source)
    if not path.exists():
        raise HadaconvError(f"no such file or folder: {path}")
    flag = config_option or option("config")
    check_model_config(path, config, flag=flag)
    with _quiet_transformers(), status(f"loading {path.name}"):
        loaded = _load_any(path, config, trust_pickle, dtype, flag)
    if config is not None and loaded.format == "torch-module":
        raise InputError(f"{path} holds a whole pickled module, which needs no config: drop {flag}")
    loaded.model.eval()
    if loaded.format != "hadaconv":  # hadaconv.load has checked a converted folder's weights
        check_finite(loaded.model, loaded.source)
    if dtype is not None:
        loaded.model.to(dtype)
    loaded.model.to(dev)
    return loaded


def carries_config(source: str | os.PathLike) -> bool:
    """Whether ``source`` brings its own config (a folder, a GGUF file), so that a ``config=``
    given for it would be ignored.  Anything else may need one, or is the load's to judge."""
    path = Path(source)
    return path.is_dir() or _suffix(path) == ".gguf"


def recorded_source(model: str | os.PathLike, flag: str | None = None) -> tuple[str | None, str | None]:
    """(the original a converted folder records, its config.json for bare weights), read without
    loading anything: the original as :func:`original_path` finds it (as recorded when it is
    gone), the config as :func:`recorded_config` gives it (``flag``: see there).  (None, None)
    for anything else."""
    path = Path(model) / "config.json"
    try:
        meta = converted_meta(path)
    except HadaconvError:  # the load reports what is wrong with it
        return None, None
    if meta is None or not isinstance(meta.get("source"), str):
        return None, None
    try:
        source = str(original_path(model, meta))
    except HadaconvError:
        source = meta["source"]
    return source, recorded_config(meta, flag)


def recorded_config(meta: dict, flag: str | None = None) -> str | None:
    """The config.json a converted folder's ``hadaconv`` section (``meta``) records for its
    original of bare weights; None when it records none, or when the file is gone and no
    ``flag`` is given.

    Raises:
        InputError: the recorded config is gone and ``flag`` (the option that gives another,
            as the message names it) is given: the caller needs it.
    """
    config = meta.get("source_config")
    if not isinstance(config, str):
        return None
    if Path(config).is_file():
        return config
    if flag is None:
        return None
    raise InputError(f"the original's config {config}, recorded at conversion, is gone: give it with {flag}")


def same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether ``a`` and ``b`` name one existing file or folder (through links and relative paths)."""
    try:
        return a is not None and b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def check_model_config(source: str | os.PathLike, config: str | os.PathLike | None, *, whose: str = "",
                       flag: str | None = None, way_out: str = "") -> None:
    """Refuse, before anything loads, a config that is missing, would be ignored or misread: none
    given for bare safetensors weights, one given for a model that carries its own
    (:func:`carries_config`), one that is not there, and a converted model's config.json.
    ``whose`` (e.g. "the teacher"), ``flag`` (the option as an error names it; default ``config`` /
    ``--config``) and ``way_out`` (another way round a missing config, e.g. " or --no-baseline")
    word the message for callers that load several models.  A state dict in a torch.save file is
    told apart from a pickled module only on loading (:func:`load_model` says it then).

    A converted model's weights are refused too (a .safetensors file that :func:`hadaconv.io.save_converted`
    or a streamed conversion wrote, or one its folder lists as its weights): those load only with
    their folder.

    Raises:
        InputError: as above, one line naming the option.
        ModelFormatError: a .safetensors file whose header is damaged.
    """
    path = Path(source)
    if not path.exists():  # a missing model is the load's error to report
        return
    flag, who = flag or option("config"), f"{whose} " if whose else ""
    if _suffix(path) == ".safetensors" and path.is_file():
        in_converted = _is_converted_folder(path.parent)
        if TIED_KEY in (check_safetensors(path).get("__metadata__") or {}) or \
                (in_converted and _weights_of_its_folder(path)):
            where = f"the folder {path.parent}" if in_converted else "the converted folder they came from"
            raise InputError(f"{who}{path} holds a converted model's weights, which load only with their folder's "
                             f"config: give {where}")
        if config is None:
            raise _bare_weights_error(path, flag, whose, way_out)
    if config is None:
        return
    if carries_config(path):
        raise InputError(f"{flag} is for bare weights (.safetensors, a torch.save state dict); "
                         f"{who}{source} carries its own config: drop {flag}")
    config_path = config_file(config)
    if converted_meta(config_path) is not None:
        raise InputError(f"{flag} {config} is a converted model's config: give {whose or 'the model'}'s own "
                         "(the original model's) config.json or its folder")


def _is_converted_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a converted model's config.json (a damaged one counts as not)."""
    try:
        return converted_meta(folder / "config.json") is not None
    except HadaconvError:
        return False


def _weights_of_its_folder(path: Path) -> bool:
    """Whether ``path`` is one of the weight files its folder loads from (model.safetensors or a
    shard its index names): in a converted folder, how streamed shards written before they
    carried the marker are known."""
    folder = path.parent
    if path.name == WEIGHTS:
        return True
    try:
        return (folder / SHARD_INDEX).is_file() and path.name in {p.name for p in shard_map(folder).values()}
    except HadaconvError:
        return False


def _bare_weights_error(path: Path, flag: str, whose: str = "", way_out: str = "") -> InputError:
    """The one-line refusal of bare weights given without a config (see :func:`check_model_config`)."""
    beside = (f"; or give the folder {path.parent} itself, which holds one"
              if (path.parent / "config.json").is_file() else "")
    return InputError(f"{f'{whose} ' if whose else ''}{path} holds bare weights: give its config ({flag}: a "
                      f"config.json or its folder){way_out}{beside}")


def skeleton(source: str | os.PathLike, *, config: str | os.PathLike | None = None) -> nn.Module | None:
    """The module tree of the model :func:`load_model` would load, from its config alone: every
    parameter on the meta device (no memory, no values), built in about a second where the full
    load takes 18-20 s (SmolLM2's GGUF, dequantized).  It lets a command refuse options that do
    not fit the model (``--layers``, ``--block``, ``--rank``) before that load.

    Reads a Hugging Face folder's config.json, a GGUF file's metadata, or ``config`` for a bare
    ``.safetensors`` / state-dict file.  Returns None where the structure is only known from the
    weights (converted folders, ``torch.save``d modules) or where the config alone does not build
    (the full load then reports the problem).  For option checks before a load it is a best-effort
    early refusal, never a substitute for the load's; ``inspect`` lists from it, weights unread.
    """
    path = Path(source)
    if not path.exists() or importlib.util.find_spec("accelerate") is None:
        return None  # the load says what is missing; without accelerate no empty (meta) model is built
    try:
        if path.is_dir():
            data = read_json(path / "config.json")
            # A damaged checkpoint is the load's error to report, not an option's (raises here).
            weights = folder_weights(path)
            if converted_meta(data) is not None or "torch_module" in data or not weights:
                return None
            return hf_from_config(hf_config(data), weights)
        if _suffix(path) == ".gguf":
            import transformers

            gguf_config = _gguf_config(path)
            model = build_empty(lambda: transformers.AutoModelForCausalLM.from_config(gguf_config))
            model.tie_weights()  # as from_pretrained does
            return model
        if _suffix(path) == ".safetensors" and config is not None:
            header = check_safetensors(path)  # a truncated file is the load's error to report, not --layers'
            data = read_json(config_file(config))
            model = None if converted_meta(data) is not None else model_from_config(data, [path])
            shapes = {name: list(p.shape) for name, p in model.state_dict().items()} if model is not None else {}
            if any(shapes[k] != v.get("shape") for k, v in header.items() if k in shapes):
                return None  # a config that does not describe these weights: the load says so
            return model
    except Exception:  # noqa: BLE001 - the full load that follows says what is wrong, in one line
        return None
    return None


def check_seq_len_early(source: str | os.PathLike, seq_len: int, *, config: str | os.PathLike | None = None,
                        kinds: tuple[str, ...] | None = ("causal-lm",)) -> None:
    """Refuse windows of ``seq_len`` tokens past the context of the model at ``source`` before its
    load, where its config tells (:func:`skeleton`) and its kind is one of ``kinds`` (None: any),
    so that a command meant for another kind keeps its own refusal.  The load's own check
    (:func:`hadaconv.adapters.check_seq_len`, the same message) covers the rest.

    Raises:
        InputError: ``seq_len`` longer than the context the config gives.
    """
    from hadaconv.adapters import check_seq_len, model_kind

    empty = skeleton(source, config=config)
    if empty is not None and (kinds is None or model_kind(empty) in kinds):
        check_seq_len(empty, seq_len)


def _load_any(path: Path, config, trust_pickle: bool, dtype: torch.dtype | None, flag: str) -> Loaded:
    if path.is_dir():
        return _load_folder(path, dtype)
    if not path.is_file():  # a FIFO would block every reader below until a writer came
        raise ModelFormatError(f"{path} is not a regular file")
    if _suffix(path) == ".gguf":
        return _load_gguf(path, dtype)
    if _suffix(path) == ".safetensors":
        return _load_state_dict(path, read_safetensors(path), config, "safetensors", flag)
    if _suffix(path) in _PICKLE_SUFFIXES:
        return _load_torch_file(path, config, trust_pickle, flag)
    raise _unknown_format(path, flag)


def check_format(source: str | os.PathLike, *, whose: str = "", flag: str | None = None, way_out: str = "") -> None:
    """Refuse, before anything loads, a file :func:`load_model` reads in no format (a folder is
    checked by its load).  ``whose`` (e.g. "the baseline"), ``flag`` and ``way_out`` (e.g. "
    (--no-baseline skips it)") word the message as :func:`check_model_config` does.

    Raises:
        HadaconvError: a file whose extension is none of .gguf, .safetensors, a torch.save file's.
    """
    path = Path(source)
    if path.is_file() and _suffix(path) not in (".gguf", ".safetensors", *_PICKLE_SUFFIXES):
        error = _unknown_format(path, flag or option("config"))
        raise HadaconvError((f"{whose}: {error}" if whose else str(error)) + way_out)


def _unknown_format(path: Path, flag: str) -> HadaconvError:
    if _suffix(path) == ".onnx":
        run = command(f"hadaconv run {path.parent}", f"hadaconv.generate.generate('{path.parent}', prompt) "
                      "(an encoder's: hadaconv.generate.embed)")
        return HadaconvError(f"{path} is an ONNX graph, which hadaconv runs but does not convert: run its bundle "
                             f"folder with {run}, or give the model it was exported from")
    return HadaconvError(
        f"unknown input format {path.suffix or '(no extension)'!r} for {path}: expected a model folder, "
        f".gguf, .safetensors (with {flag}) or a torch.save file (.pt, .pth, .bin, .ckpt)"
    )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own tqdm bars (GGUF de-quantization, weight loading: two or three per load)
    would interleave with hadaconv's; our spinner stands for the whole load instead.  Its
    warnings too: the one that matters, weights missing from the file, is ours to refuse
    (:func:`refuse_missing`).  Every switch is put back as it was, whatever the load raises."""
    try:
        from huggingface_hub import utils as hub
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers comes with the hf extra: nothing to quiet without it
        yield
        return
    try:  # optional: the GGUF reader, which calls tqdm directly, past transformers' switch
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except Exception:  # noqa: BLE001 - without it there is no GGUF bar to quiet
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    bars_on, hub_off = hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # transformers' bars, and the hub's with them
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar is not None:
            gguf_utils.tqdm = bar
        if bars_on:
            hf_logging.enable_progress_bar()
        if hub_off and not hub.are_progress_bars_disabled():
            hub.disable_progress_bars()
        elif not hub_off and hub.are_progress_bars_disabled():
            hub.enable_progress_bars()


def _load_folder(path: Path, dtype: torch.dtype | None) -> Loaded:
    config_path = path / "config.json"
    refuse_bundle(path)
    if not config_path.is_file():
        # A data package's folder, say: the model is the file inside.
        ggufs = sorted(f for f in path.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
        inside = f": it holds {ggufs[0].name}, give that file" if len(ggufs) == 1 else ""
        raise HadaconvError(f"{path} is a folder without config.json (expected a Hugging Face model folder or a "
                            f"hadaconv output){inside}")
    data = read_json(config_path)
    meta = converted_meta(data, config_path)
    if meta is not None or "torch_module" in data:
        model = load(path)
        return Loaded(model, load_tokenizer(path), f"hadaconv folder {path}", "hadaconv", path, meta)
    weights = folder_weights(path)
    if not weights:
        raise HadaconvError(f"{path} has a config.json but no *.safetensors or *.bin weights")
    config = hf_config(data)
    check_size(builder(config), weights, path)  # a config its weights cannot fill: refused before from_pretrained
    try:
        model, info = model_class(config).from_pretrained(
            path, config=config, dtype=dtype or "auto", output_loading_info=True
        )
    except Exception as exc:  # noqa: BLE001 - transformers on an untrusted folder: anything (0 heads: ZeroDivisionError)
        raise ModelFormatError(f"cannot load the Hugging Face folder {path}: {first_line(exc)}") from None
    refuse_missing(info, path)
    return Loaded(model, load_tokenizer(path), f"Hugging Face folder {path}", "hf-folder", path)


#: GGUF configs already read, by :func:`file_identity`: gguf-py parses every metadata field
#: (SmolLM2's 49,152-token vocabulary among them, 3-6 s), and a command reads the config for its
#: early checks, again for --dry-run's table, and again for the load.
_gguf_configs: dict[tuple[str, int, int, int], Any] = {}


def _gguf_config(path: Path):
    """The Hugging Face config of a GGUF file's metadata, checked against the file (its depth,
    and the parameters it describes against the file's size) before any model is built; a copy,
    the caller's to change."""
    import transformers

    key = file_identity(path)
    if key not in _gguf_configs:
        check_metadata(path)
        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        check_depth(config, path)
        check_size(lambda: transformers.AutoModelForCausalLM.from_config(config), [path], path)
        _gguf_configs[key] = config
    return copy.deepcopy(_gguf_configs[key])


#: GGUF tokenizers built for an early check of the calibration text (4 s for SmolLM2's), by file
#: identity, until the load takes them.
_gguf_tokenizers: dict[tuple[str, int, int, int], Any] = {}


def _gguf_tokenizer(path: Path, *, take: bool = False):
    """The tokenizer of a GGUF file's vocabulary: the one kept for the load (read it, do not change
    it), or with ``take`` the load's own (no longer kept)."""
    import transformers

    key = file_identity(path)
    if key not in _gguf_tokenizers:
        check_metadata(path)
        _gguf_tokenizers[key] = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return _gguf_tokenizers.pop(key) if take else _gguf_tokenizers[key]


def source_tokenizer(source: str | os.PathLike, *, config: str | os.PathLike | None = None) -> Any | None:
    """The tokenizer of the model at ``source``, read without its weights: a folder's tokenizer
    files, a GGUF file's vocabulary (kept for its load, which then builds no other: tokenize with
    it, do not change its settings), or those beside ``config`` or the bare weights.  None where
    the model has none, where only its load tells (a ``torch.save``d module), or where reading
    fails: like :func:`skeleton`, a best-effort help to early checks, whose failures the load
    reports."""
    path = Path(source)
    try:
        if path.is_dir():
            return load_tokenizer(path)
        if _suffix(path) == ".gguf":
            return _gguf_tokenizer(path)
        if config is not None and _suffix(path) in (".safetensors", *_PICKLE_SUFFIXES):
            folder = _tokenizer_folder(config_file(config), path)
            return load_tokenizer(folder) if folder else None
    except Exception:  # noqa: BLE001 - the load that follows says what is wrong, in one line
        return None
    return None


def lacks_tokenizer(source: str | os.PathLike, *, config: str | os.PathLike | None = None) -> bool:
    """Whether the model at ``source`` certainly loads without a tokenizer, told from the files
    alone: a model folder (one with config.json) without a vocabulary file
    (:func:`hadaconv.io.converted.has_tokenizer`), or bare weights (``config`` given) with none
    beside the config or the weights.  False where only the load tells (a ``torch.save``d module without
    a config) and for GGUF files, which carry a vocabulary."""
    path = Path(source)
    if path.is_dir():  # a model folder (a folder without config.json is none: the load says what it is)
        return (path / "config.json").is_file() and not has_tokenizer(path)
    if config is None or _suffix(path) not in (".safetensors", *_PICKLE_SUFFIXES):
        return False
    try:
        return _tokenizer_folder(config_file(config), path) is None
    except HadaconvError:  # a config that cannot be read: the load says so
        return False


def _tokenizer_folder(config_path: Path, weights: Path) -> Path | None:
    """Where bare weights' tokenizer is: the config's folder first (a Hugging Face folder), then
    the weights' own; None where neither holds tokenizer files."""
    return next((folder for folder in (config_path.parent, weights.parent) if has_tokenizer(folder)), None)


def _cut_short(exc: BaseException) -> bool:
    """Whether gguf-py's error means the file ends early: its header is read with struct ("unpack_from
    requires..."), its tensors as views of a memory map that is shorter than they are ("cannot
    reshape array of size...")."""
    return isinstance(exc, struct.error) or (isinstance(exc, ValueError) and "cannot reshape array" in str(exc))


def _load_gguf(path: Path, dtype: torch.dtype | None) -> Loaded:
    import transformers

    try:
        config = _gguf_config(path)  # first: its check_metadata guards the parse below too
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=dtype or torch.float32, output_loading_info=True
        )
        refuse_missing(info, path)  # before the tokenizer, whose own complaint would hide this one
        tokenizer = _gguf_tokenizer(path, take=True)
    except HadaconvError:
        raise
    except Exception as exc:  # noqa: BLE001 - the GGUF reader and tokenizer raise anything on a damaged file
        why = f"truncated or damaged ({first_line(exc)})" if _cut_short(exc) else first_line(exc)
        raise ModelFormatError(f"cannot load the GGUF file {path}: {why}") from None
    return Loaded(model, tokenizer, f"GGUF file {path}", "gguf", None)


def _load_state_dict(path: Path, state: dict, config, fmt: str, flag: str) -> Loaded:
    if config is None:
        raise _bare_weights_error(path, flag)
    config_path = config_file(config)
    data = read_json(config_path)
    if "model_type" not in data and "torch_module" not in data:  # generation_config.json, tokenizer_config.json
        raise ModelFormatError(f"{config_path} names no model_type: not a model's config; give {flag} the model's "
                               "config.json or its folder")
    model = model_from_config(data, [path])
    try:
        load_weights(model, state, str(path))
    except HeadDropped as exc:
        raise HeadDropped(f"{exc} to {config_path}") from None
    except ModelFormatError as exc:
        if data.get("architectures"):
            raise ModelFormatError(f"{exc} (is {config_path} this model's config?)") from None
        raise ModelFormatError(f"{exc} ({config_path} names no architectures, so the base {type(model).__name__} "
                               f'was built: add one, e.g. "architectures": '
                               f'["{causal_lm_class(data.get("model_type")) or "LlamaForCausalLM"}"])') from None
    tokenizer_source = _tokenizer_folder(config_path, path)
    tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source else None
    return Loaded(model, tokenizer, f"{fmt} {path} with config {config_path}", fmt, tokenizer_source)


def _torch_load_failure(exc: Exception) -> str:
    """Why torch.load(weights_only=True) failed, in one line without torch's advice to load with
    weights_only=False (wrong for a damaged file, and hadaconv's own switch is --trust-pickle)."""
    if isinstance(exc, KeyError):  # torch's error on a file that is no archive at all
        return "not a torch.save archive"
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    if reason:
        return f"damaged or not a torch.save file ({reason.group(1).strip()})"
    reason = re.match(r"PytorchStreamReader failed ([^.]*)", str(exc))
    if reason:
        return f"the archive is damaged or truncated ({reason.group(1).strip()})"
    return first_line(exc)


def _check_stored(path: Path) -> None:
    """Refuse a zip archive with compressed records: torch.save stores every record as it is, and
    torch.load inflates a compressed one in full, so a 1 MB file could hold a gigabyte of zeros
    (it took 1.5 GB to load).  Only the archive's central directory is read."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # damaged: torch.load says how, in the words the other damaged archives get
    packed = next((r.filename for r in records if r.compress_type != zipfile.ZIP_STORED), None)
    if any(r.filename.endswith("/constants.pkl") or "/code/" in r.filename for r in records):
        raise ModelFormatError(f"{path} is a TorchScript archive (torch.jit.save), which hadaconv does not read: "
                               "save the module, or its state_dict, with torch.save")
    if packed is not None:
        raise ModelFormatError(f"cannot read {path} as a torch.save file: its record {packed[:80]!r} is compressed, "
                               "which torch.save never writes (a compressed record can inflate without bound)")


def _load_torch_file(path: Path, config, trust_pickle: bool, flag: str) -> Loaded:
    try:
        with open_regular(path) as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror or first_line(exc)}") from None
    # torch.save writes a zip archive, or (before torch 1.6, or with the legacy switch) a pickle,
    # whose first byte is the PROTO opcode.
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise ModelFormatError(f"cannot read {path} as a torch.save file: it is neither a zip archive nor a pickle "
                               "(damaged, or another format)")
    if magic == b"PK\x03\x04":
        _check_stored(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals and corrupt archives share no common type
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            raise ModelFormatError(f"cannot read {path} as a torch.save file: {_torch_load_failure(exc)}") from None
        if not trust_pickle:
            raise HadaconvError(
                f"refusing to unpickle {path}: it holds Python objects (e.g. {found.group(1)}), not just "
                "tensors, and unpickling it could run arbitrary code; if you trust the file, pass "
                f"{option('trust_pickle', True)}"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # arbitrary unpickling can fail in arbitrary ways
            raise HadaconvError(f"cannot unpickle {path}: {first_line(exc2)}") from None
    if type(obj) is nn.MultiheadAttention:
        # The model itself cannot be swapped in place for the hookable subclass that conversion
        # needs (prepare_mha replaces children only); a loaded file can.
        from hadaconv.adapters.mha import HookableMultiheadAttention

        obj = HookableMultiheadAttention.from_module(obj)
    if isinstance(obj, nn.Module):
        return Loaded(obj, None, f"pickled module {path}", "torch-module", None)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # the common checkpoint wrapping
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _load_state_dict(path, obj, config, "state-dict", flag)
    raise HadaconvError(f"{path} holds a {type(obj).__name__}, neither a module nor a state dict of tensors")
