"""The partial copy-up range record (``imaged.fuse.ranges``) without a kernel.

No kernel overlay behaviour to mirror here (overlay copies whole files); the model is the file
itself: reading through the record must give exactly the bytes a plain file would hold after
the same writes and truncates, and a crash (a log cut anywhere) must leave a record no newer
than what was acknowledged and never older in a way that serves the lower for written bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imaged.fuse.ranges import (
    END,
    ENTRY_SIZE,
    CorruptLog,
    RangeSet,
    Span,
    aligned,
    encode,
    encode_add,
    encode_sync,
    replay,
    settle,
)


def test_add_coalesces() -> None:
    ranges = RangeSet([(10, 20), (30, 40)])
    ranges.add(20, 30)
    assert list(ranges) == [(10, 40)]
    ranges.add(0, 5)
    ranges.add(50, 60)
    ranges.add(3, 52)
    assert list(ranges) == [(0, 60)]
    ranges.add(70, 70)
    assert list(ranges) == [(0, 60)] and len(ranges) == 1


def test_add_refuses_bad_ranges() -> None:
    for start, end in ((-1, 2), (5, 4), (0, END + 1)):
        with pytest.raises(ValueError):
            RangeSet().add(start, end)


def test_split() -> None:
    ranges = RangeSet([(10, 20), (30, 40)])
    assert ranges.split(0, 50) == [Span(0, 10, False), Span(10, 20, True),
                                   Span(20, 30, False), Span(30, 40, True),
                                   Span(40, 50, False)]
    assert ranges.split(12, 15) == [Span(12, 15, True)]
    assert ranges.split(20, 30) == [Span(20, 30, False)]
    assert ranges.split(5, 5) == []
    assert ranges.gaps(15, 35) == [(20, 30)]
    assert ranges.covers(10, 20) and not ranges.covers(10, 21)


def test_a_fresh_partial_copy() -> None:
    """The upper holds nothing yet, but everything past the lower's end is the upper's."""
    ranges = RangeSet.for_lower(100)
    assert ranges.split(90, 110) == [Span(90, 100, False), Span(100, 110, True)]
    assert not ranges.complete


def test_truncate_never_brings_lower_bytes_back() -> None:
    """Shrunk then regrown, the cut bytes read as zeros from the upper, not the lower's."""
    ranges = RangeSet.for_lower(100)
    ranges.truncate(50)
    assert ranges.gaps(0, 100) == [(0, 50)]
    ranges.add(0, 50)
    assert ranges.complete


def test_fill_whole_blocks() -> None:
    """A write copies the rest of its aligned blocks from the lower first, so the record stays
    a list of blocks; what is already in the upper, or written, is not copied."""
    ranges = RangeSet.for_lower(10_000)
    assert aligned(4100, 4200, 4096) == (4096, 8192)
    assert ranges.fill(4100, 4200, 4096) == [(4096, 4100), (4200, 8192)]
    ranges.add(4096, 8192)
    assert ranges.fill(5000, 9000, 4096) == [(9000, 10_000)]
    assert ranges.fill(0, 4096, 4096) == []
    assert aligned(7, 7, 4096) == (7, 7)
    with pytest.raises(ValueError):
        ranges.fill(0, 1, 0)


SIZE = 64
OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("truncate"), st.integers(0, SIZE + 20), st.just(b""))), max_size=25)


@given(st.binary(max_size=SIZE), OPS, st.sampled_from([1, 4, 16]))
def test_record_against_a_byte_array(lower: bytes, ops: list[tuple[str, int, bytes]],
                                     block: int) -> None:
    """A partial copy read through the record equals a plain file after random writes and
    truncates, with writes filling whole blocks first as the shell will."""
    model = bytearray(lower)
    upper = bytearray(len(lower))  # sparse: zeros where nothing was copied
    ranges = RangeSet.for_lower(len(lower))
    size = len(lower)
    for op, offset, data in ops:
        if op == "write":
            end = offset + len(data)
            for start, stop in ranges.fill(offset, end, block):
                assert stop <= size  # past the size the upper is authoritative already
                piece = lower[start:stop]  # past the lower's end: nothing (recorded anyway)
                upper[start:start + len(piece)] = piece
            if len(upper) < end:
                upper.extend(bytes(end - len(upper)))
            upper[offset:end] = data
            ranges.add(*aligned(offset, end, block))
            if len(model) < end:
                model.extend(bytes(end - len(model)))
            model[offset:end] = data
            size = max(size, end)
        else:
            ranges.truncate(offset)
            del upper[offset:]
            upper.extend(bytes(max(0, offset - len(upper))))
            del model[offset:]
            model.extend(bytes(max(0, offset - len(model))))
            size = offset
        read = b"".join((upper if span.upper else lower)[span.start:span.end].ljust(
            span.end - span.start, b"\0") for span in ranges.split(0, size))
        assert read == bytes(model)
        assert RangeSet(list(ranges)) == ranges


RANGES = st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 100)).map(
    lambda r: (r[0], r[0] + r[1])), max_size=15)


@given(RANGES)
def test_log_round_trip(adds: list[tuple[int, int]]) -> None:
    ranges = RangeSet(adds)
    ranges.truncate(2000)
    log = encode(ranges)
    assert replay(log) == replay(log)
    again = replay(log)
    assert (again.ranges, again.length, again.torn) == (ranges, len(log), False)


@given(RANGES, st.data())
def test_replay_of_any_prefix_is_a_prefix_of_the_writes(adds: list[tuple[int, int]],
                                                        data: st.DataObject) -> None:
    """A crash cuts the log anywhere: replay gives the record after the whole entries only,
    and says where the next append goes."""
    log = b"".join(encode_add(start, end) for start, end in adds)
    cut = data.draw(st.integers(0, len(log)))
    result = replay(log[:cut])
    whole = cut // ENTRY_SIZE
    assert result.ranges == RangeSet(adds[:whole])
    assert result.length == whole * ENTRY_SIZE
    assert result.torn == (cut % ENTRY_SIZE != 0)


def test_a_torn_last_entry_is_ignored() -> None:
    log = encode_add(0, 10) + encode_add(20, 30)
    garbled = log[:-1] + bytes([log[-1] ^ 1])
    assert replay(garbled).ranges == RangeSet([(0, 10)])
    zeroed = log[:ENTRY_SIZE] + bytes(ENTRY_SIZE)  # ext4 grew the file, the data never came
    assert (replay(zeroed).length, replay(zeroed).torn) == (ENTRY_SIZE, True)


def test_damage_before_the_end_is_refused() -> None:
    """Only the last entry can be torn by a crash; anything else serving the lower for a
    written range would be worse than refusing the file."""
    log = bytearray(encode_add(0, 10) + encode_add(20, 30) + encode_add(40, 50))
    log[3] ^= 0xFF
    with pytest.raises(CorruptLog):
        replay(bytes(log))
    body = bytes([9]) + bytes(19)
    future = body + zlib.crc32(body).to_bytes(4, "little")
    with pytest.raises(CorruptLog, match="kind 9"):
        replay(future)


# sync entries and settling after a crash

WRITES = st.lists(st.one_of(
    st.tuples(st.integers(0, 60), st.integers(1, 8)).map(lambda r: (r[0], r[0] + r[1])),
    st.just(None)), max_size=20)  # None: an fsync


def _log_of(ops: list[tuple[int, int] | None]) -> tuple[bytes, int]:
    """The log the I/O shell appends for ``ops`` after a fresh copy-up of a 100-byte lower,
    and its length at the last sync entry (what an fsync made durable)."""
    log = encode(RangeSet.for_lower(100))
    synced = len(log)
    for op in ops:
        if op is None:
            log += encode_sync()
            synced = len(log)
        else:
            log += encode_add(*op)
    return log, synced


def _segments(held: RangeSet) -> Callable[[int, int], list[tuple[int, int]]]:
    """SEEK_DATA over an upper holding data exactly in ``held``."""
    return lambda start, end: [(s.start, s.end) for s in held.split(start, end) if s.upper]


@given(WRITES)
def test_after_a_process_kill_every_write_stands(ops: list[tuple[int, int] | None]) -> None:
    """A kill -9 leaves the page cache: every appended entry's data is there, so settle keeps
    all of them, fsynced or not, and drops nothing."""
    log, _ = _log_of(ops)
    got = replay(log)
    everything = RangeSet.for_lower(100)
    for op in ops:
        if op is not None:
            everything.add(*op)
    assert settle(got, _segments(everything)) == (everything, False)


@given(WRITES, st.data())
def test_after_a_power_cut_fsynced_writes_stand_and_no_hole_is_served(
        ops: list[tuple[int, int] | None], data: st.DataObject) -> None:
    """A power cut keeps the log up to its last sync entry and any longer prefix, the data of
    every write before that sync, and any subset of the later writes' data. The settled
    record holds every fsynced write, and never claims a byte below the lower's size the
    upper holds no data for (that would show zeros nobody wrote)."""
    log, synced = _log_of(ops)
    cut = data.draw(st.integers(synced, len(log)))
    disk = RangeSet()
    fsynced = RangeSet()
    pending: list[tuple[int, int]] = []
    for op in ops:
        if op is None:
            for start, end in pending:
                fsynced.add(start, end)
                disk.add(start, end)
            pending.clear()
        else:
            pending.append(op)
    for start, end in pending:
        if data.draw(st.booleans()):
            disk.add(start, end)
    record, dropped = settle(replay(log[:cut]), _segments(disk))
    assert all(record.covers(start, end) for start, end in fsynced)
    claimed_without_data = [gap for start, end in record if start < 100
                            for gap in disk.gaps(start, min(end, 100))]
    assert claimed_without_data == []
    assert dropped == (record != replay(log[:cut]).ranges)


def test_an_unconfirmed_write_whose_data_is_lost_falls_back_to_the_lower() -> None:
    log = encode(RangeSet.for_lower(100)) + encode_add(0, 10) + encode_sync() + \
        encode_add(20, 30) + encode_add(40, 50) + encode_add(60, END)
    got = replay(log)
    assert got.confirmed == RangeSet([(0, 10), (60, END)])
    assert got.unconfirmed == ((20, 30), (40, 50))
    record, dropped = settle(got, _segments(RangeSet([(0, 10), (20, 30), (44, 46)])))
    assert record == RangeSet([(0, 10), (20, 30), (44, 46), (60, END)])
    assert dropped


def test_a_log_without_sync_entries_is_all_unconfirmed() -> None:
    got = replay(encode_add(0, 10) + encode_add(20, 30))
    assert got.confirmed == RangeSet() and got.unconfirmed == ((0, 10), (20, 30))
    assert got.ranges == RangeSet([(0, 10), (20, 30)])


def test_a_sync_entry_with_a_range_is_refused() -> None:
    bad = bytearray(encode_sync())
    bad[4] = 1
    bad[-4:] = zlib.crc32(bytes(bad[:20])).to_bytes(4, "little")
    with pytest.raises(CorruptLog):
        replay(encode_add(0, 10) + bytes(bad))
