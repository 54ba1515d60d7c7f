"""The zfs driver: every layer a dataset cloned from its parent layer's snapshot, every
container a clone of its image's top layer, so layers and containers cost metadata only and
everything unchanged is shared in the pool.

Layout, under a parent dataset ``P`` (``[drivers.zfs] dataset``; by default the dataset the root
is on, as Docker's zfs driver does) and the driver's home ``ROOT/drivers/zfs``::

    P/layers/<chainid>        a clone of the parent layer's ``@layer`` snapshot (a new dataset
                              for a base layer), mounted at ``layers/<chainid>`` while it is
                              applied; ``@layer`` is taken when it is committed
    P/containers/<name>       a clone of the top layer's ``@layer`` with the container's
                              ``quota`` (``readonly=on`` for a read-only one), mounted at
                              ``containers/<name>/rootfs`` and bind-mounted at ``merged/`` (or
                              the mount's target), as the btrfs driver does

Why the ``zfs`` CLI and not pyzfs: pyzfs binds OpenZFS's libzfs_core, which does not exist
where this project is built and tested (no ZFS kernel module; zfs-fuse has no libzfs_core), and
the CLI is what containerd's and Docker's drivers use. Every call goes through ``zfs()`` /
``zpool()`` below: ``LC_ALL=C``, a timeout, failures mapped to imaged's errors with messages
naming the fix. Numbers come from ``zfs get -H -p`` (zfs-fuse's ``zfs list`` has no ``-p``),
batched: one ``zfs get -r`` answers ``ps`` for every container.

Mountpoints are explicit paths under the root: zfs-fuse cannot mount ``mountpoint=legacy``
datasets, and explicit paths keep everything imaged mounts under its root. Every dataset is
``canmount=noauto`` so ``zfs mount -a`` after a reboot mounts none of them; imaged mounts a
container's dataset when the container is mounted. Committed layers stay unmounted: nothing
reads them except through clones, and 500 mounted layers would be 500 FUSE mounts on zfs-fuse.

Quotas use the clone's ``quota`` (``writable`` semantics): a clone's ``used`` counts only the
blocks it wrote, while ``refquota`` would count the image it shares with its origin.

Destroy ordering: a layer whose snapshot has clones (a child layer, a container) is *refused*
with a ConflictError naming them, never promoted. ``zfs promote`` would move the layer's
snapshot, and with it the blocks imaged is removing, under one of its children, so the pool
would keep space that garbage collection said it freed and the datasets would no longer
mirror the image chains. Callers remove children first (pulls undo top-down; gc and recovery
take containers, then layers newest first), so a refusal names a real dependency.

A layer being applied has no ``@layer`` snapshot yet; it is not given an in-progress name to be
renamed at commit because zfs-fuse cannot rename filesystems ("dataset is busy", mounted or
not). Its metadata row is ``creating`` before its dataset exists, so recovery removes it after
a crash, and a dataset with no row at all is removed as unrecorded.

A container removed while a bind of it that a forced umount detached still serves open files
keeps its dataset until they close: ``zfs destroy`` would call it busy, and on zfs-fuse an
attempt (or a ``zfs umount``) while it is held left the dataset busy for good in a trial here.
So nothing is asked of ZFS while a process has a file on it (``imaged.host.mounts.users``);
``removed/<name>`` records the removal, the name stays taken (the dataset has it: zfs-fuse
cannot rename a busy one), and garbage collection destroys it once nothing holds it.

zfs-fuse stores no xattrs unless started with ``--enable-xattr``; the probe tries one on the
parent dataset when it is mounted and reports what it found.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

from imaged import tools
from imaged.config import Config
from imaged.drivers import Capabilities, Finding, Mounted, Probe, QuotaMode, Usage
from imaged.drivers.base import BaseDriver
from imaged.errors import ConflictError, ImagedError, InternalError, InvalidError
from imaged.host.mounts import (
    MountSpec,
    backing_filesystem,
    bind_mount,
    is_mounted,
    kernel_filesystems,
    users,
)
from imaged.layers.unpack import WhiteoutMode
from imaged.sizes import shrink_refused

ZFS_TIMEOUT = 120.0
BUSY_WAIT = 5.0
SNAPSHOT = "layer"  # a committed layer's snapshot: <dataset>@layer
SYNC_PROPERTY = "imaged:sync"  # a user property never set: clearing it syncs the pool
ZFS_FSTYPES = ("zfs", "fuse.zfs")  # /proc/self/mountinfo: OpenZFS, zfs-fuse
# Dataset names are at most 255 bytes; a container's is P/containers/<name up to 128>.
MAX_PARENT_LENGTH = 255 - len("/containers/") - 128
_COMPONENT = re.compile(r"[A-Za-z0-9_.:-]+")
_DAEMON_DOWN = ("zfs-fuse daemon is running", "failed to initialize ZFS library",
                "Connection reset by peer", "modules are not loaded", "/dev/zfs")
_EXAMPLE = 'set [drivers.zfs] dataset = "pool/imaged" in the config file'


class ZfsError(InternalError):
    """A ``zfs``/``zpool`` command failed; ``kind`` says how (see ``classify``)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def classify(stderr: str) -> str:
    """What a failed command's (``LC_ALL=C``) message means: ``missing`` (no such dataset),
    ``no-pool``, ``daemon`` (no ZFS to talk to), ``exists``, ``clones`` (a destroy refused for
    dependent clones), ``busy`` or ``other``."""
    if any(text in stderr for text in _DAEMON_DOWN):
        return "daemon"
    for text, kind in (("dataset does not exist", "missing"), ("no such pool", "no-pool"),
                       ("already exists", "exists"), ("dependent clones", "clones"),
                       ("is busy", "busy")):
        if text in stderr:
            return kind
    return "other"


def _error(command: list[str], code: int, stderr: str) -> ZfsError:
    kind = classify(stderr)
    detail = stderr.strip().replace("\n", "; ")
    if kind == "daemon":
        return ZfsError(f"ZFS is not running here ({detail}): start the zfs-fuse daemon "
                        "(`zfs-fuse`, or `systemctl start zfs-fuse`) or load OpenZFS", kind)
    return ZfsError(f"{' '.join(command)} failed (exit {code}): {detail}", kind)


def _run_once(command: list[str]) -> subprocess.CompletedProcess[str]:
    return tools.completed(command, timeout=ZFS_TIMEOUT,
                           missing=functools.partial(ZfsError, kind="daemon"),
                           provides="install zfs-fuse (apt-get install zfs-fuse) or OpenZFS")


def _run(command: list[str]) -> str:
    """Run a command; "busy" is retried for a while, since zfs-fuse reports a dataset busy for
    a moment after its last file was closed (FUSE releases files asynchronously)."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        proc = _run_once(command)
        if proc.returncode == 0:
            return proc.stdout
        error = _error(command, proc.returncode, proc.stderr)
        if error.kind != "busy" or time.monotonic() > deadline:
            raise error
        time.sleep(0.1)


def zfs(*args: str) -> str:
    return _run(["zfs", *args])


def zpool(*args: str) -> str:
    return _run(["zpool", *args])


def parse_get(text: str) -> dict[str, dict[str, str]]:
    """``zfs get -H -p -o name,property,value`` output → {dataset: {property: value}}."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        name, prop, value = line.split("\t")
        out.setdefault(name, {})[prop] = value
    return out


def get(names: Sequence[str], props: Sequence[str], depth: int | None = None
        ) -> dict[str, dict[str, str]]:
    """Properties of datasets (and of their descendants to ``depth``) in one command."""
    recurse = [] if depth is None else ["-r", "-d", str(depth)]
    return parse_get(zfs("get", "-H", "-p", "-o", "name,property,value", *recurse,
                         ",".join(props), *names))


def children(name: str) -> list[str]:
    """The datasets directly below ``name`` (not snapshots)."""
    return [line for line in zfs("list", "-H", "-o", "name", "-t", "filesystem", "-r",
                                 "-d", "1", name).splitlines() if line != name]


def quota_value(value: str) -> int | None:
    """A ``quota`` as ``zfs get -p`` prints it: ``0`` (or ``none``, ``-``) means no quota."""
    return None if value in ("0", "none", "-") else int(value)


def dependents(origins: Mapping[str, str], dataset: str) -> list[str]:
    """The datasets cloned from a snapshot of ``dataset``, given every dataset's ``origin``:
    what destroying ``dataset`` would orphan."""
    return sorted(name for name, origin in origins.items()
                  if origin.partition("@")[0] == dataset)


def check_dataset_name(name: str) -> None:
    """ZFS's rules for a parent dataset, plus room below it for imaged's own names."""
    fix = f"; {_EXAMPLE} with a valid name"
    components = name.split("/")
    if not all(components):
        raise InvalidError(f"invalid ZFS dataset name {name!r}: empty component (a leading, "
                           f"trailing or double '/'){fix}")
    for part in components:
        if part in (".", ".."):
            raise InvalidError(f"invalid ZFS dataset name {name!r}: {part!r} is not a name{fix}")
        if not _COMPONENT.fullmatch(part):
            raise InvalidError(f"invalid ZFS dataset name {name!r}: {part!r} may hold only "
                               f"letters, digits and _ . : -{fix}")
    if not name[0].isalpha():
        raise InvalidError(f"invalid ZFS dataset name {name!r}: a pool name starts with a "
                           f"letter{fix}")
    if len(name) > MAX_PARENT_LENGTH:
        raise InvalidError(f"ZFS dataset name {name!r} is {len(name)} characters: at most "
                           f"{MAX_PARENT_LENGTH} leave room for imaged's datasets below it{fix}")


def parent_dataset(config: Config) -> str:
    """The configured parent dataset, else the dataset the root is on; checked, not created."""
    dataset = config.drivers.get("zfs", {}).get("dataset")
    if dataset is None:
        backing = backing_filesystem(config.root)
        if backing.fstype not in ZFS_FSTYPES:
            raise InvalidError(f"no ZFS dataset to use: {_EXAMPLE} (an existing dataset "
                               "imaged creates its datasets under), or put the root on ZFS")
        dataset = backing.source
    check_dataset_name(dataset)
    return str(dataset)


def _check_exists(dataset: str) -> dict[str, str]:
    """The parent's type, mountpoint and mounted state; a missing one names the fix."""
    try:
        props = get([dataset], ["type", "mountpoint", "mounted"])[dataset]
    except ZfsError as exc:
        if exc.kind != "missing":
            raise
        pool = dataset.partition("/")[0]
        try:
            zpool("list", "-H", "-o", "name", pool)
        except ZfsError as pool_exc:
            if pool_exc.kind != "no-pool":
                raise
            raise InvalidError(f"ZFS pool {pool} does not exist: create it (zpool create "
                               f"{pool} DEVICE) or import it (zpool import {pool}), or change "
                               "[drivers.zfs] dataset") from None
        raise InvalidError(f"ZFS dataset {dataset} does not exist: create it with `zfs create "
                           f"{dataset}` or change [drivers.zfs] dataset") from None
    if props["type"] != "filesystem":
        raise InvalidError(f"{dataset} is a ZFS {props['type']}, not a filesystem: set "
                           "[drivers.zfs] dataset to a filesystem dataset")
    return props


def xattr_support(props: Mapping[str, str]) -> tuple[bool, str]:
    """Whether the parent dataset stores xattrs, tried on a scratch file when it is mounted.

    Unmounted, the implementation decides: OpenZFS (a kernel module) stores them, zfs-fuse
    only when started with ``--enable-xattr``, which is not its default."""
    if props["mounted"] != "yes":
        if "zfs" in kernel_filesystems():
            return True, "xattrs (OpenZFS)"
        return False, ("no xattrs: zfs-fuse stores none unless started with --enable-xattr "
                       "(not checked: the parent dataset is not mounted)")
    scratch = Path(props["mountpoint"]) / f".imaged-xattr-probe-{secrets.token_hex(8)}"
    try:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return False, f"no xattrs assumed: cannot check on {scratch.parent}: {exc.strerror}"
    try:
        os.setxattr(fd, "user.imaged.probe", b"1")
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        return False, ("no xattrs: setxattr on the dataset fails with EOPNOTSUPP (zfs-fuse "
                       "stores none unless started with --enable-xattr); layers' xattrs are "
                       "dropped and counted")
    finally:
        os.close(fd)
        scratch.unlink()
    return True, "xattrs"


@dataclass(frozen=True)
class Parent:
    dataset: str
    xattrs: bool
    xattr_note: str


def open_parent(config: Config) -> Parent:
    dataset = parent_dataset(config)
    props = _check_exists(dataset)
    return Parent(dataset, *xattr_support(props))


def capabilities(xattrs: bool) -> Capabilities:
    return Capabilities("snapshot", WhiteoutMode.DELETE, QuotaMode.DATASET, "writable",
                        rename_lower_dirs=True, xattrs=xattrs)


def probe(config: Config) -> Probe:
    try:
        parent = open_parent(config)
    except ImagedError as exc:
        return Probe("zfs", False, exc.message)
    return Probe("zfs", True, f"ZFS dataset {parent.dataset}: layers and containers are "
                 f"clones of snapshots; quota mode quota (the clone's own writes); "
                 f"{parent.xattr_note}", capabilities(parent.xattrs))


class ZfsDriver(BaseDriver):
    name = "zfs"

    def __init__(self, config: Config, home: Path) -> None:
        self.parent = open_parent(config)
        super().__init__(config, home)
        existing = set(children(self.parent.dataset))
        for sub in ("layers", "containers"):
            if f"{self.parent.dataset}/{sub}" not in existing:
                zfs("create", "-o", "mountpoint=none", f"{self.parent.dataset}/{sub}")

    def capabilities(self) -> Capabilities:
        return capabilities(self.parent.xattrs)

    def _dataset(self, kind: str, name: str) -> str:
        return f"{self.parent.dataset}/{kind}/{name}"

    def _names(self, kind: str) -> set[str]:
        """Datasets of a kind, and directories left where one was (a crash between destroy
        and rmdir), so recovery sees both."""
        prefix = f"{self.parent.dataset}/{kind}/"
        datasets = {name.removeprefix(prefix) for name in children(prefix.rstrip("/"))}
        return datasets | {p.name for p in (self.home / kind).iterdir()}

    def _create(self, dataset: str, origin: str | None, mountpoint: Path,
                *options: str) -> None:
        """A dataset (a clone of ``origin`` if given), ``canmount=noauto``; mounted (zfs-fuse
        mounts new clones by itself, OpenZFS does not) when ``mount`` says so."""
        opts = [arg for option in (f"mountpoint={mountpoint}", "canmount=noauto", *options)
                for arg in ("-o", option)]
        if origin is None:
            zfs("create", *opts, dataset)
        else:
            zfs("clone", *opts, origin, dataset)

    def _mount(self, dataset: str, mountpoint: Path) -> None:
        if not is_mounted(mountpoint):
            zfs("mount", dataset)

    def _umount(self, dataset: str, mountpoint: Path) -> None:
        if is_mounted(mountpoint):
            zfs("umount", dataset)

    def _destroy(self, dataset: str) -> None:
        """Destroy a dataset and its snapshots; a missing one is done. A dataset others are
        cloned from is refused by ZFS itself (no ``-R``): say which ones depend on it."""
        try:
            zfs("destroy", "-r", dataset)
        except ZfsError as exc:
            if exc.kind == "missing":
                return
            clones = self._clones(dataset)
            if not clones:
                raise
            raise ConflictError(f"{dataset} cannot be destroyed: cloned from it: "
                                f"{', '.join(clones)}; remove those first (imaged refuses "
                                "rather than promote them)") from None

    def _clones(self, dataset: str) -> list[str]:
        origins = {name: props["origin"] for name, props in
                   get([self.parent.dataset], ["origin"], depth=2).items()}
        return dependents(origins, dataset)

    # layers

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        dataset, mountpoint = self._dataset("layers", key), self._layer(key)
        origin = None if parent is None else f"{self._dataset('layers', parent)}@{SNAPSHOT}"
        try:
            self._create(dataset, origin, mountpoint)
        except ZfsError as exc:  # a leftover of an attempt that failed: start over
            if exc.kind != "exists":
                raise
            self.remove_layer(key)
            self._create(dataset, origin, mountpoint)
        self._mount(dataset, mountpoint)
        return mountpoint

    def commit_layer(self, key: str) -> None:
        """Unmount, then snapshot: ``@layer`` is what children and containers clone, and
        taking it syncs the pool, so the layer is durable once it exists."""
        dataset = self._dataset("layers", key)
        self._umount(dataset, self._layer(key))
        zfs("snapshot", f"{dataset}@{SNAPSHOT}")

    def remove_layer(self, key: str) -> None:
        self._destroy(self._dataset("layers", key))
        with contextlib.suppress(FileNotFoundError):
            self._layer(key).rmdir()

    def list_layers(self) -> set[str]:
        return self._names("layers")

    @contextlib.contextmanager
    def layer_tree(self, key: str) -> Iterator[Path]:
        """The layer's dataset, mounted for the block as ``prepare_layer`` mounted it (commit
        leaves it unmounted). Nothing has written it since its snapshot was taken, so it
        holds the snapshot's blocks, which children and containers are cloned from."""
        dataset, mountpoint = self._dataset("layers", key), self._layer(key)
        mounted = is_mounted(mountpoint)
        self._mount(dataset, mountpoint)
        try:
            yield mountpoint
        finally:
            if not mounted:
                self._umount(dataset, mountpoint)

    def layer_dependents(self, key: str) -> list[str]:
        """The datasets cloned from the layer's snapshot: ZFS refuses to destroy it under
        them."""
        return self._clones(self._dataset("layers", key))

    def check(self, layers: Set[str]) -> list[Finding]:
        """A ready layer's dataset must have its ``@layer`` snapshot: children and containers
        are cloned from it, so without it the image cannot be mounted again. (A dataset that
        is gone altogether is the store's finding.) One listing of datasets and snapshots
        together: with hundreds of layers each ``zfs list`` costs seconds on zfs-fuse."""
        names = set(zfs("list", "-H", "-o", "name", "-t", "filesystem,snapshot", "-r",
                        f"{self.parent.dataset}/layers").split())
        return [Finding("layer-snapshot-missing", f"sha256:{key}",
                        f"layer sha256:{key} has no snapshot {dataset}@{SNAPSHOT}")
                for key in sorted(layers)
                if (dataset := self._dataset("layers", key)) in names
                and f"{dataset}@{SNAPSHOT}" not in names]

    def repair(self, finding: Finding) -> None:
        """Take the snapshot again: a committed layer's dataset is written by nobody (it stays
        unmounted), so it still holds what was applied."""
        if finding.kind == "layer-snapshot-missing":
            self.commit_layer(finding.subject.removeprefix("sha256:"))
        else:
            super().repair(finding)

    # containers

    def _rootfs(self, name: str) -> Path:
        return self._container(name) / "rootfs"

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None:
        if (self.home / "removed" / name).exists():  # the name's former holder goes first
            if (why := self._holder_of(name)) is not None:
                raise ConflictError(f"container {name} was removed, but {why} holds its "
                                    "dataset: use another name until they close")
            self.remove_container(name)
        self._new_container_home(name)
        options = [f"quota={quota}"] if quota is not None else []
        options += ["readonly=on"] if read_only else []
        origin = f"{self._dataset('layers', layers[-1])}@{SNAPSHOT}" if layers else None
        self._create(self._dataset("containers", name), origin, self._rootfs(name), *options)

    def resize_quota(self, name: str, quota: int, mounted: bool) -> None:
        used = self.usage(name).used
        if (why := shrink_refused(used, quota)) is not None:
            raise InvalidError(f"container {name} {why}")
        zfs("set", f"quota={quota}", self._dataset("containers", name))

    def _mount_at(self, path: Path, name: str, layers: Sequence[str],
                  read_only: bool) -> Mounted:
        rootfs = self._rootfs(name)
        self._mount(self._dataset("containers", name), rootfs)
        bind_mount(rootfs, path, read_only=read_only)
        return Mounted(path, (MountSpec("bind", str(rootfs),
                                        ("bind", "ro" if read_only else "rw")),))

    def unmount(self, name: str, target: Path | None, force: bool = False) -> None:
        """The bind, then the dataset's own mount; forced, the dataset stays mounted under
        the container's directory (files open through the detached bind hold it, and zfs
        umount would call it busy), and the next mount binds it again."""
        super().unmount(name, target, force)
        if not force:
            self._umount(self._dataset("containers", name), self._rootfs(name))

    def usage(self, name: str) -> Usage:
        return self.usages([name])[name]

    def usages(self, names: Sequence[str]) -> dict[str, Usage]:
        """Every container's ``used`` and ``quota`` from one ``zfs get``; a container whose
        dataset is gone (being removed) uses nothing.

        ``used`` counts what the last synced transaction group holds, and zfs-fuse syncs one
        every 30 s or so: a write a moment ago would be missing. Clearing a property (one
        nobody sets) is a sync task, which waits for the open group to sync first; zfs-fuse
        has no ``zpool sync``. One command for the sync, one for the numbers, however many
        containers there are."""
        if not names:
            return {}
        containers = f"{self.parent.dataset}/containers"
        zfs("inherit", SYNC_PROPERTY, containers)
        props = get([containers], ["used", "quota"], depth=1)
        found = {name: props.get(self._dataset("containers", name)) for name in names}
        return {name: Usage(0, None) if p is None else Usage(int(p["used"]),
                                                             quota_value(p["quota"]))
                for name, p in found.items()}

    def remove_container(self, name: str) -> None:
        """Unmount, destroy, and remove the directory; while files opened before a forced
        umount still hold the dataset, only record the removal (module docstring)."""
        if self._holder_of(name) is not None:
            removed = self.home / "removed"
            removed.mkdir(exist_ok=True, mode=0o700)
            (removed / name).touch()
            return
        if self._container(name).exists():
            self.unmount(name, None)
        self._destroy(self._dataset("containers", name))
        super().remove_container(name)
        (self.home / "removed" / name).unlink(missing_ok=True)

    def _holder_of(self, name: str) -> str | None:
        rootfs = self._rootfs(name)
        if not is_mounted(rootfs) or not (pids := users(rootfs)):
            return None
        return (f"process {', '.join(map(str, pids))} (files on dataset "
                f"{self._dataset('containers', name)} opened before a forced umount)")

    def _holder(self, entry: Path) -> str | None:
        """``removed/<name>`` is only the record: the dataset and directory keep the name."""
        why = self._holder_of(entry.name)
        return None if why is None else f"{why} holds its dataset"

    def _let_go(self, entry: Path) -> str | None:
        why = self._holder(entry)
        if why is None:
            self.remove_container(entry.name)  # the record goes last
        return why

    def list_containers(self) -> set[str]:
        return self._names("containers") - {entry.name for entry in self._removed()}
