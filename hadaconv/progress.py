"""Progress bars for long work (rich); off a terminal (a log file, nohup, CI) a plain line at
most every :data:`LOG_EVERY` seconds instead, so a long run is never silent."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

#: Columns of :data:`out` and :data:`console` off a terminal (a file, a pipe, CI) unless $COLUMNS
#: sets them: rich would otherwise assume 80 and cut or squeeze every wider table, and wrap a
#: long path mid-name; this fits the widest (the per-layer report, the benchmarks').
OFF_TERMINAL_WIDTH = 250


def _width(stderr: bool) -> int | None:
    """None (rich's own choice: the terminal's width, or $COLUMNS, which rich reads) on a terminal
    or where $COLUMNS is a number (a newcomer's COLUMNS=80 was ignored off a terminal); else
    :data:`OFF_TERMINAL_WIDTH`."""
    if Console(stderr=stderr).is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return None
    return OFF_TERMINAL_WIDTH


#: Progress and notes go to stderr, at the terminal's width on one.
console = Console(stderr=True, width=_width(True))
#: Reports and tables go to stdout: the terminal's width on one, else :data:`OFF_TERMINAL_WIDTH`.
#: The CLI, the benchmarks and the demo all print through it.
out = Console(width=_width(False))


@contextmanager
def progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """``with progress(n, "fit") as step: ... step()``: a bar with count, elapsed time and ETA
    (on a terminal), else "description: i/n, s elapsed, about s left" lines on stderr: the first
    at the first step after :data:`STATUS_AFTER` seconds, then every :data:`LOG_EVERY`."""
    if not enabled or total <= 0:
        yield lambda: None
        return
    if not console.is_terminal:
        yield _log_lines(total, description)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


@contextmanager
def status(description: str) -> Iterator[None]:
    """``with status("loading model.gguf"): ...``: for work of unknown size (a model load), a
    spinner with the elapsed time on a terminal, removed when the work ends.  Elsewhere work
    that ends within :data:`STATUS_AFTER` seconds stays silent (a quick failure prints only its
    error line); longer work gets a "still working" line then and every :data:`LOG_EVERY`
    seconds after, and a "done" line at the end."""
    if not console.is_terminal:
        with _delayed_lines(description):
            yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, redirect_stdout=False, redirect_stderr=False) as spinner:
        spinner.add_task(description, total=None)
        yield


#: Seconds of work after which :func:`status` writes its first line off a terminal.
STATUS_AFTER = 5.0


@contextmanager
def _delayed_lines(description: str) -> Iterator[None]:
    start, finished, announced = time.monotonic(), threading.Event(), threading.Event()

    def announce() -> None:  # a daemon thread: the work itself may be one long C call
        wait = STATUS_AFTER
        while not finished.wait(wait):
            console.print(f"{description}: still working after {duration(time.monotonic() - start)}", highlight=False)
            announced.set()
            wait = LOG_EVERY

    watcher = threading.Thread(target=announce, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        watcher.join()
    if announced.is_set():  # reached only after a normal end: an error prints its own line
        console.print(f"{description}: done in {duration(time.monotonic() - start)}", highlight=False)


#: Seconds between the progress lines written when stderr is not a terminal.
LOG_EVERY = 30.0


def _log_lines(total: int, description: str) -> Callable[[], None]:
    start = last = time.monotonic()
    done = 0

    def step() -> None:  # quick work stays silent; long work ends with a last line
        nonlocal done, last
        done += 1
        now = time.monotonic()
        # The first line as soon as the stage has run STATUS_AFTER seconds, as status() does: a
        # run of stages each under LOG_EVERY would otherwise be silent for minutes.
        first = last == start and now - start >= STATUS_AFTER
        if first or now - last >= LOG_EVERY or (done == total and last > start):
            last = now
            left = (now - start) / done * (total - done)  # the mean step so far: rich's own ETA is a rate too
            eta = (f", about {duration(left)} left" if left >= 1 else ", under 1 s left") if done < total else ""
            console.print(f"{description}: {done}/{total}, {duration(now - start)} elapsed{eta}", highlight=False)

    return step


def duration(seconds: float) -> str:
    """0.2 -> 'under 1 s', 3 -> '3 s', 754 -> '12 min 34 s', 4000 -> '1 h 06 min' (minutes truncated)."""
    s = round(seconds)
    if s < 1:
        return "under 1 s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def counted(n: int, noun: str) -> str:
    """(1, 'window') -> '1 window', (3, 'held-out window') -> '3 held-out windows'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
