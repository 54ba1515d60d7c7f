"""The devmapper driver where device-mapper exists: in the guest kernel (the host has none).

The conformance battery runs here for devmapper, on a thin pool the driver makes on loop files;
then what only devmapper has: the quota is the device's size; a crash between ``create_snap``
and the records' commit is undone at the next start; pool devices no record knows are deleted
and records the pool lacks are reported; a device still open is removed deferred under another
name (held by an open node, or by a mount a forced umount detached); nothing more is created
above the pool's fill threshold. Every test takes its root's
devices, pool and loop devices down afterwards, failing or not.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imaged.config import Config
from imaged.drivers.devmapper import driver as dm
from imaged.drivers.devmapper import ioctl, pool
from imaged.errors import ConflictError, InvalidError
from imaged.host.mounts import unmount
from tests.conformance.conftest import (  # noqa: F401 - the battery's fixtures, used by it
    bed,
    deep_images,
)
from tests.conformance.test_driver import *  # noqa: F403 - the battery, with this module's driver
from tests.conftest import add_config, need_tools

pytestmark = [pytest.mark.guest, pytest.mark.cli_modes]

MiB = 1 << 20
# Small enough for the guest's tmpfs (half its RAM), large enough for the battery's quotas
# (64M and 128M; its 8M shrink must be refused).
OPTIONS = {"basesize": 32 * MiB, "data_size": 2048 * MiB, "metadata_size": 64 * MiB}


def home_of(root: Path) -> Path:
    return root / "drivers" / "devmapper"


def take_down(root: Path) -> None:
    """The root's devices, pool and loop devices gone, and its pool files too: the guest's
    /tmp is a tmpfs, where a 500-layer image's pool holds 150 MiB."""
    dm.deactivate_all(home_of(root))
    shutil.rmtree(home_of(root) / "pool", ignore_errors=True)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[str]:
    """devmapper for the battery: configured in the test's config file (``isolated_env``)."""
    need_tools("mkfs.ext4", "resize2fs", "thin_ls")
    add_config(tmp_path, "[drivers.devmapper]\n" + "".join(
        f'{key} = "{value // MiB}M"\n' for key, value in OPTIONS.items()))
    try:
        yield "devmapper"
    finally:
        take_down(tmp_path / "root")


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Config]:
    """A root for the driver-level tests, its devices gone afterwards."""
    need_tools("mkfs.ext4", "resize2fs", "thin_ls")
    root = tmp_path / "root"
    try:
        yield Config(root=root, drivers={"devmapper": dict(OPTIONS)})
    finally:
        take_down(root)


def start(config: Config, **options: object) -> dm.DevmapperDriver:
    if options:
        config = Config(root=config.root, drivers={"devmapper": {**OPTIONS, **options}})
    return dm.DevmapperDriver(config, home_of(config.root))


def device_size(driver: dm.DevmapperDriver, key: str) -> int:
    header = ioctl.dm_status(pool.device_name(driver.tag, key))
    assert header is not None
    sysfs = Path(f"/sys/dev/block/{pool.dev_string(header.dev)}/size")
    return int(sysfs.read_text()) * 512


def fill(path: Path) -> int:
    """Write 1 MiB at a time until the filesystem refuses; bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        while True:
            try:
                written += f.write(b"x" * MiB)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written
            assert written < 1 << 30, "nothing refused a write"


def test_quota_is_the_device_size(config: Config) -> None:
    driver = start(config)
    with pytest.raises(InvalidError, match="give at least 32 MiB"):
        driver.create_container("small", [], 16 * MiB, False)
    driver.create_container("q", [], 64 * MiB, False)
    mounted = driver.mount("q", [], False, None)
    assert device_size(driver, "c/q") == 64 * MiB
    assert mounted.mounts[0].source == f"/dev/mapper/{pool.device_name(driver.tag, 'c/q')}"
    before = driver.usage("q")
    assert before.quota == 64 * MiB and 0 < before.used < 8 * MiB  # the filesystem's own
    written = fill(mounted.path / "big")
    assert abs(written - (64 * MiB - before.used)) <= 2 * MiB
    assert driver.usage("q").used >= 62 * MiB
    with pytest.raises(InvalidError, match="cannot shrink"):
        driver.resize_quota("q", 48 * MiB, True)
    driver.resize_quota("q", 96 * MiB, True)  # online: a reloaded table, a grown filesystem
    assert device_size(driver, "c/q") == 96 * MiB
    assert fill(mounted.path / "more") >= 30 * MiB
    driver.unmount("q", None)
    assert ioctl.dm_status(pool.device_name(driver.tag, "c/q")) is None  # inactive when unmounted
    assert driver.usage("q").used >= 94 * MiB  # measured on a mount made for the moment
    driver.remove_container("q")
    assert driver.list_containers() == set()


def test_crash_between_create_snap_and_commit_is_undone_at_next_start(config: Config) -> None:
    start(config).create_container("first", [], None, False)  # the base exists already
    script = f"""
import os
from pathlib import Path
from imaged.config import Config
from imaged.drivers.devmapper import driver as dm
config = Config(root=Path({str(config.root)!r}), drivers={{"devmapper": {OPTIONS!r}}})
driver = dm.DevmapperDriver(config, Path({str(home_of(config.root))!r}))
real = dm.dm_message
def message(name, text):
    real(name, text)
    if text.startswith("create_snap"):
        os._exit(9)  # the pool has the snapshot; the records still say creating
dm.dm_message = message
driver.create_container("crashed", [], None, False)
"""
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=60, check=False)
    assert crashed.returncode == 9, crashed.stderr
    driver = start(config)
    record = next(r for r in driver.recovered if "left half-made" in r)
    thin_id = int(record.split()[3])
    assert driver.records.get("c/crashed") is None
    pool_ids = driver._pool_ids()
    assert pool_ids is not None and thin_id not in pool_ids
    assert {r.id for r in driver.records.all()} == pool_ids  # base and first, nothing else
    driver.create_container("crashed", [], None, False)  # the name is free again
    assert start(config).recovered == []


def test_pool_devices_without_records_go_and_lost_records_are_reported(config: Config) -> None:
    driver = start(config)
    driver.create_container("kept", [], None, False)
    driver.create_container("lost", [], None, False)
    lost = driver.records.get("c/lost")
    assert lost is not None
    # Behind the records' back: a device they do not know, one of theirs deleted, and the
    # pool's transaction id moved on as any other writer's would.
    tid = driver._pool_state()[0].transaction_id
    ioctl.dm_message(driver.pool, "create_thin 4242")
    ioctl.dm_message(driver.pool, f"delete {lost.id}")
    ioctl.dm_message(driver.pool, f"set_transaction_id {tid} {tid + 7}")
    again = start(config)
    assert any("deleted thin device 4242" in note for note in again.recovered)
    assert any(f"thin device {lost.id} (c/lost) is recorded but missing" in note
               for note in again.recovered)
    pool_ids = again._pool_ids()
    assert pool_ids is not None and 4242 not in pool_ids and lost.id not in pool_ids
    again.create_container("new", [], None, False)  # the pool takes changes again
    assert start(config).recovered == []


@pytest.mark.parametrize("holder", ["node", "detached mount"])
def test_busy_device_is_removed_deferred_under_another_name(config: Config,
                                                            holder: str) -> None:
    """A device still open when its container is removed, by a process holding its node, or
    by the mount a forced umount detached (``rm --force`` of a busy container), whose file
    still writes: renamed and its deletion deferred, the name free at once; the kernel removes
    it after the last close, and the next start deletes its thin id."""
    driver = start(config)
    driver.create_container("busy", [], None, False)
    merged = driver.mount("busy", [], False, None).path
    name = pool.device_name(driver.tag, "c/busy")
    if holder == "node":
        held = os.open(ioctl.node_path(name), os.O_RDONLY)
    else:
        held = os.open(merged / "held", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if holder == "node":
            driver.unmount("busy", None)  # the device stays: it is open
        else:
            with pytest.raises(ConflictError):
                driver.unmount("busy", None)
            driver.unmount("busy", None, force=True)
        driver.remove_container("busy")
        record = next(r for r in driver.records.all() if r.key.startswith("dead/"))
        dead = pool.device_name(driver.tag, record.key)
        assert record.state == "removing"
        assert ioctl.dm_status(name) is None and ioctl.dm_status(dead) is not None
        if holder != "node":
            os.write(held, b"the detached mount still writes")
        driver.create_container("busy", [], None, False)  # its name is free at once
    finally:
        os.close(held)
    # The kernel removes it after the last close, from a work queue: soon, not at once.
    deadline = time.monotonic() + 10
    while ioctl.dm_status(dead) is not None:
        assert time.monotonic() < deadline, f"{dead} was not removed after its last close"
        time.sleep(0.05)
    again = start(config)
    assert f"finished removing thin device {record.id}" in again.recovered
    pool_ids = again._pool_ids()
    assert pool_ids is not None and record.id not in pool_ids


def test_nothing_is_created_above_the_fill_threshold(config: Config) -> None:
    driver = start(config, data_size=256 * MiB, fill_threshold=0.25)
    driver.create_container("filler", [], 128 * MiB, False)
    mounted = driver.mount("filler", [], False, None)
    (mounted.path / "data").write_bytes(os.urandom(80 * MiB))
    os.sync()
    with pytest.raises(ConflictError, match="above its fill threshold of 25%") as refused:
        driver.create_container("more", [], None, False)
    assert "data 8" in str(refused.value)  # the usage is named: data 8x MiB of 256 MiB
    assert driver.records.get("c/more") is None
    reason = dm.probe(Config(root=config.root, drivers={"devmapper": {}})).reason
    assert f"thin pool {driver.pool}: data" in reason
    (mounted.path / "data").unlink()  # discard gives the blocks back to the pool, soon after
    os.sync()
    deadline = time.monotonic() + 30
    while driver._pool_state()[0].data_fraction >= 0.25:
        assert time.monotonic() < deadline, "deleting the file gave the pool nothing back"
        time.sleep(0.1)
    driver.create_container("more", [], None, False)
    unmount(mounted.path)


def test_xfs_base_grows_with_the_quota(config: Config) -> None:
    need_tools("mkfs.xfs", "xfs_growfs")
    driver = start(config, fs="xfs", basesize=320 * MiB)
    layer = "a" * 64
    (driver.prepare_layer(layer, None) / "f").write_text("image")
    driver.commit_layer(layer)
    driver.create_container("x", [layer], 400 * MiB, False)
    driver.create_container("y", [layer], None, False)
    one = driver.mount("x", [layer], False, None).path
    two = driver.mount("y", [layer], False, None).path  # the same UUID twice: nouuid
    assert (one / "f").read_text() == (two / "f").read_text() == "image"

    def grown() -> int:  # what x has beyond y, whose filesystem is the base's size
        return sum(sign * os.statvfs(path).f_blocks * os.statvfs(path).f_frsize
                   for sign, path in ((1, one), (-1, two)))

    assert grown() == 80 * MiB
    driver.resize_quota("x", 512 * MiB, True)
    assert grown() == 192 * MiB
    driver.remove_container("x")
    driver.remove_container("y")
    driver.remove_layer(layer)
