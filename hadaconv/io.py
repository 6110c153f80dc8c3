"""Loading models safely, and saving and loading converted folders.

Inputs :func:`load_model` accepts (never modifying them):

* a Hugging Face folder (``config.json`` + ``*.safetensors`` or ``*.bin``), through transformers;
* a GGUF file (dequantized by transformers' ``gguf_file=``);
* a ``.safetensors`` file or a ``torch.save``d state dict, with ``config=`` (a config.json or a
  folder holding one);
* a converted hadaconv folder (delegates to :func:`load`);
* a ``torch.save``d whole module, only with ``trust_pickle=True``: unpickling can run arbitrary
  code, so anything ``torch.load(weights_only=True)`` refuses is refused unless the user says so.

A converted folder (:func:`save_converted`) holds ``config.json`` (the original config plus a
``hadaconv`` section), ``model.safetensors`` (tied tensors stored once), tokenizer files and
``report.json``.  :func:`load` rebuilds the model without any pickle: the architecture from the
config, the adapter's ``prepare``, a HadamardProjection at each converted layer, then the weights,
loaded strictly.

Models without a Hugging Face config: ``nn.TransformerEncoder`` and ``nn.TransformerDecoder``
stacks (PyTorch's own layers) are described by a small JSON recipe (``torch_module`` in
config.json) from which they are rebuilt.  Other plain ``nn.Module``s cannot be saved without a
pickle; :func:`save_converted` says so (convert them through their own code and save the state
dict instead).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from hadaconv.atomic import atomic_folder, check_output
from hadaconv.errors import HadaconvError, InputError, ModelFormatError, check_module, command, option
from hadaconv.progress import status

__all__ = ["Loaded", "carries_config", "check_model_config", "hadaconv_meta", "load", "load_model", "load_tokenizer",
           "original_path", "recorded_config", "recorded_source", "resolve_config", "same_file", "save", "save_converted",
           "skeleton"]

WEIGHTS = "model.safetensors"
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
)
#: safetensors metadata: {alias: stored name} for tensors stored once.  It also marks a converted
#: model's weights for :func:`check_model_config`: save_converted always writes it, and a streamed
#: conversion's shards carry "{}" (nothing tied) since 2026-12-05; older shards are known by their
#: folder.
TIED_KEY = "hadaconv.tied"
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}
#: Decoder blocks beyond which a config is refused before any model is built: the deepest public
#: LLMs have about 130 (Llama-3.1-405B: 126); more is a damaged or hostile file, whose model
#: would take minutes to build (2^31 blocks: forever) even with no memory behind it.
MAX_LAYERS = 1024
#: Weights a byte of a weight file can hold at most: no format stores one in under a bit.
_PARAMS_PER_BYTE = 8


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


# ------------------------------------------------------------------------------------ helpers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {_first_line(exc)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # nesting past Python's stack
        raise ModelFormatError(f"{path} is not a JSON file: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} does not hold a JSON object")
    return data


def _check_safetensors(path: Path) -> dict:
    """Check a safetensors file's header and that its data is all there (a truncated download
    otherwise fails late, or deep inside a library); returns the header."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if not all(isinstance(end, int) and end >= 0 for end in ends):
            raise ValueError("data_offsets must be byte offsets")
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        raise ModelFormatError(f"{path} is not a valid safetensors file ({_first_line(exc)})") from None
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ModelFormatError(f"{path} is truncated: {size} bytes, its header describes {expected}")
    return header


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with tied aliases (see save_converted) restored."""
    from safetensors import safe_open

    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ModelFormatError(f"cannot read {path}: {_first_line(exc)}") from None
    try:
        for alias, name in json.loads(metadata.get(TIED_KEY, "{}")).items():
            tensors[alias] = tensors[name]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:  # untrusted metadata
        raise ModelFormatError(f"{path}: its {TIED_KEY} metadata does not name stored tensors "
                               f"({_first_line(exc)})") from None
    return tensors


def _check_finite(model: nn.Module, source: str) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelFormatError(f"{source}: tensor {name} holds NaN or Inf values")


def _shares_tensor(model: nn.Module) -> dict[str, str]:
    """{name: first name} for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly (a tied parameter may be given under either name), or raise
    one line naming the first mismatches."""
    aliases = _shares_tensor(model)
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and not expected & set(state) and all(k.startswith(prefix) for k in state):
        _check_head_named(model, prefix, source)
        state = {k[len(prefix) :]: v for k, v in state.items()}  # weights of a head model, base model built
    for alias, name in aliases.items():  # safetensors' save_model keeps one name of a tied pair, either one
        if name not in state and alias in state:
            state = {**state, name: state[alias]}
    missing = {k for k in expected - set(state) if aliases.get(k) not in state}
    unexpected = set(state) - expected
    if missing or unexpected:
        parts = [
            f"{len(s)} {what} (e.g. {', '.join(sorted(s)[:3])})"
            for s, what in ((missing, "missing"), (unexpected, "unexpected"))
            if s
        ]
        raise ModelFormatError(f"{source}: the weights do not match the model: {'; '.join(parts)}")
    try:
        # assign=True: the model's parameters (meta tensors, see _empty) become the loaded tensors.
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        msg = " ".join(
            _first_line(exc) if i == 0 else line.strip() for i, line in enumerate(str(exc).splitlines()[1:3])
        )
        raise ModelFormatError(f"{source}: the weights do not match the model: {msg}") from None
    for alias, name in aliases.items():  # assign replaced each name separately: tie them again
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(name))
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ModelFormatError(f"{source}: no weights for {len(empty)} tensors (e.g. {', '.join(empty[:3])})")


class _HeadDropped(ModelFormatError):
    """:func:`_check_head_named`'s refusal, whose message says all."""


def _check_head_named(model: nn.Module, prefix: str, source: str) -> None:
    """Refuse to drop a head silently: weights under ``prefix`` are a head model's, and for a
    decoder-only model type (a causal LM's weights) a config that names no ``architectures``
    built only the base model.  An encoder's base model is what hadaconv converts: kept."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "architectures", None):
        return  # a base class named on purpose keeps the base model
    causal = _causal_lm_class(getattr(config, "model_type", None))
    if causal is None:
        return
    raise _HeadDropped(f"{source}: these are a head model's weights (under {prefix!r}), but the config names no "
                       f"architectures, so only the base {type(model).__name__} was built: add one, e.g. "
                       f'"architectures": ["{causal}"]')


def _causal_lm_class(model_type: str | None) -> str | None:
    """The name of the causal-LM class of a decoder-only ``model_type`` (an example for a config
    to name); None for other types (encoders, whose masked-LM class says they are not)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return None if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def _empty(build):
    """``build()`` with every parameter on the meta device (no memory, no random init), to be
    filled by :func:`_load_weights`.  Buffers stay real: non-persistent ones (rotary tables) are
    computed at construction and never stored in a checkpoint."""
    from contextlib import nullcontext

    try:
        from accelerate import init_empty_weights
    except ImportError:  # accelerate comes with the hf extra; without it, build normally
        context = nullcontext()
    else:
        context = init_empty_weights(include_buffers=False)
    with context:
        return build()


# ------------------------------------------------------------------------- building models


def _hf_config(data: dict):
    import transformers

    data = {k: v for k, v in data.items() if k != "hadaconv"}
    model_type = data.pop("model_type", None)
    if not model_type:
        raise HadaconvError("config.json has no model_type: not a Hugging Face config")
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # noqa: BLE001 - transformers' validation errors share no base class
        raise HadaconvError(f"cannot build a {model_type!r} config: {_first_line(exc)}") from None
    _check_depth(config, "config.json")
    return config


def _check_depth(config, source) -> None:
    """Refuse a config whose block count is not 1 to :data:`MAX_LAYERS` (ModelFormatError)."""
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not 0 < layers <= MAX_LAYERS:
        raise ModelFormatError(f"{source} declares {layers} layers: not a model hadaconv loads (1 to {MAX_LAYERS})")


def _check_size(build, files: list[Path], source) -> None:
    """Refuse a model (``build()``) with more parameters than its weight ``files`` can hold,
    before anything allocates them: a config can ask for terabytes from a few bytes of weights.
    Counted on a build entirely on the meta device (:func:`_empty` would allocate each tensor
    for a moment, as accelerate's ``init_empty_weights`` does)."""
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in build().parameters())
    except Exception:  # noqa: BLE001 - a model whose constructor computes on values: _empty's build says
        return
    room = _PARAMS_PER_BYTE * sum(f.stat().st_size for f in files)
    if params > room:
        raise ModelFormatError(f"{source}: the config describes {params:,} parameters, more than its weight "
                               f"files can hold ({room // _PARAMS_PER_BYTE:,} bytes)")


def _refuse_missing(info: dict, source) -> None:
    """transformers only warns about absent weights and initialises them at random; converting a
    partly random model would be silently wrong.  (Unexpected keys are ignored: a checkpoint
    saved with its head but a config naming no architecture loads as the backbone.)"""
    missing = sorted(info.get("missing_keys", [])) + sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])
    )
    if missing:
        raise HadaconvError(
            f"{source}: the weights do not match the config: {len(missing)} missing or mismatched "
            f"(e.g. {', '.join(missing[:3])})"
        )


#: The kinds of Hugging Face models whose heads hadaconv keeps: transformers' auto mappings
#: (``transformers.models.auto.modeling_auto``) listing the classes of each kind.
KEPT_KINDS = {
    "MODEL_MAPPING_NAMES": "encoder or backbone",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "causal LM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "sequence classification",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "token classification",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "masked LM",
}


def _kept_classes() -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for mapping in KEPT_KINDS:
        for value in getattr(modeling_auto, mapping, {}).values():
            names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def _model_class(config):
    """The transformers class named first in ``config.architectures`` (the class whose weights
    these are, head included), or ``AutoModel`` when the config names none.

    Raises HadaconvError (one line) for a class transformers lacks or whose kind hadaconv cannot
    keep through convert and export (question answering, encoder-decoder, multimodal, ...):
    loading it as a bare backbone would silently drop its head.
    """
    import transformers

    name = (getattr(config, "architectures", None) or [None])[0]
    if name is None:
        return transformers.AutoModel
    cls = getattr(transformers, name, None)
    if cls is None:
        raise HadaconvError(
            f"config.json names the architecture {name!r}, which transformers {transformers.__version__} does not have")
    if name not in _kept_classes():
        raise HadaconvError(
            f"{name}: hadaconv keeps {', '.join(KEPT_KINDS.values())} models; converting this one would drop its head")
    return cls


def _builder(config):
    """A function building the model of the class :func:`_model_class` names, from ``config``."""
    import transformers

    cls = _model_class(config)
    return (lambda: cls.from_config(config)) if cls is transformers.AutoModel else (lambda: cls(config))


def _hf_from_config(config, weights: list[Path] | None = None) -> nn.Module:
    """An empty model (parameters on the meta device, see :func:`_empty`) of the class named in
    ``architectures`` (see :func:`_model_class`); with ``weights`` (its files), refused first
    when they cannot hold it (:func:`_check_size`)."""
    build = _builder(config)
    try:
        if weights is not None:
            _check_size(build, weights, weights[0].parent if len(weights) > 1 else weights[0])
        model = _empty(build)
    except HadaconvError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config transformers accepted can still fail to build (0 heads)
        raise HadaconvError(f"cannot build a model from the config: {_first_line(exc)}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the tied names share one (meta) parameter, as after from_pretrained
    return model


_ACTIVATIONS = {"relu": torch.nn.functional.relu, "gelu": torch.nn.functional.gelu}


def _activation_name(layer: nn.Module) -> str:
    act = layer.activation
    for name, fn in _ACTIVATIONS.items():
        if act is fn or type(act).__name__.lower() == name:
            return name
    raise HadaconvError(
        f"cannot save a Transformer layer with activation {act!r} without pickle (relu or gelu only)"
    )


def _torch_recipe(model: nn.Module) -> dict:
    """The JSON recipe rebuilding an ``nn.TransformerEncoder``/``nn.TransformerDecoder`` stack."""
    if not isinstance(model, (nn.TransformerEncoder, nn.TransformerDecoder)):
        raise HadaconvError(
            f"cannot save a {type(model).__name__} without pickle: hadaconv saves Hugging Face models "
            "and nn.TransformerEncoder/nn.TransformerDecoder stacks; save other modules' state_dict yourself"
        )
    layer = model.layers[0]
    attn = layer.self_attn
    recipe = {
        "class": type(model).__name__,
        "num_layers": len(model.layers),
        "layer": {
            "d_model": attn.embed_dim,
            "nhead": attn.num_heads,
            "dim_feedforward": layer.linear1.out_features,
            "dropout": layer.dropout.p,
            "activation": _activation_name(layer),
            "layer_norm_eps": layer.norm1.eps,
            "batch_first": attn.batch_first,
            "norm_first": layer.norm_first,
            "bias": layer.linear1.bias is not None,
        },
        "norm": None,
    }
    if model.norm is not None:
        if not isinstance(model.norm, nn.LayerNorm):
            raise HadaconvError(
                f"cannot save a final norm of type {type(model.norm).__name__} without pickle"
            )
        recipe["norm"] = {"eps": model.norm.eps, "bias": model.norm.bias is not None}
    return recipe


def _torch_from_recipe(recipe: dict) -> nn.Module:
    try:
        kwargs, d_model = dict(recipe["layer"]), recipe["layer"]["d_model"]
        norm = recipe.get("norm")
        final = nn.LayerNorm(d_model, eps=norm["eps"], bias=norm["bias"]) if norm else None
        if recipe["class"] == "TransformerEncoder":
            return nn.TransformerEncoder(
                nn.TransformerEncoderLayer(**kwargs),
                recipe["num_layers"],
                norm=final,
                enable_nested_tensor=False,
            )
        if recipe["class"] == "TransformerDecoder":
            return nn.TransformerDecoder(
                nn.TransformerDecoderLayer(**kwargs), recipe["num_layers"], norm=final
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise HadaconvError(f"invalid torch_module recipe in config.json: {_first_line(exc)}") from None
    raise HadaconvError(f"invalid torch_module recipe in config.json: unknown class {recipe.get('class')!r}")


def _model_from_config(data: dict, weights: list[Path]) -> nn.Module:
    """The empty model a config.json describes (a Hugging Face config or a torch_module recipe),
    refused when its ``weights`` files cannot hold it."""
    if "torch_module" in data:
        from hadaconv.adapters.mha import prepare_mha

        def build() -> nn.Module:
            return _torch_from_recipe(data["torch_module"])

        _check_size(build, weights, weights[0])
        model = _empty(build)
        prepare_mha(model)
        return model
    return _hf_from_config(_hf_config(data), weights)


def resolve_config(config: str | os.PathLike) -> Path:
    """The absolute path of the config.json that ``config`` (the file or its folder) names (links
    not followed: a hub cache's blob has no file name to go by)."""
    return _config_file(config).absolute()


def _config_file(config: str | os.PathLike) -> Path:
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise HadaconvError(f"config not found: {path} (give the model's config.json, or the folder holding it)")
    return path


# ------------------------------------------------------------------------------- load_model


def load_model(
    source: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = "cpu",
    config_option: str | None = None,
) -> Loaded:
    """Load a model to convert (see the module docstring for the accepted inputs).

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
    _check_finite(loaded.model, loaded.source)
    if dtype is not None:
        loaded.model.to(dtype)
    loaded.model.to(dev)
    return loaded


def carries_config(source: str | os.PathLike) -> bool:
    """Whether ``source`` brings its own config (a folder, a GGUF file), so that a ``config=``
    given for it would be ignored.  Anything else may need one, or is the load's to judge."""
    path = Path(source)
    return path.is_dir() or path.suffix == ".gguf"


def recorded_source(model: str | os.PathLike, flag: str | None = None) -> tuple[str | None, str | None]:
    """(the original a converted folder records, its config.json for bare weights), read without
    loading anything: the original as :func:`original_path` finds it (as recorded when it is
    gone), the config as :func:`recorded_config` gives it (``flag``: see there).  (None, None)
    for anything else."""
    path = Path(model) / "config.json"
    try:
        meta = _read_json(path).get("hadaconv") if path.is_file() else None
    except HadaconvError:  # the load reports what is wrong with it
        return None, None
    if not isinstance(meta, dict) or not isinstance(meta.get("source"), str):
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

    A converted model's weights are refused too (a .safetensors file that :func:`save_converted`
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
    if path.suffix == ".safetensors" and path.is_file():
        in_converted = _is_converted_folder(path.parent)
        if TIED_KEY in (_check_safetensors(path).get("__metadata__") or {}) or \
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
    config_path = _config_file(config)
    if "hadaconv" in _read_json(config_path):
        raise InputError(f"{flag} {config} is a converted model's config: give {whose or 'the model'}'s own "
                         "(the original model's) config.json or its folder")


def _is_converted_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a converted model's config.json (a damaged one counts as not)."""
    try:
        return (folder / "config.json").is_file() and "hadaconv" in _read_json(folder / "config.json")
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
            data = _read_json(path / "config.json")
            # A damaged checkpoint is the load's error to report, not an option's (raises here).
            weights = _folder_weights(path)
            if "hadaconv" in data or "torch_module" in data or not weights:
                return None
            return _hf_from_config(_hf_config(data), weights)
        if path.suffix == ".gguf":
            import transformers

            hf_config = _gguf_config(path)
            model = _empty(lambda: transformers.AutoModelForCausalLM.from_config(hf_config))
            model.tie_weights()  # as from_pretrained does
            return model
        if path.suffix == ".safetensors" and config is not None:
            header = _check_safetensors(path)  # a truncated file is the load's error to report, not --layers'
            data = _read_json(_config_file(config))
            model = None if "hadaconv" in data else _model_from_config(data, [path])
            shapes = {name: list(p.shape) for name, p in model.state_dict().items()} if model is not None else {}
            if any(shapes[k] != v.get("shape") for k, v in header.items() if k in shapes):
                return None  # a config that does not describe these weights: the load says so
            return model
    except Exception:  # noqa: BLE001 - the full load that follows says what is wrong, in one line
        return None
    return None


def _load_any(path: Path, config, trust_pickle: bool, dtype: torch.dtype | None, flag: str) -> Loaded:
    if path.is_dir():
        return _load_folder(path, dtype)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.suffix == ".safetensors":
        return _load_state_dict(path, _read_safetensors(path), config, "safetensors", flag)
    if path.suffix in _PICKLE_SUFFIXES:
        return _load_torch_file(path, config, trust_pickle, flag)
    if path.suffix == ".onnx":
        run = command(f"hadaconv run {path.parent}", f"hadaconv.generate.generate('{path.parent}', prompt)")
        raise HadaconvError(f"{path} is an ONNX graph, which hadaconv runs but does not convert: run its bundle "
                            f"folder with {run}, or give the model it was exported from")
    raise HadaconvError(
        f"unknown input format {path.suffix or '(no extension)'!r} for {path}: expected a model folder, "
        f".gguf, .safetensors (with {flag}) or a torch.save file (.pt, .pth, .bin, .ckpt)"
    )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own tqdm bars (GGUF de-quantization, weight loading: two or three per load)
    would interleave with hadaconv's; our spinner stands for the whole load instead.  Its
    warnings too: the one that matters, weights missing from the file, is ours to refuse
    (:func:`_refuse_missing`).  Every switch is put back as it was, whatever the load raises."""
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


SHARD_INDEX = "model.safetensors.index.json"


def shard_map(folder: Path, name: str = SHARD_INDEX) -> dict[str, Path]:
    """{tensor name: shard file} from the shard index ``folder / name``.  The index is
    untrusted: every shard must be a plain file name, so nothing outside ``folder`` is read.
    Raises ModelFormatError (one line) for an index that breaks this, is empty or does not parse."""
    index = folder / name
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{index} has no weight_map")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise ModelFormatError(f"{index}: the shard of {tensor} must be a file name in the folder, got {shard!r}")
    return {tensor: folder / shard for tensor, shard in weight_map.items()}


def _folder_weights(path: Path) -> list[Path]:
    """A Hugging Face folder's weight files (safetensors, else .bin), each safetensors header
    checked (:func:`_check_safetensors` raises for a damaged one) and its shard indexes, if any,
    too (:func:`shard_map`: transformers would follow them)."""
    for index in path.glob("*.index.json"):  # model.safetensors.index.json, pytorch_model.bin.index.json
        shard_map(path, index.name)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors(file)
    return weights


def _load_folder(path: Path, dtype: torch.dtype | None) -> Loaded:
    config_path = path / "config.json"
    if not config_path.is_file() and (path / "hadaconv_onnx.json").is_file():  # export.bundle.METADATA
        run = command("hadaconv run", "hadaconv.generate.generate")
        raise HadaconvError(f"{path} is an ONNX bundle (what an ONNX export writes): run it with {run}, or give "
                            "the model folder it was exported from")
    if not config_path.is_file():
        raise HadaconvError(
            f"{path} is a folder without config.json "
            "(expected a Hugging Face model folder or a hadaconv output)"
        )
    data = _read_json(config_path)
    if "hadaconv" in data or "torch_module" in data:
        model = load(path)
        return Loaded(model, load_tokenizer(path), f"hadaconv folder {path}", "hadaconv", path,
                      data.get("hadaconv"))
    weights = _folder_weights(path)
    if not weights:
        raise HadaconvError(f"{path} has a config.json but no *.safetensors or *.bin weights")
    config = _hf_config(data)
    _check_size(_builder(config), weights, path)  # a config its weights cannot fill: refused before from_pretrained
    try:
        model, info = _model_class(config).from_pretrained(
            path, config=config, dtype=dtype or "auto", output_loading_info=True
        )
    except Exception as exc:  # noqa: BLE001 - transformers on an untrusted folder: anything (0 heads: ZeroDivisionError)
        raise ModelFormatError(f"cannot load the Hugging Face folder {path}: {_first_line(exc)}") from None
    _refuse_missing(info, path)
    return Loaded(model, load_tokenizer(path), f"Hugging Face folder {path}", "hf-folder", path)


def _gguf_config(path: Path):
    """The Hugging Face config of a GGUF file's metadata, checked against the file (its depth,
    and the parameters it describes against the file's size) before any model is built."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    _check_depth(config, path)
    _check_size(lambda: transformers.AutoModelForCausalLM.from_config(config), [path], path)
    return config


def _load_gguf(path: Path, dtype: torch.dtype | None) -> Loaded:
    import transformers

    try:
        config = _gguf_config(path)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=dtype or torch.float32, output_loading_info=True
        )
        _refuse_missing(info, path)  # before the tokenizer, whose own complaint would hide this one
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except HadaconvError:
        raise
    except Exception as exc:  # noqa: BLE001 - the GGUF reader and tokenizer raise anything on a damaged file
        # gguf-py reads the header with struct: a file that ends early fails as "unpack_from requires...".
        why = f"truncated or damaged ({_first_line(exc)})" if isinstance(exc, struct.error) else _first_line(exc)
        raise ModelFormatError(f"cannot load the GGUF file {path}: {why}") from None
    return Loaded(model, tokenizer, f"GGUF file {path}", "gguf", None)


def _load_state_dict(path: Path, state: dict, config, fmt: str, flag: str) -> Loaded:
    if config is None:
        raise _bare_weights_error(path, flag)
    config_path = _config_file(config)
    data = _read_json(config_path)
    if "model_type" not in data and "torch_module" not in data:  # generation_config.json, tokenizer_config.json
        raise ModelFormatError(f"{config_path} names no model_type: not a model's config; give {flag} the model's "
                               "config.json or its folder")
    model = _model_from_config(data, [path])
    try:
        _load_weights(model, state, str(path))
    except _HeadDropped as exc:
        raise _HeadDropped(f"{exc} to {config_path}") from None
    except ModelFormatError as exc:
        if data.get("architectures"):
            raise ModelFormatError(f"{exc} (is {config_path} this model's config?)") from None
        raise ModelFormatError(f"{exc} ({config_path} names no architectures, so the base {type(model).__name__} "
                               f'was built: add one, e.g. "architectures": '
                               f'["{_causal_lm_class(data.get("model_type")) or "LlamaForCausalLM"}"])') from None
    # The config's folder first (a Hugging Face folder), then the weights' own.
    tokenizer_source = next((folder for folder in (config_path.parent, path.parent)
                             if any((folder / f).is_file() for f in TOKENIZER_FILES)), None)
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
    return _first_line(exc)


def _load_torch_file(path: Path, config, trust_pickle: bool, flag: str) -> Loaded:
    with path.open("rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive, or (before torch 1.6, or with the legacy switch) a pickle,
    # whose first byte is the PROTO opcode.
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise ModelFormatError(f"cannot read {path} as a torch.save file: it is neither a zip archive nor a pickle "
                               "(damaged, or another format)")
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
            raise HadaconvError(f"cannot unpickle {path}: {_first_line(exc2)}") from None
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


# ------------------------------------------------------------------------ saving converted


def hadaconv_meta(
    *,
    adapter: str,
    layers: list[int],
    block: int,
    fit: str | None,
    width: int,
    m: int,
    target: str | None = None,
    **extra: Any,
) -> dict:
    """The ``hadaconv`` section of a converted folder's config.json.

    Args:
        adapter: the adapter's name; ``target`` the regular expression for the generic one.
        layers: indices (``AttentionLayer.index``) of the converted layers.
        block: block size of the projections; fit: the fit mode (None: not recorded, a model
            saved from memory by :func:`save`); width, m: n and its core order.
        extra: anything else worth recording (JSON-serializable), e.g. ``rank``, the low-rank
            residual's (:func:`load` reads each layer's from its stored ``down`` tensor; folders
            written before it have neither and load with rank 0).
    """
    from hadaconv import __version__

    return {
        "version": __version__,
        "adapter": adapter,
        "target": target,
        "layers": sorted(int(i) for i in layers),
        "block": int(block),
        "fit": fit,
        "width": int(width),
        "m": int(m),
        **extra,
    }


def _state_for_saving(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, {alias: stored name}): safetensors refuses tensors sharing memory, so
    exact aliases (tied embeddings) are stored once and partial overlaps are copied."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        t = t.contiguous().clone() if ptr in storages else t.contiguous()
        storages.add(ptr)
        tensors[name] = t.cpu()
    return tensors, aliases


def _config_of(model: nn.Module) -> Any | None:
    """The model's Hugging Face config (saved as config.json), or None for a plain torch module."""
    config = getattr(model, "config", None)
    return config if config is not None and hasattr(config, "to_json_string") else None


def check_savable(model: nn.Module) -> None:
    """Raise HadaconvError (one line) if :func:`save_converted` could not save ``model``: a module
    that is neither a Hugging Face model nor an ``nn.TransformerEncoder``/``nn.TransformerDecoder``
    stack.  Called before a conversion, so that it does not fail after the work."""
    if _config_of(model) is None:
        _torch_recipe(model)


def _config_for_saving(model: nn.Module, meta: dict) -> dict:
    config = _config_of(model)
    if config is not None:
        data = json.loads(config.to_json_string(use_diff=False))
        data["architectures"] = [type(model).__name__]  # load() rebuilds exactly this class
    else:
        data = {"torch_module": _torch_recipe(model)}
    data["hadaconv"] = meta
    return data


def save_converted(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    meta: dict,
    tokenizer: Any | None = None,
    tokenizer_source: str | os.PathLike | None = None,
    report: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a converted model folder atomically and return its path.

    Everything goes into a temporary folder beside ``out_dir`` that is renamed into place at the
    end (:func:`hadaconv.atomic.atomic_folder`), so a failure leaves nothing behind (and an
    overwritten folder intact).

    Args:
        meta: the ``hadaconv`` section (see :func:`hadaconv_meta`).
        tokenizer: saved with ``save_pretrained`` unless ``tokenizer_source`` is given.
        tokenizer_source: a folder whose tokenizer files are copied as they are.
        report: written as report.json.
        overwrite: replace an existing non-empty ``out_dir``.
    """
    from safetensors.torch import save_file

    out = check_output(out_dir, overwrite, folder=True)
    with atomic_folder(out) as tmp:
        config = _config_for_saving(model, meta)
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        tensors, aliases = _state_for_saving(model)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", TIED_KEY: json.dumps(aliases)})
        if tokenizer_source is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_source) / name).is_file():
                    shutil.copy2(Path(tokenizer_source) / name, tmp / name)
        elif tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out


def save(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any | None = None,
    source: str | os.PathLike | None = None,
    target: str | None = None,
    report: Any | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a model converted or distilled in memory (:func:`hadaconv.convert.convert`,
    :func:`hadaconv.distill.distill`, :func:`hadaconv.patch`) as a folder :func:`load` rebuilds,
    the one ``hadaconv convert`` writes; ``save_pretrained`` would store weights that no
    Hugging Face class can rebuild.  Written atomically, as :func:`save_converted` does.

    Args:
        model: a Hugging Face model or ``nn.Transformer*`` stack holding HadamardProjections
            that hadaconv installed (their layer indices are read off them).
        out_dir: the folder to write.
        tokenizer: saved beside the weights (``hadaconv run --prompt``, ``distill`` and ``eval``
            read it).
        source: the original model (a path), recorded as the default teacher of ``hadaconv
            distill`` and baseline of ``hadaconv eval``.
        target: the regular expression given to the generic adapter, if the model was converted
            with one (the layer indices are that adapter's).
        report: written as ``report.json``: what :func:`hadaconv.convert.convert` returned (a
            ConvertReport, as ``hadaconv convert`` writes it) or a dict (for a distillation,
            ``{"distill": distill_report.to_dict()}`` is the layout ``hadaconv distill`` writes).
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        The folder's path.

    Raises:
        HadaconvError: the model holds no HadamardProjection hadaconv installed, no attention
            blocks the adapter (of ``target``) knows, layer indices that are not that adapter's
            (converted with a ``target`` and saved without it), or cannot be saved without pickle.
        InputError: ``model`` not an ``nn.Module`` (a path given first?), or ``report`` neither a
            ConvertReport nor a dict.
        OutputError: ``out_dir`` exists (without ``overwrite``) or cannot be written.
    """
    from hadaconv.adapters import find_adapter
    from hadaconv.hadamard import factorize
    from hadaconv.nn import HadamardProjection
    from hadaconv.report import ConvertReport

    if isinstance(out_dir, nn.Module) and not isinstance(model, nn.Module):
        raise InputError("the model and the folder are swapped: hadaconv.save(model, out_dir)")
    check_module(model)
    check_output(out_dir, overwrite, folder=True, inputs=[source])
    projections = [m for m in model.modules() if isinstance(m, HadamardProjection)]
    if not projections:
        raise HadaconvError("the model holds no HadamardProjection: nothing converted to save (a dense model "
                            "saves with save_pretrained)")
    if any(getattr(p, "layer_index", None) is None for p in projections):
        raise HadaconvError("the model holds a HadamardProjection that hadaconv did not install in an attention "
                            "layer (made by hand?): its place cannot be recorded")
    if report is not None and not isinstance(report, (ConvertReport, dict)):
        raise InputError(f"report must be a ConvertReport or a dict, got {type(report).__name__}")
    adapter = find_adapter(model, target)
    indices = [p.layer_index for p in projections]
    # The indices are the converting adapter's: one that lists an index as dense numbers the layers
    # otherwise, and the folder would rebuild projections in the wrong places.
    clash = sorted(set(indices) & {layer.index for layer in adapter.layers(model)})
    if clash:
        raise HadaconvError(f"layer {clash[0]} is converted by hadaconv's count but dense by the {adapter.name} "
                            f"adapter's: a model converted with a {option('target')} saves with the same one")
    check_savable(model)
    first = projections[0]
    meta = hadaconv_meta(adapter=adapter.name, layers=indices,
                         block=first.block, fit=None, width=first.n, m=factorize(first.n).m, target=target,
                         source=None if source is None else str(source), rank=first.rank)
    if isinstance(report, ConvertReport):
        report = report.to_dict()
    return save_converted(model, out_dir, meta=meta, tokenizer=tokenizer, report=report, overwrite=overwrite)


# ------------------------------------------------------------------------ loading converted


def original_path(converted: str | os.PathLike, meta: dict) -> Path:
    """The model a converted folder was made from: the ``source`` its conversion recorded in
    ``meta`` (its config.json's hadaconv section), as written or relative to the converted
    folder's parent when the conversion ran elsewhere, or this machine's copy of an embedded
    model (:func:`hadaconv.realmodels.installed_copy`: its virtual environment may have moved).
    Distillation's default teacher and evaluation's default baseline.  Raises HadaconvError
    when none is recorded or it is gone."""
    from hadaconv.realmodels import installed_copy

    source = meta.get("source")
    if not source or not isinstance(source, str):
        raise HadaconvError(f"{converted} records no source model")
    for path in (Path(source), Path(converted).parent / source):
        if path.exists():
            return path
    if (copy := installed_copy(source)) is not None:
        return copy
    raise HadaconvError(f"the original model {source} recorded in {converted}/config.json is not found")


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a converted model from its folder, exactly and without pickle (eval mode).

    The model alone: ``load_model(folder)`` returns it with its tokenizer (``.tokenizer``), or
    :func:`load_tokenizer` reads the tokenizer by itself.

    Raises:
        HadaconvError: no such folder, a file, or a folder without a converted model's config.
        ModelFormatError: the config's hadaconv section or the weights are missing or damaged.
    """
    from hadaconv.adapters import find_adapter
    from hadaconv.swap import install_projection

    folder = Path(folder)
    config_path = folder / "config.json"
    if folder.is_file():
        raise HadaconvError(f"{folder} is a file, not a converted folder: hadaconv.load rebuilds what convert "
                            "writes; hadaconv.io.load_model reads models of any format")
    if not folder.exists():
        raise HadaconvError(f"no such folder: {folder}")
    if not config_path.is_file():
        raise HadaconvError(f"{folder} is not a hadaconv folder: no config.json")
    data = _read_json(config_path)
    # A torch_module recipe folder may also hold an unconverted model (no hadaconv section).
    meta = data.get("hadaconv", {} if "torch_module" in data else None)
    if not isinstance(meta, dict):
        raise HadaconvError(f"{config_path} has no hadaconv section: not a converted model (use load_model)")
    _check_meta(config_path, meta)
    weights, index = folder / WEIGHTS, folder / SHARD_INDEX
    if weights.is_file():
        files = [weights]
    elif index.is_file():  # written shard by shard (hadaconv.stream)
        files = sorted(set(shard_map(folder).values()))
        weights = index
    else:
        raise ModelFormatError(f"{folder} has no {WEIGHTS}")
    tensors = {}
    for file in files:
        tensors.update(_read_safetensors(file))
    model = _model_from_config(data, files)  # empty: the stored tensors are assigned, in their own dtype

    adapter = find_adapter(model, meta.get("target"))
    adapter.prepare(model)
    layers = {layer.index: layer for layer in adapter.layers(model)}
    for index in meta.get("layers", []):
        if index not in layers:
            raise HadaconvError(f"{config_path}: converted layer {index} does not exist in the rebuilt model")
        layer = layers[index]
        gamma = tensors.get(f"{layer.out_name}.gamma")
        block = gamma.shape[-1] if gamma is not None and gamma.dim() == 3 else int(meta.get("block", 1))
        # Each layer's rank is its own D [r, d_in]: a folder converted again with another --rank
        # holds layers of both, and folders from before the residual have none.
        down = tensors.get(f"{layer.out_name}.down")
        rank = down.shape[0] if down is not None else 0
        install_projection(layer, block=block, bias=f"{layer.out_name}.beta" in tensors, rank=rank)
    _load_weights(model, tensors, str(weights))
    model.eval()
    return model


def _check_meta(config_path: Path, meta: dict) -> None:
    """The hadaconv section's fields have the types :func:`hadaconv_meta` writes (the file is
    untrusted: ``"layers": 5`` would otherwise fail deep inside the rebuild)."""
    def index(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    checks = {"layers": isinstance(meta.get("layers", []), list) and all(map(index, meta.get("layers", []))),
              "block": index(meta.get("block", 1)) and meta.get("block", 1) >= 1,
              "target": meta.get("target") is None or isinstance(meta["target"], str),
              "source": meta.get("source") is None or isinstance(meta["source"], str)}
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ModelFormatError(f"{config_path}: hadaconv.{bad[0]} is not what a conversion writes "
                               f"({meta.get(bad[0])!r:.60})")


def load_tokenizer(folder: str | os.PathLike) -> Any | None:
    """The tokenizer saved in ``folder``, or None when it holds no tokenizer files."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES if f != "generation_config.json"):
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise HadaconvError(f"cannot load the tokenizer in {folder}: {_first_line(exc)}") from None
