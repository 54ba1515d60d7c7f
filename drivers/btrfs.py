"""The btrfs driver: every layer a subvolume snapshotted from its parent's, every container a
writable snapshot of its image's top layer, so a layer or a container costs metadata only and
everything unchanged is shared on disk.

Layout under ``ROOT/drivers/btrfs``::

    layers/<chainid>            a subvolume: a new one for a base layer, else a snapshot of the
                                parent layer's; made read-only once committed
    containers/<name>/rootfs    a writable snapshot of the image's top layer
    containers/<name>/merged/   the default mount point: a bind mount of ``rootfs``

A read-only container has no ``rootfs``: its mount is a read-only bind of the top layer itself,
which is read-only already, so it costs nothing and can never diverge from the image.

Subvolume work goes through ``btrfsutil`` (libbtrfsutil's ioctls). btrfsutil has no qgroup API,
so quotas go through the ``btrfs`` CLI (``quota enable``, ``qgroup limit -e``, ``qgroup show
--raw``): its text output is stable and btrfs-progs is installed wherever btrfs is used, while
the qgroup ioctls would mean hand-packed structures for three calls. The limit is on the
container subvolume's *exclusive* bytes (``writable`` semantics: what the container wrote, not
the image it shares). Quotas are enabled on the filesystem when a quota is first asked for.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import btrfsutil

from imaged.config import Config
from imaged.drivers import Capabilities, Mounted, Probe, Usage, disk_usage
from imaged.drivers.containers import DriverHome
from imaged.errors import InternalError, InvalidError, QuotaUnsupportedError
from imaged.mounts import MountSpec, backing_filesystem, bind_mount, is_mounted
from imaged.sizes import format_size
from imaged.unpack import WhiteoutMode

_BTRFS_TIMEOUT = 120.0


def capabilities() -> Capabilities:
    return Capabilities("snapshot", WhiteoutMode.DELETE, "qgroup", "writable",
                        rename_lower_dirs=True, xattrs=True, reflink=True)


def probe(config: Config) -> Probe:
    backing = backing_filesystem(config.root)
    if backing.fstype != "btrfs":
        return Probe("btrfs", False, f"the root {config.root} is on {backing.fstype}, not "
                     "btrfs: put the root on a btrfs filesystem")
    return Probe("btrfs", True, f"the root is on btrfs ({backing.mount_point}): layers and "
                  "containers are subvolume snapshots; quota mode qgroup (exclusive limit)",
                  capabilities())


def parse_exclusive(show: str, subvolume_id: int) -> tuple[int, int | None]:
    """(exclusive bytes, exclusive limit or None) of qgroup ``0/<id>`` in the output of
    ``btrfs qgroup show --raw -e``: ``qgroupid rfer excl max_excl [path]`` per row."""
    wanted = f"0/{subvolume_id}"
    for line in show.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == wanted:
            limit = None if fields[3] == "none" else int(fields[3])
            return int(fields[2]), limit
    raise InternalError(f"btrfs qgroup show lists no qgroup {wanted}")


def _run_btrfs(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["btrfs", *args], capture_output=True, text=True,
                              timeout=_BTRFS_TIMEOUT, env={**os.environ, "LC_ALL": "C"},
                              check=False)
    except FileNotFoundError:
        raise QuotaUnsupportedError("the btrfs command is not installed: btrfs quotas need "
                                    "btrfs-progs (apt-get install btrfs-progs)") from None
    except subprocess.TimeoutExpired:
        raise InternalError(f"btrfs {' '.join(args)} did not finish within "
                            f"{_BTRFS_TIMEOUT:.0f} s") from None


def _btrfs(*args: str, quota_error: str | None = None) -> str:
    """Run the ``btrfs`` CLI; a failure is a QuotaUnsupportedError when ``quota_error`` says
    what the operator must change, else internal."""
    proc = _run_btrfs(*args)
    if proc.returncode != 0:
        command = f"btrfs {' '.join(args)}"
        detail = (proc.stderr.strip() or proc.stdout.strip()).replace("\n", "; ")
        if quota_error is not None:
            raise QuotaUnsupportedError(f"{quota_error} ({command}: {detail})")
        raise InternalError(f"{command} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def qgroup_of(subvolume: Path) -> tuple[int, int | None] | None:
    """(exclusive bytes, exclusive limit or None) of a subvolume's qgroup, or None when quotas
    are off on its filesystem. Numbers move at transaction commit: sync first to be exact."""
    proc = _run_btrfs("qgroup", "show", "--raw", "-e", "-f", str(subvolume))
    if proc.returncode != 0 and "quotas not enabled" in proc.stderr:
        return None
    if proc.returncode != 0:
        raise InternalError(f"btrfs qgroup show {subvolume} failed: {proc.stderr.strip()}")
    return parse_exclusive(proc.stdout, btrfsutil.subvolume_id(subvolume))


def delete_subvolume(path: Path) -> None:
    """Delete a subvolume with every subvolume nested in it (a container may have made some),
    read-only or not; a missing one is not an error."""
    if not path.exists():
        return
    if btrfsutil.get_subvolume_read_only(path):
        btrfsutil.set_subvolume_read_only(path, False)
    btrfsutil.delete_subvolume(path, recursive=True)


class BtrfsDriver(DriverHome):
    name = "btrfs"

    def __init__(self, config: Config, home: Path) -> None:
        self.config = config
        self.home = home
        self.options = config.drivers.get("btrfs", {})
        self._make_dirs()

    def capabilities(self) -> Capabilities:
        return capabilities()

    # layers

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        layer = self._layer(key)
        delete_subvolume(layer)
        if parent is None:
            btrfsutil.create_subvolume(layer)
        else:
            btrfsutil.create_snapshot(self._layer(parent), layer, read_only=False)
        return layer

    def commit_layer(self, key: str) -> None:
        """Read-only from now on: children and containers snapshot it, nothing writes it."""
        btrfsutil.set_subvolume_read_only(self._layer(key), True)

    def remove_layer(self, key: str) -> None:
        delete_subvolume(self._layer(key))

    # containers

    def _rootfs(self, name: str) -> Path:
        return self._container(name) / "rootfs"

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None:
        if quota is not None and self.options.get("quota", "qgroup") != "qgroup":
            raise QuotaUnsupportedError(
                f"drivers.btrfs.quota = {self.options['quota']!r} is not built yet; "
                "use \"qgroup\" (the default)")
        self._new_container(name, None)
        if read_only:
            return
        if quota is not None:
            self._enable_quotas()
        rootfs = self._rootfs(name)
        if layers:
            btrfsutil.create_snapshot(self._layer(layers[-1]), rootfs, read_only=False)
        else:
            btrfsutil.create_subvolume(rootfs)
        if quota is not None:
            self._limit(rootfs, quota)

    def _enable_quotas(self) -> None:
        """Enable qgroups on the filesystem (a no-op when they are) and wait for the rescan
        that enabling starts, so the first container's numbers are right."""
        _btrfs("quota", "enable", str(self.home),
               quota_error=f"this btrfs filesystem refused to enable quotas; enable them "
                           f"with `btrfs quota enable {self.home}` or create the container "
                           "without --quota")
        _btrfs("quota", "rescan", "-W", str(self.home))

    def _limit(self, rootfs: Path, quota: int) -> None:
        _btrfs("qgroup", "limit", "-e", str(quota), str(rootfs),
               quota_error=f"setting an exclusive qgroup limit on {rootfs} failed; check "
                           f"`btrfs qgroup show {self.home}`")

    def _qgroup(self, name: str) -> tuple[int, int | None] | None:
        """The container's qgroup numbers, exact as of now; None without quotas or rootfs."""
        rootfs = self._rootfs(name)
        if not rootfs.exists():
            return None
        btrfsutil.sync(rootfs)
        return qgroup_of(rootfs)

    def resize_quota(self, name: str, quota: int, mounted: bool) -> None:
        qgroup = self._qgroup(name)
        if qgroup is None or qgroup[1] is None:
            raise QuotaUnsupportedError(f"container {name} was created without a quota; "
                                        "its quota cannot be set afterwards")
        if quota < qgroup[0]:
            raise InvalidError(f"container {name} uses {format_size(qgroup[0])}, more than "
                               f"the new quota of {format_size(quota)}: delete files first")
        self._limit(self._rootfs(name), quota)

    def mount(self, name: str, layers: Sequence[str], read_only: bool,
              target: Path | None) -> Mounted:
        if read_only and not layers:
            raise InvalidError("an image without layers cannot be mounted read-only")
        path = target or self._container(name) / "merged"
        path.mkdir(parents=True, exist_ok=True)
        if is_mounted(path):
            return Mounted(path)
        source = self._layer(layers[-1]) if read_only else self._rootfs(name)
        bind_mount(source, path, read_only=read_only)
        return Mounted(path, (MountSpec("bind", str(source),
                                        ("bind", "ro" if read_only else "rw")),))

    def usage(self, name: str) -> Usage:
        """The container's own (exclusive) bytes from its qgroup; where quotas are off on the
        filesystem, ``du`` of its rootfs, which counts the image too."""
        qgroup = self._qgroup(name)
        if qgroup is not None:
            return Usage(*qgroup)
        rootfs = self._rootfs(name)
        return Usage(disk_usage(rootfs) if rootfs.exists() else 0, None)

    def remove_container(self, name: str) -> None:
        if self._rootfs(name).exists():
            self.unmount(name, None)
            delete_subvolume(self._rootfs(name))
        super().remove_container(name)
