"""OPT: ``self_attn.v_proj`` and ``self_attn.out_proj`` (``model.decoder.layers[i]``)."""

from __future__ import annotations

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer
from hadaconv.adapters.common import find_layers, hf_kind, matches_types


def _layers(model: nn.Module) -> list[AttentionLayer]:
    return find_layers(model, value="v_proj", out="out_proj")


ADAPTER = Adapter(name="opt", matches=matches_types("opt"), layers=_layers, kind=hf_kind)
