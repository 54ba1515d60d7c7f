"""Quotas on any kernel with loop devices: one loop-backed ext4 per container (DESIGN §3).

A container's overlay upper and work directories live on an ext4 made inside a file, so the
filesystem's size is the quota: the container can write its quota and the next write fails with
ENOSPC, with no kernel quota support at all.

Reservation. The image's blocks are allocated on the host when it is made, grown or mounted
(``fallocate``: extents marked unwritten, so nothing is written and they read as zeros), and the
mount does not use ``discard``, which would punch them out again. A quota of Q therefore holds Q
on the host. It must: a sparse image overcommits the host, and when the host fills, the loop
device turns ENOSPC into I/O errors under a filesystem that had already acknowledged the writes
(a 10 MiB ``dd conv=fsync`` into a 32 MiB quota on a full root reported success and read back as
zeros, then ext4 aborted its journal). A create or grow the host cannot back is refused with the
numbers; a mount of an image made sparse (by an older imaged) reserves it first.

Sizing. ext4 keeps part of every filesystem for itself: the journal, one block bitmap, one inode
bitmap and one inode table per block group, superblock and descriptor backups, and a
kernel-side reservation of 2% of the blocks (at most 16 MiB, ``s_resv_clusters``) that even
root cannot write into. What a container can write is what ``statvfs`` calls available, and
that is exactly ``free blocks - reserved blocks - min(blocks // 50, 4096)`` read from the
superblock before the first mount (checked from 4 MiB to 100 GiB on kernels 6.18 and 6.1). So
the image is sized by a model of mke2fs's layout (exact against mke2fs 1.47 and resize2fs on
every size tried), made, and checked against its own superblock; if the check misses, the size
is corrected and the file made again. After mounting, ``statvfs`` confirms it. The target is
``quota + 256 KiB`` of capacity (room for the root directory, lost+found and the driver's
upper/work directories), accepted between ``quota + 64 KiB`` and ``quota + 2 MiB - 64 KiB``.
Near full, a write larger than what is left may fail whole rather than in part (ext4 with large
folios, kernel 6.16+): a container writing 1 MiB at a time stops at its last whole MiB, one
writing 4 KiB at a time reaches the capacity. Either way it can write its quota.

mkfs choices (the layout does not depend on the host's mke2fs.conf):
- 4 KiB blocks; ``-m 0``: containers write as root, so a root reserve would only be lost space;
- 16 MiB block groups (``-g``) of 4096 256-byte inodes each, one per block, the last partial
  group included (``-N``); see Inodes;
- journal ``quota / 64`` rounded up to a power of two, between 4 MiB (ext4's minimum of 1024
  blocks) and 64 MiB: enough for a container's metadata bursts, little host space once written;
- no ``flex_bg``: with it, resize2fs demands a whole flex group of inode tables as slack when
  shrinking (a container grown to 2 GiB holding 15 MiB could not shrink below 51 MiB; without
  it, 21 MiB); ``resize_inode`` kept, so online growth up to 1024 times needs no conversion;
- no ``quota``/``project`` features (a kernel without CONFIG_QUOTA refuses to mount those);
- ``assume_storage_prezeroed`` (e2fsprogs 1.47): the file is new and reads as zeros (its
  extents are unwritten), so mke2fs skips zeroing inode tables and journal and marks them zeroed
  (no lazy init thread either), which saves writing them: a 100 GiB filesystem's inode tables
  alone are 6.7 GiB;
- ``-e remount-ro``: a corrupted container filesystem stops taking writes.

Inodes. ext4 fixes a group's inode count when the filesystem is made, and resizing adds or drops
whole groups. With 128 MiB groups (mke2fs's default) a 16 MiB quota and the same container grown
to 64 MiB had the same 8,192 inodes. So groups are 16 MiB and every one holds an inode per
block: a quota of Q has at least Q / 4 KiB inodes, growth keeps the ratio in 16 MiB steps, and
only blockless files (empty files, symlinks, device nodes, overlay whiteouts) can exhaust inodes
before the quota's bytes are used. That is mke2fs's ratio for small filesystems; with its 16 KiB
default, files averaging less than that would run out of inodes first. It costs a sixteenth of
the image in inode tables, reserved on the host like the rest; ``ps`` shows inodes used and in
all.

Mount choices: no ``discard`` (see Reservation), ``nosuid,nodev`` (the backing mount is visible
on the host, where set-uid files and device nodes a container wrote must not work; through the
container's overlay both still work, since the overlay's own mount decides), and the kernel's
default ``relatime``, not ``noatime``: overlay updates atime on the upper inode through this
mount, so ``noatime`` here would freeze atime for the container's files. The mount is the
mount(2) system call, not ``mount(8)``: the autoclear loop device must stay open in this process
until the mount holds it, the errno is exact, and no fstab, utab or util-linux loop logic gets
involved. A mount cannot be given a timeout; ext4's is bounded by journal replay, at most 64 MiB
here.

Growth works online (reserve, LOOP_SET_CAPACITY, resize2fs on the device), which ext4 allows
only with CAP_SYS_RESOURCE; without it, growing needs the container unmounted. Online steps
cannot be undone, so a large one aims 1% short and small ones finish; the kernel computes its
2% reservation only at mount, so after growing it is set through sysfs to what the next mount
will compute. Shrinking needs the container unmounted always (ext4 cannot shrink online):
e2fsck, resize2fs, truncate. Both are planned with the same layout model.

Callers serialize operations on one container; two processes mounting the same image at once
could bind it to two loop devices.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imaged import loopdev, tools
from imaged.errors import (
    NO_SPACE_ERRNOS,
    ConflictError,
    InternalError,
    InvalidError,
    NoSpaceError,
    NotFoundError,
    QuotaUnsupportedError,
)
from imaged.mounts import backing_filesystem, mountinfo
from imaged.sizes import format_size

KiB, MiB, GiB = 1024, 1024**2, 1024**3

BLOCK_SIZE = 4096
INODE_SIZE = 256
INODE_RATIO = BLOCK_SIZE  # bytes of filesystem per inode (module docstring, "Inodes")
GROUP_BLOCKS = 4096  # 16 MiB groups: the step in which inodes follow the quota
DESCRIPTOR_SIZE = 64  # the 64bit feature's group descriptors
MAX_RESERVED_GDT = BLOCK_SIZE // 4  # the resize inode's one indirect block of block numbers
# Blocks a fresh filesystem's files use: root directory, lost+found (4) and the resize inode's
# indirect block. They count as "used" in statvfs.
FRESH_USED_BLOCKS = 6
JOURNAL_MIN = 4 * MiB  # ext4's smallest journal: 1024 blocks
JOURNAL_MAX = 64 * MiB
# The kernel's ext4_calculate_resv_clusters(): 2% of the blocks, at most 4096 clusters.
RESV_CLUSTERS_MAX = 4096
RESV_CLUSTERS_DIVISOR = 50

# The capacity a quota gets: aimed at quota + SLACK_AIM, accepted within [SLACK_MIN, SLACK_MAX].
SLACK_AIM = 256 * KiB
SLACK_MIN = 64 * KiB
SLACK_MAX = 2 * MiB - 64 * KiB
# The smallest ext4 with a journal: mke2fs wants twice the journal (1024 blocks) free before it
# places it, which leaves about 3.8 MiB to files. Smaller quotas would need a journal-less
# filesystem; refusing them is simpler and honest.
MIN_QUOTA = 4 * MiB

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
MOUNT_DATA = ""  # no discard: it would give the reservation back (module docstring)
FALLOC_FL_KEEP_SIZE = 1
CAP_SYS_RESOURCE = 24

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


@dataclass(frozen=True)
class Groups:
    """How an ext4 is cut into block groups: chosen by mkfs and kept by every resize, which
    adds or drops whole groups of this shape, so inodes keep their ratio to blocks."""

    blocks: int  # per group
    inodes: int  # per group

    @property
    def table_blocks(self) -> int:
        return self.inodes * INODE_SIZE // BLOCK_SIZE

    @property
    def metadata_blocks(self) -> int:
        """Block and inode bitmaps plus the inode table, in every group."""
        return 2 + self.table_blocks

    def count(self, blocks: int) -> int:
        return -(-blocks // self.blocks)


GROUPS = Groups(GROUP_BLOCKS, GROUP_BLOCKS * BLOCK_SIZE // INODE_RATIO)  # what create() makes


@dataclass(frozen=True)
class LoopFS:
    """A container's loop-backed filesystem: its image file and where it is mounted."""

    image: Path
    mount_point: Path


# -- pure sizing ---------------------------------------------------------------------------------


def check_quota(quota: int) -> None:
    if isinstance(quota, bool) or not isinstance(quota, int):
        raise InvalidError(f"quota must be a whole number of bytes, not {quota!r}")
    if quota < MIN_QUOTA:
        raise InvalidError(f"quota {format_size(quota)} is below the minimum of "
                           f"{format_size(MIN_QUOTA)} for loop-backed quotas (the smallest "
                           "ext4 with a journal)")


def journal_bytes(quota: int) -> int:
    """quota / 64 rounded up to a power of two, within [4 MiB, 64 MiB]."""
    want = max(1, -(-quota // 64))
    return min(JOURNAL_MAX, max(JOURNAL_MIN, 1 << (want - 1).bit_length()))


def reserved_clusters(blocks: int) -> int:
    """What the kernel holds back from every writer at mount (ext4_calculate_resv_clusters)."""
    return min(blocks // RESV_CLUSTERS_DIVISOR, RESV_CLUSTERS_MAX)


def has_super_backup(group: int) -> bool:
    """sparse_super: groups 0, 1 and the powers of 3, 5 and 7 carry superblock backups."""
    if group <= 1:
        return True
    for base in (3, 5, 7):
        power = base
        while power < group:
            power *= base
        if power == group:
            return True
    return False


def descriptor_blocks(groups: int) -> int:
    return -(-groups // (BLOCK_SIZE // DESCRIPTOR_SIZE))


def reserved_gdt_blocks(blocks: int, shape: Groups = GROUPS) -> int:
    """mke2fs reserves descriptor blocks for growth to 1024x (or 2^32 blocks), capped at 1024."""
    limit = 0xFFFFFFFF
    if blocks < limit // 1024:
        limit = blocks * 1024
    wanted = descriptor_blocks(shape.count(limit)) - descriptor_blocks(shape.count(blocks))
    return max(0, min(wanted, MAX_RESERVED_GDT))


@dataclass(frozen=True)
class Layout:
    """What mke2fs will make of ``blocks`` with a journal of ``journal_blocks``."""

    blocks: int  # after mke2fs drops a last group too small to be worth having
    overhead: int  # blocks of metadata and journal: the kernel's s_overhead_clusters
    journal_blocks: int

    @property
    def groups(self) -> int:
        return GROUPS.count(self.blocks)

    @property
    def inodes(self) -> int:
        return self.groups * GROUPS.inodes

    @property
    def capacity(self) -> int:
        """Blocks files can use once mounted, the fresh root and lost+found included."""
        return self.blocks - self.overhead - reserved_clusters(self.blocks)

    @property
    def journal_fits(self) -> bool:
        # mke2fs refuses a journal larger than half the blocks free when it places it.
        return 2 * self.journal_blocks <= self.blocks - (self.overhead - self.journal_blocks)


def super_backups(groups: int) -> int:
    """How many of the first ``groups`` groups carry a superblock backup (sparse_super)."""
    count = min(groups, 2)
    for base in (3, 5, 7):
        power = base
        while power < groups:
            count += 1
            power *= base
    return count


def metadata_blocks(blocks: int, shape: Groups = GROUPS,
                    descriptor_room: int | None = None) -> int:
    """Blocks of superblock and descriptor copies, bitmaps and inode tables (journal apart).

    Every backup group holds a superblock and the descriptor blocks plus the reserved ones.
    ``descriptor_room`` is those two together for an existing filesystem: growth turns reserved
    blocks into descriptor blocks at no cost until the room is used up, then adds blocks to
    every backup; shrinking turns freed descriptor blocks into reserved ones, up to resize2fs's
    cap of 1024. Left out, it is what mke2fs would reserve for ``blocks``.
    """
    groups = shape.count(blocks)
    descriptors = descriptor_blocks(groups)
    if descriptor_room is None:
        descriptor_room = descriptors + reserved_gdt_blocks(blocks, shape)
    per_backup = 1 + max(descriptors, min(descriptor_room, descriptors + MAX_RESERVED_GDT))
    return super_backups(groups) * per_backup + groups * shape.metadata_blocks


def last_group_minimum(blocks: int, shape: Groups = GROUPS,
                       reserved_gdt: int | None = None) -> int:
    """The fewest blocks mke2fs and resize2fs keep in a last, partial group (its metadata plus
    50); a shorter last group is dropped, so sizes in that range all give the same capacity."""
    minimum = shape.metadata_blocks + 50
    if has_super_backup(shape.count(blocks) - 1):
        reserved = reserved_gdt_blocks(blocks, shape) if reserved_gdt is None else reserved_gdt
        minimum += 1 + descriptor_blocks(shape.count(blocks)) + reserved
    return minimum


def avoid_short_last_group(blocks: int, shape: Groups = GROUPS,
                           reserved_gdt: int | None = None) -> int:
    """``blocks``, or the smallest size above it whose last group would not be dropped.

    A fresh filesystem's minimum grows with its size (mke2fs reserves descriptor blocks in
    proportion), so the size is raised until it meets its own minimum.
    """
    if blocks <= shape.blocks or not blocks % shape.blocks:
        return blocks
    while (minimum := last_group_minimum(blocks, shape, reserved_gdt)) > blocks % shape.blocks:
        blocks += minimum - blocks % shape.blocks
    return blocks


def model_layout(blocks: int, journal_blocks: int) -> Layout:
    remainder = blocks % GROUPS.blocks
    if remainder and blocks > GROUPS.blocks and remainder < last_group_minimum(blocks):
        blocks -= remainder  # mke2fs: "last group too small", dropped
    return Layout(blocks, metadata_blocks(blocks) + journal_blocks, journal_blocks)


def capacity_window(quota: int) -> tuple[int, int, int]:
    """(lowest, aimed, highest) capacity in blocks for ``quota``.

    Capacity is what files may hold in all (used plus available), so the window does not move
    as the container fills up.
    """
    low = -(-(quota + SLACK_MIN) // BLOCK_SIZE)
    aim = -(-(quota + SLACK_AIM) // BLOCK_SIZE)
    high = (quota + SLACK_MAX) // BLOCK_SIZE
    return low, aim, high


def next_blocks(blocks: int, shortfall: int, shape: Groups = GROUPS) -> int:
    """The size that should change capacity by ``shortfall`` blocks (negative to shrink).

    Every block added also brings its group's share of bitmaps and inode table and, below
    800 MiB, 2% more kernel reservation; the step is divided by what is left, rounded away
    from zero so a step never falls short by rounding alone.
    """
    gain = 1 - shape.metadata_blocks / shape.blocks
    if blocks < RESV_CLUSTERS_MAX * RESV_CLUSTERS_DIVISOR:
        gain -= 1 / RESV_CLUSTERS_DIVISOR
    step = math.ceil(abs(shortfall) / gain)
    return max(1, blocks + (step if shortfall >= 0 else -step))


@dataclass(frozen=True)
class Geometry:
    """What an existing filesystem's resizes depend on, from its superblock."""

    groups: Groups
    descriptor_room: int  # descriptor plus reserved descriptor blocks in a backup group
    reserved_gdt: int


def capacity_change(geometry: Geometry, old: int, new: int) -> int:
    """How capacity (in blocks) changes when a filesystem of ``old`` blocks becomes ``new``.

    Exact for resize2fs (checked from 16 MiB to 100 GiB and back). Online, past the reserved
    descriptor blocks, the kernel converts to meta_bg, which keeps fewer descriptor copies, so
    the change is then slightly larger than this.
    """

    def metadata(blocks: int) -> int:
        return metadata_blocks(blocks, geometry.groups, geometry.descriptor_room)

    return ((new - old) - (metadata(new) - metadata(old))
            - (reserved_clusters(new) - reserved_clusters(old)))


def plan_resize(geometry: Geometry, blocks: int, capacity: int, target: int) -> int:
    """The size whose capacity should be ``target`` blocks, for a filesystem of ``blocks``
    blocks with ``capacity`` now; never a size whose last group would be dropped."""
    new = blocks
    for _ in range(32):
        predicted = capacity + capacity_change(geometry, blocks, new)
        if predicted == target:
            break
        candidate = avoid_short_last_group(next_blocks(new, target - predicted, geometry.groups),
                                           geometry.groups, geometry.reserved_gdt)
        if candidate == new:
            break
        new = candidate
    return new


def plan_layout(quota: int) -> Layout:
    """The filesystem to make for ``quota``: the model's layout whose capacity is in the window.

    Raises InvalidError when ext4 cannot be made that small (see MIN_QUOTA).
    """
    check_quota(quota)
    journal = journal_bytes(quota) // BLOCK_SIZE
    low, aim, high = capacity_window(quota)
    blocks = aim + journal + GROUPS.metadata_blocks + 16
    for _ in range(16):
        layout = model_layout(blocks, journal)
        if low <= layout.capacity <= high:
            if not layout.journal_fits:
                break
            return layout
        blocks = avoid_short_last_group(next_blocks(layout.blocks, aim - layout.capacity))
    raise InvalidError(f"no ext4 layout gives quota {format_size(quota)}: the minimum for "
                       f"loop-backed quotas is {format_size(MIN_QUOTA)}")


# -- the superblock ------------------------------------------------------------------------------

EXT4_MAGIC = 0xEF53
_SB_OFFSET = 1024
_SB_SIZE = 1024
INCOMPAT_64BIT = 0x80
COMPAT_HAS_JOURNAL = 0x4


@dataclass(frozen=True)
class Superblock:
    """The fields of an ext4 superblock the sizing needs (on-disk, little-endian)."""

    blocks: int
    reserved_blocks: int
    free_blocks: int
    block_size: int
    blocks_per_group: int
    inodes_per_group: int
    reserved_gdt_blocks: int
    overhead_clusters: int  # mke2fs and resize2fs record it; 0 when unknown
    feature_compat: int
    feature_incompat: int

    @property
    def available(self) -> int:
        """Blocks statvfs will report available once mounted (f_bavail)."""
        return self.free_blocks - self.reserved_blocks - reserved_clusters(self.blocks)

    @property
    def used(self) -> int | None:
        """Blocks held by files, when the superblock records the overhead."""
        if not self.overhead_clusters:
            return None
        return self.blocks - self.free_blocks - self.overhead_clusters


def parse_superblock(data: bytes) -> Superblock:
    if len(data) < _SB_SIZE:
        raise InvalidError("not an ext4 image: superblock truncated")
    (blocks_lo, r_blocks_lo, free_lo, _first_data, log_block, _log_cluster, per_group,
     _clusters_per_group, inodes_per_group) = struct.unpack_from("<4xIII4xIIIIII", data, 0)
    (magic,) = struct.unpack_from("<H", data, 0x38)
    if magic != EXT4_MAGIC:
        raise InvalidError(f"not an ext4 image: magic {magic:#06x}")
    compat, incompat = struct.unpack_from("<II", data, 0x5C)
    (reserved_gdt,) = struct.unpack_from("<H", data, 0xCE)
    blocks_hi, r_blocks_hi, free_hi = struct.unpack_from("<III", data, 0x150)
    (overhead,) = struct.unpack_from("<I", data, 0x248)
    if not incompat & INCOMPAT_64BIT:
        blocks_hi = r_blocks_hi = free_hi = 0
    return Superblock(blocks=blocks_lo | blocks_hi << 32,
                      reserved_blocks=r_blocks_lo | r_blocks_hi << 32,
                      free_blocks=free_lo | free_hi << 32, block_size=1024 << log_block,
                      blocks_per_group=per_group, inodes_per_group=inodes_per_group,
                      reserved_gdt_blocks=reserved_gdt, overhead_clusters=overhead,
                      feature_compat=compat, feature_incompat=incompat)


def read_superblock(image: Path) -> Superblock:
    with open(image, "rb") as f:
        f.seek(_SB_OFFSET)
        return parse_superblock(f.read(_SB_SIZE))


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


def _sys_umount(target: str) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
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
    # A device still bound to the image but mounted nowhere is a leftover (a crash between
    # bind and mount, or a manual losetup): release it so one image never has two devices.
    _release(fs)
    reserve(fs.image)
    _attach_and_mount(fs.image, fs.mount_point, MOUNT_FLAGS)


def _release(fs: LoopFS) -> None:
    for device in devices(fs):
        loopdev.detach(device)  # with a holder left, the kernel unbinds when it lets go
        if not loopdev.wait_unbound(device, fs.image):
            raise ConflictError(f"{device.path} still holds {fs.image}: another process or "
                                "mount namespace has it open")


def unmount(fs: LoopFS) -> None:
    """Unmount every mount of the image here and release its loop devices; idempotent.

    This is also the recovery for a forgotten filesystem: its devices are found by their
    backing file, whatever mounted them.
    """
    for where in reversed(mounts(fs)):
        _sys_umount(where)
    _release(fs)


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


def remove(fs: LoopFS) -> None:
    """Unmount if needed, delete the image, and remove the mount point if it is empty."""
    unmount(fs)
    with contextlib.suppress(FileNotFoundError):
        fs.image.unlink()
    with contextlib.suppress(OSError):  # absent, not empty, or a mount point of something else
        fs.mount_point.rmdir()
