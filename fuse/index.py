"""The hard-link index: what keeps a lower hard link one file after one of its names is copied
up, across requests and remounts (kernel overlay's ``index=on``, in a form of our own).

A lower inode with several names is copied up once, into the upper under the name written to,
and also linked into ``work/imaged-index/<key>``. Its other lower names are then served from
that copy, and linked up beside it when they are changed. The key names the lower inode by
the first lower layer on its filesystem and its inode number, both stable across remounts
(device numbers are not, for loop devices).

The link count the union shows is not the copy's: the copy has the names linked up so far
plus the index's own, while the union has every lower name not removed plus those added. The
union's count is kept on the copy itself, in the ``trusted.imaged.nlink`` xattr (overlay keeps
``trusted.overlay.nlink`` the same way), so every name of the inode, upper or lower, reads it.
When it reaches zero the index entry goes, and with it the copy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence

DIRECTORY = b"imaged-index"
NLINK_XATTR = b"trusted.imaged.nlink"
KEY_XATTR = b"trusted.imaged.index"  # the copy's own key, to find its entry from any name
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _proc(fd: int, name: bytes) -> bytes:
    return b"/proc/self/fd/%d/%s" % (fd, name)


class LinkIndex:
    """The index directory of one mount (module docstring)."""

    def __init__(self, work: int, lowers: Sequence[int]) -> None:
        self._work = work
        try:
            self._fd: int | None = os.open(DIRECTORY, _DIR_FLAGS, dir_fd=work)
        except FileNotFoundError:
            self._fd = None  # made at the first copy of a hard link: most mounts have none
        self._layer_of_dev: dict[int, int] = {}
        for position, fd in enumerate(lowers):
            self._layer_of_dev.setdefault(os.fstat(fd).st_dev, position)

    @property
    def fd(self) -> int:
        if self._fd is None:
            with contextlib.suppress(FileExistsError):
                os.mkdir(DIRECTORY, 0o700, dir_fd=self._work)
            self._fd = os.open(DIRECTORY, _DIR_FLAGS, dir_fd=self._work)
        return self._fd

    def key(self, st: os.stat_result) -> bytes | None:
        """The key of a lower regular file with several names; None for any other object."""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return None
        layer = self._layer_of_dev.get(st.st_dev)
        return None if layer is None else b"%d-%d" % (layer, st.st_ino)

    def find(self, st: os.stat_result) -> bytes | None:
        """The index name of a lower file's copy, if one of its names was copied up."""
        key = self.key(st)
        if key is None or self._fd is None:
            return None
        try:
            os.stat(key, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return key

    def add(self, work: int, tmp: bytes, lower: os.stat_result) -> None:
        """Index a copy made as ``tmp`` in work before it is renamed into the upper: a crash in
        between leaves a complete copy in the index and the lower names still in place."""
        key = self.key(lower)
        if key is None:
            return
        os.setxattr(_proc(work, tmp), NLINK_XATTR, b"%d" % lower.st_nlink,
                    follow_symlinks=False)
        os.setxattr(_proc(work, tmp), KEY_XATTR, key, follow_symlinks=False)
        os.link(tmp, key, src_dir_fd=work, dst_dir_fd=self.fd, follow_symlinks=False)

    @staticmethod
    def nlink(dir_fd: int, name: bytes, st: os.stat_result) -> int:
        """The link count the union shows for an upper file: its index count when it has
        one (only a file with several links can)."""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return st.st_nlink
        try:
            return int(os.getxattr(_proc(dir_fd, name), NLINK_XATTR, follow_symlinks=False))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return st.st_nlink
            raise

    def adjust(self, dir_fd: int, name: bytes, st: os.stat_result, delta: int) -> None:
        """A name of the upper file ``name`` was added or removed (``st`` from before): its
        union count follows, and an index entry that no name needs any more goes."""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return
        path = _proc(dir_fd, name)
        try:
            count = int(os.getxattr(path, NLINK_XATTR, follow_symlinks=False)) + delta
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return
            raise
        if count > 0:
            os.setxattr(path, NLINK_XATTR, b"%d" % count, follow_symlinks=False)
            return
        key = os.getxattr(path, KEY_XATTR, follow_symlinks=False)
        if b"/" not in key and key not in (b".", b".."):
            os.unlink(key, dir_fd=self.fd)
