"""The driver on the pool: where its devices are, when they are active, and how a quota becomes a
device size.

Layout. The pool is ``drivers.devmapper.pool`` when configured (an existing thin pool this root
uses alone), else ``imaged-<tag>-pool``, made by imaged on two sparse files bound to autoclear
loop devices (``imaged.host.loopdev``): ``pool/data`` (``data_size``) and ``pool/metadata``
(``metadata_size``). ``<tag>`` is 12 hex digits of the SHA-256 of the driver's home, so two roots
never share a device name. In the pool::

    base                   thin device 0..: a filesystem (``fs``: ext4 or xfs) of ``basesize``
    l-<chainid>            each layer: a snapshot of its parent layer's device (the base's for
                           a base layer), mounted at ``layers/<chainid>`` while it is applied
    c-<name>               each container: a snapshot of its image's top layer, as large as its
                           quota, mounted at ``containers/<name>/merged`` (or its target)
    dead-<id>              a device whose removal the kernel deferred (it was still open)

Every dm device is named ``imaged-<tag>-<that>``; a container name too long for device-mapper's
127 bytes is replaced by a hash. Only devices in use are active: a layer while it is applied,
a container while it is mounted (or measured). A container's filesystem is mounted directly
from ``/dev/mapper/<name>``: that is the mount spec a runtime could replay while it is mounted.

Quotas. A container's device is its quota (rounded up to the pool's 64 KiB blocks) and its
filesystem is grown to fill it (online: ``resize2fs`` on the mounted device, ``xfs_growfs``);
growing a quota reloads the device's table with the larger size and grows the filesystem again.
A quota below the image's device (``basesize``) and any shrinking are refused: neither xfs nor
ext4 can shrink online. Usage is the device size less what the filesystem says is available,
so the image, the filesystem's own metadata and the container's writes all count (``total``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imaged import tools
from imaged.config import Config
from imaged.drivers import Capabilities, Mounted, Probe, QuotaMode, Usage
from imaged.drivers.base import BaseDriver
from imaged.drivers.devmapper.ioctl import (
    DM_ACTIVE_PRESENT_FLAG,
    DM_DEV_RENAME_CMD,
    DmError,
    activate,
    deactivate,
    dm_call,
    dm_list,
    dm_load,
    dm_message,
    dm_resume,
    dm_status,
    dm_suspend,
    dm_table,
    drop_node,
    kernel_support,
    node_path,
)
from imaged.drivers.devmapper.pool import (
    POOL_BLOCK_SECTORS,
    SECTOR,
    PoolStatus,
    allocate_id,
    container_key,
    dev_string,
    device_name,
    device_sectors,
    fill_refusal,
    layer_key,
    parse_pool_status,
    parse_pool_table,
    parse_thin_ls,
    pool_target,
    pool_usage_text,
    root_tag,
    round_up,
    thin_target,
)
from imaged.drivers.devmapper.records import Record, Records, reconcile
from imaged.errors import ConflictError, InternalError, InvalidError, QuotaUnsupportedError
from imaged.host import loopdev
from imaged.host.mounts import MountSpec, mount_with_fsconfig, mountinfo, unmount
from imaged.layers.unpack import WhiteoutMode
from imaged.sizes import format_size

log = logging.getLogger("imaged.drivers.devmapper")

XFS_MIN_SIZE = 300 << 20  # mkfs.xfs refuses smaller filesystems
_TOOL_TIMEOUT = 600.0


@dataclass(frozen=True)
class Options:
    """The ``drivers.devmapper`` keys (DESIGN §4), checked by imaged.config, with defaults."""

    pool: str | None = None  # an existing thin pool; None: imaged makes one on loop files
    data_size: int = 100 << 30
    metadata_size: int = 1 << 30
    basesize: int = 10 << 30
    fs: str = "ext4"
    fill_threshold: float = 0.9

    @classmethod
    def of(cls, config: Config) -> Options:
        return cls(**config.drivers.get("devmapper", {}))


def pool_state(name: str) -> tuple[PoolStatus, int] | None:
    """The pool's status and data block size in sectors; None if it has no live table."""
    header = dm_status(name)
    if header is None or not header.flags & DM_ACTIVE_PRESENT_FLAG:
        return None
    table, status = dm_table(name, table=True), dm_table(name)
    if len(table) != 1 or table[0].type != "thin-pool":
        raise InvalidError(f"device {name} is not a thin pool: "
                           f"{'; '.join(t.line() for t in table)}")
    return parse_pool_status(status[0].params), parse_pool_table(table[0].params)[2]


# -- filesystems and tools -----------------------------------------------------------------------


def _run(argv: list[str], timeout: float = _TOOL_TIMEOUT) -> str:
    return tools.run(argv, timeout=timeout, provides="e2fsprogs, xfsprogs or "
                     "thin-provisioning-tools (scripts/setup installs them)")


def mkfs_command(fs: str, device: Path) -> list[str]:
    """The base filesystem. ext4: 4 KiB blocks whatever the size (mke2fs would pick 1 KiB for a
    small one), no root reserve (containers write as root), 16 KiB per inode, remount read-only
    on errors, and nothing zeroed or discarded: a new thin device reads as zeros and has
    nothing to discard. xfs: no discard either."""
    if fs == "xfs":
        return ["mkfs.xfs", "-q", "-f", "-K", str(device)]
    return ["mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-i", "16384", "-e", "remount-ro",
            "-E", "nodiscard,assume_storage_prezeroed=1", str(device)]


def mount_options(fs: str, read_only: bool, discard: bool = False) -> tuple[str, ...]:
    """xfs refuses a second mount of a filesystem with the same UUID, and every snapshot has the
    base's: ``nouuid``. ``ro`` makes the superblock read-only (a read-only device needs it);
    containers mount with ``discard`` so deleted files give their blocks back to the pool."""
    return (("nouuid",) if fs == "xfs" else ()) + (("ro",) if read_only else ()) + \
        (("discard",) if discard and not read_only else ())


def grow_command(fs: str, device: Path, mount_point: Path) -> list[str]:
    """Grow a mounted filesystem to its device's size (ext4 online needs CAP_SYS_RESOURCE)."""
    if fs == "xfs":
        return ["xfs_growfs", str(mount_point)]
    return ["resize2fs", str(device)]


def _block_node(dev: str) -> Path | None:
    """A node for the block device ``major:minor``: its kernel name under /dev."""
    try:
        node = Path("/dev") / Path(os.readlink(f"/sys/dev/block/{dev}")).name
    except OSError:
        return None
    return node if node.exists() else None


# -- probe ---------------------------------------------------------------------------------------


def capabilities() -> Capabilities:
    return Capabilities("snapshot", WhiteoutMode.DELETE, QuotaMode.DEVICE, "total",
                        rename_lower_dirs=True, xattrs=True)


def pool_name(options: Options, home: Path) -> str:
    return options.pool or device_name(root_tag(home), "pool")


def config_problem(options: Options) -> str | None:
    if options.fs == "xfs" and options.basesize < XFS_MIN_SIZE:
        return (f"drivers.devmapper.basesize {format_size(options.basesize)} is below "
                f"mkfs.xfs's minimum of {format_size(XFS_MIN_SIZE)}: raise it or use ext4")
    return None


def probe(config: Config) -> Probe:
    missing = kernel_support()
    if missing is not None:
        return Probe("devmapper", False, f"device-mapper not in this kernel ({missing})")
    options = Options.of(config)
    problem = config_problem(options)
    if problem is not None:
        return Probe("devmapper", False, problem)
    pool = pool_name(options, config.root / "drivers" / "devmapper")
    state = pool_state(pool)
    if state is not None:
        where = f"thin pool {pool}: {pool_usage_text(*state)}"
    elif options.pool:
        return Probe("devmapper", False, f"the thin pool {pool} (drivers.devmapper.pool) is "
                     "not active: create it, or drop the key to let imaged make one")
    else:
        where = (f"thin pool {pool} to be made on first use on sparse loop files (data "
                 f"{format_size(options.data_size)}, metadata "
                 f"{format_size(options.metadata_size)})")
    return Probe("devmapper", True, f"{where}; each image on an {options.fs} of "
                 f"{format_size(options.basesize)}, quota = device size", capabilities())


# -- the driver ----------------------------------------------------------------------------------


class DevmapperDriver(BaseDriver):
    name = "devmapper"

    def __init__(self, config: Config, home: Path) -> None:
        super().__init__(config, home)
        self.options = Options.of(config)
        problem = config_problem(self.options)
        if problem is not None:
            raise InvalidError(problem)
        self.tag = root_tag(home)
        self.pool = pool_name(self.options, home)
        self.recovered: list[str] = []  # what the start repaired or found, also logged
        self._lock = threading.RLock()  # pool changes and their records, one at a time
        self.records = Records(home / "devices.db")
        try:
            self._start_pool()
            header = dm_status(self.pool)
            assert header is not None  # noqa: S101 - _start_pool made it or raised
            self.pool_dev = dev_string(header.dev)
            self.block_sectors = self._pool_state()[1]
            self._reconcile()
        except BaseException:
            self.records.close()
            raise

    def capabilities(self) -> Capabilities:
        return capabilities()

    # the pool

    def _start_pool(self) -> None:
        """Use the pool if it is active; else (first use, or after a reboot) bind its files to
        loop devices and load it, which formats a zeroed metadata file or opens the pool in it.
        A configured pool is never made here."""
        if pool_state(self.pool) is not None:
            return
        if self.options.pool:
            raise InvalidError(f"the thin pool {self.pool} (drivers.devmapper.pool) is not "
                               "active: create it, or drop the key to let imaged make one")
        files = self.home / "pool"
        files.mkdir(exist_ok=True, mode=0o700)
        for name, size in (("data", self.options.data_size),
                           ("metadata", self.options.metadata_size)):
            if not (files / name).exists():
                with (files / name).open("wb") as f:
                    f.truncate(round_up(size, POOL_BLOCK_SECTORS * SECTOR))
        data_sectors = (files / "data").stat().st_size // SECTOR
        data_sectors -= data_sectors % POOL_BLOCK_SECTORS
        # Our descriptors keep the autoclear loop devices bound until the pool holds them.
        with loopdev.attach(files / "metadata") as metadata, \
                loopdev.attach(files / "data") as data:
            activate(self.pool, [pool_target(data_sectors, str(metadata.device.path),
                                             str(data.device.path))])

    def _pool_state(self) -> tuple[PoolStatus, int]:
        state = pool_state(self.pool)
        if state is None:
            raise InternalError(f"the thin pool {self.pool} is gone")
        return state

    def _check_room(self) -> None:
        status, block_sectors = self._pool_state()
        refusal = fill_refusal(self.pool, status, block_sectors, self.options.fill_threshold)
        if refusal is not None:
            raise ConflictError(refusal)

    def _change_pool(self, message: str) -> None:
        """A create or delete message, then the pool's transaction id moved to the records'
        next value, then that value recorded: equal transaction ids mean nothing happened to
        the pool that the records do not know."""
        dm_message(self.pool, message)
        current = self.records.counter("transaction_id")
        dm_message(self.pool, f"set_transaction_id {current} {current + 1}")
        self.records.set_counter("transaction_id", current + 1)

    def _delete_id(self, thin_id: int) -> None:
        """Delete a thin id from the pool; one the pool does not have is gone already."""
        try:
            self._change_pool(f"delete {thin_id}")
        except DmError as exc:
            if exc.errno != errno.ENODATA:
                raise

    def _new_device(self, key: str, origin: Record | None, sectors: int,
                    quota: int | None = None, read_only: bool = False,
                    state: str = "ready") -> Record:
        """Intent first: the id is recorded ``creating``; then made (a thin device, or a
        snapshot of ``origin``, suspended while it is taken if it is active); then recorded as
        ``state``."""
        with self._lock:
            self._check_room()
            thin_id = allocate_id(self.records.counter("next_id"), self.records.ids())
            with self.records.transaction():
                self.records.set_counter("next_id", thin_id + 1)
                self.records.put(Record(key, thin_id, "creating", sectors, quota, read_only))
            if origin is None:
                self._change_pool(f"create_thin {thin_id}")
            else:
                with self._suspended(device_name(self.tag, origin.key)):
                    self._change_pool(f"create_snap {thin_id} {origin.id}")
            made = Record(key, thin_id, state, sectors, quota, read_only)
            self.records.put(made)
            return made

    @contextlib.contextmanager
    def _suspended(self, name: str) -> Iterator[None]:
        header = dm_status(name)
        if header is None or not header.flags & DM_ACTIVE_PRESENT_FLAG:
            yield
            return
        dm_suspend(name)
        try:
            yield
        finally:
            dm_resume(name)

    def _activate(self, record: Record) -> Path:
        return activate(device_name(self.tag, record.key),
                        [thin_target(record.sectors, self.pool_dev, record.id)],
                        read_only=record.read_only)

    def _mounts_of(self, name: str) -> list[Path]:
        """Where the device ``name`` is mounted in this namespace, newest first."""
        header = dm_status(name)
        if header is None:
            return []
        number = (os.major(header.dev), os.minor(header.dev))
        return [Path(m.mount_point) for m in reversed(mountinfo())
                if (m.major, m.minor) == number]

    def _remove_device(self, key: str) -> None:
        """Deactivate and delete a device (its mounts are gone already). One still open (a
        mount in another namespace, a process holding its node) is renamed ``dead-<id>``, so
        its name can be used again, and left for the kernel to remove at its last close; a
        later start deletes its id."""
        with self._lock:
            record = self.records.get(key)
            if record is None:
                return
            self.records.put(Record(key, record.id, "removing", record.sectors, record.quota,
                                    record.read_only))
            name = device_name(self.tag, key)
            try:
                gone = deactivate(name)
            except DmError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                gone = False
            if not gone:
                if not key.startswith("dead/"):
                    dead = f"dead/{record.id}"
                    dm_call(DM_DEV_RENAME_CMD, name, device_name(self.tag, dead).encode() + b"\0")
                    drop_node(name)
                    self.records.rekey(key, dead)
                    key, name = dead, device_name(self.tag, dead)
                if not deactivate(name, deferred=True):
                    log.warning("device %s is still open: the kernel removes it at its last "
                                "close, and a later start deletes thin id %d", name, record.id)
                    return
            self._delete_id(record.id)
            self.records.drop(key)

    def _reconcile(self) -> None:
        """Undo ``creating`` records, finish removals, and when the pool's transaction id is not
        the records', delete ids no record knows and report records the pool lacks."""
        with self._lock:
            status = self._pool_state()[0]
            pool_ids = None
            if status.transaction_id != self.records.counter("transaction_id"):
                pool_ids = self._pool_ids()
                # From here on the pool's value is the one to move from.
                self.records.set_counter("transaction_id", status.transaction_id)
            plan = reconcile(self.records.all(), pool_ids)
            for record in plan.undo:
                name = device_name(self.tag, record.key)
                for where in self._mounts_of(name):
                    unmount(where)
                deactivate(name)
                self._delete_id(record.id)
                self.records.drop(record.key)
                self._note(f"removed thin device {record.id} ({name}): it was left half-made")
            for record in plan.finish:
                self._remove_device(record.key)
                if record.id not in self.records.ids():
                    self._note(f"finished removing thin device {record.id}")
            for thin_id in plan.strays:
                self._delete_id(thin_id)
                self._note(f"deleted thin device {thin_id}: in the pool {self.pool} but in no "
                           "record")
            for record in plan.missing:
                self._note(f"thin device {record.id} ({record.key}) is recorded but missing "
                           f"from the pool {self.pool}: remove what uses it", warn=True)

    def _note(self, text: str, warn: bool = False) -> None:
        self.recovered.append(text)
        (log.warning if warn else log.info)("recovery: %s", text)

    def _pool_ids(self) -> set[int] | None:
        """Every thin id in the pool, read by ``thin_ls`` from a metadata snapshot (the live
        metadata changes under a reader); None, reported, when that cannot be done."""
        metadata_dev = parse_pool_table(dm_table(self.pool, table=True)[0].params)[0]
        node = _block_node(metadata_dev)
        if node is None or shutil.which("thin_ls") is None:
            self._note(f"cannot list the devices of thin pool {self.pool} (thin_ls, from "
                       "thin-provisioning-tools, and a node for its metadata device are "
                       "needed): devices no record knows stay", warn=True)
            return None
        with contextlib.suppress(DmError):  # one left reserved by a crash
            dm_message(self.pool, "release_metadata_snap")
        dm_message(self.pool, "reserve_metadata_snap")
        try:
            return parse_thin_ls(_run(["thin_ls", "--metadata-snap", "--no-headers",
                                       "-o", "DEV", str(node)]))
        finally:
            dm_message(self.pool, "release_metadata_snap")

    @contextlib.contextmanager
    def _mounted(self, record: Record, where: Path, read_only: bool) -> Iterator[Path]:
        """The device activated and its filesystem mounted at ``where`` for the block; both
        undone after it, failing or not."""
        name = device_name(self.tag, record.key)
        where.mkdir(exist_ok=True)
        try:
            device = self._activate(record)
            try:
                mount_with_fsconfig(MountSpec(self.options.fs, str(device),
                                              mount_options(self.options.fs, read_only)), where)
                try:
                    yield device
                finally:
                    unmount(where)
            finally:
                _deactivate_unless_held(name)
        finally:
            where.rmdir()

    # the base device

    def _base(self) -> Record:
        """The base thin device with its filesystem, made on first use (``creating`` until its
        filesystem is made, so a crash in mkfs is undone at the next start)."""
        with self._lock:
            base = self.records.get("base")
            if base is not None:
                return base
            base = self._new_device("base", None, device_sectors(self.options.basesize),
                                    state="creating")
            device = self._activate(base)
            try:
                _run(mkfs_command(self.options.fs, device))
            finally:
                deactivate(device_name(self.tag, "base"))
            where = self.home / "layers" / ".base"
            with self._mounted(base, where, read_only=False):
                with contextlib.suppress(FileNotFoundError):  # it would show in every rootfs
                    (where / "lost+found").rmdir()
                where.chmod(0o755)
            ready = Record("base", base.id, "ready", base.sectors)
            self.records.put(ready)
            return ready

    # layers

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        if self.records.get(layer_key(key)) is not None:
            self.remove_layer(key)
        origin = self._base() if parent is None else self.records.get(layer_key(parent))
        if origin is None or origin.state != "ready":
            raise InternalError(f"parent layer {parent} has no thin device")
        record = self._new_device(layer_key(key), origin, origin.sectors)
        target = self._layer(key)
        target.mkdir(exist_ok=True, mode=0o755)
        device = self._activate(record)
        mount_with_fsconfig(MountSpec(self.options.fs, str(device),
                                      mount_options(self.options.fs, False)), target)
        return target

    def commit_layer(self, key: str) -> None:
        """Unmount (its filesystem is clean from now on: snapshots of it need no recovery) and
        deactivate; the empty directory stays as the layer's mark under ``layers/``."""
        unmount(self._layer(key))
        deactivate(device_name(self.tag, layer_key(key)))

    def remove_layer(self, key: str) -> None:
        unmount(self._layer(key))
        self._remove_device(layer_key(key))
        with contextlib.suppress(FileNotFoundError):
            self._layer(key).rmdir()

    def list_layers(self) -> set[str]:
        return {record.key[2:] for record in self.records.with_prefix("l/")}

    @contextlib.contextmanager
    def layer_tree(self, key: str) -> Iterator[Path]:
        """The layer's thin device, activated and its filesystem mounted read-only for the
        block beside the layer's mark (a read-only mount of a clean filesystem writes
        nothing), as ``usage`` measures an unmounted container."""
        record = self.records.get(layer_key(key))
        if record is None or record.state != "ready":
            raise InternalError(f"layer {key} has no thin device")
        where = self.home / "layers" / f".tree-{key}"
        with self._mounted(record, where, read_only=True):
            yield where

    def layer_paths(self, key: str) -> list[Path]:
        """Nothing: a layer's bytes are blocks in the pool, not files under the root."""
        return []

    # containers

    def _record(self, name: str) -> Record:
        record = self.records.get(container_key(name))
        if record is None or record.state != "ready":
            raise InternalError(f"container {name} has no thin device")
        return record

    def _grow(self, record: Record) -> None:
        """Grow the container's filesystem to its device, mounted where it is or for now."""
        name = device_name(self.tag, record.key)
        with contextlib.ExitStack() as stack:
            mounted = self._mounts_of(name)
            if mounted:
                device, where = node_path(name), mounted[0]
            else:
                where = self._container(record.key[2:]) / ".grow"
                device = stack.enter_context(self._mounted(record, where, read_only=False))
            try:
                _run(grow_command(self.options.fs, device, where))
            except InternalError as exc:
                raise QuotaUnsupportedError(
                    f"growing container {record.key[2:]}'s {self.options.fs} filesystem to "
                    f"{format_size(record.sectors * SECTOR)} failed ({exc}); ext4 grows "
                    "online only with CAP_SYS_RESOURCE") from exc

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None:
        if read_only and not layers:
            raise InvalidError("an image without layers cannot be mounted read-only")
        origin = self.records.get(layer_key(layers[-1])) if layers else self._base()
        if origin is None:
            raise InternalError(f"layer {layers[-1]} has no thin device")
        sectors = origin.sectors if quota is None else device_sectors(quota)
        if sectors < origin.sectors:
            minimum = format_size(origin.sectors * SECTOR)
            raise InvalidError(f"quota {format_size(quota or 0)} is below the image's device "
                               f"size of {minimum} (drivers.devmapper.basesize): give at "
                               f"least {minimum}")
        home = self._container(name)
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (home / "merged").mkdir(exist_ok=True)
        record = self._new_device(container_key(name), origin, sectors, quota, read_only)
        if sectors > origin.sectors:
            self._grow(record)

    def resize_quota(self, name: str, quota: int, mounted: bool) -> None:
        record = self._record(name)
        sectors = device_sectors(quota)
        if sectors < record.sectors:
            size = format_size(record.sectors * SECTOR)
            raise InvalidError(f"container {name}'s device is {size} and devmapper cannot "
                               f"shrink it to {format_size(quota)}: filesystems on thin "
                               "devices are only ever grown")
        grown = Record(record.key, record.id, "ready", sectors, quota, record.read_only)
        with self._lock:
            self.records.put(grown)
            dm_name = device_name(self.tag, record.key)
            header = dm_status(dm_name)
            if header is not None and header.flags & DM_ACTIVE_PRESENT_FLAG:
                dm_load(dm_name, [thin_target(sectors, self.pool_dev, record.id)],
                        read_only=record.read_only)
                dm_suspend(dm_name)
                dm_resume(dm_name)  # swaps in the larger table
        if sectors > record.sectors:
            self._grow(grown)

    def _mount_at(self, path: Path, name: str, layers: Sequence[str],
                  read_only: bool) -> Mounted:
        record = self._record(name)
        device = self._activate(record)
        spec = MountSpec(self.options.fs, str(device),
                         mount_options(self.options.fs, read_only, discard=True))
        try:
            mount_with_fsconfig(spec, path, read_only=read_only)
        except BaseException:
            deactivate(device_name(self.tag, record.key))
            raise
        return Mounted(path, (spec,))

    def unmount(self, name: str, target: Path | None, force: bool = False) -> None:
        super().unmount(name, target, force)
        dm_name = device_name(self.tag, container_key(name))
        if not self._mounts_of(dm_name):
            _deactivate_unless_held(dm_name)

    def usage(self, name: str) -> Usage:
        """The device's size less what its filesystem can still give the container."""
        record = self._record(name)
        dm_name = device_name(self.tag, record.key)
        mounted = self._mounts_of(dm_name)
        with contextlib.ExitStack() as stack:
            if not mounted:
                # Open with no mount in sight: ``umount --force`` detached a read-write mount
                # that open files still hold. A second mount shares its superblock, and the
                # kernel refuses one that would change that superblock's read-only state.
                header = dm_status(dm_name)
                held = header is not None and header.open_count > 0
                where = self._container(name) / ".measure"
                stack.enter_context(self._mounted(record, where, read_only=not held))
                mounted = [where]
            st = os.statvfs(mounted[0])
        return Usage(max(0, record.sectors * SECTOR - st.f_bavail * st.f_frsize), record.quota,
                     st.f_files - st.f_ffree, st.f_files)

    def remove_container(self, name: str) -> None:
        for where in self._mounts_of(device_name(self.tag, container_key(name))):
            unmount(where)
        unmount(self._container(name) / "merged")
        self._remove_device(container_key(name))
        super().remove_container(name)

    def list_containers(self) -> set[str]:
        names = {record.key[2:] for record in self.records.with_prefix("c/")}
        return names | {p.name for p in (self.home / "containers").iterdir()}


def _deactivate_unless_held(name: str) -> None:
    """Deactivate a device, unless it is held open elsewhere (EBUSY): a mount that ``umount
    --force`` detached holds it until its last open file closes, and ``ps`` measures such a
    container by mounting the device once more. It goes at the next unmount or rm then."""
    try:
        deactivate(name)
    except DmError as exc:
        if exc.errno != errno.EBUSY:
            raise


def deactivate_all(home: Path) -> list[str]:
    """Take down everything of a root's devmapper driver: lazily unmount its devices' mounts,
    remove its thin devices, then the pool imaged made for it (its autoclear loop devices go
    with it). Records and pool files stay, so the next start brings the pool back as a reboot
    would. For tests and benchmarks, and for operators before deleting a root. Returns the
    names of the devices removed."""
    tag = root_tag(home)
    pool = device_name(tag, "pool")
    devices = sorted(((name, dev) for name, dev in dm_list()
                      if name.startswith(f"imaged-{tag}-")), key=lambda pair: pair[0] == pool)
    numbers = {(os.major(dev), os.minor(dev)) for name, dev in devices if name != pool}
    for entry in reversed(mountinfo()):
        if (entry.major, entry.minor) in numbers:
            unmount(Path(entry.mount_point), lazy=True)
    files = [home / "pool" / name for name in ("data", "metadata")]
    loops = [(device, file) for file in files for device in loopdev.find_by_backing_file(file)]
    for name, _ in devices:  # the pool last
        deactivate(name)
    # Autoclear lets the pool's loop devices go only after the pool is gone, and can trail it:
    # whoever deletes the root next must not find its filesystem still busy.
    for device, file in loops:
        loopdev.wait_unbound(device, file, timeout=30.0)
    return [name for name, _ in devices]
