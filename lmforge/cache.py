"""Where lmforge keeps what it measures or derives on this machine: ``$LMFORGE_CACHE``, else ``~/.cache/lmforge``.

Kept free of heavy imports so that every stage (data workers included) can ask for it::

    from lmforge.cache import cache_dir
    cache_dir() / "peak_flops.json"
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """lmforge's cache of figures measured on this machine: ``$LMFORGE_CACHE``, else ``~/.cache/lmforge``."""
    root = os.environ.get("LMFORGE_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "lmforge"
