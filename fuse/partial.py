"""Partial copy-up on disk: a sparse upper file, its range record, and completing it.

The pure record and its log format are ``imaged.fuse.ranges``; this module is their I/O shell,
shared by the server (which runs its blocking calls in worker threads) and by
``imaged update --materialize`` on an unmounted container.

Where the record lives, and why:

- The upper file carries ``trusted.overlay.metacopy`` with the one-byte value ``p``. It is the
  server's "this file is partial" mark, and it travels with the inode through renames and hard
  links for free. It is also what keeps kernel overlay from ever showing a partial file as
  complete: a metacopy value shorter than overlay's 4-byte header is "corrupt" to overlay
  (6.5 and later: EIO on lookup, with or without ``metacopy=on``; seen here on 6.18), and
  without ``metacopy=on`` any metacopy mark is refused (EPERM; older kernels too). The server
  hides ``trusted.overlay.*`` from users, so nobody can forge or strip it through the mount.
- The log is ``work/ranges/<upper inode number>``: work is on the upper's filesystem (the
  server checks) and never visible in the union, and an inode number is what all names of the
  file share. The log file's ``trusted.imaged.lower`` xattr says where the lower bytes are
  (``<layer>/<path in that layer>``: lowers are immutable, and a lower file is at its union
  path in its layer, since anything renamed was copied up first).
- The mark decides, the log follows: a log whose inode has no mark is stale (its file was
  unlinked and the number reused before the log went) and is ignored, then removed; a marked
  file without a log is damage, and reads fail (EIO) rather than show zeros for lower bytes.
  So creation writes the log before the marked file is renamed into the upper, completion
  removes the mark before the log, and removal unlinks the file before the log.

Only ranges the upper holds are ever allocated, so the quota is charged for the bytes actually
copied or written; the log itself (24 bytes per write) is not counted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from imaged.fsutil import data_segments
from imaged.fuse import ranges
from imaged.fuse.ranges import END, RangeSet
from imaged.sizes import format_size

MARKER = b"trusted.overlay.metacopy"
MARKER_VALUE = b"p"  # shorter than overlay's metacopy header: "corrupt" to kernel overlay
LOWER_XATTR = b"trusted.imaged.lower"
RECORDS = b"ranges"  # under work
BLOCK = 4096  # the unit writes are widened to, so the record stays a few ranges per region
_COPY_CHUNK = 8 << 20
_COMPACT_SLACK = 64 << 10  # a log this much longer than its compacted form is rewritten at load
_RDONLY = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Damaged(OSError):
    """A partial file whose record cannot be trusted: its reads fail rather than guess."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EIO, why)


@dataclass(eq=False)
class Partial:
    """One partially copied-up upper inode, loaded: its record and the descriptors that serve
    it (its own read-write one on the upper, so O_APPEND of a caller's never moves a fill)."""

    ino: int
    ranges: RangeSet
    upper: int
    lower: int
    log: int
    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0  # open handles using the descriptors; they close with the last one
    done: bool = False  # completed or unlinked: the upper alone is the file now
    unlinked: bool = False  # its last name went while open: the log goes at the last close
    dirs_synced: bool = False  # the log's directory was fsynced since load (by the first fsync)

    def close(self) -> None:
        for fd in (self.upper, self.lower, self.log):
            os.close(fd)


def records_dir(work: int, *, create: bool) -> int | None:
    """work/ranges, made if asked (at the first partial copy-up, so work stays empty where
    nothing was ever partial); None where it does not exist."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(RECORDS, 0o700, dir_fd=work)
    try:
        return os.open(RECORDS, _DIR, dir_fd=work)
    except FileNotFoundError:
        return None


def recorded(records: int | None) -> set[int]:
    """The inode numbers that have a log."""
    if records is None:
        return set()
    return {int(name) for name in os.listdir(records) if name.isdigit()}


def count(work: Path) -> int:
    """How many partial files a container's work directory records (``ps``)."""
    try:
        return sum(1 for name in os.listdir(work / os.fsdecode(RECORDS)) if name.isdigit())
    except FileNotFoundError:
        return 0


def is_marked(fd: int) -> bool:
    try:
        return os.getxattr(b"/proc/self/fd/%d" % fd, MARKER) == MARKER_VALUE
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise


def lower_ref(layer: int, path: bytes) -> bytes:
    return b"%d/%s" % (layer, path)


def open_lower(lowers: list[int], ref: bytes) -> int:
    """The lower file a log names, one component at a time without following symlinks, so a
    damaged record cannot lead outside the layer."""
    layer_text, _, path = ref.partition(b"/")
    parts = path.split(b"/")
    if not layer_text.isdigit() or not 1 <= int(layer_text) <= len(lowers) or \
            any(p in (b"", b".", b"..") for p in parts):
        raise Damaged(f"range log names no lower file: {ref!r}")
    fd = os.dup(lowers[int(layer_text) - 1])
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(parts[-1], _RDONLY, dir_fd=fd)
    finally:
        os.close(fd)


def start(work: int, records: int, tmp: bytes, size: int, ref: bytes) -> int:
    """Make ``tmp`` in work (a fresh copy-up carrying the file's metadata, size ``size``)
    partial: mark it, then write its log, before the caller renames it into the upper. Nothing
    is synced, as a full copy-up syncs nothing: a kill -9 leaves it all in the page cache, and
    the first ``sync`` makes mark, log and both names durable (the three fsyncs this used to
    wait on were most of a partial file's first write). Returns its inode number."""
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=work)
    try:
        os.setxattr(b"/proc/self/fd/%d" % fd, MARKER, MARKER_VALUE)
        ino = os.fstat(fd).st_ino
        log_tmp = tmp + b".log"
        log = os.open(log_tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                      dir_fd=work)
        try:
            os.setxattr(b"/proc/self/fd/%d" % log, LOWER_XATTR, ref)
            os.write(log, ranges.encode(RangeSet.for_lower(size)))
        finally:
            os.close(log)
        os.rename(log_tmp, b"%d" % ino, src_dir_fd=work, dst_dir_fd=records)
        return ino
    finally:
        os.close(fd)


def load(records: int, upper: int, lowers: list[int], *, writable: bool) -> Partial:
    """The record of the marked upper file open as ``upper`` (a descriptor the Partial takes
    over): its log replayed, a torn last entry cut before anything is appended after it."""
    ino = os.fstat(upper).st_ino
    try:
        log = os.open(b"%d" % ino, (os.O_RDWR | os.O_APPEND if writable else os.O_RDONLY)
                      | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=records)
    except FileNotFoundError:
        raise Damaged(f"partial file (inode {ino}) has no range log") from None
    try:
        data = b""
        while chunk := os.read(log, 1 << 20):
            data += chunk
        try:
            got = ranges.replay(data)
        except ranges.CorruptLog as exc:
            raise Damaged(f"range log of inode {ino}: {exc}") from None
        record, dropped = ranges.settle(got, lambda s, e: data_segments(upper, s, e))
        ref = os.getxattr(b"/proc/self/fd/%d" % log, LOWER_XATTR)
        if writable and (dropped or
                         got.length > 2 * len(ranges.encode(record)) + _COMPACT_SLACK):
            os.fdatasync(upper)  # the data settle kept, before a log that confirms it
            os.close(log)
            log = -1
            log = _compact(records, ino, record, ref)
        elif got.torn and writable:
            os.ftruncate(log, got.length)
            os.fsync(log)
        lower = open_lower(lowers, ref)
    except BaseException:
        if log != -1:
            os.close(log)
        raise
    return Partial(ino, record, upper, lower, log)


def _compact(records: int, ino: int, record: RangeSet, ref: bytes) -> int:
    """Replace a log grown long by many writes with one entry per range (ranges.py's
    compaction: a temporary file, fsync, rename over the log), so opens stay quick; the
    rewritten log, open for appending."""
    name, tmp = b"%d" % ino, b"%d.compact" % ino
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR | os.O_APPEND | os.O_CLOEXEC, 0o600,
                 dir_fd=records)
    try:
        os.setxattr(b"/proc/self/fd/%d" % fd, LOWER_XATTR, ref)
        os.write(fd, ranges.encode(record))
        os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=records, dst_dir_fd=records)
        os.fsync(records)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _append(p: Partial, start: int, end: int, *, durable: bool) -> None:
    os.write(p.log, ranges.encode_add(start, end))
    if durable:
        os.fdatasync(p.log)


def _copy(src: int, dst: int, start: int, end: int) -> None:
    """Copy ``[start, end)`` at the same offsets (a fill or a materialising gap)."""
    while start < end:
        try:
            n = os.copy_file_range(src, dst, min(end - start, _COPY_CHUNK), start, start)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            data = os.pread(src, min(end - start, _COPY_CHUNK), start)
            n = os.pwrite(dst, data, start) if data else 0
        if n == 0:
            return  # the lower ends here: past it the upper's hole reads as zeros already
        start += n


def write(p: Partial, off: int, buf: bytes) -> int:
    """A write, in ranges.py's crash-safe order: fill the partial blocks at its edges from
    the lower, write, then append the log entry. Nothing is synced: a kill -9 leaves both in
    the page cache, and power-cut durability is what ``sync`` (fsync) promises. Blocking; the
    caller holds ``p.lock``."""
    low, high = ranges.aligned(off, off + len(buf), BLOCK)
    for start, end in p.ranges.fill(off, off + len(buf), BLOCK):
        _copy(p.lower, p.upper, start, end)
    written = os.pwrite(p.upper, buf, off)
    end = high if written == len(buf) else off + written
    _append(p, low, end, durable=False)
    p.ranges.add(low, end)
    return written


def truncate(p: Partial, size: int) -> None:
    """Record first, then truncate: ``[size, END)`` is the upper's (zeros until written) before
    the bytes go, so a regrown range never shows the lower's old bytes."""
    _append(p, size, END, durable=True)
    p.ranges.truncate(size)
    os.ftruncate(p.upper, size)


def sync(p: Partial, records: int, upper_dir: int | None, *, datasync: bool) -> None:
    """fsync of a partial file: its data on disk, then a sync entry confirming the entries
    before it. The first time since load (``start`` synced nothing) whole fsyncs, for the mark
    and the log's lower xattr, and the directories of the log and of the upper file (None once
    it has no name), so both names are as durable as the bytes. Blocking; the caller holds
    ``p.lock``."""
    first = not p.dirs_synced
    (os.fdatasync if datasync and not first else os.fsync)(p.upper)
    os.write(p.log, ranges.encode_sync())
    (os.fsync if first else os.fdatasync)(p.log)
    if first:
        os.fsync(records)
        if upper_dir is not None:
            os.fsync(upper_dir)
        p.dirs_synced = True


def read(p: Partial, off: int, size: int) -> bytes:
    """A read cut between the upper and the lower as the record says."""
    end = min(off + size, os.fstat(p.upper).st_size)
    if end <= off:
        return b""
    parts = []
    for span in p.ranges.split(off, end):
        fd = p.upper if span.upper else p.lower
        got = os.pread(fd, span.end - span.start, span.start)
        parts.append(got.ljust(span.end - span.start, b"\0"))
    return b"".join(parts)


def missing(p: Partial) -> list[tuple[int, int]]:
    """What completing the file copies: the lower's data in the ranges the upper lacks."""
    size = os.fstat(p.upper).st_size
    return [seg for gap in p.ranges.gaps(0, size) for seg in data_segments(p.lower, *gap)]


def cost(segments: Iterable[tuple[int, int]]) -> int:
    """The most copying ``segments`` can allocate: their blocks, plus one per segment for the
    extent tree (as the server's write charge counts)."""
    return sum(ranges.aligned(s, e, BLOCK)[1] - ranges.aligned(s, e, BLOCK)[0] + BLOCK
               for s, e in segments)


def complete(p: Partial, records: int) -> None:
    """Copy what the upper lacks, record it whole, then ``finish``. Blocking; the caller
    holds ``p.lock``."""
    for start, end in missing(p):
        _copy(p.lower, p.upper, start, end)
    os.fdatasync(p.upper)
    _append(p, 0, END, durable=True)
    p.ranges.add(0, END)
    finish(p, records)


def finish(p: Partial, records: int) -> None:
    """The upper alone is the file now (``p.ranges.complete``): unmark it, durably, then drop
    the log (a crash between leaves a stale log, which an unmarked inode ignores)."""
    os.removexattr(b"/proc/self/fd/%d" % p.upper, MARKER)
    os.fsync(p.upper)
    forget(records, p.ino)
    p.done = True


def forget(records: int, ino: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(b"%d" % ino, dir_fd=records)


def marked_files(upper: int, inos: set[int]) -> Iterator[int]:
    """Read-write descriptors (the caller closes them) of the marked regular files in the
    upper tree among ``inos``, each inode once. Blocking: walks the whole upper."""
    seen: set[int] = set()
    for _, _, files, dir_fd in os.fwalk(b".", dir_fd=upper):
        for name in files:
            try:  # a mounted upper changes during the walk: what went is not partial
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_ino not in inos or st.st_ino in seen:
                    continue
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            if is_marked(fd):
                seen.add(st.st_ino)
                yield fd
            else:
                os.close(fd)


def sweep(upper: int, records: int) -> int:
    """Remove the logs no marked file owns (a crash between a file's unlink and its log's)
    and half-made compactions; how many partial files there are. Blocking: walks the upper
    when any log exists."""
    for name in os.listdir(records):
        if not name.isdigit():
            os.unlink(name, dir_fd=records)
    logs = recorded(records)
    if not logs:
        return 0
    owned = set()
    for fd in marked_files(upper, logs):
        owned.add(os.fstat(fd).st_ino)
        os.close(fd)
    for ino in logs - owned:
        forget(records, ino)
    return len(owned)


@dataclass(frozen=True)
class Materialized:
    files: int
    bytes: int


class NoRoom(Exception):
    """Completing the partial files needs more than the quota leaves."""

    def __init__(self, need: int, left: int) -> None:
        super().__init__(f"completing its partial files needs up to {format_size(need)}, "
                         f"and its quota leaves {format_size(left)}: grow the quota first")
        self.need, self.left = need, left


def materialize(upper: int, work: int, lowers: list[int], *, quota: int | None,
                usage: int) -> Materialized:
    """Complete every partial file of an unmounted container, or none if they do not all
    fit in the quota (``NoRoom``)."""
    records = records_dir(work, create=False)
    if records is None:
        return Materialized(0, 0)
    loaded: list[Partial] = []
    try:
        for fd in marked_files(upper, recorded(records)):
            try:
                loaded.append(load(records, fd, lowers, writable=True))
            except BaseException:
                os.close(fd)
                raise
        need = sum(cost(missing(p)) for p in loaded)
        if quota is not None and usage + need > quota:
            raise NoRoom(need, max(0, quota - usage))
        copied = 0
        for p in loaded:
            before = os.fstat(p.upper).st_blocks
            complete(p, records)
            copied += (os.fstat(p.upper).st_blocks - before) * 512
        return Materialized(len(loaded), copied)
    finally:
        for p in loaded:
            p.close()
        sweep(upper, records)
        os.close(records)
