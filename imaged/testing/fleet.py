"""A fleet on one machine: nodes that are roots of their own, each with a config naming its
mirrors, each pulling in a process of its own, and a node serving its root to the others.

For ``tests/integration/test_fleet.py``, ``tests/integration/test_node_mirror.py`` and
``imaged bench fleet``. Every process is started here and stopped here, by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 30.0
# What a node must not inherit from the machine it runs on: another config, credentials, a
# daemon's socket, a root.
_HOST_VARIABLES = ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "IMAGED_ROOT",
                   "IMAGED_DRIVER", "IMAGED_CONFIG", "IMAGED_SOCKET", "NOTIFY_SOCKET",
                   "LISTEN_PID", "LISTEN_FDS")


@dataclass(frozen=True)
class Node:
    """One node: ``workdir`` holds its root, its config and its home."""

    workdir: Path
    registry_host: str  # the registry its images come from, as references name it

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def config(self) -> Path:
        return self.workdir / "imaged.toml"

    def configure(self, mirrors: Sequence[str] = (), extra: str = "") -> Node:
        """(Re)write the node's config: its mirrors for ``registry_host``, in order."""
        (self.workdir / "home").mkdir(parents=True, exist_ok=True)
        text = f'certs_dirs = ["{self.workdir / "certs.d"}"]\n'
        if mirrors:
            text += (f'[registries."{self.registry_host}"]\n'
                     f"mirrors = {json.dumps(list(mirrors))}\n")
        self.config.write_text(text + extra)
        return self

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _HOST_VARIABLES}
        return {**env, "HOME": str(self.workdir / "home"), "IMAGED_CONFIG": str(self.config),
                "IMAGED_SOCKET": str(self.workdir / "no-daemon.sock")}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "imaged", "--root", str(self.root), *args]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``imaged ARGS`` on this node, to its end (killed, by subprocess.run, at
        ``timeout``)."""
        return subprocess.run(self.command(*args), capture_output=True, text=True,
                              env=self.env(), timeout=timeout, check=False)

    def start(self, *args: str) -> subprocess.Popen[str]:
        """``imaged ARGS`` on this node, running; the caller waits for it (see ``finish``)."""
        return subprocess.Popen(self.command(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env(),
                                stdin=subprocess.DEVNULL)

    @contextlib.contextmanager
    def serving(self, port: int) -> Iterator[str]:
        """``imaged serve --registry-addr 127.0.0.1:PORT`` on this node until the block ends;
        yields the URL its peers list as a mirror."""
        sock_dir = Path(tempfile.mkdtemp(prefix="imd-", dir="/tmp"))  # AF_UNIX: 107 bytes
        log = self.workdir / "serve.log"
        env = {**self.env(), "IMAGED_SOCKET": str(sock_dir / "imaged.sock")}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                self.command("serve", "--registry-addr", f"127.0.0.1:{port}"), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            _wait_for_port(port, proc, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            finish(proc)
            shutil.rmtree(sock_dir, ignore_errors=True)

    def serve_log(self) -> str:
        return (self.workdir / "serve.log").read_text(errors="replace")


def finish(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout: float = 30) -> int:
    """Stop ``proc`` (SIGTERM, then SIGKILL) if it still runs; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"imaged serve exited {proc.returncode}: "
                               f"{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"imaged serve did not listen on {port} within {READY_TIMEOUT} s: "
                       f"{log.read_text(errors='replace')}")
