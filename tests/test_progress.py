"""Off a terminal, long work prints progress lines; quick work stays silent (one-line errors)."""

import pytest

import hadaconv.progress as progress_mod


def run(total, clock, monkeypatch, capsys):
    ticks = iter(clock)
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(ticks))
    with progress_mod.progress(total, "fit") as step:
        for _ in range(total):
            step()
    return capsys.readouterr().err.splitlines()


def test_long_work_logs_lines_off_a_terminal(monkeypatch, capsys):
    # start, then steps at 3 s, 10 s (a line: past 5 s), 30 s, 40 s (a line: 30 s after the last),
    # 60 s (the last step: a line)
    lines = run(5, [0, 3, 10, 30, 40, 60], monkeypatch, capsys)
    assert lines == ["fit: 2/5, 10 s elapsed, about 15 s left", "fit: 4/5, 40 s elapsed, about 10 s left",
                     "fit: 5/5, 1 min 00 s elapsed"]


def test_lines_give_an_eta_from_the_mean_step(monkeypatch, capsys):
    # 510 steps of 7.5 s (calibration sampling under load): the first line, after the first step,
    # says how long the other 509 take at that rate, 3817 s; the next comes 30 s later
    lines = run(510, [7.5 * i for i in range(511)], monkeypatch, capsys)
    assert lines[:2] == ["fit: 1/510, 8 s elapsed, about 1 h 03 min left", "fit: 5/510, 38 s elapsed, about 1 h 03 min left"]
    assert lines[-1] == "fit: 510/510, 1 h 03 min elapsed"


def test_quick_work_is_silent(monkeypatch, capsys):
    assert run(3, [0, 1, 2, 3], monkeypatch, capsys) == []


def test_distill_logs_lines_off_a_terminal(monkeypatch, capsys):
    """The distillation's bar becomes a line every 30 s with the time left (the demo's 141 s of
    silence in a log file)."""
    from hadaconv.distill import core

    ticks = iter([0, 10, 40, 50, 75])
    monkeypatch.setattr(core.time, "monotonic", lambda: next(ticks))
    bar = core._Bar(True)
    for fraction in (0.1, 0.4, 0.5, 0.75):
        bar.update(fraction, f"distill step {int(fraction * 8)}")
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["distill step 3, 40 s elapsed, about 1 min 00 s left",
                                                    "distill step 6, 1 min 15 s elapsed, about 25 s left"]


def test_distill_eta_leaves_out_the_budget_spent_before_the_bar(monkeypatch, capsys):
    """A quarter of the budget went to the evaluations before training (or to a run this one
    resumes): the time left comes from the bar's own progress, 0.2 in 40 s, so 0.55 take 110 s
    (the whole-run average said 49 s; a newcomer's 1-minute run said 3 minutes left at 55 s)."""
    from hadaconv.distill import core

    ticks = iter([0, 40, 41])
    monkeypatch.setattr(core.time, "monotonic", lambda: next(ticks))
    bar = core._Bar(True, 0.25)
    bar.update(0.45, "distill step 2")
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["distill step 2, 40 s elapsed, about 1 min 50 s left"]


def test_block_by_block_counts_the_blocks_it_visits(monkeypatch):
    """--layers 0 of a 2-block model: the block loop stops after block 0, and so does its count
    (it said n/30 on SmolLM2 with --layers 0-4)."""
    import torch
    from tiny_models import make_tiny

    import hadaconv.blockwise as blockwise
    from hadaconv.convert import ConvertConfig, convert

    totals = []

    def spy(total, description, enabled=True):
        totals.append(total)
        return progress_mod.progress(total, description, False)

    monkeypatch.setattr(blockwise, "progress", spy)
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (2, 16))} for _ in range(4)]
    convert(make_tiny("llama"), None, ConvertConfig(layers=[0], sensitivity=False, progress=False), inputs=batches)
    assert totals == [1]


def test_durations_read_as_a_person_would_say_them():
    d = progress_mod.duration
    assert [d(0.2), d(0.5), d(3), d(754), d(4000)] == ["under 1 s", "under 1 s", "3 s", "12 min 34 s", "1 h 06 min"]


def test_status_is_silent_for_quick_work(capsys):
    with progress_mod.status("loading m.gguf"):
        pass
    assert capsys.readouterr().err == ""


def test_status_speaks_up_when_work_is_slow(monkeypatch, capsys):
    import threading

    monkeypatch.setattr(progress_mod, "STATUS_AFTER", 0.01)
    with progress_mod.status("loading m.gguf"):
        threading.Event().wait(0.5)  # the watcher's line comes while the work still runs
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" after ")[0] for line in lines[:1]] == ["loading m.gguf: still working"]
    assert lines[1].startswith("loading m.gguf: done in ") and len(lines) == 2


def test_status_leaves_a_failure_its_own_line(monkeypatch, capsys):
    import threading

    import pytest

    monkeypatch.setattr(progress_mod, "STATUS_AFTER", 0.01)
    with pytest.raises(ValueError), progress_mod.status("loading m.gguf"):
        threading.Event().wait(0.5)
        raise ValueError("bad file")
    assert [line.split(" after ")[0] for line in capsys.readouterr().err.splitlines()] == ["loading m.gguf: still working"]


def test_status_keeps_speaking_during_long_work(monkeypatch, capsys):
    import threading

    monkeypatch.setattr(progress_mod, "STATUS_AFTER", 0.01)
    monkeypatch.setattr(progress_mod, "LOG_EVERY", 0.1)
    with progress_mod.status("exporting"):
        threading.Event().wait(0.75)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 4 and lines[-1].startswith("exporting: done in "), lines
    assert all(line.startswith("exporting: still working after ") for line in lines[:-1])


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1.5h", 5400), ("1h30m", 5400),
                                           ("1h 30m 15s", 5415), ("1h\t30m", 5400), (".5h", 1800), ("2H", 7200)])
def test_max_time_reads_durations_people_write(text, seconds):
    from hadaconv.cli import _duration

    assert _duration(text) == seconds


@pytest.mark.parametrize("text", ["90sec", "1h30", "0", "-5", "inf", "nan", "h", "", "1h1h", "30m1h", "1s1s",
                                  "\u0663m"])
def test_max_time_refuses_what_is_no_duration(text):
    import click

    from hadaconv.cli import _duration

    with pytest.raises(click.BadParameter, match="expected a positive duration like 90s, 30m, 2h or 1h30m"):
        _duration(text)


def test_tables_take_columns_from_the_environment_off_a_terminal(monkeypatch):
    """Off a terminal the tables are 250 columns wide, unless $COLUMNS says otherwise (a newcomer's
    COLUMNS=80 was ignored); rich then reads $COLUMNS itself."""
    from rich.console import Console

    from hadaconv.progress import OFF_TERMINAL_WIDTH, _width

    monkeypatch.delenv("COLUMNS", raising=False)
    assert _width(False) == OFF_TERMINAL_WIDTH  # pytest's stdout is captured: no terminal
    monkeypatch.setenv("COLUMNS", "80")
    assert _width(False) is None and Console(width=_width(False)).width == 80
    monkeypatch.setenv("COLUMNS", "wide")
    assert _width(True) == OFF_TERMINAL_WIDTH
