"""The root lock: one process owns a root at a time.

flock is released by the kernel when its holder dies, so a stale lock cannot exist; the file's
content only names the holder for the error message. That content is rewritten in place, in a
fixed number of bytes, so naming the holder never needs a new block: a root on a full disk can
still be locked, and so be cleaned up (``imaged rm``, ``gc``).

A command that finds the root held by another command may wait for it, as a package manager
does (``Waiting``); one held by a daemon is never waited for, since the daemon does not let go:
its socket is the way in (DESIGN §2).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imaged.errors import NO_SPACE_ERRNOS, ForbiddenError, RootInUseError

DAEMON = "imaged serve"
_RECORD_BYTES = 256  # pid and holder, padded: always this size, so rewriting allocates nothing
_POLL_SECONDS = 0.2


class RootDeniedError(ForbiddenError):
    """This user may not open the root at all (not root)."""


@dataclass(frozen=True)
class Waiting:
    """Wait up to ``seconds`` for another command's hold; ``notify`` hears who holds it, once
    per holder."""

    seconds: float
    notify: Callable[[str], None]


def _record(holder: str) -> bytes:
    return f"{os.getpid()}\n{holder}\n".encode()[:_RECORD_BYTES].ljust(_RECORD_BYTES, b" ")


class RootLock:
    def __init__(self, path: Path, holder: str, waiting: Waiting | None = None) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:
            raise RootDeniedError(f"permission denied on {path}: only root may use this "
                                  "root") from None
        try:
            self._acquire(waiting)
        except BaseException:
            os.close(self._fd)
            raise
        self._write(_record(holder))

    def _acquire(self, waiting: Waiting | None) -> None:
        deadline = time.monotonic() + (waiting.seconds if waiting else 0)
        told = ""
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pid, who = self._holder()
            held = f"root is in use by {who} (pid {pid})"
            if who == DAEMON:
                raise RootInUseError(f"{held}; use its socket") from None
            if waiting is None or time.monotonic() >= deadline:
                waited = f" (waited {waiting.seconds:g} s)" if waiting and waiting.seconds else ""
                raise RootInUseError(held + waited) from None
            if held != told:
                waiting.notify(f"waiting for the root: {held}")
                told = held
            time.sleep(_POLL_SECONDS)

    def _holder(self) -> tuple[str, str]:
        info = os.pread(self._fd, _RECORD_BYTES, 0).decode(errors="replace").split("\n")
        pid = info[0].strip() if info and info[0].strip().isdigit() else "?"
        who = info[1].strip() if len(info) > 1 and info[1].strip() else "another imaged"
        return pid, who

    def _write(self, record: bytes) -> None:
        """Best effort: on a full disk (a file still at its old, shorter size) the holder goes
        unnamed rather than the command failing."""
        try:
            os.pwrite(self._fd, record, 0)
        except OSError as exc:
            if exc.errno not in NO_SPACE_ERRNOS:
                raise

    def release(self) -> None:
        if self._fd >= 0:
            self._write(b" " * _RECORD_BYTES)
            os.close(self._fd)
            self._fd = -1
