"""Device-mapper through ioctls on ``/dev/mapper/control``, not ``dmsetup``: a 500-layer pull makes
1500 device operations, and a process per operation is what costs in a user-mode-linux guest (where
this driver is tested) and on a busy host; the ioctl's errno is exact (EBUSY for a device still
open, ENODATA for a thin id the pool does not have, EEXIST), where dmsetup's messages are text for
people; and it needs neither udev nor libdevmapper's udev synchronisation (DM_DISABLE_UDEV,
``--noudevsync``): like libdevmapper without udev, we make ``/dev/mapper/<name>`` ourselves and
accept a node udev made first. The ``struct dm_ioctl`` layout is ``include/uapi/linux/dm-ioctl.h``
(interface 4); packing and parsing are pure functions below, tested without root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imaged.errors import InternalError

MAX_NAME = 127  # DM_NAME_LEN - 1

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


def drop_node(name: str) -> None:
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
            drop_node(name)
            return True
        raise
    if dm_status(name) is not None:
        return False
    drop_node(name)
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
