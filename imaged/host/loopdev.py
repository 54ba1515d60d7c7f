"""Loop devices through ``/dev/loop-control`` and the loop ioctls, without ``losetup``.

The layouts follow ``include/uapi/linux/loop.h``. A device is bound with ``LOOP_CONFIGURE``
(one ioctl: file, flags and block size at once, kernel 5.8+) and always with
``LO_FLAGS_AUTOCLEAR``: the kernel unbinds it when its last opener goes away, so a mount made on
it owns it and an unmount releases it, and a process that dies between "bind" and "mount" leaks
nothing. The flip side is that whoever binds must keep the device open until the mount holds it:
``attach`` returns an ``Attachment`` whose file descriptor does exactly that until it is closed.

Another process may take the index ``LOOP_CTL_GET_FREE`` handed us before we bind it; the
kernel then answers ``EBUSY`` and we ask for another index.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from imaged.errors import InternalError, QuotaUnsupportedError

# ioctl request numbers (plain numbers in loop.h, not _IOW-encoded).
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LO_NAME_SIZE = 64
LO_KEY_SIZE = 32
LOOP_MAJOR = 7

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (__u64);
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (__u32); lo_file_name[64],
# lo_crypt_name[64], lo_encrypt_key[32] (__u8); lo_init[2] (__u64). Every field is naturally
# aligned, so the packed little-endian layout is the C layout: 232 bytes.
LOOP_INFO64 = struct.Struct("<5Q4I64s64s32s2Q")
# struct loop_config: fd, block_size (__u32); struct loop_info64 info; __reserved[8] (__u64).
LOOP_CONFIG = struct.Struct(f"<II{LOOP_INFO64.size}s8Q")
assert LOOP_INFO64.size == 232 and LOOP_CONFIG.size == 304  # noqa: S101 - layout is ABI

_CONTROL = Path("/dev/loop-control")
_SYSFS_BLOCK = Path("/sys/block")
# How many free indexes to try before giving up when other processes keep winning the race.
_BIND_ATTEMPTS = 32


@dataclass(frozen=True)
class LoopInfo:
    """The fields of ``struct loop_info64`` that mean something today (encryption is gone)."""

    device: int = 0  # st_dev of the backing file (read-only)
    inode: int = 0  # st_ino of the backing file (read-only)
    rdevice: int = 0
    offset: int = 0
    sizelimit: int = 0  # bytes; 0 means "up to the end of the file"
    number: int = 0  # the loop index (read-only)
    flags: int = 0
    file_name: str = ""  # informational only: the kernel keeps its own path of the file


def pack_loop_info64(info: LoopInfo) -> bytes:
    name = os.fsencode(info.file_name)[: LO_NAME_SIZE - 1]
    return LOOP_INFO64.pack(info.device, info.inode, info.rdevice, info.offset, info.sizelimit,
                            info.number, 0, 0, info.flags, name, b"", b"", 0, 0)


def unpack_loop_info64(data: bytes) -> LoopInfo:
    (device, inode, rdevice, offset, sizelimit, number, _enc_type, _key_size, flags, name,
     _crypt_name, _key, _init0, _init1) = LOOP_INFO64.unpack(data)
    return LoopInfo(device, inode, rdevice, offset, sizelimit, number, flags,
                    os.fsdecode(name.split(b"\0", 1)[0]))


def pack_loop_config(fd: int, info: LoopInfo, block_size: int = 0) -> bytes:
    """``struct loop_config`` for ``LOOP_CONFIGURE``; block_size 0 keeps the default (512)."""
    if block_size and (block_size < 512 or block_size & (block_size - 1)):
        raise ValueError(f"loop block size must be a power of two >= 512, not {block_size}")
    return LOOP_CONFIG.pack(fd, block_size, pack_loop_info64(info), *([0] * 8))


@dataclass(frozen=True)
class LoopDevice:
    """``/dev/loopN``, named by its index."""

    index: int

    @property
    def path(self) -> Path:
        return Path(f"/dev/loop{self.index}")

    @property
    def sysfs(self) -> Path:
        return _SYSFS_BLOCK / f"loop{self.index}"

    def dev_t(self) -> int:
        """The device number from sysfs (the minor depends on the module's max_part)."""
        major, minor = (self.sysfs / "dev").read_text().strip().split(":")
        return os.makedev(int(major), int(minor))

    def backing_file(self) -> str | None:
        """The kernel's path of the bound file (`` (deleted)`` appended if unlinked), or None."""
        try:
            return (self.sysfs / "loop" / "backing_file").read_text().rstrip("\n")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENODEV):  # unbound while we read
                return None
            raise

    def autoclear(self) -> bool:
        try:
            return (self.sysfs / "loop" / "autoclear").read_text().strip() == "1"
        except FileNotFoundError:
            return False

    def size(self) -> int:
        """The device's size in bytes, as the kernel sees it now (sysfs counts 512 B sectors)."""
        return int((self.sysfs / "size").read_text()) * 512


class Attachment:
    """A bound loop device plus the open descriptor that keeps an autoclear binding alive.

    Close it once something else (a mount) holds the device; closing it first makes the kernel
    unbind an autoclear device at once.
    """

    def __init__(self, device: LoopDevice, fd: int) -> None:
        self.device = device
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _ensure_node(device: LoopDevice) -> None:
    """Create ``/dev/loopN`` when no devtmpfs/udev did (a container's private /dev)."""
    try:
        st = os.stat(device.path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISBLK(st.st_mode):
            return
        raise InternalError(f"{device.path} exists but is not a block device")
    with contextlib.suppress(FileExistsError):  # udev won the race: fine
        os.mknod(device.path, stat.S_IFBLK | 0o660, device.dev_t())


def get_free() -> LoopDevice:
    """A free loop index from the kernel (which adds a device when none is free)."""
    try:
        ctl = os.open(_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise QuotaUnsupportedError(
            f"{_CONTROL} does not exist: load the loop module (modprobe loop) to use loop quotas"
        ) from None
    try:
        index = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise InternalError(f"LOOP_CTL_GET_FREE failed: {os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(ctl)
    return LoopDevice(index)


def attach(backing: Path, *, read_only: bool = False, block_size: int = 0,
           autoclear: bool = True, direct_io: bool = False) -> Attachment:
    """Bind ``backing`` to a free loop device, with autoclear (unless told otherwise: only
    tests and benches want a binding that outlives every holder) and direct I/O off.

    Direct I/O stays off by default so the loop device goes through the page cache of the
    backing file: it works on every backing filesystem (some refuse O_DIRECT: tmpfs before
    Linux 6.6) and with any block size, at the price of caching data twice. A bench asks for
    it, so that a cold read comes from the disk and not from the backing file's pages; where
    the backing file cannot do it the kernel binds it cached, and ``get_status`` says which.
    """
    file_flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    backing_fd = os.open(backing, file_flags)
    try:
        flags = ((LO_FLAGS_AUTOCLEAR if autoclear else 0)
                 | (LO_FLAGS_READ_ONLY if read_only else 0)
                 | (LO_FLAGS_DIRECT_IO if direct_io else 0))
        config = pack_loop_config(backing_fd, LoopInfo(flags=flags, file_name=str(backing)),
                                  block_size)
        last: OSError | None = None
        for _ in range(_BIND_ATTEMPTS):
            device = get_free()
            _ensure_node(device)
            try:
                dev_fd = os.open(device.path, file_flags)
            except FileNotFoundError as exc:  # removed by LOOP_CTL_REMOVE elsewhere: next one
                last = exc
                continue
            try:
                fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
            except OSError as exc:
                os.close(dev_fd)
                if exc.errno == errno.EBUSY:  # another process bound this index first
                    last = exc
                    continue
                raise InternalError(
                    f"LOOP_CONFIGURE {device.path} with {backing} failed: "
                    f"{os.strerror(exc.errno or 0)}") from exc
            return Attachment(device, dev_fd)
        raise InternalError(f"no free loop device after {_BIND_ATTEMPTS} attempts "
                            f"(last: {last})")
    finally:
        os.close(backing_fd)


def _ioctl_on(device: LoopDevice, request: int, what: str) -> None:
    # O_RDONLY: opening a mounted device for writing can be refused (BLK_DEV_WRITE_MOUNTED=n)
    # and neither request needs it as root.
    fd = os.open(device.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request)
    except OSError as exc:
        raise InternalError(f"{what} on {device.path} failed: "
                            f"{os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(fd)


def set_capacity(device: LoopDevice) -> None:
    """Make the device follow its backing file's new size (after the file grew)."""
    _ioctl_on(device, LOOP_SET_CAPACITY, "LOOP_SET_CAPACITY")


def get_status(device: LoopDevice) -> LoopInfo:
    fd = os.open(device.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError as exc:
        raise InternalError(f"LOOP_GET_STATUS64 on {device.path} failed: "
                            f"{os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(fd)
    return unpack_loop_info64(data)


def detach(device: LoopDevice) -> None:
    """Unbind explicitly (LOOP_CLR_FD). Unbound already is fine.

    While something still holds the device (a mount), the kernel cannot unbind it now; it turns
    autoclear on instead and unbinds when the last holder lets go.
    """
    try:
        fd = os.open(device.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):  # gone, or being torn down
            return
        raise
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: not bound
            raise InternalError(f"LOOP_CLR_FD on {device.path} failed: "
                                f"{os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(fd)


def claimed(device: LoopDevice) -> bool:
    """Whether a filesystem still has the device (an exclusive open is refused, as mkfs
    finds a mounted device): after ``umount --force`` a detached mount keeps it until its
    last open file closes, though the mount table no longer shows it."""
    try:
        fd = os.open(device.path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):  # gone meanwhile
            return False
        raise
    os.close(fd)
    return False


def bound_devices() -> list[tuple[LoopDevice, str]]:
    """Every bound loop device with the kernel's path of its backing file."""
    found = []
    try:
        names = os.listdir(_SYSFS_BLOCK)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith("loop") or not name[4:].isdigit():
            continue
        device = LoopDevice(int(name[4:]))
        backing = device.backing_file()
        if backing is not None:
            found.append((device, backing))
    return sorted(found, key=lambda pair: pair[0].index)


def find_by_backing_file(path: Path) -> list[LoopDevice]:
    """Loop devices bound to ``path`` (for recovery after a crash), by the kernel's path.

    The kernel prints the path it resolved when the file was bound, so ``path`` is compared
    after resolving symlinks; a file deleted since shows with a `` (deleted)`` suffix and no
    longer matches, which is right: it is not this file any more.
    """
    wanted = os.path.realpath(path)
    return [device for device, backing in bound_devices() if backing == wanted]


def wait_unbound(device: LoopDevice, backing: Path, timeout: float = 5.0) -> bool:
    """Wait until ``device`` no longer backs ``backing`` (autoclear runs when the last holder
    lets go, which can trail an unmount by a moment); True if it is gone."""
    deadline = time.monotonic() + timeout
    wanted = os.path.realpath(backing)
    while True:
        if device.backing_file() != wanted:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
