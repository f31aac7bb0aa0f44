"""Where longattn keeps what it builds once per machine: converted model checkpoints (``hf.loading``) and the
compiled CPU kernel (``ops.block_sparse.native``).

``$LONGATTN_CACHE``, else ``$XDG_CACHE_HOME/longattn``, else ``~/.cache/longattn``; ``LONGATTN_CACHE=off``
(or ``0``, ``false``, ``no``, or empty) turns caching off.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LONGATTN_CACHE"
_OFF = ("", "0", "off", "false", "no")


def cache_dir() -> Path | None:
    """The cache directory (it may not exist yet), or None when caching is off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "longattn"
