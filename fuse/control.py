"""The server's control socket: the driver asks a running server for its usage and changes its
quota there, since the server alone knows what the upper holds while it writes (issue 14).

One JSON request line per connection, one JSON answer line: ``{"op": "usage"}`` answers
``{"used": BYTES, "quota": BYTES|null}``; ``{"op": "set_quota", "quota": BYTES}`` answers
``{"ok": true}`` or ``{"error": "..."}`` (a quota below what the upper already holds is
refused, as the other drivers refuse such a shrink); ``{"op": "shutdown"}`` answers
``{"ok": true}``, then the server unmounts (detached, as libfuse unmounts: files still open
on it fail with ENOTCONN from then on) and exits as it does on SIGTERM. Each op is one entry
of ``OPS``, but ``{"op": "materialize"}``, which copies: it completes the partial files
(``Server.materialize``) and answers ``{"ok": true, "files": N, "bytes": N}``, or
``{"error": "..."}`` when they do not all fit in the quota.

The socket lives in the container's directory, which only root may enter. Its path would often
pass AF_UNIX's 108 bytes under a deep root, so both ends name it through a descriptor of that
directory (``/proc/self/fd/N/control``), which is short whatever the root.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import trio

from imaged.errors import InternalError
from imaged.sizes import shrink_refused

NAME = "control"
USAGE = "usage"  # the count a clean exit leaves beside the socket (imaged.fuse.serve)
_MAX_LINE = 4096
_CLIENT_TIMEOUT = 10.0


class Served(Protocol):
    """The server as its control socket sees it."""

    quota: int | None
    usage: int

    def shutdown(self) -> None:
        """Unmount and exit once the answer is sent."""


class Materializing(Served, Protocol):
    async def materialize(self) -> dict[str, Any]:
        """Complete the partial files, or say why not."""


def _usage(server: Served, request: dict[str, Any]) -> dict[str, Any]:
    return {"used": server.usage, "quota": server.quota}


def _set_quota(server: Served, request: dict[str, Any]) -> dict[str, Any]:
    quota = request.get("quota")
    if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
        return {"error": "quota must be a number of bytes"}
    why = shrink_refused(server.usage, quota)
    if why is not None:
        return {"error": f"the container {why}"}
    server.quota = quota
    return {"ok": True}


def _shutdown(server: Served, request: dict[str, Any]) -> dict[str, Any]:
    server.shutdown()
    return {"ok": True}


OPS: dict[str, Callable[[Served, dict[str, Any]], dict[str, Any]]] = {
    "usage": _usage, "set_quota": _set_quota, "shutdown": _shutdown}


def answer(server: Served, request: Any) -> dict[str, Any]:
    """What the server says to one request (pure, so the rules are tested without a mount)."""
    if not isinstance(request, dict):
        return {"error": "a request is a JSON object"}
    op = request.get("op")
    handler = OPS.get(op) if isinstance(op, str) else None
    if handler is None:
        return {"error": f"unknown op {op!r}"}
    return handler(server, request)


def saved_usage(directory: Path) -> int | None:
    """The count a clean exit left, or None where the upper must be walked (after a kill)."""
    try:
        return int((directory / USAGE).read_text())
    except (FileNotFoundError, ValueError):
        return None


@contextlib.contextmanager
def _short_path(directory: Path) -> Iterator[str]:
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{NAME}"
    finally:
        os.close(fd)


async def serve(server: Materializing, directory: Path) -> None:
    """Answer requests on ``directory/control`` until cancelled, each connection in its own
    task so a long ``materialize`` holds up no other request. A request under way is answered
    even so: a shutdown cancels this task as it ends the server, and its client waits for the
    ``ok``."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        with _short_path(directory) as path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            await listener.bind(path)
        listener.listen(8)
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_one, server, conn)


async def _one(server: Materializing, conn: trio.socket.SocketType) -> None:
    with conn, trio.CancelScope(shield=True):
        await _answer(server, conn)


async def _answer(server: Materializing, conn: trio.socket.SocketType) -> None:
    data = b""
    with trio.move_on_after(_CLIENT_TIMEOUT):
        while b"\n" not in data and len(data) < _MAX_LINE:
            chunk = await conn.recv(_MAX_LINE)
            if not chunk:
                break
            data += chunk
    try:
        request = json.loads(data.split(b"\n", 1)[0])
        if isinstance(request, dict) and request.get("op") == "materialize":
            try:
                reply = await server.materialize()
            except OSError as exc:  # a damaged record or a failing disk: said, not fatal
                reply = {"error": f"materialize failed: {exc.strerror or exc}"}
        else:
            reply = answer(server, request)
    except ValueError:
        reply = {"error": "a request is one line of JSON"}
    with contextlib.suppress(OSError):
        await conn.send((json.dumps(reply) + "\n").encode())


def ask(directory: Path, request: dict[str, Any], timeout: float = _CLIENT_TIMEOUT
        ) -> dict[str, Any]:
    """One request to the server of the container in ``directory`` (blocking, bounded)."""
    with _short_path(directory) as path, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall((json.dumps(request) + "\n").encode())
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(_MAX_LINE)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise InternalError(f"the fuse server of {directory.name} did not answer: "
                                f"{exc.strerror or exc}") from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise InternalError(f"the fuse server of {directory.name} answered nonsense") from None
    return reply
