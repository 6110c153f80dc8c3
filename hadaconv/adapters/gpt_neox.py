"""GPT-NeoX and Pythia: a fused ``attention.query_key_value`` Linear and ``attention.dense``.

The fused output is interleaved per head: viewed as [heads, 3 * head_dim], head h's row block
is [q_h; k_h; v_h] (``GPTNeoXAttention.forward`` views it so and chunks the last dim in three),
so head h's value rows start at ``(3 h + 2) * head_dim``.  NeoX has no grouped-query attention.
"""

from __future__ import annotations

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer
from hadaconv.adapters.common import find_layers, fused_rows, hf_kind, matches_types

_VALUE_ROWS = fused_rows(lambda g, heads, kv_heads, head_dim: (3 * g + 2) * head_dim)


def _layers(model: nn.Module) -> list[AttentionLayer]:
    return find_layers(model, value="query_key_value", out="dense", rows=_VALUE_ROWS)


ADAPTER = Adapter(name="gpt_neox", matches=matches_types("gpt_neox"), layers=_layers, kind=hf_kind)
