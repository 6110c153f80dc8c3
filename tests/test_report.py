"""The convert report stays readable at 80 columns: every layer's index, held-out error and
parameters removed appear whole (rich would otherwise squeeze 12 columns to 'lay…', '0.…')."""

import pytest
from rich.console import Console

from hadaconv.report import ConvertReport, LayerReport


def _report(layers: int, compensated: bool) -> ConvertReport:
    rows = [LayerReport(index=i, name=f"model.layers.{i}.self_attn.o_proj", width=576, factor="576 = 9 * 64",
                        converted=True, calib_error=0.1234 + i / 1000, heldout_error=0.2345 + i / 1000,
                        mean_error=0.9876, sensitivity=0.01234, params_removed=322_560 + i, fit_seconds=12.3,
                        block_error_before=0.0567 if compensated else None,
                        block_error_after=0.0321 if compensated else None)
            for i in range(layers)]
    return ConvertReport(mode="head", block=64, adapter="llama", layers=rows, params_before=134_515_008,
                         params_after=124_838_208, rank=0)


def _render(report: ConvertReport, width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(report.table())
    return console.export_text()


@pytest.mark.parametrize("compensated", [False, True])
def test_key_numbers_whole_at_80_columns(compensated):
    text = _render(_report(30, compensated), 80)
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    for i in range(30):
        row = next(line for line in text.splitlines() if line.startswith(f"│ {i:>5} │"))
        assert f"{0.2345 + i / 1000:.3f}" in row and f"{322_560 + i:,}" in row, row
    assert "left out at this width: module" in " ".join(text.split())


def test_every_column_on_a_wide_console():
    text = _render(_report(2, True), 250)
    for header in ("module", "hadamard", "err calib", "mean-pred", "blk err", "comp", "fit s"):
        assert header in text
    assert "model.layers.1.self_attn.o_proj" in text and "left out" not in text


@pytest.mark.parametrize("compensated", [False, True])
def test_the_caption_defines_every_number_column(compensated):
    """A newcomer asked what mean-pred, blk err and fit s are: each measured column is defined."""
    from hadaconv.report import COLUMNS

    caption = _report(2, compensated).caption()
    shown = [name for name, _, _ in COLUMNS if compensated or name not in ("blk err", "comp")]
    for name in shown:
        if name not in ("layer", "module", "hadamard", "conv", "removed", "sens"):
            assert name in caption, name
    assert ("blk err / comp" in caption) == compensated


def test_a_narrow_table_defines_the_columns_it_shows():
    """At 60 columns 'err calib' and 'blk err' are left out while 'err held' and 'comp' stay: the
    pair's one definition is still given; a left-out column's alone is not."""
    from rich.console import Console

    console = Console(width=60, record=True)
    console.print(_report(30, True).table())
    text = " ".join(console.export_text().split())
    assert "mean-pred, err calib, blk err (all in report.json)" in text
    assert "err calib / err held = ||y_new - y||" in text and "blk err / comp =" in text
    assert "fit s =" not in text and "mean-pred =" not in text


def test_the_caption_says_where_block_errors_were_scored():
    """With too few windows to hold any out, the block errors are scored on the calibration
    windows, and the caption says so instead of "held-out" (a newcomer's --samples 8)."""
    report = _report(2, True)
    assert "||t' - t|| on held-out windows" in report.caption()
    for row in report.layers:
        row.heldout_error = None
    assert "||t' - t|| on calibration windows" in report.caption()


def test_warns_of_a_converted_layer_no_better_than_the_mean():
    """A newcomer's MiniLM conversion on 16 windows kept a layer at held-out error 0.990 against
    0.499 for predicting the mean, silently; a layer left dense, or a fit that beats the mean, is
    no warning."""
    from hadaconv.errors import cli_names

    report = _report(5, False)
    report.layers[4].heldout_error = float("nan")
    report.layers[1].heldout_error, report.layers[1].mean_error = 0.990, 0.499
    report.layers[2].heldout_error, report.layers[2].mean_error, report.layers[2].converted = 0.990, 0.499, False
    report.layers[3].heldout_error = report.layers[3].mean_error  # not better: warned
    assert report.warnings() == [
        "layer 1: its held-out error 0.990 is no better than predicting the mean output (0.499): more calibration "
        "text (samples) should help; to keep the layer dense, list the candidates without it in layers",
        "layer 3: its held-out error 0.988 is no better than predicting the mean output (0.988): more calibration "
        "text (samples) should help; to keep the layer dense, list the candidates without it in layers",
        "layer 4: its held-out error nan is no better than predicting the mean output (0.988): more calibration "
        "text (samples) should help; to keep the layer dense, list the candidates without it in layers"]
    with cli_names():
        assert "(--samples)" in report.warnings()[0] and "without it in --layers" in report.warnings()[0]


def test_warns_when_max_layers_leaves_nothing_to_choose():
    """A newcomer's ``--layers 0-1 --max-layers 5`` converted both candidates without a word; a
    --max-layers below the candidate count, or none, or one beside a --max-loss that left a
    candidate dense, is no warning."""
    from hadaconv.errors import cli_names

    report = _report(2, False)
    assert report.warnings() == []
    report.max_layers = 1
    assert report.warnings() == []
    for k in (2, 5):
        report.max_layers = k
        assert report.warnings() == [f"max_layers {k} is not fewer than the 2 candidate layers, so every one was "
                                     "converted; give layers more candidates or a smaller max_layers"]
    with cli_names():
        assert report.warnings()[0].startswith("--max-layers 5 is not fewer than the 2 candidate layers")
    report.layers[1].converted = False  # --max-loss chose
    assert report.warnings() == []


def test_warns_when_the_calibration_text_made_fewer_windows_than_asked():
    """A newcomer's 560-word folder made 5 of the 32 windows asked, held none out, and the
    report said nothing: now it says how many, and what the blank held-out columns mean."""
    from hadaconv.errors import cli_names

    report = _report(2, False)
    report.samples, report.windows, report.heldout_tokens = 32, 32, 3 * 128
    assert report.warnings() == []
    report.windows = 0  # a data-free fit, or given inputs: no windows of text
    assert report.warnings() == []
    report.windows = 29  # nine tenths: a file of the model's own text, tokenized again (the demo's 31 of 32)
    assert report.warnings() == []
    report.windows = 28
    assert report.warnings() == ["the calibration text made 28 of the 32 windows asked (samples): give more text, "
                                 "or ask for fewer windows or a smaller seq_len"]
    report.sampled = True  # the model's own text, which tokenized again makes fewer: no shortfall to act on
    assert report.warnings() == []
    report.samples, report.windows, report.heldout_tokens = 8, 7, 0  # too few to hold any out: said even so
    assert report.warnings() == ["no calibration window is held out (fewer than 10), so the held-out errors are "
                                 "blank and the sensitivity is measured on calibration windows"]
    report.sampled, report.samples, report.windows = False, 32, 5
    with cli_names():
        said = report.warnings()[0]
    assert said.startswith("the calibration text made 5 of the 32 windows asked (--samples)")
    assert said.endswith("; no calibration window is held out (fewer than 10), so the held-out errors are blank and "
                         "the sensitivity is measured on calibration windows")


def test_a_saved_report_reads_back_as_it_was():
    """report.json (to_dict, through JSON) gives the same report back, so inspect prints the
    table convert printed; an older file's missing fields take their defaults, and a file that
    is not a report is a ValueError, not a crash in the table."""
    import json

    report = _report(3, True)
    report.rotated, report.rotation_error, report.rotation_params = True, (0.5, 0.25), 331_776
    saved = json.loads(json.dumps({**report.to_dict(), "distill": {"steps": 1}}))
    assert ConvertReport.from_dict(saved) == report
    old = {k: v for k, v in saved.items() if k not in ("rank", "rotated", "rotation_error", "rotation_params")}
    assert ConvertReport.from_dict(old).rotation_params == 0
    for bad in ([], {"mode": "head"}, {**saved, "layers": [{"index": 0}]}, {**saved, "params_before": "many"}):
        with pytest.raises(ValueError, match="not a conversion report"):
            ConvertReport.from_dict(bad)
