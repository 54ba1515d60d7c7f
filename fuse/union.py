"""The union's rules, sans I/O: what a name means through the stack, and what a directory lists.

The pyfuse3 ``Operations`` server is the thin shell around this module (h11's shape, as
``imaged.layers.layerplan`` is for unpacking). For every request it gathers small facts with
``fstatat``/``fgetxattr`` on the directory descriptors it holds (one ``Entry`` per layer for a
name, one listing per layer for a directory), asks this module, and performs the answer with
``*at`` calls. Nothing here opens a file, so tables of cases test every rule without a kernel.

The rules are kernel overlay's with ``redirect_dir=off`` and ``metacopy=off``
(Documentation/filesystems/overlayfs.rst), on overlay's on-disk form as imaged writes it
(``imaged.layers.layerplan``): a whiteout is a 0/0 character device, an opaque directory carries
``trusted.overlay.opaque=y`` (``user.overlay.opaque`` with userxattr). Keeping the form means the
same upper mounts under kernel overlay later, and keeping the rules means a differential test
against kernel overlay can demand equal results.

Layers are numbered from the top: ``UPPER`` (0) is the container's writable directory, 1 the
image's top layer and so on down. A read-only mount has no upper and simply never names layer 0
(``root(..., upper=False)``); its server never asks for a change (the kernel answers EROFS).

A refusal is raised as ``Refused``, an ``OSError`` carrying the errno the request must fail with:
the server's handlers already turn ``OSError`` from syscalls into ``FUSEError(errno)``, so a rule's
refusal and a syscall's failure take the same path out.

This module reads the union (lookup, readdir, xattrs); ``imaged.fuse.changes`` plans what
changes it (unlink, rmdir, create, link, rename, copy-up) from the ``Resolution`` and ``Listing``
made here. The cut follows the server's two kinds of handler: the readers run on every request
and must stay cheap; the writers need more facts (``resolve(complete=True)``) and more steps.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from imaged.fuse.nodes import Origin

UPPER = 0

# Overlay's own xattrs: the kernel reads them to steer lookups (opaque, redirect, origin,
# metacopy, ...). Both prefixes are private whichever the mount uses: the unpacker refuses both
# in layers (layerplan.check_xattr), and a user who set user.overlay.opaque in the upper would
# steer a later kernel overlay mount with userxattr.
# trusted.imaged. is the fuse server's own bookkeeping (imaged.fuse.index), private alike.
PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"trusted.imaged.")
_TRUSTED_PREFIX = b"trusted."
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
OPAQUE_VALUE = b"y"


class Refused(OSError):
    """A request the union answers with an errno (ENOENT, ENOTEMPTY, EXDEV, ...).

    An ``OSError`` so the server's one ``except OSError`` turns it into ``FUSEError(errno)``;
    a subclass so tests and logs can tell a rule from a failed syscall.
    """

    def __init__(self, code: int, why: str) -> None:
        super().__init__(code, f"{os.strerror(code)}: {why}")
        self.why = why


class FileType(enum.Enum):
    """What a layer holds under a name; ``WHITEOUT`` is a deletion, not an object."""

    REGULAR = "regular"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    CHARDEV = "chardev"
    BLOCKDEV = "blockdev"
    FIFO = "fifo"
    SOCKET = "socket"
    WHITEOUT = "whiteout"


_FORMATS = {stat.S_IFREG: FileType.REGULAR, stat.S_IFDIR: FileType.DIRECTORY,
            stat.S_IFLNK: FileType.SYMLINK, stat.S_IFCHR: FileType.CHARDEV,
            stat.S_IFBLK: FileType.BLOCKDEV, stat.S_IFIFO: FileType.FIFO,
            stat.S_IFSOCK: FileType.SOCKET}


def file_type(mode: int, rdev: int = 0) -> FileType:
    """The type of an ``fstatat`` result, a 0/0 character device being a whiteout.

    ``rdev`` matters only for character devices: a real device 0/0 cannot exist (it is the
    "no device" number), which is why overlay could take it for its whiteouts.
    """
    kind = _FORMATS.get(stat.S_IFMT(mode))
    if kind is None:
        raise ValueError(f"unknown file type in mode {mode:#o}")
    if kind is FileType.CHARDEV and rdev == 0:
        return FileType.WHITEOUT
    return kind


def is_opaque(value: bytes | None) -> bool:
    """An opaque xattr's value as overlay reads it: exactly ``y``; anything else is ignored."""
    return value == OPAQUE_VALUE


@dataclass(frozen=True, slots=True)
class Entry:
    """One layer's answer for one name, as the shell found it with ``fstatat``.

    ``opaque`` is read only for directories (the shell need not fetch the xattr otherwise).
    ``origin`` is carried through untouched for the node table (``imaged.fuse.nodes``): the
    file's own (st_dev, st_ino), or for a copied-up upper file the origin recorded with it.
    """

    type: FileType
    opaque: bool = False
    origin: Origin | None = None

    @property
    def is_dir(self) -> bool:
        return self.type is FileType.DIRECTORY


@dataclass(frozen=True, slots=True)
class Resolution:
    """A name in a merged directory, resolved through the stack.

    ``layers`` are the layers whose entries make the visible object, top first: one for a
    non-directory, every merged one for a directory (the list a lookup of its children walks).
    Empty when the name shows nothing. ``entries`` holds the entry of each of them.

    ``upper_whiteout``: the upper holds a whiteout under the name, which a new object replaces.
    ``lower_positive``: removing the upper's entry would show something from a lower layer, so
    a removal or a rename away must leave a whiteout. ``None`` when the lookup stopped before
    the lowers were read (the top is in the upper and nothing more was needed to show it):
    resolve again with ``complete=True`` before planning a change.
    """

    layers: tuple[int, ...] = ()
    entries: tuple[Entry, ...] = ()
    upper_whiteout: bool = False
    lower_positive: bool | None = False

    @property
    def exists(self) -> bool:
        return bool(self.layers)

    @property
    def top(self) -> int:
        """The layer the object's attributes and data come from."""
        if not self.layers:
            raise Refused(errno.ENOENT, "the name shows nothing")
        return self.layers[0]

    @property
    def entry(self) -> Entry:
        if not self.entries:
            raise Refused(errno.ENOENT, "the name shows nothing")
        return self.entries[0]

    @property
    def is_dir(self) -> bool:
        return bool(self.entries) and self.entries[0].is_dir

    @property
    def in_upper(self) -> bool:
        """The object has an upper part (so changes to it need no copy-up)."""
        return bool(self.layers) and self.layers[0] == UPPER

    @property
    def pure_upper(self) -> bool:
        """Only the upper makes it: overlay's "pure upper", which may be renamed freely."""
        return self.layers == (UPPER,)

    @property
    def has_lower(self) -> bool:
        """Some lower layer contributes: overlay's "merge or lower" type."""
        return any(layer != UPPER for layer in self.layers)


def root(lowers: int, *, upper: bool = True) -> Resolution:
    """The mount's root: the upper's root (if writable) and ``lowers`` layer roots merged.

    Overlay never consults an opaque mark on a layer's root for the mount's root (only names
    inside the root are looked up), so neither does this: all layers are merged.
    """
    if lowers < 1:
        raise ValueError("a mount needs at least one lower layer")
    layers = tuple(range(UPPER if upper else 1, lowers + 1))
    return Resolution(layers, tuple(Entry(FileType.DIRECTORY) for _ in layers))


def resolve(found: Iterable[tuple[int, Entry | None]], *, complete: bool = False) -> Resolution:
    """Resolve one name given each layer's entry, top first (``None``: the layer has no entry).

    ``found`` walks the parent directory's layers (``Resolution.layers`` of the parent), so an
    opaque parent has already cut the walk. It is consumed lazily: a lookup stops asking as
    soon as the answer is known, which saves an ``fstatat`` per lower layer for most names in a
    deep image. ``complete=True`` reads on until ``lower_positive`` is known, as removals and
    renames need.

    The rules (overlayfs.rst "Directories", "whiteouts and opaque directories"):
    - the first layer holding the name decides what it is; a whiteout there hides everything
      below and the name shows nothing;
    - a non-directory shows as itself, from that layer only;
    - a directory merges with directories of the same name below it, until a directory that
      is opaque (included, nothing under it), a whiteout, or a non-directory (both excluded:
      a non-directory under a directory is hidden by it, and stops the merge).
    """
    layers: list[int] = []
    entries: list[Entry] = []
    lower_positive: bool | None = None  # decided by the first lower entry, when the top is upper
    walk = _in_order(found)
    for layer, entry in walk:
        if not layers:  # the first layer holding the name decides what it is
            if entry.type is FileType.WHITEOUT:
                return Resolution((), (), upper_whiteout=layer == UPPER, lower_positive=False)
            layers.append(layer)
            entries.append(entry)
            if layer != UPPER:
                # Only lowers hold it, so removing it always needs a whiteout.
                lower_positive = True
            if entry.is_dir and not entry.opaque:
                continue
            if layer == UPPER:
                if not complete:
                    return Resolution(tuple(layers), tuple(entries), lower_positive=None)
                lower_positive = next((e.type is not FileType.WHITEOUT for _, e in walk), False)
            break
        # Below a directory that merges: the first lower entry also says whether a lower
        # would show the name; a directory merges, anything else ends the merge unseen.
        if lower_positive is None:
            lower_positive = entry.type is not FileType.WHITEOUT
        if not entry.is_dir:
            break
        layers.append(layer)
        entries.append(entry)
        if entry.opaque:
            break
    return Resolution(tuple(layers), tuple(entries), lower_positive=bool(lower_positive))


def _in_order(found: Iterable[tuple[int, Entry | None]]) -> Iterator[tuple[int, Entry]]:
    """The layers that hold the name, checked to come top first and once each: a shell that
    walked them out of order would silently invert the stack."""
    previous = -1
    for layer, entry in found:
        if layer <= previous:
            raise ValueError(f"layer {layer} given after layer {previous}: layers go top first")
        previous = layer
        if entry is not None:
            yield layer, entry


# readdir


@dataclass(frozen=True, slots=True)
class Listed:
    """One name of a merged listing: the entry of the layer it shows from."""

    name: bytes
    layer: int
    entry: Entry


@dataclass(frozen=True, slots=True)
class Listing:
    """A merged directory's names, in the order readdir hands them out.

    Offsets are positions: the entry at index ``i`` carries ``i + 1`` as the offset to resume
    after it (pyfuse3's ``next_id``; 0 is the start). Kernel overlay keeps its merged list per
    open directory ("This merged name list is cached in the 'struct file'"), and the server
    does the same in its directory handle, so a listing resumed at an offset neither repeats nor
    skips a name however the directory changes meanwhile. The merge is also deterministic (names
    sorted within each layer, whatever order the layer's ``getdents`` gave), so a listing rebuilt
    from unchanged layers has the same offsets: a handle whose cache was dropped still resumes
    correctly.

    ``upper_whiteouts`` are the whiteouts the directory's upper part holds: a union-empty
    directory may still hold them, and they must go before the upper directory can be removed.
    """

    names: tuple[Listed, ...]
    upper_whiteouts: tuple[bytes, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    @property
    def empty(self) -> bool:
        """Union-empty, as rmdir and rename-over-a-directory require (whiteouts do not count)."""
        return not self.names

    def resume(self, offset: int) -> Iterator[tuple[int, Listed]]:
        """(offset after it, entry) from ``offset`` on: what readdir(start_id=offset) replies.

        An offset past the end (or negative) yields nothing, as getdents at EOF does.
        """
        if offset < 0:
            return
        for index in range(offset, len(self.names)):
            yield index + 1, self.names[index]


def merge(layers: Iterable[tuple[int, Iterable[tuple[bytes, Entry]]]]) -> Listing:
    """The merged listing of a directory from each of its layers' own listings, top first.

    ``layers`` are the directory's ``Resolution.layers`` with what each holds (names without
    ``.`` and ``..``; a shell passes them straight from ``os.scandir`` plus an ``fstatat`` for
    character devices, to tell whiteouts). The rules (overlayfs.rst "readdir"): upper first,
    then each lower; a name already seen above (shown or whited out) is not added again, so a
    whiteout hides the name below and a non-directory hides a directory; whiteouts themselves
    never show. An opaque directory's lowers are not among ``layers`` at all (``resolve`` ended
    the merge there), so nothing of them shows.
    """
    seen: set[bytes] = set()
    names: list[Listed] = []
    upper_whiteouts: list[bytes] = []
    previous = -1
    for layer, contents in layers:
        if layer <= previous:
            raise ValueError(f"layer {layer} given after layer {previous}: layers go top first")
        previous = layer
        fresh: dict[bytes, Entry] = {}
        for name, entry in contents:
            if name in (b".", b"..") or name in seen or name in fresh:
                continue
            fresh[name] = entry
        for name in sorted(fresh):
            entry = fresh[name]
            if entry.type is FileType.WHITEOUT:
                if layer == UPPER:
                    upper_whiteouts.append(name)
            else:
                names.append(Listed(name, layer, entry))
        seen.update(fresh)
    return Listing(tuple(names), tuple(upper_whiteouts))


# xattrs


def is_private_xattr(name: bytes) -> bool:
    """Overlay's own xattr, which users never see nor set (PRIVATE_XATTR_PREFIXES)."""
    return name.startswith(PRIVATE_XATTR_PREFIXES)


def check_xattr_name(name: bytes) -> None:
    """getxattr, setxattr and removexattr of a private name fail as kernel overlay's do.

    Overlay registers a handler for its own prefix that answers EOPNOTSUPP to get and set
    alike (fs/overlayfs: ovl_own_xattr_get/set), so a user can neither read nor forge the
    marks that steer lookups. Permission on ``trusted.*`` in general is the VFS's business
    (xattr_permission) and reaches a FUSE server already checked.
    """
    if is_private_xattr(name):
        raise Refused(errno.EOPNOTSUPP, "overlay's private xattrs cannot be read or set")


def visible_xattrs(names: Iterable[bytes], *, privileged: bool) -> list[bytes]:
    """What listxattr shows: never the private names, and ``trusted.*`` only to a privileged
    caller, as overlay's ovl_can_list decides (the VFS does not filter lists for a FUSE fs)."""
    return [name for name in names if not is_private_xattr(name)
            and (privileged or not name.startswith(_TRUSTED_PREFIX))]
