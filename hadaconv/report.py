"""What a conversion did, per layer and in total (saved as ``report.json``, printed as a table)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

from hadaconv.errors import option

__all__ = ["COLUMNS", "ConvertReport", "FittedTable", "LayerReport", "calibration_warning", "max_layers_warning"]


def max_layers_warning(max_layers: int | None, candidates: int, tense: str = "is") -> str | None:
    """The warning for a ``--max-layers`` that chooses nothing (not fewer than the ``candidates``),
    said before a conversion (``tense`` "is") and in its report ("was"); None where it chooses."""
    if max_layers is None or max_layers < candidates:
        return None
    return (f"{option('max_layers')} {max_layers} is not fewer than the {candidates} candidate "
            f"layer{'s' * (candidates != 1)}, so every one {tense} converted; give {option('layers')} more "
            f"candidates or a smaller {option('max_layers')}")


def calibration_warning(samples: int, windows: int, heldout: bool, sampled: bool = False) -> str | None:
    """The warning for calibration text that made a tenth or more fewer ``windows`` than the
    ``samples`` asked (not said of ``sampled`` text, or text beside it: text the model wrote,
    decoded and tokenized again, makes 3-10% fewer, SmolLM2's 31 of 32, Qwen2.5's 116 of 128), and
    for text too short to hold any window out; None where neither is so, or it was not text."""
    if not windows:
        return None
    short = not sampled and 10 * windows < 9 * samples
    said = []
    if short:
        said.append(f"the calibration text made {windows} of the {samples} windows asked ({option('samples')}): "
                    f"give more text, or ask for fewer windows or a smaller {option('seq_len')}")
    if not heldout:
        said.append("no calibration window is held out (fewer than 10), so the held-out errors are blank and the "
                    "sensitivity is measured on calibration windows")
    return "; ".join(said) or None


def ranking_warning(windows: int, fitted: int, samples: int, made: int, enough: int = 4) -> str | None:
    """The warning for a ranking measured on ``windows`` windows, ``fitted`` of which the fits
    were made on, where fewer than ``enough`` (convert's REPORT_WINDOWS) were held out: a noisy
    choice.  ``samples``: the windows asked for, ``made``: those the text made (the way out is
    more text where it made fewer, else a larger ``--samples``: a tenth is held out)."""
    held = windows - fitted
    if not held or held >= enough:  # none held out: calibration_warning says so
        return None
    more = ("more calibration text" if made < samples else f"{option('samples', 10 * enough)} or more") + \
        f" holds out {enough}"
    also = f", and on {fitted} the fits were made on" if fitted else ""
    return (f"the layers were ranked on {held} held-out window{'s' if held != 1 else ''}{also}: a noisy choice; "
            f"{more}")


@dataclass
class LayerReport:
    """One attention block.  Errors are relative, ``||y_new - y|| / ||y||`` of the output
    projection (with its low-rank residual, if any) on calibration / held-out windows;
    ``block_error_*`` is the whole decoder block's output error on held-out windows, before and
    after the dense-neighbour compensation (None where it did not run): ``||s' - t'|| / ||t' - t||``
    with ``t, t'`` the teacher's block input and output and ``s'`` the student's output (on its own
    inputs), i.e. relative to what the teacher's block adds to the residual stream.  It exceeds 1
    where the drift carried from earlier blocks is larger than one block's change, and
    ``block_error_after`` equals ``block_error_before`` where no ridge beat the original map (kept,
    ``compensation_ridge`` None)."""

    index: int
    name: str
    width: int
    factor: str
    converted: bool
    calib_error: float | None
    heldout_error: float | None
    mean_error: float | None  # error of predicting the mean output: the floor to beat
    sensitivity: float | None
    params_removed: int  # net of what the replacement keeps (gamma, beta, the residual's U and D)
    fit_seconds: float
    block_error_before: float | None = None
    block_error_after: float | None = None
    compensation_ridge: float | None = None


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
    calibration_source: str = ""
    sequential: bool = False
    compensate: bool = False
    compensate_skipped: str = ""  # why compensation, asked for, did not run ("": it ran, or was not asked)
    rotated: bool = False  # the residual stream was rotated before the fits (hadaconv.rotation)
    rotation_error: tuple[float, float] | None = None  # the chosen layers' mean fit error without / with it
    rotation_params: int = 0  # parameters the rotation added (the final norm's map where the head is tied)
    rotate_skipped: str = ""  # why the rotation, asked for, did not run ("": it ran, or was not asked)
    rotate_iterations: int = 0  # rounds of the rotation's fit (0: none fitted)
    rank: int = 0  # of the low-rank residual next to each converted layer (0: none)
    max_layers: int | None = None  # the --max-layers asked for (None: not given)
    samples: int = 0  # calibration windows asked for (--samples)
    sampled: bool = False  # the model's own sampled text among the calibration sources
    windows: int = 0  # calibration windows the text made, held-out ones included (0: not text)
    ranked_on: int = 0  # windows the ranking's sensitivities were measured on (0: not ranked)
    ranked_fitted: int = 0  # of them, windows the fits were made on (where too few were held out)
    #: Where a --target replaced the adapter that knows the model: what that changed
    #: (:func:`hadaconv.adapters.target_overrides`); "" otherwise.
    target_overrides: str = ""

    @property
    def converted(self) -> list[int]:
        return [r.index for r in self.layers if r.converted]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["converted"] = self.converted
        return d

    def report_json(self) -> dict:
        """What ``report.json`` holds for this report (:func:`hadaconv.save`)."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, d: Any) -> "ConvertReport":
        """The report that ``to_dict()`` gave ``d`` (a converted folder's report.json: keys it does
        not know, such as distill's section, are ignored; fields an older version did not write
        take their defaults).  Checked by building its table and caption, since the file may
        have been edited.

        Raises:
            ValueError: ``d`` is not such a dict (a missing or mistyped field)."""
        try:
            rows = [LayerReport(**_known(LayerReport, row)) for row in d["layers"]]
            report = cls(**{**_known(cls, d), "layers": rows})
            if report.rotation_error is not None:
                report.rotation_error = tuple(report.rotation_error)
            report.caption(), FittedTable(report).build()
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"not a conversion report ({type(e).__name__}: {e})") from None
        return report

    def warnings(self) -> list[str]:
        """One line per converted layer whose held-out error is no better than predicting the
        mean output (``mean-pred``, the floor any fit should beat): a fit that learned the
        calibration windows, not the layer, usually from too little text; one when the calibration
        text made a tenth or more fewer windows than asked, or none to hold out
        (:func:`calibration_warning`); one when the ranking had to measure on windows the fits were
        made on (:func:`ranking_warning`); one when a ``--target`` replaced the model's own adapter;
        and one when
        ``--max-layers`` asked for at least as many layers as there were candidates and every
        candidate was converted (it chose nothing)."""
        n = len(self.layers)
        few = max_layers_warning(self.max_layers, n, "was") if len(self.converted) >= n else None
        return self.calibration_warnings() + [w for w in (self.target_overrides, few) if w] + [
            f"layer {r.index}: its held-out error {r.heldout_error:.3f} is no better than predicting the mean "
            f"output ({r.mean_error:.3f}): more calibration text ({option('samples')}) should help; to keep the "
            f"layer dense, list the candidates without it in {option('layers')}"
            for r in self.layers
            if r.converted and r.heldout_error is not None and r.mean_error is not None
            and not r.heldout_error < r.mean_error]  # NaN is no better

    def calibration_warnings(self) -> list[str]:
        """What the calibration fields say (a conversion says them as soon as they are known):
        a short text (:func:`calibration_warning`), a ranking on few held-out windows
        (:func:`ranking_warning`)."""
        short = calibration_warning(self.samples, self.windows, self.heldout_tokens > 0, self.sampled)
        # Sampled text makes a few windows fewer than asked (calibration_warning): not a short text.
        made = self.samples if self.sampled else self.windows
        fitted = ranking_warning(self.ranked_on, self.ranked_fitted, self.samples, made)
        return [w for w in (short, fitted) if w]

    def table(self) -> "FittedTable":
        """The report as a rich renderable (per layer, then totals in the caption) that fits the
        console it is printed on: where the console is narrower than every column (80 columns
        hold about 8), the columns of least use are left out, in the order of :data:`COLUMNS`'
        priorities, and the caption names them; numbers are never cut short.  ``to_dict()`` has
        everything."""
        return FittedTable(self)

    def caption(self, columns: Sequence[str] | None = None) -> str:
        """The lines under the table: totals (parameters, weights, time, memory), the calibration,
        the rotation, then what each of ``columns`` (the table's headers; None: every one) means."""
        removed = self.params_before - self.params_after
        lines = [f"converted {len(self.converted)} of {len(self.layers)} candidate layers; "
                 f"parameters {self.params_before:,} -> {self.params_after:,} "
                 f"({-removed:+,}, {-100 * removed / max(1, self.params_before):+.2f}%); "
                 f"weights {self.bytes_before / 2**20:.1f} -> {self.bytes_after / 2**20:.1f} MiB; "
                 f"{self.seconds:.0f} s; peak RSS {self.peak_rss_mb:.0f} MiB"]
        if self.calibration_source:
            lines.append(f"calibration: {self.calibration_source}")
        if self.rotated and self.rotation_error:
            lines.append(f"residual stream rotated: the converted layers' mean fit error {self.rotation_error[0]:.3f} "
                         f"-> {self.rotation_error[1]:.3f} after {self.rotate_iterations} rounds (the rotation's own "
                         "fits, on the original's statistics)" + (f"; {self.rotation_params:+,} parameters for the "
                                                                  "final norm's map" if self.rotation_params else ""))
        shown = [m for names, m in self._meanings().items()
                 if m and (columns is None or any(name in columns for name in names))]
        return "\n".join(lines + ["columns: " + "; ".join(shown)])

    def _meanings(self) -> dict[tuple[str, ...], str]:
        """Each column's definition, keyed by the columns it defines (a pair once, shown where
        either of the two is); "" where the table has no such column."""
        compensated = any(r.block_error_after is not None for r in self.layers)
        # Too few windows to hold any out: the block errors are scored on the calibration windows.
        scored_on = "held-out" if any(r.heldout_error is not None for r in self.layers) else "calibration"
        return {
            ("conv",): "conv = converted",
            ("err calib", "err held"): "err calib / err held = ||y_new - y|| / ||y||, the output projection's "
                                       "error on the calibration / held-out windows",
            ("mean-pred",): "mean-pred = the same for predicting the mean output (the floor to beat)",
            ("sens",): f"sens = {self.sensitivity_metric}" if self.sensitivity_metric else "",
            ("blk err", "comp"): f"blk err / comp = ||s' - t'|| / ||t' - t|| on {scored_on} windows: the block "
                                 "output's distance from the teacher's, relative to the teacher block's own change "
                                 "(over 1: drift from earlier blocks dominates), before / after refitting the dense "
                                 "maps that write into the residual stream" if compensated else "",
            ("removed",): "removed = parameters removed (negative: added, as the rotation's final-norm map is)",
            ("fit s",): "fit s = seconds of the layer's fit"}


def _known(cls, d: dict) -> dict:
    """The entries of ``d`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _num(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


#: The per-layer columns: (header, priority, cell).  Where the console is too narrow for all, the
#: lowest priorities go first; 100 stays at any width (which layer, its error, what it saved).
COLUMNS = [
    ("layer", 100, lambda r: str(r.index)),
    ("module", 5, lambda r: r.name),
    ("hadamard", 8, lambda r: r.factor.split(" = ")[-1]),
    ("conv", 60, lambda r: "yes" if r.converted else "no"),
    ("err calib", 30, lambda r: _num(r.calib_error)),
    ("err held", 100, lambda r: _num(r.heldout_error)),
    ("mean-pred", 20, lambda r: _num(r.mean_error)),
    ("sens", 50, lambda r: _num(r.sensitivity, "{:.4f}")),
    ("blk err", 45, lambda r: _num(r.block_error_before, "{:.4f}")),
    ("comp", 55, lambda r: _num(r.block_error_after, "{:.4f}")),
    ("removed", 100, lambda r: f"{r.params_removed:,}"),
    ("fit s", 10, lambda r: f"{r.fit_seconds:.1f}"),
]


class FittedTable:
    """A :class:`ConvertReport` as a rich Table built for the width it is rendered at."""

    def __init__(self, report: ConvertReport):
        self.report = report

    def __rich_console__(self, console, options):
        yield self.build(options.max_width)

    def build(self, width: int | None = None):
        """The rich Table with the columns that fit in ``width`` characters (None: all)."""
        from rich.table import Table

        r = self.report
        compensated = any(row.block_error_after is not None for row in r.layers)
        cols = [c for c in COLUMNS if compensated or c[0] not in ("blk err", "comp")]
        cells = {name: [cell(row) for row in r.layers] for name, _, cell in cols}
        if r.rotation_params:  # a row of its own, so that the column sums to the caption's total
            for name in cells:
                cells[name].append({"layer": "norm", "module": "final norm's map (the rotation)",
                                    "removed": f"{-r.rotation_params:,}"}.get(name, ""))
        # A bordered table takes each column's widest text, 2 of padding and 1 of border, plus 1.
        need = {name: max([len(name)] + [len(c) for c in cells[name]]) + 3 for name, _, _ in cols}
        prio = {name: p for name, p, _ in cols}
        dropped: list[str] = []
        for name in sorted(prio, key=prio.get):
            if width is None or prio[name] >= 100 or 1 + sum(need[c] for c in prio if c not in dropped) <= width:
                break
            dropped.append(name)
        cols = [c for c in cols if c[0] not in dropped]
        rank = f", rank={r.rank}" if r.rank else ""
        t = Table(title=f"hadaconv convert: mode={r.mode}, block={r.block}{rank}, adapter={r.adapter}")
        for name, _, _ in cols:
            t.add_column(name, justify="left" if name in ("module", "hadamard") else "right", overflow="fold")
        for i in range(len(cells["layer"])):
            t.add_row(*[cells[name][i] for name, _, _ in cols])
        left_out = f"\nleft out at this width: {', '.join(dropped)} (all in report.json)" if dropped else ""
        t.caption = r.caption([name for name, _, _ in cols]) + left_out
        t.caption_justify = "left"
        return t
