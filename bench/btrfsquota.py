"""btrfs quota modes measured against each other: no quotas, full qgroups and simple quotas.

Full qgroups recompute every changed extent's sharing at each transaction commit and scan the
whole filesystem when enabled; simple quotas (Linux >= 6.7) only count each extent against the
subvolume that allocated it. What that costs a container store, per mode, on a fresh
loop-mounted btrfs holding one image layer of small files:

- the first quota container: enabling quotas (with the rescan full qgroups start) included;
- a later container: snapshot plus exclusive limit;
- writing into a container (1 MiB files, then sync), as throughput;
- one usage read of two containers (``usages``: a sync and one ``qgroup show``);
- removing a container until the kernel has dropped its subvolume.

Modes are interleaved within each run, each on its own new filesystem, so every ratio compares
samples taken moments apart. Run it as root (it mounts); ``run`` is for ``imaged bench``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import btrfsutil

from imaged.bench.report import Series, machine_facts, write_report
from imaged.bench.scratch import scratch_fs, settle
from imaged.config import Config
from imaged.drivers.btrfs import BtrfsDriver

MODES = ("none", "qgroup", "simple")  # "none": containers without a quota, quotas never on
IMAGE_FILES = 2000
IMAGE_FILE_BYTES = 64 << 10
WRITE_FILES = 256
WRITE_FILE_BYTES = 1 << 20
QUOTA = 1 << 30
USAGE_READS = 5


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _write_files(directory: Path, count: int, size: int) -> None:
    data = os.urandom(size)  # one buffer: the bench measures the filesystem, not urandom
    for i in range(count):
        (directory / f"f{i:05d}").write_bytes(data)


def _wait_dropped(path: Path) -> None:
    while btrfsutil.deleted_subvolumes(path):
        btrfsutil.sync(path)
        time.sleep(0.01)


def _measure(mode: str, samples: dict[str, Series]) -> None:
    """One sample of every measure for ``mode``, on a filesystem of its own."""
    with scratch_fs(8 << 30, "btrfs") as (mount_point, _):
        quota_mode = "qgroup" if mode == "none" else mode
        driver = BtrfsDriver(Config(root=mount_point, drivers={"btrfs": {"quota": quota_mode}}),
                             mount_point / "drivers" / "btrfs")
        quota = None if mode == "none" else QUOTA
        _write_files(driver.prepare_layer("image", None), IMAGE_FILES, IMAGE_FILE_BYTES)
        driver.commit_layer("image")
        settle()

        def create(name: str) -> Callable[[], None]:
            return lambda: driver.create_container(name, ["image"], quota, read_only=False)

        samples[f"first container, {mode}"].samples.append(_timed(create("c0")) * 1e3)
        samples[f"later container, {mode}"].samples.append(_timed(create("c1")) * 1e3)
        rootfs = driver.home / "containers" / "c1" / "rootfs"
        settle()

        def write() -> None:
            _write_files(rootfs, WRITE_FILES, WRITE_FILE_BYTES)
            os.sync()

        def remove() -> None:
            driver.remove_container("c1")
            _wait_dropped(mount_point)

        seconds = _timed(write)
        samples[f"write, {mode}"].samples.append(WRITE_FILES * WRITE_FILE_BYTES / seconds / 2**20)
        reads = [_timed(lambda: driver.usages(["c0", "c1"])) for _ in range(USAGE_READS)]
        samples[f"usage read of 2, {mode}"].samples.append(sorted(reads)[USAGE_READS // 2] * 1e3)
        samples[f"remove until dropped, {mode}"].samples.append(_timed(remove) * 1e3)
        driver.remove_container("c0")
        driver.remove_layer("image")


def run(out: Path, runs: int) -> list[Path]:
    if os.geteuid() != 0:
        raise SystemExit("bench btrfsquota mounts filesystems: run it as root")
    names = [("first container", "ms"), ("later container", "ms"), ("write", "MiB/s"),
             ("usage read of 2", "ms"), ("remove until dropped", "ms")]
    samples = {f"{name}, {mode}": Series(f"{name}, {mode}", unit)
               for name, unit in names for mode in MODES}
    for i in range(runs):
        for mode in MODES:
            print(f"run {i + 1}/{runs}: {mode}", file=sys.stderr)
            _measure(mode, samples)
    ratios = {f"{name} {a}/{b}": samples[f"{name}, {a}"].median / samples[f"{name}, {b}"].median
              for name, _ in names for a, b in (("simple", "qgroup"), ("qgroup", "none"))}
    notes = [f"{runs} runs, modes interleaved, each sample on a fresh loop-mounted btrfs of "
             "8 GiB (sparse)",
             f"image layer: {IMAGE_FILES} files of {IMAGE_FILE_BYTES >> 10} KiB; writes: "
             f"{WRITE_FILES} files of {WRITE_FILE_BYTES >> 20} MiB then sync; quota "
             f"{QUOTA >> 20} MiB (exclusive limit); usage read: median of {USAGE_READS}",
             "first container includes enabling quotas (full qgroups: and the rescan it "
             "starts); 'none' creates containers without a quota and never enables quotas"]
    return write_report(out, "btrfsquota", "btrfs quota modes: no quota, qgroup, simple",
                        list(samples.values()), machine_facts(), ratios, notes)
