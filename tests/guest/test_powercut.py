"""Power cuts at every flush point (issue 17): the root on ext4 over dm-log-writes, a workload
recorded, and the disk replayed to each flush/FUA entry in turn as a power cut would leave it.

The workload is two pulls that share their base layer, a container mounted and written with
fsync, an ``rmi`` and a ``gc``; after each operation returns, a mark goes into the log. At a
replayed point the filesystem is mounted (ext4 replays its journal), the root is opened as
imaged opens it after a crash, and ``check --verify-data`` must find nothing; every pull whose
mark precedes the point must have left its image listed (the second until the ``rmi``, which
may be under way at any point after the ``umount`` returned, began), and the container's
write, once its fsync returned, must be there with its bytes. A mark is logged when it is sent
while writes are logged only when a flush makes them durable, so an operation whose effects
reach the disk only after its mark (it returned before making them durable) fails here.

The sweep is bounded: at most ``LIMIT`` flush points spread evenly, plus each mark's own entry
(the disk holding exactly what was flushed before the operation returned) and the first flush
point after it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imaged.config import Overrides, load_config
from imaged.host import loopdev
from imaged.host.mounts import unmount
from imaged.ops.service import Service
from imaged.testing.registry import LocalRegistry
from tests.conftest import CLI, push_simple, unmount_below
from tests.guest import dmlog

pytestmark = pytest.mark.guest

MiB = 1 << 20
DATA_SIZE = 64 * MiB
LOG_SIZE = 256 * MiB
LIMIT = 40
WRITTEN = b"acknowledged by fsync\n" * 100


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


@contextlib.contextmanager
def mounted(image: Path, mount_point: Path) -> Iterator[Path]:
    """``image``'s filesystem at ``mount_point`` through an autoclear loop device."""
    with loopdev.attach(image) as attachment:
        run("mount", str(attachment.device.path), str(mount_point))
    try:
        yield mount_point
    finally:
        unmount_below(mount_point)
        unmount(mount_point)


@contextlib.contextmanager
def logged(data: Path, log: Path, name: str) -> Iterator[Path]:
    """A dm-log-writes device over ``data``, logging to ``log``; removed, and its loop devices
    with it, failing or not."""
    with loopdev.attach(data) as under, loopdev.attach(log) as logdev:
        sectors = DATA_SIZE // 512
        run("dmsetup", "create", name, "--table",
            f"0 {sectors} log-writes {under.device.path} {logdev.device.path}")
    try:
        yield Path("/dev/mapper") / name
    finally:
        run("dmsetup", "remove", "--retry", name)


def mark(name: str, label: str) -> None:
    run("dmsetup", "message", name, "0", "mark", label)


def inspect(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What a restart finds: the check's report and the images listed."""
    async def go() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with Service.open(load_config(Overrides(root=root)), "power-cut check") as svc:
            return await svc.check(verify_data=True), svc.images()

    return trio.run(go)


def test_every_flush_point_leaves_a_store_that_checks(
        tmp_path: Path, root: Path, registry: LocalRegistry, layout: Any, imaged: CLI) -> None:
    started = time.monotonic()
    data, log, base = tmp_path / "data.img", tmp_path / "log.img", tmp_path / "base.img"
    for path, size in ((data, DATA_SIZE), (log, LOG_SIZE)):
        with path.open("wb") as f:
            f.truncate(size)
    run("mkfs.ext4", "-q", str(data))
    shutil.copyfile(data, base)  # the disk as the log starts from it
    first = push_simple(layout, registry, "powercut/one", files={"one.txt": b"one\n"})
    second = push_simple(layout, registry, "powercut/two", files={"two.txt": b"two\n"})
    name = f"imaged-powercut-{os.getpid()}"
    operations = ["pull one", "pull two", "container write", "umount", "rmi two", "gc"]
    root.mkdir()
    with logged(data, log, name) as device:
        run("mount", str(device), str(root))
        try:
            def ok(*args: str) -> str:
                result = imaged("--driver", "vfs", *args)
                assert result.code == 0, f"imaged {' '.join(args)}: {result.err}"
                return result.out

            ok("pull", first.ref)
            mark(name, "0")
            ok("pull", second.ref)
            mark(name, "1")
            path = Path(ok("mount", first.ref, "--name", "c").strip().splitlines()[-1])
            with (path / "acked").open("wb") as f:
                f.write(WRITTEN)
                os.fsync(f.fileno())
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)  # the name as well as the bytes: what an application must do
            finally:
                os.close(fd)
            mark(name, "2")
            ok("umount", "c")
            mark(name, "3")
            ok("rmi", second.ref)
            mark(name, "4")
            ok("gc")
            mark(name, "5")
        finally:
            unmount_below(root)
            unmount(root)
    recorded = time.monotonic() - started

    with log.open("rb") as stream:
        parsed = dmlog.read_log(stream)
        marks = {int(label): index for label, index in parsed.marks().items()
                 if label.isdigit()}
        assert sorted(marks) == list(range(len(operations))), parsed.marks()
        points = parsed.durable_points()
        after_marks = {next(p for p in points if p > index) for index in marks.values()
                       if any(p > index for p in points)}
        # A mark's own entry is the strictest point: the disk holds only what was flushed
        # before the operation returned.
        chosen = sorted(set(dmlog.sample(points, after_marks, LIMIT)) | set(marks.values()))
        advanced, scratch = tmp_path / "advanced.img", tmp_path / "scratch.img"
        shutil.copyfile(base, advanced)
        done = 0
        for point in chosen:
            with advanced.open("r+b") as target:
                dmlog.replay(stream, parsed, target, point, start=done)
            done = point + 1
            shutil.copyfile(advanced, scratch)
            returned = [operations[op] for op, index in marks.items() if index < point]
            with mounted(scratch, root):
                report, images = inspect(root)
                context = f"power cut at entry {point} after {returned}"
                assert report["findings"] == [], (context, report)
                refs = {ref for image in images for ref in image["refs"]}
                if "pull one" in returned:
                    assert first.ref in refs, (context, refs)
                if "pull two" in returned and "umount" not in returned:  # rmi not begun
                    assert second.ref in refs, (context, refs)
                if "container write" in returned:
                    written = [p for p in root.rglob("acked") if p.is_file()]
                    assert [p.read_bytes() for p in written] == [WRITTEN], (context, written)
    print(f"power cuts: {len(parsed.entries)} entries, {len(points)} flush/FUA points, "
          f"{len(chosen)} replayed (limit {LIMIT}, {len(marks)} marks, {len(after_marks)} "
          "after marks); "
          f"workload {recorded:.1f} s, total {time.monotonic() - started:.1f} s")
