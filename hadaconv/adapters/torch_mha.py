"""PyTorch's own ``nn.MultiheadAttention``, wherever it sits (``nn.TransformerEncoderLayer``,
``nn.TransformerDecoderLayer``, ``nn.Transformer`` or any custom module).

``prepare`` swaps each one for :class:`~hadaconv.adapters.mha.HookableMultiheadAttention`, which
calls ``out_proj`` as a module.  Its value projection is rows ``2E:3E`` of the packed
``in_proj_weight`` (or all of ``v_proj_weight`` when key/value widths differ, with the bias
still at ``2E:3E`` of ``in_proj_bias``).  With ``add_bias_kv`` the learned ``bias_v`` is the
value of an extra key/value position; it joins the slot as an extra column (see
:class:`~hadaconv.adapters.base.WeightSlot`), so a folded value map transforms it as well.
"""

from __future__ import annotations

import torch
from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer, ModelKind, WeightSlot
from hadaconv.adapters.mha import HookableMultiheadAttention, prepare_mha
from hadaconv.errors import HadaconvError


def _matches(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def _value_slot(mha: HookableMultiheadAttention) -> WeightSlot:
    e = mha.embed_dim
    rows = torch.arange(2 * e, 3 * e)
    if mha._qkv_same_embed_dim:
        return WeightSlot(mha.in_proj_weight, mha.in_proj_bias, rows=rows, column=mha.bias_v)
    return WeightSlot(mha.v_proj_weight, mha.in_proj_bias, bias_rows=rows, column=mha.bias_v)


def _layers(model: nn.Module) -> list[AttentionLayer]:
    if type(model) is nn.MultiheadAttention:
        raise HadaconvError("a bare nn.MultiheadAttention cannot be converted in place (it never calls out_proj as a "
                            "module): pass HookableMultiheadAttention.from_module(mha) from hadaconv.adapters.mha, "
                            "or the module that holds it")
    prepare_mha(model)
    layers = []
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, HookableMultiheadAttention)]
    for index, (name, mha) in enumerate(modules):
        out = mha.out_proj
        if not isinstance(getattr(out, "weight", None), torch.Tensor):
            continue  # already converted; indices of the others stay put
        layers.append(
            AttentionLayer(
                index=index,
                name=name,
                out_name=f"{name}.out_proj" if name else "out_proj",
                parent=mha,
                attr="out_proj",
                out=WeightSlot(out.weight, out.bias),
                value=_value_slot(mha),
                num_heads=mha.num_heads,
                num_kv_heads=mha.num_heads,
                head_dim=mha.head_dim,
            )
        )
    return layers


def _kind(model: nn.Module) -> ModelKind:
    return "module"


ADAPTER = Adapter(name="torch_mha", matches=_matches, layers=_layers, kind=_kind, prepare=prepare_mha)
