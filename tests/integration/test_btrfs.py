"""btrfs specifics beyond the conformance battery, on a loop-mounted btrfs (the ``driver``
fixture): recovery leaves no subvolume behind; simple quotas pass the battery's quota case;
a filesystem in the other quota mode, a read-only one and a root on another filesystem are
refused with the fix named and nothing made; qgroups of removed subvolumes go once the kernel
has dropped them; ``ps`` reads every container's usage in one ``qgroup show``."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import btrfsutil
import pytest

from imaged.config import Config
from imaged.digest import Digest
from imaged.drivers import btrfs as btrfs_driver
from imaged.host.mounts import bind_mount, unmount
from imaged.store.root import Store
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conformance import test_driver as battery
from tests.conformance.conftest import Bed
from tests.conftest import filesystem_type, push_simple

ON_BTRFS = pytest.mark.parametrize("driver", ["btrfs"], indirect=True)
MODES = pytest.mark.parametrize("mode", ["qgroup", "simple"])


def subvolumes(root: Path) -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", str(root)], capture_output=True,
                         text=True, check=True).stdout
    return [line.split(" path ", 1)[1] for line in out.splitlines()]


def qgroup_ids(root: Path) -> set[int]:
    out = subprocess.run(["btrfs", "qgroup", "show", "--raw", "-e", str(root)], capture_output=True,
                         text=True, check=True).stdout
    return set(btrfs_driver.parse_qgroups(out))


def use_quota_mode(mode: str) -> None:
    """Add ``drivers.btrfs.quota`` to the test's config file (``isolated_env``)."""
    config = Path(os.environ["IMAGED_CONFIG"])
    text = config.read_text().split("[drivers.btrfs]")[0]
    config.write_text(f'{text}[drivers.btrfs]\nquota = "{mode}"\n')


def rows(root: Path, table: str) -> list[Any]:
    db = sqlite3.connect(root / "metadata.db")
    try:
        return db.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608 - a fixed name
    finally:
        db.close()


@ON_BTRFS
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


@ON_BTRFS
def test_simple_quotas_pass_the_quota_battery(driver: str, root: Path, registry: LocalRegistry,
                                              layout: OCILayout, imaged: Any) -> None:
    """The conformance battery's quota case, with ``drivers.btrfs.quota = "simple"``: an
    extent counts against the subvolume that allocated it, so a container's exclusive bytes
    are its own writes, as with full qgroups."""
    use_quota_mode("simple")
    bed = Bed(driver, root, registry, layout, imaged)
    battery.test_quota_refuses_past_limit_and_frees_on_delete(bed)
    assert btrfs_driver.kernel_quota_mode(root) == "squota"
    container = next(c for c in bed.ok("--json", "ps").json() if c["name"] == "q")
    assert container["quota_mode"] == "simple/writable"


def wait_until_dropped(root: Path, timeout: float = 60) -> None:
    """Until the kernel's cleaner has dropped every deleted subvolume (committing meanwhile)."""
    deadline = time.monotonic() + timeout
    while btrfsutil.deleted_subvolumes(root):
        assert time.monotonic() < deadline, "the kernel never dropped the deleted subvolumes"
        btrfsutil.sync(root)
        time.sleep(0.05)


@ON_BTRFS
@MODES
def test_qgroups_of_removed_subvolumes_go(driver: str, root: Path, mode: str) -> None:
    """A base layer removed before its child (garbage collection's order is the metadata's):
    with simple quotas its qgroup still counts extents the child shares, so the kernel cannot
    remove it when it drops the subvolume, and never tries again. The driver's next operation
    destroys it once nothing needs it."""
    store = Store(Config(root=root, drivers={"btrfs": {"quota": mode}}), "test")
    try:
        btrfs = store.driver()
        # Quotas on before the image comes: simple quotas count only extents written after.
        btrfs.create_container("first", [], 64 << 20, read_only=False)
        base, child = Digest.of(b"base"), Digest.of(b"child")
        (btrfs.prepare_layer(base.hex, None) / "data").write_bytes(os.urandom(4 << 20))
        btrfs.commit_layer(base.hex)
        btrfs.prepare_layer(child.hex, base.hex)
        btrfs.commit_layer(child.hex)
        btrfs.create_container("c", [base.hex, child.hex], 64 << 20, read_only=False)
        removed = {btrfsutil.subvolume_id(path) for path in (
            btrfs.home / "layers" / base.hex, btrfs.home / "layers" / child.hex,
            btrfs.home / "containers" / "c" / "rootfs")}
        assert removed <= qgroup_ids(root)
        btrfs.remove_layer(base.hex)
        btrfs.remove_layer(child.hex)
        btrfs.remove_container("c")
        wait_until_dropped(root)
        btrfs.create_container("next", [], 64 << 20, read_only=False)  # any later operation
        assert not removed & qgroup_ids(root), f"stale qgroups {removed & qgroup_ids(root)}"
        assert not (btrfs.home / "dropped-qgroups").exists()
    finally:
        store.close()


@ON_BTRFS
@pytest.mark.parametrize(("first", "second"), [("qgroup", "simple"), ("simple", "qgroup")])
def test_a_filesystem_in_the_other_quota_mode_is_refused(
        driver: str, root: Path, registry: LocalRegistry, layout: OCILayout, imaged: Any,
        first: str, second: str) -> None:
    """The kernel keeps a filesystem's quota mode when asked for the other: imaged says so,
    with both fixes, instead of running containers in a mode nobody configured."""
    ref = push_simple(layout, registry, f"btrfs/mode-{first}").ref
    use_quota_mode(first)
    assert imaged("pull", ref).code == 0
    assert imaged("mount", ref, "--name", "a", "--quota", "16M").code == 0
    use_quota_mode(second)
    refused = imaged("mount", ref, "--name", "b", "--quota", "16M")
    assert refused.code == 1
    assert f'has {first} quotas enabled' in refused.err
    assert f'set drivers.btrfs.quota = "{first}"' in refused.err
    assert "btrfs quota disable" in refused.err
    assert [c["name"] for c in imaged("--json", "ps").json()] == ["a"]
    assert not (root / "drivers" / "btrfs" / "containers" / "b").exists()


@pytest.fixture
def read_only_home(root: Path) -> Iterator[Any]:
    """Make the driver's home read-only (a read-only bind mount over it) on demand: the kernel
    then refuses every change there with EROFS while the metadata stays writable."""
    homes: list[Path] = []

    def make(home: Path) -> None:
        bind_mount(home, home, read_only=True)
        homes.append(home)

    yield make
    for home in homes:
        unmount(home)


@ON_BTRFS
def test_a_read_only_filesystem_is_refused_with_the_fix(
        driver: str, root: Path, registry: LocalRegistry, layout: OCILayout, imaged: Any,
        read_only_home: Any) -> None:
    ref = push_simple(layout, registry, "btrfs/read-only").ref
    assert imaged("pull", ref).code == 0
    assert imaged("mount", ref, "--name", "plain").code == 0
    assert imaged("umount", "plain").code == 0
    home = root / "drivers" / "btrfs"
    read_only_home(home)
    refused = imaged("mount", ref, "--name", "q", "--quota", "64M")
    assert refused.code == 1
    assert "refused to enable qgroup quotas (Read-only file system)" in refused.err
    assert "remount it read-write" in refused.err
    assert [c["name"] for c in imaged("--json", "ps").json()] == ["plain"]
    assert not (home / "containers" / "q").exists()
    # btrfsutil's own EROFS is the operator's to fix too: a typed error, not an internal one.
    removal = imaged("--json", "rm", "plain").json()["error"]
    assert removal["code"] == "conflict", removal
    assert "removing container plain: Read-only file system" in removal["message"]


@ON_BTRFS
def test_ps_reads_every_usage_in_one_qgroup_show(
        driver: str, root: Path, registry: LocalRegistry, layout: OCILayout, imaged: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ref = push_simple(layout, registry, "btrfs/ps").ref
    assert imaged("pull", ref).code == 0
    written = {"small": 4 << 20, "medium": 12 << 20, "large": 40 << 20}
    for name, size in written.items():
        path = Path(imaged("mount", ref, "--name", name, "--quota", "64M").out.split()[-1])
        (path / "data").write_bytes(os.urandom(size))
    calls: list[tuple[str, ...]] = []
    real_btrfs, real_sync = btrfs_driver._btrfs, btrfsutil.sync

    def counting_btrfs(*args: str) -> str:
        calls.append(args)
        return real_btrfs(*args)

    def counting_sync(path: Any) -> None:
        calls.append(("sync",))
        real_sync(path)

    monkeypatch.setattr(btrfs_driver, "_btrfs", counting_btrfs)
    monkeypatch.setattr(btrfsutil, "sync", counting_sync)
    listed = {c["name"]: c for c in imaged("--json", "ps").json()}
    assert [call[:2] for call in calls] == [("sync",), ("qgroup", "show")]
    for name, size in written.items():
        assert listed[name]["quota_mode"] == "qgroup/writable"
        assert abs(listed[name]["used_bytes"] - size) <= 0.05 * size, listed[name]


def test_a_root_on_another_filesystem_is_refused_with_nothing_made(
        root: Path, registry: LocalRegistry, layout: OCILayout, imaged: Any) -> None:
    """``--driver btrfs`` on a root that is not on btrfs: the error names the fix and nothing
    is recorded, and ``imaged info`` says why btrfs is unsupported."""
    if os.geteuid() != 0:
        pytest.skip("the registry fixture's images are pushed as root")
    if filesystem_type(root.parent) == "btrfs":
        pytest.skip("the test directory is on btrfs here")
    ref = push_simple(layout, registry, "btrfs/wrong-fs").ref
    refused = imaged("--driver", "btrfs", "pull", ref)
    assert refused.code == 1
    assert "not btrfs: put the root on a btrfs filesystem" in refused.err
    assert not (root / "drivers").exists()
    for table in ("images", "blobs", "layers", "containers"):
        assert rows(root, table) == [], table
    assert "driver" not in {row[0] for row in rows(root, "settings")}
    # (Partial downloads may wait in content/ingest for a retry to resume: not content yet.)
    assert not any(path.is_file() for path in (root / "content" / "blobs").rglob("*"))
    info = imaged("--json", "info").json()
    btrfs = next(d for d in info["drivers"] if d["name"] == "btrfs")
    assert btrfs["supported"] is False
    assert btrfs["reason"].endswith("not btrfs: put the root on a btrfs filesystem")
    assert not (root / "drivers" / "btrfs").exists()  # (other drivers' probes try things)
