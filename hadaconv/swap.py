"""The module swap: putting Hadamard projections in place of dense output projections.

``install_projection`` puts a fresh projection (gamma = 1, beta = 0) in a layer's place,
``apply_fit`` installs a fitted one and folds its value-side map into the value projection
(exact algebra, see :mod:`hadaconv.fit`), ``patch`` is the from-scratch path over a whole model.
Loading a converted folder (:mod:`hadaconv.io`) uses these without importing the conversion.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from hadaconv.adapters import AttentionLayer, check_convertible, find_adapter, index_ranges, layer_indices
from hadaconv.errors import HadaconvError, InputError, check_module, option
from hadaconv.fit import FitResult
from hadaconv.nn import HadamardProjection

__all__ = ["apply_fit", "fold_value", "install_projection", "patch"]


def install_projection(layer: AttentionLayer, block: int = 1, bias: bool = True, rank: int = 0) -> HadamardProjection:
    """Replace ``layer``'s output projection with a fresh HadamardProjection (gamma = 1, beta = 0,
    a rank-``rank`` residual with U = 0) of the same geometry (heads x head_dim inputs, the model
    width out; rectangular where they differ), on the old one's device and dtype; returns it.

    Raises HadaconvError (one line) where the layer cannot take one: the check
    :func:`hadaconv.adapters.check_convertible` that ``convert`` makes too.
    """
    check_convertible(layer, block)
    ref = layer.out.weight
    proj = HadamardProjection(layer.width, bias=bias, block=block, out_features=layer.out_features,
                              rank=rank, device=ref.device, dtype=ref.dtype)
    proj.layer_index = layer.index
    layer.replace_out(proj)
    return proj


def patch(model: nn.Module, *, block: int = 1, bias: bool = True, layers: list[int] | None = None,
          target: str | None = None) -> nn.Module:
    """The seed paper's from-scratch setting: every detected attention output projection (or
    those of ``layers``) becomes a fresh HadamardProjection (gamma = 1, beta = 0, to be trained).
    ``target`` (a regular expression over qualified module names) picks square ``nn.Linear``
    layers instead, as ``ConvertConfig.target`` does.  Modifies and returns ``model``.

    Raises:
        InputError: ``model`` not an ``nn.Module``.
        HadaconvError: no attention blocks (or no ``target`` match), a model that holds
            HadamardProjections already (patching it would mix fitted and untrained layers; a
            converted model is trained further with :mod:`hadaconv.distill`), a layer that
            cannot take the block size, or a ``layers`` index the model does not have.
    """
    check_module(model)
    if any(isinstance(m, HadamardProjection) for m in model.modules()):
        raise HadaconvError("the model holds HadamardProjections already: patch starts from a dense model "
                            "(a converted one is trained further by distillation)")
    adapter = find_adapter(model, target)
    adapter.prepare(model)
    found = adapter.layers(model)
    wanted = None if layers is None else set(layer_indices(layers))
    missing = sorted(wanted - {layer.index for layer in found}) if wanted is not None else []
    if missing:
        raise InputError(f"{option('layers')} names {index_ranges(missing)}, but the model's layers are "
                         f"{index_ranges(sorted(layer.index for layer in found))}")
    for layer in found:
        if wanted is None or layer.index in wanted:
            install_projection(layer, block=block, bias=bias)
    return model


def fold_value(layer: AttentionLayer, fit: FitResult) -> None:
    """Multiply each KV head's value rows (and bias) by the fit's value map, in place."""
    if fit.value_map is None:
        return
    w, b = layer.value.get()
    kv, hd = layer.num_kv_heads, layer.head_dim
    vm = fit.value_map.to(w.device, torch.float64)
    wv = w.to(torch.float64).reshape(kv, hd, -1)
    bv = b.to(torch.float64).reshape(kv, hd) if b is not None else None
    if vm.dim() == 1:
        wv = vm.reshape(kv, hd, 1) * wv
        bv = vm.reshape(kv, hd) * bv if bv is not None else None
    else:
        wv = vm @ wv
        bv = (vm @ bv.unsqueeze(-1)).squeeze(-1) if bv is not None else None
    layer.value.set(wv.reshape(w.shape), bv.reshape(-1) if bv is not None else None)


def apply_fit(layer: AttentionLayer, fit: FitResult) -> Callable[[], None]:
    """Fold the value correction and install the fitted projection (with its low-rank residual,
    if any); returns an undo function."""
    old_module = layer.out_module
    old_value = layer.value.get() if layer.value is not None else None
    fold_value(layer, fit)
    proj = install_projection(layer, block=fit.block, rank=fit.rank)
    with torch.no_grad():
        proj.gamma.copy_(fit.gamma.to(proj.gamma.dtype))
        proj.beta.copy_(fit.beta.to(proj.beta.dtype))
        if fit.keep is not None:
            proj.keep.copy_(fit.keep)
        if fit.rank:
            proj.up.copy_(fit.up.to(proj.up.dtype))
            proj.down.copy_(fit.down.to(proj.down.dtype))

    def undo() -> None:
        layer.replace_out(old_module)
        if old_value is not None:
            layer.value.set(*old_value)

    return undo
