"""The btrfs driver's pure parts: reading ``btrfs qgroup show --raw -e``, the ioctl numbers it
packs by hand, which errors it hands back as the operator's to fix, and the probe's refusal of
a root that is not on btrfs (the fix named in the reason)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from imaged.config import Config
from imaged.drivers import QuotaMode, btrfs
from imaged.errors import ConflictError
from tests.conftest import filesystem_type

SHOW = """\
Qgroupid    Referenced    Exclusive  Max exclusive   Path 
--------    ----------    ---------  -------------   ---- 
0/5              16384        16384           none   <toplevel>
0/256            16384        16384           none   layers/abc
0/257         67092480     67092480       67108864   containers/q/rootfs
0/258                0            0           none   <stale>
1/100         67108864     67108864           none   <0 member qgroups>
"""  # noqa: W291 - btrfs-progs 6.2 pads its header lines with a trailing space


def test_parse_qgroups_reads_every_level_0_qgroup() -> None:
    assert btrfs.parse_qgroups(SHOW) == {
        5: (16384, None), 256: (16384, None), 257: (67092480, 67108864), 258: (0, None)}


def test_ioctl_numbers_match_the_kernel_header() -> None:
    """What ``_IOR``/``_IOW``/``_IOWR`` of linux/btrfs.h give (printed by a C program built
    against Debian's header): a wrong size or direction would reach the wrong ioctl."""
    assert btrfs._IOC_FS_INFO == 0x8400941F
    assert btrfs._IOC_QUOTA_CTL == 0xC0109428
    assert btrfs._IOC_QGROUP_CREATE == 0x4010942A
    assert btrfs._IOC_QGROUP_LIMIT == 0x8030942B
    assert btrfs._IOC_QUOTA_RESCAN_WAIT == 0x942E


@pytest.mark.parametrize(("code", "fix"), [
    (errno.EROFS, "remount it read-write"),
    (errno.ENOSPC, "free space on it or grow it"),
    (errno.EDQUOT, "btrfs qgroup limit"),
])
def test_errors_the_operator_can_fix_are_typed(code: int, fix: str) -> None:
    with pytest.raises(ConflictError, match=f"^removing layer abc: .*; .*{fix}"), \
            btrfs._user_errors("removing layer abc"):
        raise OSError(code, "from btrfsutil")


def test_other_errors_stay_bugs() -> None:
    with pytest.raises(OSError, match="bad"), btrfs._user_errors("removing layer abc"):
        raise OSError(errno.EINVAL, "bad")


def test_probe_names_the_fix_on_another_filesystem(tmp_path: Path) -> None:
    if filesystem_type(tmp_path) == "btrfs":
        pytest.skip("the test directory is on btrfs here")
    probe = btrfs.probe(Config(root=tmp_path / "root"))
    assert not probe.supported and probe.capabilities is None
    assert probe.reason.startswith(f"the root {tmp_path / 'root'} is on ")
    assert probe.reason.endswith("not btrfs: put the root on a btrfs filesystem")


@pytest.mark.parametrize("mode", ["qgroup", "simple"])
def test_capabilities_name_the_quota_mode(mode: str) -> None:
    caps = btrfs.capabilities(QuotaMode(mode))
    assert (caps.quota_mode, caps.quota_semantics) == (mode, "writable")
