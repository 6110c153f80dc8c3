"""``genai_config.json``: what onnxruntime-genai needs to run a causal-LM bundle as it is.

``onnxruntime_genai.Model(bundle)`` reads this file: the decoder graph's file name, its input and
output names (the KV cache as ``past_key_values.%d.key`` / ``present.%d.key`` templates, tensors
``[batch, kv_heads, length, head_dim]``, a separate past and present buffer), the sizes it
allocates the cache with, the context length, the token ids and search defaults (greedy), and in
``session_options.custom_ops_library`` the bundle's own copy of the op library (custom form) by
its bare file name.  onnxruntime-genai 0.18 resolves a relative library path against the folder
holding the config, and refuses one outside it (``..`` or elsewhere), so the bundle loads
wherever it is copied.

The schema is onnxruntime-genai's (``model.decoder.*``, ``search.*``); checked with 0.18.0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["GENAI_CONFIG", "genai_config", "write_genai_config"]

GENAI_CONFIG = "genai_config.json"

# Hugging Face model types onnxruntime-genai runs as a plain decoder with separate key/value
# caches; anything else is declared as "llama", whose handling is the generic decoder-only one.
_GENAI_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "olmo", "nemotron", "smollm3"}


def _token_ids(value: Any) -> int | list[int] | None:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] or None
    return None if value is None else int(value)


def genai_config(model: nn.Module, cache: dict[str, Any], *, library: str | None, position_ids: bool,
                 eos_token_id: Any, pad_token_id: Any, model_file: str = "model.onnx") -> dict[str, Any] | None:
    """The ``genai_config.json`` content for a causal LM exported with the KV cache, or None when
    onnxruntime-genai cannot describe the graph (keys and values of different head sizes).

    Args:
        model: the exported Hugging Face model (its ``config`` gives heads, width, vocabulary,
            context length and BOS).
        cache: the export's cache layout (num_layers, num_kv_heads, head_dim, value_head_dim).
        library: the op library's file name inside the bundle (custom form), else None.
        position_ids: whether the graph takes ``position_ids``.
        eos_token_id / pad_token_id: as recorded in ``hadaconv_onnx.json``.
    """
    if cache["head_dim"] != cache["value_head_dim"]:
        return None
    config = model.config
    # The config's own table length, as onnxruntime-genai's model builder writes it: the runtime
    # sizes its KV cache by it, so not adapters.context_length's rope-scaled limit, which can be
    # several times longer.
    context = int(getattr(config, "max_position_embeddings", None) or 2048)
    eos = _token_ids(eos_token_id)
    pad = _token_ids(pad_token_id)
    pad = pad if pad is not None else (eos if isinstance(eos, int) else (eos or [0])[0])
    bos = _token_ids(getattr(config, "bos_token_id", None))
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if library is not None:
        session_options["custom_ops_library"] = library  # relative: resolved against this file's folder
    model_type = getattr(config, "model_type", None)
    return {
        "model": {
            "type": model_type if model_type in _GENAI_TYPES else "llama",
            "bos_token_id": bos if bos is not None else pad,
            "eos_token_id": eos if eos is not None else pad,
            "pad_token_id": pad,
            "context_length": context,
            "vocab_size": int(config.vocab_size),
            "decoder": {
                "filename": model_file,
                "session_options": session_options,
                "head_size": cache["head_dim"],
                "hidden_size": int(config.hidden_size),
                "num_attention_heads": int(config.num_attention_heads),
                "num_key_value_heads": cache["num_kv_heads"],
                "num_hidden_layers": cache["num_layers"],
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
            "min_length": 0, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
            "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "early_stopping": True, "past_present_share_buffer": False,
        },
    }


def write_genai_config(folder: Path, config: dict[str, Any]) -> None:
    (Path(folder) / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
