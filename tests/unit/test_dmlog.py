"""The dm-log-writes reader and replayer (tests/guest/dmlog.py) on logs laid out as
drivers/md/dm-log-writes.c lays them out, so a misread of the format fails here, on the host,
rather than as a puzzling crash-consistency failure in the guest."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.guest import dmlog
from tests.guest.test_powercut import sparse_copy

pytestmark = pytest.mark.unit

BLOCK = 512


class Writer:
    """The kernel's side: entries from the first block on, the super block counting them."""

    def __init__(self, sectorsize: int = BLOCK) -> None:
        self.size = sectorsize
        self.body = bytearray()
        self.count = 0

    def entry(self, sector: int, flags: int, data: bytes = b"", mark: str = "",
              nr_sectors: int | None = None) -> None:
        count = len(data) // self.size if nr_sectors is None else nr_sectors
        name = mark.encode()
        header = dmlog.ENTRY.pack(sector, count, flags, len(name) or len(data)) + name
        self.body += header.ljust(self.size, b"\0") + data
        self.count += 1

    def image(self) -> io.BytesIO:
        superblock = dmlog.SUPER.pack(dmlog.MAGIC, dmlog.VERSION, self.count, self.size)
        return io.BytesIO(superblock.ljust(self.size, b"\0") + bytes(self.body))


def block(byte: int, count: int = 1, size: int = BLOCK) -> bytes:
    return bytes([byte]) * size * count


def test_entries_marks_and_durable_points_are_read() -> None:
    log = Writer()
    log.entry(4, 0, block(1, 2))
    log.entry(0, dmlog.FLUSH)
    log.entry(0, dmlog.MARK, mark="pull-one")
    log.entry(2, dmlog.DISCARD, nr_sectors=3)
    log.entry(9, dmlog.FUA, block(2))
    parsed = dmlog.read_log(log.image())
    assert [(e.sector, e.nr_sectors, e.flags) for e in parsed.entries] == [
        (4, 2, 0), (0, 0, dmlog.FLUSH), (0, 0, dmlog.MARK), (2, 3, dmlog.DISCARD),
        (9, 1, dmlog.FUA)]
    assert parsed.marks() == {"pull-one": 2}
    assert parsed.durable_points() == [1, 4]
    # Data follows its header; a discard has none, so the next header follows at once.
    assert [e.offset for e in parsed.entries] == [2 * BLOCK, 5 * BLOCK, 6 * BLOCK, 7 * BLOCK,
                                                  8 * BLOCK]


def test_replay_stops_at_the_entry_asked_for_and_discards_zero() -> None:
    log = Writer()
    log.entry(0, 0, block(1, 4))
    log.entry(0, dmlog.FLUSH)
    log.entry(1, dmlog.DISCARD, nr_sectors=2)
    log.entry(3, dmlog.FUA, block(7))
    image = log.image()
    parsed = dmlog.read_log(image)
    disk = io.BytesIO(bytes(6 * BLOCK))
    dmlog.replay(image, parsed, disk, 1)
    assert disk.getvalue() == block(1, 4) + bytes(2 * BLOCK)
    disk = io.BytesIO(bytes(6 * BLOCK))
    dmlog.replay(image, parsed, disk, 3)
    assert disk.getvalue() == block(1) + bytes(2 * BLOCK) + block(7) + bytes(2 * BLOCK)


def test_sectors_count_in_the_devices_blocks() -> None:
    """A 4096-byte device logs sector 2 as its third 4 KiB block, not the third 512 bytes."""
    log = Writer(4096)
    log.entry(2, dmlog.FUA, block(5, 1, 4096))
    image = log.image()
    parsed = dmlog.read_log(image)
    disk = io.BytesIO(bytes(4 * 4096))
    dmlog.replay(image, parsed, disk, 0)
    assert disk.getvalue()[2 * 4096:3 * 4096] == block(5, 1, 4096)
    assert disk.getvalue().count(0) == 3 * 4096


def test_a_foreign_or_cut_log_is_refused() -> None:
    with pytest.raises(dmlog.LogError, match="not a dm-log-writes log"):
        dmlog.read_log(io.BytesIO(bytes(BLOCK)))
    log = Writer()
    log.entry(0, 0, block(1, 2))
    cut = io.BytesIO(log.image().getvalue()[:-BLOCK])
    parsed = dmlog.read_log(cut)
    with pytest.raises(dmlog.LogError, match="inside entry 0's data"):
        dmlog.replay(cut, parsed, io.BytesIO(), 0)
    log.count += 1  # the super block counts an entry the log does not hold
    with pytest.raises(dmlog.LogError, match="ends inside entry 1 of 2"):
        dmlog.read_log(log.image())


def test_sample_bounds_the_sweep_and_keeps_the_points_after_operations() -> None:
    points = list(range(0, 200, 2))
    chosen = dmlog.sample(points, {51, 52, 198}, 10)
    assert 52 in chosen and 198 in chosen and 51 not in chosen
    assert len(chosen) <= 12 and chosen == sorted(chosen)
    assert dmlog.sample(points[:5], set(), 10) == points[:5]


def test_replay_in_steps_equals_replay_at_once() -> None:
    log = Writer()
    for index in range(6):
        log.entry(index % 3, dmlog.FLUSH if index % 2 else 0, block(index + 1))
    image = log.image()
    parsed = dmlog.read_log(image)
    once = io.BytesIO(bytes(3 * BLOCK))
    dmlog.replay(image, parsed, once, 5)
    steps = io.BytesIO(bytes(3 * BLOCK))
    dmlog.replay(image, parsed, steps, 2)
    dmlog.replay(image, parsed, steps, 5, start=3)
    assert steps.getvalue() == once.getvalue() == block(4) + block(5) + block(6)


def test_sparse_copy_keeps_bytes_and_holes(tmp_path: Path) -> None:
    """The sweep's copy of a disk (tests/guest/test_powercut.py): the same bytes, and no more
    blocks than the source holds, so a 64 MiB disk of a little data stays small in the guest."""
    source, target = tmp_path / "source.img", tmp_path / "target.img"
    with source.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"data" * 1024)
        f.seek(40 << 20)
        f.write(b"more" * 4096)
    sparse_copy(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_blocks <= source.stat().st_blocks + 16
