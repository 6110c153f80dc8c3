"""The fallback for architectures without an adapter: every square ``nn.Linear`` whose qualified
name matches a regular expression (``re.search``) is converted with the affine fit.

Each match is its own single-"head" layer (``num_heads = 1``, ``head_dim`` = width) with nothing
to fold into (``value=None``).  Never picked automatically: ``find_adapter(model, target=REGEX)``
(``--target REGEX``) asks for it.
"""

from __future__ import annotations

import re

from torch import nn

try:  # the parser behind re.compile (its module was renamed in Python 3.11)
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse

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


#: Longest pattern taken: a module name is a few dozen characters, and so is a pattern for it.
MAX_PATTERN = 1000


def _nested_repeat(items, inside: bool = False) -> bool:
    """Whether a parsed pattern repeats a repetition or an alternation: the shapes whose
    backtracking takes time exponential in the name's length (``(a+)+``, ``(.|.)*``)."""
    for op, arg in items:
        if op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)):
            repeats = arg[1] > 1
            if (inside and repeats) or _nested_repeat(arg[2], inside or repeats):
                return True
        elif op is sre_parse.BRANCH:
            if inside or any(_nested_repeat(branch, inside) for branch in arg[1]):
                return True
        elif op is sre_parse.SUBPATTERN:
            if _nested_repeat(arg[-1], inside):
                return True
        elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            if _nested_repeat(arg[1], inside):
                return True
    return False


def compile_target(pattern: str, what: str | None = None) -> re.Pattern[str]:
    """``pattern`` compiled, if it matches in time linear in a name's length: a converted
    folder records its target, and loading the folder runs it on every module name, so a
    file must not be able to make that hang (a recorded ``^(.|.)*$!`` takes minutes on one
    name of 30 characters).  ``what`` names the pattern in errors (default: the target option,
    which the errors then tell how to rewrite).  Raises HadaconvError for an invalid, overlong
    or nested pattern."""
    name = what or option("target")
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        size = f"{len(pattern)} characters" if isinstance(pattern, str) else type(pattern).__name__
        raise HadaconvError(f"{name} is a regular expression of at most {MAX_PATTERN} characters, not {size}")
    try:
        regex = re.compile(pattern)
        nested = _nested_repeat(sre_parse.parse(pattern))
    except re.error as exc:
        raise HadaconvError(f"invalid {name} regular expression '{pattern}': {exc}") from None
    if nested:
        hint = "" if what else r": name the layers without a group under * or + (e.g. 'layers\.\d+\.attn\.out_proj$')"
        raise HadaconvError(f"{name} '{pattern}' repeats a repetition or an alternation, which can take time "
                            f"exponential in a name's length{hint}")
    return regex


def generic_adapter(pattern: str) -> Adapter:
    """An adapter converting the square ``nn.Linear`` layers whose names match ``pattern``
    (:func:`compile_target` checks it)."""
    regex = compile_target(pattern)

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
