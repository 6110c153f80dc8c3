"""GPT-2: a fused ``attn.c_attn`` Conv1D ([q; k; v] columns) and ``attn.c_proj``.

Conv1D stores its weight as [in, out], hence ``transposed``.  The MLP's ``mlp.c_proj`` is not an
attention projection; it is never picked because the MLP holds no ``c_attn``.
"""

from __future__ import annotations

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer
from hadaconv.adapters.common import find_layers, fused_rows, hf_kind, matches_types

# c_attn's output is [q | k | v], each num_heads * head_dim wide.
_VALUE_ROWS = fused_rows(lambda g, heads, kv_heads, head_dim: (heads + kv_heads + g) * head_dim)


def _layers(model: nn.Module) -> list[AttentionLayer]:
    return find_layers(model, value="c_attn", out="c_proj", rows=_VALUE_ROWS, transposed=True)


ADAPTER = Adapter(name="gpt2", matches=matches_types("gpt2"), layers=_layers, kind=hf_kind)
