"""Storage drivers behind one Protocol (``imaged.drivers``, DESIGN §3).

The service never branches on a driver's name: what differs between drivers is stated as data
(``Capabilities``: family, whiteout form, quota semantics, rename of lower directories) and
behind the methods of ``Driver``. Two families exist: *stacked* drivers keep each layer's own
changes in its own directory and stack them at mount time (overlay, aufs, fuse); *snapshot*
drivers start each layer as a copy or snapshot of its parent and apply the diff in place (vfs,
btrfs, zfs, devmapper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

from imaged.config import Config
from imaged.errors import ConflictError, InvalidError
from imaged.host.mounts import MountSpec, is_mounted
from imaged.layers.unpack import WhiteoutMode
from imaged.quota import loopquota


class QuotaMode(StrEnum):
    """The mechanism that enforces a container's quota here (``ps`` and ``info`` show it)."""

    LOOP = "loop"  # a loop-backed ext4 per container (imaged.quota.loopquota)
    PROJECT = "project"  # the filesystem's project quotas (imaged.quota.projquota)
    UNAVAILABLE = "unavailable"  # project quotas configured where the filesystem has none
    QGROUP = "qgroup"  # btrfs qgroups, full accounting
    SIMPLE = "simple"  # btrfs simple quotas (squota)
    DATASET = "quota"  # the ZFS dataset's quota property
    DEVICE = "device size"  # devmapper: the thin device's size
    FUSE = "fuse"  # the fuse driver's server refuses writes past it (imaged.fuse)


@dataclass(frozen=True)
class Capabilities:
    family: Literal["stacked", "snapshot"]
    whiteouts: WhiteoutMode
    quota_mode: QuotaMode
    quota_semantics: Literal["writable", "total"]
    rename_lower_dirs: bool  # rename(2) of a lower directory works (else EXDEV: mv copies)
    xattrs: bool
    reflink: bool = False
    max_layers: int = 500

    def check_depth(self, layers: int, driver: str) -> None:
        """Refuse an image deeper than this driver can stack, before anything is fetched."""
        if layers > self.max_layers:
            raise InvalidError(f"the image has {layers} layers; the {driver} driver stacks at "
                               f"most {self.max_layers} here")

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "whiteouts": self.whiteouts.value,
                "quota_mode": self.quota_mode, "quota_semantics": self.quota_semantics,
                "rename_lower_dirs": self.rename_lower_dirs, "xattrs": self.xattrs,
                "reflink": self.reflink, "max_layers": self.max_layers}


@dataclass(frozen=True)
class Probe:
    name: str
    supported: bool
    reason: str
    capabilities: Capabilities | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "supported": self.supported, "reason": self.reason,
                "capabilities": None if self.capabilities is None
                else self.capabilities.to_json()}


@dataclass(frozen=True)
class Mounted:
    path: Path
    mounts: tuple[MountSpec, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Usage:
    used: int  # bytes the quota counts (writable: the container's own; total: image + own)
    quota: int | None
    # Inodes in use and in all, where the driver can count them: a filesystem of the
    # container's own (loop, devmapper) knows both; a project quota counts only the used.
    inodes_used: int | None = None
    inodes: int | None = None
    # Files copied up only in part (fuse), which kernel overlay cannot show until they are
    # materialised; None where the driver never copies up by range.
    partial_files: int | None = None


@dataclass(frozen=True)
class Finding:
    """One problem ``imaged check`` found (DESIGN §4, ``GET /v1/check``), in words a user can
    act on. ``subject`` names what is wrong (a digest, a chain ID, a container, a path) so a
    repair can find it again; ``images`` are the references of the images it affects, said
    wherever the problem is not repaired. Kinds are open: the store's are in
    ``imaged.store.check``, and a driver adds its own through ``Driver.check``."""

    kind: str
    subject: str
    message: str
    images: tuple[str, ...] = ()
    repaired: bool = False
    error: str | None = None  # why a repair that was tried did not succeed

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"kind": self.kind, "subject": self.subject,
                                 "message": self.text(), "images": list(self.images),
                                 "repaired": self.repaired}
        if self.error is not None:
            found["error"] = self.error
        return found

    def text(self) -> str:
        """The one line ``imaged check`` prints: the problem, what it affects, the outcome."""
        line = self.message
        if self.images:
            line += f"; images: {', '.join(self.images)}"
        if self.repaired:
            line += " (repaired)"
        elif self.error is not None:
            line += f" (not repaired: {self.error})"
        return line


class Driver(Protocol):
    """What every driver does. Layers are named by ChainID hex; containers by their name.

    ``layers`` arguments are the image's chain, base first; stacked drivers use all of them,
    snapshot drivers only the last. Methods block (syscalls, subprocesses): the service calls
    them from worker threads.
    """

    name: str
    home: Path
    # Copies up by range, leaving partial files that ``update --materialize`` completes; a
    # driver without (all but fuse) has that refused, not answered with nothing done.
    partial_copy_up: bool

    def capabilities(self) -> Capabilities: ...

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        """Make the directory a layer's tar is applied into, and return it."""

    def commit_layer(self, key: str) -> None:
        """Seal a fully applied layer (e.g. make a snapshot read-only). Durability is not the
        driver's job here: the pull flushes the driver's filesystem once for all its layers."""

    def remove_layer(self, key: str) -> None:
        """Remove a layer, committed or half-written; a missing one is not an error."""

    def list_layers(self) -> set[str]: ...

    def layer_tree(self, key: str) -> AbstractContextManager[Path]:
        """The directory the layer's tar was applied into, as children and containers see it,
        for the block: ``imaged check --verify-data`` compares it with the layer's blob and
        writes nothing. A driver that keeps committed layers unmounted (zfs, devmapper)
        mounts one for the block."""

    def layer_dependents(self, key: str) -> list[str]:
        """What is made from the layer such that it cannot be removed and applied again
        (``imaged check --repair`` of a damaged layer): ZFS clones of its snapshot. Empty
        where children and containers are copies or snapshots that stand alone."""

    def layer_paths(self, key: str) -> list[Path]:
        """Everything on disk that ``remove_layer`` deletes, so garbage collection can report
        the bytes a removal frees as ``du`` sees them."""

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None: ...

    def resize_quota(self, name: str, quota: int, mounted: bool) -> None: ...

    def materialize(self, name: str, layers: Sequence[str], mounted: bool) -> None:
        """Complete the container's partially copied-up files, charged to its quota
        (``update --materialize``); only a driver that copies up by range has any."""

    def mount(self, name: str, layers: Sequence[str], read_only: bool,
              target: Path | None) -> Mounted: ...

    def unmount(self, name: str, target: Path | None, force: bool = False) -> None:
        """Unmount the container (``target``: where it was mounted, when not in its own
        directory). While a process still uses the mount this is a ``ConflictError`` (busy),
        unless ``force``: then the mount is detached (MNT_DETACH), gone for new opens at once
        and kept by the kernel for the files still open until they close."""

    def broken(self, name: str) -> str | None:
        """Why the container's recorded mount no longer serves (a fuse server that died
        leaves ENOTCONN behind), or None: ``ps`` shows it broken, and unmounting or mounting
        it again clears the dead mount."""

    def serving_fd(self, name: str) -> int | None:
        """A new descriptor that turns readable when the container's mount stops being
        served (the pidfd of a fuse server), for the daemon to remount it by; None where no
        process serves the mount, or none is alive. The caller closes it."""

    def usage(self, name: str) -> Usage: ...

    def usages(self, names: Sequence[str]) -> dict[str, Usage]:
        """``usage`` of many containers at once: a driver whose numbers come from one command
        for the whole filesystem (qgroups, ZFS properties) answers ``ps`` with one call."""

    def remove_container(self, name: str) -> None:
        """Remove the container, mounted by nobody now. What a mount that a forced umount
        detached still holds (a loop quota's filesystem, a ZFS dataset) is not waited for:
        it is recorded as a removal to finish (``removals``) and the name is free at once."""

    def removals(self) -> dict[str, str | None]:
        """Removals left to finish, by key: what still holds each (in words), or None where
        it can be finished now (``imaged check`` reports those). Changes nothing."""

    def finish_removal(self, key: str) -> None:
        """Finish one (garbage collection, ``check --repair``): a ConflictError saying what
        holds it while something still does."""

    def list_containers(self) -> set[str]: ...

    def check(self, layers: Set[str]) -> list[Finding]:
        """Problems only this driver can see in its own bookkeeping (``imaged check``), given
        the keys of the layers the metadata records as ready; none by default."""

    def repair(self, finding: Finding) -> None:
        """Repair one of the findings ``check`` returned, raising an ImagedError when it
        cannot."""


ProbeFn = Callable[[Config], Probe]
Factory = Callable[[Config, Path], Driver]


def registry() -> dict[str, tuple[ProbeFn, Factory]]:
    """Every driver of DESIGN §3, in auto-selection order after the root-filesystem rule."""
    from imaged.drivers import (  # noqa: PLC0415 - they import this module
        aufs,
        btrfs,
        devmapper,
        fuse,
        overlay,
        vfs,
        zfs,
    )

    return {
        "btrfs": (btrfs.probe, btrfs.BtrfsDriver),
        "zfs": (zfs.probe, zfs.ZfsDriver),
        "overlay": (overlay.probe, overlay.OverlayDriver),
        "aufs": (aufs.probe, aufs.AufsDriver),
        "devmapper": (devmapper.probe, devmapper.DevmapperDriver),
        "fuse": (fuse.probe, fuse.FuseDriver),
        "vfs": (vfs.probe, vfs.VfsDriver),
    }


def probe_all(config: Config) -> list[Probe]:
    return [probe(config) for probe, _ in registry().values()]


def loop_usage(fs: loopquota.LoopFS) -> Usage:
    """Usage of a container's quota filesystem, mounting it for the moment if it is not."""
    mounted = is_mounted(fs.mount_point)
    if not mounted:
        loopquota.mount(fs)
    try:
        space = loopquota.usage(fs)
    finally:
        if not mounted:
            loopquota.unmount(fs)
    return Usage(space.used, space.capacity, space.inodes_used, space.inodes)


# The root's filesystem type (as /proc/self/mountinfo names it) that picks a driver by itself.
_ROOT_FSTYPES = {"btrfs": ("btrfs",), "zfs": ("zfs", "fuse.zfs")}  # fuse.zfs: zfs-fuse


def choose(config: Config, root_fstype: str, recorded: str | None) -> str:
    """The driver for a root: the recorded one, else the configured one, else DESIGN's order.

    Auto-selection: a btrfs root → btrfs, a ZFS dataset → zfs, else overlay, fuse, vfs; the
    first that is supported here wins.
    """
    drivers = registry()
    if recorded is not None:
        if config.driver is not None and config.driver != recorded:
            raise ConflictError(f"root {config.root} uses the {recorded} driver (recorded at "
                                f"first use); it cannot be used with {config.driver}")
        return recorded
    if config.driver is not None:
        result = drivers[config.driver][0](config)
        if not result.supported:
            raise InvalidError(f"driver {config.driver} cannot be used here: {result.reason}")
        return config.driver
    order = [name for name, fstypes in _ROOT_FSTYPES.items() if root_fstype in fstypes]
    order += ["overlay", "fuse", "vfs"]
    for name in order:
        if drivers[name][0](config).supported:
            return name
    raise InvalidError("no storage driver is usable on this host (see imaged info)")
