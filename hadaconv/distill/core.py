"""``distill(student, teacher, tokenizer, DistillConfig(...)) -> DistillReport``.

The student is a converted model, the teacher the original; the teacher is frozen and the
student is trained in place, in up to two stages:

1. local (``"local"`` in ``stages``): each converted attention block learns to reproduce the
   teacher's block from the teacher's own inputs (:mod:`hadaconv.distill.local`);
2. global (``"global"``): end-to-end knowledge distillation on text windows: KL(teacher ||
   student) of the next-token distributions for causal LMs, relative MSE of the last hidden
   state plus ``1 - cos`` of the mean-pooled embedding for encoders, optionally plus a per-layer
   hidden-state MSE.  AdamW, linear warmup then cosine decay to 10%, gradient accumulation,
   clipping, bf16 autocast where the hardware multiplies bf16; DDP / FSDP2 under torchrun;
   checkpoints and exact resume; held-out evaluation every ``eval_every`` steps, keeping the
   state closest to the teacher there (:data:`SELECTED_BY`).

The default is the global stage alone: on SmolLM2 with equal wall-clock budgets, local then
global recovered less than global alone (benchmarks/RESULTS.md, "Distillation (CPU)").

The learning-rate schedule runs on the fraction of the budget spent (the largest of steps,
tokens and seconds against their limits), so a run limited by time still ends its cosine.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from hadaconv.adapters import Adapter, check_seq_len, find_adapter
from hadaconv.calibrate import HELDOUT_EVERY, describe_sources, mixed_windows, one_file_hint, read_document
from hadaconv.distill import checkpoint as ckpt
from hadaconv.distill.local import reconstruct_blocks
from hadaconv.distill.losses import encoder_loss, forward, hidden_loss, kl_loss, stream_rotation
from hadaconv.distill.parallel import Dist, fsdp_needs_processes, no_sync, setup, several_processes, shard, wrap
from hadaconv.device import native_bf16, resolve_device, resolve_dtype
from hadaconv.errors import HadaconvError, InputError, check_fields, check_module, command, indefinite, option
from hadaconv.evaluate import embedding_cosine, perplexity, text_windows
from hadaconv.io.inputs import same_file
from hadaconv.nn import HadamardProjection
from hadaconv.progress import LOG_EVERY, console, counted, duration
from hadaconv.rotation import is_rotated
from hadaconv.sample import DEFAULT_SEQUENCES, SAMPLE, calibration_texts, default_sources

__all__ = ["DistillConfig", "DistillReport", "converted_blocks", "default_lr", "distill", "eval_text_windows"]

Stage = Literal["local", "global"]

#: Sequences sampled from the teacher when no --data is given (:attr:`DistillConfig.sampled`): the
#: 512 a default conversion calibrates on (:data:`hadaconv.convert.DEFAULT_CALIBRATION`), read from
#: the cache.  Measured on SmolLM2, all layers (benchmarks/RESULTS.md, "Distillation on 256 sampled
#: windows" and "A lever measured and not taken: chat text"): ten minutes on 256 gave 5-8% better
#: held-out perplexity than on 128, which get repeated and overfitted, and 512 another 1-3% over
#: 256 once a step took 3 s (about 200 steps: the text seen 1.6 times instead of 3.2).
DEFAULT_SAMPLES = DEFAULT_SEQUENCES  # 512, the text a default conversion cached

#: Fewer held-out windows than this (and than ``eval_windows`` asks for) get a warning: the best
#: state is chosen on them, and a choice on one or two windows follows those windows' noise.
STEADY_EVAL_WINDOWS = 4

#: What chooses the state a run keeps, per kind of model: the held-out distance to the teacher.
SELECTED_BY = {"causal-lm": "KL to teacher (nats/token)", "encoder": "1 - cosine to teacher"}


@dataclass
class DistillConfig:
    """Options of :func:`distill` (the flags of ``hadaconv distill`` map one to one).

    Attributes:
        stages: "local" (block-wise reconstruction), "global" (end-to-end KD), in that order.
            A stage not run ignores its options (:data:`STAGE_OPTIONS`; the command line
            refuses them).
        train: "attention" (the converted attention blocks: q, k, v, gamma, beta) or "all".
        data: training text: "sample" (the teacher's own text, :data:`DEFAULT_SAMPLES` sequences
            of ``seq_len`` tokens sampled once and cached, the text a default conversion
            calibrates on; the default, None), "shakespeare", files, folders, JSONL
            (see :func:`hadaconv.sample.calibration_texts`).
        sampled: sequences the teacher writes for the data source "sample" (those a default
            conversion cached are read from the cache, the rest sampled once and cached; more is more
            distinct text, at a one-off sampling cost); never more than ``samples`` (the windows
            the run reads) are sampled.  Budgets past the default's ten CPU
            minutes want about ``steps * batch_size / 2``, each window seen about twice
            (benchmarks/RESULTS.md, "Thirty minutes of distillation").
        samples, seq_len: training windows (mixed_windows: an equal share per source, a tenth held
            out for evaluation).
        batch_size: windows per optimizer step, over all ranks (the global batch).
        accumulate: micro-batches per rank and step (gradient accumulation).
        lr: peak learning rate; None (the default): :func:`default_lr`, 1e-4 times the share of
            attention blocks converted.
        warmup_steps, min_lr_ratio, weight_decay, clip: AdamW, linear warmup, cosine decay
            to ``min_lr_ratio * lr``, gradient-norm clipping (0 = none).
        temperature: softmax temperature of the KL loss (causal LMs).
        hidden_weight: weight of the per-layer hidden-state MSE (0 = off).
        max_steps, max_tokens, max_time: budget of the global stage (any that is set stops it;
            max_time in seconds, counting the local stage too but not preparing the text, which
            may sample it; no step starts that would end, with its evaluation, past it, so the
            training ends by then, only the save after it); none set = one pass over the data.
        local_steps, local_lr, local_windows: the local stage: steps per block, its learning
            rate, and how many windows are recorded for it.  A block whose own error rises is
            reset; a stage that leaves the held-out distance to the teacher worse is undone whole
            (``DistillReport.local_kept``).
        eval_text: held-out text file; None = the held-out tenth of the training windows.
        eval_every, eval_windows: evaluate every K steps on at most this many windows.
        checkpoint_dir, checkpoint_every, resume: checkpoints every K steps; ``resume``
            continues from the checkpoint in ``checkpoint_dir`` when there is one (the CLI says
            when there is none).
        seed: seeds the data order and torch.
        gradient_checkpointing: recompute activations in the backward pass (Hugging Face
            models; the student then runs in train mode, i.e. with its configured dropout).
        fsdp: shard student and teacher with FSDP2 instead of replicating with DDP.
        device: "cpu", "cuda", "cuda:1"; None = this rank's GPU if there is one.
        dtype: dtype the teacher and student are loaded in ("auto": the checkpoints' own); the
            default float32 keeps full-precision trained weights (bf16 autocast where native).
            float16 weights are refused: without float32 master weights and loss scaling,
            AdamW's second moments underflow in float16 and the updates blow up (an encoder's
            embedding cosine to its teacher fell from 0.97 to 0.42).
        bf16: autocast the forward passes to bfloat16 (the weights and optimizer stay in
            ``dtype``); None (the default): for float32 weights,
            where the device multiplies bfloat16 in hardware (:func:`hadaconv.device.native_bf16`:
            CUDA GPUs, CPUs with AMX or AVX512_BF16).
        progress: show a progress bar (rank 0, on a terminal).
    """

    stages: Sequence[Stage] = ("global",)
    train: Literal["attention", "all"] = "all"
    data: list[str] | None = None
    sampled: int = DEFAULT_SAMPLES
    samples: int = 4096
    seq_len: int = 256
    batch_size: int = 4
    accumulate: int = 1
    lr: float | None = None
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None
    local_steps: int = 40
    local_lr: float = 1e-4
    local_windows: int = 16
    eval_text: str | None = None
    eval_every: int = 50
    eval_windows: int = 16
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    resume: bool = False
    seed: int = 0
    gradient_checkpointing: bool = False
    fsdp: bool = False
    device: str | None = None
    dtype: str = "float32"
    bf16: bool | None = None
    progress: bool = True

    def fingerprint(self) -> dict:
        """The settings a checkpoint must share with the run that resumes it (budgets, eval and
        checkpoint cadence may change)."""
        keys = ("stages", "train", "data", "sampled", "samples", "seq_len", "batch_size", "lr", "warmup_steps",
                "min_lr_ratio", "weight_decay", "clip", "temperature", "hidden_weight", "local_steps",
                "local_lr", "local_windows", "seed")
        d = asdict(self)
        # The unit of the checkpoint's best eval loss: a checkpoint chosen by another measure
        # (log perplexity, before 2026-12) cannot be compared with this run's evaluations.
        return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in keys} | {"selected_by": "distance to teacher"}


@dataclass
class DistillReport:
    """What a run did.  ``metric`` is "perplexity" (causal LMs, lower is better) or "embedding
    cosine" (encoders, to the teacher, higher is better)."""

    kind: str
    metric: str
    stages: list[str]
    train: str
    eval_source: str
    #: The training text, as :func:`hadaconv.sample.calibration_texts` describes it, and the
    #: windows cut from it (``seq_len`` tokens each; ``eval_windows`` held out when no eval text).
    data_source: str = ""
    train_windows: int = 0
    eval_windows: int = 0
    seq_len: int = 0
    trainable_params: int = 0
    lr: float = 0.0  # the peak learning rate the global stage ran at (the config's, or default_lr's)
    teacher: float | None = None
    before: float | None = None
    after_local: float | None = None
    #: False where the local stage left the held-out eval loss worse than it found it and was undone
    #: (the per-block errors it lowers do not always carry to the whole model).
    local_kept: bool = True
    local_steps: int = 0  # per converted block
    after: float | None = None
    #: What chooses the state kept (:data:`SELECTED_BY`), and its value before and after each stage.
    eval_loss: str = ""
    loss_before: float | None = None
    loss_after_local: float | None = None
    loss_after: float | None = None
    best_step: int | None = None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training, evaluations included (what max_time bounds), not the last checkpoint's write
    world_size: int = 1
    autocast: str = "off"  # "bfloat16" where the forward passes ran under bf16 autocast
    #: The global stage's training loss in words where it is another quantity than ``eval_loss``
    #: (an encoder's, a hidden-state term, a temperature); "" where the two are the same measure.
    objective: str = ""
    local: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)  # {step, tokens, seconds, metric, eval_loss, train_loss}
    #: Under FSDP the student's parameters are shards: the trained parameters, gathered (rank 0).
    full_state: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "full_state"}

    def report_json(self) -> dict:
        """What ``report.json`` holds for this report (:func:`hadaconv.save`): its ``distill``
        section, the layout ``hadaconv distill`` writes."""
        return {"distill": self.to_dict()}

    def table(self):
        """The summary as a rich Table, the eval curve in a second one (``curve_table``)."""
        from rich.table import Table

        def num(v):
            return "-" if v is None else f"{v:.4f}" if self.metric != "perplexity" else f"{v:.2f}"

        def loss(v):
            return "-" if v is None else f"{v:.4f}"

        t = Table(title=f"hadaconv distill, measured on {self.eval_source}")
        t.add_column("")
        t.add_column(self.metric, justify="right")
        t.add_column(self.eval_loss, justify="right")
        t.add_row("teacher (original)", num(self.teacher), loss(0.0))
        t.add_row("converted, before", num(self.before), loss(self.loss_before))
        if "local" in self.stages:
            t.add_row("after local stage" + ("" if self.local_kept else " (worse: undone)"), num(self.after_local),
                      loss(self.loss_after_local))
        if "global" in self.stages:
            # Name the measure that chose: a newcomer saw the perplexity column fall and read
            # "no step came closer" as a contradiction.
            by = self.eval_loss.split(" (")[0]
            kept = (f" (lowest {by}: step {self.best_step})" if self.best_step
                    else f" (no step lowered the {by}: the start kept)" if self.best_step == 0 else "")
            t.add_row("after distillation" + kept, num(self.after), loss(self.loss_after))
        parts = []
        if "local" in self.stages:
            parts.append(f"local stage: {len(self.local)} blocks x {self.local_steps} steps")
        if "global" in self.stages:
            parts.append(f"global stage: train {self.train} ({self.trainable_params:,} params), {self.steps} "
                         f"step{'s' * (self.steps != 1)}, {self.tokens:,} tokens, peak lr {self.lr:.2g}")
        if self.data_source:
            parts.append(f"text: {self.data_source}, {self.train_windows:,} windows of {self.seq_len} tokens")
        run = f"{self.seconds:.0f} s, {self.world_size} process{'es' * (self.world_size != 1)}, autocast {self.autocast}"
        t.caption = "; ".join([*parts, run])
        return t

    def curve_table(self):
        from rich.table import Table

        t = Table(title=f"held-out {self.metric} and {self.eval_loss} vs training tokens")
        for col in ("step", "tokens", "seconds", self.metric, self.eval_loss, "train loss"):
            t.add_column(col, justify="right")
        for p in self.curve:
            loss = "-" if p.get("train_loss") is None else f"{p['train_loss']:.4f}"
            t.add_row(str(p["step"]), f"{p['tokens']:,}", f"{p['seconds']:.0f}", f"{p['metric']:.4f}",
                      f"{p['eval_loss']:.4f}", loss)
        # A newcomer reads a train loss far below the held-out one as a bug: say what it is.
        if self.objective:
            t.caption = (f"train loss: the training objective of the last step's own batch ({self.objective}), "
                         f"another quantity than the held-out {self.eval_loss}: the two columns do not compare")
            return t
        t.caption = ("train loss: the loss of the last step's own batch (one batch: noisy, above or below the "
                     f"held-out {self.eval_loss}); on text the model has already seen (a later pass, or, with the "
                     f"default text, the sequences the conversion was fitted on) it sits below the held-out "
                     f"{self.eval_loss}")
        return t


# ------------------------------------------------------------------------------- helpers


def _evaluation_line(report: DistillReport) -> str:
    """One line for the evaluation just recorded in ``report.curve``."""
    point = report.curve[-1]
    closest = ", the closest to the teacher so far" if report.best_step == point["step"] else ""
    return (f"step {point['step']}: held-out {report.eval_loss} {point['eval_loss']:.4g}, "
            f"{report.metric} {point['metric']:.4g}{closest}")


def converted_blocks(student: nn.Module, teacher: nn.Module, adapter: Adapter | None = None) -> list[str]:
    """Qualified names of the attention blocks the student has converted (found through the
    teacher, whose blocks the adapter still recognises)."""
    adapter = adapter or find_adapter(teacher)
    adapter.prepare(teacher)
    adapter.prepare(student)
    names = []
    for layer in adapter.layers(teacher):
        try:
            out = student.get_submodule(layer.out_name)
        except AttributeError:
            raise HadaconvError(f"the student has no {layer.out_name}: teacher and student differ") from None
        if isinstance(out, HadamardProjection):
            names.append(layer.name)
    return names


def default_lr(converted: int, blocks: int) -> float:
    """The peak learning rate of a run that names none: 1e-4 times the share of the model's
    ``blocks`` attention blocks that are ``converted``.  A model with every block converted has
    far to go and takes 1e-4's steps.  One with a few converted starts close to its teacher, and
    there the held-out KL on distill's own sampled text, which chooses the state kept, rises
    under 1e-4 while the perplexity on other text falls: the run may keep its start.  At the smaller
    rate that KL falls with the training, so the trained state is kept.  Measured on SmolLM2
    (benchmarks/RESULTS.md, "The learning rate follows the share of blocks converted" and "The
    ten-layer learning rates from benchmarks/bench_quality.py"): all 30 blocks, 10 minutes: 1e-4
    2.13x / 2.17x the teacher's perplexity, 3e-5 2.25x / 2.29x; its 10 least sensitive blocks,
    10 minutes: 1e-4 kept the start (1.157x / 1.178x; its last state read 1.103x / 1.112x), the
    rule's 3.3e-5 1.106x / 1.129x.  The rule runs a line through those two points of one causal
    LM; encoders, ``train="attention"`` and the local stage were not measured with it."""
    return 1e-4 * (converted / max(1, blocks))  # exactly 1e-4 for every block: n / n is 1.0


def _select_trainable(student: nn.Module, blocks: list[str], train: str) -> int:
    if train not in ("attention", "all"):
        raise HadaconvError(f"unknown trainable set {train!r}: choose attention or all")
    for p in student.parameters():
        p.requires_grad_(train == "all")
    if train == "attention":
        for name in blocks:
            for p in student.get_submodule(name).parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in student.parameters() if p.requires_grad)


def _batch_indices(step: int, batch: int, n: int, seed: int, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """The windows of global step ``step``: consecutive slices of one seeded permutation per
    epoch, so the data position is a function of the step (what makes resuming exact)."""
    out = []
    for q in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(q, n)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(cache[epoch][i])
    return torch.stack(out)


def _lr_factor(step: int, spent: float, cfg: DistillConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, spent)))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


class _Evaluator:
    """Held-out quality, as :mod:`hadaconv.evaluate` computes it, under no_grad: the metric a
    user reads (perplexity of LMs, embedding cosine to the teacher of encoders) and the eval loss
    that chooses the state to keep, which measures distance to the teacher (KL per token, or
    1 - cosine).  Perplexity of held-out sampled text is no good chooser: in a short run it
    barely moves, either way, while KL falls by percents (benchmarks/RESULTS.md, "Choosing the
    distilled state").  ``batch_size``: windows per forward pass, at most the training
    micro-batch (the KL holds two models' logits at once)."""

    def __init__(self, kind: str, teacher: nn.Module, windows: torch.Tensor, device: torch.device,
                 batch_size: int) -> None:
        self.kind, self.teacher, self.windows, self.batch_size = kind, teacher, windows.to(device), batch_size
        # The last call's wall time: before training, the student's (it follows the teacher's).
        self.seconds: float | None = None

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        """(metric, eval loss); the teacher's own eval loss is 0."""
        start = time.perf_counter()
        if self.kind == "causal-lm":
            p = perplexity(model, self.windows, self.batch_size, inference=False, progress=None,
                           reference=None if model is self.teacher else self.teacher)
            result = p.perplexity, p.kl or 0.0
        else:
            cos = embedding_cosine(model, self.teacher, self.windows, self.batch_size, inference=False)
            result = cos, 1.0 - cos
        self.seconds = time.perf_counter() - start
        return result


class _Bar:
    """A rich progress bar over the fraction of the budget, with loss, tokens/s and ETA; off a
    terminal (a log file, a pipe) the same as a line every :data:`hadaconv.progress.LOG_EVERY`
    seconds, so a long run is never silent."""

    def __init__(self, enabled: bool, fraction: float = 0.0) -> None:
        self.bar = None
        self.lines = enabled and not console.is_terminal
        self.start = self.last = time.monotonic()
        self.first = fraction  # of the budget, spent before this bar (evaluations, a resumed run)
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("distill", total=1000, completed=int(1000 * fraction))
            self.bar.start()

    def update(self, fraction: float, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=int(1000 * min(1.0, fraction)), description=text)
        elif self.lines and (now := time.monotonic()) - self.last >= LOG_EVERY:
            self.last = now
            # The rate of this bar's own progress: the budget spent before it is not part of it.
            rate = (fraction - self.first) / max(now - self.start, 1e-9)
            left = f", about {duration((1 - fraction) / rate)} left" if rate > 0 and fraction < 1 else ""
            console.print(f"{text}, {duration(now - self.start)} elapsed{left}", highlight=False)

    def note(self, text: str) -> None:
        """A line that stays, printed above a live bar or between the periodic lines."""
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        elif self.lines:
            console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ------------------------------------------------------------------------------- distill


#: The integer options and their least values (None allowed where the default is None).
_AT_LEAST = {"sampled": 1, "samples": 2, "seq_len": 2, "batch_size": 1, "accumulate": 1, "warmup_steps": 0,
             "max_steps": 1, "max_tokens": 1, "local_steps": 1, "local_windows": 1, "eval_every": 1,
             "eval_windows": 1, "checkpoint_every": 1}
#: The number options: their least values, and whether the least itself is refused.
_NUMBERS = {"lr": (0, True), "local_lr": (0, True), "temperature": (0, True), "max_time": (0, True),
            "clip": (0, False), "hidden_weight": (0, False), "weight_decay": (0, False), "min_lr_ratio": (0, False)}
#: Flags whose command-line spelling is not ``--`` + the keyword.
FLAGS = {"warmup_steps": "--warmup", "stages": "--local / --global"}
#: The options only one stage reads (a run without that stage ignores them; the command line
#: refuses them, since a newcomer's --local --max-steps 5 ran 40 steps a block without a word).
STAGE_OPTIONS = {
    "global": ("lr", "warmup_steps", "min_lr_ratio", "weight_decay", "temperature", "hidden_weight", "max_steps",
               "max_tokens", "max_time", "accumulate", "gradient_checkpointing", "eval_every", "checkpoint_dir",
               "checkpoint_every"),
    "local": ("local_steps", "local_lr", "local_windows"),
}


def eval_text_windows(tokenizer, cfg: DistillConfig, windows: int | None = None) -> torch.Tensor:
    """The first ``windows`` (default ``cfg.eval_windows``) windows [N, seq_len] (int64) of the
    file ``cfg.eval_text`` (which :func:`check_config` found to be one).

    Raises:
        InputError: the text makes no window of ``cfg.seq_len`` tokens.
    """
    path = Path(cfg.eval_text)
    return text_windows(tokenizer, read_document(path), cfg.seq_len, windows or cfg.eval_windows,
                        what=f"the held-out text {path.name} ({option('eval_text')})")


def check_config(config: DistillConfig | None) -> DistillConfig:
    """``config``, or the default, once its values are ones the CLI's types would have let through
    (the Python API has no such types; a bad value must fail before minutes of sampling).

    Raises:
        InputError: not a DistillConfig, a value out of range or of the wrong type, a device that
            is none or not here, ``fsdp`` on one process or with the local stage, an
            ``eval_text`` that is not a file, or, without one, ``samples`` too few to hold a
            tenth out for evaluation.
    """
    if config is None:
        return DistillConfig()
    if not isinstance(config, DistillConfig):
        raise InputError(f"config must be a DistillConfig, got {type(config).__name__}")
    cfg = config
    if isinstance(cfg.data, (str, os.PathLike)):  # one source (as ConvertConfig.calib), not one per character
        cfg = replace(cfg, data=[cfg.data])
    if isinstance(cfg.max_time, str):
        raise InputError(f"{option('max_time', cfg.max_time)}: a number of seconds (the command line's --max-time "
                         "takes 90s, 30m, 2h, 1h30m)")
    if isinstance(cfg.stages, str) and cfg.stages in ("local", "global"):
        raise InputError(f"stages is a list of stages: stages=[{cfg.stages!r}], not stages={cfg.stages!r}")
    if isinstance(cfg.stages, str) or not cfg.stages or any(s not in ("local", "global") for s in cfg.stages):
        raise InputError(f"{option('stages', flag=FLAGS['stages'])} must be local and/or global, got {cfg.stages!r}")
    if cfg.train not in ("attention", "all"):
        raise InputError(f"{option('train', cfg.train)} is neither attention nor all")
    _check_trainable(resolve_dtype(cfg.dtype))  # said before the models load
    check_fields(cfg, _AT_LEAST, _NUMBERS, FLAGS)
    if cfg.eval_text is None and cfg.samples < HELDOUT_EVERY:  # said before the models load
        raise _no_heldout(cfg.samples, option("samples", cfg.samples))
    if cfg.device is not None:
        resolve_device(cfg.device)  # "gpu", or CUDA where there is none: said before two models load
    if cfg.fsdp and "local" in cfg.stages:
        raise InputError(f"the local stage trains whole blocks on one device; with {option('fsdp')} train the "
                         "global stage only")
    if cfg.fsdp and not several_processes():
        raise fsdp_needs_processes()
    if cfg.min_lr_ratio > 1:
        raise InputError(f"{option('min_lr_ratio')} must be at most 1 (a fraction of lr), got {cfg.min_lr_ratio!r}")
    if cfg.eval_text is not None and Path(cfg.eval_text).is_dir():
        raise InputError(f"{option('eval_text', cfg.eval_text)} is a folder: give one text file")
    if cfg.eval_text is not None and not Path(cfg.eval_text).is_file():
        raise InputError(f"{option('eval_text', cfg.eval_text)}: no such file{one_file_hint(cfg.eval_text)}")
    if cfg.eval_text is not None:
        read_document(cfg.eval_text)  # not UTF-8 (a binary named by mistake): refused before the models load
    return cfg


def _autocast(asked: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the forward passes run under bfloat16 autocast: as ``asked``, else where the device
    multiplies bfloat16 natively and the weights are float32 (bfloat16 weights gain nothing)."""
    return native_bf16(device) and dtype == torch.float32 if asked is None else asked


def _check_trainable(dtype: torch.dtype | None, *, loaded: bool = True) -> None:
    """Refuse float16 weights (``dtype``; None: the checkpoint's own, not known yet): AdamW on
    them, with no float32 master copy and no loss scaling, diverges (see DistillConfig.dtype).
    ``loaded``: hadaconv loads the models (its ``dtype`` is the way out), else they may have come
    in memory, in float16 (on the command line hadaconv always loads them: ``--dtype auto`` on a
    float16 checkpoint)."""
    if dtype == torch.float16:
        loading = f"load them in float32 ({option('dtype', 'float32')}, the default)"
        way = loading if loaded else command(loading, "give them in float32 (student.float(), teacher.float(), "
                                                      "or dtype='float32' where hadaconv loads them)")
        raise InputError(f"float16 weights do not train here: AdamW's updates underflow and blow up without "
                         f"float32 master weights; {way}, whose forward passes {option('bf16')} runs in bfloat16")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    config: DistillConfig | None = None,
    *,
    adapter: Adapter | None = None,
    callback: Callable[[dict], None] | None = None,
) -> DistillReport:
    """Distill ``teacher`` into the converted ``student`` (trained in place; left in eval mode
    on CPU-or-its-device, holding the best state seen by the evaluation).

    Args:
        student: a converted model (its attention blocks hold HadamardProjections).
        teacher: the original model; frozen, eval mode.
        tokenizer: tokenizes the training and evaluation text.
        config: options, ``DistillConfig()`` by default.
        adapter: overrides the automatic adapter choice (for ``--target`` conversions).
        callback: called after every optimizer step with ``{step, tokens, loss, lr, seconds}``
            (logging; raising in it stops the run, as an interruption would).
    Under ``torchrun`` every rank calls this with the same arguments.

    Raises:
        InputError: a student or teacher that is not an ``nn.Module``, a teacher that is the
            student or holds converted layers, the config given where
            the tokenizer goes, a ``config`` value out of range or options that do not go
            together (:func:`check_config`: FSDP with the local stage or on one process),
            too few windows to hold any out for evaluation, or float16 weights.
        HadaconvError: no tokenizer, a model that is neither a causal LM nor a text encoder, or a
            student with no converted blocks.
    """
    check_module(student, "student")
    check_module(teacher, "teacher")
    if teacher is student or any(isinstance(m, HadamardProjection) for m in teacher.modules()):
        what = "the student itself" if teacher is student else "a converted model (it holds HadamardProjections)"
        raise InputError(f"the teacher is {what}: give the original model, from before the conversion")
    if isinstance(tokenizer, DistillConfig):
        raise InputError("the config was given where the tokenizer goes: distill(student, teacher, tokenizer, config)")
    cfg = check_config(config)
    _check_trainable(next(student.parameters()).dtype, loaded=False)  # before the text
    stages = sorted(dict.fromkeys(cfg.stages), key=("local", "global").index)
    if tokenizer is None:
        raise HadaconvError("distillation needs a tokenizer for its training text")
    kind = (adapter or find_adapter(teacher)).kind(teacher)
    if kind not in ("causal-lm", "encoder"):
        raise HadaconvError(f"distill handles causal LMs and text encoders, not {indefinite(kind)} model")
    blocks = converted_blocks(student, teacher, adapter)
    if not blocks:
        raise HadaconvError("the student has no converted attention blocks: convert it first "
                            f"({command('hadaconv convert', 'hadaconv.convert.convert')})")
    if cfg.lr is None:
        cfg = replace(cfg, lr=default_lr(len(blocks), len((adapter or find_adapter(teacher)).layers(teacher))))

    d = setup(cfg.device)
    try:
        return _run(student, teacher, tokenizer, cfg, stages, kind, blocks, d, callback)
    finally:
        d.close()


def _steadier(cfg: DistillConfig, windows: int) -> str:
    """What gives the evaluation :data:`STEADY_EVAL_WINDOWS` windows: a longer eval text, more
    --samples (a tenth is held out) where the text had more to give, else more text."""
    if cfg.eval_text:
        return f"{option('eval_text')} with {STEADY_EVAL_WINDOWS} or more windows"
    if windows >= cfg.samples:
        return f"{option('samples', STEADY_EVAL_WINDOWS * HELDOUT_EVERY)} or more"
    return f"more text, or {option('eval_text')} with {STEADY_EVAL_WINDOWS} or more windows"


def _no_heldout(windows: int, limit: str) -> InputError:
    return InputError(f"no window is held out for evaluation from {counted(windows, 'training window')} ({limit}): "
                      f"give {option('samples', HELDOUT_EVERY)} or more and the text for them ({option('sampled')} or "
                      f"{option('data')}), or {option('eval_text')}")


def _budget_words(horizon: dict) -> str:
    """A run's budget (:meth:`_Distillation._budget`) in words: '20 steps', '10 min 00 s'."""
    said = {"steps": lambda v: counted(int(v), "step"), "tokens": lambda v: f"{int(v):,} tokens", "seconds": duration}
    return ", ".join(said[k](v) for k, v in horizon.items() if k in said) or "none"


def _objective(metric: str, cfg: DistillConfig) -> str:
    """The training loss in words, where it is not the held-out measure itself ("": it is)."""
    encoder = metric != "perplexity"
    if not encoder and not cfg.hidden_weight and cfg.temperature == 1:
        return ""  # the KL to the teacher, the held-out measure
    main = "relative hidden-state MSE + 1 - embedding cosine" if encoder else \
        f"KL to teacher at temperature {cfg.temperature:g}" if cfg.temperature != 1 else "KL to teacher"
    return main + (f" + {cfg.hidden_weight:g} x per-layer hidden-state MSE" if cfg.hidden_weight else "")


def _run(student, teacher, tokenizer, cfg: DistillConfig, stages: list[str], kind: str, blocks: list[str],
         d: Dist, callback) -> DistillReport:
    if cfg.batch_size % (d.world * cfg.accumulate):
        raise HadaconvError(f"batch_size {cfg.batch_size} must be divisible by processes x accumulate = "
                            f"{d.world * cfg.accumulate}")
    torch.manual_seed(cfg.seed)
    train, eval_ids, report = _texts(teacher, tokenizer, cfg, kind, stages, d.main)
    run = _Distillation(student, teacher, cfg, blocks, d, eval_ids, report)
    resumed = run.begin()
    if "local" in stages and not resumed:
        run.local_stage(train)
    if "global" in stages:
        run.global_stage(train, resumed, callback)
    else:
        report.after, report.loss_after = run.initial_eval()
    return run.finish()


def _trains_on(path: str, data: Sequence[str]) -> bool:
    """Whether the file ``path`` is one of the ``data`` sources, or inside a folder of them."""
    target = Path(path).resolve()
    return any(same_file(path, d) or Path(d).is_dir() and Path(d).resolve() in target.parents for d in data)


def _budget_waits(cfg: DistillConfig) -> str:
    """What the sampling line says of a time budget: a newcomer's --max-time 90 sat 14 minutes
    in a sampling whose line they took for the run's."""
    if cfg.max_time is None:
        return ""
    return f"{option('max_time')} ({duration(cfg.max_time)}) counts training only, which starts after it"


def _texts(teacher, tokenizer, cfg: DistillConfig, kind: str, stages: list[str],
           main: bool) -> tuple[torch.Tensor, torch.Tensor, DistillReport]:
    """The training windows, the held-out windows, and a report that names both."""
    check_seq_len(teacher, cfg.seq_len)
    # Sequences past --samples would make windows the run never reads (a newcomer's --samples 32
    # sampled 512, for 18 minutes).
    if cfg.sampled > cfg.samples and SAMPLE in (cfg.data or default_sources(kind)) and cfg.progress and main:
        console.print(f"note: {option('sampled', cfg.sampled)} is more than the {cfg.samples} windows the run "
                      f"reads ({option('samples')}): {cfg.samples} are sampled", highlight=False)
    texts, names = calibration_texts(teacher, tokenizer, cfg.data, samples=min(cfg.sampled, cfg.samples),
                                     seq_len=cfg.seq_len, progress=cfg.progress and main,
                                     count_option="sampled" if cfg.sampled <= cfg.samples else "samples",
                                     waiting=_budget_waits(cfg))
    train, heldout, windows = mixed_windows(tokenizer, texts, samples=cfg.samples, seq_len=cfg.seq_len,
                                            what="training text", names=names)
    data_source = describe_sources(names, windows)
    if cfg.eval_text:
        if _trains_on(cfg.eval_text, cfg.data or ()) and cfg.progress and main:
            console.print(f"note: the held-out text {option('eval_text', cfg.eval_text)} is also training text "
                          f"({option('data')}): the state kept is chosen on text the run trains on", highlight=False)
        eval_ids, eval_source = eval_text_windows(tokenizer, cfg), Path(cfg.eval_text).name
    else:
        eval_ids, eval_source = heldout[: cfg.eval_windows], "held-out windows of the training text"
    if len(eval_ids) == 0:
        # Name the limit that bit: the --samples asked for, or the text, which made fewer windows.
        short = (option("samples", cfg.samples) if len(train) >= cfg.samples else
                 f"the text makes only {counted(len(train), 'window')} of {cfg.seq_len} tokens")
        raise _no_heldout(len(train), short)
    if len(train) < cfg.batch_size:
        raise HadaconvError(f"only {counted(len(train), 'training window')} for a batch of {cfg.batch_size}: give more text")
    if len(eval_ids) < min(STEADY_EVAL_WINDOWS, cfg.eval_windows) and cfg.progress and main:
        console.print(f"[yellow]the distilled state is chosen on {counted(len(eval_ids), 'held-out window')} of "
                      f"{cfg.seq_len} tokens, a noisy choice: {_steadier(cfg, len(train) + len(heldout))} steadies "
                      "it[/]", highlight=False)
    report = DistillReport(kind=kind, metric="perplexity" if kind == "causal-lm" else "embedding cosine",
                           eval_loss=SELECTED_BY[kind], stages=stages, train=cfg.train, eval_source=eval_source,
                           data_source=data_source, train_windows=len(train), eval_windows=len(eval_ids),
                           seq_len=cfg.seq_len)
    return train, eval_ids, report


class _Distillation:
    """One run's state: the models, the optimizer, the step and token counters, the state
    closest to the teacher so far, the checkpoint folder.  :func:`_run` calls the stages in
    order; each is a method."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, blocks: list[str], d: Dist,
                 eval_ids: torch.Tensor, report: DistillReport) -> None:
        # The clock of max_time starts here: the text is sampled once per model (sequences convert
        # has not cached take minutes on a CPU), which must not eat the training budget.
        self.start = time.perf_counter()
        self.student, self.teacher, self.cfg, self.blocks, self.d, self.report = student, teacher, cfg, blocks, d, report
        self.kind, self.main = report.kind, d.main
        teacher.eval().to(d.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        student.to(d.device)
        report.trainable_params = _select_trainable(student, blocks, cfg.train)
        report.lr = cfg.lr
        self.use_amp = _autocast(cfg.bf16, d.device, next(student.parameters()).dtype)
        report.world_size, report.autocast = d.world, "bfloat16" if self.use_amp else "off"
        report.objective = _objective(report.metric, cfg)
        if cfg.gradient_checkpointing and "global" in cfg.stages:  # the local stage would train with dropout on
            if not hasattr(student, "activation_checkpointing_enable"):  # transformers' name since 5.x
                raise HadaconvError(f"{option('gradient_checkpointing')} needs a Hugging Face model")
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            student.train()  # Hugging Face only checkpoints in train mode
        else:
            student.eval()  # no dropout: the student should match the teacher's deterministic output
        # A student whose residual stream convert rotated: its hidden states are the teacher's
        # times Q, which the hidden-state loss undoes; the local stage's records (the teacher's
        # normed block inputs) cannot be, the norm weights having moved into the readers.
        self.rotation = stream_rotation(student, teacher) if cfg.hidden_weight else None
        if is_rotated(student) and "local" in report.stages:
            raise HadaconvError("the local stage trains each block on the teacher's own block inputs, and this "
                                "student's residual stream is rotated (convert's default): distill it with the "
                                "global stage alone, or convert it with --no-rotate")
        self.micro = cfg.batch_size // (d.world * cfg.accumulate)
        self.evaluate = _Evaluator(self.kind, teacher, eval_ids, d.device, batch_size=min(4, self.micro))
        # Wrap before the optimizer exists: FSDP2 replaces the parameters by sharded DTensors.
        self.model = wrap(student, d, cfg.fsdp) if "global" in report.stages else student
        if cfg.fsdp:
            shard(teacher, d)
        # The fused AdamW updates every tensor in one pass: 3x faster than the per-tensor loop for
        # SmolLM2's 135M parameters on 2 Xeon cores (benchmarks/bench_distill_step.py).
        self.opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, fused=d.device.type in ("cpu", "cuda") or None)
        self.folder = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.step = self.tokens = 0
        self.elapsed_before = 0.0  # seconds spent by earlier, interrupted runs
        self.trained: float | None = None  # seconds when the global stage ended (before its checkpoint)
        self.best: dict | None = None
        self.best_loss = math.inf
        self.written: tuple[int, int] | None = None  # (step, evaluations) of the last checkpoint written
        self.horizon: dict[str, float] = {}
        self.resumed_horizon: dict | None = None  # the budget of the run a checkpoint came from

    def autocast(self):
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.use_amp)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def begin(self) -> bool:
        """Resume from the checkpoint (True), or measure the teacher and the student as they
        come in (False)."""
        resumed = None
        if self.folder is not None and self.cfg.resume:
            resumed = ckpt.load_checkpoint(self.folder, model=self.student, optimizer=self.opt,
                                           fingerprint=self.cfg.fingerprint(), flags=FLAGS)
        if resumed is None:
            self.report.teacher = self.evaluate(self.teacher)[0]
            self.report.before, self.report.loss_before = self.evaluate(self.student)
            return False
        c = resumed["counters"]
        self.step, self.tokens, self.elapsed_before, self.best_loss = c["step"], c["tokens"], c["elapsed"], c["best_loss"]
        self.best = resumed["best"]
        self.evaluate.seconds = c.get("eval_seconds")  # out_of_time's estimate until this run evaluates
        self.resumed_horizon = c.get("horizon")  # None from a checkpoint written before it was kept
        if self.cfg.progress and self.main:  # a resumed run must say so: its budget is partly spent
            console.print(f"resuming from the checkpoint in {self.folder}: step {self.step:,}, {self.tokens:,} tokens, "
                          f"{duration(self.elapsed_before)} trained", highlight=False)
        for k, v in resumed["record"].items():
            setattr(self.report, k, v)
        return True

    def initial_eval(self) -> tuple[float, float]:
        """(metric, eval loss) of the state the global stage starts from."""
        r = self.report
        kept = "local" in r.stages and r.local_kept
        return (r.after_local, r.loss_after_local) if kept else (r.before, r.loss_before)

    def local_stage(self, train: torch.Tensor) -> None:
        """Block reconstruction on a few windows; undone whole if the held-out distance to the
        teacher rose (the per-block errors it lowers do not always carry to the whole model)."""
        cfg, d, r = self.cfg, self.d, self.report
        pick = torch.linspace(0, len(train) - 1, min(cfg.local_windows, len(train))).round().long().unique()
        bs = max(d.world, min(cfg.batch_size, len(pick)) // d.world * d.world)
        start_state = [(p, p.detach().clone()) for name in self.blocks
                       for p in self.student.get_submodule(name).parameters()]

        def run_teacher(ids: torch.Tensor) -> None:
            with self.autocast():
                forward(self.teacher, ids, self.kind)

        results = reconstruct_blocks(self.student, self.teacher, self.blocks, train[pick], run_teacher,
                                     batch_size=bs, steps=cfg.local_steps, lr=cfg.local_lr, clip=cfg.clip, d=d,
                                     autocast=self.autocast)
        r.local, r.local_steps = [asdict(x) for x in results], cfg.local_steps
        r.after_local, r.loss_after_local = self.evaluate(self.student)
        if not r.loss_after_local <= r.loss_before:  # NaN is worse
            with torch.no_grad():
                for p, p0 in start_state:
                    p.copy_(p0)
            r.local_kept = False

    def global_stage(self, train: torch.Tensor, resumed: bool, callback) -> None:
        """End-to-end KD until the budget is spent, evaluating every ``eval_every`` steps; the
        student ends in the evaluated state closest to the teacher."""
        cfg = self.cfg
        self.horizon = self._budget(len(train))
        if resumed and self.resumed_horizon not in (None, self.horizon) and cfg.progress and self.main:
            # The schedule is a function of the share of the budget spent, so a new budget bends it.
            console.print(f"note: the budget is not the interrupted run's ({_budget_words(self.resumed_horizon)} "
                          f"then, {_budget_words(self.horizon)} now): the learning rate follows this run's from here",
                          highlight=False)
        if not resumed:  # the starting point competes for "best" too
            self.consider(self.initial_eval(), None)
        bar = _Bar(cfg.progress and self.main, self.spent())
        if self.evaluate.seconds is not None:  # not known to a resumed run, which has not evaluated yet
            took = duration(self.evaluate.seconds)
            took = took if took.startswith("under") else f"about {took}"
            bar.note(f"each evaluation on {counted(len(self.evaluate.windows), 'held-out window')} takes {took}: "
                     f"every {counted(cfg.eval_every, 'step')} (inside the budget) "
                     "and at the last step")
        perms: dict[int, torch.Tensor] = {}
        last_loss: float | None = None
        tick, tick_tokens, steps_here, step_seconds = time.perf_counter(), self.tokens, 0, 0.0
        try:
            while (fraction := self.spent()) < 1.0 and not self.out_of_time(
                    step_seconds / steps_here if steps_here else None):
                ids = self.d.shard(train[_batch_indices(self.step, cfg.batch_size, len(train), cfg.seed, perms)])
                began, evaluated = self.elapsed(), 0.0
                last_loss, lr = self.train_step(ids.to(self.d.device), fraction)
                rate = (self.tokens - tick_tokens) / max(1e-9, time.perf_counter() - tick)
                bar.update(self.spent(), f"distill step {self.step} loss {last_loss:.4f} {rate:,.0f} tok/s")
                if self.step % cfg.eval_every == 0:
                    self.consider(self.evaluate(self.student), last_loss)
                    evaluated = self.evaluate.seconds or 0.0
                    bar.note(_evaluation_line(self.report))
                if self.step % cfg.checkpoint_every == 0:
                    self._checkpoint(bar)
                # A step's cost includes its share of checkpoint writes; out_of_time adds an evaluation.
                steps_here, step_seconds = steps_here + 1, step_seconds + self.elapsed() - began - evaluated
                if callback is not None:
                    callback({"step": self.step, "tokens": self.tokens, "loss": last_loss, "lr": lr,
                              "seconds": self.elapsed()})
        finally:
            bar.close()
        if self.report.curve[-1]["step"] != self.step:
            self.consider(self.evaluate(self.student), last_loss)
            bar.note(_evaluation_line(self.report))
        self.trained = self.elapsed()  # what --max-time bounds; the checkpoint write below is not training
        self._checkpoint(bar)
        self._keep_best()

    def _checkpoint(self, bar: "_Bar") -> None:
        """Write the checkpoint and say where, with its size (rank 0; nothing without a folder),
        unless the last one written holds this state already (the same step and evaluations)."""
        state = (self.step, len(self.report.curve))
        if state == self.written:
            return
        self.written = state
        if written := self.save():
            bar.note(f"checkpoint at step {self.step}: {written} ({written.stat().st_size / 1e9:,.3g} GB)")

    def _budget(self, n_train: int) -> dict[str, float]:
        cfg = self.cfg
        if cfg.max_steps is None and cfg.max_tokens is None and cfg.max_time is None:
            steps = max(1, n_train // cfg.batch_size)  # one pass over the data
            if cfg.progress and self.main:  # on a CPU that can take hours: say so before it starts
                budgets = " / ".join(option(name) for name in ("max_time", "max_steps", "max_tokens"))
                console.print(f"no budget given ({budgets}): one pass over {n_train:,} "
                              f"windows, {steps:,} steps of {cfg.batch_size}", highlight=False)
            return {"steps": steps}
        return {k: v for k, v in (("steps", cfg.max_steps), ("tokens", cfg.max_tokens),
                                  ("seconds", cfg.max_time)) if v is not None}

    def spent(self) -> float:
        """The fraction of the budget spent, as rank 0 sees it (clocks differ between ranks, and
        every rank must use the same learning rate and stop at the same step)."""
        now = {"steps": self.step, "tokens": self.tokens, "seconds": self.elapsed()}
        mine = max(now[k] / max(v, 1e-9) for k, v in self.horizon.items())
        return self.d.sum(mine if self.main else 0.0)

    def out_of_time(self, step_seconds: float | None) -> bool:
        """Whether one more step of ``step_seconds`` (the mean so far; None before the first, which
        always runs) and the evaluation that follows it (the periodic one or the closing one)
        would end past ``max_time``: the budget is when the run ends, not the last moment a step
        may start (a CPU step of SmolLM2 takes 4-8 s).  Decided on rank 0, like :meth:`spent`."""
        if self.cfg.max_time is None or step_seconds is None:  # the same on every rank: they step together
            return False
        ends = self.elapsed() + step_seconds + (self.evaluate.seconds or 0.0)
        return self.d.any(self.main and ends > self.cfg.max_time)

    def train_step(self, ids: torch.Tensor, fraction: float) -> tuple[float, float]:
        """One optimizer step on this rank's windows; (the global mean loss, the learning rate)."""
        cfg = self.cfg
        total = 0.0
        for j in range(cfg.accumulate):
            chunk = ids[j * self.micro:(j + 1) * self.micro]
            with no_sync(self.model, j == cfg.accumulate - 1):
                loss = self._loss(chunk)
                # Each micro-batch's share of the global mean; DDP averages over ranks.
                (loss * (self.micro * self.d.world / cfg.batch_size)).backward()
            total += loss.item() * self.micro / cfg.batch_size
        lr = cfg.lr * _lr_factor(self.step, fraction, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad], cfg.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.batch_size * cfg.seq_len
        return self.d.sum(total), lr

    def _loss(self, chunk: torch.Tensor) -> torch.Tensor:
        hidden = self.cfg.hidden_weight > 0
        with torch.no_grad(), self.autocast():
            t_out = forward(self.teacher, chunk, self.kind, hidden=hidden)
        with self.autocast():
            s_out = forward(self.model, chunk, self.kind, hidden=hidden)
            loss = kl_loss(s_out.main, t_out.main, self.cfg.temperature) if self.kind == "causal-lm" \
                else encoder_loss(s_out.main, t_out.main)
            if hidden:
                loss = loss + self.cfg.hidden_weight * hidden_loss(s_out.hidden, t_out.hidden, self.rotation)
        return loss

    def consider(self, evaluation: tuple[float, float], train_loss: float | None) -> None:
        """Record an evaluation and keep the state if it is the closest to the teacher so far."""
        metric, loss = evaluation
        self.report.curve.append({"step": self.step, "tokens": self.tokens, "seconds": self.elapsed(),
                                  "metric": metric, "eval_loss": loss, "train_loss": train_loss})
        if self.best is None or loss < self.best_loss:  # the first state is kept whatever it measured
            # A NaN evaluation (a diverged or overflowing state) stays best only until a finite one.
            self.best_loss, self.report.best_step = (loss if not math.isnan(loss) else math.inf), self.step
            self.best = ckpt.trainable_state(self.student)

    def save(self) -> Path | None:
        """Write the checkpoint; its path on the rank that writes it (rank 0), else None."""
        if self.folder is None:
            return None
        record = {k: getattr(self.report, k) for k in ("teacher", "before", "after_local", "local_kept", "local_steps",
                                                       "local", "curve", "best_step", "loss_before",
                                                       "loss_after_local")}
        ckpt.save_checkpoint(self.folder, model=self.student, optimizer=self.opt, best=self.best, record=record,
                             counters={"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed(),
                                       "best_loss": self.best_loss, "eval_seconds": self.evaluate.seconds,
                                       "horizon": dict(self.horizon)},
                             fingerprint=self.cfg.fingerprint(), main=self.main)
        self.d.barrier()
        return self.folder / ckpt.FILE if self.main else None

    def _keep_best(self) -> None:
        r = self.report
        if r.best_step != self.step:
            ckpt.restore_trainable(self.student, self.best, from_rank0=self.cfg.fsdp)
        kept = next(p for p in r.curve if p["step"] == r.best_step)
        r.after, r.loss_after = kept["metric"], kept["eval_loss"]

    def finish(self) -> DistillReport:
        """Counters into the report; the student back in eval mode with every gradient on."""
        r, cfg = self.report, self.cfg
        r.steps, r.tokens = self.step, self.tokens
        r.seconds = self.trained if self.trained is not None else self.elapsed()
        if cfg.fsdp:  # a collective: every rank gathers, rank 0 receives
            r.full_state = ckpt.trainable_state(self.student)
        self.student.eval()
        if getattr(self.student, "is_activation_checkpointing", False):
            self.student.activation_checkpointing_disable()
        for p in self.student.parameters():
            p.requires_grad_(True)
        return r
