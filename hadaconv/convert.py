"""Conversion: swap attention output projections for Hadamard projections."""

from __future__ import annotations

import torch
from torch import nn

from hadaconv.adapters import AttentionLayer, attention_layers
from hadaconv.nn import HadamardProjection


def install_projection(layer: AttentionLayer, block: int = 1, bias: bool = True) -> HadamardProjection:
    """Replace ``layer``'s output projection with a fresh (identity-initialised) HadamardProjection.

    The new module gets the old one's device and dtype; returns it.
    """
    old = layer.out_module
    ref = layer.out.weight
    proj = HadamardProjection(layer.width, bias=bias, block=block, device=ref.device, dtype=ref.dtype)
    layer.replace_out(proj)
    del old
    return proj


def patch(model: nn.Module, *, block: int = 1, bias: bool = True, layers: list[int] | None = None) -> nn.Module:
    """The seed paper's from-scratch setting: every detected attention output projection (or
    those of ``layers``) becomes a fresh HadamardProjection.  Modifies and returns ``model``."""
    for layer in attention_layers(model):
        if layers is None or layer.index in layers:
            install_projection(layer, block=block, bias=bias)
    return model
