"""The exception types users see.

Every failure caused by the user's input (a missing file, an unsupported width, a model with
nothing to convert, ...) raises a HadaconvError whose message is one self-contained line; the CLI
prints it as ``error: <message>`` and exits non-zero, never with a traceback.  The subclasses say
which kind of input was wrong, for callers of the Python API that want to tell them apart:

* :class:`InputError`: an option or argument value (a block size, a shape, a dtype, too little
  text); also a ``ValueError``, as the checks it replaced raised those;
* :class:`ModelFormatError`: a file that should hold a model, a config, a bundle or an op library
  and does not (missing, truncated, corrupt, not finite);
* :class:`OutputError`: an output that may not or cannot be written (it exists, the folder is
  read-only, the disk is full); nothing is left half-written when it is raised.

A message names an option the way its reader gave it (:func:`option`): ``--max-layers 0`` on the
command line, ``max_layers=0`` from Python; a step to take, likewise (:func:`command`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import PurePath
from typing import Any, Iterator

__all__ = ["HadaconvError", "InputError", "ModelFormatError", "OutputError", "check_fields", "check_int", "check_module",
           "check_number", "cli_names", "command", "indefinite", "option", "output_error"]

_CLI_NAMES: ContextVar[bool] = ContextVar("hadaconv_cli_names", default=False)
_NO_VALUE = object()


class HadaconvError(Exception):
    """A user-facing error with a one-line message."""


class InputError(HadaconvError, ValueError):
    """A bad option or argument value."""


class ModelFormatError(HadaconvError):
    """A model, config, bundle or library file that is missing, truncated or corrupt."""


class OutputError(HadaconvError, OSError):
    """An output that may not or cannot be written (an OSError too: the file system's refusals
    arrive as this, with the output named)."""


def output_error(path, exc: Exception) -> OutputError:
    """The one-line error for a failed write of ``path`` (read-only folder, full disk, ...): an
    OSError, or a library's own error type wrapping one (safetensors' SafetensorError)."""
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__
    wrapped = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", reason)  # "No space left on device"
    return OutputError(f"cannot write {path}: {wrapped.group(1) if wrapped else reason}")


@contextmanager
def cli_names() -> Iterator[None]:
    """Inside, :func:`option` names command-line flags (``hadaconv.cli.main`` runs in it)."""
    token = _CLI_NAMES.set(True)
    try:
        yield
    finally:
        _CLI_NAMES.reset(token)


def option(name: str, value: Any = _NO_VALUE, *, flag: str | None = None) -> str:
    """An option as an error message names it: ``--max-layers 0`` (``--overwrite`` for True)
    under :func:`cli_names`, else the Python keyword, ``max_layers=0``.  ``name`` is the keyword;
    ``flag`` the command line's spelling where it is not ``--name`` (``cache=False`` is
    ``--no-cache``: give the whole flag, it is printed without the value)."""
    if _CLI_NAMES.get():
        if flag is not None:
            return flag
        flag = "--" + name.replace("_", "-")
        return flag if value is _NO_VALUE or value is True else f"{flag} {value}"
    return name if value is _NO_VALUE else f"{name}={value!r}"


def check_int(name: str, value: Any, least: int, *, flag: str | None = None) -> None:
    """Raise InputError unless ``value`` is an integer (Python's or numpy's, not a bool) >=
    ``least``; the message names the option as :func:`option` does."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < least:
        raise InputError(f"{option(name, flag=flag)} must be an integer >= {least}, got {value!r}")


def check_module(value: Any, name: str = "model") -> None:
    """Raise InputError unless ``value`` is a torch ``nn.Module`` (the model, not its path, nor
    the ``Loaded`` that :func:`hadaconv.io.load_model` wraps it in)."""
    from torch import nn  # here, not at the top: the CLI's argument checks run without torch

    if isinstance(value, nn.Module):
        return
    got = type(value).__name__
    hint = (" (load_model returns a Loaded: pass its .model)" if got == "Loaded"
            else " (a path: load it with hadaconv.load_model(path).model)" if isinstance(value, (str, PurePath))
            else "")
    raise InputError(f"{name} must be a torch nn.Module, got {got}{hint}")


def check_path(value: Any, name: str, module_hint: str = "") -> None:
    """Raise InputError unless ``value`` is a path (``str`` or ``os.PathLike``): the file or folder
    argument of a public function, named ``name`` in the message; ``module_hint`` is added when
    ``value`` is a model in memory (what takes one instead)."""
    if isinstance(value, (str, os.PathLike)):
        return
    from torch import nn  # here, not at the top: the CLI's argument checks run without torch

    hint = f" ({module_hint})" if module_hint and isinstance(value, nn.Module) else ""
    raise InputError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}{hint}")


def check_number(name: str, value: Any, least: float, *, strict: bool = False) -> None:
    """Raise InputError unless ``value`` is a finite real number >= ``least`` (> with ``strict``)."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        value = value.item()  # a 0-d numpy array or torch tensor holds one number
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > least if strict else value >= least))
    if not ok:
        raise InputError(f"{option(name)} must be a finite number {'>' if strict else '>='} {least}, got {value!r}")


def check_fields(config: Any, ints: dict[str, int], reals: dict[str, tuple[float, bool]] | None = None,
                 flags: dict[str, str] | None = None) -> None:
    """:func:`check_int` on each of a config dataclass's ``ints`` (name: least value) and
    :func:`check_number` on each of its ``reals`` (name: least value, whether the least itself is
    refused); a field whose default is None may be None.  ``flags``: command-line spellings that
    are not ``--`` + the name.

    Raises:
        InputError: the first field that is not a number of its kind in its range.
    """
    optional = {f.name for f in dataclasses.fields(config) if f.default is None}
    flags = flags or {}
    for name, least in ints.items():
        if not (name in optional and getattr(config, name) is None):
            check_int(name, getattr(config, name), least, flag=flags.get(name))
    for name, (least, strict) in (reals or {}).items():
        if not (name in optional and getattr(config, name) is None):
            check_number(name, getattr(config, name), least, strict=strict)


def indefinite(noun: str) -> str:
    """``noun`` after its indefinite article, for messages that name a kind: 'an encoder',
    'a causal-lm', 'a module'."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def command(cli: str, python: str) -> str:
    """A step a message tells its reader to take, in the reader's terms: the command line's
    ``cli`` under :func:`cli_names`, else the Python call ``python``."""
    return cli if _CLI_NAMES.get() else python
