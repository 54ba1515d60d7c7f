"""Disks that misbehave on demand, for the guest's fault tests (issue 17): device-mapper devices
over loop files, made and removed in one place (``dm_device``), the disks the tests build from it
(``FaultDisk``: failing writes, reads or chosen blocks; ``delayed``: slow writes; ``logged``:
every write logged for replay), and what the tests share around them: a filesystem on a sparse
file, a mount undone with what is below it, an application's durable write, the disk images
removed at teardown.

``FaultDisk`` swaps one device's table between a healthy ``linear`` map, ``dm-flakey`` (every
write fails, or every read and write) and ``dm-dust`` (chosen blocks fail reads), the way
xfstests' ``dmflakey`` and ``dmdust`` helpers do it: load the new table, suspend, resume.

Every device and loop device made here is removed on the way out, failing or not; a filesystem
still mounted on it is the caller's (``mounted``) to unmount first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imaged.host import loopdev
from imaged.host.mounts import unmount
from tests.conftest import unmount_below

MiB = 1 << 20
BLOCK = 4096  # ext4's block, and dm-dust's: a bad dust block is exactly one filesystem block
MAPPER = Path("/dev/mapper")


def run(*argv: str, env: dict[str, str] | None = None) -> str:
    """``argv``'s standard output; its failure (or a minute's hang) raises, with its stderr."""
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60,
                          env=None if env is None else {**os.environ, **env}).stdout


@pytest.fixture(autouse=True)
def images(tmp_path: Path) -> Iterator[None]:
    """The test's disk images (``*.img`` in ``tmp_path``) and the OCI layout it pushed from
    removed at teardown, failing or not: pytest keeps a session's temporary directories, and
    the guest's /tmp, half its RAM, holds those of every guest test (a full tier ran out)."""
    yield
    for image in tmp_path.glob("*.img"):
        image.unlink()
    shutil.rmtree(tmp_path / "layout", ignore_errors=True)


def make_fs(image: Path, size: int, mkfs: list[str], env: dict[str, str] | None = None) -> Path:
    """A sparse file of ``size`` bytes at ``image`` with the filesystem ``mkfs`` makes on it."""
    with image.open("wb") as f:
        f.truncate(size)
    run(*mkfs, str(image), env=env)
    return image


@contextlib.contextmanager
def dm_device(name: str, backing: list[Path], sectors: int,
              table: Callable[[list[Path]], str]) -> Iterator[Path]:
    """``/dev/mapper/<name>``, ``sectors`` long, over a loop device for each of ``backing``:
    its target line is ``table`` of their device paths. The loop devices clear themselves when
    the device, their last holder, is removed at the end, failing or not."""
    with contextlib.ExitStack() as loops:
        devices = [loops.enter_context(loopdev.attach(path)).device.path for path in backing]
        run("dmsetup", "create", name, "--table", f"0 {sectors} {table(devices)}")
    try:
        yield MAPPER / name
    finally:
        run("dmsetup", "remove", "--retry", name)


def logged(data: Path, log: Path, name: str) -> contextlib.AbstractContextManager[Path]:
    """A dm-log-writes device over ``data``, logging every write to ``log``."""
    return dm_device(name, [data, log], data.stat().st_size // 512,
                     lambda devs: f"log-writes {devs[0]} {devs[1]}")


def delayed(image: Path, name: str, delay_ms: int) -> contextlib.AbstractContextManager[Path]:
    """A dm-delay device over ``image``: reads at once, writes ``delay_ms`` late (0: passed
    straight through, the baseline)."""
    return dm_device(name, [image], image.stat().st_size // 512,
                     lambda devs: f"delay {devs[0]} 0 0 {devs[0]} 0 {delay_ms}")


@dataclass
class FaultDisk:
    """The device at ``path`` (``/dev/mapper/<name>``) over the loop device ``under``."""

    name: str
    under: Path
    sectors: int
    mode: str = "healthy"

    @property
    def path(self) -> Path:
        return MAPPER / self.name

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
    under: list[Path] = []

    def linear(devices: list[Path]) -> str:
        under.extend(devices)
        return f"linear {devices[0]} 0"

    sectors = image.stat().st_size // 512
    with dm_device(name, [image], sectors, linear):
        yield FaultDisk(name, under[0], sectors)


@contextlib.contextmanager
def mounted(device: Path, mount_point: Path) -> Iterator[Path]:
    """``device``'s filesystem at ``mount_point``, unmounted (with what is below) at the end."""
    run("mount", str(device), str(mount_point))
    try:
        yield mount_point
    finally:
        unmount_below(mount_point)
        unmount(mount_point)


@contextlib.contextmanager
def mounted_image(image: Path, mount_point: Path) -> Iterator[Path]:
    """``image``'s filesystem at ``mount_point`` through an autoclear loop device."""
    with contextlib.ExitStack() as stack:
        with loopdev.attach(image) as attachment:  # mounted before its descriptor closes
            stack.enter_context(mounted(attachment.device.path, mount_point))
        yield mount_point


def write_synced(directory: Path, name: str, data: bytes) -> None:
    """``data`` as ``directory``/``name``, durable when this returns: flushed out of Python's
    buffer (fsync sees only what the kernel has) and fsynced, then the directory fsynced for
    the name, as an application must."""
    with (directory / name).open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_caches() -> None:
    """Clean pages out of memory, so reads go to the disk (and meet its faults)."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def physical_blocks(path: Path) -> list[int]:
    """The filesystem blocks holding ``path``'s data (``filefrag -v``: logical, physical and
    length columns), so dm-dust can be told to fail exactly those."""
    blocks: list[int] = []
    for line in run("filefrag", "-b4096", "-v", str(path)).splitlines():
        fields = line.replace(":", " ").replace("..", " ").split()
        if len(fields) >= 6 and fields[0].isdigit() and fields[3].isdigit():
            start, end = int(fields[3]), int(fields[4])
            blocks += range(start, end + 1)
    return blocks
