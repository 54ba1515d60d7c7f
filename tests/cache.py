"""What the tests keep between runs on one machine: things slow to make and the same every time
(the guest kernel package, the deep images' registry storage). Delete the directory to start
over; nothing in it is needed for correctness, only for speed."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache() -> Path:
    """``$XDG_CACHE_HOME/imaged`` (default ``~/.cache/imaged``): kept across fresh clones."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imaged"
