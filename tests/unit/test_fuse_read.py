"""The server's inline read: a read the page cache holds is answered on the loop, one that would
wait on the disk (or comes up short) is left for a worker thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imaged.fuse.server import cached_read
from imaged.host.mounts import backing_filesystem

pytestmark = pytest.mark.unit

SIZE = 1 << 20


def test_cached_pages_are_read_inline_and_the_rest_left_for_a_worker(tmp_path: Path) -> None:
    if backing_filesystem(tmp_path).fstype == "tmpfs":
        pytest.skip("tmpfs keeps every page in memory: nothing here can be uncached")
    fd = os.open(tmp_path / "lower", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, bytes(range(256)) * (SIZE // 256))
        os.fsync(fd)
        assert cached_read(fd, 4096, 8192) == bytes(range(256)) * 16
        # Clean pages dropped: the read would wait on the disk.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert cached_read(fd, 4096, 8192) is None
        os.pread(fd, 4096, 8192)
        assert cached_read(fd, 4096, 8192) == bytes(range(256)) * 16
        # Short at the end of the file: the worker's pread returns what there is.
        assert cached_read(fd, 4096, SIZE - 100) is None
        assert cached_read(fd, 4096, SIZE) is None
    finally:
        os.close(fd)
