"""Building a model from its config, and loading weights into it strictly.

Hugging Face configs are checked for depth and for a size their weight files can hold before
anything is allocated; PyTorch's own ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` stacks
are rebuilt from a small JSON recipe (``torch_module`` in config.json).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from hadaconv.errors import HadaconvError, ModelFormatError
from hadaconv.io.files import META_KEY, first_line

__all__ = ["HeadDropped", "MAX_LAYERS", "build_empty", "builder", "causal_lm_class", "check_depth", "check_finite",
           "check_size", "config_file", "hf_config", "hf_from_config", "load_weights", "model_class",
           "model_from_config", "refuse_missing", "resolve_config", "torch_recipe"]


#: Decoder blocks beyond which a config is refused before any model is built: the deepest public
#: LLMs have about 130 (Llama-3.1-405B: 126); more is a damaged or hostile file, whose model
#: would take minutes to build (2^31 blocks: forever) even with no memory behind it.
MAX_LAYERS = 1024


#: Weights a byte of a weight file can hold at most: no format stores one in under a bit.
_PARAMS_PER_BYTE = 8

#: Buffer bytes a model may build beyond its weight files' size.  Buffers are computed at
#: construction from the config (GPT-style causal masks hold n_positions^2 entries), so a
#: few bytes of config.json could otherwise ask for gigabytes before any weight is read.
MAX_BUFFER_BYTES = 256 << 20


def check_finite(model: nn.Module, source: str) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelFormatError(f"{source}: tensor {name} holds NaN or Inf values")


def _shares_tensor(model: nn.Module) -> dict[str, str]:
    """{name: first name} for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly (a tied parameter may be given under either name), or raise
    one line naming the first mismatches."""
    aliases = _shares_tensor(model)
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and not expected & set(state) and all(k.startswith(prefix) for k in state):
        _check_head_named(model, prefix, source)
        state = {k[len(prefix) :]: v for k, v in state.items()}  # weights of a head model, base model built
    for alias, name in aliases.items():  # safetensors' save_model keeps one name of a tied pair, either one
        if name not in state and alias in state:
            state = {**state, name: state[alias]}
    missing = {k for k in expected - set(state) if aliases.get(k) not in state}
    unexpected = set(state) - expected
    if missing or unexpected:
        parts = [
            f"{len(s)} {what} (e.g. {', '.join(sorted(s)[:3])})"
            for s, what in ((missing, "missing"), (unexpected, "unexpected"))
            if s
        ]
        raise ModelFormatError(f"{source}: the weights do not match the model: {'; '.join(parts)}")
    try:
        # assign=True: the model's parameters (meta tensors, see build_empty) become the loaded tensors.
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        msg = " ".join(
            first_line(exc) if i == 0 else line.strip() for i, line in enumerate(str(exc).splitlines()[1:3])
        )
        raise ModelFormatError(f"{source}: the weights do not match the model: {msg}") from None
    for alias, name in aliases.items():  # assign replaced each name separately: tie them again
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(name))
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ModelFormatError(f"{source}: no weights for {len(empty)} tensors (e.g. {', '.join(empty[:3])})")


class HeadDropped(ModelFormatError):
    """:func:`_check_head_named`'s refusal, whose message says all."""


def _check_head_named(model: nn.Module, prefix: str, source: str) -> None:
    """Refuse to drop a head silently: weights under ``prefix`` are a head model's, and for a
    decoder-only model type (a causal LM's weights) a config that names no ``architectures``
    built only the base model.  An encoder's base model is what hadaconv converts: kept."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "architectures", None):
        return  # a base class named on purpose keeps the base model
    causal = causal_lm_class(getattr(config, "model_type", None))
    if causal is None:
        return
    raise HeadDropped(f"{source}: these are a head model's weights (under {prefix!r}), but the config names no "
                       f"architectures, so only the base {type(model).__name__} was built: add one, e.g. "
                       f'"architectures": ["{causal}"]')


def causal_lm_class(model_type: str | None) -> str | None:
    """The name of the causal-LM class of a decoder-only ``model_type`` (an example for a config
    to name); None for other types (encoders, whose masked-LM class says they are not)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return None if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def build_empty(build):
    """``build()`` with every parameter on the meta device (no memory, no random init), to be
    filled by :func:`load_weights`.  Buffers stay real: non-persistent ones (rotary tables) are
    computed at construction and never stored in a checkpoint."""
    from contextlib import nullcontext

    try:
        from accelerate import init_empty_weights
    except ImportError:  # accelerate comes with the hf extra; without it, build normally
        context = nullcontext()
    else:
        context = init_empty_weights(include_buffers=False)
    with context:
        return build()


def hf_config(data: dict):
    import transformers

    data = {k: v for k, v in data.items() if k != META_KEY}
    model_type = data.pop("model_type", None)
    if not model_type:
        raise HadaconvError("config.json has no model_type: not a Hugging Face config")
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # noqa: BLE001 - transformers' validation errors share no base class
        raise HadaconvError(f"cannot build a {model_type!r} config: {first_line(exc)}") from None
    check_depth(config, "config.json")
    return config


def check_depth(config, source) -> None:
    """Refuse a config whose block count is not 1 to :data:`MAX_LAYERS` (ModelFormatError)."""
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not 0 < layers <= MAX_LAYERS:
        raise ModelFormatError(f"{source} declares {layers} layers: not a model hadaconv loads (1 to {MAX_LAYERS})")


def check_size(build, files: list[Path], source) -> None:
    """Refuse a model (``build()``) with more parameters than its weight ``files`` can hold, or
    buffers larger than :data:`MAX_BUFFER_BYTES` and the files together, before anything
    allocates them: a config can ask for terabytes from a few bytes of weights, and buffers
    (GPT-style causal masks of n_positions^2) are built for real even by :func:`build_empty`.
    Counted on a build entirely on the meta device (:func:`build_empty` would allocate each tensor
    for a moment, as accelerate's ``init_empty_weights`` does)."""
    try:
        with torch.device("meta"):
            model = build()
            params = sum(p.numel() for p in model.parameters())
            buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    except Exception:  # noqa: BLE001 - a model whose constructor computes on values: build_empty's build says
        return
    size = sum(f.stat().st_size for f in files)
    if params > _PARAMS_PER_BYTE * size:
        raise ModelFormatError(f"{source}: the config describes {params:,} parameters, more than its weight "
                               f"files can hold ({size:,} bytes)")
    if buffers > MAX_BUFFER_BYTES + size:
        raise ModelFormatError(f"{source}: the config describes {buffers:,} bytes of buffers (masks, position "
                               f"tables), more than {MAX_BUFFER_BYTES >> 20} MiB beside {size:,} bytes of weights: "
                               "a context length no model of this size has")


def refuse_missing(info: dict, source) -> None:
    """transformers only warns about absent weights and initialises them at random; converting a
    partly random model would be silently wrong.  (Unexpected keys are ignored: a checkpoint
    saved with its head but a config naming no architecture loads as the backbone.)"""
    missing = sorted(info.get("missing_keys", [])) + sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])
    )
    if missing:
        raise HadaconvError(
            f"{source}: the weights do not match the config: {len(missing)} missing or mismatched "
            f"(e.g. {', '.join(missing[:3])})"
        )


#: The kinds of Hugging Face models whose heads hadaconv keeps: transformers' auto mappings
#: (``transformers.models.auto.modeling_auto``) listing the classes of each kind.
KEPT_KINDS = {
    "MODEL_MAPPING_NAMES": "encoder or backbone",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "causal LM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "sequence classification",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "token classification",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "masked LM",
}


def _kept_classes() -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for mapping in KEPT_KINDS:
        for value in getattr(modeling_auto, mapping, {}).values():
            names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def model_class(config):
    """The transformers class named first in ``config.architectures`` (the class whose weights
    these are, head included), or ``AutoModel`` when the config names none.

    Raises HadaconvError (one line) for a class transformers lacks or whose kind hadaconv cannot
    keep through convert and export (question answering, encoder-decoder, multimodal, ...):
    loading it as a bare backbone would silently drop its head.
    """
    import transformers

    name = (getattr(config, "architectures", None) or [None])[0]
    if name is None:
        return transformers.AutoModel
    cls = getattr(transformers, name, None)
    if cls is None:
        raise HadaconvError(
            f"config.json names the architecture {name!r}, which transformers {transformers.__version__} does not have")
    if name not in _kept_classes():
        raise HadaconvError(
            f"{name}: hadaconv keeps {', '.join(KEPT_KINDS.values())} models; converting this one would drop its head")
    return cls


def builder(config):
    """A function building the model of the class :func:`model_class` names, from ``config``."""
    import transformers

    cls = model_class(config)
    return (lambda: cls.from_config(config)) if cls is transformers.AutoModel else (lambda: cls(config))


def hf_from_config(config, weights: list[Path] | None = None) -> nn.Module:
    """An empty model (parameters on the meta device, see :func:`build_empty`) of the class named in
    ``architectures`` (see :func:`model_class`); with ``weights`` (its files), refused first
    when they cannot hold it (:func:`check_size`)."""
    build = builder(config)
    try:
        if weights is not None:
            check_size(build, weights, weights[0].parent if len(weights) > 1 else weights[0])
        model = build_empty(build)
    except HadaconvError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config transformers accepted can still fail to build (0 heads)
        raise HadaconvError(f"cannot build a model from the config: {first_line(exc)}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the tied names share one (meta) parameter, as after from_pretrained
    return model


_ACTIVATIONS = {"relu": torch.nn.functional.relu, "gelu": torch.nn.functional.gelu}


def _activation_name(layer: nn.Module) -> str:
    act = layer.activation
    for name, fn in _ACTIVATIONS.items():
        if act is fn or type(act).__name__.lower() == name:
            return name
    raise HadaconvError(
        f"cannot save a Transformer layer with activation {act!r} without pickle (relu or gelu only)"
    )


def torch_recipe(model: nn.Module) -> dict:
    """The JSON recipe rebuilding an ``nn.TransformerEncoder``/``nn.TransformerDecoder`` stack."""
    if not isinstance(model, (nn.TransformerEncoder, nn.TransformerDecoder)):
        raise HadaconvError(
            f"cannot save a {type(model).__name__} without pickle: hadaconv saves Hugging Face models "
            "and nn.TransformerEncoder/nn.TransformerDecoder stacks; save other modules' state_dict yourself"
        )
    layer = model.layers[0]
    attn = layer.self_attn
    recipe = {
        "class": type(model).__name__,
        "num_layers": len(model.layers),
        "layer": {
            "d_model": attn.embed_dim,
            "nhead": attn.num_heads,
            "dim_feedforward": layer.linear1.out_features,
            "dropout": layer.dropout.p,
            "activation": _activation_name(layer),
            "layer_norm_eps": layer.norm1.eps,
            "batch_first": attn.batch_first,
            "norm_first": layer.norm_first,
            "bias": layer.linear1.bias is not None,
        },
        "norm": None,
    }
    if model.norm is not None:
        if not isinstance(model.norm, nn.LayerNorm):
            raise HadaconvError(
                f"cannot save a final norm of type {type(model.norm).__name__} without pickle"
            )
        recipe["norm"] = {"eps": model.norm.eps, "bias": model.norm.bias is not None}
    try:  # what the load will refuse is refused now, before the folder is written
        _check_recipe(recipe)
    except HadaconvError as exc:
        raise HadaconvError(f"cannot save this {type(model).__name__} without pickle: "
                            f"{str(exc).removeprefix('invalid torch_module recipe in config.json: ')}") from None
    return recipe


#: The recipe's layer fields, as :func:`torch_recipe` writes them: name -> (types, check).
_RECIPE_LAYER = {
    "d_model": (int, lambda v: 0 < v <= 1 << 16),
    "nhead": (int, lambda v: v > 0),
    "dim_feedforward": (int, lambda v: 0 < v <= 1 << 20),
    "dropout": ((int, float), lambda v: 0 <= v <= 1),
    "activation": (str, lambda v: v in _ACTIVATIONS),
    "layer_norm_eps": ((int, float), lambda v: 0 < v < 1),
    "batch_first": (bool, None),
    "norm_first": (bool, None),
    "bias": (bool, None),
}


def _recipe_error(what: str) -> HadaconvError:
    return HadaconvError(f"invalid torch_module recipe in config.json: {what}")


def _check_field(name: str, value, types, check) -> None:
    wrong_type = (isinstance(value, bool) and types is not bool) or not isinstance(value, types)
    if wrong_type or (check is not None and not check(value)):
        raise _recipe_error(f"{name} = {value!r:.40} is outside what hadaconv saves and loads")


def _check_recipe(recipe) -> None:
    """The recipe holds exactly what :func:`torch_recipe` writes, in range: it is read from an
    untrusted file and builds modules before any weight is read (an unknown key such as
    ``device`` would reach the constructor, and 10^7 layers are deep-copied one by one)."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("layer"), dict):
        raise _recipe_error("not an object with a 'layer' object")
    if recipe.get("class") not in ("TransformerEncoder", "TransformerDecoder"):
        raise _recipe_error(f"unknown class {recipe.get('class')!r:.40}")
    _check_field("num_layers", recipe.get("num_layers"), int, lambda v: 0 < v <= MAX_LAYERS)
    layer = recipe["layer"]
    unknown = sorted(map(str, layer.keys() - _RECIPE_LAYER.keys()))
    if unknown:
        raise _recipe_error(f"unknown layer field {unknown[0]!r:.40}")
    for name in ("d_model", "nhead"):
        if name not in layer:
            raise _recipe_error(f"the layer has no {name}")
    for name, value in layer.items():
        _check_field(f"layer.{name}", value, *_RECIPE_LAYER[name])
    if layer["d_model"] % layer["nhead"]:
        raise _recipe_error(f"nhead {layer['nhead']} does not divide d_model {layer['d_model']}")
    norm = recipe.get("norm")
    if norm is not None and not (isinstance(norm, dict) and norm.keys() == {"eps", "bias"}):
        raise _recipe_error("norm is neither null nor an object of eps and bias")
    if norm is not None:
        _check_field("norm.eps", norm["eps"], (int, float), _RECIPE_LAYER["layer_norm_eps"][1])
        _check_field("norm.bias", norm["bias"], bool, None)


def _torch_from_recipe(recipe: dict) -> nn.Module:
    _check_recipe(recipe)
    kwargs, d_model, norm = dict(recipe["layer"]), recipe["layer"]["d_model"], recipe.get("norm")
    try:
        final = nn.LayerNorm(d_model, eps=norm["eps"], bias=norm["bias"]) if norm else None
        if recipe["class"] == "TransformerEncoder":
            return nn.TransformerEncoder(nn.TransformerEncoderLayer(**kwargs), recipe["num_layers"], norm=final,
                                         enable_nested_tensor=False)
        return nn.TransformerDecoder(nn.TransformerDecoderLayer(**kwargs), recipe["num_layers"], norm=final)
    except Exception as exc:  # noqa: BLE001 - torch's constructors assert, raise RuntimeError or ValueError
        raise _recipe_error(first_line(exc)) from None


def model_from_config(data: dict, weights: list[Path]) -> nn.Module:
    """The empty model a config.json describes (a Hugging Face config or a torch_module recipe),
    refused when its ``weights`` files cannot hold it."""
    if "torch_module" in data:
        from hadaconv.adapters.mha import prepare_mha

        def build() -> nn.Module:
            return _torch_from_recipe(data["torch_module"])

        check_size(build, weights, weights[0])
        model = build_empty(build)
        prepare_mha(model)
        return model
    return hf_from_config(hf_config(data), weights)


def resolve_config(config: str | os.PathLike) -> Path:
    """The absolute path of the config.json that ``config`` (the file or its folder) names (links
    not followed: a hub cache's blob has no file name to go by)."""
    return config_file(config).absolute()


def config_file(config: str | os.PathLike) -> Path:
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise HadaconvError(f"config not found: {path} (give the model's config.json, or the folder holding it)")
    return path
