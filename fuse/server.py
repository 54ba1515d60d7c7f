"""The pyfuse3 ``Operations`` shell over the pure union modules: it gathers facts with ``*at``
calls on directory descriptors, asks ``imaged.fuse.union``/``changes`` what they mean, and
performs the answer in the upper, again with ``*at`` calls (s3ql's ``fs.py`` shape).

pyfuse3 runs every request as a trio task in one OS thread, so a blocking syscall stalls the
whole mount. Metadata syscalls are microseconds and stay inline (a thread hop per lookup would
cost more than the syscall); only data copies, fsync and large reads and writes go to worker
threads, under one ``CapacityLimiter``. A copy-up runs under its node's lock, so concurrent
opens copy once and requests on other files never wait behind it.

Copy-up is whole, reflinked or partial as ``CopyUpPolicy`` chooses per file; a partial file
(``imaged.fuse.partial``) is served through its range record, and its writes and truncates
take its own lock, since each must leave data and record in ranges.py's order. The writeback
cache is off unless asked for (``imaged.fuse.serve`` says what acknowledgement then means).
Inode numbers are the node ids (``imaged.fuse.nodes``), derived from each file's origin. A copy
records its origin in ``trusted.imaged.origin`` (layer and inode number), so after a remount
the copy still shows its lower file's number, as overlay's ``trusted.overlay.origin`` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import stat
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from imaged.fsutil import FICLONE, copy_data, scandir_fd
from imaged.fuse import changes, partial, ranges, union
from imaged.fuse.changes import Access, CopyUp, CopyUpPolicy, CopyUpSetting
from imaged.fuse.index import LinkIndex
from imaged.fuse.nodes import ROOT_ID, Node, NodeTable, Origin
from imaged.fuse.union import UPPER, Entry, FileType, Listing, Resolution

TIMEOUT = 1.0  # entry and attribute cache: uppers change, and only this server changes them
# A name found in no layer is cached as absent for as long as one found is cached as present:
# a name appears only through this mount (create, mkdir, link, rename), which the kernel sees.
BIG_IO = 128 << 10  # reads and writes above this go to a worker thread
WORKERS = 4
LISTED_NAMES = 200_000  # names kept in cached listings of lower-only directories, at most
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SUID_BITS = stat.S_ISUID | stat.S_ISGID
_DEFAULT_POLICY = CopyUpPolicy()
ORIGIN_XATTR = b"trusted.imaged.origin"  # "<layer>-<inode>" of a copy's lower file
CAPABILITY_XATTR = b"security.capability"
TMP_PREFIX = b"#imaged-"  # copy-ups and swaps in progress in work; leftovers of a crash
_OPAQUE_NAMES = tuple((os.fsdecode(n), n) for n in union.OPAQUE_XATTRS)  # as listxattr says


def clear_work(work: int) -> None:
    """Remove what a killed server left half made in work: nothing there is visible in the
    union (a copy-up becomes visible only by its rename into the upper)."""
    for name in os.listdir(work):
        raw = os.fsencode(name)
        if not raw.startswith(TMP_PREFIX):
            continue
        if stat.S_ISDIR(os.stat(raw, dir_fd=work, follow_symlinks=False).st_mode):
            os.rmdir(raw, dir_fd=work)
        else:
            os.unlink(raw, dir_fd=work)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def renameat2(src_dir: int, src: bytes, dst_dir: int, dst: bytes, flags: int) -> None:
    """renameat2(2), for RENAME_WHITEOUT/EXCHANGE/NOREPLACE, which ``os.rename`` cannot ask."""
    if _libc.renameat2(src_dir, src, dst_dir, dst, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def cached_read(fd: int, size: int, off: int) -> bytes | None:
    """All ``size`` bytes at ``off`` if the page cache holds them (``RWF_NOWAIT``), else None.

    A read the cache answers costs less than a hop to a worker thread, so it stays on the loop;
    one that would wait on the disk goes to a worker, where the kernel's readahead requests for
    a cold file wait side by side instead of one after another on the loop (the cold read of a
    lower file measured 0.39x fuse-overlayfs with every read inline). A short read, at the end
    of the file or with only part of it cached, goes to the worker too.
    """
    buf = bytearray(size)
    try:
        got = os.preadv(fd, [buf], off, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP):
            return None
        raise
    return bytes(buf) if got == size else None


def _absent() -> pyfuse3.EntryAttributes:
    """A negative entry (node id 0): the kernel keeps the name as absent for ``TIMEOUT``
    instead of asking again at every miss (a PATH search, an import, a build's probes)."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = 0
    attr.entry_timeout = TIMEOUT
    return attr


def check_name(name: bytes) -> None:
    """A name the kernel hands over is never trusted to stay inside the directory."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise pyfuse3.FUSEError(errno.EINVAL)


def _proc(fd: int, name: bytes = b"") -> bytes:
    """A path naming ``name`` in the directory behind ``fd`` (or, without a name, the fd's
    own object, to be followed) for the xattr and link calls Python offers only by path; the
    name is checked, so it cannot escape."""
    path = b"/proc/self/fd/%d" % fd
    return path + b"/" + name if name else path


@dataclass(slots=True)
class Place:
    """Where a node's object is now: ``name`` in ``dir_fd`` of ``layer``, with its stat."""

    layer: int
    dir_fd: int
    name: bytes
    st: os.stat_result


@dataclass(slots=True)
class Handle:
    """An open file: the backing descriptor and what a write must still check."""

    fd: int
    node: int
    uid: int
    killpriv_checked: bool = False
    partial: partial.Partial | None = None


@dataclass(slots=True)
class DirHandle:
    node: int
    listing: Listing


class Server(pyfuse3.Operations):
    """One mounted container: an upper over lowers (top first), with an optional quota."""

    def __init__(self, upper: int, work: int, lowers: list[int], *, quota: int | None,
                 read_only: bool, usage: int, copy_up: CopyUpPolicy = _DEFAULT_POLICY,
                 writeback: bool = False) -> None:
        super().__init__()
        self.upper, self.work, self.lowers = upper, work, lowers
        self.read_only = read_only
        self.quota = quota
        self.usage = usage
        self.copy_up = copy_up
        # pyfuse3 reads this attribute at init; see imaged.fuse.serve for what it changes.
        self.enable_writeback_cache = writeback
        # By layer (0, the upper, never copies up): only ``auto`` asks, and only before
        # choosing partial over a reflink, so the probe runs for it alone.
        self.reflink: tuple[bool, ...] = (False, *(
            can_reflink(work, lowers) if copy_up.setting is CopyUpSetting.AUTO and not read_only
            else [False] * len(lowers)))
        self._records = partial.records_dir(work, create=False)
        self._recorded = partial.recorded(self._records)  # inode numbers with a range log
        self._partials: dict[int, partial.Partial] = {}
        self.nlowers = len(lowers)
        top = os.fstat(upper)
        self._layer_devs = [os.fstat(fd).st_dev for fd in (upper, *lowers)]
        self.nodes = NodeTable(Origin(top.st_dev, top.st_ino), self._layer_devs)
        root = union.root(self.nlowers)
        self._dirs: dict[int, tuple[tuple[int, int], ...]] = {
            ROOT_ID: tuple(zip(root.layers, (upper, *lowers), strict=True))}
        self._owned: set[int] = set()  # descriptors in _dirs this server opened (not roots)
        # Merged listings of directories without an upper part, oldest first: lowers never
        # change while mounted, and a directory gets an upper part (_upper_dir) before
        # anything in it changes, so such a listing stays true until then or its node goes.
        self._lower_listings: dict[int, Listing] = {}
        self._listed = 0
        self.index = LinkIndex(work, lowers)
        self._locks: dict[int, trio.Lock] = {}
        # Nodes of objects this server made and has set no xattr on since: they carry no file
        # capability, which the kernel asks for before every write and chown (a GETXATTR of
        # security.capability each, about a fifth of an untar's requests). Nothing else sets
        # one: the upper changes only through this server, and capabilities are never
        # inherited from a directory (default ACLs and security labels may be, so only this
        # name is answered from here).
        self._capless: set[int] = set()
        self._uid, self._gid = os.geteuid(), os.getegid()  # what a new object gets
        self._handles: dict[int, Handle] = {}
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._tmp = 0
        self.limiter = trio.CapacityLimiter(WORKERS)

    # facts

    def _entry(self, dir_fd: int, name: bytes) -> tuple[Entry, os.stat_result] | None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        kind = union.file_type(st.st_mode, st.st_rdev)
        opaque = kind is FileType.DIRECTORY and self._opaque(_proc(dir_fd, name))
        return Entry(kind, opaque, Origin(st.st_dev, st.st_ino)), st

    @classmethod
    def _opaque(cls, path: bytes) -> bool:
        """Whether a directory is marked opaque: one listxattr answers for the many that
        carry no overlay xattr at all, where a getxattr per name would cost two calls."""
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                return False
            raise
        return any(union.is_opaque(cls._xattr(path, raw))
                   for text, raw in _OPAQUE_NAMES if text in names)

    @staticmethod
    def _xattr(path: bytes, name: bytes) -> bytes | None:
        try:
            return os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                return None
            raise

    def _resolve(self, parent: int, name: bytes, *, complete: bool = False
                 ) -> tuple[Resolution, dict[int, os.stat_result]]:
        """``name`` in directory node ``parent`` through its layers, with each layer's stat."""
        layers = self._dir_layers(parent)
        stats: dict[int, os.stat_result] = {}

        def found() -> Iterator[tuple[int, Entry | None]]:
            for layer, fd in layers:
                got = self._entry(fd, name)
                if got is not None:
                    stats[layer] = got[1]
                yield layer, got[0] if got else None

        return union.resolve(found(), complete=complete), stats

    def _dir_layers(self, node_id: int) -> tuple[tuple[int, int], ...]:
        """(layer, fd) of every layer a directory node merges, opened once and kept: the
        descriptors follow the directories through renames, and only this server changes
        which layers a directory has (copy-up adds the upper, removal drops the node)."""
        cached = self._dirs.get(node_id)
        if cached is not None:
            return cached
        parent, name = self._located(node_id)
        res, _ = self._resolve(parent, name)
        if not res.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        parents = dict(self._dir_layers(parent))
        opened = []
        for layer in res.layers:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parents[layer])
            self._owned.add(fd)
            opened.append((layer, fd))
        self._dirs[node_id] = tuple(opened)
        return self._dirs[node_id]

    def _located(self, node_id: int) -> tuple[int, bytes]:
        """(parent node, name) the node was last seen under; ESTALE once it is gone."""
        where = self.nodes.where(node_id)
        if where is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return where

    def _drop_dir(self, node_id: int) -> None:
        self._unlist(node_id)
        for _, fd in self._dirs.pop(node_id, ()):
            if fd in self._owned:
                self._owned.discard(fd)
                os.close(fd)

    def _place(self, node_id: int) -> Place:
        """Where the node's object is now, a lower hard link already copied up linked first."""
        if node_id == ROOT_ID:
            layer, fd = self._dir_layers(ROOT_ID)[0]
            return Place(layer, fd, b".", os.fstat(fd))  # "." names the directory itself
        parent, name = self._located(node_id)
        return self._held(node_id, parent, name) or self._place_at(parent, name)

    def _held(self, node_id: int, parent: int, name: bytes) -> Place | None:
        """The node's place without walking the layers, when its upper inode is still where
        it was last seen: the upper is the top layer, so its entry decides what the name
        shows, and this server is the only one that changes the upper. None otherwise (not
        in the upper, or the name since whited out, removed or linked elsewhere)."""
        upper = self.nodes.get(node_id).upper
        layers = self._dirs.get(parent)
        if upper is None or not layers or layers[0][0] != UPPER:
            return None
        try:
            st = os.stat(name, dir_fd=layers[0][1], follow_symlinks=False)
        except FileNotFoundError:
            return None
        if st.st_ino != upper.ino or st.st_dev != upper.dev:
            return None
        return Place(UPPER, layers[0][1], name, st)

    def _place_at(self, parent: int, name: bytes) -> Place:
        res, stats = self._resolve(parent, name)
        if not res.exists:
            raise pyfuse3.FUSEError(errno.ESTALE)
        layer = res.top
        if layer != UPPER and not self.read_only:
            key = self.index.find(stats[layer])
            if key is not None:
                self._link_up(parent, name, key)
                return self._place_at(parent, name)
        return Place(layer, dict(self._dir_layers(parent))[layer], name, stats[layer])

    # replies

    def _attrs(self, node: Node, st: os.stat_result, nlink: int | None = None
               ) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.id  # also the node id (imaged.fuse.nodes)
        attr.generation = node.generation
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        attr.st_mode, attr.st_nlink = st.st_mode, st.st_nlink if nlink is None else nlink
        attr.st_uid, attr.st_gid, attr.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        attr.st_size, attr.st_blksize, attr.st_blocks = st.st_size, st.st_blksize, st.st_blocks
        attr.st_atime_ns, attr.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _known(self, parent: int, name: bytes, st: os.stat_result, layer: int, *,
               made: bool = False) -> tuple[Node, pyfuse3.EntryAttributes]:
        """Count a lookup of the object ``st`` under ``name``, and its attributes: those of
        the copy when it is a lower hard link another name of which was copied up.

        An upper inode's recorded origin is read once, when the table first meets the inode;
        never for one this server has just ``made`` (it has none)."""
        here = Origin(st.st_dev, st.st_ino)
        if layer == UPPER:
            pdir = self._dir_layers(parent)[0][1]
            found = self.nodes.find(here)
            if found is not None and found.upper == here:
                node = found
                self.nodes.counted(node)
            else:
                origin = None if made else self._recorded_origin(pdir, name)
                node = self.nodes.lookup(here if origin is None else origin, here)
            nlink: int | None = self.index.nlink(pdir, name, st)
        else:
            indexed = self.index.find(st)
            if indexed is None:
                node, nlink = self.nodes.lookup(here), None
            else:
                st = os.stat(indexed, dir_fd=self.index.fd, follow_symlinks=False)
                node = self.nodes.lookup(here, Origin(st.st_dev, st.st_ino))
                nlink = self.index.nlink(self.index.fd, indexed, st)
        self.nodes.named(node, parent, name)
        return node, self._attrs(node, st, nlink)

    def _recorded_origin(self, pdir: int, name: bytes) -> Origin | None:
        """The lower origin a copy recorded at copy-up, in any earlier mount."""
        value = self._xattr(_proc(pdir, name), ORIGIN_XATTR)
        if value is None:
            return None
        layer, _, ino = value.partition(b"-")
        try:
            return Origin(self._layer_devs[int(layer)], int(ino))
        except (ValueError, IndexError):
            return None  # not ours to trust: the copy then keeps its own number

    def _record_origin(self, dir_fd: int, name: bytes, layer: int, st: os.stat_result
                       ) -> None:
        os.setxattr(_proc(dir_fd, name), ORIGIN_XATTR, b"%d-%d" % (layer, st.st_ino),
                    follow_symlinks=False)

    def _placed_attrs(self, node_id: int, place: Place) -> pyfuse3.EntryAttributes:
        nlink = self.index.nlink(place.dir_fd, place.name, place.st) \
            if place.layer == UPPER else None
        return self._attrs(self.nodes.get(node_id), place.st, nlink)

    def _forgotten(self, node_id: int, count: int) -> None:
        self.nodes.forget(node_id, count)
        if node_id not in self.nodes:
            self._drop_dir(node_id)
            self._locks.pop(node_id, None)
            self._capless.discard(node_id)

    def _writable(self) -> None:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    # lookup and attributes

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_name(name)
        with _errors():
            res, stats = self._resolve(parent_inode, name)
            if not res.exists:
                return _absent()
            return self._known(parent_inode, name, stats[res.top], res.top)[1]

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for node_id, count in inode_list:
            self._forgotten(node_id, count)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        with _errors():
            return self._placed_attrs(inode, self._place(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._writable()
        with _errors():
            truncate_to = attr.st_size if fields.update_size else None
            place = await self._copied_up(inode, Access.SETATTR, truncate_to=truncate_to)
            d, n = place.dir_fd, place.name
            part = self._partial_of(place) if fields.update_size else None
            if part is not None:
                try:
                    await self._truncate_partial(part, attr.st_size)
                finally:
                    self._unuse(part)
                self._clear_privs(d, n, ctx)
            elif fields.update_size:
                before = place.st.st_blocks
                handle = self._handles.get(fh) if fh is not None else None
                if handle is not None:
                    os.ftruncate(handle.fd, attr.st_size)
                else:
                    fd = os.open(n, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
                    try:
                        os.ftruncate(fd, attr.st_size)
                    finally:
                        os.close(fd)
                self._clear_privs(d, n, ctx)
                self.usage += (self._stat(d, n).st_blocks - before) * 512
            if fields.update_uid or fields.update_gid:
                os.chown(n, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1,
                         dir_fd=d, follow_symlinks=False)
            if fields.update_mode and not stat.S_ISLNK(place.st.st_mode):
                os.chmod(n, stat.S_IMODE(attr.st_mode), dir_fd=d)
            if fields.update_atime or fields.update_mtime:
                # a stat for the time not asked to change; utimensat's both (tar's) need none
                both = fields.update_atime and fields.update_mtime
                current = attr if both else self._stat(d, n)
                os.utime(n, ns=(attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                                attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns),
                         dir_fd=d, follow_symlinks=False)
            return self._placed_attrs(inode, Place(place.layer, d, n, self._stat(d, n)))

    @staticmethod
    def _stat(dir_fd: int, name: bytes) -> os.stat_result:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)

    def _clear_privs(self, dir_fd: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """A change of contents by anyone but root drops suid, and sgid with group execute.
        libfuse 3.14 does not ask HANDLE_KILLPRIV (its ``debug`` INIT line shows the flags),
        so the kernel clears them itself first, with a GETATTR and a SETATTR; this covers
        a kernel or library that leaves it to the server, and costs a stat where it did not."""
        if ctx.uid == 0:
            return
        mode = self._stat(dir_fd, name).st_mode
        drop = mode & stat.S_ISUID
        if mode & stat.S_ISGID and mode & stat.S_IXGRP:
            drop |= stat.S_ISGID
        if drop:
            os.chmod(name, stat.S_IMODE(mode) & ~drop, dir_fd=dir_fd)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        with _errors():
            place = self._place(inode)
            return os.readlink(place.name, dir_fd=place.dir_fd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with _errors():
            vfs = os.fstatvfs(self.upper)
        data = pyfuse3.StatvfsData()
        data.f_bsize, data.f_frsize = vfs.f_bsize, vfs.f_frsize
        data.f_blocks, data.f_bfree, data.f_bavail = vfs.f_blocks, vfs.f_bfree, vfs.f_bavail
        if self.quota is not None:
            free = max(0, self.quota - self.usage) // vfs.f_frsize
            data.f_blocks = self.quota // vfs.f_frsize
            data.f_bfree = data.f_bavail = min(free, vfs.f_bavail)
        data.f_files, data.f_ffree, data.f_favail = vfs.f_files, vfs.f_ffree, vfs.f_favail
        data.f_namemax = vfs.f_namemax - 4  # room for overlay's ".wh." names
        return data

    # directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        with _errors():
            listing = self._listing(inode)
        fh = self._fh()
        self._dir_handles[fh] = DirHandle(inode, listing)
        return fh

    def _listing(self, inode: int) -> Listing:
        """The directory's merged listing; read once for a directory whose layers are all
        lowers (``_lower_listings``), since only an upper part changes."""
        layers = self._dir_layers(inode)
        lower_only = layers[0][0] != UPPER
        if lower_only and (cached := self._lower_listings.get(inode)) is not None:
            return cached

        def contents(fd: int) -> Iterator[tuple[bytes, Entry]]:
            with scandir_fd(fd) as entries:
                for item in entries:
                    name = os.fsencode(item.name)
                    if item.is_dir(follow_symlinks=False):  # opaque or not
                        got = self._entry(fd, name)
                        if got is not None:
                            yield name, got[0]
                    elif item.is_file(follow_symlinks=False):
                        yield name, Entry(FileType.REGULAR)
                    elif item.is_symlink():
                        yield name, Entry(FileType.SYMLINK)
                    else:  # devices (whiteouts among them), fifos, sockets
                        st = item.stat(follow_symlinks=False)
                        yield name, Entry(union.file_type(st.st_mode, st.st_rdev))

        listing = union.merge((layer, list(contents(fd))) for layer, fd in layers)
        if lower_only:
            self._lower_listings[inode] = listing
            self._listed += len(listing)
            while self._listed > LISTED_NAMES:
                self._unlist(next(iter(self._lower_listings)))
        return listing

    def _unlist(self, node_id: int) -> None:
        gone = self._lower_listings.pop(node_id, None)
        if gone is not None:
            self._listed -= len(gone)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dir_handles[fh]
        # The directory's layers now: a copy-up since opendir adds the upper and keeps the
        # lowers' descriptors; a removed directory has none, and lists nothing more.
        layers = dict(self._dirs.get(handle.node, ()))
        with _errors():
            for offset, listed in handle.listing.resume(start_id):
                if listed.layer not in layers:
                    return
                try:
                    st = os.stat(listed.name, dir_fd=layers[listed.layer],
                                 follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since opendir: skipped, the offsets stay the same
                node, attr = self._known(handle.node, listed.name, st, listed.layer)
                if not pyfuse3.readdir_reply(token, listed.name, attr, offset):
                    self._forgotten(node.id, 1)  # the kernel did not take this entry
                    return

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._make(parent_inode, name, FileType.DIRECTORY, mode, ctx)[1]

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        kind = union.file_type(mode, rdev)
        if kind is FileType.WHITEOUT:
            raise pyfuse3.FUSEError(errno.EPERM)  # a 0/0 device would read as a whiteout
        return self._make(parent_inode, name, kind, mode, ctx, rdev=rdev)[1]

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._make(parent_inode, name, FileType.SYMLINK, 0o777, ctx,
                                  target=target)[1]

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        fd = -1  # the new file as the caller opens it: made and opened in one call

        def made(where: int, name: bytes, mode: int) -> None:
            nonlocal fd
            fd = os.open(name, changes.open_flags(flags, writeback=self.writeback) |
                         os.O_CREAT | os.O_EXCL, mode, dir_fd=where)

        try:
            node, attr = self._make(parent_inode, name, FileType.REGULAR, mode, ctx,
                                    create=made)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        fh = self._fh()
        self._handles[fh] = Handle(fd, node.id, ctx.uid)
        return pyfuse3.FileInfo(fh=fh), attr

    def _make(self, parent: int, name: bytes, kind: FileType, mode: int,
              ctx: pyfuse3.RequestContext, *, rdev: int = 0, target: bytes = b"",
              create: Callable[[int, bytes, int], None] | None = None
              ) -> tuple[Node, pyfuse3.EntryAttributes]:
        """Make a new object as the caller would: their uid, their gid or the setgid
        directory's, their umask, made aside and renamed over an upper whiteout if one is
        there, so the name never shows the lower object it hid. ``create`` makes a regular
        file (in the directory, under the name and with the mode it is given) instead of an
        empty one made and closed: FUSE's create keeps it open.

        Made in the upper directory by this server, an object is already the server's uid's
        and the directory's gid (setgid) or the server's: when those are the caller's (root
        unpacking an image), it is made with its final mode and needs no chown and chmod.
        Otherwise it is made private, then given its owner and then its mode, in that order
        since a chown clears suid and sgid."""
        check_name(name)
        self._writable()
        with _errors():
            res, _ = self._resolve(parent, name)
            plan = changes.plan_create(self._parent_res(parent), res, kind)
            if kind is FileType.DIRECTORY:
                self._charge(4096)
            pdir = self._upper_dir(parent)
            pst = os.fstat(pdir)
            gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
            mode = stat.S_IMODE(mode) & ~ctx.umask
            if kind is FileType.DIRECTORY and pst.st_mode & stat.S_ISGID:
                mode |= stat.S_ISGID
            where, made = (self.work, self._tmp_name()) if plan.over_whiteout else (pdir, name)
            owned = not plan.over_whiteout and ctx.uid == self._uid and \
                gid == (pst.st_gid if pst.st_mode & stat.S_ISGID else self._gid)
            first = mode if owned else 0o600
            if kind is FileType.DIRECTORY:
                os.mkdir(made, mode if owned else 0o700, dir_fd=where)
                if plan.opaque:
                    os.setxattr(_proc(where, made), union.OPAQUE_XATTRS[0], union.OPAQUE_VALUE,
                                follow_symlinks=False)
            elif kind is FileType.SYMLINK:
                os.symlink(target, made, dir_fd=where)
            elif kind is FileType.REGULAR and create is not None:
                create(where, made, first)
            elif kind is FileType.REGULAR:
                os.close(os.open(made, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                                 first, dir_fd=where))
            else:
                os.mknod(made, stat.S_IFMT(_MODES[kind]) | first, rdev, dir_fd=where)
            if not owned:
                os.chown(made, ctx.uid, gid, dir_fd=where, follow_symlinks=False)
                if kind is not FileType.SYMLINK:
                    os.chmod(made, mode, dir_fd=where)
            if plan.over_whiteout:
                renameat2(self.work, made, pdir, name, changes.RENAME_EXCHANGE)
                os.unlink(made, dir_fd=self.work)
            st = os.stat(name, dir_fd=pdir, follow_symlinks=False)
            self.usage += st.st_blocks * 512
            node, attr = self._known(parent, name, st, UPPER, made=True)
            self._capless.add(node.id)
            return node, attr

    def _parent_res(self, parent: int) -> Resolution:
        layers = tuple(layer for layer, _ in self._dir_layers(parent))
        return Resolution(layers, tuple(Entry(FileType.DIRECTORY) for _ in layers),
                          lower_positive=False)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, directory=False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, directory=True)

    async def _remove(self, parent: int, name: bytes, *, directory: bool) -> None:
        check_name(name)
        self._writable()
        with _errors():
            res, stats = self._resolve(parent, name, complete=True)
            node = self.nodes.find(res.entry.origin) if res.exists else None  # type: ignore[arg-type]
            if not directory and node is not None and res.top != UPPER and \
                    self.index.key(stats[res.top]) is not None:
                # overlay's index=on copies a lower hard link up before removing a name of
                # it, so that the index can count the names left
                await self._copied_up_as(node, parent, name)
                res, stats = self._resolve(parent, name, complete=True)
            if directory:
                listing = self._listing(node.id) if node else self._listing_of(parent, name)
                plan = changes.plan_rmdir(self._parent_res(parent), res, listing)
            else:
                plan = changes.plan_unlink(self._parent_res(parent), res)
            pdir = self._upper_dir(parent)
            freed = 0
            gone = None
            last = True  # the union's last name of the object
            if res.in_upper:
                st = stats[UPPER]
                freed = st.st_blocks * 512 if directory or st.st_nlink == 1 else 0
                gone = st if not directory and st.st_nlink == 1 else None
                if not directory:
                    last = self.index.nlink(pdir, name, st) <= 1
                    self.index.adjust(pdir, name, st, -1)
            _clear_whiteouts(pdir, name, plan.clear)
            if plan.action is changes.Removal.REMOVE:
                if directory:
                    os.rmdir(name, dir_fd=pdir)
                else:
                    os.unlink(name, dir_fd=pdir)
            elif plan.action is changes.Removal.WHITEOUT:
                os.mknod(name, stat.S_IFCHR, 0, dir_fd=pdir)
            else:
                self._replace_with_whiteout(pdir, name, directory)
            self.usage -= freed
            if gone is not None:
                self._unlinked(gone)
            if node is not None:
                self.nodes.unnamed(node.id, parent, name)
                if last:
                    self.nodes.detach(node.id)
                if directory:  # its name may soon be a new directory's
                    self._drop_dir(node.id)

    def _listing_of(self, parent: int, name: bytes) -> Listing:
        """The merged listing of a child directory the kernel has no node for."""
        res, stats = self._resolve(parent, name)
        node = self.nodes.lookup(Origin(stats[res.top].st_dev, stats[res.top].st_ino))
        self.nodes.named(node, parent, name)
        try:
            return self._listing(node.id)
        finally:
            self._forgotten(node.id, 1)

    def _replace_with_whiteout(self, pdir: int, name: bytes, directory: bool) -> None:
        """Swap the upper entry for a whiteout in one step (made in work, exchanged in), so
        the lower object never shows through meanwhile."""
        tmp = self._tmp_name()
        os.mknod(tmp, stat.S_IFCHR, 0, dir_fd=self.work)
        renameat2(self.work, tmp, pdir, name, changes.RENAME_EXCHANGE)
        if directory:
            os.rmdir(tmp, dir_fd=self.work)
        else:
            os.unlink(tmp, dir_fd=self.work)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        check_name(name_old)
        check_name(name_new)
        self._writable()
        with _errors():
            old, _ = self._resolve(parent_inode_old, name_old, complete=True)
            new, new_stats = self._resolve(parent_inode_new, name_new, complete=True)
            target = self.nodes.find(new.entry.origin) if new.exists else None  # type: ignore[arg-type]
            if target is not None and not flags & changes.RENAME_EXCHANGE and \
                    new.top != UPPER and self.index.key(new_stats[new.top]) is not None:
                # as unlink does: the index counts the lower hard link's names left
                await self._copied_up_as(target, parent_inode_new, name_new)
                new, new_stats = self._resolve(parent_inode_new, name_new, complete=True)
            listing = None
            if new.is_dir and not flags & changes.RENAME_EXCHANGE:
                listing = self._listing_of(parent_inode_new, name_new)
            plan = changes.plan_rename(self._parent_res(parent_inode_old), old,
                                       self._parent_res(parent_inode_new), new, flags, listing)
            moved = self.nodes.find(old.entry.origin)  # type: ignore[arg-type]
            if plan.copy_up_old and moved is not None:
                await self._copied_up_as(moved, parent_inode_old, name_old)
            elif plan.copy_up_old:
                raise pyfuse3.FUSEError(errno.ESTALE)
            if plan.copy_up_new and target is not None:
                await self._copied_up_as(target, parent_inode_new, name_new)
            old_dir = self._upper_dir(parent_inode_old)
            new_dir = self._upper_dir(parent_inode_new)
            _clear_whiteouts(new_dir, name_new, plan.clear)
            for mark, where, name in ((plan.opaque_old, old_dir, name_old),
                                      (plan.opaque_new, new_dir, name_new)):
                if mark:
                    os.setxattr(_proc(where, name), union.OPAQUE_XATTRS[0], union.OPAQUE_VALUE,
                                follow_symlinks=False)
            freed = 0
            gone = None
            last = True
            if plan.replaces and new.in_upper:
                st = new_stats[UPPER]
                freed = st.st_blocks * 512 if new.is_dir or st.st_nlink == 1 else 0
                gone = st if not new.is_dir and st.st_nlink == 1 else None
                if not new.is_dir:
                    last = self.index.nlink(new_dir, name_new, st) <= 1
                    self.index.adjust(new_dir, name_new, st, -1)
            renameat2(old_dir, name_old, new_dir, name_new, plan.flags)
            if plan.remove_whiteout_after:
                os.unlink(name_old, dir_fd=old_dir)
            self.usage -= freed
            if gone is not None:
                self._unlinked(gone)
            if target is not None and plan.replaces:
                self.nodes.unnamed(target.id, parent_inode_new, name_new)
                if last:
                    self.nodes.detach(target.id)
                if new.is_dir:
                    self._drop_dir(target.id)
            if moved is not None:
                self.nodes.unnamed(moved.id, parent_inode_old, name_old)
                self.nodes.named(moved, parent_inode_new, name_new)
            if target is not None and flags & changes.RENAME_EXCHANGE:
                self.nodes.unnamed(target.id, parent_inode_new, name_new)
                self.nodes.named(target, parent_inode_old, name_old)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_name(new_name)
        self._writable()
        with _errors():
            place = self._place(inode)
            src_parent, src_name = self._located(inode)
            source, _ = self._resolve(src_parent, src_name)
            res, _ = self._resolve(new_parent_inode, new_name)
            plan = changes.plan_link(source, self._parent_res(new_parent_inode), res)
            if plan.copy_up_source:
                place = await self._copied_up(inode, Access.LINK)
            pdir = self._upper_dir(new_parent_inode)
            if plan.over_whiteout:
                tmp = self._tmp_name()
                os.link(place.name, tmp, src_dir_fd=place.dir_fd, dst_dir_fd=self.work,
                        follow_symlinks=False)
                renameat2(self.work, tmp, pdir, new_name, changes.RENAME_EXCHANGE)
                os.unlink(tmp, dir_fd=self.work)
            else:
                os.link(place.name, new_name, src_dir_fd=place.dir_fd, dst_dir_fd=pdir,
                        follow_symlinks=False)
            self.index.adjust(pdir, new_name, place.st, +1)
            node = self.nodes.get(inode)
            node.lookups += 1
            self.nodes.named(node, new_parent_inode, new_name)
            return self._placed_attrs(inode, Place(UPPER, pdir, new_name,
                                                   self._stat(pdir, new_name)))

    # files

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        access = changes.open_access(flags)
        if access is Access.WRITE:
            self._writable()
        with _errors():
            truncate_to = 0 if flags & os.O_TRUNC else None
            place = await self._copied_up(inode, access, truncate_to=truncate_to)
            fd = os.open(place.name, changes.open_flags(flags, writeback=self.writeback),
                         dir_fd=place.dir_fd)
            part = None
            try:
                part = self._partial_of(place)
                if flags & os.O_TRUNC and part is not None:
                    truncated, part = part, None
                    try:
                        await self._truncate_partial(truncated, 0)
                    finally:
                        self._unuse(truncated)
                elif flags & os.O_TRUNC and place.st.st_blocks:
                    os.ftruncate(fd, 0)
                    self.usage -= place.st.st_blocks * 512
            except BaseException:
                if part is not None:
                    self._unuse(part)
                os.close(fd)
                raise
        fh = self._fh()
        self._handles[fh] = Handle(fd, inode, ctx.uid, partial=part)
        # Lower-only files never change under the mount: keep their pages across opens. Upper
        # files, partial ones among them, start from what the server says at each open.
        return pyfuse3.FileInfo(fh=fh, keep_cache=place.layer != UPPER)

    @property
    def writeback(self) -> bool:
        return bool(self.enable_writeback_cache)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        fd, part = handle.fd, handle.partial
        with _errors():
            if part is not None and not part.done:
                if size > BIG_IO:
                    return await trio.to_thread.run_sync(partial.read, part, off, size,
                                                         limiter=self.limiter)
                return partial.read(part, off, size)
            if size <= BIG_IO:
                cached = cached_read(fd, size, off)
                if cached is not None:
                    return cached
            return await trio.to_thread.run_sync(os.pread, fd, size, off, limiter=self.limiter)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        part = handle.partial
        with _errors():
            if part is not None:
                async with part.lock:
                    if not part.done:
                        return await self._write_partial(handle, part, off, buf)
            before = os.fstat(handle.fd)
            if self.quota is not None:
                self._charge(self._growth(handle.fd, before, off, len(buf)))
            self._kill_privs(handle, before)
            if len(buf) > BIG_IO:
                written = await trio.to_thread.run_sync(os.pwrite, handle.fd, buf, off,
                                                        limiter=self.limiter)
            else:
                written = os.pwrite(handle.fd, buf, off)
            self.usage += (os.fstat(handle.fd).st_blocks - before.st_blocks) * 512
            return written

    def _kill_privs(self, handle: Handle, before: os.stat_result) -> None:
        """A non-root writer's first write drops suid (and sgid with group execute)."""
        if handle.killpriv_checked:
            return
        handle.killpriv_checked = True
        if handle.uid != 0 and before.st_mode & _SUID_BITS:
            drop = before.st_mode & stat.S_ISUID
            if before.st_mode & stat.S_ISGID and before.st_mode & stat.S_IXGRP:
                drop |= stat.S_ISGID
            os.fchmod(handle.fd, stat.S_IMODE(before.st_mode) & ~drop)

    async def _write_partial(self, handle: Handle, part: partial.Partial, off: int,
                             buf: bytes) -> int:
        """A write to a partial file, under its lock: charged for the whole blocks it makes
        the upper hold (what it writes and what it fills from the lower), acknowledged once
        data and record are in the page cache, as a plain file's write is (``partial.write``;
        fsync makes them durable)."""
        before = os.fstat(part.upper)
        low, high = ranges.aligned(off, off + len(buf), partial.BLOCK)
        self._charge(self._growth(part.upper, before, low, high - low))
        self._kill_privs(handle, before)
        written = await trio.to_thread.run_sync(partial.write, part, off, buf,
                                                limiter=self.limiter)
        self.usage += (os.fstat(part.upper).st_blocks - before.st_blocks) * 512
        if part.ranges.complete:
            await trio.to_thread.run_sync(partial.finish, part, self.records,
                                          limiter=self.limiter)
            self._retire(part)
        return written

    async def _truncate_partial(self, part: partial.Partial, size: int) -> None:
        async with part.lock:
            before = os.fstat(part.upper).st_blocks
            if part.done:
                os.ftruncate(part.upper, size)
            else:
                await trio.to_thread.run_sync(partial.truncate, part, size,
                                              limiter=self.limiter)
                if part.ranges.complete:
                    await trio.to_thread.run_sync(partial.finish, part, self.records,
                                                  limiter=self.limiter)
                    self._retire(part)
            self.usage += (os.fstat(part.upper).st_blocks - before) * 512

    @staticmethod
    def _growth(fd: int, st: os.stat_result, off: int, size: int) -> int:
        """The most a write can add to the upper's allocation: nothing where the range is
        allocated already, else the blocks it spans plus one for the extent tree."""
        if size == 0:
            return 0
        if off + size <= st.st_size:
            try:
                if os.lseek(fd, off, os.SEEK_HOLE) >= off + size:
                    return 0
            except OSError:
                pass
        block = 4096
        return (off + size + block - 1) // block * block - off // block * block + block

    def _charge(self, more: int) -> None:
        if self.quota is not None and more > 0 and self.usage + more > self.quota:
            raise pyfuse3.FUSEError(errno.ENOSPC)

    async def flush(self, fh: int) -> None:
        """Nothing to do at close (writes are done when acknowledged, and there are no
        locks to drop): ENOSYS makes the kernel stop sending FLUSH at every close(2), which
        then returns 0 without a round trip through this process."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """A partial file's writes sync nothing, so its fsync is where they become durable:
        data, then the sync entry that confirms their record (``partial.sync``)."""
        handle = self._handles[fh]
        part = handle.partial
        with _errors():
            if part is not None:
                async with part.lock:
                    if not part.done:
                        upper_dir = None if part.dirs_synced or part.unlinked else \
                            self._upper_dir(self._located(handle.node)[0])
                        await trio.to_thread.run_sync(
                            functools.partial(partial.sync, part, self.records, upper_dir,
                                              datasync=datasync), limiter=self.limiter)
                        return
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, handle.fd,
                                          limiter=self.limiter)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        layers = self._dirs.get(self._dir_handles[fh].node, ())
        if layers and layers[0][0] == UPPER:
            fd = layers[0][1]
            with _errors():
                await trio.to_thread.run_sync(os.fsync, fd, limiter=self.limiter)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
            if handle.partial is not None:
                self._unuse(handle.partial)

    # xattrs

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == CAPABILITY_XATTR and inode in self._capless:
            raise pyfuse3.FUSEError(errno.ENODATA)
        with _errors():
            union.check_xattr_name(name)
            place = self._place(inode)
            return os.getxattr(_proc(place.dir_fd, place.name), name, follow_symlinks=False)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        with _errors():
            place = self._place(inode)
            names = [os.fsencode(n) for n in
                     os.listxattr(_proc(place.dir_fd, place.name), follow_symlinks=False)]
            return union.visible_xattrs(names, privileged=ctx.uid == 0)

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        self._capless.discard(inode)
        with _errors():
            union.check_xattr_name(name)
            place = await self._copied_up(inode, Access.SETXATTR)
            os.setxattr(_proc(place.dir_fd, place.name), name, value, follow_symlinks=False)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        with _errors():
            union.check_xattr_name(name)
            place = await self._copied_up(inode, Access.SETXATTR)
            os.removexattr(_proc(place.dir_fd, place.name), name, follow_symlinks=False)

    # copy-up

    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _tmp_name(self) -> bytes:
        self._tmp += 1
        return TMP_PREFIX + b"%d-%d" % (os.getpid(), self._tmp)

    def _upper_dir(self, node_id: int) -> int:
        """The upper descriptor of a directory node, its chain copied up first: inline and
        without a lock, since a directory's copy-up is metadata only and never awaits."""
        layers = self._dir_layers(node_id)
        if layers[0][0] == UPPER:
            return layers[0][1]
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        parent, name = self._located(node_id)
        pdir = self._upper_dir(parent)
        lower_fd = layers[0][1]
        st = os.fstat(lower_fd)
        self._charge(st.st_blocks * 512)
        tmp = self._tmp_name()
        os.mkdir(tmp, 0o700, dir_fd=self.work)
        self._copy_meta(self.work, tmp, st, _proc(lower_fd, b"."))
        self._record_origin(self.work, tmp, layers[0][0], st)
        os.rename(tmp, name, src_dir_fd=self.work, dst_dir_fd=pdir)
        fd = os.open(name, _DIR_FLAGS, dir_fd=pdir)
        self._owned.add(fd)
        self._dirs[node_id] = ((UPPER, fd), *layers)
        self._unlist(node_id)
        new = os.fstat(fd)
        self.usage += new.st_blocks * 512
        self.nodes.copied_up(node_id, Origin(new.st_dev, new.st_ino))
        return fd

    def _copy_meta(self, dir_fd: int, name: bytes, st: os.stat_result, source: bytes) -> None:
        """Owner, mode, xattrs (but overlay's own and what the upper refuses) and times."""
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
        target = _proc(dir_fd, name)
        try:
            names = os.listxattr(source, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            names = []
        for xname in names:
            raw = os.fsencode(xname)
            if union.is_private_xattr(raw):
                continue
            try:
                os.setxattr(target, raw, os.getxattr(source, raw, follow_symlinks=False),
                            follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                    raise
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd,
                 follow_symlinks=False)

    async def _copied_up(self, node_id: int, access: Access, *,
                         truncate_to: int | None = None) -> Place:
        """The node's place, copied up first if ``access`` changes it: once, under the
        node's lock, into a temporary file in work renamed in."""
        place = self._place(node_id)
        if place.layer == UPPER or access is Access.READ:
            return place
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if stat.S_ISDIR(place.st.st_mode):
            self._upper_dir(node_id)
            return self._place(node_id)
        lock = self._locks.setdefault(node_id, trio.Lock())
        async with lock:
            place = self._place(node_id)
            if place.layer == UPPER:
                return place
            parent, name = self._located(node_id)
            self._upper_dir(parent)
            st = place.st
            mode = changes.choose_copy_up(self.copy_up, union.file_type(st.st_mode, st.st_rdev),
                                          st.st_size, can_reflink=self.reflink[place.layer],
                                          truncate_to=truncate_to)
            tmp = self._tmp_name()
            if mode is CopyUp.METADATA:
                self._make_like(tmp, st, place)
            elif mode is CopyUp.PARTIAL:
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                             dir_fd=self.work)
                try:
                    os.ftruncate(fd, st.st_size)
                finally:
                    os.close(fd)
            else:
                self._charge(st.st_blocks * 512)
                src = os.open(place.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=place.dir_fd)
                try:
                    dst = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                                  0o600, dir_fd=self.work)
                    try:
                        await trio.to_thread.run_sync(copy_data, src, dst, st.st_size,
                                                      limiter=self.limiter)
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)
            self._copy_meta(self.work, tmp, st, _proc(place.dir_fd, place.name))
            self._record_origin(self.work, tmp, place.layer, st)
            if mode is CopyUp.PARTIAL:
                ref = partial.lower_ref(place.layer, self._path(node_id))
                self._recorded.add(await trio.to_thread.run_sync(
                    partial.start, self.work, self.records, tmp, st.st_size, ref,
                    limiter=self.limiter))
            self.index.add(self.work, tmp, st)
            parent, name = self._located(node_id)  # a rename may have moved it meanwhile
            pdir = self._upper_dir(parent)
            os.rename(tmp, name, src_dir_fd=self.work, dst_dir_fd=pdir)
            new = os.stat(name, dir_fd=pdir, follow_symlinks=False)
            self.usage += new.st_blocks * 512
            self.nodes.copied_up(node_id, Origin(new.st_dev, new.st_ino))
            return self._place(node_id)

    async def _copied_up_as(self, node: Node, parent: int, name: bytes) -> None:
        """Copy the node up under this name of it, which a request is about to change: a
        hard link's node may have been seen last under another name, and this one must be in
        the upper afterwards (linked to the copy when another name was copied up first)."""
        self.nodes.named(node, parent, name)
        await self._copied_up(node.id, Access.WRITE)
        self._place_at(parent, name)

    def _path(self, node_id: int) -> bytes:
        """The node's path from the root of the union: for a lower file, also its path in
        its layer (lower directories never move, and a moved file was copied up)."""
        names = []
        while node_id != ROOT_ID:
            node_id, name = self._located(node_id)
            names.append(name)
        return b"/".join(reversed(names))

    # partial files

    @property
    def records(self) -> int:
        """work/ranges, made at the first partial copy-up."""
        if self._records is None:
            self._records = partial.records_dir(self.work, create=True)
            assert self._records is not None  # noqa: S101 - just made
        return self._records

    def _partial_of(self, place: Place) -> partial.Partial | None:
        """The loaded record of an upper file with a range log, counted as used (``_unuse``
        when done with it); None for a whole file. A log whose inode is not marked is stale
        (module ``imaged.fuse.partial``) and goes."""
        st = place.st
        if place.layer != UPPER or not stat.S_ISREG(st.st_mode) or \
                st.st_ino not in self._recorded:
            return None
        part = self._partials.get(st.st_ino)
        if part is None:
            flags = os.O_RDONLY if self.read_only else os.O_RDWR
            fd = os.open(place.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=place.dir_fd)
            try:
                if not partial.is_marked(fd):
                    os.close(fd)
                    if not self.read_only:
                        partial.forget(self.records, st.st_ino)
                    self._recorded.discard(st.st_ino)
                    return None
                part = partial.load(self.records, fd, self.lowers, writable=not self.read_only)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._partials[st.st_ino] = part
        part.users += 1
        return part

    def _unuse(self, part: partial.Partial) -> None:
        part.users -= 1
        if part.users == 0 and part.unlinked and not part.done:
            partial.forget(self.records, part.ino)
            part.done = True
            self._retire(part)
        elif part.users == 0 and part.done:
            part.close()

    def _retire(self, part: partial.Partial) -> None:
        """A completed (or unlinked and closed) partial file is a plain file from now on."""
        self._partials.pop(part.ino, None)
        self._recorded.discard(part.ino)
        if part.users == 0:
            part.close()

    def _unlinked(self, st: os.stat_result) -> None:
        """The last name of an upper file went: its log goes too, once nobody has the file
        open (an open one still reads through its record)."""
        if st.st_ino not in self._recorded:
            return
        part = self._partials.get(st.st_ino)
        if part is not None and part.users:
            part.unlinked = True
            return
        partial.forget(self.records, st.st_ino)
        self._recorded.discard(st.st_ino)
        if part is not None:
            part.done = True
            self._retire(part)

    async def materialize(self) -> dict[str, Any]:
        """Complete every partial file (the control socket's ``materialize``), or none if
        they do not all fit in the quota: the copies are charged like writes."""
        if self.read_only:
            return {"error": "the container is read-only"}
        found = await trio.to_thread.run_sync(
            lambda: list(partial.marked_files(self.upper, set(self._recorded))),
            limiter=self.limiter)
        loaded: list[partial.Partial] = []
        try:
            for fd in found:
                ino = os.fstat(fd).st_ino
                part = self._partials.get(ino)
                if part is None:
                    part = partial.load(self.records, fd, self.lowers, writable=True)
                    self._partials[ino] = part
                else:
                    os.close(fd)
                part.users += 1
                loaded.append(part)
            need = sum(partial.cost(partial.missing(p)) for p in loaded if not p.done)
            if self.quota is not None and self.usage + need > self.quota:
                left = max(0, self.quota - self.usage)
                return {"error": str(partial.NoRoom(need, left)), "need": need, "left": left}
            files = copied = 0
            for part in loaded:
                async with part.lock:
                    if part.done:
                        continue
                    before = os.fstat(part.upper).st_blocks
                    await trio.to_thread.run_sync(partial.complete, part, self.records,
                                                  limiter=self.limiter)
                    grown = (os.fstat(part.upper).st_blocks - before) * 512
                    self.usage += grown
                    copied += grown
                    files += 1
                    self._retire(part)
            return {"ok": True, "files": files, "bytes": copied}
        finally:
            for part in loaded:
                self._unuse(part)

    def _make_like(self, tmp: bytes, st: os.stat_result, place: Place) -> None:
        """A data-less copy in work: an empty file, a symlink, a device, fifo or socket."""
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(place.name, dir_fd=place.dir_fd), tmp, dir_fd=self.work)
        elif stat.S_ISREG(st.st_mode):
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                             dir_fd=self.work))
        else:
            os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=self.work)

    def _link_up(self, parent: int, name: bytes, key: bytes) -> None:
        """Another name of a lower hard link already copied up: link the copy (index entry
        ``key``) under it, so every name shows one file (overlay's ``index=on``; the union's
        link count does not change). Inline: metadata only, and the parent chain is copied
        up synchronously (directories have no data)."""
        pdir = self._upper_dir(parent)
        os.link(key, name, src_dir_fd=self.index.fd, dst_dir_fd=pdir, follow_symlinks=False)


_MODES = {FileType.CHARDEV: stat.S_IFCHR, FileType.BLOCKDEV: stat.S_IFBLK,
          FileType.FIFO: stat.S_IFIFO, FileType.SOCKET: stat.S_IFSOCK}


def _clear_whiteouts(parent: int, name: bytes, whiteouts: Sequence[bytes]) -> None:
    """Remove the upper directory's whiteouts before it is removed or replaced: overlay sees
    such a directory as empty, the filesystem does not."""
    if not whiteouts:
        return
    child = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        for whiteout in whiteouts:
            os.unlink(whiteout, dir_fd=child)
    finally:
        os.close(child)


def can_reflink(work: int, lowers: list[int]) -> list[bool]:
    """Per lower, whether a copy-up can share its extents: work's filesystem must clone
    (tried once, on a one-block file) and the lower must be on that same filesystem, since
    FICLONE never crosses filesystems."""
    src, dst = (TMP_PREFIX + b"%d-probe-%s" % (os.getpid(), end) for end in (b"src", b"dst"))
    clones = True
    try:
        a = os.open(src, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=work)
        try:
            os.write(a, b"\0" * 4096)
            b = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                        dir_fd=work)
            try:
                fcntl.ioctl(b, FICLONE, a)
            except OSError:
                clones = False
            finally:
                os.close(b)
        finally:
            os.close(a)
    finally:
        for name in (src, dst):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=work)
    dev = os.fstat(work).st_dev
    return [clones and os.fstat(fd).st_dev == dev for fd in lowers]


class _errors:
    """``OSError`` (a syscall's or a union rule's ``Refused``) out of a handler becomes
    ``FUSEError`` with its errno: the one edge where errors are translated for FUSE."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is None or isinstance(exc, (pyfuse3.FUSEError, trio.Cancelled)):
            return
        if isinstance(exc, OSError) and exc.errno:
            raise pyfuse3.FUSEError(exc.errno) from exc
        # pyfuse3 lets any other exception end the main loop, which would leave ENOTCONN
        # behind for every process using the mount: one request fails instead, and says why.
        traceback.print_exception(exc, file=sys.stderr)
        raise pyfuse3.FUSEError(errno.EIO) from exc
