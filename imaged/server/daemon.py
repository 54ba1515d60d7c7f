"""``imaged serve``: the store behind a Unix socket, for runtimes and for the CLI.

The daemon is the embedded service plus three things: a socket (made 0660, group ``imaged``
when that group exists, or handed over by systemd's socket activation), a check of every peer's
credentials before its first request is read, and a shutdown that lets requests in flight finish
(for a grace period, then cancels them: a cancelled pull rolls back like a failed one). Mounts
stay in place when the daemon stops, as containerd's do, and so do the fuse servers that serve
some of them; the next start reconciles them (``Store.recover``) and watches every mount a
process serves, remounting one whose server dies (``Service.watch_mounts``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import trio

from imaged.config import Config
from imaged.errors import ConflictError, InvalidError
from imaged.ops.service import Service
from imaged.server.api import Api
from imaged.server.httpserver import (
    Connection,
    Limits,
    Request,
    Response,
    StreamResponse,
    error_body,
    listen_backlog,
)
from imaged.server.peercred import ADMIN_GROUP, Peer, admin_gid, peer_of
from imaged.server.registry import PeerEndpoint, listening
from imaged.server.stalls import watching

log = logging.getLogger("imaged.server.daemon")

SHUTDOWN_GRACE_SECONDS = 10.0
MAX_CONNECTIONS = 512
MAX_FORBIDDEN_CONNECTIONS = 32
FORBIDDEN_LIMITS = Limits(idle_seconds=5.0, body_seconds=5.0, send_seconds=5.0)
_SD_LISTEN_FDS_START = 3
# A task step this long is logged (imaged.server.stalls): the issue 17 bound on how long any
# request may wait for the loop, where each blocking write to a slow disk costs its latency.
STALL_SECONDS = 0.1


def _activated_socket() -> socket.socket | None:
    """The listening socket systemd passed us (sd_listen_fds(3)), if it did."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS"):
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    sock = socket.socket(fileno=_SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise InvalidError("the socket systemd passed is not a Unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    return sock


def _bind(path: Path) -> socket.socket:
    """Bind ``path`` as a 0660 socket; a stale one is replaced, a live one is someone else's."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody answers: left by a daemon that died
        else:
            raise ConflictError(f"socket {path} is served by another running daemon")
        finally:
            probe.close()
    elif path.exists() or path.is_symlink():
        raise ConflictError(f"{path} exists and is not a socket; refusing to replace it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # no window in which the socket is more open than 0660
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    gid = admin_gid()
    os.chown(path, 0, gid if gid is not None else 0)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP)
    sock.listen(listen_backlog())
    return sock


def _notify_ready() -> None:
    """sd_notify(READY=1) for Type=notify units: clients may connect from now on."""
    where = os.environ.pop("NOTIFY_SOCKET", None)
    if not where:
        return
    address = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
            contextlib.suppress(OSError):
        sock.sendto(b"READY=1", address)


class Server:
    def __init__(self, service: Service, listener: socket.socket, limits: Limits,
                 peers: PeerEndpoint | None = None) -> None:
        self.service = service
        self.peers = peers  # the OCI endpoint for other nodes (imaged serve --registry-addr)
        self.api = Api(service)
        self.confined_api = Api(service, confined=True)  # for members of the group, not root
        self.listener = trio.socket.from_stdlib_socket(listener)
        self.limits = limits
        self.admin_gid = admin_gid()
        self.connections: dict[Connection, trio.CancelScope] = {}
        self.forbidden: dict[Connection, trio.CancelScope] = {}  # peers that get only a 403
        self.draining = False

    async def run(self, signals: AsyncIterator[int]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept, nursery)
            if self.peers is not None:
                nursery.start_soon(self.peers.run)
            _notify_ready()
            async for signum in signals:
                log.info("%s: finishing requests in flight, then stopping",
                         signal.Signals(signum).name)
                break
            self.drain()
            nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_SECONDS + 1

    def drain(self) -> None:
        """Stop accepting; close idle connections now and busy ones after their request."""
        self.draining = True
        self.listener.close()
        if self.peers is not None:
            self.peers.drain()
        for scope in self.forbidden.values():
            scope.cancel()
        for conn, scope in self.connections.items():
            if conn.busy:
                scope.deadline = trio.current_time() + SHUTDOWN_GRACE_SECONDS
            else:
                scope.cancel()

    async def _accept(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = await self.listener.accept()
            except (trio.ClosedResourceError, OSError):
                if self.draining:  # drain() closed the listener under us
                    return
                raise
            try:
                peer = peer_of(sock)
            except OSError:
                sock.close()
                continue
            allowed = peer.allowed(self.admin_gid)
            pool, limit = ((self.connections, MAX_CONNECTIONS) if allowed
                           else (self.forbidden, MAX_FORBIDDEN_CONNECTIONS))
            if len(pool) >= limit:
                log.warning("refusing a connection from %s: %d %s already open",
                            peer.describe(), limit, "" if allowed else "forbidden ")
                sock.close()
                continue
            nursery.start_soon(self._serve, trio.SocketStream(sock), peer, allowed)

    async def _serve(self, stream: trio.SocketStream, peer: Peer, allowed: bool) -> None:
        """One connection, to its end. Whatever goes wrong in it ends it alone: nothing a peer
        sends may end the daemon."""
        if allowed:
            api = self.api if peer.uid == 0 else self.confined_api
            conn = Connection(stream, api.handle, self.limits, draining=lambda: self.draining)
            pool = self.connections
        else:
            # Refused peers get one answer, little time to ask, and slots of their own, so
            # that they can never crowd out root.
            conn = Connection(stream, self._forbid(peer), FORBIDDEN_LIMITS,
                              draining=lambda: True)
            pool = self.forbidden
        with trio.CancelScope() as scope:
            pool[conn] = scope
            try:
                await conn.serve()
            except Exception:
                log.exception("connection from %s failed; closed it", peer.describe())
            finally:
                del pool[conn]

    def _forbid(self, peer: Peer) -> Callable[[Request], Awaitable[Response | StreamResponse]]:
        async def forbidden(request: Request) -> Response:
            log.warning("refused %s %s from %s: not root, not in group %s", request.method,
                        request.path, peer.describe(), ADMIN_GROUP)
            return Response(403, error_body(
                "forbidden", f"{peer.describe()} may not use this daemon: root or members of "
                f"group {ADMIN_GROUP!r} only"), [("Connection", "close")])

        return forbidden


@contextlib.contextmanager
def _listening(config: Config) -> Iterator[socket.socket]:
    activated = _activated_socket()
    sock = activated or _bind(config.socket)
    try:
        yield sock
    finally:
        sock.close()
        if activated is None:
            with contextlib.suppress(FileNotFoundError):
                config.socket.unlink()


async def serve(config: Config, limits: Limits | None = None) -> None:
    # SIGTERM is handled from before the socket listens: a client may stop a daemon as soon as
    # it can connect, and that must be a clean stop, not death by the default action.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with Service.open(config, "imaged serve") as service:
            for note in service.store.recovered:
                log.info("recovery: %s", note)
            service.watch_mounts()
            with _listening(config) as sock, listening(config.registry_addr) as peer_sock:
                log.info("serving root %s on %s", config.root, sock.getsockname())
                peers = None
                if peer_sock is not None:
                    log.info("serving this root's images read-only to peers on %s",
                             config.registry_addr)
                    peers = PeerEndpoint(service.store, peer_sock)
                # Watched from here: recovery at open runs before anyone can connect.
                async with watching(
                        STALL_SECONDS, lambda stall: log.warning("%s", stall.describe()),
                        service.store.root,
                        lambda call: log.warning("%s", call.describe())) as watch:
                    await Server(service, sock, limits or Limits(), peers).run(signals)
                log.info("longest event-loop step: %s", watch.longest.describe())
                log.info("longest wake-up delay of a daemon thread (waiting for the GIL or the "
                         "CPU): %.0f ms", watch.wake_delay * 1000)
                log.info("calls on the event loop that waited on the root's disk: %d",
                         watch.disk_calls)
    log.info("stopped")
