"""``imaged bench copyup --quick`` end to end on a small matrix (one filesystem, a few
configurations, so it stays within seconds of suite time): the report it writes, the model it
keeps in the root for ``imaged advise``, the rows it could not measure, and nothing it
mounted left behind (loop devices, overlays, FUSE servers)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imaged.bench import copyup, fusecpu
from imaged.bench.scratch import zfs_fs
from imaged.drivers.devmapper.ioctl import kernel_support
from imaged.host.mounts import mountinfo
from imaged.ops import copycost
from tests.conftest import need_tools


def _left_behind(scratch: str) -> list[str]:
    """Mounts and loop devices still under this run's scratch directory (other engineers'
    benches may run at the same time, in scratch directories of their own)."""
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout.split()
    return [m.mount_point for m in mountinfo() if m.mount_point.startswith(scratch)] + \
        [f for f in loops if f.startswith(scratch)]


def test_quick_copyup_report(imaged_proc: Any, tmp_path: Path, root: Path) -> None:
    assert imaged_proc("images").code == 0  # a store on the root: the model is kept there
    out = tmp_path / "out"
    result = imaged_proc("bench", "copyup", "--quick", "--out", str(out), "--filesystems",
                         "xfs", "--configs", "overlay", "fuse full", "fuse partial", "btrfs",
                         "volume")
    assert result.code == 0, result.err
    kept = root / "bench" / "copyup.json"
    assert result.out.splitlines()[-1] == str(kept)
    model = copycost.load(json.loads(kept.read_text()), str(kept))
    assert model.source == "measured" and model.imaged
    overlay = model.predict("overlay", "xfs", 4 << 20)
    assert overlay is not None and overlay.seconds > 0 and not overlay.extrapolated
    assert ("btrfs", "xfs") in {(a.config, a.filesystem) for a in model.absent}
    report = json.loads((out / "copyup.json").read_text())
    series = report["series"]
    for config in ("overlay", "fuse full"):
        assert series[f"{config} on xfs: first overwrite 1M cold"]["median"] > 0
        # A whole-file copy-up: the layer grew by the whole 16 MiB, counted allocated.
        assert series[f"{config} on xfs: growth after first overwrite 16M warm"]["median"] \
            >= 16 * 1024
    # Partial copy-up and a volume write what they write, not the file.
    assert series["fuse partial on xfs: growth after first overwrite 16M cold"]["median"] < 1024
    assert series["volume on xfs: growth after first chmod 16M cold"]["median"] == 0
    assert series["fuse partial on xfs: first truncate 1M warm"]["p99"] > 0
    assert report["facts"]["rename of a lower directory: overlay on xfs"] == "EXDEV"
    assert report["facts"]["rename of a lower directory: volume on xfs"] == "ok"
    assert "direct I/O" in report["facts"]["scratch xfs"]
    markdown = (out / "copyup.md").read_text()
    assert "| btrfs | not measured: btrfs runs on btrfs only |" in markdown
    assert "| devmapper | thin-ext4 | not measured here: device-mapper runs in the guest " \
        "kernel tier (scripts/bench-guest DIR copyup --filesystems devmapper, " \
        "docs/bench/copyup-devmapper.md) |" in markdown
    assert (out / "copyup.png").stat().st_size > 0
    lowers = re.search(r"lowerdir=([^,:]*/imaged-bench-[^/]+)/",
                       report["facts"]["mount: overlay on xfs"])
    assert lowers is not None
    assert _left_behind(lowers[1]) == []
    assert not Path(lowers[1]).exists()


def test_quick_copyup_on_zfs_fuse(imaged_proc: Any, tmp_path: Path) -> None:
    """``--filesystems zfs``: a zfs-fuse pool of its own, the zfs clone and a volume measured,
    kernel overlay a row saying why it cannot stack there, the report named copyup-zfs; and
    after it the pool, its loop device and every mount gone (the scratch is in TMPDIR)."""
    need_tools("zfs-fuse", "zfs", "zpool")
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    result = imaged_proc("bench", "copyup", "--quick", "--out", str(out), "--filesystems",
                         "zfs", "--configs", "zfs", "overlay", "volume",
                         env={"TMPDIR": str(scratch)})
    assert result.code == 0, result.err
    report = json.loads((out / "copyup-zfs.json").read_text())
    series = report["series"]
    for config in ("zfs", "volume"):
        assert series[f"{config} on zfs-fuse: first overwrite 16M cold"]["median"] > 0
    # A clone's first overwrite writes a new record of the file, not the file.
    assert 0 < series["zfs on zfs-fuse: space used after first overwrite 16M cold"]["median"] \
        < 4 * 1024
    assert report["facts"]["rename of a lower directory: zfs on zfs-fuse"] == "ok"
    assert any("exported and imported" in note for note in report["notes"])
    assert "| overlay | not measured: overlay cannot stack on zfs-fuse: " in \
        (out / "copyup-zfs.md").read_text()
    pool = re.search(r"zfs-fuse pool (imagedbench\d+) ", report["facts"]["scratch zfs-fuse"])
    assert pool is not None
    pools = subprocess.run(["zpool", "list", "-H", "-o", "name"], capture_output=True,
                           text=True, check=False).stdout.split()
    assert pool[1] not in pools
    assert _left_behind(str(scratch)) == []
    assert list(scratch.iterdir()) == []


class _Interrupted(Exception):
    """What the bench's body raises in the middle of a sample."""


def test_a_zfs_fuse_scratch_is_gone_after_a_failure(tmp_path: Path) -> None:
    """A sample that fails with a layer made and a container mounted: the pool, its loop
    device, its mounts and its files are gone all the same."""
    need_tools("zfs-fuse", "zfs", "zpool")
    content = tmp_path / "content"
    content.mkdir()
    (content / "file").write_bytes(b"lower")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(_Interrupted), zfs_fs(1 << 30, scratch) as fs:
        pool = fs.pool
        origin = fs.layer("base", None, content)
        with fs.clone(origin, "c", fs.mount_point / "rootfs") as rootfs:
            assert (rootfs / "file").read_bytes() == b"lower"
            raise _Interrupted
    pools = subprocess.run(["zpool", "list", "-H", "-o", "name"], capture_output=True,
                           text=True, check=False).stdout.split()
    assert pool not in pools
    assert _left_behind(str(scratch)) == []
    assert list(scratch.iterdir()) == []


def test_an_unknown_filesystem_is_one_line(imaged_proc: Any, tmp_path: Path) -> None:
    result = imaged_proc("bench", "copyup", "--quick", "--out", str(tmp_path),
                         "--filesystems", "ntfs")
    assert result.code != 0
    assert result.err.strip().splitlines() == [
        "imaged: error: no filesystem ntfs (there are ext4, xfs, btrfs, zfs-fuse, thin-ext4, "
        "thin-xfs; zfs means zfs-fuse, devmapper thin-ext4)"]


def test_devmapper_without_device_mapper_is_one_line(imaged_proc: Any, tmp_path: Path) -> None:
    """This host's kernel has no device-mapper: asked for devmapper alone, the bench says so
    and where it runs instead, in one line, and writes no report of nothing."""
    if kernel_support() is None:
        pytest.skip("this kernel has device-mapper: the guest test measures it here")
    result = imaged_proc("bench", "copyup", "--quick", "--out", str(tmp_path / "out"),
                         "--filesystems", "devmapper")
    assert result.code != 0
    (line,) = result.err.strip().splitlines()
    assert line.startswith("imaged: error: devmapper cannot be measured here: device-mapper is "
                           "not usable in this kernel (")
    assert line.endswith("); scripts/bench-guest DIR copyup --filesystems devmapper runs it in "
                         "the user-mode-linux guest")
    assert not (tmp_path / "out").exists()


def test_a_filesystem_the_bench_cannot_make_is_a_row_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No mkfs.xfs on this PATH (nor anything else): the report still comes out, each
    configuration on xfs a row "not measured: mkfs.xfs is not installed", no traceback."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    paths = copyup.run(tmp_path / "out", 1, [1 << 20], True, ["xfs"], ["overlay"])
    report = json.loads(paths[0].read_text())
    assert "overlay on xfs: not measured: mkfs.xfs is not installed" in report["notes"]
    assert report["series"] == {}
    assert "| overlay | xfs | not measured: mkfs.xfs is not installed |" in \
        paths[1].read_text()


def test_metadata_report_counts_each_fuse_servers_requests(imaged_proc: Any,
                                                           tmp_path: Path) -> None:
    """What each FUSE server was asked over one untar: one create per file at least, counted
    by imaged's --count-requests and from fuse-overlayfs's debug log alike."""
    out = tmp_path / "out"
    result = imaged_proc("bench", "copyup", "--metadata", "--quick", "--out", str(out),
                         "--configs", "fuse full", "fuse writeback", "fuse-overlayfs")
    assert result.code == 0, result.err
    report = json.loads((out / "metadata.json").read_text())
    assert report["series"]["fuse writeback on ext4: untar 1000 files + syncfs"]["median"] > 0
    for server in ("fuse full on ext4", "fuse writeback on ext4", "fuse-overlayfs on ext4"):
        assert report["requests"][server]["create"] >= 900
        assert report["requests"][server]["lookup"] >= report["requests"][server]["create"]
    assert "| operation | fuse full on ext4 | fuse writeback on ext4 | fuse-overlayfs on ext4 |" \
        in \
        (out / "metadata.md").read_text()


def test_fusecpu_reports_server_cpu_and_requests(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m imaged.bench.fusecpu``, the tool behind the per-request costs docs/drivers.md
    quotes: a small run of both servers prints their rows, imaged's requests by handler (a
    create per file at least), and leaves nothing mounted or on disk."""
    need_tools("fuse-overlayfs")
    files = 300
    assert fusecpu.main(["--runs", "1", "--files", str(files), "--scratch", str(tmp_path),
                         "--config", "imaged", "--config", "fuse-overlayfs"]) == 0
    out = capsys.readouterr().out
    rows = {cells[0]: cells[1:] for line in out.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    untar_wall, untar_cpu, requests, per_request = (float(v) for v in rows["imaged"][:4])
    assert untar_wall > 0 and untar_cpu > 0 and per_request > 0
    assert rows["fuse-overlayfs"][2:4] == ["-", "-"]  # its requests are not counted here
    counted = json.loads(out.split("imaged requests over one untar: ")[1].splitlines()[0])
    assert counted["create"] >= files * 0.9 and sum(counted.values()) == requests
    assert list(tmp_path.iterdir()) == [] and _left_behind(str(tmp_path)) == []
