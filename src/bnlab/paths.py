"""Where bnlab keeps files it makes for the user: built kernels, downloaded data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$BNLAB_CACHE_DIR, else $XDG_CACHE_HOME/bnlab, else ~/.cache/bnlab."""
    if os.environ.get("BNLAB_CACHE_DIR"):
        return Path(os.environ["BNLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlab"
