"""The btrfs driver's pure parts: reading ``btrfs qgroup show --raw -e`` and the probe's refusal
of a root that is not on btrfs (the fix named in the reason)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imaged.config import Config
from imaged.drivers import btrfs
from imaged.errors import InternalError

SHOW = """\
Qgroupid    Referenced    Exclusive  Max exclusive   Path 
--------    ----------    ---------  -------------   ---- 
0/256            16384        16384           none   layers/abc
0/257         67092480     67092480       67108864   containers/q/rootfs
"""  # noqa: W291 - btrfs-progs 6.2 pads its header lines with a trailing space


@pytest.mark.parametrize(("subvolume_id", "expected"), [
    (256, (16384, None)),
    (257, (67092480, 67108864)),
])
def test_parse_exclusive(subvolume_id: int, expected: tuple[int, int | None]) -> None:
    assert btrfs.parse_exclusive(SHOW, subvolume_id) == expected


def test_parse_exclusive_names_a_missing_qgroup() -> None:
    with pytest.raises(InternalError, match="no qgroup 0/2570"):
        btrfs.parse_exclusive(SHOW, 2570)


def test_probe_names_the_fix_on_another_filesystem(tmp_path: Path) -> None:
    probe = btrfs.probe(Config(root=tmp_path / "root"))
    if probe.supported:
        pytest.skip("the test directory is on btrfs here")
    assert not probe.supported and probe.capabilities is None
    assert probe.reason.startswith(f"the root {tmp_path / 'root'} is on ")
    assert probe.reason.endswith("not btrfs: put the root on a btrfs filesystem")
