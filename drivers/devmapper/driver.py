"""The devmapper driver: layers and containers are thin devices in one device-mapper thin pool,
each a snapshot of its parent's device, so a layer or a container costs pool metadata only and
a quota is simply the size of the container's device (``total`` semantics, DESIGN §3).

Layout. The pool is ``drivers.devmapper.pool`` when configured (an existing thin pool this root
uses alone), else ``imaged-<tag>-pool``, made by imaged on two sparse files bound to autoclear
loop devices (``imaged.loopdev``): ``pool/data`` (``data_size``) and ``pool/metadata``
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

Why ioctls on ``/dev/mapper/control`` and not ``dmsetup``: a 500-layer pull makes 1500 device
operations, and a process per operation is what costs in a user-mode-linux guest (where this
driver is tested) and on a busy host; the ioctl's errno is exact (EBUSY for a device still
open, ENODATA for a thin id the pool does not have, EEXIST), where dmsetup's messages are text
for people; and it needs neither udev nor libdevmapper's udev synchronisation (DM_DISABLE_UDEV,
``--noudevsync``): like libdevmapper without udev, we make ``/dev/mapper/<name>`` ourselves and
accept a node udev made first. The ``struct dm_ioctl`` layout is ``include/uapi/linux/dm-ioctl.h``
(interface 4); packing and parsing are pure functions below, tested without root.

Persistence. The driver is only given its home, so its records live there, in ``devices.db``
(SQLite, WAL, synchronous=FULL): key, thin id, state, size, quota. This departs from DESIGN §2's
"one metadata store" because a driver cannot reach ``metadata.db`` through the Protocol, and the
records are the pool's bookkeeping, not the image store's; the store's own intent states still
cover layers and containers as for every driver. Here the intent is one level down: a thin id
is recorded ``creating`` before ``create_thin``/``create_snap`` and ``ready`` after, and a
removal is ``removing`` until the pool has deleted the id. The pool's transaction id is set to
a counter kept with the records after every change (as Docker's driver does), so a pool whose
transaction id differs from the records' has been changed behind their back (a crash between
the two, or records lost): then the pool's ids are listed with ``thin_ls`` on a metadata
snapshot, ids the records do not know are deleted, and records whose id the pool lacks are
reported (logged, and in ``recovered``). Records left ``creating`` are undone at every start
whatever the transaction id says.

Refusal when full. A thin pool that runs out of data or metadata space fails every device on it
at once, so nothing new is created while the pool's data or metadata is above
``fill_threshold`` (0.9) or the pool reports itself read-only, out of space or needing a check;
``imaged info`` shows the pool's usage. The pool is made with ``error_if_no_space``, so a pool
that fills anyway fails writes at once instead of queueing them for a minute.

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
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
import stat
import struct
import subprocess
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imaged import loopdev
from imaged.config import Config
from imaged.drivers import Capabilities, Mounted, Probe, Usage
from imaged.errors import ConflictError, InternalError, InvalidError, QuotaUnsupportedError
from imaged.fsutil import remove_tree
from imaged.mounts import MountSpec, is_mounted, mount_with_fsconfig, mountinfo, unmount
from imaged.sizes import format_size
from imaged.unpack import WhiteoutMode

log = logging.getLogger("imaged.drivers.devmapper")

SECTOR = 512
POOL_BLOCK_SECTORS = 128  # 64 KiB data blocks, as Docker's driver: small snapshots stay small
METADATA_BLOCK = 4096  # thin-pool metadata blocks are always 4 KiB
MAX_THIN_ID = (1 << 24) - 1  # thin device ids are 24 bits
MAX_NAME = 127  # DM_NAME_LEN - 1
XFS_MIN_SIZE = 300 << 20  # mkfs.xfs refuses smaller filesystems
_TOOL_TIMEOUT = 600.0

# -- struct dm_ioctl (include/uapi/linux/dm-ioctl.h) -----------------------------------------------

# version[3], data_size, data_start, target_count, open_count (signed), flags, event_nr, padding,
# dev, name[128], uuid[129], data[7]: 312 bytes, every field naturally aligned.
DM_IOCTL = struct.Struct("<3I3IiIIIQ128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16].
DM_TARGET_SPEC = struct.Struct("<QQiI16s")
assert DM_IOCTL.size == 312 and DM_TARGET_SPEC.size == 40  # noqa: S101 - layout is ABI
DM_VERSION = (4, 0, 0)  # we need nothing newer than interface 4.0 (the kernel accepts older)

DM_VERSION_CMD = 0
DM_LIST_DEVICES_CMD = 2
DM_DEV_CREATE_CMD = 3
DM_DEV_REMOVE_CMD = 4
DM_DEV_RENAME_CMD = 5
DM_DEV_SUSPEND_CMD = 6
DM_DEV_STATUS_CMD = 7
DM_TABLE_LOAD_CMD = 9
DM_TABLE_STATUS_CMD = 12
DM_LIST_VERSIONS_CMD = 13
DM_TARGET_MSG_CMD = 14

DM_READONLY_FLAG = 1 << 0
DM_SUSPEND_FLAG = 1 << 1
DM_STATUS_TABLE_FLAG = 1 << 4
DM_ACTIVE_PRESENT_FLAG = 1 << 5
DM_BUFFER_FULL_FLAG = 1 << 8
DM_DEFERRED_REMOVE = 1 << 17

_CONTROL = Path("/dev/mapper/control")
_PROC_MISC = Path("/proc/misc")


def dm_request(command: int) -> int:
    """``_IOWR(0xfd, command, struct dm_ioctl)``."""
    return 3 << 30 | DM_IOCTL.size << 16 | 0xFD << 8 | command


@dataclass(frozen=True)
class DmHeader:
    """The fields of ``struct dm_ioctl`` the kernel answers with."""

    version: tuple[int, int, int]
    data_size: int
    data_start: int
    target_count: int
    open_count: int
    flags: int
    dev: int
    name: str


def pack_dm_ioctl(name: str = "", payload: bytes = b"", *, flags: int = 0,
                  target_count: int = 0, room: int = 0) -> bytearray:
    """A request: the header, then ``payload`` at ``data_start``, then ``room`` bytes for the
    kernel's answer."""
    encoded = name.encode()
    if len(encoded) > MAX_NAME:
        raise ValueError(f"device-mapper name longer than {MAX_NAME} bytes: {name}")
    size = DM_IOCTL.size + _align8(max(len(payload), room))
    header = DM_IOCTL.pack(*DM_VERSION, size, DM_IOCTL.size, target_count, 0, flags, 0, 0, 0,
                           encoded, b"", b"")
    buffer = bytearray(size)
    buffer[:DM_IOCTL.size] = header
    buffer[DM_IOCTL.size:DM_IOCTL.size + len(payload)] = payload
    return buffer


def unpack_dm_ioctl(buffer: bytes | bytearray) -> tuple[DmHeader, bytes]:
    """The header and the data the kernel wrote (``data_start`` up to ``data_size``)."""
    (v0, v1, v2, data_size, data_start, target_count, open_count, flags, _event, _pad, dev,
     name, _uuid, _data) = DM_IOCTL.unpack_from(buffer)
    header = DmHeader((v0, v1, v2), data_size, data_start, target_count, open_count, flags, dev,
                      name.split(b"\0", 1)[0].decode(errors="replace"))
    return header, bytes(buffer[data_start:max(data_start, min(data_size, len(buffer)))])


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _cstring(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    return data[offset:end if end >= 0 else len(data)].decode(errors="replace")


@dataclass(frozen=True)
class Target:
    """One line of a device-mapper table: ``start length type params`` (sectors)."""

    start: int
    length: int
    type: str
    params: str

    def line(self) -> str:
        return f"{self.start} {self.length} {self.type} {self.params}"


def pack_targets(targets: Sequence[Target]) -> bytes:
    """``dm_target_spec`` + parameters for ``DM_TABLE_LOAD``; each ``next`` is the offset from
    that spec to the following one (8-byte aligned)."""
    out = bytearray()
    for target in targets:
        params = target.params.encode() + b"\0"
        size = _align8(DM_TARGET_SPEC.size + len(params))
        spec = DM_TARGET_SPEC.pack(target.start, target.length, 0, size, target.type.encode())
        out += (spec + params).ljust(size, b"\0")
    return bytes(out)


def unpack_targets(data: bytes, count: int) -> list[Target]:
    """``DM_TABLE_STATUS``'s answer: in *output*, ``next`` is an offset from the data's start."""
    targets, offset = [], 0
    for _ in range(count):
        start, length, _status, next_offset, kind = DM_TARGET_SPEC.unpack_from(data, offset)
        targets.append(Target(start, length, kind.split(b"\0", 1)[0].decode(),
                              _cstring(data, offset + DM_TARGET_SPEC.size)))
        offset = next_offset
    return targets


def unpack_name_list(data: bytes) -> list[tuple[str, int]]:
    """``DM_LIST_DEVICES``: ``struct dm_name_list {u64 dev; u32 next; char name[]}`` entries,
    ``next`` relative to each entry, 0 on the last; a first ``dev`` of 0 means no devices."""
    found: list[tuple[str, int]] = []
    offset = 0
    while offset + 12 <= len(data):
        dev, next_offset = struct.unpack_from("<QI", data, offset)
        if dev == 0 and not found:
            break
        found.append((_cstring(data, offset + 12), dev))
        if next_offset == 0:
            break
        offset += next_offset
    return found


def unpack_versions(data: bytes) -> dict[str, tuple[int, int, int]]:
    """``DM_LIST_VERSIONS``: ``struct dm_target_versions {u32 next; u32 version[3]; char
    name[]}``, ``next`` relative to each entry, 0 on the last."""
    found: dict[str, tuple[int, int, int]] = {}
    offset = 0
    while offset + 16 <= len(data):
        next_offset, v0, v1, v2 = struct.unpack_from("<4I", data, offset)
        found[_cstring(data, offset + 16)] = (v0, v1, v2)
        if next_offset == 0:
            break
        offset += next_offset
    return found


# -- tables, status lines, sizes, names ----------------------------------------------------------


def pool_target(data_sectors: int, metadata_dev: str, data_dev: str,
                block_sectors: int = POOL_BLOCK_SECTORS) -> Target:
    """The thin-pool table: no low-water mark (nothing listens for its event) and
    ``error_if_no_space``: a full pool fails writes now rather than queueing them 60 s."""
    return Target(0, data_sectors, "thin-pool",
                  f"{metadata_dev} {data_dev} {block_sectors} 0 1 error_if_no_space")


def thin_target(sectors: int, pool_dev: str, thin_id: int) -> Target:
    return Target(0, sectors, "thin", f"{pool_dev} {thin_id}")


def dev_string(dev: int) -> str:
    """``major:minor`` as tables name devices."""
    return f"{os.major(dev)}:{os.minor(dev)}"


@dataclass(frozen=True)
class PoolStatus:
    """A thin-pool's status line (Documentation/admin-guide/device-mapper/thin-provisioning)."""

    transaction_id: int
    metadata_used: int  # 4 KiB blocks
    metadata_total: int
    data_used: int  # pool blocks
    data_total: int
    mode: str  # rw, ro, out_of_data_space; "fail" when the pool has failed
    needs_check: bool = False

    @property
    def data_fraction(self) -> float:
        return self.data_used / self.data_total if self.data_total else 1.0

    @property
    def metadata_fraction(self) -> float:
        return self.metadata_used / self.metadata_total if self.metadata_total else 1.0


def parse_pool_status(params: str) -> PoolStatus:
    """``<transaction> <used>/<total> metadata <used>/<total> data <held root> rw|ro|
    out_of_data_space [no_]discard_passdown error|queue_if_no_space needs_check|- [lowater]``;
    a failed pool says only ``Fail`` (or ``Error``)."""
    fields = params.split()
    if not fields or fields[0] in ("Fail", "Error"):
        return PoolStatus(0, 0, 0, 0, 0, "fail")
    if len(fields) < 4 or "/" not in fields[1] or "/" not in fields[2]:
        raise InternalError(f"unexpected thin-pool status: {params!r}")
    meta_used, meta_total = (int(n) for n in fields[1].split("/"))
    data_used, data_total = (int(n) for n in fields[2].split("/"))
    return PoolStatus(int(fields[0]), meta_used, meta_total, data_used, data_total, fields[4]
                      if len(fields) > 4 else "rw", needs_check="needs_check" in fields[5:])


def parse_pool_table(params: str) -> tuple[str, str, int]:
    """(metadata dev, data dev, block size in sectors) from a thin-pool table's parameters."""
    fields = params.split()
    if len(fields) < 4:
        raise InternalError(f"unexpected thin-pool table: {params!r}")
    return fields[0], fields[1], int(fields[2])


def pool_usage_text(status: PoolStatus, block_sectors: int) -> str:
    if status.mode == "fail":
        return "the thin pool has failed (see dmesg)"
    data_block = block_sectors * SECTOR
    text = (f"data {format_size(status.data_used * data_block)} of "
            f"{format_size(status.data_total * data_block)} ({status.data_fraction:.0%}), "
            f"metadata {format_size(status.metadata_used * METADATA_BLOCK)} of "
            f"{format_size(status.metadata_total * METADATA_BLOCK)} "
            f"({status.metadata_fraction:.0%})")
    if status.mode != "rw" or status.needs_check:
        text += f", {status.mode}{', needs_check' if status.needs_check else ''}"
    return text


def fill_refusal(pool: str, status: PoolStatus, block_sectors: int,
                 threshold: float) -> str | None:
    """Why nothing more may be created in the pool now, or None. Above the threshold a burst of
    writes could fill it, and a full pool fails every device on it, not just the new one."""
    fix = ("remove containers or images (imaged rm, imaged rmi, imaged gc) or grow the pool "
           "(drivers.devmapper.data_size, .metadata_size)")
    usage = pool_usage_text(status, block_sectors)
    if status.mode == "fail":
        return f"the thin pool {pool} has failed: nothing can be created (see dmesg)"
    if status.needs_check or status.mode in ("ro", "out_of_data_space"):
        return (f"the thin pool {pool} is {status.mode}"
                f"{' and needs thin_check' if status.needs_check else ''} ({usage}): {fix}, "
                "then repair it (thin_check, thin_repair) with every device deactivated")
    if status.data_fraction >= threshold or status.metadata_fraction >= threshold:
        return (f"the thin pool {pool} is above its fill threshold of {threshold:.0%} ({usage}); "
                f"a full pool fails every container on it, so nothing more is created: {fix}, "
                "or raise drivers.devmapper.fill_threshold")
    return None


def round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def device_sectors(size: int) -> int:
    """A device size in sectors, rounded up to whole pool blocks."""
    return round_up(size, POOL_BLOCK_SECTORS * SECTOR) // SECTOR


def allocate_id(next_id: int, used: set[int]) -> int:
    """The first thin id from ``next_id`` on (wrapping past 2**24 - 1) that no record holds.
    Ids only move forward, so an id deleted from the pool is not handed out again soon."""
    candidate = next_id if 0 <= next_id <= MAX_THIN_ID else 0
    for _ in range(MAX_THIN_ID + 1):
        if candidate not in used:
            return candidate
        candidate = candidate + 1 if candidate < MAX_THIN_ID else 0
    raise ConflictError("every thin device id of the pool is in use")


def root_tag(home: Path) -> str:
    return hashlib.sha256(os.path.realpath(home).encode()).hexdigest()[:12]


def device_name(tag: str, key: str) -> str:
    """The dm name of a record key (``base``, ``l/<chainid>``, ``c/<name>``, ``dead/<id>``)."""
    kind, _, rest = key.partition("/")
    name = f"imaged-{tag}-{kind}-{rest}" if rest else f"imaged-{tag}-{kind}"
    if len(name) > MAX_NAME:  # only long container names: ch- cannot be a name's prefix
        name = f"imaged-{tag}-{kind}h-{hashlib.sha256(rest.encode()).hexdigest()[:40]}"
    return name


def layer_key(key: str) -> str:
    return f"l/{key}"


def container_key(name: str) -> str:
    return f"c/{name}"


@dataclass(frozen=True)
class Record:
    key: str
    id: int
    state: str  # creating | ready | removing
    sectors: int
    quota: int | None = None
    read_only: bool = False


@dataclass(frozen=True)
class Reconciliation:
    """What to do at start, from the records and (when the transaction ids disagree) the ids
    the pool holds."""

    undo: tuple[Record, ...]  # creating: the id may or may not exist; delete it, drop the record
    finish: tuple[Record, ...]  # removing: finish the removal
    strays: tuple[int, ...]  # ids in the pool no record knows: delete them
    missing: tuple[Record, ...]  # ready records whose id the pool lacks: report them


def reconcile(records: Iterable[Record], pool_ids: set[int] | None) -> Reconciliation:
    records = list(records)
    known = {record.id for record in records}
    undo = tuple(r for r in records if r.state == "creating")
    finish = tuple(r for r in records if r.state == "removing")
    strays: tuple[int, ...] = ()
    missing: tuple[Record, ...] = ()
    if pool_ids is not None:
        strays = tuple(sorted(pool_ids - known))
        missing = tuple(r for r in records if r.state == "ready" and r.id not in pool_ids)
    return Reconciliation(undo, finish, strays, missing)


def parse_thin_ls(text: str) -> set[int]:
    """Thin ids from ``thin_ls --no-headers -o DEV``: one number per line."""
    return {int(line.split()[0]) for line in text.splitlines()
            if line.strip() and line.split()[0].isdigit()}


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


# -- the ioctl shell -----------------------------------------------------------------------------


class DmError(InternalError):
    """A device-mapper ioctl failed; ``errno`` says how."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


_COMMAND_NAMES = {DM_VERSION_CMD: "DM_VERSION", DM_LIST_DEVICES_CMD: "DM_LIST_DEVICES",
                  DM_DEV_CREATE_CMD: "DM_DEV_CREATE", DM_DEV_REMOVE_CMD: "DM_DEV_REMOVE",
                  DM_DEV_RENAME_CMD: "DM_DEV_RENAME", DM_DEV_SUSPEND_CMD: "DM_DEV_SUSPEND",
                  DM_DEV_STATUS_CMD: "DM_DEV_STATUS", DM_TABLE_LOAD_CMD: "DM_TABLE_LOAD",
                  DM_TABLE_STATUS_CMD: "DM_TABLE_STATUS", DM_LIST_VERSIONS_CMD:
                  "DM_LIST_VERSIONS", DM_TARGET_MSG_CMD: "DM_TARGET_MSG"}


def dm_call(command: int, name: str = "", payload: bytes = b"", *, flags: int = 0,
            target_count: int = 0, room: int = 0) -> tuple[DmHeader, bytes]:
    """One ioctl on ``/dev/mapper/control``; answers that do not fit are asked again with a
    buffer four times larger."""
    while True:
        buffer = pack_dm_ioctl(name, payload, flags=flags, target_count=target_count, room=room)
        fd = os.open(_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, dm_request(command), buffer, True)
        except OSError as exc:
            err = exc.errno or 0
            what = f"{_COMMAND_NAMES.get(command, command)}{f' {name}' if name else ''}"
            raise DmError(f"{what} failed: {os.strerror(err)}", err) from None
        finally:
            os.close(fd)
        header, data = unpack_dm_ioctl(buffer)
        if not header.flags & DM_BUFFER_FULL_FLAG:
            return header, data
        room = max(room, 4096) * 4


def dm_status(name: str) -> DmHeader | None:
    """The device's header (open count, flags, dev), None if there is no such device."""
    try:
        return dm_call(DM_DEV_STATUS_CMD, name)[0]
    except DmError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


def dm_table(name: str, table: bool = False) -> list[Target]:
    """The live table's targets with their status lines (or their table lines)."""
    header, data = dm_call(DM_TABLE_STATUS_CMD, name, flags=DM_STATUS_TABLE_FLAG if table else 0,
                           room=4096)
    return unpack_targets(data, header.target_count)


def dm_load(name: str, targets: Sequence[Target], read_only: bool = False) -> None:
    dm_call(DM_TABLE_LOAD_CMD, name, pack_targets(targets),
            flags=DM_READONLY_FLAG if read_only else 0, target_count=len(targets))


def dm_resume(name: str) -> None:
    dm_call(DM_DEV_SUSPEND_CMD, name)


def dm_suspend(name: str) -> None:
    """Suspend: in-flight I/O completes and a filesystem on it is frozen (lockfs) first."""
    dm_call(DM_DEV_SUSPEND_CMD, name, flags=DM_SUSPEND_FLAG)


def dm_message(name: str, message: str) -> None:
    dm_call(DM_TARGET_MSG_CMD, name, struct.pack("<Q", 0) + message.encode() + b"\0")


def dm_list() -> list[tuple[str, int]]:
    return unpack_name_list(dm_call(DM_LIST_DEVICES_CMD, room=8192)[1])


def dm_versions() -> dict[str, tuple[int, int, int]]:
    return unpack_versions(dm_call(DM_LIST_VERSIONS_CMD, room=8192)[1])


def node_path(name: str) -> Path:
    return Path("/dev/mapper") / name


def _ensure_node(name: str, dev: int) -> Path:
    """``/dev/mapper/<name>`` for ``dev``: udev's link or a node we make, as libdevmapper
    does when udev is not running; a stale node of an older device is replaced."""
    path = node_path(name)
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(os.major(dev), os.minor(dev)):
            return path
        os.unlink(path)
    path.parent.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):  # udev won the race
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(os.major(dev), os.minor(dev)))
    return path


def _drop_node(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(node_path(name))


def activate(name: str, targets: Sequence[Target], read_only: bool = False) -> Path:
    """Create and resume a device with this table (if it is not active already); its node."""
    header = dm_status(name)
    if header is None or not header.flags & DM_ACTIVE_PRESENT_FLAG:
        if header is None:
            dm_call(DM_DEV_CREATE_CMD, name)
        try:
            dm_load(name, targets, read_only)
            dm_resume(name)
        except BaseException:
            with contextlib.suppress(DmError):
                dm_call(DM_DEV_REMOVE_CMD, name)
            raise
        header = dm_status(name)
        if header is None:  # pragma: no cover - removed under us
            raise InternalError(f"device {name} vanished while it was activated")
    return _ensure_node(name, header.dev)


def deactivate(name: str, deferred: bool = False) -> bool:
    """Remove the device if it exists; True once it is gone. An open device is refused
    (EBUSY), or with ``deferred`` left for the kernel to remove at its last close (False)."""
    try:
        dm_call(DM_DEV_REMOVE_CMD, name, flags=DM_DEFERRED_REMOVE if deferred else 0)
    except DmError as exc:
        if exc.errno == errno.ENXIO:
            _drop_node(name)
            return True
        raise
    if dm_status(name) is not None:
        return False
    _drop_node(name)
    return True


def kernel_support() -> str | None:
    """None when device-mapper with thin provisioning is usable here, else what is missing."""
    try:
        versions = dm_versions()
    except FileNotFoundError:
        if _PROC_MISC.exists() and "device-mapper" in _PROC_MISC.read_text():
            return (f"{_CONTROL} is missing though the kernel has device-mapper: create it "
                    "(dmsetup mknodes)")
        return f"no device-mapper in /proc/misc and no {_CONTROL}"
    except (OSError, DmError) as exc:  # a node with no driver behind it: ENODEV, ENXIO
        return f"{_CONTROL}: {exc}"
    if "thin-pool" in versions:
        return None
    modules = Path("/lib/modules") / os.uname().release
    for index in ("modules.dep", "modules.builtin"):
        with contextlib.suppress(OSError):
            if "dm-thin-pool.ko" in (modules / index).read_text():
                return None  # loaded on first use: the kernel asks for dm-thin-pool itself
    return "device-mapper has no thin-pool target (no dm-thin-pool module)"


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


# -- records -------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    key TEXT PRIMARY KEY,         -- base, l/<chainid hex>, c/<container name>, dead/<id>
    id INTEGER NOT NULL UNIQUE,   -- the thin device id in the pool (24 bits)
    state TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    sectors INTEGER NOT NULL,     -- the device's size: what its table says when activated
    quota INTEGER,                -- a container's quota in bytes; NULL without one
    read_only INTEGER NOT NULL DEFAULT 0  -- activated read-only (read-only containers)
);
-- next_id: where id allocation resumes; transaction_id: what the pool's must equal
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = "key, id, state, sectors, quota, read_only"


class Records:
    """The driver's ``devices.db``: one connection shared by the service's worker threads,
    serialized by a lock; each write, or each ``transaction()`` block, is durable when it
    returns."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _select(self, where: str = "1", *args: str) -> list[Record]:
        with self._lock:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM devices WHERE {where}",  # noqa: S608 - where is ours
                                   args).fetchall()
        return [Record(k, i, s, n, q, bool(r)) for k, i, s, n, q, r in rows]

    def all(self) -> list[Record]:
        return self._select()

    def get(self, key: str) -> Record | None:
        return next(iter(self._select("key = ?", key)), None)

    def with_prefix(self, prefix: str) -> list[Record]:
        return self._select("substr(key, 1, length(?1)) = ?1", prefix)

    def ids(self) -> set[int]:
        with self._lock:
            return {row[0] for row in self.db.execute("SELECT id FROM devices")}

    def put(self, record: Record) -> None:
        with self._lock:
            self.db.execute(f"INSERT OR REPLACE INTO devices ({_COLUMNS}) "  # noqa: S608 - ours
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (record.key, record.id, record.state, record.sectors, record.quota,
                             int(record.read_only)))

    def rekey(self, old: str, new: str) -> None:
        with self._lock:
            self.db.execute("UPDATE devices SET key = ? WHERE key = ?", (new, old))

    def drop(self, key: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM devices WHERE key = ?", (key,))

    def counter(self, name: str) -> int:
        with self._lock:
            row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_counter(self, name: str, value: int) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (name, value))


# -- filesystems and tools -----------------------------------------------------------------------


def _run(argv: list[str], timeout: float = _TOOL_TIMEOUT) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C"}, check=False)
    except FileNotFoundError:
        raise InternalError(f"{argv[0]} is not installed (e2fsprogs, xfsprogs, "
                            "thin-provisioning-tools: scripts/setup installs them)") from None
    except subprocess.TimeoutExpired:
        raise InternalError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).replace("\n", "; ")
        raise InternalError(f"{' '.join(argv)} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


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
    return Capabilities("snapshot", WhiteoutMode.DELETE, "device size", "total",
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


class DevmapperDriver:
    name = "devmapper"

    def __init__(self, config: Config, home: Path) -> None:
        self.home = home
        self.options = Options.of(config)
        problem = config_problem(self.options)
        if problem is not None:
            raise InvalidError(problem)
        self.tag = root_tag(home)
        self.pool = pool_name(self.options, home)
        self.recovered: list[str] = []  # what the start repaired or found, also logged
        self._lock = threading.RLock()  # pool changes and their records, one at a time
        for sub in ("layers", "containers"):
            (home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
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
                    _drop_node(name)
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
                deactivate(name)
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

    def _layer_dir(self, key: str) -> Path:
        return self.home / "layers" / key

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        if self.records.get(layer_key(key)) is not None:
            self.remove_layer(key)
        origin = self._base() if parent is None else self.records.get(layer_key(parent))
        if origin is None or origin.state != "ready":
            raise InternalError(f"parent layer {parent} has no thin device")
        record = self._new_device(layer_key(key), origin, origin.sectors)
        target = self._layer_dir(key)
        target.mkdir(exist_ok=True, mode=0o755)
        device = self._activate(record)
        mount_with_fsconfig(MountSpec(self.options.fs, str(device),
                                      mount_options(self.options.fs, False)), target)
        return target

    def commit_layer(self, key: str) -> None:
        """Unmount (its filesystem is clean from now on: snapshots of it need no recovery) and
        deactivate; the empty directory stays as the layer's mark under ``layers/``."""
        unmount(self._layer_dir(key))
        deactivate(device_name(self.tag, layer_key(key)))

    def remove_layer(self, key: str) -> None:
        unmount(self._layer_dir(key))
        self._remove_device(layer_key(key))
        with contextlib.suppress(FileNotFoundError):
            self._layer_dir(key).rmdir()

    def list_layers(self) -> set[str]:
        return {record.key[2:] for record in self.records.with_prefix("l/")}

    def layer_paths(self, key: str) -> list[Path]:
        """Nothing: a layer's bytes are blocks in the pool, not files under the root."""
        return []

    # containers

    def _container(self, name: str) -> Path:
        return self.home / "containers" / name

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

    def mount(self, name: str, layers: Sequence[str], read_only: bool,
              target: Path | None) -> Mounted:
        path = target or self._container(name) / "merged"
        path.mkdir(parents=True, exist_ok=True)
        if is_mounted(path):
            return Mounted(path)
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

    def unmount(self, name: str, target: Path | None) -> None:
        unmount(target or self._container(name) / "merged")
        dm_name = device_name(self.tag, container_key(name))
        if not self._mounts_of(dm_name):
            try:
                deactivate(dm_name)
            except DmError as exc:  # held open elsewhere: it goes at the next unmount or rm
                if exc.errno != errno.EBUSY:
                    raise

    def usage(self, name: str) -> Usage:
        """The device's size less what its filesystem can still give the container."""
        record = self._record(name)
        mounted = self._mounts_of(device_name(self.tag, record.key))
        with contextlib.ExitStack() as stack:
            if not mounted:
                where = self._container(name) / ".measure"
                stack.enter_context(self._mounted(record, where, read_only=True))
                mounted = [where]
            st = os.statvfs(mounted[0])
        return Usage(max(0, record.sectors * SECTOR - st.f_bavail * st.f_frsize), record.quota)

    def usages(self, names: Sequence[str]) -> dict[str, Usage]:
        return {name: self.usage(name) for name in names}

    def remove_container(self, name: str) -> None:
        for where in self._mounts_of(device_name(self.tag, container_key(name))):
            unmount(where)
        unmount(self._container(name) / "merged")
        self._remove_device(container_key(name))
        remove_tree(self._container(name))

    def list_containers(self) -> set[str]:
        names = {record.key[2:] for record in self.records.with_prefix("c/")}
        return names | {p.name for p in (self.home / "containers").iterdir()}


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
