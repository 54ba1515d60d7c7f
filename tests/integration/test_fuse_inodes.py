"""Inode numbers the fuse mount shows: stable as issue 14 asks ("a hard link shares one number,
and a number survives copy-up"), and across FORGET and remounts, as kernel overlay's are with
``index=on`` and ``xino`` (overlayfs.rst, "Inode properties"). ``tar``, ``find`` and ``du``
tell files apart by (st_dev, st_ino): a number that changes under them is a different file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.fusebed import serve, stop

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")

NAMES = ("f", "d", "d/x", "h1", "h2", "new", "newdir", "link")


def _layers(tmp: Path) -> list[Path]:
    top, base = tmp / "l1", tmp / "l2"
    for layer in (top, base):
        layer.mkdir()
    (base / "f").write_text("f\n")
    (base / "d").mkdir()
    (base / "d" / "x").write_text("x\n")
    (base / "h1").write_text("hard\n")
    os.link(base / "h1", base / "h2")
    (top / "d").mkdir()
    (top / "link").symlink_to("f")
    return [top, base]


def _numbers(root: Path) -> dict[str, int]:
    return {name: os.lstat(root / name).st_ino for name in NAMES}


def _forget_all() -> None:
    """Evict unused dentries and inodes, so the kernel sends FORGET for every node."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def test_numbers_survive_copy_up_forget_and_remount(tmp_path: Path) -> None:
    lowers = _layers(tmp_path)
    home = tmp_path / "c"
    mount = serve(lowers, home)
    try:
        root = mount.path
        (root / "new").write_text("new\n")
        (root / "newdir").mkdir()
        before = _numbers(root)
        assert before["h1"] == before["h2"]
        assert len(set(before.values())) == len(NAMES) - 1
        with open(root / "f", "a") as f:  # a full copy-up
            f.write("more\n")
        (root / "d" / "y").write_text("y\n")  # d copied up: a merged directory
        os.chmod(root / "d" / "x", 0o600)  # a metadata change copies x up
        with open(root / "h1", "a") as f:  # a lower hard link, its other name left below
            f.write("more\n")
        os.lchown(root / "link", 1, 1)
        assert _numbers(root) == before, "copy-up changed a number"
        _forget_all()
        assert _numbers(root) == before, "a number changed after FORGET"
    finally:
        stop(mount)
    mount = serve(lowers, home)
    try:
        assert _numbers(mount.path) == before, "a number changed across a remount"
        assert (mount.path / "h2").read_text() == "hard\nmore\n"
    finally:
        stop(mount)


def test_a_forged_origin_record_is_not_trusted(tmp_path: Path) -> None:
    """``trusted.imaged.origin`` in an upper the server did not write (a layer index out of
    range, garbage): the file keeps its own number and stays readable."""
    lowers = _layers(tmp_path)
    home = tmp_path / "c"
    (home / "upper").mkdir(parents=True)
    for name, value in (("a", b"99-5"), ("b", b"x-y"), ("c", b"")):
        (home / "upper" / name).write_text(name)
        os.setxattr(home / "upper" / name, "trusted.imaged.origin", value)
    mount = serve(lowers, home)
    try:
        for name in ("a", "b", "c"):
            assert os.lstat(mount.path / name).st_ino == os.lstat(home / "upper" / name).st_ino
            assert (mount.path / name).read_text() == name
    finally:
        stop(mount)
