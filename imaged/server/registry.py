"""``imaged serve --registry-addr``: this root's images, read-only, over the OCI distribution API.

A node that has pulled an image is a mirror for its peers (as Spegel makes every node one): they
list it in ``registries."HOST".mirrors`` and fetch manifests and blobs from it instead of from
the registry. What it answers is only what the store recorded: ``GET``/``HEAD`` of ``/v2/``, of
manifests by digest and by the tags of recorded names, and of blobs, with ``Range``. Every other
method is 405; there is no catalog, no tag list, no upload, no delete.

The endpoint needs no trust from its clients (a puller verifies every digest), so it has no
authentication; what it must guarantee is the other direction. It never opens a file outside
``content/blobs``: a request names a digest, parsed strictly, and the file opened is the store's
own path for that digest, never a join of request text. And it never slows the node's own work:
its file reads run on a limiter of their own with few threads, its connections are capped, and
every connection has the Unix socket's timeouts (``imaged.server.httpserver`` serves both).

The request parsing and Range rules are pure functions (tested in
``tests/unit/test_registry_endpoint.py``); ``PeerEndpoint`` is the thin shell around them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import trio

from imaged.config import Address
from imaged.digest import Digest
from imaged.errors import ConflictError, InvalidError
from imaged.registry_client.manifest import INDEX_TYPES, MANIFEST_TYPES
from imaged.server.httpserver import (
    BodyResponse,
    Connection,
    Limits,
    Request,
    Response,
    Send,
    listen_backlog,
)
from imaged.store.root import Store

log = logging.getLogger("imaged.server.registry")

MAX_CONNECTIONS = 128
READ_WORKERS = 2  # threads reading blobs for peers: the node's own pulls keep the rest
READ_CHUNK = 1024 * 1024
# No request to this endpoint has a body worth reading; one small enough to read is answered
# 405 like any other unsupported method, a larger one 413 before anything else.
LIMITS = Limits(max_body_bytes=64 * 1024, idle_seconds=30.0, body_seconds=10.0,
                send_seconds=30.0)
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
ALLOWED = ("Allow", "GET, HEAD")

# distribution's grammar for a repository name and a tag (reference/regexp.go).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MAX_REPO = 255
_SERVED_MANIFESTS = frozenset((*MANIFEST_TYPES, *INDEX_TYPES))


# -- the pure part ---------------------------------------------------------------------------


class Refusal(Exception):
    """A request answered with an error, in the distribution API's error format."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Unsatisfiable(Exception):
    """A Range that starts at or past the end of the blob: 416."""


@dataclass(frozen=True)
class Base:
    """``/v2/``: the client's probe that this is a registry."""


@dataclass(frozen=True)
class Manifest:
    repo: str
    tag: str | None
    digest: Digest | None


@dataclass(frozen=True)
class Blob:
    repo: str
    digest: Digest


Target = Base | Manifest | Blob


def parse_target(method: str, path: str) -> Target:
    """What a request asks for. ``path`` is the raw (percent-encoded) path: a repository name
    or tag never needs an escape, so one is simply a name that does not exist."""
    if method not in ("GET", "HEAD"):
        raise Refusal(405, "UNSUPPORTED", f"{method} is not supported: this endpoint is "
                      "read-only (GET and HEAD)")
    if path in ("/v2", "/v2/"):
        return Base()
    if not path.startswith("/v2/"):
        raise Refusal(404, "NOT_FOUND", "not a distribution API path")
    repo, _, rest = path[len("/v2/"):].rpartition("/")
    repo, _, kind = repo.rpartition("/")
    if kind not in ("manifests", "blobs"):
        raise Refusal(404, "NOT_FOUND", "only manifests and blobs are served")
    if len(repo) > _MAX_REPO or not _REPO_RE.fullmatch(repo):
        raise Refusal(404, "NAME_UNKNOWN", "repository name not known")
    if kind == "blobs":
        return Blob(repo, _digest(rest, "BLOB_UNKNOWN"))
    if ":" in rest:
        return Manifest(repo, None, _digest(rest, "MANIFEST_UNKNOWN"))
    if not _TAG_RE.fullmatch(rest):
        raise Refusal(404, "MANIFEST_UNKNOWN", "manifest unknown")
    return Manifest(repo, rest, None)


def _digest(text: str, code: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidError:
        raise Refusal(404, code, "not a digest this endpoint serves") from None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range`` → the inclusive (first, last) byte to send, or None for the whole body.

    One range only, in any of its three forms (``N-``, ``N-M``, ``-K``); a malformed header or
    several ranges are ignored, as RFC 9110 allows, and the whole blob is sent with 200. A
    range starting at or past the end is ``Unsatisfiable``.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not all(p.isascii() and (p.isdigit() or not p) for p in (first, last)):
        return None
    if not first:
        if not last:
            return None
        if int(last) == 0 or size == 0:
            raise Unsatisfiable
        return max(size - int(last), 0), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise Unsatisfiable
    return start, min(int(last), size - 1) if last else size - 1


def pick_name(names: dict[str, Digest], repo: str, tag: str, namespace: str) -> Digest | None:
    """The manifest for ``repo:tag`` among recorded names that end in ``/repo:tag``.

    A client that says which registry it stands in for (``ns``) gets that registry's name or
    nothing; one that does not gets an answer only when a single registry's name fits, so a
    peer never answers ``library/debian:12`` from one registry for a pull from another.
    """
    wanted = {f"{namespace}/{repo}:{tag}"} if namespace else \
        {name for name in names if "/" not in name[:-len(f"/{repo}:{tag}")]}
    found = {names[name] for name in wanted if name in names}
    return found.pop() if len(found) == 1 else None


def error(status: int, code: str, message: str,
          headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, {"errors": [{"code": code, "message": message, "detail": None}]},
                    [API_VERSION, *(headers or [])])


# -- the shell -------------------------------------------------------------------------------


class PeerEndpoint:
    """Accepts peers on a TCP socket and answers them from ``store``."""

    def __init__(self, store: Store, listener: socket.socket, limits: Limits = LIMITS) -> None:
        self.store = store
        self.listener = trio.socket.from_stdlib_socket(listener)
        self.limits = limits
        self.readers = trio.CapacityLimiter(READ_WORKERS)
        self.connections: dict[Connection, trio.CancelScope] = {}
        self.draining = False

    def drain(self) -> None:
        """Stop accepting; close idle connections now and busy ones when their request ends
        (the daemon's grace period bounds that)."""
        self.draining = True
        self.listener.close()
        for conn, scope in self.connections.items():
            if not conn.busy:
                scope.cancel()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, address = await self.listener.accept()
                except (trio.ClosedResourceError, OSError):
                    if self.draining:
                        return
                    raise
                if len(self.connections) >= MAX_CONNECTIONS:
                    log.warning("refusing a peer connection from %s: %d already open",
                                address, MAX_CONNECTIONS)
                    sock.close()
                    continue
                nursery.start_soon(self._serve, trio.SocketStream(sock), address)

    async def _serve(self, stream: trio.SocketStream, address: Any) -> None:
        conn = Connection(stream, self.handle, self.limits, draining=lambda: self.draining)
        with trio.CancelScope() as scope:
            self.connections[conn] = scope
            try:
                await conn.serve()
            except Exception:
                log.exception("peer connection from %s failed; closed it", address)
            finally:
                del self.connections[conn]

    async def handle(self, request: Request) -> Response | BodyResponse:
        try:
            target = parse_target(request.method, request.path)
            if isinstance(target, Base):
                return Response(200, {}, [API_VERSION])
            if isinstance(target, Manifest):
                return await self._manifest(target, request)
            return await self._blob(target.digest, request, "BLOB_UNKNOWN",
                                    "application/octet-stream")
        except Refusal as refusal:
            extra = [ALLOWED] if refusal.status == 405 else []
            return error(refusal.status, refusal.code, refusal.message, extra)

    async def _manifest(self, target: Manifest, request: Request) -> BodyResponse:
        digest = target.digest
        if target.tag is not None:
            namespace = request.query.get("ns", [""])[0]
            names = self.store.meta.names_ending(f"/{target.repo}:{target.tag}")
            digest = pick_name(names, target.repo, target.tag, namespace)
        row = None if digest is None else self.store.meta.blob(digest)
        if digest is None or row is None or row[1] not in _SERVED_MANIFESTS:
            raise Refusal(404, "MANIFEST_UNKNOWN", "manifest unknown")
        return await self._blob(digest, request, "MANIFEST_UNKNOWN", row[1])

    async def _blob(self, digest: Digest, request: Request, code: str,
                    content_type: str) -> BodyResponse:
        row = self.store.meta.blob(digest)
        if row is None:
            raise Refusal(404, code, f"{digest} is not in this node's store")
        fd = _open_blob(self.store.content.path(digest), row[0])
        if fd is None:
            raise Refusal(404, code, f"{digest} is not in this node's store")
        size = row[0]
        headers = [API_VERSION, ("Docker-Content-Digest", str(digest)),
                   ("Content-Type", content_type), ("Accept-Ranges", "bytes")]
        try:
            span = parse_range(request.headers.get("range"), size)
        except Unsatisfiable:
            os.close(fd)
            raise Refusal(416, "RANGE_INVALID", f"the blob has {size} bytes") from None
        status, first, last = 200, 0, size - 1
        if span is not None:
            status, (first, last) = 206, span
            headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))

        async def produce(send: Send) -> None:
            offset = first
            while offset <= last:
                want = min(READ_CHUNK, last + 1 - offset)
                data = await trio.to_thread.run_sync(os.pread, fd, want, offset,
                                                     limiter=self.readers)
                if not data:
                    raise OSError(f"{digest} ended at byte {offset} of {size}")
                await send(data)
                offset += len(data)

        return BodyResponse(status, headers, last + 1 - first, produce,
                            functools.partial(os.close, fd))


def _open_blob(path: os.PathLike[str], size: int) -> int | None:
    """The blob's file, opened without following a symlink, if it is a regular file of the
    recorded size; None otherwise (removed by gc meanwhile, or not what the store recorded)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def listening(address: Address | None) -> Iterator[socket.socket | None]:
    """The peer endpoint's TCP socket, bound before the daemon says it is ready."""
    if address is None:
        yield None
        return
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidError(f"registry address {address}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(listen_backlog())
    except OSError as exc:
        sock.close()
        raise ConflictError(f"cannot listen on {address} for peers: "
                            f"{exc.strerror or exc}") from None
    try:
        yield sock
    finally:
        sock.close()
