"""Project quotas' pure parts: the quotactl command word, limit units, if_dqblk, id allocation."""

from __future__ import annotations

import struct

import pytest

from imaged.errors import QuotaUnsupportedError
from imaged.quota import projquota


def test_command_word_matches_the_kernel_macro() -> None:
    # QCMD(Q_GETQUOTA, PRJQUOTA) = 0x80000702 as an unsigned word: negative as a C int.
    assert projquota.qcmd(0x800007) == 0x80000702 - (1 << 32)
    assert projquota.qcmd(0x800008) & 0xFFFFFFFF == 0x80000802


@pytest.mark.parametrize(("quota", "blocks"), [(1, 1), (1024, 1), (1025, 2), (10 << 20, 10240)])
def test_limits_round_up_to_whole_kib(quota: int, blocks: int) -> None:
    assert projquota.limit_blocks(quota) == blocks


def test_limit_sets_hard_and_soft_block_limits_only() -> None:
    data = projquota.pack_limit(5 << 20)
    assert len(data) == 72  # sizeof(struct if_dqblk) on x86_64
    hard, soft, space, ihard, isoft, inodes, btime, itime, valid = struct.unpack("=8QI4x", data)
    assert hard == soft == 5120
    assert (space, ihard, isoft, inodes, btime, itime) == (0, 0, 0, 0, 0, 0)
    assert valid == 1  # QIF_BLIMITS: the kernel must not touch usage, inodes or times
    assert struct.unpack("=8QI4x", projquota.pack_limit(None))[:2] == (0, 0)


def test_usage_reads_bytes_limit_and_inodes() -> None:
    filled = struct.pack("=8QI4x", 2048, 2048, 123_456, 0, 0, 7, 0, 0, 0x3F)
    assert projquota.unpack_usage(filled) == (123_456, 2048 * 1024, 7)
    unlimited = struct.pack("=8QI4x", 0, 0, 42, 0, 0, 1, 0, 0, 0x3F)
    assert projquota.unpack_usage(unlimited) == (42, None, 1)


def test_allocation_takes_the_smallest_free_id_of_the_range() -> None:
    first = projquota.FIRST_ID
    assert projquota.allocate([]) == first
    assert projquota.allocate([first, first + 1, first + 3, 5]) == first + 2


def test_exhausted_range_is_a_clear_error() -> None:
    with pytest.raises(QuotaUnsupportedError, match="project ids"):
        projquota.allocate(range(projquota.FIRST_ID, projquota.LAST_ID + 1))
