"""Layer-by-layer conversion of a sharded checkpoint: one decoder block in memory at a time.

``convert_streamed(folder, out, ConvertConfig(...))`` converts a Hugging Face folder of
safetensors shards whose decoder blocks run in sequence (the Llama family and others whose
blocks sit in one ``nn.ModuleList``) without ever holding the whole model.  It is ``convert``'s
own block loop (:func:`hadaconv.blockwise.convert_blockwise`: teacher block, student block,
statistics, fit, swap, compensation, the converted block's outputs fed on) with the same
options and defaults; only where a block's weights come from and where they go differ
(:class:`ShardDecoder`):

1. the model is built empty (every parameter on the meta device; :func:`hadaconv.io.load_model`
   does the same before assigning all weights);
2. the embeddings (everything outside the blocks but an untied output head) are read from the
   shards with ``safe_open`` just to compute the first block's inputs for the calibration
   windows (hidden states, rotary tables), then released;
3. block ``i``'s weights alone are read when the loop reaches it (in the compute dtype); the
   teacher's pass runs on them before the swap, the student's after, and once the loop is
   through with the block it is written as output shard ``i + 1`` (in the checkpoint's dtype)
   and released;
4. the tensors outside the blocks (embeddings, final norm, head) are copied from the input shards
   to the output tensor by tensor, never loaded as a model.

Peak memory: one block (in the compute dtype), the hidden states of the calibration windows
(teacher and student, in and out of one block), one layer's statistics (2 d^2 float64 values,
calibration and held-out: 268 MB at d = 4096) and the fit's d x d temporaries, with
compensation the down-projection's ridge sums (:class:`hadaconv.compensate.RidgeSums`: with
fewer calibration tokens N than its input width D the N tokens themselves, N x D float64, solved
in the N x N token space; else 2 D^2 float64 values, 3.3 GB at Llama-3-8B's D = 14336, and their
eigendecomposition), plus the largest single tensor copied
(the embedding matrix), whatever the depth (ranking adds copies that grow with it: below).

Ranking (``max_layers`` / ``max_loss``) reads the blocks twice: a first pass that writes nothing
fits every candidate on the teacher's statistics and measures its sensitivity as ``convert_file``
does, carrying one copy of the probe windows' hidden states per candidate through the blocks
(:func:`rank_streamed`), and then the block loop converts the layers chosen.  It adds the copies
(probe windows x seq_len x d x 4 bytes a candidate) and, after the last block, the tensors
outside the blocks in the compute dtype to the peak.

Differences from the in-memory ``convert``: sensitivity is measured only to rank; text sampled
from the model (the default calibration source for causal LMs) is only read from the cache, since
sampling runs the whole model once per token; ``--calib none`` (a data-free fit) is refused;
statistics are not shared across ``torchrun`` ranks; the model is not checked to replay block by
block (the blocks must run in sequence, as the Llama family's do).  On the CPU, half-precision
checkpoints run their blocks in float32, as ``convert_file`` does (CPU bfloat16 matrix products
measured 7x slower than float32 here); the output keeps the checkpoint's dtype.
"""

from __future__ import annotations

import ctypes
import json
import resource
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from hadaconv.adapters import AttentionLayer, block_list, holds
from hadaconv.blockwise import Decoder, block_pass, hidden_of
from hadaconv.convert import (Calibration, ConvertConfig, Target, calibration_batches, check_config,
                              check_convert_output, choose_layers, chooses_nothing, compensate_and_apply, find_target,
                              fit_with_row, mark_rows, no_tokenizer, probe_batches, warn_now, why_not_compensated)
from hadaconv.errors import HadaconvError, InputError, ModelFormatError, command, option
from hadaconv.fit import FitResult
from hadaconv.hadamard import factorize
from hadaconv.io import SHARD_INDEX as INDEX, TIED_KEY
from hadaconv.progress import progress
from hadaconv.report import ConvertReport, LayerReport, max_layers_warning
from hadaconv.rotation import NOT_STREAMED
from hadaconv.sensitivity import metric, output_divergences
from hadaconv.swap import apply_fit

__all__ = ["ShardDecoder", "check_request", "convert_streamed", "rank_streamed", "stored_parameters"]


class ShardDecoder(Decoder):
    """The decoder blocks of an empty (meta-device) model whose weights stay in safetensors shards.

    ``block(i)`` reads block ``i``'s tensors (floating ones in ``compute``), ``done(i)`` writes the
    block, converted or not, as ``out/model-{i+1:05d}.safetensors`` (floating tensors in
    ``stored``) and frees it (``release(i)`` frees it unwritten); ``first_inputs`` reads the
    tensors outside the blocks (but an untied head) in ``stored`` just to run the model up to its
    first block, casting what the embedding hands on to ``compute``; ``outside()`` holds them all,
    the head included, in ``compute`` while a ranking measures its outputs.  ``weight_map`` and
    ``written`` (bytes) collect what ``done`` wrote.  ``layers``: those being converted; ``done``
    also frees a replaced output projection's weights, which only the layer's weight slot still
    holds (64 MB a block at d = 4096 in float32, which otherwise added up over the depth).
    """

    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList, kind: str, files: dict[str, Path],
                 outside: list[str], device: torch.device, compute: torch.dtype, stored: torch.dtype,
                 out: Path, layers: list[AttentionLayer]) -> None:
        super().__init__(model, list(blocks), kind, device)
        self.prefix, self.files, self.outside_names, self.compute, self.stored, self.out = \
            prefix, files, outside, compute, stored, out
        self.layers = layers
        self.weight_map: dict[str, str] = {}
        self.written = 0
        self._loaded: set[int] = set()

    def block(self, i: int) -> nn.Module:
        if i not in self._loaded:
            _materialize(self.model, _state_names(self.blocks[i], f"{self.prefix}.{i}."), self.files, self.device,
                         self.compute)
            self._loaded.add(i)
        return self.blocks[i]

    def done(self, i: int) -> None:
        state = {f"{self.prefix}.{i}.{k}": v.to(self.stored) if v.is_floating_point() else v
                 for k, v in self.block(i).state_dict().items()}
        shard = f"model-{i + 1:05d}.safetensors"
        self.written += _save_shard(state, self.out / shard)
        self.weight_map.update({name: shard for name in state})
        del state
        self.release(i)

    def release(self, i: int) -> None:
        """Free block ``i`` without writing it (a pass that only reads the blocks)."""
        _release(self.blocks[i])
        # A replaced output projection is out of the block but still in its layer's weight slot.
        for layer in self.layers:
            if layer.out_name.startswith(f"{self.prefix}.{i}."):
                _release_all([layer.out.weight, layer.out.bias, layer.out.column])
        self._loaded.discard(i)
        _trim_heap()

    @contextmanager
    def outside(self):
        """Every tensor outside the blocks, the head included, read for the duration of a
        whole-model forward whose blocks replay recorded outputs: in the compute dtype, but for
        the input embedding (when it is not also the head), whose output the replay discards."""
        embedding = _embedding_only(self.model)
        _materialize(self.model, [n for n in self.outside_names if n in embedding], self.files, self.device,
                     self.stored)
        _materialize(self.model, [n for n in self.outside_names if n not in embedding], self.files, self.device,
                     self.compute)
        try:
            yield self.model
        finally:
            _release(self.model)

    def first_inputs(self, batches):
        head = _head_only(self.model)
        _materialize(self.model, [n for n in self.outside_names if n not in head], self.files, self.device, self.stored)
        # The embedding's output in the compute dtype: what follows (rotary tables, masks) takes
        # its dtype from it, as in a model loaded whole in that dtype.
        embed = self.model.get_input_embeddings()
        handle = embed.register_forward_hook(
            lambda m, args, out: out.to(self.compute) if out.is_floating_point() else out)
        try:
            return super().first_inputs(batches)
        finally:
            handle.remove()
            _release(self.model)


def rank_streamed(dec: ShardDecoder, target: Target, data: Calibration, cfg: ConvertConfig,
                  fits: dict[int, FitResult], rows: dict[int, LayerReport]) -> list[int]:
    """Stages 3 and 4 of a ranked conversion (``--max-layers`` / ``--max-loss``) in one pass that
    only reads the blocks: each candidate's fit on the teacher's statistics (into ``fits`` and
    ``rows``) and its sensitivity, measured as ``convert_file`` measures it; returns the layers
    chosen.

    The whole model is never held.  The original's hidden states on the probe windows are carried
    through the blocks, and where a candidate's block is reached a copy runs through it with that
    layer alone converted; the copy then goes on through the original blocks that follow, beside
    the others.  After the last block only what is outside the blocks (embedding, final norm,
    head) is read, to turn each copy into the output its KL is measured on.  The copies cost
    probe windows x seq_len x d x 4 bytes each (float32 compute): 16 x 256 x 4096 x 4 = 67 MB a
    layer at Llama-3-8B's width, 2.1 GB for its 32, on top of the conversion's own peak.
    """
    windows = probe_batches(data, cfg, False)
    returned, copies = _ranking_pass(dec, target, data, windows, cfg, fits, rows)
    with dec.outside() as model:
        values = output_divergences(model, dec.blocks, [dec.model_kwargs(b) for b in windows], returned, copies,
                                    target.kind, cfg.progress)
    for layer in target.layers:
        rows[layer.index].sensitivity = values[layer.index]
    return choose_layers(target.layers, rows, cfg)


def _ranking_pass(dec: ShardDecoder, target: Target, data: Calibration, windows: list[dict], cfg: ConvertConfig,
                  fits: dict[int, FitResult], rows: dict[int, LayerReport]) -> tuple[list, dict[int, list]]:
    """:func:`rank_streamed`'s pass over the blocks: (what the original's last block returned for
    each probe batch, in its own form; {layer index: the probe's last hidden states with that
    layer alone converted})."""
    batches = [("calib", b) for b in data.calib] + [("heldout", b) for b in data.heldout]
    captured = dec.first_inputs(batches + [("probe", b) for b in windows])
    inputs, probe = captured[:len(batches)], captured[len(batches):]
    teacher, original = [inp.args[0] for inp in inputs], [inp.args[0] for inp in probe]
    last = max(pos for pos in range(len(dec)) if any(holds(dec.blocks[pos], layer) for layer in target.layers))
    copies: dict[int, list[torch.Tensor]] = {}
    returned: list = []
    with progress(len(dec), "rank layers (streamed)", cfg.progress) as step, torch.no_grad():
        for pos in range(len(dec)):
            block = dec.block(pos)
            here = [layer for layer in target.layers if holds(block, layer)]
            if pos == last + 1:  # no statistics are needed past the last candidate: only the probe goes on
                inputs, teacher = [], []
            stats, teacher = block_pass(block, inputs, teacher, here, cfg.stats_device)
            for layer in here:
                with torch.enable_grad():  # the fit's L-BFGS
                    fits[layer.index], rows[layer.index] = fit_with_row(
                        layer, stats.moments(layer.index), stats.moments(layer.index, "heldout"), cfg, target)
            del stats
            for i, states in copies.items():  # in place: never two generations of the copies at once
                copies[i] = block_pass(block, probe, states, [], None)[1]
            for layer in here:
                undo = apply_fit(layer, fits[layer.index])
                try:
                    copies[layer.index] = block_pass(block, probe, original, [], None)[1]
                finally:
                    undo()
            returned = [inp.raw(block, h) for inp, h in zip(probe, original)]
            original = [hidden_of(out) for out in returned]
            dec.release(pos)
            step()
    return returned, copies


def _tensor_files(folder: Path) -> dict[str, Path]:
    """{tensor name: shard file} of a folder of safetensors shards."""
    from safetensors import safe_open

    from hadaconv.io.files import check_safetensors, shard_map

    if (folder / INDEX).is_file():
        names = shard_map(folder)
        for file in sorted(set(names.values())):  # a missing or truncated shard fails here, not mid-run
            check_safetensors(file)
        return names
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder} holds no *.safetensors shards to stream from")
    names = {}
    for file in files:
        check_safetensors(file)
        with safe_open(str(file), framework="pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def _materialize(model: nn.Module, names: list[str], files: dict[str, Path], device, dtype) -> None:
    """Read the named parameters and buffers from the shards into ``model`` (replacing meta
    tensors), floating ones in ``dtype``."""
    from safetensors import safe_open

    missing = [n for n in names if n not in files]
    if missing:
        raise ModelFormatError(f"the checkpoint has no tensor {missing[0]} (and {len(missing) - 1} more)")
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, group in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in group:
                t = f.get_tensor(name)
                t = t.to(device, dtype) if t.is_floating_point() else t.to(device)
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner)
                if attr in module._parameters:
                    _swap(module._parameters[attr], t)
                else:
                    module._buffers[attr] = t


def _swap(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give ``param`` the tensor ``value`` in place: the Python object stays the same, so the
    adapter's references to it (the layers' weight slots) see the new values."""
    torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=False))


def _release(module: nn.Module) -> None:
    """Drop a module's parameters' storage (back to meta tensors)."""
    _release_all(list(module.parameters()))


def _release_all(params: list[nn.Parameter | None]) -> None:
    for p in params:
        if isinstance(p, nn.Parameter) and not p.is_meta:
            _swap(p, p.detach().to("meta"))


def _trim_heap() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Measured on the 32-block Llama-3-8B-shaped run: without it the resident size rose by 1.4 GiB
    over the blocks while the live tensors did not grow (freed block buffers kept by the
    allocator, fragmenting the brk heap), so the peak depended on the depth after all."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _state_names(module: nn.Module, prefix: str) -> list[str]:
    """Full names of a module's parameters and persistent buffers (what a checkpoint stores)."""
    return [f"{prefix}{name}" for name in module.state_dict(keep_vars=True)]


def _blocks(model: nn.Module, layers) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the decoder blocks, one for each attention layer, in order."""
    found = block_list(model, layers, one_per_layer=True)
    if found:
        return found
    raise HadaconvError("layer-by-layer conversion needs the attention blocks in one ModuleList, "
                        "one block per attention layer, run in sequence")


def _floating_dtype(files: dict[str, Path], prefix: str) -> torch.dtype:
    """The dtype of the checkpoint's first floating tensor under ``prefix`` (its blocks)."""
    from safetensors import safe_open

    for name, file in files.items():
        if name.startswith(prefix):
            with safe_open(str(file), framework="pt") as f:
                t = f.get_slice(name)
                dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                         "F64": torch.float64}.get(t.get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def stored_parameters(model: nn.Module, stored: Iterable[str]) -> list[str]:
    """One name of ``stored`` (the names a checkpoint holds) for each parameter of ``model`` the
    checkpoint holds: a tied parameter is counted once, under whichever of its names it is
    stored (a checkpoint may hold both ``embed_tokens.weight`` and ``lm_head.weight``), and
    buffers (BERT's ``position_ids``) not at all, as ``convert_file`` counts ``parameters()``."""
    stored, seen, names = set(stored), set(), []
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in stored and id(param) not in seen:
            seen.add(id(param))
            names.append(name)
    return names


def _count(files: dict[str, Path], names: list[str]) -> tuple[int, int]:
    """(elements, bytes) of the named tensors, from the shard headers."""
    from safetensors import safe_open

    size = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    elements = nbytes = 0
    for file, group in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in group:
                t = f.get_slice(name)
                n = 1
                for dim in t.get_shape():
                    n *= dim
                elements += n
                nbytes += n * size.get(t.get_dtype(), 4)
    return elements, nbytes


def _head_only(model: nn.Module) -> set[str]:
    """Names of the output head's parameters that are not also the input embedding (an untied
    head is only needed after the last block)."""
    return _unshared(model, _embeddings(model, "output"), _embeddings(model, "input"))


def _embedding_only(model: nn.Module) -> set[str]:
    """Names of the input embedding's parameters that are not also the output head."""
    return _unshared(model, _embeddings(model, "input"), _embeddings(model, "output"))


def _embeddings(model: nn.Module, side: str) -> nn.Module | None:
    """The model's input or output embedding (None where it has no such accessor or module)."""
    getter = getattr(model, f"get_{side}_embeddings", None)
    return getter() if getter is not None else None


def _unshared(model: nn.Module, module: nn.Module | None, other: nn.Module | None) -> set[str]:
    """Names of ``module``'s parameters that ``other`` does not share (tied weights)."""
    if module is None:
        return set()
    ids = {id(p) for p in module.parameters()} - ({id(p) for p in other.parameters()} if other is not None else set())
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> int:
    from safetensors.torch import save_file

    # The marker of a converted model's weights (nothing is tied in a streamed conversion's shards).
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", TIED_KEY: "{}"})
    return sum(v.numel() * v.element_size() for v in tensors.values())


def _copy_outside(names: list[str], files: dict[str, Path], out: Path, first: int) -> tuple[dict[str, str], int, int]:
    """Copy the tensors outside the blocks as they are, one output shard per large tensor (so at
    most one is in memory); returns ({name: shard}, tensors' bytes, next shard number)."""
    from safetensors import safe_open

    weight_map, total, small, number = {}, 0, {}, first
    for name in names:
        with safe_open(str(files[name]), framework="pt") as f:
            t = f.get_tensor(name)
        if t.numel() * t.element_size() < 64 * 2**20:
            small[name] = t
            continue
        shard = f"model-{number:05d}.safetensors"
        total += _save_shard({name: t}, out / shard)
        weight_map[name], number = shard, number + 1
        del t
    if small:
        shard = f"model-{number:05d}.safetensors"
        total += _save_shard(small, out / shard)
        weight_map.update({name: shard for name in small})
        number += 1
    return weight_map, total, number


def _fingerprint(model: nn.Module, files: dict[str, Path], dtype: torch.dtype) -> str:
    """:func:`hadaconv.sample.model_fingerprint` of the model loaded whole with its floating
    tensors in ``dtype``, read from the shards one tensor at a time."""
    from safetensors import safe_open

    from hadaconv.sample import tensors_fingerprint

    state = model.state_dict(keep_vars=True)

    def source(name: str, t: torch.Tensor) -> str | None:  # a tied tensor is stored under one name
        return name if name in files else next((n for n, u in state.items() if u is t and n in files), None)

    def tensors():
        for name, t in state.items():
            stored = source(name, t)
            if stored is not None:
                with safe_open(str(files[stored]), framework="pt") as f:
                    t = f.get_tensor(stored)
            yield name, t.to(dtype) if t.is_floating_point() else t

    return tensors_fingerprint(getattr(model, "config", None), tensors())


def convert_streamed(
    source: str | Path,
    out_dir: str | Path,
    config: ConvertConfig | None = None,
    *,
    device: str | None = "cpu",
    overwrite: bool = False,
) -> ConvertReport:
    """Convert the Hugging Face folder ``source`` block by block (see the module docstring) and
    write a converted folder (sharded, in the checkpoint's dtype) that :func:`hadaconv.load`
    rebuilds; its weights equal ``convert_file``'s with the same options and text (compared in
    ``tests/test_scale.py``).

    Args:
        source: a folder with config.json, safetensors shards and tokenizer files.
        out_dir: the output folder (must not exist or be empty, unless ``overwrite``).
        config: conversion options, as for ``convert``; ``calib="none"`` is refused, sensitivity
            is measured only to rank (``max_layers`` / ``max_loss``: :func:`rank_streamed`),
            sampled text must be cached.
        device: where blocks run ("cpu", "cuda", "cuda:N"; None: a GPU when present); the
            statistics go to ``config.stats_device`` (default: the same device).
        overwrite: replace an existing output folder that hadaconv wrote (a folder of other files is refused).

    Raises:
        HadaconvError: not a sharded Hugging Face folder, blocks not in sequence, bad options,
            sampled calibration text not cached.
    """
    from hadaconv.atomic import atomic_folder
    from hadaconv.device import resolve_device
    from hadaconv.io import load_tokenizer, source_key
    from hadaconv.io.build import hf_config, hf_from_config
    from hadaconv.io.files import read_json
    from hadaconv.sample import reading_source

    cfg = check_config(config)
    start = time.perf_counter()
    source = check_request(source, cfg)
    out = check_convert_output(source, out_dir, cfg, overwrite=overwrite)
    dev = resolve_device(device)
    files = _tensor_files(source)
    model = hf_from_config(hf_config(read_json(source / "config.json")), sorted(set(files.values())))
    model.eval()
    original = stored_parameters(model, files)
    target = find_target(model, cfg)
    cfg = replace(cfg, block=target.block)
    prefix, blocks = _blocks(model, target.adapter.layers(model))
    stored = _floating_dtype(files, f"{prefix}.")
    compute = torch.float32 if dev.type == "cpu" and stored in (torch.bfloat16, torch.float16) else stored

    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise no_tokenizer()
    report = ConvertReport(mode=cfg.mode, block=cfg.block, adapter=target.adapter.name, sequential=cfg.sequential,
                           rank=cfg.rank, compensate=cfg.compensate and bool(target.adapter.residual_maps),
                           max_layers=cfg.max_layers)
    if cfg.compensate:
        report.compensate_skipped = why_not_compensated(target, data_free=False, looped=True)
    if cfg.rotate:  # it rewrites every block and the embedding before the first fit
        report.rotate_skipped = NOT_STREAMED
    if chooses_nothing(cfg, len(target.layers)):  # every candidate is converted: no ranking pass
        warn_now(cfg, max_layers_warning(cfg.max_layers, len(target.layers)))
        cfg = replace(cfg, max_layers=None)
    with reading_source(source_key(source, device=dev.type)):  # the key convert_file records for the same files
        data = calibration_batches(model, tokenizer, cfg, fingerprint=lambda: _fingerprint(model, files, compute))
    data.record(report, cfg, ranks=cfg.ranked)  # cfg asks no ranking where it would choose nothing
    outside = [n for n in model.state_dict(keep_vars=True) if not n.startswith(f"{prefix}.") and n in files]
    fits, rows, chosen = {}, {}, [layer.index for layer in target.layers]
    with atomic_folder(out) as tmp:
        dec = ShardDecoder(model, prefix, blocks, target.kind, files, outside, dev, compute, stored, tmp,
                           target.layers)
        if cfg.ranked:
            chosen = rank_streamed(dec, target, data, cfg, fits, rows)
            report.sensitivity_metric = metric(target.kind)
        compensate_and_apply(dec, target, data, cfg, fits, rows, chosen)
        mark_rows(report, target, fits, rows, chosen)
        copied, size, _ = _copy_outside(outside, files, tmp, len(blocks) + 1)
        weight_map = {**dec.weight_map, **copied}
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": dec.written + size},
                                             "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8")
        _write_config_and_tokenizer(tmp, model, target, cfg, report, source, stored)
        report.params_before, report.bytes_before = _count(files, original)
        # The converted blocks' gamma and beta in place of W_o:
        report.params_after, report.bytes_after = _count({n: tmp / s for n, s in weight_map.items()},
                                                         stored_parameters(model, weight_map))
        report.seconds = time.perf_counter() - start
        report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report


def check_request(source: str | Path, cfg: ConvertConfig) -> Path:
    """Refuse what the block loop cannot do, before anything is read; the source folder.

    Raises:
        InputError: a data-free fit asked of the block loop.
        ModelFormatError: no such source, or not a Hugging Face folder (no config.json).
    """
    if cfg.calib == "none" or (not isinstance(cfg.calib, str) and cfg.calib and "none" in cfg.calib):
        raise InputError(f"streamed conversion runs block by block on calibration text; a data-free fit "
                         f"({option('calib', 'none')}) needs no block loop: convert it without "
                         f"{command('--streamed', 'streaming (convert_file)')}")
    source = Path(source)
    if not source.exists():
        raise ModelFormatError(f"no such file or folder: {source}")
    if not (source / "config.json").is_file():
        raise ModelFormatError(f"{source} is not a Hugging Face model folder (no config.json): a streamed conversion "
                               f"reads a folder's safetensors shards; convert a single file without "
                               f"{command('--streamed', 'streaming (convert_file)')}")
    return source


def _write_config_and_tokenizer(folder: Path, model: nn.Module, target, cfg: ConvertConfig, report: ConvertReport,
                                source: Path, stored: torch.dtype) -> None:
    """config.json with the hadaconv metadata :func:`hadaconv.load` reads, in the checkpoint's
    dtype, and the source's tokenizer files."""
    from hadaconv.io import TOKENIZER_FILES, hadaconv_meta
    from hadaconv.io.converted import config_for_saving

    first = target.layers[0]
    width = max(first.width, first.out_features)  # the transform's order n, as convert_file records it
    meta = hadaconv_meta(adapter=target.adapter.name, layers=report.converted, block=cfg.block, fit=cfg.mode,
                         width=width, m=factorize(width).m, source=str(Path(source).absolute()), streamed=True,
                         rank=cfg.rank)
    saved = config_for_saving(model, meta)
    saved["dtype"] = str(stored).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            (folder / name).write_bytes((source / name).read_bytes())
