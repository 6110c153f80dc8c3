"""Saving and loading converted folders.

A converted folder (:func:`save_converted`) holds ``config.json`` (the original config plus a
``hadaconv`` section), ``model.safetensors`` (tied tensors stored once), tokenizer files and
``report.json``.  :func:`load` rebuilds the model without any pickle: the architecture from the
config, the adapter's ``prepare``, a HadamardProjection at each converted layer, then the weights,
loaded strictly.  Plain ``nn.Module``s other than PyTorch's own transformer stacks cannot be saved
without a pickle; :func:`check_savable` says so.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hadaconv.atomic import atomic_folder, check_output
from hadaconv.errors import HadaconvError, InputError, ModelFormatError, check_module, check_path, command, option
from hadaconv.io.build import check_finite, load_weights, model_from_config, torch_recipe
from hadaconv.io.files import (META_KEY, SENTENCE_CONFIG, SHARD_INDEX, TIED_KEY, TOKENIZER_FILES, VOCABULARY_FILES,
                               WEIGHTS, converted_meta, first_line, read_json, read_safetensors, shard_map)

__all__ = ["check_savable", "config_for_saving", "hadaconv_meta", "load", "load_tokenizer", "original_path", "save",
           "save_converted"]


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
        torch_recipe(model)


def config_for_saving(model: nn.Module, meta: dict) -> dict:
    config = _config_of(model)
    if config is not None:
        data = json.loads(config.to_json_string(use_diff=False))
        data["architectures"] = [type(model).__name__]  # load() rebuilds exactly this class
        if (data.get("quantization_config") or {}).get("quant_method") == "gguf":
            del data["quantization_config"]  # the GGUF's weights were dequantized: the folder holds plain tensors
    else:
        data = {"torch_module": torch_recipe(model)}
    data[META_KEY] = meta
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
    extra: Callable[[Path], object] | None = None,
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
        overwrite: replace an existing ``out_dir`` that hadaconv wrote (a folder of other files is refused).
        extra: called with the temporary folder, to add files of its own (distill's curve), which
            are then part of the output like the others.
    """
    from safetensors.torch import save_file

    out = check_output(out_dir, overwrite, folder=True)
    with atomic_folder(out) as tmp:
        config = config_for_saving(model, meta)
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
        if extra is not None:
            extra(tmp)
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
        report: written as ``report.json``: what :func:`hadaconv.convert.convert` or
            :func:`hadaconv.distill.distill` returned (a ConvertReport, or a DistillReport as
            the ``distill`` section), or a dict as it is.  ``hadaconv distill`` keeps the
            conversion's report beside its section: ``{**convert_report.report_json(),
            **distill_report.report_json()}`` does the same.
        overwrite: replace an existing ``out_dir`` that hadaconv wrote (a folder of other files is refused).

    Returns:
        The folder's path.

    Raises:
        HadaconvError: the model holds no HadamardProjection hadaconv installed, no attention
            blocks the adapter (of ``target``) knows, layer indices that are not that adapter's
            (converted with a ``target`` and saved without it), or cannot be saved without pickle.
        InputError: ``model`` not an ``nn.Module`` (a path given first?), or ``report`` none of
            a ConvertReport, a DistillReport and a dict.
        OutputError: ``out_dir`` exists (without ``overwrite``) or cannot be written.
    """
    from hadaconv.adapters import find_adapter
    from hadaconv.hadamard import factorize
    from hadaconv.nn import HadamardProjection
    from hadaconv.rotation import is_rotated

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
    # Both reports know their layout (report_json); this layer does not import distillation.
    if report is not None and not isinstance(report, dict) and not callable(getattr(report, "report_json", None)):
        raise InputError(f"report must be a ConvertReport, a DistillReport or a dict, got {type(report).__name__}")
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
                         source=None if source is None else str(source), rank=first.rank,
                         rotated=is_rotated(model))
    if report is not None and not isinstance(report, dict):
        report = report.report_json()
    return save_converted(model, out_dir, meta=meta, tokenizer=tokenizer, report=report, overwrite=overwrite)


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

    check_path(folder, "folder", "a converted model in memory is saved with hadaconv.save(model, folder)")
    folder = Path(folder)
    config_path = folder / "config.json"
    if folder.is_file():
        raise HadaconvError(f"{folder} is a file, not a converted folder: hadaconv.load rebuilds what convert "
                            "writes; hadaconv.io.load_model reads models of any format")
    if not folder.exists():
        raise HadaconvError(f"no such folder: {folder}")
    refuse_bundle(folder)
    if not config_path.is_file():
        raise HadaconvError(f"{folder} is not a hadaconv folder: no config.json")
    data = read_json(config_path)
    # A torch_module recipe folder may also hold an unconverted model (no hadaconv section).
    meta = converted_meta(data, config_path)
    if meta is None and "torch_module" in data:
        meta = {}
    if meta is None:
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
        tensors.update(read_safetensors(file))
    model = model_from_config(data, files)  # empty: the stored tensors are assigned, in their own dtype

    adapter = find_adapter(model, meta.get("target"))
    adapter.prepare(model)
    stream = adapter.residual_stream
    mapped = stream is not None and f"{stream.final_norm}.map.weight" in tensors  # a rotated stream, tied head
    if mapped or meta.get("rotated"):
        from hadaconv.rotation import map_final_norm, mark_rotated

        if mapped:
            map_final_norm(model, stream)
        mark_rotated(model)
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
        if down is not None and down.dim() != 2:
            raise ModelFormatError(f"{weights}: {layer.out_name}.down has shape {list(down.shape)}, not [rank, width]")
        rank = down.shape[0] if down is not None else 0
        install_projection(layer, block=block, bias=f"{layer.out_name}.beta" in tensors, rank=rank)
    load_weights(model, tensors, str(weights))
    check_finite(model, str(weights))
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
    if meta.get("target") is not None:  # run on every module name at the rebuild: checked first
        from hadaconv.adapters.generic import compile_target

        try:
            compile_target(meta["target"], what="hadaconv.target")
        except HadaconvError as exc:
            raise ModelFormatError(f"{config_path}: {exc}") from None


def refuse_bundle(folder: Path) -> None:
    """Say what an ONNX bundle given where a model folder goes is, and what takes it."""
    meta = folder / "hadaconv_onnx.json"  # export.bundle.METADATA
    if not (folder / "config.json").is_file() and meta.is_file():
        try:  # hadaconv run takes encoders, classifiers and causal LMs with the KV cache; a damaged file, its reader
            data = read_json(meta)
            kind = data.get("kind")
            runs = kind != "module" and not (kind == "causal-lm" and data.get("cache", 0) is None)
        except HadaconvError:
            runs = True
        api = ("hadaconv.generate.generate (an encoder's: hadaconv.generate.embed, a classifier's: "
               "hadaconv.generate.classify)")
        run = command("hadaconv run", api) if runs else "hadaconv.export.bundle.open_bundle"
        raise HadaconvError(f"{folder} is an ONNX bundle (what an ONNX export writes): run it with {run}, or give "
                            "the model folder it was exported from")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a tokenizer's vocabulary (what :func:`load_tokenizer` reads)."""
    return any((Path(folder) / f).is_file() for f in VOCABULARY_FILES)


def load_tokenizer(folder: str | os.PathLike) -> Any | None:
    """The tokenizer saved in ``folder``, or None when it holds no vocabulary file.  In a
    sentence-transformers folder its ``model_max_length`` becomes the ``max_seq_length`` of
    ``sentence_bert_config.json`` where that is smaller (all-MiniLM-L6-v2: 256, its tokenizer 512):
    the length ``SentenceTransformer.encode`` reads, which the converted folder and the bundle then
    keep with the tokenizer.

    Raises:
        HadaconvError: a tokenizer transformers cannot load, or a sentence-transformers config
            that is not a JSON object (ModelFormatError).
    """
    folder = Path(folder)
    if not has_tokenizer(folder):
        return None
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise HadaconvError(f"cannot load the tokenizer in {folder}: {first_line(exc)}") from None
    if (folder / SENTENCE_CONFIG).exists():
        limit = read_json(folder / SENTENCE_CONFIG).get("max_seq_length")
        if type(limit) is int and 0 < limit < tokenizer.model_max_length:  # else sentence-transformers' own default
            tokenizer.model_max_length = limit
    return tokenizer
