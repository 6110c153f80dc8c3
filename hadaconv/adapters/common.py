"""Helpers shared by the family adapters (not an adapter itself).

Attention blocks are found by walking ``model.named_modules()`` for modules that hold both the
value projection and the output projection at known relative paths, so the same adapter works
for a bare backbone (``LlamaModel``), a head model (``LlamaForCausalLM``) or any wrapper.

A block's ``index`` is its position among *all* such blocks; blocks whose output projection has
already been replaced (no ``weight`` left) are not listed, so the indices of the others stay the
same before and after a partial conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from hadaconv.adapters.base import AttentionLayer, ModelKind, WeightSlot

# Value rows of a fused QKV weight, given (num_heads, num_kv_heads, head_dim).
RowsFn = Callable[[int, int, int], torch.Tensor]


def model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of a Hugging Face model, None for anything else."""
    return getattr(getattr(model, "config", None), "model_type", None)


def matches_types(*types: str) -> Callable[[nn.Module], bool]:
    """A ``matches`` predicate accepting Hugging Face models of these ``model_type``s (listed in
    its ``model_types`` attribute, which the README's architecture table is checked against)."""
    accepted = frozenset(types)

    def matches(model: nn.Module) -> bool:
        return model_type(model) in accepted

    matches.model_types = accepted
    return matches


def hf_kind(model: nn.Module) -> ModelKind:
    """What the model's forward returns: logits of a generative LM (``causal-lm``), a backbone's
    ``last_hidden_state`` (``encoder``), or the ``logits`` of a head on a backbone (``classifier``:
    sequence or token classification, masked LM); anything that is not a Hugging Face model is a
    generic ``module``."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return "causal-lm"
    base = getattr(model, "base_model", None)
    if base is model:
        return "encoder"
    return "classifier" if isinstance(base, nn.Module) else "module"


def config_heads(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) from a Hugging Face config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim


def submodule(block: nn.Module, path: str) -> nn.Module | None:
    """``block.<path>`` for a dotted path, or None where any step is missing."""
    module: nn.Module | None = block
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def fused_rows(start: Callable[[int, int, int, int], int]) -> RowsFn:
    """Value rows of a fused QKV weight: KV head g's head_dim rows begin at
    ``start(g, num_heads, num_kv_heads, head_dim)``."""

    def rows(heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
        return torch.cat(
            [torch.arange(head_dim) + start(g, heads, kv_heads, head_dim) for g in range(kv_heads)]
        )

    return rows


def find_layers(
    model: nn.Module,
    *,
    value: str,
    out: str,
    heads: tuple[int, int, int] | None = None,
    rows: RowsFn | None = None,
    transposed: bool = False,
    blocks: Iterable[tuple[str, nn.Module]] | None = None,
) -> list[AttentionLayer]:
    """Every module holding ``value`` and ``out`` (dotted paths) is an attention block.

    Args:
        value, out: paths of the value projection (or fused QKV) and the output projection,
            relative to the block.
        heads: (heads, KV heads, head dim); read from ``model.config`` when None.
        rows: the value rows inside a fused QKV weight; None for a separate value projection.
        transposed: weights stored as [in, out] (GPT-2's Conv1D).
        blocks: the (name, module) pairs to search; all of ``model.named_modules()`` by default.
    """
    num_heads, num_kv_heads, head_dim = heads if heads is not None else config_heads(model.config)
    value_rows = rows(num_heads, num_kv_heads, head_dim) if rows is not None else None
    out_parent_path, _, attr = out.rpartition(".")
    layers: list[AttentionLayer] = []
    index = 0
    for name, block in blocks if blocks is not None else model.named_modules():
        v_module, o_module = submodule(block, value), submodule(block, out)
        if v_module is None or o_module is None:
            continue
        if isinstance(getattr(o_module, "weight", None), torch.Tensor):
            parent = submodule(block, out_parent_path) if out_parent_path else block
            layers.append(
                AttentionLayer(
                    index=index,
                    name=name,
                    out_name=f"{name}.{out}" if name else out,
                    parent=parent,
                    attr=attr,
                    out=WeightSlot(o_module.weight, o_module.bias, transposed=transposed),
                    value=WeightSlot(v_module.weight, v_module.bias, rows=value_rows, transposed=transposed),
                    num_heads=num_heads,
                    num_kv_heads=num_kv_heads,
                    head_dim=head_dim,
                )
            )
        index += 1
    return layers
