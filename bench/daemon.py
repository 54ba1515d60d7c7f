"""An ``imaged serve`` for a benchmark: started before the timing, stopped by PID after, always."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunningDaemon:
    socket: Path
    pid: int


@contextlib.contextmanager
def imaged_daemon(root: Path, env: dict[str, str],
                  driver: str | None = None) -> Iterator[RunningDaemon]:
    # A short socket path of its own: AF_UNIX paths stop at 107 bytes, scratch paths are long.
    where = Path(tempfile.mkdtemp(prefix="imd-bench-", dir="/tmp"))
    socket_path = where / "imaged.sock"
    args = ["--driver", driver] if driver else []
    proc = subprocess.Popen([sys.executable, "-m", "imaged", "--root", str(root), *args,
                             "--socket", str(socket_path), "serve"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not socket_path.is_socket():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"imaged serve did not start (exit {proc.poll()})")
            time.sleep(0.02)
        yield RunningDaemon(socket_path, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(where, ignore_errors=True)
