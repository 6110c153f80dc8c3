"""Progress bars for long work (rich), quiet when disabled or not on a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
#: Reports and tables go to stdout, wide enough for the per-layer table when piped to a file.
out = Console(width=None if Console().is_terminal else 180)


@contextmanager
def progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """``with progress(n, "fit") as step: ... step()``: a bar with count, elapsed time and ETA."""
    if not enabled or total <= 0:
        yield lambda: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
