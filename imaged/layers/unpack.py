"""The shared layer unpacker: one tar stream into one directory, for every storage driver.

Layers are hostile input (DESIGN §6). Nothing here follows a symlink or trusts a path string:
every member's parent is reached from the target's directory fd one component at a time with
``O_NOFOLLOW|O_DIRECTORY``, so a symlink anywhere in the chain, whether this layer made it or a
lower layer did (DELETE mode unpacks into the parent's tree), stops the unpack. ``tarfile``'s
extraction (and its filters) is not used at all; the headers are parsed by
``imaged.layers.layerplan``, which also holds every rule as pure functions.

Two threads share the work: a feeder thread reads the blob, decompresses it and hashes the
decompressed stream (the DiffID) while the calling thread creates files, so SHA-256 (0.16 s per
200 MB here) and inflating overlap with filesystem work. Both spend most of their time outside
the GIL (syscalls, zlib, SHA-256). Nothing is fsynced: the driver syncs the finished layer once
(syncfs), far cheaper than an fsync per file.

On error the target is left half-written; the caller removes it (it owns the directory).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import shutil
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, cast

import zstandard
from isal import igzip, isal_zlib

from imaged.digest import Digest, Hasher
from imaged.errors import InvalidError
from imaged.faults import pause_point
from imaged.fsutil import scandir_fd
from imaged.layers.compare import (
    Seen,
    entry_differences,
    opaque_difference,
    whiteout_differences,
)
from imaged.layers.layerplan import (
    BLOCK_SIZE,
    BLOCKDEV,
    CHARDEV,
    DIRECTORY,
    EXTENSION_TYPES,
    FIFO,
    HARDLINK,
    MAX_EXTENSION_BYTES,
    REGULAR,
    SYMLINK,
    ZERO_BLOCK,
    Action,
    Assembler,
    Member,
    Refused,
    WhiteoutMode,
    check_symlink_target,
    classify,
    hardlink_source,
    member_path,
    opaque_purge,
    opaque_xattr,
    parse_header,
    show,
    within,
)
from imaged.registry_client.manifest import LAYER_TYPES

__all__ = ["LayerEntry", "LayerError", "UnpackLimits", "UnpackStats", "WhiteoutMode", "list_layer",
           "unpack_layer", "verify_layer"]

# Reads of the decompressed stream; file data is written straight from these buffers.
_CHUNK: Final = 1 << 20
_QUEUE_DEPTH: Final = 8
# Open directory fds kept for the next member; tar order is depth-first, so few are reused.
_DIR_CACHE: Final = 128
_O_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEW_FILE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAGIC: Final = {
    "gzip": (b"\x1f\x8b\x08",),  # deflate, the only method gzip defines
    # A zstd frame, or a skippable frame (zstd:chunked layers start with one).
    "zstd": (b"\x28\xb5\x2f\xfd", *(bytes([n, 0x2A, 0x4D, 0x18]) for n in range(0x50, 0x60))),
    "bzip2": tuple(b"BZh%d1AY&SY" % level for level in range(1, 10)),
    "xz": (b"\xfd7zXZ\x00",),
}
# isal's stub declares its error as an instance; it is the exception class.
_DECOMPRESSION_ERRORS: Final = (EOFError, igzip.BadGzipFile, cast(type[Exception], isal_zlib.error),
                                zstandard.ZstdError)
_NODE_TYPES: Final = {CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}


class LayerError(InvalidError):
    """A layer that cannot be unpacked.

    The message names the layer and, when one is at fault, the member; ``member`` holds that
    name as the message shows it, for callers and tests that want it alone.
    """

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


@dataclass(frozen=True)
class UnpackLimits:
    """Caps against tar bombs, from ``limits.max_layer_bytes`` and ``limits.max_layer_entries``.

    ``max_bytes`` counts the decompressed stream (what the DiffID covers), ``max_entries`` the
    tar members that are not extension headers.
    """

    max_bytes: int
    max_entries: int


@dataclass(frozen=True)
class UnpackStats:
    """What was unpacked: members, decompressed bytes (the DiffID's input), the DiffID.

    ``xattrs_skipped`` counts xattrs the target filesystem does not support (EOPNOTSUPP).
    They are skipped, as containerd skips them, rather than failing every image that carries
    a capability on such a filesystem (zfs-fuse); the caller can warn about a non-zero count.
    """

    entries: int
    bytes: int
    diff_id: Digest
    xattrs_skipped: int = 0


def unpack_layer(blob: Path, media_type: str, diff_id: Digest, target: Path,
                 whiteouts: WhiteoutMode, limits: UnpackLimits,
                 userxattr: bool = False,
                 progress: Callable[[int], None] | None = None) -> UnpackStats:
    """Unpack the layer ``blob`` into the existing directory ``target``; verify its DiffID.

    ``userxattr`` makes OVERLAY mode mark opaque directories with ``user.overlay.opaque``
    (overlayfs mounted with ``userxattr``). ``progress`` hears, on the calling thread, how many
    bytes of the blob have been read each time the unpacker takes a chunk. Raises
    ``LayerError`` for anything the layer itself gets wrong; ``OSError`` from the target
    filesystem (ENOSPC, EDQUOT) propagates with a note naming the member.
    """
    with contextlib.ExitStack() as stack:
        feed, label = _open_feed(stack, blob, media_type, diff_id, limits, progress)
        root_fd = os.open(target, _O_DIR)
        stack.callback(os.close, root_fd)
        unpacker = _Unpacker(feed, root_fd, diff_id, label, whiteouts, limits, userxattr)
        stack.callback(unpacker.close)
        unpacker.run()
        return UnpackStats(unpacker.entries, feed.total, diff_id, unpacker.xattrs_skipped)


def _open_feed(stack: contextlib.ExitStack, blob: Path, media_type: str, diff_id: Digest,
               limits: UnpackLimits, progress: Callable[[int], None] | None = None
               ) -> tuple[_Feed, str]:
    """The blob's decompressed, hashed stream (closed with ``stack``) once its media type and
    first bytes agree, and the layer's label for messages."""
    label = f"{diff_id.algorithm}:{diff_id.hex[:12]}…"
    if media_type not in LAYER_TYPES:
        raise LayerError(f"layer {label}: unsupported media type {media_type!r}")
    compression = LAYER_TYPES[media_type]
    blob_fd = os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
    stack.callback(os.close, blob_fd)
    _check_magic(os.pread(blob_fd, 10, 0), compression, media_type, label)
    os.posix_fadvise(blob_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    feed = _Feed(blob_fd, compression, diff_id.hasher(), limits.max_bytes, progress)
    stack.callback(feed.close)
    return feed, label


@dataclass(frozen=True)
class LayerEntry:
    """One member of a layer as a listing sees it: ``path`` is what ``action`` applies to
    (the hidden path for a whiteout, the directory for an opaque marker)."""

    path: bytes
    action: Action
    regular: bool  # a regular file or a hard link to one
    size: int


def list_layer(blob: Path, media_type: str, diff_id: Digest,
               limits: UnpackLimits) -> list[LayerEntry]:
    """The members of the layer ``blob`` in tar order, its DiffID verified: what a layer holds
    whatever driver unpacked it (a snapshot driver's directory no longer tells its layers
    apart), read with the unpacker's own parser and limits."""
    with contextlib.ExitStack() as stack:
        feed, label = _open_feed(stack, blob, media_type, diff_id, limits)
        lister = _Lister(feed, diff_id, label, limits)
        lister.run()
        return lister.listing


def verify_layer(blob: Path, media_type: str, diff_id: Digest, target: Path,
                 whiteouts: WhiteoutMode, limits: UnpackLimits,
                 userxattr: bool = False) -> dict[bytes, list[str]]:
    """What differs between the layer ``blob`` and the tree unpacked from it at ``target``
    (``imaged check --verify-data``), path by path; {} when nothing does. The blob is read as
    ``unpack_layer`` reads it (its DiffID verified) and each member compared with what is at
    its path, never following a symlink: ``imaged.layers.compare`` says what counts.

    ``whiteouts`` is the driver's form, which also says what the tree is: a stacked driver's
    layer holds exactly this layer's entries (anything more is reported too), a snapshot
    driver's the whole tree after it (only the layer's own entries are compared, a whiteout
    meaning the name is absent). Raises ``LayerError`` for a blob that does not unpack."""
    with contextlib.ExitStack() as stack:
        feed, label = _open_feed(stack, blob, media_type, diff_id, limits)
        root_fd = os.open(target, _O_DIR)
        stack.callback(os.close, root_fd)
        verifier = _Verifier(feed, root_fd, diff_id, label, whiteouts, limits, userxattr)
        stack.callback(verifier.close)
        verifier.run()
        return verifier.differences


def _check_magic(head: bytes, compression: str | None, media_type: str, label: str) -> None:
    """The media type and the blob's first bytes must agree: a mismatch is a broken image."""
    found = next((kind for kind, magics in _MAGIC.items() if head.startswith(magics)), None)
    if found != compression:
        said = compression or "uncompressed"
        raise LayerError(f"layer {label}: media type {media_type} says {said}, but the blob is "
                         f"{found or 'not compressed'}")


class _Oversize(Exception):
    """The decompressed stream passed ``max_bytes``; the unpacker names the member."""


class _Corrupt(Exception):
    """The compressed stream cannot be decompressed."""


@dataclass(frozen=True)
class _End:
    error: BaseException | None


class _Feed:
    """Reads, decompresses and hashes the blob on its own thread, a few chunks ahead.

    Everything read is hashed, including what follows the end-of-archive blocks, since the
    DiffID covers the whole stream. The unpacker drains to the end for the same reason.
    """

    def __init__(self, fd: int, compression: str | None, hasher: Hasher, max_bytes: int,
                 progress: Callable[[int], None] | None = None) -> None:
        self._fd = fd
        self._progress = progress
        self._compression = compression
        self._hasher = hasher
        self._max_bytes = max_bytes
        self._queue: queue.Queue[bytes | _End] = queue.Queue(_QUEUE_DEPTH)
        self._stop = False
        self._ended = False
        self.total = 0
        self._thread = threading.Thread(target=self._run, name="imaged-unpack-feed",
                                        daemon=True)
        self._thread.start()

    def _reader(self, raw: IO[bytes]) -> IO[bytes]:
        if self._compression == "gzip":
            # isal's igzip.py is not annotated; IGzipFile is a gzip.GzipFile.
            return cast(IO[bytes], igzip.IGzipFile(  # type: ignore[no-untyped-call]
                fileobj=raw, mode="rb"))
        if self._compression == "zstd":
            # zstandard does not notice a stream cut at a frame's middle; the DiffID does.
            return zstandard.ZstdDecompressor().stream_reader(
                raw, read_size=1 << 20, read_across_frames=True, closefd=False)
        return raw

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            with open(self._fd, "rb", buffering=0, closefd=False) as raw, \
                    self._reader(raw) as reader:
                while not self._stop:
                    # One byte past the limit is enough to know it is passed: a bomb is never
                    # decompressed further than that.
                    room = self._max_bytes - self.total
                    chunk = reader.read(min(_CHUNK, room + 1))
                    if not chunk:
                        break
                    over = len(chunk) > room
                    if over:
                        chunk = chunk[:room]  # the unpacker reaches the limit, and names the member
                    self.total += len(chunk)
                    self._hasher.update(chunk)
                    if chunk:
                        self._queue.put(chunk)
                    if over:
                        raise _Oversize
        except _DECOMPRESSION_ERRORS as exc:
            error = _Corrupt(str(exc))
        except BaseException as exc:  # noqa: BLE001 - handed to the unpacker's thread
            error = exc
        self._queue.put(_End(error))

    def next(self) -> bytes:
        """The next chunk, ``b""`` at the end; re-raises what went wrong on the feed thread."""
        if self._ended:
            return b""
        item = self._queue.get()
        if isinstance(item, bytes):
            if self._progress is not None:  # where the feed thread has read to, a little ahead
                self._progress(os.lseek(self._fd, 0, os.SEEK_CUR))
            return item
        self._ended = True
        if item.error is not None:
            raise item.error
        return b""

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def close(self) -> None:
        """Stop the thread, draining the queue so that a blocked ``put`` returns."""
        self._stop = True
        while not self._ended:
            if isinstance(self._queue.get(), _End):
                self._ended = True
        self._thread.join()


class _Truncated(Exception):
    """The stream ended inside a header or a member's data."""


class _Stream:
    """The decompressed stream as the unpacker consumes it: blocks, data written to fds.

    File data goes from the feed's chunks to ``os.write`` through memoryview slices, so each
    byte is copied once in user space (by the read that produced it), as in GNU tar.
    """

    def __init__(self, feed: _Feed) -> None:
        self._feed = feed
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        self._base = 0  # stream offset of self._buf[0]

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _fill(self) -> bool:
        self._base += len(self._buf)
        self._buf = self._feed.next()
        self._view = memoryview(self._buf)
        self._pos = 0
        return bool(self._buf)

    def read_block(self) -> bytes | None:
        """The next 512-byte block, or ``None`` when the stream ends exactly here."""
        pos = self._pos
        end = pos + BLOCK_SIZE
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        if pos == len(self._buf) and not self._fill():
            return None
        return self.read(BLOCK_SIZE)

    def read(self, n: int) -> bytes:
        parts = []
        while n:
            if self._pos == len(self._buf) and not self._fill():
                raise _Truncated
            piece = self._buf[self._pos:self._pos + n]
            self._pos += len(piece)
            n -= len(piece)
            parts.append(piece)
        return b"".join(parts)

    def _consume(self, n: int, take: Callable[[memoryview], int]) -> None:
        """Hand ``n`` bytes of member data to ``take`` in the slices they lie in; it says how
        many of each it took (a short write takes fewer)."""
        while n:
            pos = self._pos
            avail = len(self._buf) - pos
            if not avail:
                if not self._fill():
                    raise _Truncated
                continue
            taken = take(self._view[pos:pos + (n if n < avail else avail)])
            self._pos = pos + taken
            n -= taken

    def write_to(self, fd: int, n: int) -> None:
        self._consume(n, lambda data: os.write(fd, data))

    def compare(self, fd: int, n: int) -> str | None:
        """Consume ``n`` bytes of member data against what ``fd`` reads from where it is:
        None when they are the same, else what differs. The stream is consumed either way."""
        problem = None

        def take(data: memoryview) -> int:
            nonlocal problem
            if problem is None:
                try:
                    if _read_exactly(fd, len(data)) != data:
                        problem = "contents differ"
                except OSError as exc:
                    problem = f"cannot be read ({exc.strerror or exc})"
            return len(data)

        self._consume(n, take)
        return problem

    def skip(self, n: int) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise _Truncated
                continue
            step = n if n < avail else avail
            self._pos += step
            n -= step

    def drain(self) -> None:
        while self._fill():
            pass


def _read_exactly(fd: int, n: int) -> bytes:
    """``n`` bytes from ``fd``, fewer only where the file ends."""
    parts = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _umask() -> int:
    """The process umask, read without setting it (``os.umask`` would race other threads)."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    return 0o777  # a kernel before 4.7 does not say: treat every mode bit as unknown


def _empty_plain_dir(fd: int) -> bool:
    """The target is empty, not setgid, and has no default ACL for what is made inside it."""
    if os.fstat(fd).st_mode & stat.S_ISGID:
        return False
    try:
        if "system.posix_acl_default" in os.listxattr(fd):
            return False
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:  # without xattrs there are no ACLs either
            raise
    with scandir_fd(fd) as entries:
        return next(entries, None) is None


def _padding(size: int) -> int:
    return -size % BLOCK_SIZE


class _Reader:
    """The member loop over one layer's stream, the DiffID check at its end and the errors
    that name a member: what unpacking and listing a layer share. A subclass says what one
    member does (``_apply``) and what follows the last (``_finish``)."""

    def __init__(self, feed: _Feed, diff_id: Digest, label: str, limits: UnpackLimits) -> None:
        self._feed = feed
        self._stream = _Stream(feed)
        self._diff_id = diff_id
        self._label = label
        self._limits = limits
        self._name = b""  # the member being read, for messages
        self.entries = 0

    # -- the member loop ----------------------------------------------------------------

    def run(self) -> None:
        """Every member, then the rest of the stream, the DiffID, and directory metadata."""
        try:
            self._members()
            self._stream.drain()
            actual = self._feed.hexdigest()
            if actual != self._diff_id.hex:
                raise LayerError(f"layer {self._label}: its content hashes to "
                                 f"{self._diff_id.algorithm}:{actual}, not to the DiffID the "
                                 "image declares")
            self._finish()
        except Refused as exc:
            raise self._error(exc.reason) from None
        except _Truncated:
            raise self._error("is truncated: the stream ends inside it") from None
        except _Oversize:
            raise self._error(f"takes the layer past the limit of {self._limits.max_bytes} "
                              "uncompressed bytes (limits.max_layer_bytes)") from None
        except _Corrupt as exc:
            raise LayerError(f"layer {self._label}: cannot be decompressed ({exc})") from None
        except OSError as exc:
            exc.add_note(f"while unpacking member {show(self._name)} of layer {self._label}")
            raise

    def _error(self, reason: str) -> LayerError:
        shown = show(self._name)
        return LayerError(f"layer {self._label}: member {shown} {reason}", shown)

    def _members(self) -> None:
        stream = self._stream
        assembler = Assembler()
        max_entries = self._limits.max_entries
        max_bytes = self._limits.max_bytes
        while True:
            block = stream.read_block()
            if block is None:
                break
            try:
                header = parse_header(block)
            except Refused:
                self._name = block[:100].partition(b"\0")[0]  # the bad header's own name
                raise
            if header is None:
                # Go's archive/tar: two zero blocks end the archive, one then data is corrupt.
                following = stream.read_block()
                if following is not None and following != ZERO_BLOCK:
                    raise Refused("is followed by a lone zero block inside the archive")
                break
            self._name = header.name
            if header.type in EXTENSION_TYPES:
                if header.size > MAX_EXTENSION_BYTES:
                    raise Refused(f"has an extension header over {MAX_EXTENSION_BYTES} bytes")
                data = stream.read(header.size)
                stream.skip(_padding(header.size))
                assembler.extension(header, data)
                continue
            member = assembler.member(header)
            self._name = member.name
            self.entries += 1
            if self.entries > max_entries:
                raise Refused(f"is one more than the limit of {max_entries} entries "
                              "(limits.max_layer_entries)")
            size = member.size if member.type == REGULAR else 0
            if stream.offset + size > max_bytes:
                raise _Oversize
            written = self._apply(member)
            if self.entries == 2:
                pause_point("mid-unpack")  # a layer half on disk, its row still 'creating'
            stream.skip(size - written + _padding(size))
        if assembler.pending:
            raise Refused("is an extension header without a member: the archive is truncated")

    def _apply(self, member: Member) -> int:
        """Perform one member; returns how many bytes of its data were consumed."""
        raise NotImplementedError

    def _finish(self) -> None:
        """What follows the last member, once the DiffID is verified."""


class _Lister(_Reader):
    """Reads every member's name, type and size and writes nothing."""

    def __init__(self, feed: _Feed, diff_id: Digest, label: str, limits: UnpackLimits) -> None:
        super().__init__(feed, diff_id, label, limits)
        self.listing: list[LayerEntry] = []
        self._sizes: dict[bytes, int] = {}

    def _apply(self, member: Member) -> int:
        action, where = classify(member_path(member.name), WhiteoutMode.DELETE)
        size = 0
        if member.type == REGULAR:
            size = self._sizes[where] = member.size
        elif member.type == HARDLINK:  # the same file under a second name: as big as it is
            size = self._sizes.get(hardlink_source(member.linkname), 0)
        regular = member.type in (REGULAR, HARDLINK)
        self.listing.append(LayerEntry(where, action, regular, size))
        return 0


class _Tree:
    """A layer's directory as fds: the cache of directories opened from its root one
    component at a time (``O_NOFOLLOW``), and ``_touched``, every path the layer wrote or
    walked through. What unpacking and verifying a layer share."""

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd
        self._cache: dict[bytes, int] = {}
        self._touched: set[bytes] = set()

    def _open_dir(self, parent_fd: int, path: bytes, create: bool) -> int:
        """The directory ``path`` (its last component) opened below ``parent_fd``."""
        raise NotImplementedError

    def _walk(self, path: bytes, create: bool) -> int:
        """An fd for directory ``path``, from the cache or opened; it belongs to the cache."""
        if not path:
            return self._root
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        missing = [path]
        head = path
        while True:
            head = head.rpartition(b"/")[0]
            fd = self._cache.get(head) if head else self._root
            if fd is not None:
                break
            missing.append(head)
        for step in reversed(missing):
            fd = self._open_dir(fd, step, create)
            self._cache[step] = fd
            if len(self._cache) > _DIR_CACHE:
                # Oldest first; never the one just opened, the only one still needed.
                os.close(self._cache.pop(next(iter(self._cache))))
        return fd

    def _claim(self, path: bytes) -> None:
        """Record ``path`` and its parents as written by this layer."""
        while path and path not in self._touched:
            self._touched.add(path)
            path = path.rpartition(b"/")[0]

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()


class _Unpacker(_Reader, _Tree):
    """Applies members one by one; holds the directory-fd cache and this layer's bookkeeping.

    ``_touched`` is every path this layer wrote or walked through (DELETE-mode opaque
    directories keep exactly those), ``_files`` the regular files it wrote (the only valid
    hardlink targets), ``_deferred`` directory metadata to apply once their contents exist.
    """

    def __init__(self, feed: _Feed, root_fd: int, diff_id: Digest, label: str,
                 mode: WhiteoutMode, limits: UnpackLimits, userxattr: bool) -> None:
        _Reader.__init__(self, feed, diff_id, label, limits)
        _Tree.__init__(self, root_fd)
        self._mode = mode
        self._userxattr = userxattr
        self._files: set[bytes] = set()
        self._deferred: dict[bytes, tuple[int, int, int, int]] = {}
        # Two syscalls per file that ext4 journals (measured: 80% -> 94% of GNU tar's speed)
        # can be left out when the kernel already gives a new file the owner and mode the tar
        # wants. That holds only below an empty, plain target: every directory is then ours,
        # made 0755 (modes are applied at the end), so none is setgid or has a default ACL.
        self._fresh = _empty_plain_dir(root_fd)
        self._uid, self._gid = os.geteuid(), os.getegid()
        self._inexact_bits = 0o7000 | _umask()  # mode bits a creating open cannot set
        self.xattrs_skipped = 0

    def _apply(self, member: Member) -> int:
        """Perform one member; returns how many bytes of its data were consumed."""
        path = member_path(member.name)
        action, where = classify(path, self._mode)
        if action is Action.CREATE:
            if not path:
                if member.type != DIRECTORY:
                    raise Refused("would replace the layer root")
                return 0  # the root belongs to the driver, as in containerd
            return self._create(member, path)
        if action is Action.WHITEOUT:
            self._whiteout(member, where)
        elif action is Action.OPAQUE:
            self._opaque(where)
        return 0

    # -- directories ----------------------------------------------------------------------

    def _dir_fd(self, path: bytes, create: bool = True) -> int:
        """An fd for directory ``path``, walked from the root without following symlinks.

        Missing directories are made (0755, root-owned, as containerd does for parents a tar
        omits) when ``create``; otherwise a missing one raises FileNotFoundError. The fd
        belongs to the cache: do not close it, and do not hold it across another call.
        """
        fd = self._walk(path, create)
        if create and path and path not in self._touched:
            self._claim(path)
        return fd

    def _open_dir(self, parent_fd: int, path: bytes, create: bool) -> int:
        name = path.rpartition(b"/")[2]
        try:
            return os.open(name, _O_DIR, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            # Linux says ENOTDIR for a symlink opened O_DIRECTORY|O_NOFOLLOW: look closer.
            if stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                raise Refused(f"escapes the layer through symlink {show(path)}") from None
            raise Refused(f"has a parent {show(path)} that is not a directory") from None
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        fd = os.open(name, _O_DIR, dir_fd=parent_fd)
        os.fchmod(fd, 0o755)  # mkdir's mode went through the umask
        return fd

    def _parent(self, path: bytes, create: bool = True) -> tuple[int, bytes]:
        parent, _, base = path.rpartition(b"/")
        return self._dir_fd(parent, create), base

    def _remove(self, dir_fd: int, name: bytes, path: bytes) -> None:
        """Remove whatever is at ``path`` (a whole tree for a directory), fd-relative."""
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            shutil.rmtree(name, dir_fd=dir_fd)
            self._forget(path)
        self._files.discard(path)

    def _forget(self, path: bytes) -> None:
        """Drop cached fds and pending metadata for a removed directory tree."""
        for key in [k for k in self._cache if within(k, path)]:
            os.close(self._cache.pop(key))
        if path in self._touched:  # else this layer has written nothing below it
            for key in [k for k in self._deferred if within(k, path)]:
                del self._deferred[key]

    # -- entries --------------------------------------------------------------------------

    def _create(self, member: Member, path: bytes) -> int:
        kind = member.type
        if kind == HARDLINK:
            self._hardlink(member, path)
            return 0
        dir_fd, name = self._parent(path)
        if kind == REGULAR:
            self._file(member, dir_fd, name, path)
            return member.size
        if kind == DIRECTORY:
            self._directory(member, dir_fd, name, path)
        elif kind == SYMLINK:
            check_symlink_target(member.linkname)
            self._exclusive(dir_fd, name, path, lambda: os.symlink(member.linkname, name,
                                                                   dir_fd=dir_fd))
            self._finish_special(member, dir_fd, name, chmod=False)
        else:
            node = _NODE_TYPES[kind] | member.mode
            device = os.makedev(member.devmajor, member.devminor)
            self._exclusive(dir_fd, name, path, lambda: os.mknod(name, node, device,
                                                                 dir_fd=dir_fd))
            self._finish_special(member, dir_fd, name, chmod=True)
        self._touched.add(path)
        self._files.discard(path)
        return 0

    def _exclusive(self, dir_fd: int, name: bytes, path: bytes, make: Callable[[], object]) -> None:
        """Create with ``make``; if the name exists, remove it first (later members win)."""
        try:
            make()
        except FileExistsError:
            self._remove(dir_fd, name, path)
            make()

    def _file(self, member: Member, dir_fd: int, name: bytes, path: bytes) -> None:
        mode = member.mode
        exact = self._fresh and not mode & self._inexact_bits
        created = mode if exact else 0o600
        try:
            fd = os.open(name, _O_NEW_FILE, created, dir_fd=dir_fd)
        except FileExistsError:
            self._remove(dir_fd, name, path)
            fd = os.open(name, _O_NEW_FILE, created, dir_fd=dir_fd)
        try:
            if member.size:
                self._stream.write_to(fd, member.size)
            # chown clears setuid/setgid and security.capability, so it comes first.
            if not self._owned(member):
                os.fchown(fd, member.uid, member.gid)
            if not exact:
                os.fchmod(fd, mode)
            if member.xattrs:
                self._set_xattrs(fd, member)
            os.utime(fd, ns=(member.mtime_ns, member.mtime_ns))
        finally:
            os.close(fd)
        self._touched.add(path)
        self._files.add(path)

    def _directory(self, member: Member, dir_fd: int, name: bytes, path: bytes) -> None:
        """Make or keep the directory; its mode, owner and mtime wait for ``finish``."""
        try:
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                self._remove(dir_fd, name, path)
                os.mkdir(name, 0o755, dir_fd=dir_fd)
        self._deferred[path] = (member.uid, member.gid, member.mode, member.mtime_ns)
        if member.xattrs:
            self._set_xattrs(self._dir_fd(path), member)

    def _finish_special(self, member: Member, dir_fd: int, name: bytes, chmod: bool) -> None:
        """Owner, mode, xattrs and mtime of a symlink or device node, never through it."""
        if chmod or not self._owned(member):
            os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
        if chmod:
            os.chmod(name, member.mode, dir_fd=dir_fd, follow_symlinks=False)
        if member.xattrs:
            # No fd-relative setxattr in Python: an O_PATH fd's /proc link names this inode
            # itself (magic links do not follow the symlink they point at).
            path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                self._set_xattrs(f"/proc/self/fd/{path_fd}", member)
            finally:
                os.close(path_fd)
        os.utime(name, ns=(member.mtime_ns, member.mtime_ns), dir_fd=dir_fd,
                 follow_symlinks=False)

    def _owned(self, member: Member) -> bool:
        """A new entry already has the member's owner (see ``_fresh``)."""
        return self._fresh and member.uid == self._uid and member.gid == self._gid

    def _set_xattrs(self, where: int | str, member: Member) -> None:
        for key, value in member.xattrs.items():
            if key == b"system.posix_acl_default":
                self._fresh = False  # entries made below this directory now get its ACL
            try:
                os.setxattr(where, key, value)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self.xattrs_skipped += 1

    def _hardlink(self, member: Member, path: bytes) -> None:
        source = hardlink_source(member.linkname)
        if source not in self._files:
            raise Refused(f"is a hardlink to {show(member.linkname)}, which is not a regular "
                          "file unpacked earlier from this layer")
        # The source's directory fd is duplicated: resolving the link's own parent may evict
        # it from the cache.
        try:
            src_fd, src_name = self._parent(source, create=False)
        except FileNotFoundError:
            raise Refused(f"is a hardlink to {show(member.linkname)}, which no longer "
                          "exists") from None
        src_fd = os.dup(src_fd)
        try:
            dir_fd, name = self._parent(path)
            self._exclusive(dir_fd, name, path, lambda: os.link(
                src_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False))
        except FileNotFoundError:
            raise Refused(f"is a hardlink to {show(member.linkname)}, which no longer "
                          "exists") from None
        finally:
            os.close(src_fd)
        self._touched.add(path)
        self._files.add(path)

    # -- whiteouts ------------------------------------------------------------------------

    def _whiteout(self, member: Member, path: bytes) -> None:
        if self._mode is WhiteoutMode.OVERLAY:
            dir_fd, name = self._parent(path)
            self._exclusive(dir_fd, name, path, lambda: os.mknod(
                name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd))
            if not self._owned(member):
                os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
            self._touched.add(path)
            self._files.discard(path)
            return
        try:
            dir_fd, name = self._parent(path, create=False)
        except FileNotFoundError:
            return  # nothing below here to delete
        self._remove(dir_fd, name, path)

    def _opaque(self, path: bytes) -> None:
        if self._mode is WhiteoutMode.OVERLAY:
            key, value = opaque_xattr(self._userxattr)
            os.setxattr(self._dir_fd(path), key, value)
            return
        pending = [path]
        self._dir_fd(path)  # the directory is this layer's now, made if need be
        while pending:
            directory = pending.pop()
            dir_fd = self._dir_fd(directory, create=False)
            with scandir_fd(dir_fd) as listing:
                entries = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False))
                           for e in listing]
            remove, descend = opaque_purge(directory, entries, self._touched)
            prefix = directory + b"/" if directory else b""
            for name in remove:
                self._remove(dir_fd, name, prefix + name)
            pending.extend(descend)

    # -- the end --------------------------------------------------------------------------

    def _finish(self) -> None:
        """Apply directory metadata, descendants before ancestors (reverse path order)."""
        for path in sorted(self._deferred, reverse=True):
            self._name = path
            uid, gid, mode, mtime_ns = self._deferred[path]
            fd = self._dir_fd(path, create=False)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))


# Reading a tree: an entry whose name or a parent's is gone, or a parent that is no directory
# (a symlink there is never followed), is simply not there.
_ABSENT: Final = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class _Verifier(_Reader, _Tree):
    """Compares members with the tree as they pass and writes nothing (``verify_layer``).

    The tree is what the whole stream made, so a member that a later one replaces or deletes
    would be reported wrongly: each member drops what was found at its path (and below it,
    when it replaces or deletes a tree) before looking again. ``_regular`` holds the inode of
    each regular file seen, for hard links to be compared with."""

    def __init__(self, feed: _Feed, root_fd: int, diff_id: Digest, label: str,
                 mode: WhiteoutMode, limits: UnpackLimits, userxattr: bool) -> None:
        _Reader.__init__(self, feed, diff_id, label, limits)
        _Tree.__init__(self, root_fd)
        self._mode = mode
        self._opaque_key = opaque_xattr(userxattr)[0]
        self._opaque: set[bytes] = set()
        self._directories: set[bytes] = set()
        self._regular: dict[bytes, tuple[int, int]] = {}
        self.differences: dict[bytes, list[str]] = {}

    def _open_dir(self, parent_fd: int, path: bytes, create: bool) -> int:
        return os.open(path.rpartition(b"/")[2], _O_DIR, dir_fd=parent_fd)

    def _note(self, path: bytes, found: list[str]) -> None:
        if found:
            self.differences.setdefault(path, []).extend(found)

    def _drop(self, path: bytes, tree: bool) -> None:
        """Forget what earlier members said about ``path`` (and below it, for a ``tree``)."""
        for where in ([k for k in self.differences if within(k, path)] if tree else [path]):
            self.differences.pop(where, None)
        if tree:
            self._directories = {d for d in self._directories if not within(d, path)}
            self._opaque = {d for d in self._opaque if not within(d, path)}

    def _apply(self, member: Member) -> int:
        path = member_path(member.name)
        action, where = classify(path, self._mode)
        if action is Action.SKIP or (action is Action.CREATE and not path):
            return 0
        if action is Action.OPAQUE:
            self._claim(where)
            self._opaque.add(where)
            return 0
        self._drop(where, tree=action is Action.WHITEOUT or member.type != DIRECTORY)
        if action is Action.WHITEOUT:
            if self._mode is WhiteoutMode.OVERLAY:
                self._claim(where)
            self._look(where, lambda seen, _: whiteout_differences(member, seen, self._mode))
            return 0
        self._claim(where)
        if member.type == DIRECTORY:
            self._directories.add(where)
        consumed = 0

        def compare(seen: Seen | None, at: tuple[int, bytes]) -> list[str]:
            nonlocal consumed
            found = entry_differences(member, seen)
            if seen is None or not stat.S_ISREG(seen.mode) or \
                    member.type not in (REGULAR, HARDLINK):
                return found
            if member.type == HARDLINK:
                if self._regular.get(hardlink_source(member.linkname)) != seen.inode:
                    found.append(f"is not a hard link of {show(member.linkname)}")
            elif seen.size == member.size:
                consumed = member.size
                problem = self._contents(*at, member.size)
                found += [problem] if problem else []
            self._regular[where] = seen.inode
            return found

        self._look(where, compare, member.xattrs)
        return consumed

    def _look(self, path: bytes, judge: Callable[[Seen | None, tuple[int, bytes]], list[str]],
              xattrs: dict[bytes, bytes] | None = None) -> None:
        """What is at ``path`` (None: nothing), judged; an error reading it is the difference."""
        parent, _, name = path.rpartition(b"/")
        try:
            try:
                dir_fd = self._walk(parent, create=False)
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _ABSENT:
                    raise
                self._note(path, judge(None, (-1, name)))
                return
            target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
            seen = Seen(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev,
                        None if target is None else os.fsencode(target),
                        self._xattrs(dir_fd, name, xattrs or {}), (st.st_dev, st.st_ino))
            self._note(path, judge(seen, (dir_fd, name)))
        except OSError as exc:
            self._note(path, [f"cannot be read ({exc.strerror or exc})"])

    def _contents(self, dir_fd: int, name: bytes, size: int) -> str | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            self._stream.skip(size)
            return f"cannot be read ({exc.strerror or exc})"
        try:
            return self._stream.compare(fd, size)
        finally:
            os.close(fd)

    @staticmethod
    def _xattrs(dir_fd: int, name: bytes, keys: Iterable[bytes]
                ) -> dict[bytes, bytes | None] | None:
        """The values of ``keys`` on the entry (None for one it lacks); None where the
        filesystem has no xattrs at all, as the unpacker then skipped them."""
        keys = list(keys)
        if not keys:
            return {}
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            return _read_xattrs(f"/proc/self/fd/{fd}", keys)
        finally:
            os.close(fd)

    def _finish(self) -> None:
        """Opaque marks, then what a layer's marker or its being the whole diff rules out."""
        if self._mode is WhiteoutMode.OVERLAY:
            for path in sorted(self._directories | self._opaque):
                self._opaque_mark(path)
        if self._mode is WhiteoutMode.DELETE:
            self._purged(sorted(self._opaque))
        else:
            self._extra()

    def _opaque_mark(self, path: bytes) -> None:
        try:
            fd = self._walk(path, create=False)
            values = _read_xattrs(f"/proc/self/fd/{fd}", [self._opaque_key.encode()])
        except OSError as exc:
            if exc.errno not in _ABSENT:
                self._note(path, [f"cannot be read ({exc.strerror or exc})"])
            return  # a missing directory was named already
        if values is not None:
            problem = opaque_difference(path in self._opaque, values[self._opaque_key.encode()])
            self._note(path, [problem] if problem else [])

    def _purged(self, pending: list[bytes]) -> None:
        """Below each opaque directory (snapshot drivers), only what this layer wrote."""
        while pending:
            directory = pending.pop()
            entries = self._listing(directory)
            remove, descend = opaque_purge(directory, entries, self._touched)
            prefix = directory + b"/" if directory else b""
            for name in remove:
                self._note(prefix + name, ["present, but the layer's opaque marker removes it"])
            pending.extend(descend)

    def _extra(self) -> None:
        """A stacked driver's layer holds this layer's entries and nothing more."""
        pending = [b""]
        while pending:
            directory = pending.pop()
            entries = self._listing(directory)
            prefix = directory + b"/" if directory else b""
            for name, is_dir in entries:
                if prefix + name not in self._touched:
                    self._note(prefix + name, ["not in the layer"])
                elif is_dir:
                    pending.append(prefix + name)


    def _listing(self, directory: bytes) -> list[tuple[bytes, bool]]:
        """A directory's entries as (name, is a real directory); none where it cannot be
        listed (a missing one was named already, an unreadable one is named here)."""
        try:
            with scandir_fd(self._walk(directory, create=False)) as listing:
                return [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in listing]
        except OSError as exc:
            if exc.errno not in _ABSENT:
                self._note(directory, [f"cannot be read ({exc.strerror or exc})"])
            return []


def _read_xattrs(path: str, keys: list[bytes]) -> dict[bytes, bytes | None] | None:
    values: dict[bytes, bytes | None] = {}
    for key in keys:
        try:
            values[key] = os.getxattr(path, key)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                return None
            if exc.errno != errno.ENODATA:
                raise
            values[key] = None
    return values
