"""The root lock: one process owns a root at a time.

flock is released by the kernel when its holder dies, so a stale lock cannot exist; the file's
content only names the holder for the error message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from imaged.errors import RootInUseError


class RootLock:
    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = os.pread(self._fd, 4096, 0).decode(errors="replace").split("\n")
            os.close(self._fd)
            pid = info[0] if info and info[0].isdigit() else "?"
            who = info[1] if len(info) > 1 and info[1] else "another imaged"
            hint = "; use its socket" if who == "imaged serve" else ""
            raise RootInUseError(f"root is in use by {who} (pid {pid}){hint}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n{holder}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = -1
