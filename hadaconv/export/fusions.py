"""ONNX Runtime's fused operators in an exported graph: ``export_onnx(optimize=LEVEL)``.

The dynamo exporter writes RMSNorm and attention as chains of small standard ops, and ONNX
Runtime's own session-time fusions miss them: Hugging Face's ``x * rsqrt(mean(x^2) + eps)``
arrives as Sqrt -> Reciprocal -> Mul, where ONNX Runtime's RMSNorm fusion looks for a Div, and
the decomposed scaled-dot-product attention matches none of its attention patterns.
onnxscript's ORT fusions (``onnxscript.rewriter.ort_fusions``, the rewriter behind ONNX
Runtime's own dynamo-export helper) rewrite them into ``com.microsoft`` contrib ops.  Two levels:

* ``"norms"``: each RMSNorm becomes SimplifiedLayerNormalization, or with the residual add
  before it SkipSimplifiedLayerNormalization (SmolLM2: 2,245 nodes -> 1,819);
* ``"all"``: every fusion onnxscript knows, attention included (MultiHeadAttention; SmolLM2:
  -> 1,608 nodes).

The graph then runs on ONNX Runtime only, so the portable form never takes them.  Measured on
SmolLM2 on 2-core CPUs (``benchmarks/bench_e2e.py --optimize LEVEL``, ``benchmarks/RESULTS.md``
"ONNX Runtime fusions"): on an AMD EPYC "all" makes prefill 1x512 1.12x faster and decode at
batch 1 2-8% slower (ONNX Runtime's CPU MultiHeadAttention loses to the decomposed graph for one
query token over a long past); on an Intel Xeon "norms" made the dense model's decode about 5%
slower (+-1.4%) and prefill no faster.  Export leaves both off unless asked.
"""

from __future__ import annotations

from typing import Any, Callable

from hadaconv.errors import HadaconvError

__all__ = ["CONTRIB_DOMAIN", "LEVELS", "check_level", "fuse_for_onnxruntime"]

#: The domain the fused operators live in (ONNX Runtime's contrib ops).
CONTRIB_DOMAIN = "com.microsoft"
#: Each level and what it fuses (the export's progress line says it).
LEVELS = {"norms": "RMSNorm (with the residual add)",
          "all": "every fusion onnxscript knows: norms, attention, GELU"}

Rewrite = Callable[[Any], "tuple[Any, dict[str, int]]"]


def _rewrite(level: str) -> Rewrite:
    """The rewrite of ``level``; raises HadaconvError for an unknown level or an onnxscript
    without it (the norm fusions are modules of onnxscript's, not its public API)."""
    if level not in LEVELS:
        raise HadaconvError(f"unknown optimization level {level!r}: choose {' or '.join(LEVELS)}")
    try:
        if level == "all":
            from onnxscript.rewriter.ort_fusions import optimize_for_ort

            return optimize_for_ort
        from onnxscript.optimizer import remove_unused_nodes
        from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
        from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization
    except ImportError as exc:
        import onnxscript

        raise HadaconvError(f"optimization level {level!r} needs onnxscript's ONNX Runtime fusions, which "
                            f"onnxscript {onnxscript.__version__} lacks ({exc}): upgrade onnxscript") from None

    def norms(model: Any) -> tuple[Any, dict[str, int]]:
        # Plain norms first: the skip fusion then absorbs the residual Add into each one it follows.
        counts = {"rms_normalization": fuse_rms_normalization(model),
                  "skip_rms_normalization": fuse_skip_rms_normalization(model)}
        # The fused norms leave their exponent and epsilon constants behind, which ONNX Runtime
        # would warn about on every session ("Removing initializer ... not used by any node").
        remove_unused_nodes(model)
        return model, counts

    return norms


def check_level(level: str) -> None:
    """Raises HadaconvError unless ``level`` is one of :data:`LEVELS` and this onnxscript has it
    (before an export's slow trace, not after it)."""
    _rewrite(level)


def fuse_for_onnxruntime(model: Any, level: str) -> tuple[Any, dict[str, int]]:
    """(the fused model, {fusion: count} for the fusions that matched) for an ``onnx_ir`` model
    (``torch.onnx.ONNXProgram.model``), rewritten in place; ``level`` is one of :data:`LEVELS`.
    Fusions that find no pattern are absent from the counts (a model without RMSNorm, such as a
    LayerNorm encoder, gets none at "norms"); a count is of rewrites, some of which later
    rewrites undo (at "all" the rotary-embedding fusion matches on Llama graphs and leaves no
    RotaryEmbedding node).  Raises HadaconvError as :func:`check_level` does."""
    fused, counts = _rewrite(level)(model)
    return fused, {name: n for name, n in counts.items() if n}
