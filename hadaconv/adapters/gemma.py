"""Gemma, Gemma 2 and Gemma 3 text models (``model_type`` gemma, gemma2, gemma3_text).

Each attention block holds separate ``v_proj`` and ``o_proj`` Linears
(``model.layers[i].self_attn``), with an explicit ``head_dim``: heads x head_dim usually differs
from the model width (Gemma 3 270M: 4 x 256 = 1024 into 640; Gemma 2 2B: 8 x 256 = 2048 into
2304), so W_o is rectangular.  None of Gemma's extras touches the value path, so folding a
per-head matrix into ``v_proj`` stays exact: the q/k RMS norms (Gemma 3) and the soft-capping of
attention scores (Gemma 2) act on queries and keys only, sliding windows only choose which
positions are mixed, the scaled embeddings and the final logit soft-capping sit outside the
attention blocks.  Gemma 3's multimodal ``Gemma3ForConditionalGeneration`` (``model_type``
gemma3) is not covered; its text tower loaded as ``Gemma3ForCausalLM`` is.
"""

from __future__ import annotations

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer
from hadaconv.adapters.common import find_layers, hf_kind, matches_types

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


def _layers(model: nn.Module) -> list[AttentionLayer]:
    return find_layers(model, value="v_proj", out="o_proj")


ADAPTER = Adapter(name="gemma", matches=matches_types(*MODEL_TYPES), layers=_layers, kind=hf_kind)
