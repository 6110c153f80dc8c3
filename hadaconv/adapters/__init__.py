"""Architecture adapters: the only place that knows model families by name.

``find_adapter(model)`` picks the first adapter whose ``matches`` accepts the model (or, given
``target``, the regex-driven generic one); ``attention_layers(model)`` returns its attention
blocks; ``check_convertible(layer)`` says whether a block can take a Hadamard projection.  To add
a family, write a small module with an ``ADAPTER`` and list it in ``_MODULES``.
"""

from __future__ import annotations

import importlib
import operator

import torch
from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer, ModelKind, WeightSlot
from hadaconv.adapters.generic import generic_adapter
from hadaconv.errors import HadaconvError, InputError, option
from hadaconv.hadamard import UnsupportedSizeError, factorize
from hadaconv.nn import saving_blocks

__all__ = [
    "Adapter",
    "AttentionLayer",
    "ModelKind",
    "WeightSlot",
    "adapters",
    "attention_layers",
    "block_list",
    "check_block",
    "check_convertible",
    "check_seq_len",
    "context_length",
    "find_adapter",
    "generic_adapter",
    "holds",
    "index_ranges",
    "layer_indices",
    "model_kind",
    "target_overrides",
]

# Order matters only where two adapters could claim a model: the Hugging Face families match on
# config.model_type; torch_mha (any nn.MultiheadAttention) comes last.  The generic fallback is
# never picked automatically (it needs --target).
_MODULES = ["llama", "gemma", "gpt2", "bert", "opt", "gpt_neox", "phi", "torch_mha"]


def adapters() -> list[Adapter]:
    """The registered family adapters, in matching order."""
    return [importlib.import_module(f"hadaconv.adapters.{m}").ADAPTER for m in _MODULES]


def _describe(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    what = f"model_type {model_type!r}" if model_type else type(model).__name__
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.MultiheadAttention)) or type(m).__name__ == "Conv1D":
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    found = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())) or "no Linear layers"
    return f"{what} ({found})"


def find_adapter(model: nn.Module, target: str | None = None) -> Adapter:
    """The adapter for this model, or a one-line HadaconvError naming what was found.

    With ``target`` (a regular expression over qualified module names), the generic adapter
    converting the matching square ``nn.Linear`` layers.
    """
    if target is not None:
        adapter = generic_adapter(target)
        if not adapter.matches(model):
            raise HadaconvError(f"{option('target', target)} matches no square nn.Linear in {_describe(model)}")
        return adapter
    for adapter in adapters():
        if adapter.matches(model):
            return adapter
    raise HadaconvError(
        f"no attention blocks hadaconv knows how to convert in {_describe(model)} "
        f"(supported: {', '.join(a.name for a in adapters())}); use {option('target', 'REGEX')} to convert "
        "matching square Linear layers with the affine fit"
    )


def target_overrides(model: nn.Module, target: str | None, *, mode: str = "head") -> str | None:
    """The warning for a ``target`` given for a model a family adapter knows (None where there is
    none): the generic adapter converts every match as an output projection (``q_proj`` would
    be too) with the affine fit, without the value map the family adapter folds into the value
    projection under ``mode`` "head" or "diag" (the fit modes of :mod:`hadaconv.fit`)."""
    if target is None:
        return None
    try:
        family = find_adapter(model)
    except HadaconvError:  # no adapter knows it: the target is the only way, nothing replaced
        return None
    lost = "" if mode == "affine" else ", without the value map that adapter folds into the value projection"
    return (f"{option('target', target)} replaces the {family.name} adapter, which knows this model: the layers it "
            f"matches are converted as output projections with the affine fit{lost}; drop {option('target')} to "
            f"convert with the {family.name} adapter")


def model_kind(model: nn.Module) -> ModelKind | None:
    """What ``model``'s forward returns (``causal-lm``, ``encoder``, ...) as its adapter says; None
    where no adapter knows the model (it may still be converted with a ``target``)."""
    try:
        return find_adapter(model).kind(model)
    except HadaconvError:
        return None


#: Config fields that hold the context length: GPT-2 names it ``n_positions``, the others
#: (Llama, Qwen, Gemma, BERT, OPT, GPT-NeoX, Phi) ``max_position_embeddings``.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions")
#: Families whose position ids start after the padding index (``padding_idx + 1``), so that
#: ``max_position_embeddings`` rows hold ``padding_idx + 1`` fewer positions (RoBERTa: 514 -> 512).
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"}


def context_length(model: nn.Module) -> int | None:
    """The longest sequence, in tokens, ``model``'s config says it takes: its position table
    (less RoBERTa's offset), or for rotary models with ``rope_scaling`` the scaled length where
    that is longer.  None where it has no Hugging Face config (a plain torch module, or ViT)."""
    config = getattr(model, "config", None)
    limit = next((v for f in _CONTEXT_FIELDS if isinstance(v := getattr(config, f, None), int)
                  and not isinstance(v, bool) and v > 0), None)
    if limit is None:
        return None
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and isinstance(scaling.get("factor"), (int, float)):
        base = scaling.get("original_max_position_embeddings") or limit
        limit = max(limit, int(base * scaling["factor"]))
    return limit


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    """Raise InputError when windows of ``seq_len`` tokens are longer than ``model``'s context
    (:func:`context_length`): a learned position table would fail deep inside the model, and
    rotary positions past the trained ones give text and statistics of no use, after a sampling
    run of hours."""
    limit = context_length(model)
    if limit is not None and seq_len > limit:
        raise InputError(f"{option('seq_len', seq_len)} is longer than the model's context of {limit:,} tokens "
                         f"(from its config): give {option('seq_len', limit)} or less")


def attention_layers(model: nn.Module, target: str | None = None) -> list[AttentionLayer]:
    """The (not yet converted) attention blocks of ``model``, in order, after the adapter's
    ``prepare``; a one-line HadaconvError when there are none."""
    adapter = find_adapter(model, target)
    adapter.prepare(model)
    layers = adapter.layers(model)
    if not layers:
        raise HadaconvError(
            f"the {adapter.name} adapter found no convertible attention block in {_describe(model)}"
        )
    return layers


def block_list(model: nn.Module, layers: list[AttentionLayer], *,
               one_per_layer: bool = False) -> tuple[str, nn.ModuleList] | None:
    """(name, ModuleList) of the first ModuleList whose blocks hold every layer of ``layers``
    (with ``one_per_layer``: block i holds layers[i] and nothing else is listed), or None when
    there is none (a model whose blocks cannot be run one at a time)."""
    def fits(mod: nn.ModuleList) -> bool:
        if one_per_layer:
            return len(mod) == len(layers) and all(holds(b, layer) for b, layer in zip(mod, layers))
        return all(any(holds(b, layer) for b in mod) for layer in layers)

    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and fits(mod):
            return name, mod
    return None


def holds(block: nn.Module, layer: AttentionLayer) -> bool:
    """Whether ``layer``'s output projection sits in ``block``."""
    return any(m is layer.out_module for m in block.modules())


def check_convertible(layer: AttentionLayer, block: int = 1) -> None:
    """Raise a one-line HadaconvError unless ``layer``'s output projection can become a Hadamard
    projection with output blocks of ``block``: it takes heads * head_dim inputs, the larger of
    its two widths has a known Hadamard matrix (the transform runs there; the other side is
    zero-padded or selected, see :class:`hadaconv.nn.HadamardProjection`), ``block`` divides its
    output width, and its weights are finite.

    The one geometry check: ``convert``, ``patch`` and ``install_projection`` all call it.
    """
    w, b = layer.out.get()
    out_features, in_features = w.shape
    if in_features != layer.width:
        raise HadaconvError(
            f"{layer.out_name}: output projection takes {in_features} inputs but the head layout "
            f"says {layer.num_heads} heads x {layer.head_dim} = {layer.width}"
        )
    n = max(out_features, in_features)
    try:
        factorize(n)
    except UnsupportedSizeError as exc:
        shape = "" if out_features == in_features else f" ({out_features} x {in_features}: the transform runs on {n})"
        raise UnsupportedSizeError(f"{layer.out_name}{shape}: {exc}") from None
    check_block(block, out_features, layer.out_name, in_features=in_features, bias=b is not None)
    if not w.is_meta and not torch.isfinite(w).all():  # a model being rebuilt (load) has no values yet
        raise HadaconvError(f"{layer.out_name} holds NaN or infinite weights")


def check_block(block: int, out_features: int, name: str, *, in_features: int | None = None,
                bias: bool = False) -> None:
    """Refuse a gamma block size that does not divide the output width ``out_features`` of the
    projection ``name`` (InputError, listing the sizes that do and, where ``in_features`` and
    ``bias`` give the dense shape, still remove parameters)."""
    if block < 1 or out_features % block:
        saving = saving_blocks(in_features, out_features, bias) if in_features is not None else []
        # Without the dense shape, or at a width so small that no block saves: the sizes that fit.
        sizes = saving or [d for d in range(1, out_features + 1) if out_features % d == 0]
        raise InputError(f"{option('block', block)} does not divide the output width {out_features} of {name}: "
                         f"choose one of {', '.join(map(str, sizes))}")


def layer_indices(layers) -> list[int]:
    """``layers`` (any iterable of integers >= 0, numpy's too) as a list.

    Raises:
        InputError: a string, not integers, a negative index, or no index at all.
    """
    try:
        items = None if isinstance(layers, (str, bytes)) else list(layers)
        indices = None if items is None else [operator.index(i) for i in items]
    except TypeError:
        indices = None
    if indices is None or any(isinstance(i, bool) for i in items) or any(i < 0 for i in indices):
        raise InputError(f"{option('layers')} must be layer indices like [0, 3, 5] or '0,3,5-9', got {layers!r:.60}")
    if not indices:
        raise InputError(f"{option('layers')} selects no layers: give indices like 0,3,5-9 (None = all)")
    return indices


def index_ranges(indices: list[int]) -> str:
    """Sorted layer indices as text: [0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, x in enumerate(indices):
        start = x if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(str(x) if x == start else f"{start}-{x}")
            start = None
    return ", ".join(parts)
