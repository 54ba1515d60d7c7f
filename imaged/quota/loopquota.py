"""Quotas on any kernel with loop devices: one loop-backed ext4 per container (DESIGN §3).

A container's overlay upper and work directories live on an ext4 made inside a file, so the
filesystem's size is the quota: the container can write its quota and the next write fails with
ENOSPC, with no kernel quota support at all.

Reservation. The image's blocks are allocated on the host when it is made, grown or mounted
(``fallocate``: extents marked unwritten, so nothing is written and they read as zeros), and the
mount does not use ``discard``, which would punch them out again, and uses ``noinit_itable``:
the block groups an online grow adds have inode tables ext4 has not zeroed, and its background
zeroing (ext4lazyinit) sends the loop device write-zeroes requests, which the loop driver turns
into hole punches in the image (a guest test found 4 MiB of an 80 MiB image given back after a
grow; mkfs's tables are marked zeroed already). A quota of Q therefore holds Q
on the host. It must: a sparse image overcommits the host, and when the host fills, the loop
device turns ENOSPC into I/O errors under a filesystem that had already acknowledged the writes
(a 10 MiB ``dd conv=fsync`` into a 32 MiB quota on a full root reported success and read back as
zeros, then ext4 aborted its journal). A create or grow the host cannot back is refused with the
numbers; a mount of an image made sparse (by an older imaged) reserves it first.

Mount choices: no ``discard`` and ``noinit_itable`` (see Reservation), ``nosuid,nodev`` (the
backing mount is visible on the host, where set-uid files and device nodes a container wrote
must not work; through the container's overlay both still work, since the overlay's own mount
decides), and the kernel's default ``relatime``, not ``noatime``: overlay updates atime on the
upper inode through this mount, so ``noatime`` here would freeze atime for the container's
files. The mount is the mount(2) system call, not ``mount(8)``: the autoclear loop device must
stay open in this process until the mount holds it, the errno is exact, and no fstab, utab or
util-linux loop logic gets involved. A mount cannot be given a timeout; ext4's is bounded by
journal replay, at most 64 MiB here.

Growth works online (reserve, LOOP_SET_CAPACITY, resize2fs on the device), which ext4 allows
only with CAP_SYS_RESOURCE; without it, growing needs the container unmounted. Online steps
cannot be undone, so a large one aims 1% short and small ones finish; the kernel computes its
2% reservation only at mount, so after growing it is set through sysfs to what the next mount
will compute. Shrinking needs the container unmounted always (ext4 cannot shrink online):
e2fsck, resize2fs, truncate. Sizes, for making and for both resizes, come from the layout
model in ``imaged.quota.ext4layout``.

Callers serialize operations on one container; two processes mounting the same image at once
could bind it to two loop devices.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imaged import tools
from imaged.errors import (
    NO_SPACE_ERRNOS,
    ConflictError,
    InternalError,
    InvalidError,
    NoSpaceError,
    NotFoundError,
    QuotaUnsupportedError,
)
from imaged.host import loopdev
from imaged.host.mounts import MNT_DETACH, backing_filesystem, mountinfo
from imaged.quota.ext4layout import (
    BLOCK_SIZE,
    FRESH_USED_BLOCKS,
    GROUPS,
    INODE_SIZE,
    SB_OFFSET,
    SB_SIZE,
    Geometry,
    Groups,
    Layout,
    MiB,
    Superblock,
    avoid_short_last_group,
    capacity_window,
    check_quota,
    descriptor_blocks,
    model_layout,
    next_blocks,
    parse_superblock,
    plan_layout,
    plan_resize,
    reserved_clusters,
)
from imaged.sizes import format_size

MKFS_FEATURES = ("none,sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr,"
                 "has_journal,extent,huge_file,64bit,dir_nlink,extra_isize,metadata_csum")

# Seconds each tool may take. mkfs and a grow touch only metadata; an offline shrink moves data,
# so it gets as long as copying tens of GiB takes on a slow disk.
MKFS_TIMEOUT = 120.0
FSCK_TIMEOUT = 1800.0
RESIZE_TIMEOUT = 1800.0
_MAX_ROUNDS = 8  # make/resize rounds before giving up on hitting the size window

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MOUNT_FLAGS = MS_NOSUID | MS_NODEV
MOUNT_DATA = "noinit_itable"  # and no discard: both keep the reservation (module docstring)
FALLOC_FL_KEEP_SIZE = 1
CAP_SYS_RESOURCE = 24

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)




@dataclass(frozen=True)
class LoopFS:
    """A container's loop-backed filesystem: its image file and where it is mounted."""

    image: Path
    mount_point: Path


def read_superblock(image: Path) -> Superblock:
    with open(image, "rb") as f:
        f.seek(SB_OFFSET)
        return parse_superblock(f.read(SB_SIZE))


# -- mounts and capabilities ---------------------------------------------------------------------


def has_capability(status_text: str, cap: int) -> bool:
    """Whether /proc/<pid>/status text shows ``cap`` in the effective set."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


# -- running tools and system calls --------------------------------------------------------------


def _run(argv: list[str], timeout: float, ok: tuple[int, ...] = (0,)) -> str:
    return tools.run(argv, timeout=timeout, ok=ok, missing=QuotaUnsupportedError,
                     provides="e2fsprogs, which loop-backed quotas need (apt-get install "
                     "e2fsprogs)")


def _sys_mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                   data.encode()) != 0:
        err = ctypes.get_errno()
        hint = " (the kernel log, dmesg, says why)" if err == errno.EINVAL else ""
        raise InternalError(f"mount {source} on {target} ({fstype}, {data}) failed: "
                            f"{os.strerror(err)}{hint}")


def _sys_umount(target: str, lazy: bool = False) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not (or no longer) a mount point
            return
        if err == errno.EBUSY:
            raise ConflictError(f"{target} is busy: unmount what is stacked on it (the "
                                "container's overlay) and stop processes using it first")
        raise InternalError(f"umount {target} failed: {os.strerror(err)}")


def devices(fs: LoopFS) -> list[loopdev.LoopDevice]:
    """Loop devices bound to this image (one when mounted; more only after a crash)."""
    return loopdev.find_by_backing_file(fs.image)


def mounts(fs: LoopFS) -> list[str]:
    """Where this image is mounted in this mount namespace, in mount order."""
    numbers = set()
    for device in devices(fs):
        with contextlib.suppress(FileNotFoundError):
            dev = device.dev_t()
            numbers.add((os.major(dev), os.minor(dev)))
    return [e.mount_point for e in mountinfo() if (e.major, e.minor) in numbers]


def _mounted_at(fs: LoopFS) -> str | None:
    here = os.path.realpath(fs.mount_point)
    return next((m for m in mounts(fs) if m == here), None)


def _attach_and_mount(image: Path, target: Path, flags: int) -> loopdev.LoopDevice:
    with loopdev.attach(image) as attachment:  # closed once the mount holds the device
        _sys_mount(str(attachment.device.path), target, "ext4", flags, MOUNT_DATA)
        return attachment.device


# -- measuring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Space:
    """statvfs of a mounted filesystem, in bytes."""

    used: int  # held by files and directories: (f_blocks - f_bfree) * f_frsize
    available: int  # what the next writes may use: f_bavail * f_frsize
    inodes_used: int  # f_files - f_ffree (ext4's reserved inodes, root and lost+found included)
    inodes: int  # f_files

    @property
    def capacity(self) -> int:
        return self.used + self.available


def _statvfs(path: str | Path) -> Space:
    st = os.statvfs(path)
    return Space((st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize,
                 st.f_files - st.f_ffree, st.f_files)


@contextlib.contextmanager
def _temporary_mount(fs: LoopFS) -> Iterator[Path]:
    """The filesystem mounted read-only in a private directory next to its image; on a host
    too full for a new directory, at its own (unmounted) mount point."""
    try:
        where = Path(tempfile.mkdtemp(prefix=f".{fs.image.name}.measure-", dir=fs.image.parent))
        made = True
    except OSError as exc:
        if exc.errno not in NO_SPACE_ERRNOS or not fs.mount_point.is_dir():
            raise
        where, made = fs.mount_point, False
    try:
        device = _attach_and_mount(fs.image, where, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        try:
            yield where
        finally:
            _sys_umount(str(where))
            loopdev.wait_unbound(device, fs.image)  # autoclear: gone once the mount is
    finally:
        if made:
            os.rmdir(where)


def _measure(fs: LoopFS) -> Space:
    where = mounts(fs)
    if where:
        return _statvfs(where[0])
    with _temporary_mount(fs) as path:
        return _statvfs(path)


def usage(fs: LoopFS) -> Space:
    """What the container's files use and may use, in bytes and inodes, from statvfs.

    Works mounted or not (an unmounted filesystem is mounted read-only for the moment it takes).
    """
    if not fs.image.exists():
        raise NotFoundError(f"no loop quota image at {fs.image}")
    return _measure(fs)


# -- making and resizing -------------------------------------------------------------------------


def _set_size(image: Path, size: int) -> None:
    """Set the image's size, every block of it reserved on the host (module docstring)."""
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        if size > os.fstat(fd).st_size:
            _fallocate(fd, image, 0, size)  # allocates any hole below too, and sets the size
        else:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def reserve(image: Path) -> None:
    """Allocate every block of the image on the host without changing its size (a no-op for
    an image made reserved; an older imaged made them sparse)."""
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        _fallocate(fd, image, 0, os.fstat(fd).st_size, FALLOC_FL_KEEP_SIZE)
    finally:
        os.close(fd)


def _fallocate(fd: int, image: Path, offset: int, length: int, mode: int = 0) -> None:
    if length <= 0 or _libc.fallocate(fd, mode, offset, length) == 0:
        return
    err = ctypes.get_errno()
    host = backing_filesystem(image.parent)
    size = offset + length
    if err in NO_SPACE_ERRNOS:
        st = os.statvfs(image.parent)
        free = st.f_bavail * st.f_frsize + os.stat(image).st_blocks * 512
        raise NoSpaceError(
            f"the host filesystem at {host.mount_point} cannot hold this container's quota: "
            f"its image needs {format_size(size)} reserved there and "
            f"{format_size(free)} is free (in loop mode a quota holds its whole size on the "
            "host)")
    if err == errno.EFBIG:
        limit = _MAX_FILE_BYTES.get(host.fstype)
        raise InvalidError(
            f"quota too large: its image of {format_size(size)} is bigger than {host.fstype} "
            f"at {host.mount_point} allows a file to be"
            + (f" ({format_size(limit)})" if limit else ""))
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise QuotaUnsupportedError(
            f"{host.fstype} at {host.mount_point} cannot reserve space (fallocate), so a loop "
            "quota there could lose acknowledged writes when the host fills: use a filesystem "
            "that can (ext4, xfs, btrfs) or project quotas")
    raise OSError(err, f"reserving {format_size(size)} for {image}: {os.strerror(err)}")


# Largest file a filesystem holds, for the message above, where it is below the quotas
# check_quota lets through: ext4 with 4 KiB blocks.
_MAX_FILE_BYTES = {"ext4": 16 * 1024**4 - 4096}


def _make_filesystem(image: Path, layout: Layout) -> Superblock:
    # A new, empty file every time: assume_storage_prezeroed is only true of zeros (fallocate
    # leaves its extents unwritten, which read as zeros).
    os.truncate(image, 0)
    _set_size(image, layout.blocks * BLOCK_SIZE)
    journal_mib = layout.journal_blocks * BLOCK_SIZE // MiB
    _run(["mkfs.ext4", "-F", "-q", "-b", str(BLOCK_SIZE), "-g", str(GROUPS.blocks),
          "-I", str(INODE_SIZE), "-N", str(layout.inodes), "-m", "0", "-J", f"size={journal_mib}",
          "-O", MKFS_FEATURES,
          "-e", "remount-ro", "-E", "nodiscard,assume_storage_prezeroed=1", str(image)],
         MKFS_TIMEOUT)
    return read_superblock(image)


def _converge(quota: int, start: int, apply: Callable[[int], tuple[int, int]],
              step: Callable[[int, int], int], what: str, *, can_shrink: bool = True) -> None:
    """Call ``apply(blocks) -> (blocks, capacity)``, then ``step(blocks, capacity)`` for the
    next size, until the capacity is in the quota's window."""
    low, _, high = capacity_window(quota)
    blocks = start
    seen = []
    for _ in range(_MAX_ROUNDS):
        blocks, capacity = apply(blocks)
        seen.append(f"{blocks}: {capacity}")
        if low <= capacity <= high:
            return
        if capacity > high and not can_shrink:
            break
        blocks = step(blocks, capacity)
    raise InternalError(f"could not size the loop filesystem for quota {format_size(quota)} "
                        f"({what}): wanted a capacity of {low}..{high} blocks; blocks: capacity "
                        f"were {', '.join(seen)}")


def _fsck(image: Path) -> None:
    # -p repairs what is safe to repair (exit 1 says it did); anything else needs a person.
    _run(["e2fsck", "-f", "-p", str(image)], FSCK_TIMEOUT, ok=(0, 1))


def _geometry(sb: Superblock) -> Geometry:
    shape = Groups(sb.blocks_per_group, sb.inodes_per_group)
    return Geometry(groups=shape,
                    descriptor_room=descriptor_blocks(shape.count(sb.blocks))
                    + sb.reserved_gdt_blocks,
                    reserved_gdt=sb.reserved_gdt_blocks)


def _resize_offline(fs: LoopFS, quota: int, space: Space) -> None:
    """e2fsck, then resize2fs and truncate until the capacity is right.

    ``space`` is statvfs of the filesystem as it is now. Capacity afterwards is predicted from
    the superblock (free blocks minus the kernel's reservation, which resizing changes) plus
    what files use (which resizing does not change), plus whatever the kernel counted
    differently from that prediction before the resize.
    """
    _fsck(fs.image)
    before = read_superblock(fs.image)
    geometry = _geometry(before)
    used = space.used // BLOCK_SIZE
    bias = space.available // BLOCK_SIZE - before.available
    _, aim, _ = capacity_window(quota)

    def apply(blocks: int) -> tuple[int, int]:
        current = read_superblock(fs.image)
        if blocks > current.blocks:
            _set_size(fs.image, blocks * BLOCK_SIZE)
        elif blocks < current.blocks:
            minimum = int(_run(["resize2fs", "-P", str(fs.image)],
                               RESIZE_TIMEOUT).rsplit(":", 1)[1])
            if blocks < minimum:
                raise ConflictError(
                    f"ext4 cannot shrink this container's filesystem that far: resize2fs needs "
                    f"an image of at least {format_size(minimum * BLOCK_SIZE)} for the "
                    f"{format_size(space.used)} and {space.inodes_used} inodes in use; choose a "
                    "larger quota")
        if blocks != current.blocks:
            _run(["resize2fs", str(fs.image), str(blocks)], RESIZE_TIMEOUT)
        after = read_superblock(fs.image)
        _set_size(fs.image, after.blocks * BLOCK_SIZE)  # never below what the fs spans
        return after.blocks, used + after.available + bias

    def step(blocks: int, capacity: int) -> int:
        return plan_resize(geometry, blocks, capacity, aim)

    _converge(quota, step(before.blocks, space.capacity // BLOCK_SIZE), apply, step,
              "offline resize")


# An online step can only grow, so a large one aims this fraction of itself short and a
# second, small step finishes exactly: the model's error is a fraction of the metadata added.
_ONLINE_UNDERSHOOT = 100


def _grow_online(fs: LoopFS, quota: int, where: str) -> None:
    """Grow while mounted: truncate, LOOP_SET_CAPACITY, resize2fs on the device."""
    if not has_capability(Path("/proc/self/status").read_text(), CAP_SYS_RESOURCE):
        raise ConflictError(
            "growing a mounted container's quota needs CAP_SYS_RESOURCE (ext4's online resize "
            "requires it) and this process lacks it: unmount the container to grow it offline")
    entry = next(e for e in mountinfo() if e.mount_point == where)
    device = next(d for d in devices(fs) if d.dev_t() == os.makedev(entry.major, entry.minor))
    resv = Path(f"/sys/fs/ext4/{device.path.name}/reserved_clusters")
    geometry = _geometry(read_superblock(device.path))
    low, aim, _ = capacity_window(quota)

    def apply(blocks: int) -> tuple[int, int]:
        current = os.stat(fs.image).st_size // BLOCK_SIZE
        if blocks > current:
            old_resv = int(resv.read_text()) if resv.exists() else None
            _set_size(fs.image, blocks * BLOCK_SIZE)
            loopdev.set_capacity(device)
            _run(["resize2fs", str(device.path), str(blocks)], RESIZE_TIMEOUT)
            # The kernel computes its reservation at mount only; set it to what the next mount
            # will compute, so the quota does not change on remount.
            if old_resv is not None and old_resv == reserved_clusters(current):
                resv.write_text(f"{reserved_clusters(blocks)}\n")
        return blocks, _statvfs(where).capacity // BLOCK_SIZE

    def step(blocks: int, capacity: int) -> int:
        new = plan_resize(geometry, blocks, capacity, aim)
        if new - blocks > geometry.groups.blocks:  # within one group the model is exact
            margin = max(aim - low, (new - blocks) // _ONLINE_UNDERSHOOT)
            new = plan_resize(geometry, blocks, capacity, aim - margin)
        return new

    start = os.stat(fs.image).st_size // BLOCK_SIZE
    _converge(quota, step(start, _statvfs(where).capacity // BLOCK_SIZE), apply, step,
              "online growth", can_shrink=False)


# -- the public operations -----------------------------------------------------------------------


def create(image: Path, mount_point: Path, quota: int) -> LoopFS:
    """Make an image, reserved on the host, holding an ext4 whose capacity is ``quota``, and
    mount it.

    The capacity lands in [quota + 64 KiB, quota + 2 MiB - 64 KiB]: the container can write its
    quota, and the next write fails with ENOSPC.
    """
    plan = plan_layout(quota)
    fs = LoopFS(image, mount_point)
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        raise ConflictError(f"{image} already exists") from None
    try:
        made: list[Superblock] = []

        def make(blocks: int) -> tuple[int, int]:
            sb = _make_filesystem(image, model_layout(blocks, plan.journal_blocks))
            made.append(sb)
            used = sb.used if sb.used is not None else FRESH_USED_BLOCKS
            return sb.blocks, used + sb.available

        _, aim, _ = capacity_window(quota)
        _converge(quota, plan.blocks, make,
                  lambda blocks, capacity: avoid_short_last_group(
                      next_blocks(blocks, aim - capacity)), "mkfs")
        _set_size(image, made[-1].blocks * BLOCK_SIZE)
        mount(fs)
        _calibrate(fs, quota)
    except BaseException:
        with contextlib.suppress(Exception):
            remove(fs)
        raise
    return fs


def _calibrate(fs: LoopFS, quota: int) -> None:
    """Check statvfs against the window once mounted; resize if this kernel counts otherwise."""
    low, _, high = capacity_window(quota)
    space = _statvfs(fs.mount_point)
    if low <= space.capacity // BLOCK_SIZE <= high:
        return
    unmount(fs)
    _resize_offline(fs, quota, space)
    mount(fs)
    space = _statvfs(fs.mount_point)
    if not low <= space.capacity // BLOCK_SIZE <= high:
        raise InternalError(f"the loop filesystem for quota {format_size(quota)} has a "
                            f"capacity of {format_size(space.capacity)} after calibration")


def mount(fs: LoopFS) -> None:
    """Bind the image to a loop device and mount it; nothing to do if it is mounted there."""
    if not fs.image.exists():
        raise NotFoundError(f"no loop quota image at {fs.image}")
    if _mounted_at(fs) is not None:
        return
    elsewhere = mounts(fs)
    if elsewhere:
        raise ConflictError(f"{fs.image} is mounted at {', '.join(elsewhere)}, not at "
                            f"{fs.mount_point}: unmount it first")
    fs.mount_point.mkdir(parents=True, exist_ok=True)
    here = os.path.realpath(fs.mount_point)
    other = [e for e in mountinfo() if e.mount_point == here]
    if other:
        raise ConflictError(f"{fs.mount_point} already has {other[-1].source} "
                            f"({other[-1].fstype}) mounted on it")
    # The filesystem a forced umount detached, still alive for the files open on it, is
    # mounted here again: a second mount of its device shares its superblock, so there is
    # still one filesystem over the image's blocks. A device bound to the image but mounted
    # nowhere is a leftover (a crash between bind and mount, a manual losetup): released, so
    # that one image never has two devices.
    alive = held(fs)
    _release(fs, [device for device in devices(fs) if device not in alive])
    if alive:
        _sys_mount(str(alive[0].path), fs.mount_point, "ext4", MOUNT_FLAGS, MOUNT_DATA)
        return
    reserve(fs.image)
    _attach_and_mount(fs.image, fs.mount_point, MOUNT_FLAGS)


def held(fs: LoopFS) -> list[loopdev.LoopDevice]:
    """The image's devices a filesystem still has. Asked where this namespace mounts the
    image nowhere, that is a mount a forced umount detached, alive until the last file open
    on it closes."""
    return [device for device in devices(fs) if loopdev.claimed(device)]


def _release(fs: LoopFS, which: list[loopdev.LoopDevice], wait: bool = True) -> None:
    """Unbind the devices; one a detached mount still has unbinds itself when that mount
    goes (autoclear), so it is not waited for."""
    for device in which:
        loopdev.detach(device)  # with a holder left, the kernel unbinds when it lets go
        if wait and not loopdev.claimed(device) and \
                not loopdev.wait_unbound(device, fs.image):
            raise ConflictError(f"{device.path} still holds {fs.image}: another process or "
                                "mount namespace has it open")


def unmount(fs: LoopFS, lazy: bool = False) -> None:
    """Unmount every mount of the image here and release its loop devices; idempotent.

    This is also the recovery for a forgotten filesystem: its devices are found by their
    backing file, whatever mounted them. ``lazy`` (a forced ``umount``) detaches the mounts
    even while files are open on them and leaves each device to unbind itself when the last
    of those closes (autoclear); until then ``mount`` mounts that device again (``held``).
    """
    for where in reversed(mounts(fs)):
        _sys_umount(where, lazy)
    _release(fs, devices(fs), wait=not lazy)


def resize(fs: LoopFS, new_quota: int, mounted: bool) -> None:
    """Give the container ``new_quota`` bytes in all (a no-op when that is what it has).

    Growing works mounted (online, which needs CAP_SYS_RESOURCE) or not. Shrinking needs the
    container unmounted and is refused below what it already uses. ``mounted`` is what the
    caller believes; the mount table is checked too, so a stale belief never shrinks a mounted
    filesystem offline.
    """
    check_quota(new_quota)
    if not fs.image.exists():
        raise NotFoundError(f"no loop quota image at {fs.image}")
    where = mounts(fs)
    if not where and (alive := held(fs)):  # offline tools on a live filesystem would wreck it
        raise ConflictError(f"{alive[0].path} still has this container's filesystem for files "
                            "opened on it before a forced umount: close those files first, "
                            "or grow the quota while the container is mounted")
    space = _measure(fs)
    low, _, high = capacity_window(new_quota)
    capacity = space.capacity // BLOCK_SIZE
    if low <= capacity <= high:
        return
    if capacity > high:
        if new_quota < space.used:
            raise ConflictError(f"cannot shrink the quota to {format_size(new_quota)}: the "
                                f"container already uses {format_size(space.used)}")
        if mounted or where:
            raise ConflictError("the container must be unmounted to shrink its quota (ext4 "
                                "cannot shrink a mounted filesystem)")
        _resize_offline(fs, new_quota, space)
    elif where:
        _grow_online(fs, new_quota, where[0])
    else:
        _resize_offline(fs, new_quota, space)


def remove(fs: LoopFS) -> list[loopdev.LoopDevice]:
    """Unmount if needed, delete the image, and remove the mount point if it is empty; or,
    while a forced umount's detached mount still has the filesystem, keep the image and
    return that device: it unbinds itself when the last file open on it closes."""
    unmount(fs)
    alive = held(fs)
    if alive:
        return alive
    with contextlib.suppress(FileNotFoundError):
        fs.image.unlink()
    with contextlib.suppress(OSError):  # absent, not empty, or a mount point of something else
        fs.mount_point.rmdir()
    return []
