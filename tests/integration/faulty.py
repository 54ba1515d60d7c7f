"""A registry of the tests' own that misbehaves on demand.

A real registry will not drop a connection half-way through a blob or answer 429 when asked, so
this one serves the distribution API (``GET /v2/``, manifests and blobs by path) from a dict of
routes, records every request it parses, and follows a per-route script of faults:

- ``Drop(after)``: send the full headers (Content-Length of the whole body), ``after`` bytes of
  the body, then close the socket;
- ``Reset(after)``: the same, but the socket is aborted with a TCP RST, so the client's read
  fails (``ECONNRESET``) instead of seeing the body end early; unread bytes may be lost with it;
- ``Fail(status, retry_after)``: an error status, optionally with ``Retry-After``;
- ``Hangup()``: close the connection without any response;
- ``Redirect(location)``: 307 to ``location`` (a path of ours, or another host's URL);
- ``Endless(chunked)``: a body that never ends (chunked, or close-delimited without a length);
- ``Oversized(length)``: a huge Content-Length, and bytes until the client gives up;
- ``Gate(after, release)``: ``after`` bytes of the body, then the rest once the test sets
  ``release``: a download held mid-way for exactly as long as a test needs;
- ``Serve()``: the route's bytes, honouring ``Range: bytes=N-`` with 206 unless the route says
  ``honour_range=False`` (then 200 with everything, as some CDNs do).

A route's ``script`` is consumed one action per request; once empty, ``always`` applies. What a
route serves (``data``, ``content_type``, extra ``headers``) is plain data, so a blob whose bytes
do not match its digest, a short or long blob, or a lying Content-Type are just other routes.

It runs ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (port 0) in a background thread, started
and stopped by ``serve()``. imaged tries TLS first on loopback: the ClientHello arrives here as
garbage, is recorded in ``garbage`` and the connection is closed, which sends imaged to plain HTTP.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from imaged.testing.images import OCILayout, file, tar_bytes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCTET = "application/octet-stream"
ENDLESS_CAP = 1024**3  # an endless body still ends somewhere, in case a client never stops
STREAM_CHUNK = 16 * 1024


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Serve:
    pass


@dataclass(frozen=True)
class Drop:
    after: int  # body bytes sent before the connection is closed


@dataclass(frozen=True)
class Reset:
    after: int  # body bytes sent before the connection is reset


@dataclass(frozen=True)
class Fail:
    status: int
    retry_after: str | None = None


@dataclass(frozen=True)
class Hangup:
    """Read the request, then close the connection without a word (a restarting registry)."""


@dataclass(frozen=True)
class Redirect:
    location: str


@dataclass(frozen=True)
class Gate:
    after: int  # body bytes sent before waiting
    release: threading.Event


@dataclass(frozen=True)
class Endless:
    chunked: bool


@dataclass(frozen=True)
class Oversized:
    length: int


Action = Serve | Drop | Reset | Gate | Fail | Hangup | Redirect | Endless | Oversized


@dataclass
class Route:
    data: bytes
    content_type: str = OCTET
    headers: dict[str, str] = field(default_factory=dict)
    script: list[Action] = field(default_factory=list)
    always: Action = field(default_factory=Serve)
    honour_range: bool = True


@dataclass
class Recorded:
    """One parsed request: header names lower-cased; ``time`` is ``time.monotonic()``."""

    method: str
    path: str
    headers: dict[str, str]
    time: float
    action: str
    status: int = 0

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


# -- content ---------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Layer:
    blob: Blob
    diff_id: str


@dataclass(frozen=True)
class Image:
    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]

    @property
    def id(self) -> str:
        return self.manifest.digest


def image_from_layout(layout: OCILayout, manifest_digest: str) -> Image:
    """An image pushed from ``layout``, as this registry serves it (a mirror of the real one)."""
    def blob(digest: str, media_type: str) -> Blob:
        data = (layout.path / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
        assert sha256(data) == digest
        return Blob(data, media_type)

    manifest = blob(manifest_digest, "application/vnd.oci.image.manifest.v1+json")
    doc = json.loads(manifest.data)
    config = blob(doc["config"]["digest"], doc["config"]["mediaType"])
    layers = tuple(Layer(blob(d["digest"], d["mediaType"]), "") for d in doc["layers"])
    return Image(manifest, config, layers)


def make_layer(files: dict[str, bytes]) -> Layer:
    """A gzip layer holding ``files``; gzip's mtime is pinned so equal input gives equal digests."""
    tar = tar_bytes([file(name, data) for name, data in files.items()])
    return Layer(Blob(gzip.compress(tar, compresslevel=1, mtime=0), OCI_LAYER_GZIP), sha256(tar))


def make_image(layers: list[Layer], extra: dict[str, Any] | None = None) -> Image:
    config = Blob(json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        **(extra or {}),
    }).encode(), OCI_CONFIG)
    manifest = Blob(json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor(),
        "layers": [layer.blob.descriptor() for layer in layers],
    }).encode(), OCI_MANIFEST)
    return Image(manifest, config, tuple(layers))


BIG = 512 * 1024  # bytes of incompressible file content in the "big" layer


def noise(seed: int) -> bytes:
    """``BIG`` bytes that gzip cannot shrink, the same for the same seed."""
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(BIG)


def big_image(seed: int = 1) -> Image:
    """Two layers: a small base and a top layer of ``BIG`` random bytes (gzip cannot shrink it)."""
    base = make_layer({"etc/os-release": b"ID=faulty\n"})
    top = make_layer({"big.bin": noise(seed)})
    return make_image([base, top])


def top_layer(image: Image) -> Blob:
    return image.layers[-1].blob


def manifest_path(repo: str, reference: str) -> str:
    return f"/v2/{repo}/manifests/{reference}"


def blob_path(repo: str, digest: str) -> str:
    return f"/v2/{repo}/blobs/{digest}"


# -- the registry ----------------------------------------------------------------------------


class FaultyRegistry:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Recorded] = []
        self.garbage: list[bytes] = []  # what arrived on connections that did not speak HTTP
        self.errors: list[str] = []  # handler exceptions (mostly clients hanging up mid-body)
        self.override: Action | None = None  # applies to every path but /v2/ when set
        self.stopping = threading.Event()
        self.port = 0
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def add(self, path: str, data: bytes, content_type: str = OCTET, **kwargs: Any) -> Route:
        route = Route(data, content_type, **kwargs)
        with self._lock:
            self.routes[path] = route
        return route

    def add_image(self, repo: str, tag: str, image: Image) -> None:
        """Serve ``image`` as a registry would: manifest by tag and digest, config, layers."""
        for reference in (tag, image.id):
            self.add(manifest_path(repo, reference), image.manifest.data,
                     image.manifest.media_type,
                     headers={"Docker-Content-Digest": image.manifest.digest})
        for blob in (image.config, *(layer.blob for layer in image.layers)):
            self.add(blob_path(repo, blob.digest), blob.data,
                     headers={"Docker-Content-Digest": blob.digest})

    def requests_for(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _next(self, method: str, path: str, headers: dict[str, str]) -> tuple[
            Recorded, Route | None, Action]:
        with self._lock:
            route = self.routes.get(path)
            if path in ("/v2", "/v2/"):
                action: Action = Serve()
            elif self.override is not None:
                action = self.override
            elif route is None:
                action = Fail(404)
            elif route.script:
                action = route.script.pop(0)
            else:
                action = route.always
            record = Recorded(method, path, headers, time.monotonic(), repr(action))
            self.requests.append(record)
        return record, route, action

    def _note(self, garbage: bytes | None = None, error: str | None = None) -> None:
        with self._lock:
            if garbage is not None:
                self.garbage.append(garbage)
            if error is not None:
                self.errors.append(error)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close joins every handler thread

    def __init__(self, registry: FaultyRegistry) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.registry = registry

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Record, don't print: clients hanging up mid-body is what half these tests are about."""
        import sys

        exc = sys.exc_info()[1]
        self.registry._note(error=f"{type(exc).__name__}: {exc}")


_ERROR_CODES = {404: "BLOB_UNKNOWN", 429: "TOOMANYREQUESTS", 500: "UNKNOWN", 502: "UNAVAILABLE",
                503: "UNAVAILABLE"}
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5.0  # a client that sends half a request, or stops reading, frees the thread
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: stderr belongs to the CLI under test (capsys reads it)."""

    def handle(self) -> None:
        """Anything that does not start like an HTTP method (a TLS ClientHello) is dropped."""
        try:
            first = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if not first:
            return
        if not first.isupper():
            self.connection.settimeout(0.2)
            data = b""
            with contextlib.suppress(OSError):
                data = self.connection.recv(65536)
            self.server.registry._note(garbage=data)
            self.close_connection = True
            return
        super().handle()

    def do_GET(self) -> None:
        registry = self.server.registry
        path = urllib.parse.urlsplit(self.path).path
        headers = {k.lower(): v for k, v in self.headers.items()}
        record, route, action = registry._next("GET", path, headers)
        self.close_connection = True
        if path in ("/v2", "/v2/"):
            self._simple(record, 200, b"{}", "application/json")
        elif isinstance(action, Hangup):
            self.connection.shutdown(socket.SHUT_WR)
        elif isinstance(action, Redirect):
            self._simple(record, 307, b"", "text/plain", {"Location": action.location})
        elif isinstance(action, Fail):
            body = json.dumps({"errors": [{"code": _ERROR_CODES.get(action.status, "UNKNOWN"),
                                           "message": f"faulty registry: {action.status}"}]})
            extra = {"Retry-After": action.retry_after} if action.retry_after else {}
            self._simple(record, action.status, body.encode(), "application/json", extra)
        elif route is None:  # pragma: no cover - _next answers Fail(404) for unknown paths
            self._simple(record, 404, b"", "application/json")
        elif isinstance(action, Endless | Oversized):
            self._stream(record, route, action)
        else:
            self._body(record, route, action)

    def _start(self, record: Recorded, status: int, headers: dict[str, str]) -> None:
        record.status = status
        self.send_response(status)
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _simple(self, record: Recorded, status: int, body: bytes, content_type: str,
                extra: dict[str, str] | None = None) -> None:
        self._start(record, status, {"Content-Type": content_type,
                                     "Content-Length": str(len(body)), **(extra or {})})
        self.wfile.write(body)

    def _body(self, record: Recorded, route: Route, action: Serve | Drop | Reset | Gate
              ) -> None:
        data = route.data
        status, body = 200, data
        headers = {"Content-Type": route.content_type, **route.headers}
        wanted = record.range if route.honour_range else None
        match = _RANGE_RE.fullmatch(wanted.strip()) if wanted else None
        if match is not None:
            start = int(match[1])
            end = min(int(match[2]), len(data) - 1) if match[2] else len(data) - 1
            if start >= len(data) or end < start:
                self._simple(record, 416, b"", "text/plain",
                             {"Content-Range": f"bytes */{len(data)}"})
                return
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        self._start(record, status, headers)
        if isinstance(action, Drop):
            self.wfile.write(body[:action.after])
            self.wfile.flush()
            # A clean FIN (not an RST: the request was read whole) after a short body.
            self.connection.shutdown(socket.SHUT_WR)
            return
        if isinstance(action, Reset):
            self.wfile.write(body[:action.after])
            self.wfile.flush()
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            return
        if isinstance(action, Gate):
            self.wfile.write(body[:action.after])
            self.wfile.flush()
            stopping = self.server.registry.stopping
            while not action.release.wait(0.05):
                if stopping.is_set():
                    return
            body = body[action.after:]
        self.wfile.write(body)

    def _stream(self, record: Recorded, route: Route, action: Endless | Oversized) -> None:
        headers = {"Content-Type": route.content_type}
        if isinstance(action, Oversized):
            headers["Content-Length"] = str(action.length)
            cap = action.length
        elif action.chunked:
            headers["Transfer-Encoding"] = "chunked"
            cap = ENDLESS_CAP
        else:
            cap = ENDLESS_CAP  # no length at all: the body ends when the connection does
        self._start(record, 200, headers)
        chunk = b'{"padding": "' + b" " * STREAM_CHUNK
        sent = 0
        while sent < cap and not self.server.registry.stopping.is_set():
            piece = chunk[:cap - sent]
            if isinstance(action, Endless) and action.chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
            sent += len(piece)
            chunk = b" " * STREAM_CHUNK


@contextlib.contextmanager
def serve() -> Iterator[FaultyRegistry]:
    """Run a FaultyRegistry until the block ends; stopped (and its threads joined) regardless."""
    registry = FaultyRegistry()
    server = _Server(registry)
    registry.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"faulty-registry-{registry.port}", daemon=True)
    try:
        thread.start()
        yield registry
    finally:
        registry.stopping.set()
        if thread.is_alive():
            server.shutdown()
        server.server_close()
        thread.join(timeout=10)
