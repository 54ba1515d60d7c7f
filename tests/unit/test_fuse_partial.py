"""The partial file's I/O shell (``imaged.fuse.partial``) on plain files, without a mount or
root: reading through the record gives the bytes a plain file would hold after the same writes
and truncates, every range the record gives the upper holds the right bytes there, and the log
on disk replays to the record in memory after every step."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imaged.fuse import partial, ranges
from imaged.fuse.partial import Damaged, Partial
from imaged.fuse.ranges import RangeSet

_LOWER = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: the last block is partial


@contextmanager
def _partial(lower_data: bytes = _LOWER) -> Iterator[Partial]:
    with tempfile.TemporaryDirectory() as tmp:
        with open(Path(tmp) / "lower", "wb") as f:  # zero blocks left as holes
            f.truncate(len(lower_data))
            for at in range(0, len(lower_data), 4096):
                if any(lower_data[at:at + 4096]):
                    f.seek(at)
                    f.write(lower_data[at:at + 4096])
        upper = os.open(Path(tmp) / "upper", os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(upper, len(lower_data))
        log = os.open(Path(tmp) / "log", os.O_CREAT | os.O_RDWR | os.O_APPEND, 0o600)
        record = RangeSet.for_lower(len(lower_data))
        os.write(log, ranges.encode(record))
        part = Partial(1, record, upper, os.open(Path(tmp) / "lower", os.O_RDONLY), log)
        try:
            yield part
        finally:
            part.close()


def _check(part: Partial, model: bytearray) -> None:
    assert partial.read(part, 0, len(model) + 100) == model
    assert partial.read(part, 4090, 20) == model[4090:4110]
    size = os.fstat(part.upper).st_size
    assert size == len(model)
    for start, stop in part.ranges:
        end = min(stop, size)
        if start < end:  # what the record gives the upper, the upper holds
            assert os.pread(part.upper, end - start, start) == model[start:end]
    log = os.pread(part.log, 1 << 20, 0)
    assert ranges.replay(log).ranges == part.ranges


_OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 14000), st.binary(min_size=1, max_size=5000)),
    st.tuples(st.just("truncate"), st.integers(0, 14000), st.just(b""))), max_size=10)


@settings(max_examples=60, deadline=None)
@given(_OPS)
def test_reads_match_a_plain_file(ops: list[tuple[str, int, bytes]]) -> None:
    model = bytearray(_LOWER)
    with _partial() as part:
        for op, off, data in ops:
            if op == "write":
                assert partial.write(part, off, data) == len(data)
                model.extend(bytes(max(0, off - len(model))))
                model[off:off + len(data)] = data
            else:
                partial.truncate(part, off)
                del model[off:]
                model.extend(bytes(off - len(model)))
            _check(part, model)


def test_writes_record_whole_blocks_and_fill_their_edges() -> None:
    model = bytearray(_LOWER)
    with _partial() as part:
        partial.write(part, 4095, b"ab")
        model[4095:4097] = b"ab"
        assert list(part.ranges) == [(0, 8192), (len(_LOWER), ranges.END)]
        _check(part, model)
        assert os.pread(part.upper, 4096, 4096)[1:] == model[4097:8192]  # filled


def test_completing_copies_only_the_lowers_data() -> None:
    lower = bytes(8192) + b"x" * 100  # a hole, then data
    with _partial(lower) as part:
        partial.write(part, 0, b"y")
        assert partial.missing(part) == [(8192, 8292)]
        assert partial.cost(partial.missing(part)) == 2 * partial.BLOCK


def test_no_room_names_the_numbers() -> None:
    message = str(partial.NoRoom(5 << 20, 1 << 20))
    assert "5 MiB" in message and "1 MiB" in message and "grow the quota" in message


@pytest.mark.parametrize("ref", [b"x/big", b"0/big", b"3/big", b"1/../big", b"1/", b"1/a//b",
                                 b"1/./big"])
def test_a_lower_reference_stays_in_its_layer(tmp_path: Path, ref: bytes) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_text("b")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Damaged) as damaged:
            partial.open_lower([fd, fd], ref)
        assert damaged.value.errno == errno.EIO
        os.close(partial.open_lower([fd, fd], b"2/a/b"))
    finally:
        os.close(fd)


def test_a_lower_reference_follows_no_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("f")
    os.symlink("real", tmp_path / "link")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError, match=r"Not a directory|Too many levels"):
            partial.open_lower([fd], b"1/link/f")
    finally:
        os.close(fd)
