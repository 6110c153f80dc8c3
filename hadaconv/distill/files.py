"""``distill_file``: what ``hadaconv distill CONVERTED -o OUT`` does, folder to folder."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

from hadaconv.atomic import atomic_file, check_not_input, check_output
from hadaconv.distill.checkpoint import FILE as CHECKPOINT
from hadaconv.distill.core import DistillConfig, DistillReport, check_config, distill, eval_text_windows
from hadaconv.distill.parallel import is_main
from hadaconv.errors import HadaconvError, InputError, ModelFormatError, command, option
from hadaconv.io import check_model_config, original_path, same_file
from hadaconv.io.files import read_json
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
    empty where it is missing, damaged or not a JSON object (an untrusted file: read with a
    size limit)."""
    if not path.is_file():
        return {}
    try:
        return read_json(path, limit=_REPORT_LIMIT)
    except ModelFormatError as exc:
        if is_main():  # every rank reads it
            console.print(f"[yellow]warning: the conversion's report is not carried over: {exc}[/yellow]",
                          highlight=False)
        return {}


#: A conversion's report.json is a few kB, its per-layer table included.
_REPORT_LIMIT = 64 << 20


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
    from hadaconv.calibrate import check_sources, check_windows_early, source_list
    from hadaconv.io import check_seq_len_early, load_model, recorded_config, save_converted, source_key
    from hadaconv.io.converted import refuse_bundle
    from hadaconv.device import resolve_device
    from hadaconv.sample import reading_source

    cfg = check_config(config)
    converted = Path(converted)
    out = Path(out_dir)
    if not converted.exists():
        raise HadaconvError(f"no such file or folder: {converted}")
    refuse_bundle(converted)
    config_path = converted / "config.json"
    meta = read_json(config_path).get("hadaconv") if config_path.is_file() else None
    if not isinstance(meta, dict):
        raise HadaconvError(f"{converted} is not a converted hadaconv folder: convert the model first "
                            f"({command('hadaconv convert', 'hadaconv.convert_file')})")
    source, recorded = _teacher(converted, meta, teacher)
    config_flag = option("teacher_config", flag="--config")
    if teacher_config is None and recorded:
        teacher_config = recorded_config(meta, config_flag)  # the recorded original's recorded config, if any
    check_model_config(source, teacher_config, whose="the teacher", flag=config_flag)
    inputs = [converted, source, teacher_config, cfg.eval_text, *source_list(cfg.data)]
    check_output(out, overwrite, folder=True, inputs=inputs)
    if cfg.checkpoint_dir:
        check_not_input(cfg.checkpoint_dir, inputs, name=option("checkpoint_dir"))
    checkpoints = Path(cfg.checkpoint_dir).resolve() if cfg.checkpoint_dir else None
    if checkpoints and not cfg.resume and (checkpoints / CHECKPOINT).is_file():  # hours of training, maybe
        raise InputError(f"{cfg.checkpoint_dir} holds the checkpoint of an earlier run, which this run would replace: "
                         f"add {option('resume', True)} to continue it, or remove it to start over")
    if checkpoints and out.resolve() in (checkpoints, *checkpoints.parents):  # the final save would delete them
        raise InputError(f"{option('checkpoint_dir', cfg.checkpoint_dir)} is inside the output {out}, which the final "
                         "save replaces: keep the checkpoints elsewhere")
    # A mistyped --data path, or an empty file, fails here, not after two models are loaded.
    check_sources(cfg.data, "training text", samples=cfg.samples)
    check_windows_early(converted, cfg.data, samples=cfg.samples, seq_len=cfg.seq_len, what="training text")
    _check_eval_text_early(converted, cfg)
    check_seq_len_early(source, cfg.seq_len, config=teacher_config, kinds=None)  # before two models load
    saved = _conversion_report(converted / "report.json")  # read now: a damaged one must not fail the save
    student = load_model(converted, dtype=cfg.dtype)
    if not any(isinstance(m, HadamardProjection) for m in student.model.modules()):
        raise HadaconvError(f"{converted} has no converted layers: nothing to distill")
    original = load_model(source, config=teacher_config, trust_pickle=trust_pickle, dtype=cfg.dtype,
                          config_option=config_flag)
    if original.format == "hadaconv":
        raise HadaconvError(f"the teacher {source} is itself a converted model: give the original")
    if type(original.model) is not type(student.model):
        raise HadaconvError(f"the teacher is a {type(original.model).__name__}, the student a "
                            f"{type(student.model).__name__}: give the model {converted} was converted from")
    tokenizer = student.tokenizer or original.tokenizer

    from hadaconv.adapters import find_adapter

    adapter = find_adapter(original.model, meta.get("target")) if meta.get("target") else None
    # The teacher samples; a default convert reads the checkpoint's dtype ("auto"), distill float32,
    # so a dry run finds a distillation's sampled text only where it named the same dtype.
    key = source_key(source, config=teacher_config, dtype=cfg.dtype, device=resolve_device(cfg.device).type)
    with reading_source(key):
        report = distill(student.model, original.model, tokenizer, cfg, adapter=adapter)

    if not is_main():
        return report
    model = student.model
    if cfg.fsdp:  # the trained parameters are shards: put the full state into a fresh copy
        from hadaconv.distill.checkpoint import restore_trainable
        from hadaconv.io import load

        model = load(converted)
        restore_trainable(model, report.full_state)
    model.cpu()
    summary = {k: v for k, v in report.to_dict().items() if k not in ("curve", "local")}
    used = replace(cfg, lr=report.lr)  # the rate the run used, where the config left it to default_lr
    summary["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(used).items()}
    summary["teacher_path"] = str(source)
    if teacher_config is not None:
        summary["teacher_config"] = str(teacher_config)
    saved["distill"] = report.to_dict()
    save_converted(model, out, meta={**meta, "distill": summary}, tokenizer=tokenizer,
                   tokenizer_source=converted, report=saved, overwrite=overwrite,
                   extra=lambda tmp: _plot_beside(report, tmp / "distill_curve.png"))
    return report
