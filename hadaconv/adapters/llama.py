"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3, SmolLM (grouped-query attention).

Each attention block holds separate ``v_proj`` and ``o_proj`` Linears
(``model.layers[i].self_attn`` in the Hugging Face classes); the MLP's ``down_proj`` writes into
the residual stream after the attention, so conversion can compensate a block's error there.  Qwen3 (with its q/k norms) and
Mistral-Nemo set ``head_dim`` explicitly, so heads x head_dim can differ from the model width:
Qwen3-0.6B maps 16 x 128 = 2048 into 1024, Mistral-Nemo 32 x 128 = 4096 into 5120.  The q/k
norms act on queries and keys only, so folding into ``v_proj`` stays exact.
"""

from __future__ import annotations

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer, ResidualStream
from hadaconv.adapters.common import find_layers, hf_kind, matches_types

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")  # SmolLM and SmolLM2 are "llama"


def _layers(model: nn.Module) -> list[AttentionLayer]:
    return find_layers(model, value="v_proj", out="o_proj")


#: The Hugging Face classes' paths (LlamaForCausalLM and its kin): RMSNorm before attention and
#: MLP, the head ``lm_head`` (tied to the embedding in SmolLM2 and Qwen2.5's small models).
STREAM = ResidualStream(embedding="model.embed_tokens", blocks="model.layers",
                        reads=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                               ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
                        writes=("self_attn.o_proj", "mlp.down_proj"), final_norm="model.norm", head="lm_head")

ADAPTER = Adapter(name="llama", matches=matches_types(*MODEL_TYPES), layers=_layers, kind=hf_kind,
                  residual_maps=("mlp.down_proj",), residual_stream=STREAM)
