"""The btrfs driver: every layer a subvolume snapshotted from its parent's, every container a
writable snapshot of its image's top layer, so a layer or a container costs metadata only and
everything unchanged is shared on disk.

Layout under ``ROOT/drivers/btrfs``::

    layers/<chainid>            a subvolume: a new one for a base layer, else a snapshot of the
                                parent layer's; made read-only once committed
    containers/<name>/rootfs    a writable snapshot of the image's top layer
    containers/<name>/merged/   the default mount point: a bind mount of ``rootfs``
    dropped-qgroups             ids of deleted subvolumes whose qgroups may still exist

A read-only container has no ``rootfs``: its mount is a read-only bind of the top layer itself,
which is read-only already, so it costs nothing and can never diverge from the image.

Subvolume work goes through ``btrfsutil`` (libbtrfsutil's ioctls), which has no qgroup API.
Quota *control* goes through the qgroup ioctls themselves (``BTRFS_IOC_QUOTA_CTL``,
``QGROUP_LIMIT``, ``QGROUP_CREATE``): each is a fixed 16-48 byte structure, the errno comes
straight back (so a read-only or full filesystem becomes an error naming the fix), and Debian's
btrfs-progs 6.2 cannot enable simple quotas at all. Quota *reading* goes through ``btrfs qgroup
show --raw``: listing qgroups by ioctl means walking the quota tree with ``TREE_SEARCH``, and
the CLI's raw output is stable text that one call produces for every container at once.

The limit is on the container subvolume's *exclusive* bytes (``writable`` semantics: what the
container wrote, not the image it shares). Quotas are enabled on the filesystem when a quota is
first asked for, in the mode ``drivers.btrfs.quota`` names: ``qgroup`` (full qgroups: every
extent's sharing is recomputed at each transaction commit, and enabling scans the filesystem)
or ``simple`` (simple quotas, Linux >= 6.7: an extent counts against the subvolume that
allocated it, for its whole life, which is exactly a container's own writes, and nothing is
ever rescanned). A filesystem already in the other mode is an error, never a silent switch:
the mode is the filesystem's, and changing it drops every limit on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import threading
import uuid
from collections.abc import Iterator, Sequence, Set
from pathlib import Path

import btrfsutil

from imaged import tools
from imaged.config import Config
from imaged.drivers import (
    Capabilities,
    Finding,
    Mounted,
    Probe,
    QuotaMode,
    Usage,
)
from imaged.drivers.base import BaseDriver
from imaged.errors import ConflictError, InternalError, InvalidError, QuotaUnsupportedError
from imaged.fsutil import disk_usage
from imaged.host.mounts import MountSpec, backing_filesystem, bind_mount
from imaged.layers.unpack import WhiteoutMode
from imaged.sizes import format_size

_BTRFS_TIMEOUT = 120.0


def _ioc(direction: int, number: int, size: int) -> int:
    """``_IOC`` of linux/ioctl.h for the btrfs magic 0x94 (direction 1 write, 2 read)."""
    return direction << 30 | size << 16 | 0x94 << 8 | number


# linux/btrfs.h (uapi); ENABLE_SIMPLE_QUOTA is newer than the header Debian ships.
_IOC_FS_INFO = _ioc(2, 31, 1024)
_IOC_QUOTA_CTL = _ioc(3, 40, 16)  # struct btrfs_ioctl_quota_ctl_args {u64 cmd, status}
_IOC_QGROUP_CREATE = _ioc(1, 42, 16)  # {u64 create, qgroupid}: create 0 destroys
_IOC_QGROUP_LIMIT = _ioc(2, 43, 48)  # {u64 qgroupid; struct btrfs_qgroup_limit (5 x u64)}
_IOC_QUOTA_RESCAN_WAIT = _ioc(0, 46, 0)
_QUOTA_CTL_ENABLE = 1
_QUOTA_CTL_ENABLE_SIMPLE_QUOTA = 4
_QGROUP_LIMIT_MAX_EXCL = 1 << 1

# drivers.btrfs.quota → the name /sys/fs/btrfs/<fsid>/qgroups/mode gives that mode.
_KERNEL_MODE = {"qgroup": "qgroup", "simple": "squota"}

# Errors a user can fix, with the fix; every other errno from btrfs is a bug and stays one.
_FIXES = {
    errno.EROFS: "the filesystem is mounted read-only: remount it read-write",
    errno.ENOSPC: "the btrfs filesystem is full: free space on it or grow it "
                  "(btrfs filesystem resize)",
    errno.EDQUOT: "a qgroup limit on a subvolume holding the root is reached: raise it "
                  "(btrfs qgroup limit) or free space under it",
}


@contextlib.contextmanager
def _user_errors(doing: str) -> Iterator[None]:
    """Turn an OSError the operator can fix (``btrfsutil.BtrfsUtilError`` is one) into a
    ConflictError naming the fix, instead of an internal error."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FIXES:
            raise
        raise ConflictError(f"{doing}: {os.strerror(exc.errno)}; {_FIXES[exc.errno]}") \
            from exc


def _ioctl(path: Path, request: int, args: bytes = b"") -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not args:
            fcntl.ioctl(fd, request, 0)
            return b""
        buffer = bytearray(args)
        fcntl.ioctl(fd, request, buffer)
        return bytes(buffer)
    finally:
        os.close(fd)


def capabilities(quota_mode: QuotaMode = QuotaMode.QGROUP) -> Capabilities:
    return Capabilities("snapshot", WhiteoutMode.DELETE, quota_mode, "writable",
                        rename_lower_dirs=True, xattrs=True, reflink=True)


def probe(config: Config) -> Probe:
    backing = backing_filesystem(config.root)
    if backing.fstype != "btrfs":
        return Probe("btrfs", False, f"the root {config.root} is on {backing.fstype}, not "
                     "btrfs: put the root on a btrfs filesystem")
    mode = config.drivers.get("btrfs", {}).get("quota", "qgroup")
    reason = (f"the root is on btrfs ({backing.mount_point}): layers and containers are "
              f"subvolume snapshots; quota mode {mode} (exclusive limit)")
    if mode == "simple" and not Path("/sys/fs/btrfs/features/simple_quota").exists():
        reason += "; this kernel has no simple quotas (Linux >= 6.7): quotas will be refused"
    return Probe("btrfs", True, reason, capabilities(mode))


def parse_qgroups(show: str) -> dict[int, tuple[int, int | None]]:
    """Subvolume id → (exclusive bytes, exclusive limit or None) for every level-0 qgroup in
    the output of ``btrfs qgroup show --raw -e``: ``qgroupid rfer excl max_excl [path]``."""
    qgroups: dict[int, tuple[int, int | None]] = {}
    for line in show.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].startswith("0/") and fields[2].isdigit():
            limit = None if fields[3] == "none" else int(fields[3])
            qgroups[int(fields[0][2:])] = (int(fields[2]), limit)
    return qgroups


def _btrfs(*args: str) -> str:
    """Run the ``btrfs`` CLI (C locale: its output is parsed) and return its stdout."""
    return tools.run(["btrfs", *args], timeout=_BTRFS_TIMEOUT, missing=QuotaUnsupportedError,
                     provides="btrfs quotas need btrfs-progs (apt-get install btrfs-progs)")


def filesystem_id(path: Path) -> uuid.UUID:
    """The filesystem's UUID (``BTRFS_IOC_FS_INFO``): its directory under /sys/fs/btrfs."""
    return uuid.UUID(bytes=_ioctl(path, _IOC_FS_INFO, bytes(1024))[16:32])


def kernel_quota_mode(path: Path) -> str | None:
    """The quota mode of the filesystem holding ``path`` as sysfs names it (``qgroup`` or
    ``squota``), or None when quotas are off. Kernels before simple quotas (6.7) have no
    ``mode`` file: any quota there is full qgroups."""
    qgroups = Path("/sys/fs/btrfs") / str(filesystem_id(path)) / "qgroups"
    if not qgroups.is_dir():
        return None
    mode = qgroups / "mode"
    return mode.read_text().strip() if mode.exists() else "qgroup"


def destroy_qgroup(path: Path, subvolume_id: int) -> bool:
    """Destroy qgroup ``0/<id>`` on the filesystem of ``path``; False while the kernel still
    needs it (EBUSY: a simple quota whose extents another subvolume still shares, or a
    subvolume not yet fully dropped). A qgroup already gone counts as destroyed."""
    try:
        _ioctl(path, _IOC_QGROUP_CREATE, struct.pack("=QQ", 0, subvolume_id))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return True
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


def delete_subvolume(path: Path) -> None:
    """Delete a subvolume with every subvolume nested in it (a container may have made some),
    read-only or not; a missing one is not an error."""
    if not path.exists():
        return
    if btrfsutil.get_subvolume_read_only(path):
        btrfsutil.set_subvolume_read_only(path, False)
    btrfsutil.delete_subvolume(path, recursive=True)


class BtrfsDriver(BaseDriver):
    name = "btrfs"

    def __init__(self, config: Config, home: Path) -> None:
        super().__init__(config, home)
        self.quota_mode = QuotaMode(config.drivers.get("btrfs", {}).get("quota", "qgroup"))
        self._dropped_lock = threading.Lock()  # the service calls drivers from worker threads

    def capabilities(self) -> Capabilities:
        return capabilities(self.quota_mode)

    # subvolumes and their qgroups

    def _delete_subvolume(self, path: Path) -> None:
        """``delete_subvolume``, remembering (with quotas on) the ids of the subvolumes it
        deletes, so their qgroups go once the kernel has dropped them."""
        if path.exists() and kernel_quota_mode(self.home) is not None:
            ids = {btrfsutil.subvolume_id(path)}
            ids.update(nested_id for _, nested_id in btrfsutil.SubvolumeIterator(path))
            with self._dropped_lock:
                self._write_dropped(self._read_dropped() | ids)
        delete_subvolume(path)

    def _read_dropped(self) -> set[int]:
        try:
            return {int(line) for line in (self.home / "dropped-qgroups").read_text().split()}
        except FileNotFoundError:
            return set()

    def _write_dropped(self, ids: set[int]) -> None:
        path = self.home / "dropped-qgroups"
        if not ids:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{i}\n" for i in sorted(ids)))
        tmp.replace(path)

    def _destroy_dropped_qgroups(self) -> None:
        """Destroy the qgroups of subvolumes this driver deleted, once the kernel has finished
        dropping them (they are no longer in ``deleted_subvolumes``).

        Linux >= 6.10 removes a dropped subvolume's qgroup itself, except when it is busy: a
        simple quota still counts extents a snapshot shares (a parent layer deleted before its
        child), and the kernel never retries, so without this those qgroups pile up. Only ids
        this driver deleted are touched, never ``btrfs qgroup clear-stale``: the filesystem may
        hold other people's qgroups. btrfs never reuses a subvolume id, and refuses to destroy
        a live subvolume's qgroup, so a remembered id cannot take a new container's quota.
        Runs before every create and removal, so garbage collection (which removes layers)
        and recovery run it too.
        """
        with self._dropped_lock:
            pending = self._read_dropped()
            if not pending:
                return
            if kernel_quota_mode(self.home) is None:  # quotas off: every qgroup went with them
                self._write_dropped(set())
                return
            dropping = set(btrfsutil.deleted_subvolumes(self.home))
            self._write_dropped({subvolume_id for subvolume_id in pending
                                 if subvolume_id in dropping
                                 or not destroy_qgroup(self.home, subvolume_id)})

    # layers

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        layer = self._layer(key)
        with _user_errors(f"preparing layer {key[:12]}"):
            self._destroy_dropped_qgroups()
            self._delete_subvolume(layer)
            if parent is None:
                btrfsutil.create_subvolume(layer)
            else:
                btrfsutil.create_snapshot(self._layer(parent), layer, read_only=False)
        return layer

    def commit_layer(self, key: str) -> None:
        """Read-only from now on: children and containers snapshot it, nothing writes it."""
        with _user_errors(f"committing layer {key[:12]}"):
            btrfsutil.set_subvolume_read_only(self._layer(key), True)

    def remove_layer(self, key: str) -> None:
        with _user_errors(f"removing layer {key[:12]}"):
            self._destroy_dropped_qgroups()
            self._delete_subvolume(self._layer(key))

    def check(self, layers: Set[str]) -> list[Finding]:
        """A ready layer must be a read-only subvolume: every container and child layer
        snapshots it, so a write to it would show in images that never had that file."""
        found = []
        for key in sorted(layers & self.list_layers()):
            with _user_errors(f"checking layer {key[:12]}"):
                writable = not btrfsutil.get_subvolume_read_only(self._layer(key))
            if writable:
                found.append(Finding("layer-writable", f"sha256:{key}",
                                     f"layer sha256:{key} is a writable subvolume; a ready "
                                     "layer is read-only"))
        return found

    def repair(self, finding: Finding) -> None:
        if finding.kind == "layer-writable":
            self.commit_layer(finding.subject.removeprefix("sha256:"))
        else:
            super().repair(finding)

    # containers

    def _rootfs(self, name: str) -> Path:
        return self._container(name) / "rootfs"

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None:
        with _user_errors(f"creating container {name}"):
            if quota is not None:
                self._enable_quotas()  # first: a refusal leaves nothing behind
            self._destroy_dropped_qgroups()
            self._new_container_home(name)
            if read_only:
                return
            rootfs = self._rootfs(name)
            if layers:
                btrfsutil.create_snapshot(self._layer(layers[-1]), rootfs, read_only=False)
            else:
                btrfsutil.create_subvolume(rootfs)
            if quota is not None:
                self._limit(rootfs, quota)

    def _enable_quotas(self) -> None:
        """Enable quotas in the configured mode unless the filesystem has them already, and
        refuse a filesystem already in the other mode (the kernel would keep its mode and say
        nothing). Full qgroups start a rescan when enabled: wait for it, so the first
        container's numbers are right."""
        mode = kernel_quota_mode(self.home)
        if mode is None:
            simple = self.quota_mode == "simple"
            try:
                _ioctl(self.home, _IOC_QUOTA_CTL, struct.pack(
                    "=QQ", _QUOTA_CTL_ENABLE_SIMPLE_QUOTA if simple else _QUOTA_CTL_ENABLE, 0))
                if not simple:
                    _ioctl(self.home, _IOC_QUOTA_RESCAN_WAIT)
            except OSError as exc:
                raise QuotaUnsupportedError(self._refused(exc)) from exc
            mode = kernel_quota_mode(self.home)
        if mode != _KERNEL_MODE[self.quota_mode]:
            raise QuotaUnsupportedError(self._wrong_mode(mode))

    def _refused(self, exc: OSError) -> str:
        mount_point = backing_filesystem(self.home).mount_point
        code = exc.errno or 0
        if self.quota_mode == "simple" and code == errno.EINVAL:
            fix = ("this kernel has no simple quotas (Linux >= 6.7): set drivers.btrfs.quota "
                   "= \"qgroup\"")
        elif code in _FIXES:
            fix = _FIXES[code]
        else:
            simple = "--simple " if self.quota_mode == "simple" else ""
            fix = f"enable them yourself with `btrfs quota enable {simple}{mount_point}`"
        return (f"the btrfs filesystem at {mount_point} refused to enable {self.quota_mode} "
                f"quotas ({os.strerror(code)}): {fix}; or create the container without "
                "--quota")

    def _wrong_mode(self, mode: str | None) -> str:
        mount_point = backing_filesystem(self.home).mount_point
        other = "simple" if self.quota_mode == "qgroup" else "qgroup"
        return (f"the btrfs filesystem at {mount_point} has {other} quotas enabled (sysfs mode "
                f"{mode}), not the {self.quota_mode} quotas drivers.btrfs.quota asks for: set "
                f"drivers.btrfs.quota = \"{other}\", or run `btrfs quota disable {mount_point}` "
                "to let imaged enable its mode (that drops every qgroup limit on the "
                "filesystem, existing containers' quotas included)")

    def _limit(self, rootfs: Path, quota: int) -> None:
        """Set the exclusive limit on the subvolume's own qgroup (qgroupid 0: the one of the
        subvolume the call is made on)."""
        _ioctl(rootfs, _IOC_QGROUP_LIMIT,
               struct.pack("=6Q", 0, _QGROUP_LIMIT_MAX_EXCL, 0, quota, 0, 0))

    def resize_quota(self, name: str, quota: int, mounted: bool) -> None:
        used = self.usage(name)
        if used.quota is None:
            raise QuotaUnsupportedError(f"container {name} was created without a quota; "
                                        "its quota cannot be set afterwards")
        if quota < used.used:
            raise InvalidError(f"container {name} uses {format_size(used.used)}, more than "
                               f"the new quota of {format_size(quota)}: delete files first")
        with _user_errors(f"setting the quota of container {name}"):
            self._limit(self._rootfs(name), quota)

    def _mount_at(self, path: Path, name: str, layers: Sequence[str],
                  read_only: bool) -> Mounted:
        if read_only and not layers:
            raise InvalidError("an image without layers cannot be mounted read-only")
        source = self._layer(layers[-1]) if read_only else self._rootfs(name)
        bind_mount(source, path, read_only=read_only)
        return Mounted(path, (MountSpec("bind", str(source),
                                        ("bind", "ro" if read_only else "rw")),))

    def usage(self, name: str) -> Usage:
        return self.usages([name])[name]

    def usages(self, names: Sequence[str]) -> dict[str, Usage]:
        """Each container's own (exclusive) bytes and limit from its qgroup: one sync (the
        numbers move at transaction commit) and one ``qgroup show`` for all of them. Where
        quotas are off on the filesystem, ``du`` of each rootfs, which counts the image too.
        A read-only container has no rootfs and uses nothing."""
        rootfs = {name: self._rootfs(name) for name in names}
        usages = {name: Usage(0, None) for name, path in rootfs.items() if not path.exists()}
        live = {name: path for name, path in rootfs.items() if name not in usages}
        if not live:
            return usages
        if kernel_quota_mode(self.home) is None:
            return usages | {name: Usage(disk_usage(path), None) for name, path in live.items()}
        btrfsutil.sync(self.home)
        qgroups = parse_qgroups(_btrfs("qgroup", "show", "--raw", "-e", str(self.home)))
        for name, path in live.items():
            subvolume_id = btrfsutil.subvolume_id(path)
            if subvolume_id not in qgroups:
                raise InternalError(f"btrfs qgroup show lists no qgroup 0/{subvolume_id} "
                                    f"for container {name}")
            usages[name] = Usage(*qgroups[subvolume_id])
        return usages

    def remove_container(self, name: str) -> None:
        with _user_errors(f"removing container {name}"):
            self._destroy_dropped_qgroups()
            if self._rootfs(name).exists():
                self.unmount(name, None)
                self._delete_subvolume(self._rootfs(name))
            super().remove_container(name)
