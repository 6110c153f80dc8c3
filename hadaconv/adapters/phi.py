"""Phi models.

* phi-1, phi-1.5, phi-2 (``model_type`` "phi"): ``self_attn.v_proj`` and ``self_attn.dense``.
* Phi-3 (``model_type`` "phi3"): a fused ``self_attn.qkv_proj`` laid out [q; k; v] (all query
  heads, then all KV heads' keys, then their values) and ``self_attn.o_proj``.
"""

from __future__ import annotations

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer
from hadaconv.adapters.common import find_layers, fused_rows, hf_kind, matches_types, model_type

_PHI3_VALUE_ROWS = fused_rows(lambda g, heads, kv_heads, head_dim: (heads + kv_heads + g) * head_dim)


def _layers(model: nn.Module) -> list[AttentionLayer]:
    if model_type(model) == "phi3":
        return find_layers(model, value="qkv_proj", out="o_proj", rows=_PHI3_VALUE_ROWS)
    return find_layers(model, value="v_proj", out="dense")


ADAPTER = Adapter(name="phi", matches=matches_types("phi", "phi3"), layers=_layers, kind=hf_kind)
