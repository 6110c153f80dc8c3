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
#: Unbounded repeats (``*``, ``+``, ``{n,}``) a pattern may hold: k of them in a row (``.*a.*b``)
#: cost up to n^k steps on a name of n characters, which stays instant for a handful.
MAX_OPEN_REPEATS = 3
#: Constructs a layer name never needs, whose insides backtrack beyond these checks.
_REFUSED = {getattr(sre_parse, name, None) for name in ("ATOMIC_GROUP", "GROUPREF_EXISTS", "GROUPREF",
                                                        "POSSESSIVE_REPEAT")} - {None}
_REPEATS = (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT)


def _children(op, arg) -> list:
    """The parsed sub-patterns inside one item: a repeat's body, a group's, an assertion's, or each
    alternative of a branch (none for a single character or an anchor)."""
    if op in _REPEATS:
        return [arg[2]]
    if op is sre_parse.BRANCH:
        return list(arg[1])
    if op is sre_parse.SUBPATTERN:
        return [arg[-1]]
    if op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
        return [arg[1]]
    return []


def _backtracking(items, inside: bool = False) -> str | None:
    """Why a parsed pattern could take time exponential in a name's length, or None.  Under a
    repeat (``*``, ``+``, ``{2,}``) every item must match one fixed width with one alternative:
    ``(a+)+``, ``(.|.)*`` and ``(aa?)+`` split a run of characters between iterations in
    exponentially many ways."""
    for op, arg in items:
        if op in _REFUSED:
            return "uses an atomic group, a conditional, a backreference or a possessive repeat"
        repeats = op in _REPEATS and arg[1] > 1
        if repeats and inside:
            return "repeats a repetition"
        if op is sre_parse.BRANCH and inside:
            return "repeats an alternation"
        why = next(filter(None, (_backtracking(child, inside or repeats) for child in _children(op, arg))), None)
        if not why and repeats:
            width = arg[2].getwidth() if hasattr(arg[2], "getwidth") else (0, 1)
            why = "repeats an item of varying length" if width[0] != width[1] else None
        if why:
            return why
    return None


def _open_repeats(items) -> int:
    """How many unbounded repeats a parsed pattern holds, nested ones included."""
    return sum((op in _REPEATS and arg[1] == sre_parse.MAXREPEAT)
               + sum(_open_repeats(child) for child in _children(op, arg)) for op, arg in items)


def compile_target(pattern: str, what: str | None = None) -> re.Pattern[str]:
    """``pattern`` compiled, if its matching time is bounded by a low power of a name's length: a
    converted folder records its target, and loading the folder runs it on every module name,
    so a file must not be able to make that hang (a recorded ``^(.|.)*$!`` takes minutes on one
    name of 30 characters).  :func:`_backtracking` and :data:`MAX_OPEN_REPEATS` say what is
    refused.  ``what`` names the pattern in errors (default: the target option, which the
    errors then tell how to rewrite).  Raises HadaconvError for an invalid, overlong or
    refused pattern."""
    name = what or option("target")
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        size = f"{len(pattern)} characters" if isinstance(pattern, str) else type(pattern).__name__
        raise HadaconvError(f"{name} is a regular expression of at most {MAX_PATTERN} characters, not {size}")
    try:
        regex = re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise HadaconvError(f"invalid {name} regular expression '{pattern}': {exc}") from None
    why = _backtracking(parsed)
    why = f"{why}, which can take time exponential in a name's length" if why else None
    if why is None and _open_repeats(parsed) > MAX_OPEN_REPEATS:
        why = f"holds more than {MAX_OPEN_REPEATS} unbounded repeats (* or +), each multiplying the time on a long name"
    if why:
        hint = "" if what else r": name the layers more plainly (e.g. 'layers\.\d+\.attn\.out_proj$')"
        raise HadaconvError(f"{name} '{pattern}' {why}{hint}")
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
