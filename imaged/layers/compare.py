"""The pure half of verifying an unpacked layer against its tar (``imaged check --verify-data``):
what one member promises, against what ``lstat``, ``readlink`` and ``getxattr`` show, as short
phrases a user can act on ("mode 0600, not 0644"), the way ``tar --compare`` reports.

The I/O shell (``imaged.layers.unpack.verify_layer``) reads the blob with the unpacker's own
stream and parser, looks each member up in the driver's tree without following symlinks, and
compares file contents byte for byte as the stream passes; it asks this module everything
else. Only what the unpacker sets is compared: type, permission bits, owner, size, symlink
target, device numbers, the member's xattrs, and the driver's whiteout form. Timestamps are
not (no container reads a different byte for them, and a tool that touches a lower file is not
damage a repair could mend better than ``touch`` could).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from imaged.layers.layerplan import (
    BLOCKDEV,
    CHARDEV,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR,
    SYMLINK,
    Member,
    WhiteoutMode,
    show,
)

# The file type each member type is unpacked as (a hard link is a second name of a regular file).
_TYPES = {REGULAR: stat.S_IFREG, HARDLINK: stat.S_IFREG, SYMLINK: stat.S_IFLNK,
          CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, DIRECTORY: stat.S_IFDIR,
          FIFO: stat.S_IFIFO}
_TYPE_NAMES = {stat.S_IFREG: "a regular file", stat.S_IFLNK: "a symlink",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFDIR: "a directory", stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket"}
# How many differing paths a finding names before it only counts the rest.
SHOWN = 5


@dataclass(frozen=True)
class Seen:
    """One entry of the driver's tree as the shell read it (never through a symlink).

    ``xattrs`` holds the values of the xattrs asked about, None for one the entry lacks; the
    whole mapping is None where the filesystem has no xattrs (zfs-fuse), where the unpacker
    skipped them too."""

    mode: int  # st_mode: type and permission bits
    uid: int
    gid: int
    size: int
    rdev: int
    link_target: bytes | None = None
    xattrs: Mapping[bytes, bytes | None] | None = None
    inode: tuple[int, int] = (0, 0)  # (st_dev, st_ino): a hard link's identity


def _kind(mode: int) -> str:
    return _TYPE_NAMES.get(stat.S_IFMT(mode), "an unknown kind of file")


def entry_differences(member: Member, seen: Seen | None) -> list[str]:
    """How an entry the unpacker created from ``member`` differs from it; [] when it does not.
    A hard link's own metadata is its source's, compared at the source (its identity, the
    same inode, is the shell's to see)."""
    if seen is None:
        return ["missing"]
    wanted = _TYPES[member.type]
    if stat.S_IFMT(seen.mode) != wanted:
        return [f"is {_kind(seen.mode)}, not {_kind(wanted)}"]
    if member.type == HARDLINK:
        return []
    found = []
    if member.type != SYMLINK and stat.S_IMODE(seen.mode) != member.mode:
        found.append(f"mode {stat.S_IMODE(seen.mode):04o}, not {member.mode:04o}")
    if (seen.uid, seen.gid) != (member.uid, member.gid):
        found.append(f"owner {seen.uid}:{seen.gid}, not {member.uid}:{member.gid}")
    if member.type == REGULAR and seen.size != member.size:
        found.append(f"size {seen.size}, not {member.size}")
    if member.type == SYMLINK and seen.link_target != member.linkname:
        found.append(f"symlink target {show(seen.link_target or b'')}, not "
                     f"{show(member.linkname)}")
    if member.type in (CHARDEV, BLOCKDEV) and \
            (os.major(seen.rdev), os.minor(seen.rdev)) != (member.devmajor, member.devminor):
        found.append(f"device {os.major(seen.rdev)}:{os.minor(seen.rdev)}, not "
                     f"{member.devmajor}:{member.devminor}")
    found += xattr_differences(member.xattrs, seen.xattrs)
    return found


def xattr_differences(wanted: Mapping[bytes, bytes], seen: Mapping[bytes, bytes | None] | None
                      ) -> list[str]:
    """The member's xattrs against the entry's; nothing where the filesystem has none."""
    if seen is None:
        return []
    found = []
    for key, value in sorted(wanted.items()):
        actual = seen.get(key)
        if actual is None:
            found.append(f"xattr {show(key)} missing")
        elif actual != value:
            found.append(f"xattr {show(key)} differs")
    return found


def whiteout_differences(member: Member, seen: Seen | None, mode: WhiteoutMode) -> list[str]:
    """A whiteout as the driver stores it: overlay's 0/0 character device with the member's
    owner, or (snapshot drivers) the name gone. aufs keeps ``.wh.`` files as entries."""
    if mode is WhiteoutMode.DELETE:
        return [] if seen is None else [f"is {_kind(seen.mode)}, but the layer deletes it"]
    if seen is None:
        return ["whiteout missing"]
    if not stat.S_ISCHR(seen.mode) or seen.rdev != 0:
        return [f"is {_kind(seen.mode)}, not a whiteout (a 0/0 character device)"]
    if (seen.uid, seen.gid) != (member.uid, member.gid):
        return [f"whiteout owner {seen.uid}:{seen.gid}, not {member.uid}:{member.gid}"]
    return []


def opaque_difference(wanted: bool, value: bytes | None) -> str | None:
    """A directory's overlay opaque mark: present exactly where the layer has a marker."""
    if wanted and value != b"y":
        return "opaque mark missing"
    if not wanted and value is not None:
        return "marked opaque, but the layer has no opaque marker for it"
    return None


def summary(differences: Mapping[bytes, list[str]]) -> str:
    """The first ``SHOWN`` differing paths in path order, each with what differs, and how many
    more: one line, however many files a fault hurt."""
    paths = sorted(differences)
    shown = "; ".join(f"{_plain(path)}: {' and '.join(differences[path])}"
                      for path in paths[:SHOWN])
    more = len(paths) - SHOWN
    return shown + (f"; and {more} more path{'s' if more > 1 else ''}" if more > 0 else "")


def _plain(path: bytes) -> str:
    """A path unquoted, as users type it; undecodable bytes and control characters escaped,
    so the line stays one line."""
    text = path.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
