"""BERT-style encoders: BERT, RoBERTa, MiniLM (a BERT), and ViT.

BERT's attention block holds the self-attention with its ``self.value`` and the output
projection ``output.dense`` (followed by dropout, the residual and LayerNorm).  BERT decoders'
cross-attention blocks have the same shape and are included.  ViT (transformers 5 layout) has
``v_proj`` and ``o_proj`` side by side in ``layers[i].attention``.
"""

from __future__ import annotations

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer
from hadaconv.adapters.common import find_layers, hf_kind, matches_types, model_type


def _layers(model: nn.Module) -> list[AttentionLayer]:
    if model_type(model) == "vit":
        return find_layers(model, value="v_proj", out="o_proj")
    return find_layers(model, value="self.value", out="output.dense")


ADAPTER = Adapter(
    name="bert",
    matches=matches_types("bert", "roberta", "xlm-roberta", "camembert", "vit"),
    layers=_layers,
    kind=hf_kind,
)
