"""Where a benchmark puts each driver's store: on the filesystem that driver needs.

overlay and vfs run on the bench's dedicated ext4; btrfs needs its root on btrfs, so it gets a
loop-mounted btrfs of its own, made the same way; zfs needs a pool, so it gets a zfs-fuse pool
on a sparse file (``imaged.testing.zfsfuse``); devmapper makes its own thin pool on sparse
loop files under its root, sized by ``DEVMAPPER_OPTIONS``. Each store knows how to give a fresh
root for a sample, how to wipe it (read-only subvolumes, dataset clones and thin devices do not
go with ``rm -rf``) and how much space its backing storage uses, so the space a driver's
containers cost is measured where that driver puts them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaged.bench.scratch import scratch_fs
from imaged.config import Config

# Enough for the 300 MB image (its layer device is basesize), small enough for the guest's RAM.
DEVMAPPER_OPTIONS = {"basesize": 1 << 30, "data_size": 8 << 30, "metadata_size": 256 << 20}


@dataclass
class DriverStore:
    driver: str
    base: Path  # roots are made under it
    where: str  # the backing storage, for the report
    options: dict[str, Any] = field(default_factory=dict)  # the [drivers.<name>] table

    def config(self, root: Path) -> Config:
        return Config(root=root, driver=self.driver,
                      drivers={self.driver: self.options} if self.options else {})

    def config_toml(self) -> str:
        lines = [f"[drivers.{self.driver}]"] if self.options else []
        lines += [f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"'
                  for key, value in self.options.items()]
        return "\n".join(lines) + "\n"

    def used_bytes(self) -> int:
        """Space in use on the backing storage now, after its writes have landed."""
        os.sync()
        if self.driver == "zfs":
            out = subprocess.run(["zfs", "get", "-H", "-p", "-o", "value", "used",
                                  self.options["dataset"]], capture_output=True, text=True,
                                 check=True, timeout=60).stdout
            return int(out.strip())
        st = os.statvfs(self.base)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def wipe(self, root: Path) -> None:
        """Remove a root and everything its driver made, mounts first."""
        if not root.exists():
            return
        unmount_under(root)
        home = root / "drivers" / self.driver
        if self.driver == "devmapper" and home.exists():
            from imaged.drivers.devmapper.driver import deactivate_all  # noqa: PLC0415 - devmapper only

            deactivate_all(home)  # its devices hold the pool's loop files
        if self.driver == "btrfs" and home.exists():
            from imaged.drivers.btrfs import delete_subvolume  # noqa: PLC0415 - btrfs only

            for sub in [*home.glob("containers/*/rootfs"), *home.glob("layers/*")]:
                delete_subvolume(sub)
            # The kernel drops deleted subvolumes in the background: wait, or that work
            # lands inside the next sample's timing.
            subprocess.run(["btrfs", "subvolume", "sync", str(self.base)], check=True,
                           capture_output=True, timeout=600)
        if self.driver == "zfs":
            dataset = self.options["dataset"]
            children = subprocess.run(["zfs", "list", "-H", "-o", "name", "-d", "1", dataset],
                                      capture_output=True, text=True, check=True,
                                      timeout=60).stdout.split()[1:]
            for child in children:
                subprocess.run(["zfs", "destroy", "-R", child], check=True, timeout=600,
                               capture_output=True)
        shutil.rmtree(root)


def unmount_under(path: Path) -> None:
    """Unmount everything mounted at or below ``path``, deepest first."""
    prefix = str(path.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@contextlib.contextmanager
def driver_store(driver: str, scratch: Path, where: str,
                 size: int = 16 << 30) -> Iterator[DriverStore]:
    """The store for ``driver``: ``scratch`` (described by ``where``) unless it needs its own
    filesystem, which is made here and gone on exit, failure or not."""
    if driver == "btrfs":
        with scratch_fs(size, "btrfs") as (base, desc):
            yield DriverStore(driver, base, desc)
    elif driver == "zfs":
        from imaged.testing.zfsfuse import zfs_pool  # noqa: PLC0415 - zfs only

        with zfs_pool(scratch / "zfs", size) as pool:
            yield DriverStore(driver, pool.mountpoint, f"a zfs-fuse pool on a sparse file of "
                              f"{size >> 30} GiB", {"dataset": pool.dataset})
    elif driver == "devmapper":
        yield DriverStore(driver, scratch, f"a thin pool on sparse loop files in {where}",
                          DEVMAPPER_OPTIONS)
    else:
        yield DriverStore(driver, scratch, where)
