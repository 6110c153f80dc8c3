"""ONNX Runtime's fused operators in an exported graph: ``export_onnx(optimize=True)``.

The dynamo exporter writes RMSNorm and attention as chains of small standard ops, and ONNX
Runtime's own session-time fusions miss them: Hugging Face's ``x * rsqrt(mean(x^2) + eps)``
arrives as Sqrt -> Reciprocal -> Mul, where ONNX Runtime's RMSNorm fusion looks for a Div, and
the decomposed scaled-dot-product attention matches none of its attention patterns.
onnxscript's ORT fusions (``onnxscript.rewriter.ort_fusions``, the rewriter behind ONNX
Runtime's own dynamo-export helper) rewrite them into the ``com.microsoft`` contrib ops
SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization (the residual add with the next
norm) and MultiHeadAttention.  SmolLM2's graph goes from 2,245 nodes to 1,608 (after ONNX
Runtime's own session-time passes: 2,094 unfused, 1,490 fused).  The graph then runs on ONNX Runtime only, so the portable form never
takes them.  Measured on SmolLM2 on a 2-core CPU (``benchmarks/bench_e2e.py --optimize``,
``benchmarks/RESULTS.md`` "ONNX Runtime fusions"): prefill 1x512 1.12x faster, decode at batch 1
2-8% slower (ONNX Runtime's CPU MultiHeadAttention loses to the decomposed graph for one query
token over a long past), which is why export leaves it off unless asked.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONTRIB_DOMAIN", "fuse_for_onnxruntime"]

#: The domain the fused operators live in (ONNX Runtime's contrib ops).
CONTRIB_DOMAIN = "com.microsoft"


def fuse_for_onnxruntime(model: Any) -> tuple[Any, dict[str, int]]:
    """(the fused model, {fusion: count} for the fusions that matched) for an ``onnx_ir`` model
    (``torch.onnx.ONNXProgram.model``), rewritten in place.  Fusions that find no pattern are
    absent from the counts; a count is of rewrites, some of which later rewrites undo (the
    rotary-embedding fusion matches on Llama graphs and leaves no RotaryEmbedding node)."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    fused, counts = optimize_for_ort(model)
    return fused, {name: n for name, n in counts.items() if n}
