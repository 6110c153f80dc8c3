"""all-MiniLM-L6-v2's bundle against ``SentenceTransformer.encode`` on texts past 256 tokens.

sentence-transformers cuts every text at its model's ``max_seq_length`` (256 for
all-MiniLM-L6-v2, in ``sentence_bert_config.json``; its tokenizer says 512).  This script exports
the original model (no conversion: the length, not the quality of a conversion, is measured),
embeds a passage of each held-out domain (:func:`common.heldout_domains`) longer than 256 tokens
with ``hadaconv.generate.embed``, and prints the cosine of each embedding to the reference:
sentence-transformers' computation rebuilt in float64 with transformers (the tokenizer cut at
256, the attention-masked mean of the last hidden state, normalised).  Beside it, the cosine of
the same mean over 512 tokens (what a bundle read before hadaconv kept the 256) to the same
reference, and what ``embed`` says without ``truncate``.

    python benchmarks/bench_encoder_length.py [--chars 2400] [--start 50000]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from common import heldout_domains, machine
from transformers import AutoModel, AutoTokenizer

from hadaconv.errors import InputError
from hadaconv.export import export_onnx
from hadaconv.generate import embed
from hadaconv.io import load_model
from hadaconv.realmodels import minilm


def _mean_pooled(model, tokenizer, text: str, max_length: int) -> np.ndarray:
    """The normalised attention-masked mean of the last hidden state, the text cut at ``max_length``."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None]
    vec = ((hidden * mask).sum(1) / mask.sum(1))[0]
    return (vec / vec.norm()).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=2400, help="characters of each passage")
    ap.add_argument("--start", type=int, default=50000, help="where each passage starts in its domain's text")
    args = ap.parse_args()
    loaded = load_model(str(minilm()))
    reference = AutoModel.from_pretrained(minilm()).eval().double()
    plain = AutoTokenizer.from_pretrained(minilm())  # transformers' own: model_max_length 512
    print(machine())
    print(f"hadaconv's tokenizer reads {loaded.tokenizer.model_max_length} tokens; transformers' says "
          f"{plain.model_max_length}")
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(loaded.model, f"{tmp}/b", tokenizer=loaded.tokenizer, log=lambda line: None)
        print("| text | tokens | embed(text) | cosine, truncate=True | cosine, 512-token mean |")
        print("|---|---:|---|---:|---:|")
        for name, whole in heldout_domains().items():
            text = whole[args.start:args.start + args.chars]
            try:
                embed(f"{tmp}/b", text)
                said = "embedded"
            except InputError as exc:
                said = f"refused: {exc}"
            got = embed(f"{tmp}/b", text, truncate=True, normalize=True).sentence_embedding[0]
            st = _mean_pooled(reference, plain, text, 256)
            old = _mean_pooled(reference, plain, text, 512)
            print(f"| {name} | {len(plain(text)['input_ids'])} | {said} | {float(got @ st):.7f} | "
                  f"{float(old @ st):.4f} |")


if __name__ == "__main__":
    main()
