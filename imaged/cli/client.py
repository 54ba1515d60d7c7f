"""The CLI's side of the socket API: plain blocking HTTP over AF_UNIX, standard library only.

A command that goes through the daemon should start as fast as ``ctr``: this module imports
neither trio nor requests nor the service, so the CLI loads them only when it runs embedded.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imaged.errors import InternalError, error_from_json


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def segment(text: str) -> str:
    """A reference or name as one path segment (DESIGN §5: ``%2F`` for its slashes)."""
    return urllib.parse.quote(text, safe="")


class DaemonClient:
    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = path
        self._conn = _UnixConnection(path, timeout)

    def close(self) -> None:
        self._conn.close()

    def _send(self, method: str, target: str, body: Any) -> http.client.HTTPResponse:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            self._conn.request(method, target, body=payload, headers=headers)
            return self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise InternalError(f"lost the daemon on {self.path}: {exc}") from None

    def call(self, method: str, target: str, body: Any = None) -> Any:
        """One request; the JSON result, or the daemon's error raised as an ImagedError."""
        resp = self._send(method, target, body)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise InternalError(f"lost the daemon on {self.path}: {exc}") from None
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            raise InternalError(f"the daemon on {self.path} answered {resp.status} with "
                                "a body that is not JSON") from None
        if resp.status >= 400:
            raise error_from_json(decoded)
        return decoded

    def stream(self, method: str, target: str, body: Any) -> Iterator[dict[str, Any]]:
        """An NDJSON response, object by object as the daemon sends them."""
        resp = self._send(method, target, body)
        if resp.status >= 400:
            try:
                decoded = json.loads(resp.read())
            except ValueError:
                decoded = None
            raise error_from_json(decoded)
        try:
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise InternalError(f"lost the daemon on {self.path} mid-stream: {exc}") from None


def daemon_for(socket_path: Path, root: Path) -> DaemonClient | None:
    """A client of the daemon on ``socket_path`` if one answers for this very root; None means
    run embedded (DESIGN §4). A daemon for another root is not ours to use."""
    if not socket_path.is_socket():
        return None
    client = DaemonClient(socket_path)
    try:
        info = client.call("GET", "/v1/info")
    except (InternalError, OSError):
        client.close()
        return None
    except BaseException:
        client.close()
        raise
    served = info.get("root") if isinstance(info, dict) else None
    if not isinstance(served, str) or os.path.realpath(served) != os.path.realpath(root):
        client.close()
        return None
    return client
