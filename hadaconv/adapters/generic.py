"""The fallback for architectures without an adapter: every square ``nn.Linear`` whose qualified
name matches a regular expression (``re.search``) is converted with the affine fit.

Each match is its own single-"head" layer (``num_heads = 1``, ``head_dim`` = width) with nothing
to fold into (``value=None``).  Never picked automatically: ``find_adapter(model, target=REGEX)``
(``--target REGEX``) asks for it.
"""

from __future__ import annotations

import re

from torch import nn

from hadaconv.adapters.base import Adapter, AttentionLayer, WeightSlot
from hadaconv.adapters.common import hf_kind
from hadaconv.adapters.mha import prepare_mha
from hadaconv.errors import HadaconvError, option
from hadaconv.nn import HadamardProjection


def _candidates(model: nn.Module, regex: re.Pattern[str]) -> list[tuple[str, nn.Module]]:
    # Converted layers stay in the list so the indices of the others do not shift.
    return [
        (name, m)
        for name, m in model.named_modules()
        if name
        and regex.search(name)
        and (
            isinstance(m, HadamardProjection)
            or (isinstance(m, nn.Linear) and m.in_features == m.out_features)
        )
    ]


def generic_adapter(pattern: str) -> Adapter:
    """An adapter converting the square ``nn.Linear`` layers whose names match ``pattern``."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise HadaconvError(f"invalid {option('target')} regular expression {pattern!r}: {exc}") from None

    def layers(model: nn.Module) -> list[AttentionLayer]:
        found = []
        for index, (name, module) in enumerate(_candidates(model, regex)):
            if isinstance(module, nn.Linear):
                parent_name, _, attr = name.rpartition(".")
                found.append(
                    AttentionLayer(
                        index=index,
                        name=name,
                        out_name=name,
                        parent=model.get_submodule(parent_name),
                        attr=attr,
                        out=WeightSlot(module.weight, module.bias),
                        value=None,
                        num_heads=1,
                        num_kv_heads=1,
                        head_dim=module.in_features,
                    )
                )
        return found

    return Adapter(
        name=f"target:{pattern}",
        matches=lambda model: bool(_candidates(model, regex)),
        layers=layers,
        kind=hf_kind,
        # A matching nn.MultiheadAttention.out_proj is only used once the MHA is made hookable.
        prepare=prepare_mha,
    )
