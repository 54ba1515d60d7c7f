"""Telling what still holds a mount that a forced umount detached, which no mount table shows:
the processes with a file, a working directory or a mapping on its filesystem
(``imaged.host.mounts.users``, as ``fuser -m`` finds them), and whether a loop device is still a
filesystem's (``imaged.host.loopdev.claimed``). Removals of busy containers rely on both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imaged.host import loopdev
from imaged.host.mounts import mountinfo, unmount, users
from tests.conftest import loop_filesystem

# A child that holds one thing on the filesystem in ``argv[1]`` until it is killed: a file
# open, its working directory, or a mapping of a file it then closes.
_HOLD = """
import mmap, os, sys, time
path, how = sys.argv[1], sys.argv[2]
if how == "file":
    held = open(os.path.join(path, "open"), "w")
elif how == "cwd":
    os.chdir(path)
else:
    with open(os.path.join(path, "mapped"), "w+b") as f:
        f.write(b"x" * 4096)
        f.flush()
        held = mmap.mmap(f.fileno(), 4096)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def filesystem(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 of its own (its own device number), gone afterwards."""
    with loop_filesystem(["mkfs.ext4", "-q"], tmp_path / "fs.img", tmp_path / "mnt",
                         size=64 << 20) as mounted:
        yield mounted


def _holding(path: Path, how: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), how],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child


def _end(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    if child.stdout is not None:
        child.stdout.close()


@pytest.mark.parametrize("how", ["file", "cwd", "mapping"])
def test_users_are_the_processes_with_something_on_the_filesystem(filesystem: Path,
                                                                  how: str) -> None:
    assert users(filesystem) == []
    child = _holding(filesystem, how)
    try:
        assert users(filesystem) == [child.pid]
        assert child.pid not in users(Path("/proc"))  # another filesystem: not its user
    finally:
        _end(child)
    assert users(filesystem) == []


def test_a_detached_filesystem_keeps_its_device_claimed_until_the_last_file_closes(
        filesystem: Path) -> None:
    entry = next(e for e in mountinfo() if e.mount_point == str(filesystem))
    device = next(d for d, _ in loopdev.bound_devices()
                  if d.dev_t() == os.makedev(entry.major, entry.minor))
    assert loopdev.claimed(device)  # mounted
    held = os.open(filesystem / "held", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        unmount(filesystem, lazy=True)
        assert loopdev.claimed(device)  # detached: no mount table shows it, the kernel has it
        os.write(held, b"still written")
    finally:
        os.close(held)
    backing = device.backing_file()
    assert backing is None or loopdev.wait_unbound(device, Path(backing))
    assert not loopdev.claimed(device)
