"""Architecture adapters: the only place that knows model families by name.

``find_adapter(model)`` picks the first adapter whose ``matches`` accepts the model;
``attention_layers(model)`` returns its attention blocks.  To add a family, write a small module
with an ``ADAPTER`` and list it in ``_MODULES``.
"""

from __future__ import annotations

import importlib

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer, ModelKind, WeightSlot
from hadaconv.errors import HadaconvError

__all__ = ["Adapter", "AttentionLayer", "ModelKind", "WeightSlot", "attention_layers", "find_adapter"]

# Order matters only where two adapters could claim a model; the generic fallback is never
# picked automatically (it needs --target).
_MODULES = ["llama"]


def adapters() -> list[Adapter]:
    return [importlib.import_module(f"hadaconv.adapters.{m}").ADAPTER for m in _MODULES]


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for this model, or a one-line HadaconvError naming what was found."""
    for adapter in adapters():
        if adapter.matches(model):
            return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    what = f"model_type {model_type!r}" if model_type else type(model).__name__
    raise HadaconvError(
        f"no attention blocks hadaconv knows how to convert in {what} "
        f"(supported: {', '.join(a.name for a in adapters())}); use --target REGEX to convert "
        "matching Linear layers with the affine fit"
    )


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The attention blocks of ``model``, in order (after the adapter's ``prepare``)."""
    adapter = find_adapter(model)
    adapter.prepare(model)
    return adapter.layers(model)
