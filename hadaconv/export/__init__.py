"""ONNX export of models holding hadaconv layers (or none: dense models export the same way).

:func:`export_onnx` traces the model with ``torch.onnx.export(..., dynamo=True)`` at standard
opset :data:`~hadaconv.export.translate.OPSET` (18), translates the ``hadaconv::*`` ops (to
``com.hadaconv::HadamardAffine``, or with ``portable=True`` to standard ops only), writes a
bundle (see :mod:`hadaconv.export.bundle`), validates it in ONNX Runtime against PyTorch and
only then moves it into place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hadaconv._version import __version__
from hadaconv.adapters import context_length as model_context
from hadaconv.errors import HadaconvError, check_module, check_number, indefinite, option
from hadaconv.export.bundle import (MODEL, FORMAT, VERSION, atomic_folder, io_description, label_names, positive_int,
                                    write_metadata)
from hadaconv.export.validate import DEFAULT_ATOL, DEFAULT_ATOL_FLOAT16, OutputDiff, default_atol, validate
from hadaconv.export.wrappers import Kind, detect_kind, make_spec, model_dtype, segment_types
from hadaconv.progress import status
from hadaconv.runtime import BFLOAT16_ON_CPU, OP_DOMAIN, get_library_path, session

__all__ = ["DEFAULT_ATOL", "DEFAULT_ATOL_FLOAT16", "DTYPES", "ExportResult", "check_options", "export_onnx"]

#: The precisions a graph can be exported in (names as on the command line).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: Path
    kind: str
    form: str
    diffs: list[OutputDiff] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # the metadata holds every input and output: too long to print
        worst = max((d.max_abs for d in self.diffs), default=None)
        checked = "not validated" if worst is None else f"{len(self.diffs)} outputs validated, max |diff| {worst:.2e}"
        return f"ExportResult(path={str(self.path)!r}, kind={self.kind!r}, form={self.form!r}, {checked})"


def _first_line(exc: BaseException) -> str:
    """The most telling line of an exporter error (its summary names the failing op)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("<class"):  # torch.onnx's "Exception summary" lines
            return ln.split(">:", 1)[-1].strip()[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def summarize(diffs: list[OutputDiff], atol: float) -> list[str]:
    """One line per output, except the cache: one line per step for all ``present.*`` (their worst);
    then the verdict (a newcomer read the differences and could not tell whether they passed).
    Only a passed validation is summarized: a failed one raised."""
    lines, presents = [], {}
    for d in diffs:
        if d.name.startswith("present."):
            worst = presents.get(d.step)
            presents[d.step] = (d if worst is None or d.max_abs > worst[0].max_abs else worst[0],
                                (worst[1] if worst else 0) + 1)
        else:
            lines.append(str(d))
    for step, (worst, count) in presents.items():
        lines.append(f"{worst}  (worst of {count} present.*)")
    if diffs:
        worst = max(diffs, key=lambda d: d.max_abs)
        lines.append(f"validation passed: {len(diffs)} outputs within atol {atol:g} of PyTorch (the worst "
                     f"{worst.max_abs:.3e}, {worst.name} at {worst.step})")
    return lines


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence the exporter's progress prints, warnings and registration log lines."""
    if verbose:
        yield
        return
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _as_dtype(model: nn.Module, dtype: str | torch.dtype | None) -> nn.Module:
    """``model`` in ``dtype``: itself when it already is, else a copy (the caller's model is
    never changed)."""
    if dtype is None:
        return model
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise HadaconvError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise HadaconvError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if model_dtype(model) == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _inputs_as(inputs: Any, dtype: torch.dtype) -> Any:
    """Floating example tensors (a tensor, tuple or dict) in the model's precision."""
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    if isinstance(inputs, dict):
        return {k: cast(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(cast(v) for v in inputs)
    return cast(inputs)


def _validate(spec, sess, model, original, original_inputs, tokenizer, atol, cache) -> list[OutputDiff]:
    """:func:`validate` against the right reference: the exported model itself, or for a float16
    export the model in float32 (PyTorch's CPU float16 is further from the truth than ONNX
    Runtime's; numbers in :mod:`hadaconv.export.validate`)."""
    precision = model_dtype(model)
    if precision != torch.float16:
        return validate(spec, sess, model, tokenizer, atol)
    reference = _as_dtype(original, torch.float32).eval()
    ref_spec = make_spec(reference, spec.kind, cache=cache, example_inputs=_inputs_as(original_inputs, torch.float32))
    return validate(ref_spec, sess, reference, tokenizer, atol, feed_dtype=precision)


def _token_id(tokenizer: Any, config: Any, name: str) -> Any:
    """The tokenizer's id, else the config's (``is None``: id 0 is a real token); None for the
    negative ids older configs use to mean "none" (LLaMA's ``pad_token_id: -1``)."""
    value = getattr(tokenizer, name, None)
    value = getattr(config, name, None) if value is None else value
    if isinstance(value, list):
        value = [v for v in value if isinstance(v, int) and v >= 0] or None
    return None if isinstance(value, int) and value < 0 else value


def _hadamard_layers(model: nn.Module) -> int:
    from hadaconv.nn import HadamardProjection

    return sum(isinstance(m, HadamardProjection) for m in model.modules())


def _write_genai(folder: Path, model: nn.Module, spec, meta: dict[str, Any]) -> str | None:
    """Write ``genai_config.json`` for a causal LM with the KV cache; its file name, or None."""
    from hadaconv.export.genai import GENAI_CONFIG, genai_config, write_genai_config

    if spec.kind != "causal-lm" or spec.cache is None or getattr(model, "config", None) is None:
        return None
    config = genai_config(model, spec.cache, library=meta["op_library"], position_ids=spec.cache["position_ids"],
                          eos_token_id=meta["eos_token_id"], pad_token_id=meta["pad_token_id"], model_file=MODEL)
    if config is None:
        return None
    write_genai_config(folder, config)
    return GENAI_CONFIG


def check_options(precision: torch.dtype, *, portable: bool = False, optimize: str | None = None,
                  validate_outputs: bool = True) -> None:
    """Refuse the option combinations :func:`export_onnx` cannot honour, for a graph of
    ``precision`` (torch.float32 / float16 / bfloat16); needs no model, so the CLI checks them
    before it loads one.

    Raises:
        HadaconvError: an unknown ``optimize`` level (or an onnxscript without it), ``optimize``
            with ``portable`` or with half precision, bfloat16 with ``validate_outputs``.
    """
    if optimize is not None:
        from hadaconv.export.fusions import check_level

        check_level(optimize)
    if optimize and portable:
        raise HadaconvError(f"{option('optimize')} fuses into ONNX Runtime's contrib ops; the portable form is standard ONNX "
                            "ops only: drop one of the two")
    if optimize and precision != torch.float32:
        raise HadaconvError(f"{option('optimize')} is measured and validated for float32 graphs only, not "
                            f"{str(precision).removeprefix('torch.')}: export float16 / bfloat16 without it")
    if precision == torch.bfloat16 and validate_outputs:
        raise HadaconvError(f"{BFLOAT16_ON_CPU}, so a bfloat16 export cannot be validated here: export with "
                            f"validation off ({option('validate_outputs', False, flag='--no-validate')}) for the CUDA execution provider, or use float16")


def export_onnx(
    model: nn.Module,
    out_dir: str | os.PathLike,
    example_inputs: Any = None,
    *,
    portable: bool = False,
    tokenizer: Any = None,
    kind: Kind | None = None,
    cache: bool = True,
    validate_outputs: bool = True,
    atol: float | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    optimize: str | None = None,
    source: str | None = None,
    verbose: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``model`` to an ONNX bundle in ``out_dir`` and validate it.

    Args:
        model: a Hugging Face causal LM or text encoder, or any ``nn.Module`` (with
            ``example_inputs``); with or without HadamardProjection layers.
        out_dir: the bundle folder; written atomically (nothing appears unless it validates).
        example_inputs: for generic modules: a tensor, a tuple of tensors or a dict of keyword
            tensors (every axis but the last is exported as dynamic where the model allows);
            refused for text models, which get token ids made for them.
        portable: standard ONNX ops only, instead of ``com.hadaconv::HadamardAffine``.
        tokenizer: saved into the bundle; also gives validation real text.
        kind: "causal-lm", "encoder", "classifier" or "module" (detected when None).
        cache: causal LMs: export the KV-cache inputs/outputs (False: logits only).
        validate_outputs: compare ONNX Runtime with PyTorch (``--no-validate`` turns it off).
        atol: the largest absolute difference accepted per output (None: DEFAULT_ATOL, or
            DEFAULT_ATOL_FLOAT16 for half-precision exports; see :mod:`hadaconv.export.validate`).
        dtype: the precision of the exported graph, its inputs, outputs and KV cache:
            "float32", "float16" or "bfloat16" (or the torch dtype); None keeps the model's own
            (so ``export_onnx(model.half(), ...)`` exports float16).  The model is copied for
            the conversion, never changed.  ONNX Runtime's CPU provider has no bfloat16 kernels
            for standard ops (Mul, MatMul): a bfloat16 export can only be validated where a
            provider runs it, so on CPU it needs ``validate_outputs=False``.
        overwrite: replace an existing ``out_dir`` that holds an earlier bundle (a model's folder, or a
            folder of other files, is refused).
        optimize: None, or "norms" / "all": fuse RMSNorm (with the residual add), and at "all"
            attention too, into ONNX Runtime's contrib ops (:mod:`hadaconv.export.fusions`;
            float32 only, not with ``portable``).  Measured on SmolLM2 on 2-core CPUs
            (``benchmarks/RESULTS.md``): "all" makes prefill 1.03-1.12x faster and decode 2-8%
            slower; "norms" made decode about 5% slower and prefill no faster.  The fused graph
            is what validation checks; ``meta["fusions"]`` counts what matched.
        source: a description of where the model came from, for the metadata.
        verbose: show the exporter's own progress output.
        log: called with each human-readable line (the stage being entered, with the seconds so
            far, then the validation diffs), e.g. ``print``; None sends them to the
            ``hadaconv.export`` logger at INFO level (silent unless logging is configured, as
            in Optimum and transformers).  Apart from these, the trace (one call of minutes)
            says on stderr that it is still working (:func:`hadaconv.progress.status`).
        progress: called with the stage lines instead of ``log`` (the CLI sends them to stderr
            with its other progress, the validation diffs to stdout with its results).

    Raises:
        InputError: ``model`` not an ``nn.Module`` (a path: ``load_model(path).model``).
        HadaconvError: example inputs for a text model, ``cache=False`` for a model that exports
            as no causal LM, the encoder kind for a model with a head (the causal-lm or classifier
            kind for a bare encoder), a bad ``dtype`` or ``optimize`` level, ``optimize`` with
            ``portable`` or half precision, an ``atol`` that is no number >= 0, bfloat16 validation
            on the CPU, an existing ``out_dir`` without ``overwrite``, a failed export, or outputs
            outside ``atol`` (nothing is written).
    """
    check_module(model)
    if atol is not None:  # before the copy and the trace: a negative one would fail every output
        check_number("atol", atol, 0)
    out = Path(out_dir)
    form = "portable" if portable else "custom"
    original, original_inputs = model, example_inputs
    model = _as_dtype(model, dtype).eval()
    precision = model_dtype(model)
    check_options(precision, portable=portable, optimize=optimize, validate_outputs=validate_outputs)
    atol = default_atol(precision) if atol is None else atol
    example_inputs = _inputs_as(example_inputs, precision)
    kind = _resolve_kind(model, kind, example_inputs=example_inputs, cache=cache)
    spec = make_spec(model, kind, cache=cache, example_inputs=example_inputs)
    if form == "custom" and _hadamard_layers(model):
        get_library_path()  # a missing library fails before the slow trace, not after
    start = time.perf_counter()
    log = log or logging.getLogger(__name__).info

    def stage(text: str) -> None:  # the trace and the validation each take minutes on a real model
        (progress or log)(f"[{time.perf_counter() - start:.0f} s] {text}")

    with atomic_folder(out, overwrite) as tmp:
        fusions, domains = _write_graph(spec, tmp / MODEL, kind=kind, form=form, optimize=optimize,
                                        verbose=verbose, stage=stage, model_name=type(model).__name__)
        # The graph decides: a dense model carries no library (onnxruntime-genai would load it for
        # nothing), a module calling fwht / hadamard_affine itself does.
        library = Path(get_library_path()) if form == "custom" and OP_DOMAIN in domains else None
        lib_name = None
        if library is not None:
            lib_name = library.name
            shutil.copy2(library, tmp / lib_name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        diffs: list[OutputDiff] = []
        if validate_outputs:
            stage("validating in ONNX Runtime against PyTorch")
            # The installed library, as open_bundle loads it: an error then names a path that stays.
            sess = session(tmp / MODEL, "cpu", library=library if lib_name else False)
            diffs = _validate(spec, sess, model, original, original_inputs, tokenizer, atol, cache)
            for line in summarize(diffs, atol):
                log(line)
        meta = _metadata(tmp, model, spec, kind=kind, form=form, fusions=fusions, lib_name=lib_name,
                         tokenizer=tokenizer, source=source, precision=precision, log=log,
                         validation={"atol": atol, "diffs": [vars(d) for d in diffs]} if validate_outputs else None)
        write_metadata(tmp, meta)
    return ExportResult(out, kind, form, diffs, meta)


def _resolve_kind(model: nn.Module, kind: str | None, *, example_inputs: Any, cache: bool) -> str:
    """The kind to export (detected when None), with the options that only another kind uses
    refused: they would be ignored, and looked used."""
    if kind != "module":  # a module export is whatever the model is
        detected = detect_kind(model)
        kind = kind or detected
        _check_kind(kind, detected, model)
    if example_inputs is not None and kind in ("causal-lm", "encoder", "classifier"):
        raise HadaconvError(f"example inputs ({option('example_inputs', flag='--input-shape')}) are for generic "
                            f"modules: {indefinite(kind)} export makes its own token ids")
    if not cache and kind != "causal-lm":
        raise HadaconvError(f"{option('cache', False, flag='--no-cache')} drops a causal LM's KV cache, and "
                            f"{type(model).__name__} exports as {indefinite(kind)}: drop it")
    return kind


def _check_kind(kind: str, detected: str, model: nn.Module) -> None:
    """Refuse, before the export, a kind whose outputs the model surely lacks: a head's logits or
    a causal LM's KV cache from a bare encoder, a bare backbone's last hidden state from a model
    with a head; and a causal LM as a classifier, whose logits score the next token, not labels.
    Other mismatches (a causal LM whose remote code cannot generate, say) are left to the export,
    which may succeed."""
    if kind == "encoder" and detected in ("causal-lm", "classifier"):  # no last_hidden_state
        raise HadaconvError(f"the encoder kind exports a bare backbone's last hidden state, and "
                            f"{type(model).__name__} has a head: export it as {detected} (the kind detected)")
    if kind == "classifier" and detected == "causal-lm":  # generate() would refuse it, classify() mislabel it
        raise HadaconvError(f"the classifier kind exports a head's logits, and {type(model).__name__} is a causal "
                            "LM: export it as causal-lm (the kind detected; --no-cache for logits without a KV "
                            "cache, which open_bundle runs)")
    if kind == "causal-lm" and detected == "classifier":  # a head on an encoder: no KV cache to export
        raise HadaconvError(f"the causal-lm kind exports a model that generates (logits and a KV cache), and "
                            f"{type(model).__name__} is a classifier: export it as classifier (the kind detected)")
    if kind in ("causal-lm", "classifier") and detected == "encoder":  # a bare backbone: no logits
        what = "a model that generates (logits and a KV cache)" if kind == "causal-lm" else "a head on an encoder"
        raise HadaconvError(f"the {kind} kind exports {what}, and {type(model).__name__} is a bare encoder: "
                            "export it as encoder (the kind detected)")


def _write_graph(spec, path: Path, *, kind: str, form: str, optimize: str | None, verbose: bool,
                 stage: Callable[[str], None], model_name: str) -> tuple[dict[str, int] | None, set[str]]:
    """Trace ``spec`` with the dynamo exporter, translate HadamardAffine to ``form``, fuse at
    ``optimize``, save to ``path``; the fusion counts (None when not fused) and the op domains
    the graph imports ("" for standard ONNX)."""
    # onnxscript is imported here, not with the package: `import hadaconv` stays light.
    from hadaconv.export.fusions import LEVELS, fuse_for_onnxruntime
    from hadaconv.export.translate import OPSET, translation_table

    fusions = None
    # A model without converted projections is standard ops in either form: say so, not "custom form".
    shown = f"{form} form" if kind == "module" or _hadamard_layers(spec.module) else \
        "no converted projections: standard ops"
    stage(f"exporting the {kind} ({shown}) with torch.export and translating it to ONNX "
          "(the dynamo exporter; the slow step)")
    try:
        # One call of minutes (14 on a loaded 2-core machine for SmolLM2) with no progress of its own.
        with _quiet(verbose), torch.no_grad(), status("exporting with the dynamo exporter"):
            program = torch.onnx.export(
                spec.module, spec.args, dynamo=True, opset_version=OPSET,
                custom_translation_table=translation_table(form), input_names=spec.input_names,
                output_names=spec.output_names, dynamic_shapes=spec.dynamic_shapes, verbose=verbose,
            )
        if optimize:  # the stage lines outside _quiet, which swallows prints
            stage(f"fusing for ONNX Runtime ({optimize}: {LEVELS[optimize]} into contrib ops)")
            with _quiet(verbose):
                program.model, fusions = fuse_for_onnxruntime(program.model, optimize)
            stage("fused: " + (", ".join(f"{name} x{n}" for name, n in fusions.items())
                               or "nothing matched, the graph is as exported"))
        with _quiet(verbose):
            program.save(path)  # weights go to external data by themselves beyond 2 GB
    except HadaconvError:
        raise
    except Exception as exc:
        raise HadaconvError(f"ONNX export of {model_name} failed: {_first_line(exc)}") from None
    return fusions, set(program.model.opset_imports)


def _labels(config: Any, width: Any, log: Callable[[str], None]) -> list[str] | None:
    """The classifier's label names by index (its config's ``id2label``), or None where they do not
    name every logit (a masked LM's id2label is transformers' stand-in, and says nothing) or are not
    what a bundle may hold (:func:`label_names`: distinct, printable; said through ``log``); the
    readers then number them LABEL_0, ... as transformers does."""
    names = getattr(config, "id2label", None) or {}
    try:
        ordered = [str(names[i]) for i in range(len(names))]
    except (KeyError, TypeError):
        return None
    if isinstance(width, int) and len(ordered) != width:
        return None
    if not label_names(ordered):
        log("the model's label names (id2label) are not distinct, printable names: the bundle numbers its labels "
            "LABEL_0, LABEL_1, ...")
        return None
    return ordered


def _metadata(folder: Path, model: nn.Module, spec, *, kind: str, form: str, fusions: dict[str, int] | None,
              lib_name: str | None, tokenizer: Any, source: str | None, precision: torch.dtype,
              validation: dict | None, log: Callable[[str], None]) -> dict:
    """The bundle metadata (hadaconv_onnx.json), after writing genai_config.json where the model has one."""
    from hadaconv.export.fusions import CONTRIB_DOMAIN
    from hadaconv.export.translate import DOMAIN, OPSET
    from hadaconv.runtime import OP_VERSION

    inputs, outputs = io_description(folder / MODEL)
    config = getattr(model, "config", None)
    meta = {
        "format": FORMAT, "version": VERSION, "hadaconv": __version__, "kind": kind, "form": form,
        "opset": OPSET,
        "custom_opsets": ({DOMAIN: OP_VERSION} if lib_name else {}) | ({CONTRIB_DOMAIN: 1} if fusions else {}),
        "fusions": fusions,
        "op_library": lib_name, "inputs": inputs, "outputs": outputs, "cache": spec.cache,
        "tokenizer": tokenizer is not None,
        "eos_token_id": _token_id(tokenizer, config, "eos_token_id"),
        "pad_token_id": _token_id(tokenizer, config, "pad_token_id"),
        "hadamard_layers": _hadamard_layers(model), "source": source or type(model).__name__,
        "dtype": str(precision).removeprefix("torch."),
        "validation": validation,
        # the position table's length (None: unknown, or outside what read_metadata takes)
        "context_length": positive_int(model_context(model)),
        # the embedding's rows, for an encoder's token ids (a causal LM's logits state them too)
        "vocab_size": positive_int(getattr(config, "vocab_size", None)),
    }
    if kind == "classifier":  # what hadaconv run and generate.classify name the logits by
        meta["labels"] = _labels(config, outputs[0]["shape"][-1] if outputs and outputs[0].get("shape") else None, log)
        meta["problem_type"] = getattr(config, "problem_type", None)
        meta["segment_types"] = segment_types(model)  # fewer than two: a pair's token_type_ids mean nothing to it
    meta["genai_config"] = _write_genai(folder, model, spec, meta)
    return meta
