"""The sampler's KV cache: preallocated buffers against transformers' DynamicCache (SmolLM2, CPU).

``hadaconv sample`` and every first ``convert`` sample their calibration text with a KV-cached
loop, one token per step.  transformers' ``DynamicCache`` appends each step's keys and values
with ``torch.cat``, copying the whole cache every step; ``hadaconv.sample.preallocated_cache``
writes them into buffers sized for the sequence and hands attention views of the filled part.
This script times ``sample_texts`` with each, in one process (the model loaded once), the two
alternating (:func:`common.alternate`: A, B, then B, A) after one untimed run of each, and prints
each one's tokens/s, the speed-up with its 95% bootstrap interval, and whether the two wrote the
same text (they must: the cached text of earlier runs stays valid only if they do).

    python benchmarks/bench_sample.py [--samples 64] [--seq-len 256] [--threads 2] [--repeats 3]

The defaults are one batch of a default conversion's sampling (64 sequences of 256 tokens: 512
sequences are 8 such batches).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import alternate, machine, median_spread, ratio, smollm2_path

from hadaconv import sample
from hadaconv.io import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64, help="sequences per run (one batch at the default 64)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(str(smollm2_path()))
    model, tokenizer = loaded.model, loaded.tokenizer
    preallocated, texts = sample.preallocated_cache, {}

    def run(name: str, make_cache):
        def once() -> float:
            sample.preallocated_cache = make_cache
            try:
                start = time.perf_counter()
                texts[name] = sample.sample_texts(model, tokenizer, samples=args.samples, seq_len=args.seq_len,
                                                  batch_size=args.samples, progress=False)
                return time.perf_counter() - start
            finally:
                sample.preallocated_cache = preallocated
        return once

    from transformers import DynamicCache

    runs = {"DynamicCache": run("DynamicCache", lambda capacity: DynamicCache()),
            "preallocated": run("preallocated", preallocated)}
    for once in runs.values():  # untimed: the first run in a process pays for thread pools and allocators
        once()
    seconds = alternate(runs, repeats=args.repeats)
    tokens = args.samples * (args.seq_len - 1)
    print(f"{machine()}; torch {torch.__version__}, {args.threads} threads; {args.samples} sequences x "
          f"{args.seq_len} tokens, {args.repeats} alternating repeats")
    print("| cache | tokens/s, median (range, n) |")
    print("|---|---:|")
    for name, values in seconds.items():
        print(f"| {name} | {median_spread([tokens / s for s in values])} |")
    speedup, noise = ratio(seconds["DynamicCache"], seconds["preallocated"])
    print(f"preallocated / DynamicCache speed: {speedup:.3f}x +-{100 * noise:.1f}% (95% bootstrap); "
          f"the same text: {texts['DynamicCache'] == texts['preallocated']}")


if __name__ == "__main__":
    main()
