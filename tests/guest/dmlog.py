"""dm-log-writes' log, read and replayed in Python: Debian packages no ``replay-log``.

The kernel (drivers/md/dm-log-writes.c) writes a super block at sector 0 and then, from the
device's first block on, one block per entry: a 32-byte header (sector, nr_sectors, flags,
data_len, little-endian) padded to the logged device's block size, followed by the entry's data
(``nr_sectors`` blocks) unless it is a discard. A mark's name sits in its header block after the
header. Sectors and counts are in the logged device's blocks (``sectorsize``), not 512-byte
sectors. Entries are logged in the order writes reached the disk's cache and a flush entry
comes after every write it made durable, so replaying entries 0..N gives the disk as a power cut
right after entry N would have left it, when N is a flush or FUA.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH = 1
FUA = 2
DISCARD = 4
MARK = 8
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")


class LogError(Exception):
    """The log is not one dm-log-writes wrote, or it is cut short."""


@dataclass(frozen=True)
class Entry:
    """One logged write, flush, discard or mark; ``offset`` is where its data starts in the log."""

    index: int
    sector: int
    nr_sectors: int
    flags: int
    mark: str | None
    offset: int

    @property
    def durable(self) -> bool:
        """A point a power cut can leave the disk at with everything before it on the platter."""
        return bool(self.flags & (FLUSH | FUA))


@dataclass(frozen=True)
class Log:
    sectorsize: int
    entries: list[Entry]

    def marks(self) -> dict[str, int]:
        """Each mark's name and its entry's index (a later mark of the same name wins)."""
        return {e.mark: e.index for e in self.entries if e.mark is not None}

    def durable_points(self) -> list[int]:
        return [e.index for e in self.entries if e.durable]


def read_log(log: BinaryIO) -> Log:
    """Every entry the super block counts; a log shorter than that is an error, not a stop."""
    log.seek(0)
    head = log.read(SUPER.size)
    if len(head) < SUPER.size:
        raise LogError("the log has no super block")
    magic, version, count, sectorsize = SUPER.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise LogError(f"not a dm-log-writes log (magic {magic:#x}, version {version})")
    if sectorsize < ENTRY.size or sectorsize % 512:
        raise LogError(f"the log's block size {sectorsize} is not a device's")
    entries = []
    position = sectorsize
    for index in range(count):
        log.seek(position)
        block = log.read(sectorsize)
        if len(block) < sectorsize:
            raise LogError(f"the log ends inside entry {index} of {count}")
        sector, nr_sectors, flags, data_len = ENTRY.unpack_from(block)
        mark = None
        if flags & MARK:
            if data_len > sectorsize - ENTRY.size:
                raise LogError(f"entry {index}: a mark of {data_len} bytes")
            mark = block[ENTRY.size:ENTRY.size + data_len].decode()
        position += sectorsize
        entries.append(Entry(index, sector, nr_sectors, flags, mark, position))
        if not flags & DISCARD:
            position += nr_sectors * sectorsize
    return Log(sectorsize, entries)


def replay(log: BinaryIO, parsed: Log, target: BinaryIO, upto: int, start: int = 0) -> None:
    """Entries ``start``..``upto`` written onto ``target``, the device as it stood before
    ``start`` (a sweep advances one copy rather than replaying from the start at every point);
    discards write zeros, as the device under the log was not asked to remember them."""
    size = parsed.sectorsize
    for entry in parsed.entries[start:upto + 1]:
        if entry.nr_sectors == 0:
            continue
        target.seek(entry.sector * size)
        if entry.flags & DISCARD:
            target.write(bytes(entry.nr_sectors * size))
            continue
        log.seek(entry.offset)
        data = log.read(entry.nr_sectors * size)
        if len(data) < entry.nr_sectors * size:
            raise LogError(f"the log ends inside entry {entry.index}'s data")
        target.write(data)
    target.flush()


def sample(points: list[int], keep: set[int], limit: int) -> list[int]:
    """At most ``limit`` of ``points`` spread evenly, plus every point in ``keep``: a sweep whose
    time is bounded whatever the workload's flush count, that never skips the points right
    after an operation returned."""
    if len(points) <= limit:
        return list(points)
    step = len(points) / limit
    chosen = {points[int(i * step)] for i in range(limit)} | {points[-1]}
    return sorted(chosen | (keep & set(points)))

