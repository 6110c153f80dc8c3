"""Small shared helpers for the benchmark scripts: timing and machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def median_ms(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 1, budget_s: float = 20.0) -> float:
    """Median wall time of ``fn()`` in milliseconds; stops early once ``budget_s`` is spent."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def machine() -> str:
    """One line: CPU model, cores, OS."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
