"""``distill_file``: what ``hadaconv distill CONVERTED -o OUT`` does, folder to folder."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import nn

from hadaconv.atomic import atomic_file, check_not_input, check_output
from hadaconv.distill.checkpoint import FILE as CHECKPOINT, check_settings
from hadaconv.distill.core import FLAGS, DistillConfig, DistillReport, check_config, distill, eval_text_windows
from hadaconv.distill.parallel import is_main
from hadaconv.errors import HadaconvError, InputError, ModelFormatError, check_path, command, option
from hadaconv.io import check_format, check_model_config, original_path, same_file
from hadaconv.io.files import converted_meta, read_json
from hadaconv.nn import HadamardProjection
from hadaconv.progress import console

__all__ = ["distill_file", "plot_curve"]


def _teacher(converted: Path, meta: dict, teacher: str | os.PathLike | None) -> tuple[Path, bool]:
    """The teacher: as given, else the original the conversion recorded; and whether it is that
    recorded original (whose recorded config it then takes)."""
    if teacher is None:
        try:
            return original_path(converted, meta), True
        except HadaconvError as exc:
            raise HadaconvError(f"{exc}: give the original with {option('teacher', 'PATH')}") from None
    if not Path(teacher).exists():
        raise HadaconvError(f"the teacher {teacher}: no such file or folder (give the original model)")
    try:
        recorded = original_path(converted, meta)
    except HadaconvError:  # none recorded, or gone: the given teacher is another model
        recorded = None
    return Path(teacher), same_file(teacher, recorded)


def _conversion_report(path: Path) -> dict:
    """The converted folder's report (``report.json``), which the distilled folder's extends;
    empty where it is missing, damaged or not a JSON object (an untrusted file)."""
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except ModelFormatError as exc:
        if is_main():  # every rank reads it
            console.print(f"[yellow]warning: the conversion's report is not carried over: {exc}[/yellow]",
                          highlight=False)
        return {}


def _check_eval_text_early(converted: Path, cfg: DistillConfig) -> None:
    """Refuse an ``eval_text`` too short for one window before the two models load, tokenized
    with the converted folder's tokenizer (a text of more bytes than a window holds at
    :data:`hadaconv.calibrate.MAX_TOKEN_BYTES` a token is not read twice)."""
    from hadaconv.calibrate import MAX_TOKEN_BYTES
    from hadaconv.io import source_tokenizer

    if not cfg.eval_text or Path(cfg.eval_text).stat().st_size > cfg.seq_len * MAX_TOKEN_BYTES:
        return
    tokenizer = source_tokenizer(converted)
    if tokenizer is not None:
        eval_text_windows(tokenizer, cfg, windows=1)


def _plot_beside(report: DistillReport, path: Path) -> None:
    """:func:`plot_curve` into the folder being saved; a plot that fails (a font, a backend) is
    said and skipped: the curve must not cost the distilled model."""
    try:
        plot_curve(report, path)
    except Exception as exc:  # noqa: BLE001 - whatever matplotlib raises
        path.unlink(missing_ok=True)
        console.print(f"[yellow]note: no {path.name}: plotting failed ({type(exc).__name__}: {exc})[/]",
                      highlight=False)


def plot_curve(report: DistillReport, path: str | os.PathLike) -> bool:
    """Plot the eval metric and the eval loss that chooses the kept state (second axis) against
    training tokens as a PNG, the kept state ringed; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    tokens = [p["tokens"] for p in report.curve]
    ax.plot(tokens, [p["metric"] for p in report.curve], marker="o", label=f"student {report.metric}")
    if report.teacher is not None:
        ax.axhline(report.teacher, color="gray", linestyle="--", label="teacher")
    ax2 = ax.twinx()
    ax2.plot(tokens, [p["eval_loss"] for p in report.curve], color="tab:orange", marker=".", label=report.eval_loss)
    ax2.set_ylabel(report.eval_loss)
    kept = [p for p in report.curve if p["step"] == report.best_step]
    ax2.plot([p["tokens"] for p in kept], [p["eval_loss"] for p in kept], "o", markersize=12, markerfacecolor="none",
             color="black", label="kept")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(report.metric)
    ax.set_title(f"hadaconv distill ({'+'.join(report.stages)}, train {report.train})")
    lines = [h for a in (ax, ax2) for h in a.get_legend_handles_labels()[0]]
    ax.legend(lines, [h.get_label() for h in lines])
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True


def distill_file(
    converted: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: DistillConfig | None = None,
    *,
    teacher: str | os.PathLike | None = None,
    teacher_config: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
) -> DistillReport:
    """Distill the converted folder ``converted`` from its original and save the result to
    ``out_dir`` (the converted-folder format, its ``hadaconv`` section gaining a ``distill``
    entry; ``report.json`` gaining a ``distill`` section; ``distill_curve.png`` when matplotlib
    is installed).  Under torchrun every rank calls this; rank 0 writes.

    ``teacher`` (default: the source the conversion recorded) is read by
    :func:`hadaconv.io.load_model`, as ``convert`` read it: ``teacher_config`` (a config.json or
    its folder) only for a teacher of bare weights (``.safetensors``, a ``torch.save`` state
    dict; default for the recorded teacher: the config its conversion recorded),
    ``trust_pickle`` for a ``torch.save``d module.  Raises HadaconvError (one line)
    for bad input, before any model is loaded where it can be told from the files.
    """
    check_path(converted, "converted", "models in memory distill with hadaconv.distill.distill(student, teacher, "
                                       "tokenizer, config)")
    check_path(out_dir, "out_dir")
    cfg = check_config(config)
    job = _check_inputs(Path(converted), Path(out_dir), cfg, teacher, teacher_config, overwrite)
    saved = _conversion_report(job.converted / "report.json")  # read now: a damaged one must not fail the save
    student, original = _load_pair(job, cfg, trust_pickle)
    tokenizer = student.tokenizer or original.tokenizer
    report = _train(job, cfg, student.model, original.model, tokenizer)
    if is_main():
        _save(job, cfg, report, student.model, tokenizer, saved, overwrite)
    return report


@dataclass
class _Job:
    """What the checks found before any model loads: the folders, the converted folder's
    ``hadaconv`` section, the teacher and its config (and how the caller names that option)."""

    converted: Path
    out: Path
    meta: dict
    source: Path
    teacher_config: str | os.PathLike | None
    config_flag: str


def _check_inputs(converted: Path, out: Path, cfg: DistillConfig, teacher, teacher_config,
                  overwrite: bool) -> _Job:
    """Stage 1: every refusal the files allow before the two models load (minutes for a real
    pair): the converted folder, the teacher, the output and checkpoint folders, the texts."""
    from hadaconv.calibrate import check_sources, check_windows_early, source_list
    from hadaconv.io import check_seq_len_early, recorded_config

    meta = _conversion_section(converted)
    source, recorded = _teacher(converted, meta, teacher)
    config_flag = option("teacher_config", flag="--config")
    if teacher_config is None and recorded:
        teacher_config = recorded_config(meta, config_flag)  # the recorded original's recorded config, if any
    check_format(source, whose="the teacher", flag=config_flag)  # a text file given as --teacher: before any load
    check_model_config(source, teacher_config, whose="the teacher", flag=config_flag)
    inputs = [converted, source, teacher_config, cfg.eval_text, *source_list(cfg.data)]
    check_output(out, overwrite, folder=True, inputs=inputs)
    _check_checkpoints(cfg, out, inputs)
    # A mistyped --data path, or an empty file, fails here, not after two models are loaded.
    check_sources(cfg.data, "training text", samples=cfg.samples, data_free=False)
    check_windows_early(converted, cfg.data, samples=cfg.samples, seq_len=cfg.seq_len, what="training text")
    _check_eval_text_early(converted, cfg)
    check_seq_len_early(source, cfg.seq_len, config=teacher_config, kinds=None)
    return _Job(converted, out, meta, source, teacher_config, config_flag)


def _conversion_section(converted: Path) -> dict:
    """The ``hadaconv`` section of the converted folder's config.json, or one line saying why
    ``converted`` is no converted folder."""
    from hadaconv.io.converted import refuse_bundle

    if not converted.exists():
        raise HadaconvError(f"no such file or folder: {converted}")
    refuse_bundle(converted)
    config_path = converted / "config.json"
    meta = converted_meta(config_path)
    if meta is None:
        raise HadaconvError(f"{converted} is not a converted hadaconv folder: convert the model first "
                            f"({command('hadaconv convert', 'hadaconv.convert_file')})")
    return meta


def _check_checkpoints(cfg: DistillConfig, out: Path, inputs: list) -> None:
    """Refuse a checkpoint folder inside an input or inside the output (the final save would
    delete it), and one holding an earlier run's checkpoint without ``resume``."""
    if not cfg.checkpoint_dir:
        return
    check_not_input(cfg.checkpoint_dir, inputs, name=option("checkpoint_dir"))
    checkpoints = Path(cfg.checkpoint_dir).resolve()
    if checkpoints.exists() and not checkpoints.is_dir():  # found at the first checkpoint, steps of training late
        raise InputError(f"{option('checkpoint_dir', cfg.checkpoint_dir)} is a file, not a folder for the checkpoints")
    if not cfg.resume and (checkpoints / CHECKPOINT).is_file():  # hours of training, maybe
        raise InputError(f"{cfg.checkpoint_dir} holds the checkpoint of an earlier run, which this run would replace: "
                         f"add {option('resume', True)} to continue it, or remove it to start over")
    if out.resolve() in (checkpoints, *checkpoints.parents):
        raise InputError(f"{option('checkpoint_dir', cfg.checkpoint_dir)} is inside the output {out}, which the final "
                         "save replaces: keep the checkpoints elsewhere")
    if cfg.resume:  # another run's settings, said before the load and the sampled text, not after
        check_settings(checkpoints, cfg.fingerprint(), FLAGS)


def _load_pair(job: _Job, cfg: DistillConfig, trust_pickle: bool):
    """Stage 2: (the student, the teacher) as :class:`hadaconv.io.Loaded`, checked to be a
    converted model and the original of its kind."""
    from hadaconv.io import load_model

    student = load_model(job.converted, dtype=cfg.dtype)
    if not any(isinstance(m, HadamardProjection) for m in student.model.modules()):
        raise HadaconvError(f"{job.converted} has no converted layers: nothing to distill")
    original = load_model(job.source, config=job.teacher_config, trust_pickle=trust_pickle, dtype=cfg.dtype,
                          config_option=job.config_flag)
    if original.format == "hadaconv":
        raise HadaconvError(f"the teacher {job.source} is itself a converted model: give the original")
    if type(original.model) is not type(student.model):
        raise HadaconvError(f"the teacher is a {type(original.model).__name__}, the student a "
                            f"{type(student.model).__name__}: give the model {job.converted} was converted from")
    return student, original


def _train(job: _Job, cfg: DistillConfig, student: nn.Module, teacher: nn.Module, tokenizer) -> DistillReport:
    """Stage 3: :func:`distill`, with the teacher's sampled text recorded under its files' key."""
    from hadaconv.adapters import find_adapter
    from hadaconv.device import resolve_device
    from hadaconv.io import source_key
    from hadaconv.sample import reading_source

    target = job.meta.get("target")
    adapter = find_adapter(teacher, target) if target else None
    # The teacher samples; a default convert reads the checkpoint's dtype ("auto"), distill float32,
    # so a dry run finds a distillation's sampled text only where it named the same dtype.
    key = source_key(job.source, config=job.teacher_config, dtype=cfg.dtype, device=resolve_device(cfg.device).type)
    with reading_source(key):
        return distill(student, teacher, tokenizer, cfg, adapter=adapter)


def _save(job: _Job, cfg: DistillConfig, report: DistillReport, model: nn.Module, tokenizer, saved: dict,
          overwrite: bool) -> None:
    """Stage 4 (rank 0): the distilled model in the converted-folder format, its config's
    ``hadaconv`` section and ``report.json`` gaining a ``distill`` entry, the curve beside."""
    from hadaconv.io import save_converted

    if cfg.fsdp:  # the trained parameters are shards: put the full state into a fresh copy
        from hadaconv.distill.checkpoint import restore_trainable
        from hadaconv.io import load

        model = load(job.converted)
        restore_trainable(model, report.full_state)
    model.cpu()
    summary = {k: v for k, v in report.to_dict().items() if k not in ("curve", "local")}
    used = replace(cfg, lr=report.lr)  # the rate the run used, where the config left it to default_lr
    summary["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(used).items()}
    summary["teacher_path"] = str(job.source)
    if job.teacher_config is not None:
        summary["teacher_config"] = str(job.teacher_config)
    save_converted(model, job.out, meta={**job.meta, "distill": summary},
                   tokenizer=tokenizer, tokenizer_source=job.converted,
                   report={**saved, **report.report_json()}, overwrite=overwrite,
                   extra=lambda tmp: _plot_beside(report, tmp / "distill_curve.png"))
