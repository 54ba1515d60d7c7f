"""The range record of a partially copied-up file: which bytes the upper holds, and its log.

A partial copy-up (issue 14, "Copy-up") leaves a sparse upper file beside its lower file. Reads of
ranges nobody wrote still come from the lower; everything written comes from the upper. The record
is the set of byte ranges the upper is authoritative for. Two rules make it exact:

- Past the file's current size the upper is authoritative, whatever it holds: the record starts
  as ``[lower size, END)`` (``RangeSet.for_lower``), and a truncate to ``n`` adds ``[n, END)``.
  Bytes cut by a truncate and regrown by a later write or truncate read as zeros then, never
  as the lower's bytes again.
- A range enters the record only once the upper holds its bytes; ``fill`` says which lower
  bytes to copy first so a write can record whole aligned blocks (a record of blocks stays
  small, one of every 4 KiB write would not).

The record persists as an append-only log of fixed-size entries, each with its own CRC-32. A
kill at any moment leaves at most the last entry torn, which ``replay`` ignores. The promise is
the one a plain file makes: a kill -9 of the server loses no acknowledged write (data and entry
are in the page cache, which outlives the process), and a power cut loses nothing fsynced. So a
write syncs nothing (a 4 KiB write costing two fdatasyncs was most of its latency), and fsync
writes a "sync" entry. The I/O shell keeps the order that makes this crash-safe:
- write: fill and write the data to the upper, then append the entry. A kill between leaves
  the range unrecorded, so it reads from the lower: the write was not acknowledged.
- fsync: fdatasync the upper, then append a sync entry and fdatasync the log. Entries before
  the last sync entry are confirmed: their data is on disk.
- load: an entry after the last sync entry is unconfirmed; after a power cut the log may hold
  it while the upper lost its data (the two files reach the disk in no set order). ``settle``
  keeps what the upper holds data for and drops the rest, which was never fsynced, so the
  lower's bytes are a state the file may show. Serving the upper's hole there instead would
  show zeros nobody wrote. An entry ending at ``END`` (truncate, completion) holds no data by
  nature and counts as confirmed.
- truncate: append and fdatasync the entry first, then truncate the upper. Recorded first, a
  crash never lets a shrunk-then-regrown range show the lower's old bytes.
- after ``replay``, truncate the log to ``Replay.length`` before appending again, or new entries
  would follow a torn one and be lost at the next replay; and once ``settle`` dropped a range,
  rewrite the log, or a later sync entry would confirm it.
- compaction: write ``encode(ranges)`` (which ends in a sync entry) to a temporary file,
  fsync, rename over the log.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

END = 1 << 63  # past any offset off_t holds: "from here on, whatever the size"

_ENTRY = struct.Struct("<B3xQQ")  # kind, start, end
_CRC = struct.Struct("<I")
ENTRY_SIZE = _ENTRY.size + _CRC.size  # 24
_KIND_ADD = 1
_KIND_SYNC = 2  # all data of the entries before it is on disk; another kind is a newer format


@dataclass(frozen=True, slots=True)
class Span:
    """A piece of a read: ``[start, end)`` comes from the upper or from the lower."""

    start: int
    end: int
    upper: bool


def _check(start: int, end: int) -> None:
    if not 0 <= start <= end <= END:
        raise ValueError(f"invalid range [{start}, {end})")


class RangeSet:
    """Disjoint, coalesced ``[start, end)`` ranges, kept as two sorted lists.

    Adjacent and overlapping ranges merge on ``add``, so the representation of a set is unique
    and equality is structural.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    @classmethod
    def for_lower(cls, size: int) -> RangeSet:
        """A fresh partial copy of a lower file of ``size`` bytes: the upper holds nothing yet
        but is authoritative past the end."""
        return cls([(size, END)])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def copy(self) -> RangeSet:
        clone = RangeSet()
        clone._starts = list(self._starts)
        clone._ends = list(self._ends)
        return clone

    def add(self, start: int, end: int) -> None:
        """The upper now holds ``[start, end)``."""
        _check(start, end)
        if start == end:
            return
        first = bisect.bisect_left(self._ends, start)  # first range ending at or after start
        stop = bisect.bisect_right(self._starts, end)  # ranges starting at or before end
        if first < stop:
            start = min(start, self._starts[first])
            end = max(end, self._ends[stop - 1])
        self._starts[first:stop] = [start]
        self._ends[first:stop] = [end]

    def truncate(self, size: int) -> None:
        """The file was truncated to ``size``: everything from there is the upper's (zeros
        until written), shrink and regrow alike."""
        self.add(size, END)

    def covers(self, start: int, end: int) -> bool:
        """The upper holds all of ``[start, end)``."""
        return not self.gaps(start, end)

    @property
    def complete(self) -> bool:
        """Fully materialised: the upper file alone is the file, and its record can go."""
        return self.covers(0, END)

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` the upper does not hold (to read from, or copy from,
        the lower)."""
        return [(s, e) for s, e, upper in self._spans(start, end) if not upper]

    def split(self, start: int, end: int) -> list[Span]:
        """A read of ``[start, end)`` cut into the pieces to take from the upper or the lower,
        in order, adjacent, covering it exactly."""
        return [Span(s, e, upper) for s, e, upper in self._spans(start, end)]

    def _spans(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        _check(start, end)
        at = start
        index = bisect.bisect_right(self._ends, start)  # first range ending after start
        while at < end:
            if index < len(self._starts) and self._starts[index] <= at:
                stop = min(end, self._ends[index])
                yield at, stop, True
                index += 1
            else:
                stop = min(end, self._starts[index]) if index < len(self._starts) else end
                yield at, stop, False
            at = stop

    def fill(self, start: int, end: int, block: int) -> list[tuple[int, int]]:
        """Before writing ``[start, end)``: the lower ranges to copy into the upper so that the
        write's aligned ``block``-sized blocks are whole, after which the shell records
        ``aligned(start, end, block)``. The written range itself needs no copy."""
        if block <= 0:
            raise ValueError("block must be positive")
        low, high = aligned(start, end, block)
        return [gap for piece in ((low, start), (end, high)) if piece[0] < piece[1]
                for gap in self.gaps(*piece)]


def aligned(start: int, end: int, block: int) -> tuple[int, int]:
    """``[start, end)`` widened to whole blocks (an empty range stays empty)."""
    _check(start, end)
    if start == end:
        return start, end
    return start - start % block, min(END, -(-end // block) * block)


# the log


class CorruptLog(ValueError):
    """A range log damaged before its last entry: no crash of ours leaves that, so the file
    cannot be trusted (serving the lower for a range that was written is the one thing the
    record must never do)."""


@dataclass(frozen=True, slots=True)
class Replay:
    """What a log holds: the confirmed ranges, the entries after the last sync entry, and the
    length of its intact prefix, where the next append goes (``torn``: bytes after it were a
    torn entry, to cut before appending)."""

    confirmed: RangeSet
    unconfirmed: tuple[tuple[int, int], ...]
    length: int
    torn: bool

    @property
    def ranges(self) -> RangeSet:
        """The record after a process kill: every entry, since the page cache kept all the
        data they describe."""
        record = self.confirmed.copy()
        for start, end in self.unconfirmed:
            record.add(start, end)
        return record


def _entry(kind: int, start: int, end: int) -> bytes:
    body = _ENTRY.pack(kind, start, end)
    return body + _CRC.pack(zlib.crc32(body))


def encode_add(start: int, end: int) -> bytes:
    """One log entry: the upper holds ``[start, end)``."""
    _check(start, end)
    return _entry(_KIND_ADD, start, end)


def encode_sync() -> bytes:
    """The entry fsync appends once the upper's data is on disk: the entries before it are
    confirmed."""
    return _entry(_KIND_SYNC, 0, 0)


def encode(ranges: RangeSet) -> bytes:
    """A compacted log holding exactly ``ranges``, all confirmed (it is written after the
    upper's data is on disk)."""
    return b"".join(encode_add(start, end) for start, end in ranges) + encode_sync()


def replay(data: bytes) -> Replay:
    """The record a log describes, stopping at a torn last entry (short, or failing its CRC:
    a crash mid-append). A bad entry with more than one entry's worth of bytes after it is no
    torn append but damage: ``CorruptLog``."""
    confirmed = RangeSet()
    pending: list[tuple[int, int]] = []
    view = memoryview(data)
    offset = 0
    torn = False
    while offset < len(data):
        chunk = view[offset:offset + ENTRY_SIZE]
        body = bytes(chunk[:_ENTRY.size])
        intact = len(chunk) == ENTRY_SIZE and \
            _CRC.unpack_from(chunk, _ENTRY.size)[0] == zlib.crc32(body)
        if not intact:
            if len(data) - offset > ENTRY_SIZE:
                raise CorruptLog(f"range log entry at byte {offset} is damaged and not last")
            torn = True
            break
        kind, start, end = _ENTRY.unpack(body)
        if kind == _KIND_SYNC and start == end == 0:
            for pair in pending:
                confirmed.add(*pair)
            pending.clear()
        elif kind == _KIND_ADD and 0 <= start <= end <= END:
            if end == END:
                confirmed.add(start, end)
            else:
                pending.append((start, end))
        else:
            raise CorruptLog(f"range log entry at byte {offset} is not one this version "
                             f"writes (kind {kind}, [{start}, {end}))")
        offset += ENTRY_SIZE
    return Replay(confirmed, tuple(pending), offset, torn)


def settle(got: Replay, data: Callable[[int, int], Iterable[tuple[int, int]]]
           ) -> tuple[RangeSet, bool]:
    """The record to serve after a crash of either kind, given ``data(start, end)``: the
    segments of ``[start, end)`` the upper holds data for (SEEK_DATA, which sees the page cache
    too, so after a process kill nothing is dropped). Confirmed ranges stand; of an unconfirmed
    one, only what the upper holds data for. Returns the record and whether anything was
    dropped (then the log must be rewritten before the next sync entry)."""
    record = got.confirmed.copy()
    dropped = False
    for start, end in got.unconfirmed:
        for gap_start, gap_end in record.gaps(start, end):
            held = list(data(gap_start, gap_end))
            for seg_start, seg_end in held:
                record.add(max(seg_start, gap_start), min(seg_end, gap_end))
            dropped = dropped or sum(min(e, gap_end) - max(s, gap_start) for s, e in held) \
                < gap_end - gap_start
    return record, dropped
