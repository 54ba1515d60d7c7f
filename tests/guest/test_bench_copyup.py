"""``imaged bench copyup --filesystems devmapper`` where device-mapper exists: in the guest
kernel (the host has none). A quick run of the smallest matrix that still compares (the
devmapper container, overlay and a volume on the same thin pool's ext4, one 1 MiB file) must
give devmapper rows with numbers, and leave no thin device, pool, loop device or mount; a
scratch pool that fails mid-sample must leave none either.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imaged.bench import copyup
from imaged.bench.scratch import thin_fs
from imaged.drivers.devmapper.ioctl import dm_list
from imaged.host.mounts import mountinfo

pytestmark = pytest.mark.guest


def _left_behind(scratch: Path, pool: str) -> list[str]:
    """Mounts, loop devices and device-mapper devices of this run still there."""
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout.split()
    prefix = pool.removesuffix("-pool")
    return [m.mount_point for m in mountinfo() if m.mount_point.startswith(str(scratch))] + \
        [f for f in loops if f.startswith(str(scratch))] + \
        [name for name, _ in dm_list() if name.startswith(prefix)]


def test_quick_copyup_on_a_thin_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    paths = copyup.run(tmp_path / "out", 1, [1 << 20], True, ["devmapper"],
                       ["devmapper", "overlay", "volume"])
    assert [p.name for p in paths] == ["copyup-devmapper.json", "copyup-devmapper.md",
                                       "copyup-devmapper.png"]
    report = json.loads(paths[0].read_text())
    series = report["series"]
    for config in ("devmapper", "overlay", "volume"):
        assert series[f"{config} on thin-ext4: first overwrite 1M cold"]["median"] > 0
    # A snapshot's first overwrite breaks the sharing of a few pool blocks, not of the file;
    # overlay copies the whole file up.
    assert series["devmapper on thin-ext4: growth after first overwrite 1M cold"]["median"] == 0
    assert 0 < series["devmapper on thin-ext4: space used after first overwrite 1M cold"][
        "median"] < 1024
    assert series["overlay on thin-ext4: growth after first overwrite 1M cold"]["median"] >= 1024
    assert report["facts"]["rename of a lower directory: devmapper on thin-ext4"] == "ok"
    assert report["facts"]["rename of a lower directory: overlay on thin-ext4"] == "EXDEV"
    assert "user-mode-linux" in report["facts"]["guest"]
    assert "**These are numbers from a user-mode-linux guest**" in paths[1].read_text()
    pool = report["facts"]["scratch thin-ext4"].split()[3]
    assert pool.endswith("-pool")
    assert _left_behind(scratch, pool) == []
    assert list(scratch.iterdir()) == []


class _Interrupted(Exception):
    """What the bench's body raises in the middle of a sample."""


def test_a_thin_scratch_is_gone_after_a_failure(tmp_path: Path) -> None:
    """A sample that fails with a layer made and a container mounted: its devices, the pool,
    its loop devices, its mounts and its files are gone all the same."""
    content = tmp_path / "content"
    content.mkdir()
    (content / "file").write_bytes(b"lower")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(_Interrupted), thin_fs(1 << 30, "ext4", scratch) as fs:
        pool = fs.pool
        origin = fs.layer("base", None, content)
        with fs.clone(origin, "c", fs.mount_point / "rootfs") as rootfs:
            assert (rootfs / "file").read_bytes() == b"lower"
            raise _Interrupted
    assert _left_behind(scratch, pool) == []
    assert list(scratch.iterdir()) == []
