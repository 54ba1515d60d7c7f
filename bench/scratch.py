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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imaged.drivers.devmapper.driver import mkfs_command, mount_options, pool_state
from imaged.drivers.devmapper.ioctl import (
    DmError,
    activate,
    deactivate,
    dm_list,
    dm_message,
    kernel_support,
)
from imaged.drivers.devmapper.pool import SECTOR, dev_string, pool_target, thin_target
from imaged.drivers.zfs import SNAPSHOT, SYNC_PROPERTY, ZfsError, zfs, zpool
from imaged.errors import ImagedError
from imaged.fsutil import syncfs
from imaged.host import loopdev
from imaged.host.mounts import MountSpec, is_mounted, mount_with_fsconfig, unmount
from imaged.testing import zfsfuse

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

    def sync(self) -> None:
        """Make what was written count in statvfs and st_blocks."""
        syncfs(self.mount_point)

    def free(self) -> int:
        """Free bytes once what was written reached the filesystem (statvfs after syncfs)."""
        return _statvfs_free(self)

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
        with _loop_device(image) as (device, direct):
            subprocess.run(["mount", device, str(mount_point)], check=True, capture_output=True)
            try:
                yield LoopFs(device, mount_point,
                             f"a dedicated {kind} of {size >> 30} GiB on {device} "
                             f"({'direct I/O' if direct else 'direct I/O refused: cached'})",
                             direct)
            finally:
                _unmount(mount_point)


@contextlib.contextmanager
def _loop_device(image: Path) -> Iterator[tuple[str, bool]]:
    """(device, whether the kernel granted direct I/O) of a loop device on ``image``, unbound
    on exit.

    Not autoclear, and its descriptor closed at once: a cold remount unmounts the device's
    only holder, which must neither unbind it nor leave the device's page cache held open.
    """
    try:
        attachment = loopdev.attach(image, autoclear=False, direct_io=True)
    except (OSError, ImagedError) as e:
        raise ScratchError(f"cannot bind a loop device to {image}: {e}") from None
    attachment.close()
    try:
        granted = loopdev.get_status(attachment.device).flags & loopdev.LO_FLAGS_DIRECT_IO
        yield str(attachment.device.path), bool(granted)
    finally:
        loopdev.detach(attachment.device)


@dataclass
class ZfsFs:
    """A zfs-fuse pool (userspace ZFS behind FUSE, not kernel ZFS) on a loop device of its
    own, with one dataset mounted at ``mount_point``. What LoopFs is for the kernel
    filesystems: ``remount`` exports and imports the pool, which unmounts every dataset
    (the kernel's FUSE caches go), unloads the pool from the daemon (its ARC and vdev cache
    with it) and closes the loop device (whose page cache the last close drops), so the next
    read comes from the device; a plain unmount would leave the daemon's ARC warm."""

    pool: str
    dataset: str
    device: str
    devices: Path  # a directory holding only a link to ``device``: what import scans
    mount_point: Path
    description: str
    direct_io: bool

    def sync(self) -> None:
        """Wait for the open transaction group to reach the pool: syncfs does not reach
        zfs-fuse, and statvfs and st_blocks count only synced blocks. Clearing a property
        nobody sets is a sync task (zfs-fuse has no ``zpool sync``), as the zfs driver does."""
        zfs("inherit", SYNC_PROPERTY, self.dataset)

    def free(self) -> int:
        """Free bytes of the dataset once a transaction group has synced."""
        return _statvfs_free(self)

    def remount(self) -> None:
        try:
            zpool("export", self.pool)
            zpool("import", "-d", str(self.devices), self.pool)
        except ZfsError as e:
            raise ScratchError(f"exporting and importing the zfs-fuse pool failed: {e}") \
                from None

    def mount(self, dataset: str) -> None:
        """Mount a ``canmount=noauto`` dataset at its mountpoint unless it is (zfs-fuse
        mounts new clones by itself, import does not)."""
        mountpoint = zfs("get", "-H", "-o", "value", "mountpoint", dataset).strip()
        if not is_mounted(Path(mountpoint)):
            zfs("mount", dataset)

    def layer(self, name: str, origin: str | None, content: Path) -> str:
        """A layer as the zfs driver makes one: a dataset (a clone of ``origin``, the parent
        layer's snapshot, when given), ``content`` copied in, unmounted, snapshotted; the
        snapshot's name, what the next layer or a container is cloned from."""
        dataset = f"{self.pool}/layers/{name}"
        mountpoint = self.mount_point.parent / "layers" / name
        options = ("-o", f"mountpoint={mountpoint}", "-o", "canmount=noauto")
        if origin is None:
            zfs("create", "-p", *options, dataset)
        else:
            zfs("clone", *options, origin, dataset)
        self.mount(dataset)
        subprocess.run(["cp", "-a", "--no-target-directory", str(content), str(mountpoint)],
                       check=True, timeout=1800)
        zfs("umount", dataset)
        zfs("snapshot", f"{dataset}@{SNAPSHOT}")
        return f"{dataset}@{SNAPSHOT}"

    @contextlib.contextmanager
    def clone(self, origin: str, name: str, mountpoint: Path, *,
              before_mount: Callable[[], None] = lambda: None) -> Iterator[Path]:
        """A container as the zfs driver makes one: a ``canmount=noauto`` clone of a layer's
        snapshot at ``mountpoint``, mounted after ``before_mount``; destroyed on exit."""
        dataset = f"{self.pool}/containers/{name}"
        zfs("clone", "-o", f"mountpoint={mountpoint}", "-o", "canmount=noauto", origin,
            dataset)
        try:
            before_mount()
            self.mount(dataset)
            yield mountpoint
        finally:
            zfs("destroy", "-r", dataset)


@contextlib.contextmanager
def zfs_fs(size: int, parent: Path | None = None) -> Iterator[ZfsFs]:
    """A fresh zfs-fuse pool on its own loop device (direct I/O asked), its dataset mounted;
    the pool destroyed, the loop device detached and the daemon stopped if imaged's tooling
    started it and no pool is left in it (``zfsfuse.running``) on exit, even on failure.
    ``ScratchError`` when this host cannot make one."""
    if os.geteuid() != 0:
        raise ScratchError("a zfs-fuse pool needs root")
    missing = [t for t in ("zfs-fuse", "zfs", "zpool") if shutil.which(t) is None]
    if missing:
        raise ScratchError(f"{', '.join(missing)} not installed (scripts/setup installs "
                           "zfs-fuse)")
    name = f"imagedbench{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="imaged-bench-", dir=parent) as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        image, devices, mount_point = base / "pool.img", base / "devices", base / "mnt"
        devices.mkdir()
        with image.open("wb") as fh:
            fh.truncate(size)
        try:
            daemon = stack.enter_context(zfsfuse.running())
            device, direct = stack.enter_context(_loop_device(image))
            (devices / Path(device).name).symlink_to(device)
            zpool("create", "-o", "cachefile=none", "-m", "none", name, device)
            stack.callback(_destroy_pool, name)
            zfs("create", "-o", f"mountpoint={mount_point}", f"{name}/bench")
            zfs("create", "-o", "mountpoint=none", f"{name}/containers")
        except ScratchError:
            raise
        except (ZfsError, RuntimeError) as e:
            raise ScratchError(f"zfs-fuse: {e}") from None
        yield ZfsFs(name, f"{name}/bench", device, devices, mount_point,
                    f"a zfs-fuse pool {name} (userspace ZFS behind FUSE, pool version 23) of "
                    f"{size >> 30} GiB on {device} "
                    f"({'direct I/O' if direct else 'direct I/O refused: cached'}), its daemon "
                    f"{'started for the run' if daemon.ours else 'one already running'}",
                    direct)


# Where a kernel without device-mapper is told to run the devmapper rows instead.
GUEST_COMMAND = "scripts/bench-guest DIR copyup --filesystems devmapper"
THIN_BLOCK_SECTORS = 128  # the driver's 64 KiB pool blocks (POOL_BLOCK_SECTORS)
THIN_METADATA_SIZE = 256 << 20


@dataclass
class ThinFs:
    """A thin pool (device-mapper's dm-thin) on two loop devices of its own, made as the
    devmapper driver makes its pool, with one thin device carrying the driver's filesystem
    (``fs``, made and mounted with the driver's own mkfs and mount options) at
    ``mount_point``: what LoopFs is for a plain filesystem, and where the stacked, plain and
    volume configurations keep their directories. Layers and containers are thin devices of
    the same pool, each a snapshot of its parent's, as the driver makes them (``layer``,
    ``clone``). Space is the pool's: a snapshot's first write allocates pool blocks no
    statvfs of the bench filesystem would show."""

    pool: str
    pool_dev: str  # major:minor, as thin tables name it
    fs: str
    device: Path  # the bench filesystem's thin device
    sectors: int  # of every thin device
    mount_point: Path
    description: str
    direct_io: bool
    next_id: int = 1  # thin id 0 is the bench filesystem's

    def device_name(self, key: str) -> str:
        return f"{self.pool.removesuffix('-pool')}-{key}"

    def sync(self) -> None:
        """Flush every filesystem: a container's is mounted apart from the bench one."""
        os.sync()

    def free(self) -> int:
        """Free bytes of the pool's data, once every filesystem's writes reached it."""
        self.sync()
        state = pool_state(self.pool)
        if state is None:
            raise ScratchError(f"the thin pool {self.pool} is gone")
        status, block_sectors = state
        return (status.data_total - status.data_used) * block_sectors * SECTOR

    def remount(self) -> None:
        """Unmount the bench filesystem and mount it again, as LoopFs does (the thin device
        stays active: removing it would change nothing cached below the filesystem)."""
        _unmount(self.mount_point)
        try:
            self.mount()
        except ImagedError as e:
            raise ScratchError(f"mounting {self.device} again failed: {e}") from None

    def mount(self) -> None:
        """Mount the bench filesystem with ``discard``, as the driver mounts a container:
        what a sample removes goes back to the pool."""
        mount_with_fsconfig(MountSpec(self.fs, str(self.device),
                                      mount_options(self.fs, False, discard=True)),
                            self.mount_point)

    def _new(self, origin: int | None) -> int:
        thin_id, self.next_id = self.next_id, self.next_id + 1
        dm_message(self.pool, f"create_thin {thin_id}" if origin is None
                   else f"create_snap {thin_id} {origin}")
        return thin_id

    @contextlib.contextmanager
    def _mounted(self, thin_id: int, mountpoint: Path) -> Iterator[Path]:
        """The thin device active and its filesystem mounted at ``mountpoint`` (with
        ``discard``, as the driver mounts a container); unmounted and removed on exit."""
        name = self.device_name(str(thin_id))
        device = activate(name, [thin_target(self.sectors, self.pool_dev, thin_id)])
        try:
            mount_with_fsconfig(MountSpec(self.fs, str(device),
                                          mount_options(self.fs, False, discard=True)),
                                mountpoint)
            try:
                yield device
            finally:
                unmount(mountpoint)
        finally:
            deactivate(name)

    def layer(self, name: str, origin: str | None, content: Path) -> str:
        """A layer as the devmapper driver makes one: a snapshot of the parent layer's device
        (a new thin device with the driver's filesystem for the first), ``content`` copied
        in, unmounted and deactivated; its thin id, what the next layer or a container is a
        snapshot of."""
        thin_id = self._new(None if origin is None else int(origin))
        mountpoint = self.mount_point.parent / "layers" / name
        mountpoint.mkdir(parents=True)
        if origin is None:
            device_name = self.device_name(str(thin_id))
            device = activate(device_name, [thin_target(self.sectors, self.pool_dev, thin_id)])
            try:
                subprocess.run(mkfs_command(self.fs, device), check=True, capture_output=True,
                               timeout=600)
            finally:
                deactivate(device_name)
        with self._mounted(thin_id, mountpoint):
            subprocess.run(["cp", "-a", "--no-target-directory", str(content), str(mountpoint)],
                           check=True, timeout=1800)
        return str(thin_id)

    @contextlib.contextmanager
    def clone(self, origin: str, name: str, mountpoint: Path, *,
              before_mount: Callable[[], None] = lambda: None) -> Iterator[Path]:
        """A container as the devmapper driver makes one: a snapshot of the top layer's
        device, its filesystem mounted at ``mountpoint`` after ``before_mount``; the mount,
        the device and its thin id gone on exit."""
        thin_id = self._new(int(origin))
        try:
            mountpoint.mkdir(exist_ok=True)
            before_mount()
            with self._mounted(thin_id, mountpoint):
                yield mountpoint
        finally:
            dm_message(self.pool, f"delete {thin_id}")


@contextlib.contextmanager
def thin_fs(size: int, fs: str, parent: Path | None = None) -> Iterator[ThinFs]:
    """A fresh thin pool of ``size`` bytes of data on its own loop devices (direct I/O asked),
    with a thin device of ``fs`` mounted; every mount, thin device, the pool and the loop
    devices gone on exit, even on failure. ``ScratchError`` when this host cannot make one
    (no device-mapper in its kernel: the user-mode-linux guest has it)."""
    if os.geteuid() != 0:
        raise ScratchError("a thin pool needs root")
    missing = kernel_support()
    if missing is not None:
        raise ScratchError(f"device-mapper is not usable in this kernel ({missing}): "
                           f"{GUEST_COMMAND} runs this bench in the user-mode-linux guest")
    if shutil.which(mkfs_command(fs, Path())[0]) is None:
        raise ScratchError(f"{mkfs_command(fs, Path())[0]} is not installed")
    name = f"imagedbench{os.getpid()}"
    pool = f"{name}-pool"
    sectors = size // SECTOR // THIN_BLOCK_SECTORS * THIN_BLOCK_SECTORS
    with tempfile.TemporaryDirectory(prefix="imaged-bench-", dir=parent) as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        for file, length in (("data", sectors * SECTOR), ("metadata", THIN_METADATA_SIZE)):
            with (base / file).open("wb") as fh:
                fh.truncate(length)
        data, direct = stack.enter_context(_loop_device(base / "data"))
        metadata, _ = stack.enter_context(_loop_device(base / "metadata"))
        mount_point = base / "mnt"
        mount_point.mkdir()
        try:
            node = activate(pool, [pool_target(sectors, metadata, data, THIN_BLOCK_SECTORS)])
            stack.callback(_remove_thin_devices, name)
            made = ThinFs(pool, dev_string(node.stat().st_rdev), fs, Path(), sectors,
                          mount_point, "", direct, next_id=0)
            made.layer("bench", None, mount_point)  # thin id 0: an empty filesystem
            made.device = activate(made.device_name("0"),
                                   [thin_target(sectors, made.pool_dev, 0)])
            made.mount()
            stack.callback(_unmount, mount_point)
        except (DmError, ImagedError, subprocess.CalledProcessError) as e:
            raise ScratchError(f"the thin pool: {e}") from None
        made.description = (
            f"a thin pool {pool} of {size >> 30} GiB (64 KiB blocks) on {data} "
            f"({'direct I/O' if direct else 'direct I/O refused: cached'}), metadata on "
            f"{metadata}, the bench's {fs} on thin device 0 as the devmapper driver makes and "
            f"mounts it ({' '.join(mkfs_command(fs, Path('DEV'))[:-1])}; "
            f"{','.join(mount_options(fs, False, discard=True))})")
        yield made


def _remove_thin_devices(name: str) -> None:
    """Remove the bench's thin devices, then its pool (whose loop devices are then free)."""
    devices = sorted((n for n, _ in dm_list() if n.startswith(f"{name}-")),
                     key=lambda n: n.endswith("-pool"))
    for device in devices:
        with contextlib.suppress(DmError):
            deactivate(device)


def _statvfs_free(fs: LoopFs | ZfsFs) -> int:
    fs.sync()
    stat = os.statvfs(fs.mount_point)
    return stat.f_bfree * stat.f_frsize


def _destroy_pool(name: str) -> None:
    """Destroy the pool (unmounting its datasets), even one a failed export left out."""
    with contextlib.suppress(ZfsError):
        zpool("destroy", "-f", name)


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
