"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3, SmolLM (grouped-query attention).

``model.model.layers[i].self_attn`` with separate ``v_proj`` and ``o_proj`` Linears.
"""

from __future__ import annotations

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer, WeightSlot

MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm", "smollm3"}


def _matches(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in MODEL_TYPES


def _layers(model: nn.Module) -> list[AttentionLayer]:
    config = model.config
    base = getattr(model, "model", model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    prefix = "model.layers" if base is not model else "layers"
    out = []
    for i, block in enumerate(base.layers):
        attn = block.self_attn
        out.append(
            AttentionLayer(
                index=i,
                name=f"{prefix}.{i}.self_attn",
                out_name=f"{prefix}.{i}.self_attn.o_proj",
                parent=attn,
                attr="o_proj",
                out=WeightSlot(attn.o_proj.weight, attn.o_proj.bias),
                value=WeightSlot(attn.v_proj.weight, attn.v_proj.bias),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
            )
        )
    return out


def _kind(model: nn.Module):
    return "causal-lm" if hasattr(model, "lm_head") else "encoder"


ADAPTER = Adapter(name="llama", matches=_matches, layers=_layers, kind=_kind)
