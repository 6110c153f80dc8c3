"""Dense SmolLM2-135M in onnxruntime-genai: the bundle loads as it is and gives PyTorch's greedy tokens.

The converted SmolLM2 case runs in the test suite (tests/test_export.py reuses its bundle); the
dense export is a second ~100 s export, so it is checked here instead.  Exports the dense model in
the custom form (the bundle carries the op library and genai_config.json points at it), copies the
bundle elsewhere, generates 32 greedy tokens for two prompts with PyTorch and hadaconv.generate (ONNX Runtime),
both told to ignore EOS, and with onnxruntime-genai, which stops at EOS, and prints whether they
agree (genai up to and including EOS), with the wall time of the two ONNX
generators (median of 5, alternating).

    python benchmarks/genai_check.py [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_e2e import gguf  # noqa: E402
from common import machine  # noqa: E402
from test_genai import assert_same_greedy, genai_greedy  # noqa: E402

from hadaconv.export import export_onnx  # noqa: E402
from hadaconv.generate import generate  # noqa: E402
from hadaconv.io import load_model  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NEW = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="keep the bundle here (reused when present)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="genai-check-"))
    torch.set_num_threads(1)
    loaded = load_model(gguf())
    model, tok = loaded.model, loaded.tokenizer
    if not (work / "dense" / "genai_config.json").is_file():
        t = time.perf_counter()
        export_onnx(model, work / "dense", tokenizer=tok, overwrite=True)
        print(f"export: {time.perf_counter() - t:.0f} s")
    shutil.rmtree(work / "copy", ignore_errors=True)
    shutil.copytree(work / "dense", work / "copy")
    bundle = work / "copy"
    ok = True
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                 do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
        ref = ref[0, ids.shape[1]:].numpy()
        times: dict[str, list[float]] = {"hadaconv.generate": [], "onnxruntime-genai": []}
        for _ in range(5):
            t = time.perf_counter()
            ort_tokens = generate(bundle, prompt, NEW, eos_token_id=[]).tokens[0]
            times["hadaconv.generate"].append(time.perf_counter() - t)
            t = time.perf_counter()
            genai_tokens = genai_greedy(bundle, [ids[0].tolist()], NEW)[0]
            times["onnxruntime-genai"].append(time.perf_counter() - t)
        try:
            assert_same_greedy(genai_tokens[None], ref[None], bundle)
            same = np.array_equal(ort_tokens, ref)
        except AssertionError:
            same = False
        ok &= same
        timing = ", ".join(f"{k} {statistics.median(v):.2f} s (min {min(v):.2f}, max {max(v):.2f})" for k, v in times.items())
        print(f"{prompt!r}: {NEW} greedy tokens, ORT == PyTorch and genai == PyTorch up to EOS "
              f"({len(genai_tokens)} tokens): {same}; {timing}")
        print(f"  text: {tok.decode(ref)!r}")
    print(f"machine: {machine()}; model load + session creation included in each generation time")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
