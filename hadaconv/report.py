"""What a conversion did, per layer and in total (saved as ``report.json``, printed as a table)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["ConvertReport", "LayerReport"]


@dataclass
class LayerReport:
    """One attention block.  Errors are relative, ``||y_new - y|| / ||y||`` of the output
    projection (with its low-rank residual, if any) on calibration / held-out windows; ``block_error_*`` is the relative error of the
    whole decoder block's output against the teacher's on held-out windows, before and after the
    dense-neighbour compensation (None where it did not run)."""

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
    rank: int = 0  # of the low-rank residual next to each converted layer (0: none)

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

        compensated = any(r.block_error_after is not None for r in self.layers)
        rank = f", rank={self.rank}" if self.rank else ""
        t = Table(title=f"hadaconv convert: mode={self.mode}, block={self.block}{rank}, adapter={self.adapter}")
        cols = ["layer", "module", "hadamard", "converted", "err calib", "err held-out", "err mean-pred",
                "sensitivity", "params removed", "fit s"]
        if compensated:
            cols[8:8] = ["block err", "compensated"]
        for col in cols:
            t.add_column(col, justify="left" if col in ("module", "hadamard") else "right")
        for r in self.layers:
            row = [str(r.index), r.name, r.factor.split(" = ")[-1], "yes" if r.converted else "no",
                   num(r.calib_error), num(r.heldout_error), num(r.mean_error), num(r.sensitivity, "{:.4f}"),
                   f"{r.params_removed:,}", f"{r.fit_seconds:.1f}"]
            if compensated:
                row[8:8] = [num(r.block_error_before, "{:.4f}"), num(r.block_error_after, "{:.4f}")]
            t.add_row(*row)
        removed = self.params_before - self.params_after
        t.caption = (
            f"converted {len(self.converted)}/{len(self.layers)} layers; parameters {self.params_before:,} -> "
            f"{self.params_after:,} (-{removed:,}, -{100 * removed / max(1, self.params_before):.2f}%); "
            f"weights {self.bytes_before / 2**20:.1f} -> {self.bytes_after / 2**20:.1f} MiB; "
            f"{self.seconds:.0f} s; peak RSS {self.peak_rss_mb:.0f} MiB"
            + (f"; calibration: {self.calibration_source}" if self.calibration_source else "")
            + (f"; sensitivity = {self.sensitivity_metric}" if self.sensitivity_metric else "")
            + ("; block err = relative error of the block output vs the teacher (held-out), before -> after "
               "refitting the dense maps that write into the residual stream" if compensated else ""))
        return t
