"""btrfs specifics beyond the conformance battery, on a loop-mounted btrfs (the ``driver``
fixture): recovery removes half-made layers and unrecorded subvolumes, read-only ones and the
subvolumes a container nested in its own, so no subvolume is ever left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import btrfsutil
import pytest

from imaged.config import Config
from imaged.digest import Digest
from imaged.store import Store

pytestmark = pytest.mark.parametrize("driver", ["btrfs"], indirect=True)


def subvolumes(root: Path) -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", str(root)], capture_output=True,
                         text=True, check=True).stdout
    return [line.split(" path ", 1)[1] for line in out.splitlines()]


def test_recovery_leaves_no_subvolume(driver: str, root: Path) -> None:
    store = Store(Config(root=root), "test")
    try:
        btrfs = store.driver()
        assert btrfs.name == "btrfs"  # chosen by itself: the root is on btrfs
        base, applying, stray = (Digest.of(name.encode()) for name in ("base", "half", "stray"))
        # A committed layer the metadata never recorded, and one a crash left half-applied.
        btrfs.prepare_layer(stray.hex, None)
        btrfs.commit_layer(stray.hex)
        store.meta.begin_layer(base, None, base, btrfs.name)
        (btrfs.prepare_layer(base.hex, None) / "f").write_bytes(b"base")
        btrfs.commit_layer(base.hex)
        store.meta.begin_layer(applying, base, applying, btrfs.name)
        (btrfs.prepare_layer(applying.hex, base.hex) / "partial").write_bytes(b"x")
        # A container with no row, holding subvolumes of its own, one of them read-only.
        btrfs.create_container("lost", [base.hex], None, read_only=False)
        rootfs = btrfs.home / "containers" / "lost" / "rootfs"
        btrfsutil.create_subvolume(rootfs / "nested")
        btrfsutil.create_snapshot(rootfs / "nested", rootfs / "nested" / "frozen",
                                  read_only=True)
        assert len(subvolumes(root)) == 6
    finally:
        store.close()
    reopened = Store(Config(root=root), "test")
    try:
        assert len(reopened.recovered) == 4, reopened.recovered
        btrfs = reopened.driver()
        assert btrfs.list_layers() == set()
        assert btrfs.list_containers() == set()
        assert reopened.meta.layer_state(applying) is None
    finally:
        reopened.close()
    assert subvolumes(root) == []
