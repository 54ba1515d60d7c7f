"""Loop devices asked for direct I/O (the benches' cold reads, which must come from the disk
and not from the backing file's page cache) get it, and nobody else does."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imaged.host import loopdev

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/loop-control").exists(),
    reason="loop devices need root and the loop module (/dev/loop-control)")


@contextlib.contextmanager
def _bound(backing: Path, direct_io: bool) -> Iterator[bool]:
    """Whether the kernel runs a fresh binding of ``backing`` with direct I/O."""
    with open(backing, "wb") as fh:
        fh.truncate(16 << 20)
    attachment = loopdev.attach(backing, autoclear=False, direct_io=direct_io)
    try:
        yield bool(loopdev.get_status(attachment.device).flags & loopdev.LO_FLAGS_DIRECT_IO)
    finally:
        attachment.close()
        loopdev.detach(attachment.device)


@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_io_only_when_asked(tmp_path: Path, direct_io: bool) -> None:
    with _bound(tmp_path / "image", direct_io) as granted:
        assert granted is direct_io
