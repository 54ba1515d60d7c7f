"""Who is on the other end of the socket: the kernel's word, not the client's.

SO_PEERCRED gives the peer's uid and primary gid at connect time; supplementary groups (how an
operator is usually made a member of ``imaged``) are only in SO_PEERGROUPS. Both are read once per
connection, before a byte of the request is parsed.
"""

from __future__ import annotations

import errno
import grp
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

ADMIN_GROUP = "imaged"
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux ≥ 4.13; Python 3.11 lacks the name
_GID = struct.Struct("=I")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]

    def allowed(self, admin_gid: int | None) -> bool:
        """Root, or a member of the admin group (primary or supplementary)."""
        if self.uid == 0:
            return True
        return admin_gid is not None and (self.gid == admin_gid or admin_gid in self.groups)

    def describe(self) -> str:
        return f"uid {self.uid} (pid {self.pid})"


def admin_gid() -> int | None:
    try:
        return grp.getgrnam(ADMIN_GROUP).gr_gid
    except KeyError:
        return None


def parse_groups(raw: bytes) -> tuple[int, ...]:
    return tuple(g for (g,) in _GID.iter_unpack(raw[: len(raw) - len(raw) % _GID.size]))


class _Socket(Protocol):
    """A stdlib or a trio socket: both answer getsockopt alike."""

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def peer_of(sock: _Socket) -> Peer:
    pid, uid, gid = struct.unpack("=iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           struct.calcsize("=iII")))
    size = 64 * _GID.size
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
            break
        except OSError as exc:  # ERANGE: more groups than room; the kernel won't say how many
            if exc.errno != errno.ERANGE or size >= 65536 * _GID.size:
                raise
            size *= 4
    return Peer(pid, uid, gid, parse_groups(raw))
