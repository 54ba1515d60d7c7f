"""Dedicated loop-mounted filesystems for benchmarks (DESIGN §7).

The root filesystem's timings are ten times noisier than a fresh, otherwise idle ext4, so every
benchmark writes there. Mounting needs root; without it the caller gets a plain directory and a
note saying so in the report.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    "btrfs": ["mkfs.btrfs", "--quiet", "--force"],
}


@contextlib.contextmanager
def scratch_fs(size: int, kind: str = "ext4",
               parent: Path | None = None) -> Iterator[tuple[Path, str]]:
    """Yield (mount point, description) of a fresh ``kind`` filesystem; unmounted and deleted on
    exit, even on failure. Lazy inode-table and journal initialisation are off for ext4: their
    background writes would land inside the first samples."""
    with tempfile.TemporaryDirectory(prefix="imaged-bench-", dir=parent) as tmp:
        base = Path(tmp)
        if os.geteuid() != 0:
            yield base, "a directory on the root filesystem (not root: no loop mount)"
            return
        image = base / "scratch.img"
        mount_point = base / "mnt"
        mount_point.mkdir()
        with image.open("wb") as fh:
            fh.truncate(size)
        subprocess.run([*_MKFS[kind], str(image)], check=True, capture_output=True)
        # mount -o loop lets util-linux pick and, with autoclear, release the loop device.
        subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
        try:
            yield mount_point, f"a dedicated loop-mounted {kind} of {size >> 30} GiB"
        finally:
            _unmount(mount_point)


def _unmount(mount_point: Path) -> None:
    """Unmount, waiting for what lets go late (autoclear loop devices of a driver's pool, thin
    devices removed deferred), then lazily: a busy scratch must not fail a finished run."""
    for _ in range(50):
        if subprocess.run(["umount", str(mount_point)], capture_output=True,
                          check=False).returncode == 0:
            return
        time.sleep(0.2)
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def settle() -> None:
    """Let the previous sample's writes finish before the next is timed. One sync flushes the
    loop-mounted ext4 into its backing file, whose own dirty pages (and the discards of removed
    stores) a second sync then pushes to the disk under it; without both, one tool's writeback
    lands inside the next tool's timing.
    """
    os.sync()
    os.sync()
