"""A few MiB kept allocated in the root, given back when its filesystem is full.

A full disk must not lock imaged out of the commands that free space: SQLite needs room for its
WAL and shared-memory files and for the pages a deletion touches, and mounting a container to
remove it may need a directory entry. So the root holds ``reserve``, a file of ``RESERVE_BYTES``
allocated blocks (borg keeps one for the same reason). When a command opens the root, or starts
to free space, and the filesystem has less than that left, the reserve is deleted and its room
is what the command works in; it is made again when there is twice its size free.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from imaged.errors import NO_SPACE_ERRNOS

log = logging.getLogger("imaged.store.reserve")

RESERVE_BYTES = 8 * 1024 * 1024
NAME = "reserve"


def _free(root: Path) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def release_if_full(root: Path) -> bool:
    """Delete the reserve when the root's filesystem has less than its size free."""
    path = root / NAME
    if not path.exists() or _free(root) >= RESERVE_BYTES:
        return False
    path.unlink(missing_ok=True)
    log.warning("the filesystem of %s is full: released the %d MiB reserve so that commands "
                "can free space", root, RESERVE_BYTES >> 20)
    return True


def renew(root: Path) -> None:
    """Make the reserve again if it is missing and twice its size is free; best effort."""
    path = root / NAME
    if path.exists() or _free(root) < 2 * RESERVE_BYTES:
        return
    partial = root / f".{NAME}.new"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        finally:
            os.close(fd)
        os.rename(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        if exc.errno not in NO_SPACE_ERRNOS:
            raise
