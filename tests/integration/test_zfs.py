"""zfs specifics beyond the conformance battery, on a zfs-fuse pool of the test's own.

Bad configuration is refused before anything is created; a layer others are cloned from is
refused, never destroyed under them; a chain goes top first; quotas hold and destroyed
containers give their space back; ``ps`` is right within 5% and costs one ``zfs`` command
however many containers there are; a crash mid-layer leaves nothing at the next start.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imaged.config import Config, Overrides, load_config
from imaged.digest import Digest
from imaged.drivers import zfs as zfs_driver
from imaged.errors import ConflictError
from imaged.host.mounts import mountinfo
from imaged.store.root import Store
from imaged.testing import zfsfuse
from imaged.testing.images import OCILayout, file, push
from imaged.testing.registry import LocalRegistry
from tests.conftest import Daemon, add_config, push_simple, unmount_below
from tests.integration.test_crash import client, kill_when_paused, start_request

on_zfs = pytest.mark.parametrize("driver", ["zfs"], indirect=True)
MiB = 1 << 20


def parent_of(root: Path) -> str:
    """The test's parent dataset, as the CLI reads it from the config file."""
    dataset: str = load_config(Overrides(root=root)).drivers["zfs"]["dataset"]
    return dataset


def datasets(name: str) -> set[str]:
    """Every filesystem and snapshot at or below ``name``."""
    return set(zfs_driver.zfs("list", "-H", "-o", "name", "-t", "filesystem,snapshot", "-r",
                              name).split())


def used(dataset: str) -> int:
    return int(zfs_driver.get([dataset], ["used"])[dataset]["used"])


def zfs_store(root: Path) -> Store:
    return Store(load_config(Overrides(root=root, driver="zfs")), "test")


# bad input


@pytest.fixture
def pool(zfs_daemon: zfsfuse.Daemon, tmp_path: Path) -> Iterator[zfsfuse.Pool]:
    """A pool with no driver configured: the tests configure (or not) what they check."""
    with zfsfuse.pool(tmp_path / "zfs") as made:
        yield made
        unmount_below(tmp_path / "root")


@pytest.mark.parametrize(("dataset", "fix"), [
    (None, 'set [drivers.zfs] dataset = "pool/imaged"'),
    ("nopool{pid}/imaged", "ZFS pool nopool{pid} does not exist: create it (zpool create"),
    ("{pool}/absent", "ZFS dataset {pool}/absent does not exist: create it with `zfs create "
                      "{pool}/absent`"),
    ("{pool}/bad name", "invalid ZFS dataset name '{pool}/bad name'"),
    ("{pool}/a@b", "invalid ZFS dataset name '{pool}/a@b'"),
])
def test_bad_configuration_is_refused_and_nothing_created(
        dataset: str | None, fix: str, pool: zfsfuse.Pool, root: Path, tmp_path: Path,
        imaged: Any) -> None:
    fill = {"pid": os.getpid(), "pool": pool.name}
    if dataset is not None:
        add_config(tmp_path, f'[drivers.zfs]\ndataset = "{dataset.format(**fill)}"\n')
    pools_before, before = zfs_driver.zpool("list", "-H", "-o", "name"), datasets(pool.name)
    result = imaged("--json", "--driver", "zfs", "pull", "127.0.0.1:9/never/contacted:v1")
    assert result.code == 1
    error = result.json()["error"]
    assert error["code"] == "invalid" and fix.format(**fill) in error["message"], error
    assert zfs_driver.zpool("list", "-H", "-o", "name") == pools_before
    assert datasets(pool.name) == before
    assert not (root / "drivers" / "zfs").exists()


# destroy ordering


@on_zfs
def test_a_layer_with_clones_is_refused_not_orphaned(driver: str, root: Path,
                                                     isolated_env: dict[str, str]) -> None:
    store = zfs_store(root)
    try:
        zfs = store.driver()
        base, child = (Digest.of(name.encode()).hex for name in ("base", "child"))
        (zfs.prepare_layer(base, None) / "f").write_bytes(b"base")
        zfs.commit_layer(base)
        (zfs.prepare_layer(child, base) / "g").write_bytes(b"child")
        zfs.commit_layer(child)
        zfs.create_container("user", [base, child], None, read_only=False)
        parent = parent_of(root)
        before = datasets(parent)
        with pytest.raises(ConflictError, match=f"cloned from it: {parent}/layers/{child};"):
            zfs.remove_layer(base)
        with pytest.raises(ConflictError,
                           match=f"cloned from it: {parent}/containers/user; remove those"):
            zfs.remove_layer(child)
        assert datasets(parent) == before
        zfs.remove_container("user")
        zfs.remove_layer(child)
        zfs.remove_layer(base)
        assert datasets(parent) == {parent, f"{parent}/layers", f"{parent}/containers"}
        assert zfs.list_layers() == set() and zfs.list_containers() == set()
    finally:
        store.close()


@on_zfs
def test_rmi_removes_a_chain_top_first(driver: str, root: Path, registry: LocalRegistry,
                                       layout: OCILayout, imaged: Any) -> None:
    pushed = push_simple(layout, registry, "zfs/chain")
    assert imaged("--driver", "zfs", "pull", pushed.ref).code == 0
    assert imaged("mount", pushed.ref, "--name", "on-chain").code == 0
    assert imaged("rm", "--force", "on-chain").code == 0
    removed = imaged("rmi", pushed.ref)
    assert removed.code == 0, removed.err
    parent = parent_of(root)
    assert datasets(f"{parent}/layers") == {f"{parent}/layers"}
    assert not any((root / "drivers" / "zfs" / "layers").iterdir())


# quotas and usage


def fill(path: Path) -> int:
    """Write until the quota refuses; returns bytes written."""
    written, chunk = 0, os.urandom(MiB)
    with path.open("wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as exc:
                assert exc.errno in (errno.EDQUOT, errno.ENOSPC), exc
                return written


def wait_for(condition: Any, timeout: float = 90) -> bool:
    """ZFS frees a destroyed dataset's blocks at a later transaction group: poll."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@on_zfs
def test_quota_refuses_writes_and_a_removed_container_frees_its_space(
        driver: str, root: Path, registry: LocalRegistry, layout: OCILayout,
        imaged: Any) -> None:
    pushed = push_simple(layout, registry, "zfs/quota")
    assert imaged("--driver", "zfs", "pull", pushed.ref).code == 0
    parent = parent_of(root)
    baseline = used(parent)
    merged = Path(imaged("mount", pushed.ref, "--name", "q", "--quota", "32M").out.strip())
    assert zfs_driver.get([f"{parent}/containers/q"], ["quota"])[f"{parent}/containers/q"] \
        == {"quota": str(32 * MiB)}
    written = fill(merged / "big")
    assert 30 * MiB <= written <= 32 * MiB
    assert used(parent) >= baseline + 30 * MiB
    assert imaged("rm", "--force", "q").code == 0
    assert f"{parent}/containers/q" not in datasets(parent)
    assert wait_for(lambda: used(parent) < baseline + 2 * MiB), (used(parent), baseline)


@on_zfs
def test_ps_usage_is_within_5_percent(driver: str, root: Path, registry: LocalRegistry,
                                      layout: OCILayout, imaged: Any) -> None:
    pushed = push_simple(layout, registry, "zfs/usage")
    assert imaged("--driver", "zfs", "pull", pushed.ref).code == 0
    merged = Path(imaged("mount", pushed.ref, "--name", "u").out.strip())
    (merged / "data").write_bytes(os.urandom(24 * MiB))
    os.sync()
    (container,) = imaged("--json", "ps").json()
    assert container["quota"] is None
    assert abs(container["used_bytes"] - 24 * MiB) <= 0.05 * 24 * MiB, container


@on_zfs
def test_ps_reads_every_containers_usage_with_one_command(
        driver: str, root: Path, registry: LocalRegistry, layout: OCILayout, imaged: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pushed = push_simple(layout, registry, "zfs/batch")
    assert imaged("--driver", "zfs", "pull", pushed.ref).code == 0
    names = [f"c{i}" for i in range(8)]
    for name in names:
        assert imaged("mount", pushed.ref, "--name", name, "--quota", "16M").code == 0
    commands: list[list[str]] = []
    real = zfs_driver._run_once

    def counted(command: list[str]) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return real(command)

    monkeypatch.setattr(zfs_driver, "_run_once", counted)
    listed = imaged("--json", "ps").json()
    assert sorted(c["name"] for c in listed) == names
    assert {c["quota"] for c in listed} == {16 * MiB}
    reads = [c for c in commands if "used,quota" in c]
    assert len(reads) == 1, commands
    assert reads[0][-1] == f"{parent_of(root)}/containers"


# crashes


@on_zfs
def test_crash_mid_layer_leaves_nothing_at_the_next_start(
        driver: str, root: Path, registry: LocalRegistry, layout: OCILayout,
        start_daemon: Any) -> None:
    """Two small layers applied (rows 'creating', datasets cloned from one another), the
    third half-written when the daemon dies: the next start removes all three, top first."""
    kept = push_simple(layout, registry, "zfs/kept")
    layers = [layout.add_layer([file("one", b"1")]), layout.add_layer([file("two", b"2")]),
              layout.add_layer([file(f"big/{i}", os.urandom(MiB)) for i in range(8)], None)]
    layout.tag(layout.add_image(layers), "zfs-crash")
    ref = f"{registry.host}/zfs/crash:v1"
    push(layout, "zfs-crash", ref)
    first: Daemon = start_daemon("zfs")
    with client(first) as api:
        list(api.stream("POST", "/v1/images/pull", {"ref": kept.ref}))
    first.stop()

    crashing: Daemon = start_daemon("zfs", env={"IMAGED_FAULT_PAUSE": "mid-unpack"})
    request = start_request(crashing, "POST", "/v1/images/pull", f'{{"ref": "{ref}"}}')
    kill_when_paused(crashing)
    request.wait(30)
    parent = parent_of(root)
    # kept's two layers, the crash's two applied ones (with snapshots) and its half one
    assert len(datasets(f"{parent}/layers")) == 1 + 2 * 2 + 2 * 2 + 1

    restarted: Daemon = start_daemon("zfs")
    with client(restarted) as api:
        assert_only_recorded_layers(root, parent)
        events = list(api.stream("POST", "/v1/images/pull", {"ref": ref}))
        assert events[-1]["status"] == "done", events[-1]
        path = Path(api.call("POST", "/v1/containers/after/mount", {"image": ref})["path"])
        assert (path / "big" / "7").stat().st_size == MiB
        assert (path / "one").read_bytes() == b"1"
    assert_only_recorded_layers(root, parent)


def assert_only_recorded_layers(root: Path, parent: str) -> None:
    """Every layer dataset, snapshot and directory is a ready row's; no layer is mounted."""
    db = sqlite3.connect(root / "metadata.db")
    try:
        rows = dict(db.execute("SELECT chain_id, state FROM layers").fetchall())
    finally:
        db.close()
    assert set(rows.values()) == {"ready"}, rows
    keys = {Digest.parse(chain).hex for chain in rows}
    assert datasets(f"{parent}/layers") == {f"{parent}/layers"} | {
        f"{parent}/layers/{key}{snapshot}" for key in keys for snapshot in ("", "@layer")}
    layer_dirs = root / "drivers" / "zfs" / "layers"
    assert {p.name for p in layer_dirs.iterdir()} == keys
    assert not [m for m in mountinfo() if m.mount_point.startswith(f"{layer_dirs}/")]


@on_zfs
def test_recovery_removes_unrecorded_and_half_made_datasets(
        driver: str, root: Path, isolated_env: dict[str, str]) -> None:
    store = zfs_store(root)
    try:
        zfs = store.driver()
        base, half, stray = (Digest.of(name.encode()) for name in ("base", "half", "stray"))
        zfs.prepare_layer(stray.hex, None)  # no row at all
        zfs.commit_layer(stray.hex)
        store.meta.begin_layer(base, None, base, zfs.name)
        zfs.prepare_layer(base.hex, None)
        zfs.commit_layer(base.hex)
        store.meta.begin_layer(half, base, half, zfs.name)
        (zfs.prepare_layer(half.hex, base.hex) / "partial").write_bytes(b"x")  # still mounted
        zfs.create_container("lost", [stray.hex], None, read_only=False)  # no row either
    finally:
        store.close()
    parent = parent_of(root)
    reopened = zfs_store(root)
    try:
        assert len(reopened.recovered) == 4, reopened.recovered
    finally:
        reopened.close()
    assert datasets(parent) == {parent, f"{parent}/layers", f"{parent}/containers"}
    home = root / "drivers" / "zfs"
    assert not any((home / "layers").iterdir()) and not any((home / "containers").iterdir())


def test_a_root_on_zfs_chooses_zfs_and_its_dataset_by_itself(pool: zfsfuse.Pool) -> None:
    """Auto-selection: a root on a ZFS dataset needs no configuration (as Docker's driver):
    imaged's datasets go below the one the root is on."""
    root = pool.mountpoint / "root"
    store = Store(Config(root=root), "test")
    try:
        chosen = store.driver()
        assert chosen.name == "zfs"
        key = Digest.of(b"auto").hex
        (chosen.prepare_layer(key, None) / "f").write_bytes(b"on zfs")
        chosen.commit_layer(key)
        assert f"{pool.dataset}/layers/{key}@layer" in datasets(pool.dataset)
    finally:
        store.close()
        unmount_below(root)
