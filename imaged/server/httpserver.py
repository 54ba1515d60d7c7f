"""HTTP/1.1 on a trio stream, through h11 (sans-IO, so every byte the peer sends is parsed by a
state machine we drive, never by a framework's guesses).

The server side of the socket API, kept apart from the API itself: this module knows requests,
responses, framing, limits and timeouts; ``imaged.server.api`` knows what the paths mean. A peer
gets a bounded amount of everything: header bytes (h11's incomplete-event limit), body bytes, time
to send a request once idle, time to read a response. One that exceeds a limit gets the documented
error (or, once a response has started, a closed connection) and holds nothing afterwards.
"""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import h11
import trio

SERVER_NAME = b"imaged"


def listen_backlog() -> int:
    """The system's maximum accept queue (``net.core.somaxconn``): a burst of clients that
    connect at once waits there instead of being refused. Python's default is 128."""
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return socket.SOMAXCONN


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1024 * 1024
    idle_seconds: float = 60.0  # keep-alive: from the end of a response to a full request head
    body_seconds: float = 30.0  # from the request head to the end of its body
    send_seconds: float = 30.0  # a client that stops reading its response is dropped


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # still percent-encoded: segments are decoded one by one, after splitting on "/"
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    @property
    def segments(self) -> list[str]:
        return [urllib.parse.unquote(s, errors="strict") for s in self.path.split("/")[1:]]


@dataclass
class Response:
    status: int
    body: Any = None  # JSON-ready; None for an empty body
    headers: list[tuple[str, str]] = field(default_factory=list)


class Emit(Protocol):
    """Send objects as NDJSON lines, together in one chunk (one write, however many)."""

    async def __call__(self, *objs: Any) -> None: ...


@dataclass
class StreamResponse:
    """NDJSON: one JSON object per line, sent as ``produce`` emits it (chunked framing).

    A callback rather than an async iterator, so the producer may run its own nursery (an async
    generator must not yield from inside one).
    """

    status: int
    produce: Callable[[Emit], Awaitable[None]]


Send = Callable[[bytes], Awaitable[None]]


@dataclass
class BodyResponse:
    """Bytes of a known length, under headers the handler chooses (the peer endpoint's
    manifests and blobs): ``produce`` hands them to ``send`` in pieces as it reads them, and
    ``close`` runs once the response is over, sent or not. A HEAD gets the head alone."""

    status: int
    headers: list[tuple[str, str]]
    length: int
    produce: Callable[[Send], Awaitable[None]]
    close: Callable[[], None] = lambda: None


Handler = Callable[[Request], Awaitable[Response | StreamResponse | BodyResponse]]


def reason(status: int) -> bytes:
    """The standard reason phrase: a client that shows it should not show an empty one."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


class _PeerGone(Exception):
    """The peer closed, broke the protocol or ran out of time: close without a response."""


class Connection:
    """One client connection: requests in turn (keep-alive), each answered before the next."""

    def __init__(self, stream: trio.abc.Stream, handler: Handler, limits: Limits,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.stream = stream
        self.handler = handler
        self.limits = limits
        self.draining = draining  # the server is stopping: no request after the current one
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.busy = False  # a request is being handled: shutdown lets it finish
        self.method = ""  # of the request being answered: a HEAD's answer has no body

    async def serve(self) -> None:
        try:
            while True:
                request = await self._read_request()
                if request is None:
                    return
                self.busy = True
                try:
                    await self._respond(request)
                finally:
                    self.busy = False
                if self.conn.our_state is h11.MUST_CLOSE or self.draining():
                    return
                self.conn.start_next_cycle()
        except _PeerGone:
            return
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.stream.aclose()

    async def _receive(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _PeerGone from exc
        self.conn.receive_data(bytes(data))

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._protocol_error(exc)
                raise _PeerGone from exc
            if event is h11.NEED_DATA:
                await self._receive()
                continue
            return event

    async def _read_request(self) -> Request | None:
        """The next request, or None when the peer is done (EOF, idle timeout)."""
        event: Any = None
        self.method = ""
        with trio.move_on_after(self.limits.idle_seconds):
            event = await self._next_event()
        if not isinstance(event, h11.Request):
            return None  # EOF (ConnectionClosed) or idle: nothing to answer
        self.method = event.method.decode("ascii")
        # h11's own limit only covers a head still arriving; one that came whole is measured here.
        if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > \
                self.limits.max_header_bytes:
            await self._refuse(431, f"request head exceeds {self.limits.max_header_bytes} bytes")
        target = event.target.decode("ascii")
        headers = {k.decode("ascii").lower(): v.decode("latin-1") for k, v in event.headers}
        path, _, query = target.partition("?")
        length = headers.get("content-length")
        if length is not None and int(length) > self.limits.max_body_bytes:
            await self._refuse(413, f"request body of {length} bytes exceeds the "
                               f"{self.limits.max_body_bytes}-byte limit")
            return None
        body = bytearray()
        with trio.move_on_after(self.limits.body_seconds) as scope:
            while True:
                part = await self._next_event()
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > self.limits.max_body_bytes:
                        await self._refuse(413, "request body exceeds the "
                                           f"{self.limits.max_body_bytes}-byte limit")
                        return None
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed mid-body
                    return None
        if scope.cancelled_caught:
            await self._refuse(408, "request body not received in time")
            return None
        try:
            parsed_query = urllib.parse.parse_qs(query, keep_blank_values=True,
                                                 strict_parsing=False, errors="strict")
        except UnicodeDecodeError:
            parsed_query = {"": ["\ufffd"]}  # the API refuses unknown parameters by name
        return Request(self.method, path, parsed_query, headers, bytes(body))

    async def _respond(self, request: Request) -> None:
        """Answer ``request``; a HEAD gets the head a GET would, and no body (RFC 9110 9.3.2)."""
        result = await self.handler(request)
        if isinstance(result, StreamResponse):  # only POST routes stream
            await self._stream(result)
            return
        if isinstance(result, BodyResponse):
            try:
                await self._body(result, request.method)
            finally:
                result.close()
            return
        body = b"" if result.body is None else json.dumps(result.body).encode() + b"\n"
        headers = [("Content-Length", str(len(body))), *result.headers]
        if body:
            headers.append(("Content-Type", "application/json"))
        await self._send(self._response(result.status, headers))
        if body and request.method != "HEAD":
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _body(self, result: BodyResponse, method: str) -> None:
        """A body that fails half-way (its file unreadable) cannot be framed any more: the
        connection is closed, and the peer sees a short body, which it must not trust."""
        await self._send(self._response(result.status, [
            ("Content-Length", str(result.length)), *result.headers]))
        if method != "HEAD":
            async def send(data: bytes) -> None:
                await self._send(h11.Data(data=data))

            try:
                await result.produce(send)
            except OSError as exc:
                raise _PeerGone from exc
        try:
            await self._send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:  # fewer bytes than the Content-Length said
            raise _PeerGone from exc

    async def _stream(self, result: StreamResponse) -> None:
        """Send objects as they come. A peer that hangs up cancels the producer: what it was
        waiting for goes on only if someone else waits on it too, which is the producer's
        business, not ours."""
        await self._send(self._response(result.status, [("Content-Type", "application/x-ndjson")]))

        async def emit(*objs: Any) -> None:
            await self._send(h11.Data(data=b"".join(json.dumps(o).encode() + b"\n"
                                                    for o in objs)))

        hung_up = False

        async def watch(scope: trio.CancelScope) -> None:
            """While a stream is being sent the peer should say nothing; EOF means it left."""
            nonlocal hung_up
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
                if not data:
                    hung_up = True
                    scope.cancel()
                    return
                self.conn.receive_data(bytes(data))  # pipelined: h11 keeps it for later

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, nursery.cancel_scope)
                await result.produce(emit)
                await self._send(h11.EndOfMessage())
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _, rest = group.split(_PeerGone)
            if rest is not None:
                raise
            raise _PeerGone from None
        if hung_up:
            raise _PeerGone

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if not data:
            return
        try:
            with trio.fail_after(self.limits.send_seconds):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                OSError) as exc:
            raise _PeerGone from exc

    def _response(self, status: int, headers: list[tuple[str, str]]) -> h11.Response:
        return h11.Response(status_code=status, reason=reason(status), headers=[
            (b"Server", SERVER_NAME), *((k.encode(), v.encode()) for k, v in headers)])

    async def _refuse(self, status: int, message: str) -> None:
        """Answer a request we will not read to the end, then close."""
        body = json.dumps(error_body("invalid", message)).encode() + b"\n"
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise _PeerGone
        await self._send(self._response(status, [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Connection", "close")]))
        if self.method != "HEAD":
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())
        raise _PeerGone

    async def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
        with trio.move_on_after(self.limits.send_seconds), contextlib.suppress(_PeerGone):
            await self._refuse(status, f"malformed HTTP request: {exc}")
