"""A disk that fails on demand, for the guest's I/O-error tests: one device-mapper device over a
loop file whose table is swapped between a healthy ``linear`` map, ``dm-flakey`` (every write
fails, or every read and write) and ``dm-dust`` (chosen blocks fail reads), the way xfstests'
``dmflakey`` and ``dmdust`` helpers do it: load the new table, suspend, resume.

Every device and loop device it makes is removed on the way out, failing or not; a filesystem
still mounted on it is the caller's (``mounted``) to unmount first.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imaged.host import loopdev
from imaged.host.mounts import unmount
from tests.conftest import unmount_below

BLOCK = 4096  # ext4's block, and dm-dust's: a bad dust block is exactly one filesystem block


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


@dataclass
class FaultDisk:
    """The device at ``path`` (``/dev/mapper/<name>``) over the loop device ``under``."""

    name: str
    under: Path
    sectors: int
    mode: str = "healthy"

    @property
    def path(self) -> Path:
        return Path("/dev/mapper") / self.name

    def _load(self, table: str, mode: str) -> None:
        run("dmsetup", "load", self.name, "--table", f"0 {self.sectors} {table}")
        # --noflush: a flush through a failing table would only fail; what the filesystem
        # has not written stays in its cache, as on a disk that stops answering.
        run("dmsetup", "suspend", "--noflush", self.name)
        run("dmsetup", "resume", self.name)
        self.mode = mode

    def healthy(self) -> None:
        self._load(f"linear {self.under} 0", "healthy")

    def fail_writes(self) -> None:
        """dm-flakey, down from now on (up 0 s, down an hour), erroring every write."""
        self._load(f"flakey {self.under} 0 0 3600 1 error_writes", "failing writes")

    def fail_all(self) -> None:
        """dm-flakey with no features: every read and write fails while down."""
        self._load(f"flakey {self.under} 0 0 3600", "failing reads and writes")

    def bad_blocks(self, blocks: list[int]) -> None:
        """dm-dust with ``blocks`` (filesystem blocks) failing reads until written again."""
        self._load(f"dust {self.under} 0 {BLOCK}", "bad blocks")
        for block in blocks:
            run("dmsetup", "message", self.name, "0", "addbadblock", str(block))
        run("dmsetup", "message", self.name, "0", "quiet")  # no console line per read
        run("dmsetup", "message", self.name, "0", "enable")


@contextlib.contextmanager
def fault_disk(image: Path, name: str) -> Iterator[FaultDisk]:
    """A healthy ``FaultDisk`` over ``image``, removed with its loop device at the end."""
    with loopdev.attach(image) as under:
        sectors = image.stat().st_size // 512
        disk = FaultDisk(name, under.device.path, sectors)
        run("dmsetup", "create", name, "--table", f"0 {sectors} linear {under.device.path} 0")
    try:
        yield disk
    finally:
        run("dmsetup", "remove", "--retry", name)


@contextlib.contextmanager
def mounted(device: Path, mount_point: Path) -> Iterator[Path]:
    """``device``'s filesystem at ``mount_point``, unmounted (with what is below) at the end."""
    run("mount", str(device), str(mount_point))
    try:
        yield mount_point
    finally:
        unmount_below(mount_point)
        unmount(mount_point)


def drop_caches() -> None:
    """Clean pages out of memory, so reads go to the disk (and meet its faults)."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def physical_blocks(path: Path) -> list[int]:
    """The filesystem blocks holding ``path``'s data (``filefrag -v``: logical, physical and
    length columns), so dm-dust can be told to fail exactly those."""
    blocks: list[int] = []
    for line in run("filefrag", "-b4096", "-v", str(path)).stdout.splitlines():
        fields = line.replace(":", " ").replace("..", " ").split()
        if len(fields) >= 6 and fields[0].isdigit() and fields[3].isdigit():
            start, end = int(fields[3]), int(fields[4])
            blocks += range(start, end + 1)
    return blocks

