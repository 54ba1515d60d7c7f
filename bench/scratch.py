"""Dedicated loop-mounted filesystems for benchmarks (DESIGN §7).

The root filesystem's timings are ten times noisier than a fresh, otherwise idle ext4, so every
benchmark writes there. Mounting needs root; without it the caller gets a plain directory and a
note saying so in the report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "--quiet", "--force"],
}


class ScratchError(RuntimeError):
    """A scratch filesystem this host cannot make (no mkfs, no loop device): one line."""


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


@dataclass
class LoopFs:
    """A loop filesystem on a device of its own, so it can be unmounted and mounted again:
    the only way to drop one filesystem's caches (the kernel drops them all or none)."""

    device: str
    mount_point: Path
    description: str
    direct_io: bool

    def remount(self) -> None:
        """Unmount and mount again: the next reads of this filesystem come from its device
        (with direct I/O on the loop device, not from the host's cache of the backing file)."""
        _unmount(self.mount_point)
        mounted = subprocess.run(["mount", self.device, str(self.mount_point)],
                                 capture_output=True, text=True, check=False)
        if mounted.returncode != 0:  # the rest of the run would write to the root filesystem
            raise ScratchError(f"mounting {self.device} again failed: "
                               f"{mounted.stderr.strip()[:200]}")


@contextlib.contextmanager
def loop_fs(size: int, kind: str, parent: Path | None = None) -> Iterator[LoopFs]:
    """A fresh ``kind`` filesystem on its own loop device, asked for ``--direct-io=on`` (the
    description says when the kernel refused it); unmounted and detached on exit, even on
    failure. ``ScratchError`` when this host cannot make one."""
    if os.geteuid() != 0:
        raise ScratchError("a loop filesystem needs root")
    if shutil.which(_MKFS[kind][0]) is None:
        raise ScratchError(f"{_MKFS[kind][0]} is not installed")
    with tempfile.TemporaryDirectory(prefix="imaged-bench-", dir=parent) as tmp:
        image, mount_point = Path(tmp) / "scratch.img", Path(tmp) / "mnt"
        mount_point.mkdir()
        with image.open("wb") as fh:
            fh.truncate(size)
        made = subprocess.run([*_MKFS[kind], str(image)], capture_output=True, text=True,
                              check=False)
        if made.returncode != 0:
            raise ScratchError(f"{_MKFS[kind][0]} failed: {made.stderr.strip()[:200]}")
        attached = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                                  capture_output=True, text=True, check=False)
        if attached.returncode != 0:
            raise ScratchError(f"losetup failed: {attached.stderr.strip()[:200]}")
        device = attached.stdout.strip()
        try:
            flag = Path(f"/sys/block/{Path(device).name}/loop/dio")
            direct = flag.exists() and flag.read_text().strip() == "1"
            subprocess.run(["mount", device, str(mount_point)], check=True, capture_output=True)
            try:
                yield LoopFs(device, mount_point,
                             f"a dedicated {kind} of {size >> 30} GiB on {device} "
                             f"({'direct I/O' if direct else 'direct I/O refused: cached'})",
                             direct)
            finally:
                _unmount(mount_point)
        finally:
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


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
