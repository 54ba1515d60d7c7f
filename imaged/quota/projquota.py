"""Project quotas on xfs and ext4 (DESIGN §3): the kernel's own accounting, O(1) to read.

A container's data directory gets a project id with the inherit flag (``FS_IOC_FSSETXATTR``:
``fsx_projid`` and ``FS_XFLAG_PROJINHERIT``), so everything created under it is charged to
that project; the limit is the project's block hard limit, and usage is the project's
``dqb_curspace``, kept current by the filesystem on every allocation: no walk of the tree.

Limits go through ``quotactl_fd(2)`` (Linux 5.14+) rather than ``quotactl(2)``: it takes a
descriptor of any file on the filesystem, so there is no block device to find (a loop device,
a device-mapper node, an overlay's backing device), and the generic ``Q_GETQUOTA`` /
``Q_SETQUOTA`` commands work on both xfs and ext4, where the xfs-only ``Q_X*`` commands would
need a second code path. The kernel counts limits in 1 KiB units: a quota is rounded up to one.

Project ids come from a range of their own (``FIRST_ID`` … ``LAST_ID``) so they do not collide
with ids an administrator gives by hand from ``/etc/projid`` (conventionally small numbers). An
id is allocated as the smallest one not held by an existing container, and is persisted where
the container lives (its data directory carries it), so a restart finds the same ids without a
table that could disagree with the filesystem.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from imaged.errors import QuotaUnsupportedError
from imaged.fsutil import FS_XFLAG_PROJINHERIT, get_fsxattr, set_fsxattr, syscall
from imaged.host.mounts import backing_filesystem

FIRST_ID = 1_000_000
LAST_ID = 1_999_999

_SYS_QUOTACTL_FD = 443  # x86_64
_PRJQUOTA = 2
_Q_GETQUOTA = 0x800007
_Q_SETQUOTA = 0x800008
_QIF_BLIMITS = 1
_QIF_SPACE = 2
_BLOCK = 1024  # QIF_DQBLKSIZE: quota block limits are in KiB whatever the filesystem's blocks
# struct if_dqblk: bhardlimit bsoftlimit curspace ihardlimit isoftlimit curinodes btime itime
# (u64 each) valid (u32), padded to 8 bytes.
_DQBLK = struct.Struct("=8QI4x")


def qcmd(command: int, kind: int = _PRJQUOTA) -> int:
    """QCMD(cmd, type): the quotactl command word, as a signed int for the syscall."""
    word = (command << 8) | (kind & 0xFF)
    return word - (1 << 32) if word >= 1 << 31 else word


def limit_blocks(quota: int) -> int:
    """A quota in bytes as the kernel's 1 KiB limit units, rounded up so it is never less."""
    return -(-quota // _BLOCK)


def pack_limit(quota: int | None) -> bytes:
    """An if_dqblk that sets only the block hard limit (0: no limit); soft limit the same, so
    no grace period lets a container run past its quota."""
    blocks = 0 if quota is None else limit_blocks(quota)
    return _DQBLK.pack(blocks, blocks, 0, 0, 0, 0, 0, 0, _QIF_BLIMITS)


def unpack_usage(data: bytes) -> tuple[int, int | None, int]:
    """(bytes used, limit in bytes or None, inodes used) from an if_dqblk the kernel filled."""
    hard, _soft, space, _ihard, _isoft, inodes, _btime, _itime, _valid = _DQBLK.unpack(data)
    return space, hard * _BLOCK if hard else None, inodes


def allocate(taken: Iterable[int]) -> int:
    """The smallest id of the range no container holds."""
    held = set(taken)
    for candidate in range(FIRST_ID, LAST_ID + 1):
        if candidate not in held:
            return candidate
    raise QuotaUnsupportedError(f"all {LAST_ID - FIRST_ID + 1} project ids of imaged's range "
                                "are in use: remove containers")


def _quotactl(path: Path, command: int, project_id: int, data: bytes) -> bytes:
    """quotactl_fd on ``path``'s filesystem with an if_dqblk in and out."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buffer = ctypes.create_string_buffer(data, len(data))
        syscall(_SYS_QUOTACTL_FD, fd, qcmd(command), project_id, buffer)
        return buffer.raw
    finally:
        os.close(fd)


def unavailable(path: Path) -> str | None:
    """Why project quotas cannot be used on ``path``'s filesystem, or None when they can: the
    kernel must have quotactl_fd and the filesystem project accounting and enforcement on."""
    try:
        _quotactl(path, _Q_GETQUOTA, 0, bytes(_DQBLK.size))
    except OSError as e:
        if e.errno == errno.ENOSYS:
            return "this kernel has no quota support (CONFIG_QUOTA, quotactl_fd)"
        if e.errno in (errno.ESRCH, errno.ENOENT):
            return "project quotas are not enabled on this filesystem (mount it with prjquota)"
        if e.errno in (errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP):
            return "this filesystem does not support project quotas"
        return f"project quota query failed: {e.strerror}"
    if not enforced(path):
        return "project quotas are counted but not enforced here (mount with prjquota)"
    return None


def enforced(path: Path) -> bool:
    """The filesystem holding ``path`` is mounted to enforce project limits (``prjquota``;
    xfs also says ``pquota``): ext4's quota feature alone only counts."""
    options = backing_filesystem(path).super_options
    return any(option in ("prjquota", "pquota") for option in options)


def set_project(directory: Path, project_id: int) -> None:
    """Give ``directory`` the project id, inherited by everything created under it."""
    attrs = get_fsxattr(directory)
    set_fsxattr(directory, replace(attrs, xflags=attrs.xflags | FS_XFLAG_PROJINHERIT,
                                   projid=project_id))


def project_of(directory: Path) -> int:
    return get_fsxattr(directory).projid


def set_limit(path: Path, project_id: int, quota: int | None) -> None:
    """Set (or with None, clear) the project's byte limit on ``path``'s filesystem."""
    _quotactl(path, _Q_SETQUOTA, project_id, pack_limit(quota))


def usage(path: Path, project_id: int) -> tuple[int, int | None, int]:
    """(bytes charged to the project, its limit or None, inodes charged): the kernel's
    counters, O(1)."""
    return unpack_usage(_quotactl(path, _Q_GETQUOTA, project_id, bytes(_DQBLK.size)))
