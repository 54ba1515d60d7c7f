"""The pure rules of ``imaged check --verify-data``'s layer comparison: one tar member against
what ``lstat``/``readlink``/``getxattr`` showed, as the phrases a finding prints. Tables of
cases, no filesystem."""

from __future__ import annotations

import os
import stat

import pytest

from imaged.layers.compare import (
    SHOWN,
    Seen,
    entry_differences,
    opaque_difference,
    summary,
    whiteout_differences,
    xattr_differences,
)
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
)


def member(kind: bytes = REGULAR, mode: int = 0o644, uid: int = 0, gid: int = 0,
           size: int = 5, linkname: bytes = b"", dev: tuple[int, int] = (0, 0),
           xattrs: dict[bytes, bytes] | None = None) -> Member:
    return Member(b"etc/file", kind, mode, uid, gid, size, 0, linkname, *dev,
                  xattrs=xattrs or {})


def seen(file_type: int = stat.S_IFREG, mode: int = 0o644, uid: int = 0, gid: int = 0,
         size: int = 5, rdev: int = 0, target: bytes | None = None,
         xattrs: dict[bytes, bytes | None] | None = None) -> Seen:
    return Seen(file_type | mode, uid, gid, size, rdev, target, {} if xattrs is None else xattrs)


@pytest.mark.parametrize(("wanted", "actual", "differences"), [
    (member(), seen(), []),
    (member(), None, ["missing"]),
    (member(), seen(stat.S_IFDIR, 0o755), ["is a directory, not a regular file"]),
    (member(mode=0o755), seen(mode=0o644), ["mode 0644, not 0755"]),
    (member(mode=0o4755), seen(mode=0o755), ["mode 0755, not 4755"]),
    (member(uid=1000, gid=100), seen(), ["owner 0:0, not 1000:100"]),
    (member(size=10), seen(size=3), ["size 3, not 10"]),
    (member(mode=0o600, size=10), seen(size=3), ["mode 0644, not 0600", "size 3, not 10"]),
    # a symlink's own mode is not set by the unpacker, nor compared
    (member(SYMLINK, 0o777, linkname=b"a"), seen(stat.S_IFLNK, 0o777, size=1, target=b"a"), []),
    (member(SYMLINK, 0o777, linkname=b"a"), seen(stat.S_IFLNK, 0o755, size=1, target=b"a"), []),
    (member(SYMLINK, linkname=b"app.conf"), seen(stat.S_IFLNK, target=b"/etc/shadow"),
     ["symlink target '/etc/shadow', not 'app.conf'"]),
    (member(SYMLINK, linkname=b"a"), seen(), ["is a regular file, not a symlink"]),
    (member(DIRECTORY, 0o700, size=0), seen(stat.S_IFDIR, 0o700, size=4096), []),
    (member(CHARDEV, 0o666, dev=(1, 3)), seen(stat.S_IFCHR, 0o666, rdev=os.makedev(1, 3)), []),
    (member(CHARDEV, 0o666, dev=(1, 3)), seen(stat.S_IFCHR, 0o666, rdev=os.makedev(1, 5)),
     ["device 1:5, not 1:3"]),
    (member(BLOCKDEV, 0o660, dev=(259, 70000)),
     seen(stat.S_IFBLK, 0o660, rdev=os.makedev(259, 70000)), []),
    (member(BLOCKDEV, dev=(8, 0)), seen(stat.S_IFCHR, rdev=os.makedev(8, 0)),
     ["is a character device, not a block device"]),
    (member(FIFO, 0o600, size=0), seen(stat.S_IFIFO, 0o600, size=0), []),
    # a hard link's metadata is its source's; only its kind is checked here
    (member(HARDLINK, 0o600, uid=7, linkname=b"etc/a"), seen(mode=0o644), []),
    (member(HARDLINK, linkname=b"etc/a"), seen(stat.S_IFLNK), ["is a symlink, not a regular file"]),
    (member(xattrs={b"security.capability": b"\x01"}),
     seen(xattrs={b"security.capability": None}), ["xattr 'security.capability' missing"]),
    (member(xattrs={b"user.a": b"1"}), seen(xattrs={b"user.a": b"2"}), ["xattr 'user.a' differs"]),
])
def test_an_entry_against_its_member(wanted: Member, actual: Seen | None,
                                     differences: list[str]) -> None:
    assert entry_differences(wanted, actual) == differences


def test_xattrs_are_not_compared_where_the_filesystem_has_none() -> None:
    """zfs-fuse: the unpacker skipped them (EOPNOTSUPP), so nothing can be there."""
    assert xattr_differences({b"user.a": b"1"}, None) == []
    assert entry_differences(member(xattrs={b"user.a": b"1"}),
                             Seen(stat.S_IFREG | 0o644, 0, 0, 5, 0, None, None)) == []


@pytest.mark.parametrize(("mode", "actual", "differences"), [
    (WhiteoutMode.OVERLAY, seen(stat.S_IFCHR, 0, size=0), []),
    (WhiteoutMode.OVERLAY, None, ["whiteout missing"]),
    (WhiteoutMode.OVERLAY, seen(), ["is a regular file, not a whiteout (a 0/0 character device)"]),
    (WhiteoutMode.OVERLAY, seen(stat.S_IFCHR, 0, rdev=os.makedev(1, 3)),
     ["is a character device, not a whiteout (a 0/0 character device)"]),
    (WhiteoutMode.OVERLAY, seen(stat.S_IFCHR, 0, uid=5), ["whiteout owner 5:0, not 0:0"]),
    (WhiteoutMode.DELETE, None, []),
    (WhiteoutMode.DELETE, seen(stat.S_IFDIR, 0o755), ["is a directory, but the layer deletes it"]),
])
def test_a_whiteout_as_the_driver_stores_it(mode: WhiteoutMode, actual: Seen | None,
                                            differences: list[str]) -> None:
    assert whiteout_differences(member(size=0), actual, mode) == differences


@pytest.mark.parametrize(("wanted", "value", "difference"), [
    (True, b"y", None),
    (False, None, None),
    (True, None, "opaque mark missing"),
    (True, b"n", "opaque mark missing"),
    (False, b"y", "marked opaque, but the layer has no opaque marker for it"),
])
def test_an_opaque_mark(wanted: bool, value: bytes | None, difference: str | None) -> None:
    assert opaque_difference(wanted, value) == difference


def test_a_summary_names_the_first_paths_in_order_and_counts_the_rest() -> None:
    assert summary({b"b": ["missing"], b"a": ["mode 0600, not 0644", "size 1, not 2"]}) == \
        "a: mode 0600, not 0644 and size 1, not 2; b: missing"
    many = {f"f{i:02}".encode(): ["contents differ"] for i in range(SHOWN + 3)}
    assert summary(many) == "; ".join(f"f{i:02}: contents differ" for i in range(SHOWN)) + \
        "; and 3 more paths"
    assert summary({**many, b"zz": ["missing"]}).endswith("; and 4 more paths")
    one_more = {f"f{i}".encode(): ["missing"] for i in range(SHOWN + 1)}
    assert summary(one_more).endswith("; and 1 more path")
    assert summary({b"caf\xe9": ["missing"], b"new\nline": ["missing"]}) == \
        "caf\\xe9: missing; new\\nline: missing"
