"""A real registry (Debian's ``docker-registry``, distribution 2.8) on 127.0.0.1, for the demo,
the benchmarks and the tests.

It gets its own config, storage directory and port, and is stopped by the PID we started, so
nothing else on the machine is touched. The config is written as JSON, which the registry's YAML
reader accepts, so no YAML library is needed.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGISTRY_BINARY = "docker-registry"
READY_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TokenAuth:
    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass(frozen=True)
class TLS:
    certificate: Path
    key: Path


# One line of distribution's access log (combined log format).
_ACCESS_RE = re.compile(r'\S+ - \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" '
                        r'(?P<status>[0-9]{3}) (?P<size>[0-9]+) "[^"]*" "(?P<agent>[^"]*)"')


@dataclass(frozen=True)
class Access:
    method: str
    path: str
    status: int
    size: int  # body bytes sent; for a HEAD, the length the GET would have had
    agent: str  # User-Agent: imaged's own, or a cache's (Go-http-client for distribution)


@dataclass
class LocalRegistry:
    """A running registry; ``host`` is ``127.0.0.1:PORT``."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes]
    scheme: str

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def accesses(self, repo: str | None = None) -> list[Access]:
        """Requests the registry answered, in order (under ``/v2/REPO/`` if given): what its
        clients, a pull-through cache among them, really asked of it."""
        out = []
        for line in self.log().splitlines():
            match = _ACCESS_RE.match(line)
            if match and (repo is None or match["path"].startswith(f"/v2/{repo}/")):
                out.append(Access(match["method"], match["path"], int(match["status"]),
                                  int(match["size"]), match["agent"]))
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _config(workdir: Path, port: int, htpasswd: Path | None, token: TokenAuth | None,
            tls: TLS | None, storage: Path | None, proxy: str | None) -> dict[str, Any]:
    http: dict[str, Any] = {"addr": f"127.0.0.1:{port}", "secret": "imaged-local-registry"}
    if tls is not None:
        http["tls"] = {"certificate": str(tls.certificate), "key": str(tls.key)}
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "accesslog": {"disabled": False},
                "formatter": "text"},
        "storage": {"filesystem": {"rootdirectory": str(storage or workdir / "storage")},
                    "delete": {"enabled": True}, "maintenance": {
                        "uploadpurging": {"enabled": False}}},
        "http": http,
    }
    if proxy is not None:
        config["proxy"] = {"remoteurl": proxy}
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "imaged-test", "path": str(htpasswd)}}
    elif token is not None:
        config["auth"] = {"token": {"realm": token.realm, "service": token.service,
                                    "issuer": token.issuer,
                                    "rootcertbundle": str(token.rootcertbundle)}}
    return config


def start_registry(workdir: Path, htpasswd: Path | None = None, token: TokenAuth | None = None,
                   tls: TLS | None = None, port: int | None = None,
                   storage: Path | None = None, proxy: str | None = None) -> LocalRegistry:
    """A registry serving ``storage`` (default ``workdir/storage``); config and log in
    ``workdir``. With ``proxy`` (the upstream's URL) it is a pull-through cache of that
    registry: distribution's ``proxy.remoteurl``, which stores what it fetched for the next
    client."""
    if shutil.which(REGISTRY_BINARY) is None:
        raise FileNotFoundError(f"{REGISTRY_BINARY} not found: run scripts/setup "
                                "(Debian package docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config_path = workdir / "config.yml"
    config = _config(workdir, port, htpasswd, token, tls, storage, proxy)
    config_path.write_text(json.dumps(config, indent=1))
    log = (workdir / "registry.log").open("ab")
    process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config_path)], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    registry = LocalRegistry(workdir, port, process, "https" if tls else "http")
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"registry exited with {process.returncode}: {registry.log()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return registry
        if time.monotonic() > deadline:
            registry.stop()
            raise RuntimeError(f"registry did not answer within {READY_TIMEOUT} s: "
                               f"{registry.log()}")
        time.sleep(0.05)


@contextlib.contextmanager
def local_registry(workdir: Path, **kwargs: Any) -> Iterator[LocalRegistry]:
    registry = start_registry(workdir, **kwargs)
    try:
        yield registry
    finally:
        registry.stop()
