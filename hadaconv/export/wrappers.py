"""What gets exported: a model kind, its wrapper module, names, example inputs and dynamic axes.

Three kinds:

* ``causal-lm``: a Hugging Face model that can generate.  With the KV cache (the default) the
  graph takes ``input_ids``, ``attention_mask``, ``position_ids`` (where the model has them) and
  ``past_key_values.{i}.key/value`` and returns ``logits`` and ``present.{i}.key/value``
  (Optimum's names); cache tensors are ``[batch, kv_heads, length, head_dim]``.  Without the
  cache only ``logits``.
* ``encoder``: a Hugging Face text encoder (BERT, RoBERTa, MiniLM, ...): ``input_ids``,
  ``attention_mask`` -> ``last_hidden_state`` and ``sentence_embedding``, the attention-masked
  mean of the last hidden states (the pooling of sentence-transformers models; not normalised).
* ``classifier``: a Hugging Face text model with a head on its backbone (sequence or token
  classification, masked LM): ``input_ids``, ``attention_mask`` and, where the model has two or
  more segment types (BERT's sentence pairs: NLI, cross-encoders), ``token_type_ids`` ->
  ``logits``.
* ``module``: anything else, called with the example inputs; outputs flattened in order.

Axes are dynamic: batch and sequence (and the past and total lengths of the cache) for the
Hugging Face kinds, every axis but the last (``Dim.AUTO``: torch.export keeps it dynamic where
the model allows) for generic modules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.export import Dim

from hadaconv.errors import HadaconvError, command

__all__ = ["ExportSpec", "Kind", "detect_kind", "has_segments", "make_spec", "segment_types"]

Kind = Literal["causal-lm", "encoder", "classifier", "module"]

#: Example sizes for tracing.  The sequence is >= 2 (with 1, SDPA's ``is_causal`` becomes a
#: SymBool and the export fails) and the past >= 1 (a past of 0 still runs in ONNX Runtime).
_BATCH, _SEQ, _PAST = 2, 5, 3


@dataclass
class ExportSpec:
    """Everything ``torch.onnx.export`` needs, plus what the bundle's metadata records."""

    kind: Kind
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Any
    cache: dict[str, Any] | None = None  # num_layers, num_kv_heads, head_dim, position_ids
    extra: dict[str, Any] = field(default_factory=dict)


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def detect_kind(model: nn.Module) -> Kind:
    """``causal-lm`` for Hugging Face models that generate, ``encoder`` for bare backbones taking
    token ids, ``classifier`` for heads on such a backbone, ``module`` for everything else."""
    if _is_hf(model):
        if getattr(model.config, "is_encoder_decoder", False):
            raise HadaconvError(f"{type(model).__name__}: encoder-decoder models cannot be exported yet")
        if model.can_generate():
            return "causal-lm"
        if _accepts(model, "input_ids") and _accepts(model, "attention_mask"):
            return "encoder" if model.base_model is model else "classifier"
    return "module"


# ------------------------------------------------------------------------------ wrappers


class CausalLM(nn.Module):
    """Flat tensors in and out around a Hugging Face causal LM, the cache as per-layer
    (key, value) tuples rebuilt into a ``DynamicCache``."""

    def __init__(self, model: nn.Module, cache: bool, position_ids: bool) -> None:
        super().__init__()
        self.model, self.cache, self.position_ids = model, cache, position_ids

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=None):
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if not self.cache:
            return self.model(**kwargs, use_cache=False).logits
        from transformers import DynamicCache

        out = self.model(**kwargs, cache=DynamicCache(ddp_cache_data=past_key_values), use_cache=True)
        presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


class Encoder(nn.Module):
    """``last_hidden_state`` and its attention-masked mean (``sentence_embedding``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return hidden, pooled


class Classifier(nn.Module):
    """The ``logits`` of a head on a text backbone (given each token's segment where it has them)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **segments).logits


def segment_types(model: nn.Module) -> int | None:
    """The segment types ``model``'s config gives (BERT's ``type_vocab_size``; DeBERTa-v3's 0), or
    None where it gives none."""
    size = getattr(getattr(model, "config", None), "type_vocab_size", None)
    return size if type(size) is int and size >= 0 else None


def has_segments(model: nn.Module) -> bool:
    """Whether ``model`` reads ``token_type_ids`` with two or more segment types: a sentence
    pair's second text is segment 1."""
    return _accepts(model, "token_type_ids") and (segment_types(model) or 0) > 1


def _flatten_output(out: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of a module's output (a tensor, a tuple/list or a dict-like)."""
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    if hasattr(out, "items"):
        pairs = [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
        return [k for k, _ in pairs], [v for _, v in pairs]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return [f"output_{i}" for i in range(len(out))], list(out)
    raise HadaconvError(f"cannot export a module returning {type(out).__name__}: expected tensors, a tuple or a dict")


class Flat(nn.Module):
    """A module called with positional inputs (mapped to its keyword names), returning a tuple."""

    def __init__(self, model: nn.Module, names: list[str], keyword: bool) -> None:
        super().__init__()
        self.model, self.names, self.keyword = model, names, keyword

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.names, inputs))) if self.keyword else self.model(*inputs)
        return tuple(_flatten_output(out)[1])


# ------------------------------------------------------------------------------ specs


def _text_inputs(model: nn.Module, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and a full mask: tracing needs shapes, not meaning."""
    vocab = int(getattr(model.config, "vocab_size", 1000))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(100, vocab - 1), vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    return ids, mask


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating-point type of the model's parameters (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _cache_layout(model: nn.Module) -> dict[str, Any]:
    """Layers, KV heads and head size, read off one tiny forward pass (works for every family,
    whatever its config calls them)."""
    from transformers import DynamicCache

    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=DynamicCache(), use_cache=True)
    layers = out.cache.layers
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise HadaconvError(f"{type(model).__name__}: its KV cache has no per-layer keys/values to export")
    _, heads, _, head_dim = layers[0].keys.shape
    value_dim = layers[0].values.shape[-1]
    return {"num_layers": len(layers), "num_kv_heads": int(heads), "head_dim": int(head_dim),
            "value_head_dim": int(value_dim)}


def make_spec(
    model: nn.Module,
    kind: Kind | None = None,
    *,
    cache: bool = True,
    example_inputs: Any = None,
) -> ExportSpec:
    """The export specification of ``model`` (kind detected when None).

    ``example_inputs`` is required for ``module`` (a tensor, a tuple of tensors or a dict of
    keyword tensors) and ignored otherwise.
    """
    requested, kind = kind, kind or detect_kind(model)
    batch, seq = Dim("batch"), Dim("sequence")
    if kind == "causal-lm":
        position_ids = _accepts(model, "position_ids")
        ids, mask = _text_inputs(model, _BATCH, _SEQ)
        names = ["input_ids", "attention_mask"] + ["position_ids"] * position_ids
        if not cache:
            pos = torch.arange(_SEQ).expand(_BATCH, _SEQ) if position_ids else None
            args: tuple = (ids, mask, pos)
            shapes: tuple = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq} if position_ids else None)
            return ExportSpec(kind, CausalLM(model, False, position_ids), args, names, ["logits"], shapes,
                              extra={"position_ids": position_ids})
        layout = _cache_layout(model)
        n, h, d, dv = layout["num_layers"], layout["num_kv_heads"], layout["head_dim"], layout["value_head_dim"]
        past_len, total = Dim("past_sequence", min=1), Dim("total_sequence")
        dt = model_dtype(model)  # the cache has the model's precision (float16 exports included)
        past = tuple((torch.randn(_BATCH, h, _PAST, d, dtype=dt), torch.randn(_BATCH, h, _PAST, dv, dtype=dt))
                     for _ in range(n))
        full_mask = torch.ones(_BATCH, _PAST + _SEQ, dtype=torch.long)
        pos = torch.arange(_PAST, _PAST + _SEQ).expand(_BATCH, _SEQ) if position_ids else None
        args = (ids, full_mask, pos, past)
        shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq} if position_ids else None,
                  tuple(({0: batch, 2: past_len}, {0: batch, 2: past_len}) for _ in range(n)))
        names += [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        return ExportSpec(kind, CausalLM(model, True, position_ids), args, names, outputs, shapes,
                          cache={**layout, "position_ids": position_ids})
    if kind == "encoder":
        ids, mask = _text_inputs(model, _BATCH, _SEQ)
        return ExportSpec(kind, Encoder(model), (ids, mask), ["input_ids", "attention_mask"],
                          ["last_hidden_state", "sentence_embedding"], ({0: batch, 1: seq}, {0: batch, 1: seq}))
    if kind == "classifier":
        ids, mask = _text_inputs(model, _BATCH, _SEQ)
        args, names = (ids, mask), ["input_ids", "attention_mask"]
        if has_segments(model):  # traced as a pair: each row's first half segment 0, the rest 1
            segments = (torch.arange(_SEQ) >= _SEQ // 2).long().expand(_BATCH, _SEQ)
            args, names = (*args, segments), [*names, "token_type_ids"]
        return ExportSpec(kind, Classifier(model), args, names, ["logits"], ({0: batch, 1: seq},) * len(args))
    if kind != "module":
        raise HadaconvError(f"unknown model kind {kind!r}: expected causal-lm, encoder, classifier or module")
    if example_inputs is None:
        raise HadaconvError(f"a {type(model).__name__} exported as a plain module needs example inputs: give "
                            f"{command('--input-shape', 'example_inputs')}"
                            f"{'' if requested == 'module' else ' (it is no Hugging Face text model hadaconv knows)'}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    keyword = isinstance(example_inputs, dict)
    names = list(example_inputs) if keyword else [f"input_{i}" for i in range(len(example_inputs))]
    args = tuple(example_inputs.values()) if keyword else tuple(example_inputs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise HadaconvError("example inputs must be tensors (a tensor, a tuple or a dict of tensors)")
    wrapper = Flat(model, names, keyword)
    try:
        with torch.no_grad():
            out = model(**dict(zip(names, args))) if keyword else model(*args)
    except Exception as exc:  # a shape mismatch, most often: say so in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HadaconvError(f"{type(model).__name__} fails on the example inputs "
                            f"({', '.join(str(list(a.shape)) for a in args)}): {first}") from None
    out_names = _flatten_output(out)[0]
    # One entry per parameter of Flat.forward: its *inputs, as one tuple.
    shapes = (tuple({i: Dim.AUTO for i in range(a.dim() - 1)} for a in args),)
    return ExportSpec(kind, wrapper, args, names, out_names, shapes)
