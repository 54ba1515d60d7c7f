"""The size model of the ext4 a loop quota is made of: what mke2fs and resize2fs will make of a
size, and what capacity a container gets from it. Pure: the I/O is ``imaged.quota.loopquota``'s.

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
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from imaged.errors import InvalidError
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


# -- sizing ---------------------------------------------------------------------------------------


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
SB_OFFSET = 1024
SB_SIZE = 1024
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
    if len(data) < SB_SIZE:
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
