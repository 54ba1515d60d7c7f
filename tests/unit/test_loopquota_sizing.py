"""The pure parts of loop-backed quotas: ioctl structures, the ext4 layout model, sizing rules,
superblock and mountinfo parsing. The golden layouts were measured with mke2fs 1.47.0 run the
way loopquota runs it, and with statvfs on kernel 6.18."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from imaged.errors import InvalidError
from imaged.host import loopdev
from imaged.host.mounts import MountEntry, parse_mountinfo
from imaged.quota import ext4layout as ext4
from imaged.quota import loopquota as lq

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4

# -- ioctl structures ----------------------------------------------------------------------------


def test_struct_sizes_match_the_kernel_abi() -> None:
    assert loopdev.LOOP_INFO64.size == 232
    assert loopdev.LOOP_CONFIG.size == 304 == 4 + 4 + 232 + 8 * 8


def test_loop_config_field_offsets() -> None:
    info = loopdev.LoopInfo(offset=4096, sizelimit=1 << 40,
                            flags=loopdev.LO_FLAGS_AUTOCLEAR, file_name="/var/lib/x.img")
    raw = loopdev.pack_loop_config(7, info, block_size=4096)
    assert struct.unpack_from("<II", raw, 0) == (7, 4096)
    # struct loop_info64 starts at 8: five __u64, then lo_number, encrypt type, key size, flags.
    assert struct.unpack_from("<QQ", raw, 8 + 24) == (4096, 1 << 40)
    assert struct.unpack_from("<I", raw, 8 + 52) == (loopdev.LO_FLAGS_AUTOCLEAR,)
    assert raw[8 + 56: 8 + 56 + 15] == b"/var/lib/x.img\0"
    assert raw[8 + 232:] == bytes(64)  # __reserved[8]


def test_loop_info_round_trip_and_long_names() -> None:
    info = loopdev.LoopInfo(device=0xFE00, inode=2146391, offset=0, sizelimit=0, number=3,
                            flags=loopdev.LO_FLAGS_AUTOCLEAR | loopdev.LO_FLAGS_READ_ONLY,
                            file_name="a" * 200)
    back = loopdev.unpack_loop_info64(loopdev.pack_loop_info64(info))
    assert back.file_name == "a" * 63  # LO_NAME_SIZE less the terminating NUL
    assert (back.device, back.inode, back.number, back.flags) == (0xFE00, 2146391, 3, 5)


@pytest.mark.parametrize("size", [1, 256, 1000, 3000])
def test_loop_block_size_must_be_a_power_of_two(size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        loopdev.pack_loop_config(3, loopdev.LoopInfo(), block_size=size)


def test_ioctl_numbers() -> None:
    assert (loopdev.LOOP_CLR_FD, loopdev.LOOP_SET_CAPACITY, loopdev.LOOP_CONFIGURE,
            loopdev.LOOP_CTL_GET_FREE) == (0x4C01, 0x4C07, 0x4C0A, 0x4C82)


OLD_GROUPS = ext4.Groups(32768, 8192)  # what imaged made before 16 MiB groups

# -- sizing rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(("quota", "journal"), [
    (4 * MiB, 4 * MiB), (256 * MiB, 4 * MiB), (257 * MiB, 8 * MiB), (1 * GiB, 16 * MiB),
    (3 * GiB, 64 * MiB), (100 * GiB, 64 * MiB),
])
def test_journal_size(quota: int, journal: int) -> None:
    assert ext4.journal_bytes(quota) == journal


@pytest.mark.parametrize(("blocks", "reserved"), [
    (4096, 81), (16384, 327), (204799, 4095), (204800, 4096), (26214400, 4096),
])
def test_kernel_reservation(blocks: int, reserved: int) -> None:
    assert ext4.reserved_clusters(blocks) == reserved


def test_superblock_backups_follow_sparse_super() -> None:
    assert [g for g in range(130) if ext4.has_super_backup(g)] == [0, 1, 3, 5, 7, 9, 25, 27, 49,
                                                                  81, 125]


@pytest.mark.parametrize(("blocks", "reserved"), [
    (4096, 15), (16384, 63), (76800, 299), (26214400, 1024),  # what mke2fs 1.47.0 reserved
])
def test_reserved_gdt_blocks(blocks: int, reserved: int) -> None:
    assert ext4.reserved_gdt_blocks(blocks) == reserved


def test_reserved_gdt_blocks_of_an_older_imaged_layout() -> None:
    assert ext4.reserved_gdt_blocks(16384, OLD_GROUPS) == 7  # 128 MiB groups, before 16 MiB ones


# (blocks asked, journal MiB) -> (blocks made, overhead, capacity, inodes), measured: mke2fs
# 1.47.0 with create()'s options, overhead from the superblock, inodes from dumpe2fs.
GOLDEN = [
    ((4096, 4), (4096, 1299, 2716, 4096)),
    ((16384, 4), (16384, 2251, 13806, 16384)),
    ((76800, 4), (76800, 7732, 67532, 77824)),
    ((524288, 16), (524288, 48417, 471775, 524288)),
    ((26214400, 64), (26214400, 1687834, 24522470, 26214400)),
    ((4196, 4), (4096, 1299, 2716, 4096)),  # a last group of 100 blocks is dropped
    ((12388, 4), (12288, 1896, 10147, 12288)),
    ((36984, 4), (36864, 4071, 32056, 36864)),
    ((98309, 16), (98304, 12598, 83740, 98304)),
    ((2686, 4), (2686, 1294, 1339, 4096)),
    ((98904, 64), (98904, 25162, 71764, 102400)),
]


@pytest.mark.parametrize(("asked", "made"), GOLDEN)
def test_layout_model_matches_mke2fs(asked: tuple[int, int],
                                     made: tuple[int, int, int, int]) -> None:
    blocks, journal_mib = asked
    layout = ext4.model_layout(blocks, journal_mib * MiB // ext4.BLOCK_SIZE)
    assert (layout.blocks, layout.overhead, layout.capacity, layout.inodes) == made


@pytest.mark.parametrize("quota", [ext4.MIN_QUOTA, 16 * MiB, 64 * MiB, GiB, 100 * GiB])
def test_every_block_of_the_quota_has_an_inode(quota: int) -> None:
    """The ratio the docs state: at least one inode per 4 KiB of quota, so only files without
    blocks (empty ones, symlinks, device nodes, whiteouts) can run out of inodes first."""
    layout = ext4.plan_layout(quota)
    assert layout.inodes >= quota // ext4.INODE_RATIO
    assert layout.inodes == ext4.GROUPS.count(layout.blocks) * ext4.GROUP_BLOCKS


def test_journal_must_fit_twice() -> None:
    assert not ext4.model_layout(2200, 1024).journal_fits  # mke2fs: "journal too big"
    assert ext4.model_layout(2686, 1024).journal_fits


def test_last_group_too_small_is_avoided() -> None:
    group = ext4.GROUP_BLOCKS
    minimum = ext4.last_group_minimum(group + 1)
    assert minimum == 2 + 256 + 50 + 1 + 1 + ext4.reserved_gdt_blocks(group + 1)  # group 1
    for asked in (group + 10, group + minimum - 1, group + minimum):
        made = ext4.avoid_short_last_group(asked)
        assert ext4.model_layout(made, 1024).blocks == made  # mke2fs keeps it
        assert ext4.model_layout(made - 1, 1024).blocks == group  # and it is the smallest
    assert ext4.avoid_short_last_group(2 * group) == 2 * group
    assert ext4.avoid_short_last_group(1000) == 1000  # one group: never dropped
    # Group 2 has no superblock backup, so its minimum is the bitmaps and table alone.
    assert ext4.last_group_minimum(2 * group + 1) == 2 + 256 + 50


def test_capacity_window() -> None:
    low, aim, high = ext4.capacity_window(16 * MiB)
    assert (low, aim, high) == (4096 + 16, 4096 + 64, 4096 + 496)
    assert high * ext4.BLOCK_SIZE < 16 * MiB + 2 * MiB


def test_next_blocks_pays_for_metadata_and_reservation() -> None:
    assert ext4.next_blocks(10_000, 0) == 10_000
    small = ext4.next_blocks(10_000, 1000) - 10_000
    large = ext4.next_blocks(1_000_000, 1000) - 1_000_000
    assert small > large > 1000  # below 800 MiB the 2% reservation grows too
    assert ext4.next_blocks(10_000, -1000) == 10_000 - small
    assert ext4.next_blocks(10, -1000) == 1


@pytest.mark.parametrize("quota", [4 * MiB, 4 * MiB + 1, 5 * MiB, 16 * MiB, 64 * MiB,
                                   300 * MiB, GiB, 100 * GiB, 10 * TiB])
def test_plan_lands_in_the_window(quota: int) -> None:
    layout = ext4.plan_layout(quota)
    low, _, high = ext4.capacity_window(quota)
    assert low <= layout.capacity <= high
    assert layout.journal_fits
    assert layout.journal_blocks * ext4.BLOCK_SIZE == ext4.journal_bytes(quota)
    assert ext4.avoid_short_last_group(layout.blocks) == layout.blocks


def test_plan_sweep() -> None:
    rng = random.Random(20240601)  # noqa: S311 - reproducible test sizes, not secrets
    for quota in [rng.randint(4 * MiB, 200 * GiB) for _ in range(300)]:
        layout = ext4.plan_layout(quota)
        low, _, high = ext4.capacity_window(quota)
        assert low <= layout.capacity <= high, quota


def test_super_backups_counts_sparse_groups() -> None:
    for groups in (1, 2, 3, 10, 26, 800, 100_000):
        assert ext4.super_backups(groups) == sum(ext4.has_super_backup(g) for g in range(groups))


# (geometry, blocks, capacity now, capacity wanted) -> (blocks planned, capacity resize2fs gave)
RESIZES = [
    # 16 MiB grown to 64 MiB, 2 GiB and 100 GiB (past the reserved descriptor blocks)
    (ext4.Geometry(ext4.GROUPS, 24, 23), 5891, 4184, 16448, 19220, 16447),
    (ext4.Geometry(ext4.GROUPS, 24, 23), 5891, 4184, 524352, 565608, 524351),
    (ext4.Geometry(ext4.GROUPS, 24, 23), 5891, 4184, 26214464, 27984549, 26214463),
    # 2 GiB shrunk to 300 MiB (resize2fs turns freed descriptor blocks into reserved ones)
    (ext4.Geometry(ext4.GROUPS, 1027, 1024), 585036, 524546, 76864, 99656, 76865),
    # the same on images an older imaged made
    (ext4.Geometry(OLD_GROUPS, 3, 2), 5820, 4162, 524352, 538233, 524351),
    (ext4.Geometry(OLD_GROUPS, 3, 2), 5820, 4162, 26214464, 26637677, 26214465),
    (ext4.Geometry(OLD_GROUPS, 268, 267), 547172, 524532, 76864, 88913, 76863),
]


@pytest.mark.parametrize(("geometry", "blocks", "capacity", "wanted", "planned", "measured"),
                         RESIZES)
def test_resize_plan_matches_resize2fs(geometry: ext4.Geometry, blocks: int, capacity: int,
                                       wanted: int, planned: int, measured: int) -> None:
    assert ext4.plan_resize(geometry, blocks, capacity, wanted) == planned
    assert capacity + ext4.capacity_change(geometry, blocks, planned) == measured


def test_resize_plan_never_asks_for_a_short_last_group() -> None:
    for geometry, blocks, capacity in ((ext4.Geometry(ext4.GROUPS, 24, 23), 5891, 4184),
                                       (ext4.Geometry(OLD_GROUPS, 3, 2), 5820, 4162)):
        for wanted in range(30_000, 40_000, 97):
            planned = ext4.plan_resize(geometry, blocks, capacity, wanted)
            assert ext4.avoid_short_last_group(planned, geometry.groups, geometry.reserved_gdt) \
                == planned


@pytest.mark.parametrize("quota", [0, 1, MiB, 4 * MiB - 1])
def test_quota_below_minimum_is_invalid(quota: int) -> None:
    with pytest.raises(InvalidError, match=r"minimum of 4 MiB"):
        ext4.plan_layout(quota)


@pytest.mark.parametrize("quota", [True, 1.5, "16M"])
def test_quota_must_be_bytes(quota: object) -> None:
    with pytest.raises(InvalidError, match="whole number of bytes"):
        ext4.check_quota(quota)  # type: ignore[arg-type]


def test_create_refuses_a_small_quota_before_touching_disk(tmp_path: Path) -> None:
    with pytest.raises(InvalidError, match="minimum"):
        lq.create(tmp_path / "img", tmp_path / "mnt", MiB)
    assert list(tmp_path.iterdir()) == []


# -- superblock, mountinfo, capabilities ---------------------------------------------------------


def _superblock(blocks: int, free: int, *, bit64: bool = True, overhead: int = 1547,
                magic: int = ext4.EXT4_MAGIC) -> bytes:
    raw = bytearray(1024)
    struct.pack_into("<IIIIIIIIII", raw, 0, 16384, blocks & 0xFFFFFFFF, 0, free & 0xFFFFFFFF,
                     16373, 0, 2, 2, 32768, 32768)
    struct.pack_into("<I", raw, 0x28, 8192)
    struct.pack_into("<H", raw, 0x38, magic)
    struct.pack_into("<II", raw, 0x5C, ext4.COMPAT_HAS_JOURNAL, 0x80 if bit64 else 0)
    struct.pack_into("<H", raw, 0xCE, 7)
    struct.pack_into("<III", raw, 0x150, blocks >> 32, 0, free >> 32)
    struct.pack_into("<I", raw, 0x248, overhead)
    return bytes(raw)


def test_parse_superblock() -> None:
    sb = ext4.parse_superblock(_superblock(16384, 14831))
    assert (sb.blocks, sb.free_blocks, sb.block_size, sb.inodes_per_group) == (16384, 14831,
                                                                               4096, 8192)
    assert sb.reserved_gdt_blocks == 7
    assert sb.available == 14831 - 327
    assert sb.used == 16384 - 14831 - 1547
    big = ext4.parse_superblock(_superblock(1 << 33, (1 << 32) + 5))
    assert (big.blocks, big.free_blocks) == (1 << 33, (1 << 32) + 5)
    assert ext4.parse_superblock(_superblock(16384, 14831, overhead=0)).used is None


def test_parse_superblock_refuses_other_things() -> None:
    with pytest.raises(InvalidError, match="magic"):
        ext4.parse_superblock(_superblock(1, 1, magic=0x1234))
    with pytest.raises(InvalidError, match="truncated"):
        ext4.parse_superblock(b"\0" * 100)


def test_parse_mountinfo() -> None:
    text = (
        "42 27 7:3 / /var/lib/imaged/drivers/overlay/c\\040d/mnt rw,relatime shared:7 - ext4 "
        "/dev/loop3 rw,discard\n"
        "43 27 0:51 / /merged rw - overlay overlay rw,lowerdir=/a:/b\n"
        "garbage line\n"
    )
    entries = parse_mountinfo(text)
    assert entries[0] == MountEntry(42, 7, 3, "/var/lib/imaged/drivers/overlay/c d/mnt",
                                       "ext4", "/dev/loop3", ("rw", "discard"))
    assert (entries[1].fstype, entries[1].major, entries[1].minor) == ("overlay", 0, 51)
    assert len(entries) == 2


def test_has_capability() -> None:
    # This VM's root: every capability but CAP_SYS_RESOURCE (24).
    status = "Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n"
    assert lq.has_capability(status, 21)  # CAP_SYS_ADMIN
    assert not lq.has_capability(status, lq.CAP_SYS_RESOURCE)
    assert lq.has_capability("CapEff:\t000001ffffffffff\n", lq.CAP_SYS_RESOURCE)
    assert not lq.has_capability("no such line", 0)
