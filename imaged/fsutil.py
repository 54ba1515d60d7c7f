"""Filesystem primitives: flushing a directory entry or a whole filesystem, and measuring
trees the way ``du`` does; the reflink ioctl and the data copy it stands in for; a directory's
``struct fsxattr`` (project ids, extent-size hints), which xfs and ext4 share."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaged.errors import os_failure, reporting_os_errors

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h: share a file's extents (reflink)
# struct fsxattr: xflags extsize nextents projid cowextsize (u32 each), 8 bytes of padding.
_FSXATTR = struct.Struct("=5I8x")
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_EXTSZINHERIT = 0x1000  # new files take the directory's extent-size hint
FS_XFLAG_PROJINHERIT = 0x200  # new files and directories take the directory's project id

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def syscall(number: int, *args: Any) -> int:
    """A raw system call Python has no wrapper for (the new mount API, quotactl_fd)."""
    result = int(_libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


@dataclass(frozen=True)
class FsXattr:
    """The fields of ``struct fsxattr`` that FS_IOC_FSSETXATTR takes back."""

    xflags: int
    extsize: int
    nextents: int
    projid: int
    cowextsize: int


def get_fsxattr(directory: Path) -> FsXattr:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        attrs = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, attrs)
        return FsXattr(*_FSXATTR.unpack(attrs))
    finally:
        os.close(fd)


def set_fsxattr(directory: Path, attrs: FsXattr) -> None:
    """Set a directory's fsxattr: read it with ``get_fsxattr`` and change only what is meant to
    change, since the ioctl sets every field at once."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, _FSXATTR.pack(
            attrs.xflags, attrs.extsize, attrs.nextents, attrs.projid, attrs.cowextsize))
    finally:
        os.close(fd)


@contextlib.contextmanager
def scandir_fd(fd: int) -> Iterator[Iterator[os.DirEntry[str]]]:
    """The whole listing of a directory descriptor that is kept open and listed more than
    once. On btrfs, a descriptor listed once lists only what it saw then until the next
    explicit lseek to 0 (CPython's rewinddir at the end of a listing does not count there), so
    names made since would be missing: seek first, always."""
    os.lseek(fd, 0, os.SEEK_SET)
    with os.scandir(fd) as entries:
        yield entries


def remove_tree(path: Path) -> None:
    """Remove a directory tree; only "already gone" is not an error. A tree that cannot be
    removed (busy, read-only, I/O error) must say so, naming the whole path of the entry that
    failed (rmtree's own errors name it relative to its directory), or gc reports space it
    never freed."""
    def failed(function: object, name: str, info: Any) -> None:
        exc = info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, name) from exc
        raise exc

    shutil.rmtree(path, onerror=failed)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable; a failure is ``os_failure``'s
    ``StorageError`` naming the directory."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with reporting_os_errors("flushing", path):
            os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (Python 3.11 has no os.syncfs).

    One syncfs after many writes costs about one fsync; an fsync per file costs one each, which
    is what made 128-layer pulls slow. A failure (the writeback met an I/O error) is
    ``os_failure``'s ``StorageError`` naming the directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise os_failure(OSError(err, os.strerror(err)), "flushing the filesystem of", path)
    finally:
        os.close(fd)


def walk_lstat(path: Path) -> Iterator[os.stat_result]:
    """``lstat`` of ``path`` and of everything under it, symlinks not followed, as ``du`` walks.

    A tree that vanishes while it is walked yields what was there; a missing ``path`` nothing.
    """
    try:
        yield os.lstat(path)
    except FileNotFoundError:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for entry in (*dirnames, *filenames):
            try:
                yield os.lstat(os.path.join(dirpath, entry))
            except FileNotFoundError:
                continue


def disk_usage(path: Path) -> int:
    """Allocated bytes of ``path`` and everything under it (what ``du -s`` reports), hardlinks
    counted once; none for a missing ``path``."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in walk_lstat(path):
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def freed_by_removing(paths: Iterable[Path]) -> int:
    """Bytes ``du`` stops seeing once these trees are removed: allocated blocks
    (``st_blocks * 512``, not apparent sizes, since blocks are what the disk gets back),
    each inode once, and a hardlinked file only when all of its links are among the removed.

    A file with a link outside the trees survives the removal, so counting it would report
    bytes that the disk never gets back.
    """
    links: Counter[tuple[int, int]] = Counter()
    stats: dict[tuple[int, int], os.stat_result] = {}
    for path in paths:
        for st in walk_lstat(path):
            key = (st.st_dev, st.st_ino)
            links[key] += 1
            stats[key] = st
    return sum(st.st_blocks * 512 for key, st in stats.items()
               if stat.S_ISDIR(st.st_mode) or links[key] >= st.st_nlink)


def data_segments(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The data segments of ``[start, end)`` in ``fd`` (holes need no copy: the upper's
    own holes read as the same zeros)."""
    at = start
    while at < end:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        at = hole


def copy_data(src: int, dst: int, size: int) -> None:
    """FICLONE where the filesystem shares extents, else ``copy_file_range`` over the data
    segments only (SEEK_DATA/SEEK_HOLE), so sparse files stay sparse. The fuse server's
    whole-file copy-up, and what ``imaged advise`` times to calibrate a root without a model."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
            raise
    for data, hole in data_segments(src, 0, size):
        pos = data
        while pos < hole:
            copied = os.copy_file_range(src, dst, hole - pos, pos, pos)
            if copied == 0:
                break
            pos += copied
    os.ftruncate(dst, size)
