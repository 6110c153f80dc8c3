"""Decoding cost of ``hadaconv run``'s streamed reply, against decoding the whole reply after
every token (what the streamer did before, and what a naive one does).

The reply is real held-out prose (the King James Bible and CPython's language reference, as in
``bench_quality.py``) tokenized by SmolLM2's tokenizer (from its GGUF file); both streamers are
fed its tokens one at a time with their output discarded, alternating, and the streamed text is
checked equal to the whole decode.  No model runs: this is the tokenizer's share of a reply.

    python benchmarks/bench_stream.py [--tokens 2000,8000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternate, heldout_domains, machine, median_spread, ratio  # noqa: E402

from hadaconv.cli import _Stream  # noqa: E402
from hadaconv.io.inputs import source_tokenizer  # noqa: E402
from hadaconv.realmodels import smollm2  # noqa: E402


class WholeDecode:
    """The baseline: decode every token so far after each token, print what the text gained."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, tokens) -> None:
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown):
            print(text[len(self.shown):], end="")
            self.shown = text

    def finish(self, text: str) -> None:
        print(text[len(self.shown):] if text.startswith(self.shown) else "")


def seconds(make, ids: list[int], expected: str) -> float:
    """Seconds to stream ``ids`` through a new ``make()``; checks the printed text."""
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        stream = make()
        for token in ids:
            stream(np.array([token]))
        stream.finish(expected)
    elapsed = time.perf_counter() - start
    assert out.getvalue().rstrip("\n") == expected, "the streamed text differs from the whole decode"
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="2000,8000", help="reply lengths in tokens (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tokenizer = source_tokenizer(smollm2())
    domains = heldout_domains()
    all_ids = tokenizer(domains["kjv"][:40000] + "\n\n" + domains["python-ref"][:40000],
                        add_special_tokens=False)["input_ids"]
    print(f"# {machine()}")
    print("| reply (tokens) | whole decode after each token (s) | hadaconv run's window (s) | speedup |")
    print("|---:|---:|---:|---:|")
    for n in (int(t) for t in args.tokens.split(",")):
        ids = all_ids[:n]
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        times = alternate({"whole": lambda: seconds(lambda: WholeDecode(tokenizer), ids, expected),
                           "window": lambda: seconds(lambda: _Stream(tokenizer, set(), ""), ids, expected)},
                          repeats=args.repeats)
        speedup, noise = ratio(times["whole"], times["window"])
        print(f"| {len(ids):,} | {median_spread(times['whole'], 2)} | {median_spread(times['window'], 3)} | "
              f"{speedup:.0f}x (+/- {100 * noise:.0f}%) |")


if __name__ == "__main__":
    main()
