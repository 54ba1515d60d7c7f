"""Running the programs imaged drives: e2fsprogs, btrfs-progs, zfs, mount(8), cp, helpers.

One way for all of them, since each failure mode reaches a user: the C locale (output is
parsed, and quoted in our messages), a timeout (a hung tool must not hang a command or the
daemon's worker thread), a missing program named with what provides it, and a failure quoted
from the tool's stderr (else its stdout) on one line.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from imaged.errors import ImagedError, InternalError

ErrorType = Callable[[str], ImagedError]


def completed(argv: Sequence[str], *, timeout: float, provides: str, cwd: Path | None = None,
              input_text: str | None = None, error: ErrorType = InternalError,
              missing: ErrorType | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to its end and return it, whatever its exit status, for callers that read
    the status or the output themselves. ``provides`` says where the program comes from (for
    instance "e2fsprogs (apt-get install e2fsprogs)"); a missing program raises ``missing``
    (default ``error``), a timeout ``error``."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, input=input_text, env={**os.environ, "LC_ALL": "C"},
                              check=False)
    except FileNotFoundError:
        raise (missing or error)(f"{argv[0]} is not installed: {provides}") from None
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None


def failure(argv: Sequence[str], proc: subprocess.CompletedProcess[str]) -> str:
    detail = (proc.stderr.strip() or proc.stdout.strip()).replace("\n", "; ")
    return f"{' '.join(argv)} failed (exit {proc.returncode}): {detail}"


def run(argv: Sequence[str], *, timeout: float, provides: str, cwd: Path | None = None,
        ok: Collection[int] = (0,), error: ErrorType = InternalError,
        missing: ErrorType | None = None) -> str:
    """Run ``argv``; its stdout if it exits with a status in ``ok``, else ``error``."""
    proc = completed(argv, timeout=timeout, provides=provides, cwd=cwd, error=error,
                     missing=missing)
    if proc.returncode not in ok:
        raise error(failure(argv, proc))
    return proc.stdout
