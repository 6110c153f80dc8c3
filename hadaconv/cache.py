"""hadaconv's cache folder: the real models' files (:mod:`hadaconv.realmodels`) and the text
sampled from each model (:mod:`hadaconv.sample`) live under one root."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$HADACONV_CACHE``, else ``$XDG_CACHE_HOME/hadaconv`` (the XDG base directory rule, as
    huggingface_hub and pip follow it), else ``~/.cache/hadaconv``; not created here."""
    if os.environ.get("HADACONV_CACHE"):
        return Path(os.environ["HADACONV_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hadaconv"
