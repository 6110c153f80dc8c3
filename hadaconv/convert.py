"""Conversion: calibrate, fit, fold, swap, and report.

``convert(model, tokenizer, ConvertConfig(...))`` changes the model in place: each selected
attention output projection becomes a :class:`~hadaconv.nn.HadamardProjection` fitted by least
squares (see :mod:`hadaconv.fit`), with the zero-cost value-side correction folded into the value
projection.  It returns a :class:`ConvertReport`.  ``patch(model)`` is the from-scratch path:
fresh projections (gamma = 1, beta = 0: a plain orthonormal Hadamard rotation) and no fit.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hadaconv.adapters import Adapter, AttentionLayer, find_adapter
from hadaconv.calibrate import MomentCollector, load_texts, token_windows
from hadaconv.errors import HadaconvError
from hadaconv.fit import GAMMA_RIDGE, MODES, FitResult, HeadLayout, Moments, fit_projection, relative_error
from hadaconv.hadamard import factorize
from hadaconv.nn import HadamardProjection
from hadaconv.progress import progress

__all__ = ["ConvertConfig", "ConvertReport", "LayerReport", "convert", "install_projection", "patch"]

#: Default output block size.  Measured on SmolLM2-135M (README, "Choosing the block size"): the
#: held-out error falls steadily with b while the cost grows linearly (b = 16 is 2.8% of W_o's
#: parameters); 16 is where the perplexity gain per parameter flattens.
DEFAULT_BLOCK = 16


@dataclass
class ConvertConfig:
    """Options of :func:`convert` (the CLI flags of ``hadaconv convert`` map one to one).

    Attributes:
        mode: "affine", "diag" or "head" (default; see :mod:`hadaconv.fit`).
        block: output block size b of gamma (1 = the seed paper's diagonal affine).
        layers: layer indices that may be converted (None = all).
        max_layers: convert only the K least sensitive layers.
        max_loss: convert the least sensitive layers while their summed sensitivity stays <= E.
        calib: calibration sources (files, folders, JSONL), None for the default corpus, or
            "none" for a data-free fit from the weights alone.
        samples, seq_len, batch_size: calibration windows (10% held out for the report).
        sensitivity: measure each layer's sensitivity (needed by max_layers / max_loss).
        sensitivity_windows: calibration windows used to measure sensitivity.
        sequential: collect each layer's statistics with the earlier layers already converted.
        ridge, gamma_ridge, max_iter: damping of the input covariance, penalty on the gamma
            blocks (see :data:`hadaconv.fit.GAMMA_RIDGE`), L-BFGS budget.
    """

    mode: Literal["affine", "diag", "head"] = "head"
    block: int = DEFAULT_BLOCK
    layers: list[int] | None = None
    max_layers: int | None = None
    max_loss: float | None = None
    calib: list[str] | str | None = None
    samples: int = 128
    seq_len: int = 256
    batch_size: int = 8
    sensitivity: bool = True
    sensitivity_windows: int = 4
    sequential: bool = False
    ridge: float = 1e-3
    gamma_ridge: float = GAMMA_RIDGE
    max_iter: int = 40
    progress: bool = True


@dataclass
class LayerReport:
    index: int
    name: str
    width: int
    factor: str
    converted: bool
    calib_error: float | None
    heldout_error: float | None
    mean_error: float | None  # error of predicting the mean output: the floor to beat
    sensitivity: float | None
    params_removed: int
    fit_seconds: float


@dataclass
class ConvertReport:
    """What a conversion did, per layer and in total.  ``to_dict()`` is saved as report.json."""

    mode: str
    block: int
    adapter: str
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    sensitivity_metric: str = ""
    calibration_tokens: int = 0
    heldout_tokens: int = 0

    @property
    def converted(self) -> list[int]:
        return [r.index for r in self.layers if r.converted]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["converted"] = self.converted
        return d

    def table(self):
        """The report as a rich Table (per layer, then totals in the caption)."""
        from rich.table import Table

        def num(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)

        t = Table(title=f"hadaconv convert: mode={self.mode}, block={self.block}, adapter={self.adapter}")
        for col in ("layer", "module", "hadamard", "converted", "err calib", "err held-out",
                    "err mean-pred", "sensitivity", "params removed", "fit s"):
            t.add_column(col, justify="left" if col in ("module", "hadamard") else "right")
        for r in self.layers:
            t.add_row(str(r.index), r.name, r.factor.split(" = ")[-1], "yes" if r.converted else "no",
                      num(r.calib_error), num(r.heldout_error), num(r.mean_error),
                      num(r.sensitivity, "{:.4f}"), f"{r.params_removed:,}", f"{r.fit_seconds:.1f}")
        removed = self.params_before - self.params_after
        t.caption = (
            f"converted {len(self.converted)}/{len(self.layers)} layers; parameters {self.params_before:,} -> "
            f"{self.params_after:,} (-{removed:,}, -{100 * removed / max(1, self.params_before):.2f}%); "
            f"weights {self.bytes_before / 2**20:.1f} -> {self.bytes_after / 2**20:.1f} MiB; "
            f"{self.seconds:.0f} s; peak RSS {self.peak_rss_mb:.0f} MiB"
            + (f"; sensitivity = {self.sensitivity_metric}" if self.sensitivity_metric else ""))
        return t


# --------------------------------------------------------------------------- swapping


def install_projection(layer: AttentionLayer, block: int = 1, bias: bool = True) -> HadamardProjection:
    """Replace ``layer``'s output projection with a fresh HadamardProjection (gamma = 1, beta = 0)
    on the old one's device and dtype; returns it."""
    ref = layer.out.weight
    proj = HadamardProjection(layer.width, bias=bias, block=block, device=ref.device, dtype=ref.dtype)
    layer.replace_out(proj)
    return proj


def patch(model: nn.Module, *, block: int = 1, bias: bool = True, layers: list[int] | None = None) -> nn.Module:
    """The seed paper's from-scratch setting: every detected attention output projection (or
    those of ``layers``) becomes a fresh HadamardProjection.  Modifies and returns ``model``."""
    adapter = find_adapter(model)
    adapter.prepare(model)
    for layer in adapter.layers(model):
        if layers is None or layer.index in layers:
            install_projection(layer, block=block, bias=bias)
    return model


def _fold_value(layer: AttentionLayer, fit: FitResult) -> None:
    if fit.value_map is None:
        return
    w, b = layer.value.get()
    kv, hd = layer.num_kv_heads, layer.head_dim
    vm = fit.value_map.to(torch.float64)
    wv = w.to(torch.float64).reshape(kv, hd, -1)
    bv = b.to(torch.float64).reshape(kv, hd) if b is not None else None
    if vm.dim() == 1:
        wv = vm.reshape(kv, hd, 1) * wv
        bv = vm.reshape(kv, hd) * bv if bv is not None else None
    else:
        wv = vm @ wv
        bv = (vm @ bv.unsqueeze(-1)).squeeze(-1) if bv is not None else None
    layer.value.set(wv.reshape(w.shape), bv.reshape(-1) if bv is not None else None)


def apply_fit(layer: AttentionLayer, fit: FitResult) -> Callable[[], None]:
    """Fold the value correction and install the fitted projection; returns an undo function."""
    old_module = layer.out_module
    old_value = layer.value.get() if layer.value is not None else None
    _fold_value(layer, fit)
    proj = install_projection(layer, block=fit.block)
    with torch.no_grad():
        proj.gamma.copy_(fit.gamma.to(proj.gamma.dtype))
        proj.beta.copy_(fit.beta.to(proj.beta.dtype))

    def undo() -> None:
        layer.replace_out(old_module)
        if old_value is not None:
            layer.value.set(*old_value)

    return undo


# --------------------------------------------------------------------------- model outputs


def _output(model: nn.Module, batch: dict, kind: str) -> torch.Tensor:
    out = model(**batch)
    if kind == "causal-lm":
        return out.logits
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _reference(output: torch.Tensor, kind: str) -> torch.Tensor:
    """What _divergence compares against: log-probabilities for LMs, computed once."""
    return F.log_softmax(output.float(), -1) if kind == "causal-lm" else output


def _divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> float:
    """KL(teacher || student) per token for LMs (``teacher`` from _reference); relative squared
    error otherwise."""
    if kind == "causal-lm":
        return (teacher.exp() * (teacher - F.log_softmax(student.float(), -1))).sum(-1).mean().item()
    return ((student - teacher).square().sum() / teacher.square().sum().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- convert


def _check_layer(layer: AttentionLayer, block: int) -> None:
    w, _ = layer.out.get()
    if w.shape[0] != w.shape[1]:
        raise HadaconvError(
            f"{layer.out_name} is {w.shape[0]} x {w.shape[1]}: only square output projections can "
            "become Hadamard projections"
        )
    factorize(w.shape[0])
    if w.shape[0] % block:
        raise HadaconvError(f"--block {block} does not divide the width {w.shape[0]} of {layer.out_name}")
    if not torch.isfinite(w).all():
        raise HadaconvError(f"{layer.out_name} holds NaN or infinite weights")


def _batches(windows: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": windows[i:i + batch_size]} for i in range(0, len(windows), batch_size)]


def convert(
    model: nn.Module,
    tokenizer=None,
    config: ConvertConfig | None = None,
    *,
    adapter: Adapter | None = None,
    inputs: list[dict] | None = None,
) -> ConvertReport:
    """Convert ``model`` in place and return the report.

    Args:
        model: a model an adapter recognises (or pass ``adapter``, e.g. a generic one).
        tokenizer: the model's tokenizer, used to tokenize calibration text.
        config: options; defaults to ``ConvertConfig()``.
        adapter: overrides the automatic choice (``hadaconv.adapters.find_adapter``).
        inputs: calibration batches (dicts of model kwargs) instead of text, for models without
            a tokenizer; the last tenth is held out.
    """
    cfg = config or ConvertConfig()
    if cfg.mode not in MODES:
        raise HadaconvError(f"unknown fit mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    start = time.perf_counter()
    adapter = adapter or find_adapter(model)
    adapter.prepare(model)
    kind = adapter.kind(model)
    all_layers = adapter.layers(model)
    if not all_layers:
        raise HadaconvError("no attention output projections found to convert")
    wanted = set(range(len(all_layers))) if cfg.layers is None else set(cfg.layers)
    missing = wanted - {layer.index for layer in all_layers}
    if missing:
        raise HadaconvError(f"--layers names {sorted(missing)}, but the model has layers 0-{len(all_layers) - 1}")
    layers = [layer for layer in all_layers if layer.index in wanted]
    for layer in layers:
        _check_layer(layer, cfg.block)

    report = ConvertReport(mode=cfg.mode, block=cfg.block, adapter=adapter.name)
    report.params_before = sum(p.numel() for p in model.parameters())
    report.bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())
    data_free = cfg.calib == "none"
    model.eval()

    # Calibration batches.
    calib_batches: list[dict] = []
    heldout_batches: list[dict] = []
    if not data_free:
        if inputs is not None:
            cut = max(1, len(inputs) - max(1, len(inputs) // 10))
            calib_batches, heldout_batches = inputs[:cut], inputs[cut:]
        else:
            if tokenizer is None:
                raise HadaconvError("calibration needs a tokenizer (or --calib none for a data-free fit)")
            sources = [cfg.calib] if isinstance(cfg.calib, str) else cfg.calib
            calib, heldout = token_windows(
                tokenizer, load_texts(sources), samples=cfg.samples, seq_len=cfg.seq_len)
            report.calibration_tokens, report.heldout_tokens = calib.numel(), heldout.numel()
            calib_batches = _batches(calib, cfg.batch_size)
            heldout_batches = _batches(heldout, cfg.batch_size)

    layouts = {
        layer.index: HeadLayout(layer.num_heads, layer.num_kv_heads, layer.head_dim) for layer in layers}
    modes = {layer.index: cfg.mode if layer.value is not None else "affine" for layer in layers}

    def fit_layer(layer: AttentionLayer, moments: Moments) -> tuple[FitResult, float]:
        w, b = layer.out.get()
        t = time.perf_counter()
        fit = fit_projection(w, b, moments, mode=modes[layer.index], block=cfg.block,
                             layout=layouts[layer.index], ridge=cfg.ridge, gamma_ridge=cfg.gamma_ridge,
                             max_iter=cfg.max_iter)
        return fit, time.perf_counter() - t

    fits: dict[int, FitResult] = {}
    rows: dict[int, LayerReport] = {}
    collector = MomentCollector({layer.index: layer.out_module for layer in layers})

    def record(layer: AttentionLayer, fit: FitResult, seconds: float) -> None:
        w, b = layer.out.get()
        held = collector.moments(layer.index, "heldout")
        lay = layouts[layer.index]
        rows[layer.index] = LayerReport(
            index=layer.index, name=layer.out_name, width=layer.width, factor=str(factorize(layer.width)),
            converted=False,
            calib_error=None if data_free else fit.error,
            heldout_error=relative_error(w, b, fit, held, lay) if held else None,
            mean_error=relative_error(w, b, None, held, lay) if held else None,
            sensitivity=None,
            params_removed=0, fit_seconds=seconds)

    if cfg.sequential and not data_free:
        # Each layer sees the outputs of the already converted layers before it.
        with progress(len(layers), "calibrate + fit (sequential)", cfg.progress) as step:
            for layer in layers:
                single = MomentCollector({layer.index: layer.out_module})
                _collect(model, single, calib_batches, heldout_batches)
                collector.merge(single)
                fit, seconds = fit_layer(layer, single.moments(layer.index))
                fits[layer.index] = fit
                record(layer, fit, seconds)
                apply_fit(layer, fit)
                step()
    else:
        if not data_free:
            with progress(len(calib_batches) + len(heldout_batches), "calibrate", cfg.progress) as step:
                _collect(model, collector, calib_batches, heldout_batches, step)
        with progress(len(layers), f"fit ({cfg.mode}, block {cfg.block})", cfg.progress) as step:
            for layer in layers:
                d = layer.width
                moments = Moments.identity(d) if data_free else collector.moments(layer.index)
                fit, seconds = fit_layer(layer, moments)
                fits[layer.index] = fit
                record(layer, fit, seconds)
                step()

    # Sensitivity: swap one layer at a time and measure how far the model's output moves.
    need_rank = cfg.max_layers is not None or cfg.max_loss is not None
    if cfg.sequential and not data_free:
        chosen = [layer.index for layer in layers]  # already applied in order
        if need_rank:
            raise HadaconvError("--sequential converts every selected layer; combine it with --layers only")
    else:
        if (cfg.sensitivity or need_rank) and (calib_batches or inputs):
            probe = (heldout_batches or calib_batches)[: max(1, cfg.sensitivity_windows // max(1, cfg.batch_size))]
            if inputs is None and probe:
                ids = torch.cat([b["input_ids"] for b in (heldout_batches + calib_batches)])[: cfg.sensitivity_windows]
                probe = [{"input_ids": ids}]
            report.sensitivity_metric = "KL(original || converted) per token, nats" if kind == "causal-lm" \
                else "relative squared error of the output"
            for layer, value in zip(layers, _sensitivities(model, layers, fits, probe, kind, cfg.progress)):
                rows[layer.index].sensitivity = value
        elif need_rank:
            raise HadaconvError("--max-layers / --max-loss rank layers by measured sensitivity and need calibration data")
        chosen = _select(layers, rows, cfg)
        for layer in layers:
            if layer.index in chosen:
                apply_fit(layer, fits[layer.index])

    for layer in layers:
        row = rows[layer.index]
        row.converted = layer.index in chosen
        if row.converted:
            gamma = fits[layer.index].gamma
            bias = layer.out.bias
            row.params_removed = layer.width * layer.width + (0 if bias is None else layer.width) \
                - gamma.numel() - layer.width
    report.layers = [rows[layer.index] for layer in layers]
    report.params_after = sum(p.numel() for p in model.parameters())
    report.bytes_after = sum(p.numel() * p.element_size() for p in model.parameters())
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def _sensitivities(model, layers, fits, probe, kind, show) -> list[float]:
    """How far the model's output moves when each layer alone is converted (one value per layer).

    Converting layer i cannot change what the blocks before it compute, so their outputs from
    the reference pass are replayed instead of recomputed: on a deep model this halves the cost.
    """
    if kind == "causal-lm":
        probe = [{**b, "use_cache": False} for b in probe]  # replayed blocks write no KV cache
    blocks = _blocks(model, layers)
    replay = [dict() for _ in probe]  # per probe batch: block position -> its output

    def recorder(store, pos):
        return lambda module, args, output: store.__setitem__(pos, output)

    with torch.inference_mode():
        reference = []
        for batch, store in zip(probe, replay):
            hooks = [blk.register_forward_hook(recorder(store, pos)) for pos, blk in enumerate(blocks or [])]
            try:
                reference.append(_reference(_output(model, batch, kind), kind))
            finally:
                for h in hooks:
                    h.remove()
    values = []
    with progress(len(layers), "sensitivity", show) as step:
        for layer in layers:
            undo = apply_fit(layer, fits[layer.index])
            try:
                div = []
                for batch, ref, store in zip(probe, reference, replay):
                    skip = blocks[:_position(blocks, layer)] if blocks else []
                    # An instance may already carry its own forward (accelerate's hooks do).
                    own = [vars(blk).get("forward") for blk in skip]
                    try:
                        for pos, blk in enumerate(skip):
                            blk.forward = (lambda out: lambda *a, **k: out)(store[pos])
                        with torch.inference_mode():
                            div.append(_divergence(_output(model, batch, kind), ref, kind))
                    finally:
                        for blk, fwd in zip(skip, own):
                            if fwd is None:
                                vars(blk).pop("forward", None)  # back to the class's forward
                            else:
                                blk.forward = fwd
                values.append(sum(div) / len(div))
            finally:
                undo()
            step()
    return values


def _blocks(model: nn.Module, layers: list[AttentionLayer]) -> list[nn.Module] | None:
    """The ModuleList of blocks that holds every layer's attention, or None when there is none
    (then sensitivities run the whole model)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(
                any(layer.out_name.startswith(f"{name}.{i}.".lstrip(".")) for i in range(len(mod)))
                for layer in layers):
            return list(mod)
    return None


def _position(blocks: list[nn.Module], layer: AttentionLayer) -> int:
    for pos, blk in enumerate(blocks):
        if any(m is layer.out_module for m in blk.modules()):
            return pos
    return 0


def _collect(model, collector, calib_batches, heldout_batches, step=None) -> None:
    with collector.hooked(), torch.inference_mode():
        for split, batches in (("calib", calib_batches), ("heldout", heldout_batches)):
            collector.split = split
            for batch in batches:
                model(**batch)
                if step:
                    step()


def _select(layers: list[AttentionLayer], rows: dict[int, LayerReport], cfg: ConvertConfig) -> list[int]:
    """The layers to convert: all, or the least sensitive within --max-layers / --max-loss."""
    order = [layer.index for layer in layers]
    if cfg.max_layers is None and cfg.max_loss is None:
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


def convert_file(
    source: str,
    out_dir: str,
    config: ConvertConfig | None = None,
    *,
    model_config: str | None = None,
    trust_pickle: bool = False,
    target: str | None = None,
    overwrite: bool = False,
) -> ConvertReport:
    """Load ``source`` (any input :func:`hadaconv.io.load_model` accepts), convert it and save a
    folder that :func:`hadaconv.load` rebuilds.  The input is never modified; a failure leaves
    no output folder behind."""
    from hadaconv.adapters import find_adapter as _find
    from hadaconv.io import hadaconv_meta, load_model, save_converted

    cfg = config or ConvertConfig()
    loaded = load_model(source, config=model_config, trust_pickle=trust_pickle)
    adapter = _find(loaded.model, target=target) if target else None
    report = convert(loaded.model, loaded.tokenizer, cfg, adapter=adapter)
    width = report.layers[0].width
    meta = hadaconv_meta(adapter=report.adapter, layers=report.converted, block=cfg.block, fit=cfg.mode,
                         width=width, m=factorize(width).m, target=target, source=str(source))
    save_converted(loaded.model, out_dir, meta=meta, tokenizer=loaded.tokenizer,
                   tokenizer_source=loaded.tokenizer_source,
                   report=report.to_dict(), overwrite=overwrite)
    return report
