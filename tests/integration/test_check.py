"""``imaged check``: each kind of damage a crash or an operator can do to a real store is found
once, named with the images it affects, repaired with ``repair`` (and only then), after which
the store checks clean and still works: the image mounts and reads back what was pushed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imaged.config import Overrides, load_config
from imaged.digest import Digest
from imaged.host import loopdev
from imaged.host.mounts import bind_mount, is_mounted, unmount
from imaged.ops.service import Service
from imaged.store import check
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry, start_registry
from tests.conftest import CLI, Pushed, loop_filesystem, need_tools, push_simple, unmount_below


@pytest.fixture
def pushed(registry: LocalRegistry, layout: OCILayout, request: pytest.FixtureRequest
           ) -> Pushed:
    return push_simple(layout, registry, f"check/{request.node.name.split('[')[0][5:]}",
                       files={"hello.txt": b"hello\n"})


@pytest.fixture
def clean_up(root: Path, tmp_path: Path) -> Iterator[None]:
    """Whatever a test left mounted (under its root, or at a target it gave) or bound under
    its root goes, failing test or not."""
    yield
    unmount_below(root)
    unmount_below(tmp_path)
    for device, backing in loopdev.bound_devices():
        if backing.startswith(f"{root}/"):
            loopdev.detach(device)


@contextlib.asynccontextmanager
async def service_on(root: Path, driver: str | None = None) -> AsyncIterator[Service]:
    config = load_config(Overrides(root=root, driver=driver))
    async with Service.open(config, "test check") as service:
        yield service


@contextlib.asynccontextmanager
async def pulled(root: Path, pushed: Pushed, driver: str | None = None
                 ) -> AsyncIterator[Service]:
    async with service_on(root, driver) as service:
        await service.pull(pushed.ref, None, lambda _: None)
        yield service


async def findings(service: Service, verify_data: bool = False,
                   repair: bool = False) -> list[dict[str, Any]]:
    report = await service.check(verify_data, repair)
    assert report["ok"] is (report["findings"] == [])
    found: list[dict[str, Any]] = report["findings"]
    return found


async def assert_repaired(service: Service, kind: str, subject: str,
                          verify_data: bool = False) -> dict[str, Any]:
    """Found before; found and repaired by a repair; gone after; the one finding each time."""
    before = await findings(service, verify_data)
    assert [(f["kind"], f["subject"]) for f in before] == [(kind, subject)], before
    assert before[0]["repaired"] is False
    assert await findings(service, verify_data) == before  # a check alone changes nothing
    repaired = await findings(service, verify_data, repair=True)
    assert [(f["kind"], f["repaired"]) for f in repaired] == [(kind, True)], repaired
    assert await findings(service, verify_data=True) == []
    return before[0]


async def assert_image_works(service: Service, pushed: Pushed, name: str = "after") -> None:
    mounted = await service.mount(pushed.ref, name, None, False, None)
    assert (Path(mounted["path"]) / "hello.txt").read_bytes() == b"hello\n"
    assert (Path(mounted["path"]) / "etc/os-release").read_bytes() == b"ID=imaged-test\n"
    await service.rm(name, force=True)


def blob_file(root: Path, digest: str) -> Path:
    parsed = Digest.parse(digest)
    return root / "content" / "blobs" / parsed.algorithm / parsed.hex


def image_blobs(service: Service, ref: str) -> dict[str, str]:
    image = service.store.image(ref)
    return {"manifest": str(image.id), "config": str(image.config_digest),
            "layer": str(image.layers[-1].blob_digest)}


async def test_a_clean_store_checks_clean(root: Path, pushed: Pushed, tmp_path: Path,
                                          clean_up: None) -> None:
    async with pulled(root, pushed) as service:
        await service.mount(pushed.ref, "up", 32 << 20, False, None)
        await service.mount(pushed.ref, "given", None, False, tmp_path / "given")
        await service.create(pushed.ref, "idle", None, True)
        report = await service.check(verify_data=True)
        assert report == {"ok": True, "findings": [], "recovered": []}


@pytest.mark.parametrize("blob", ["manifest", "config", "layer"])
async def test_a_deleted_blob_is_fetched_again(root: Path, pushed: Pushed, blob: str,
                                               clean_up: None) -> None:
    async with pulled(root, pushed) as service:
        digest = image_blobs(service, pushed.ref)[blob]
        blob_file(root, digest).unlink()
        found = await assert_repaired(service, check.BLOB_MISSING, digest)
        assert found["images"] == [pushed.ref]
        assert found["message"] == (f"blob {digest} is missing from content/blobs; images: "
                                    f"{pushed.ref}")
        assert blob_file(root, digest).stat().st_size > 0
        await assert_image_works(service, pushed)


async def test_a_truncated_blob_is_fetched_again(root: Path, pushed: Pushed,
                                                 clean_up: None) -> None:
    async with pulled(root, pushed) as service:
        digest = image_blobs(service, pushed.ref)["layer"]
        os.truncate(blob_file(root, digest), 10)
        await assert_repaired(service, check.BLOB_SIZE, digest)
        await assert_image_works(service, pushed)


async def test_a_corrupted_byte_is_found_only_when_verifying_data(
        root: Path, pushed: Pushed, clean_up: None) -> None:
    async with pulled(root, pushed) as service:
        digest = image_blobs(service, pushed.ref)["config"]
        path = blob_file(root, digest)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x20
        path.write_bytes(bytes(data))
        assert await findings(service) == []
        found = await assert_repaired(service, check.BLOB_DIGEST, digest, verify_data=True)
        assert "is damaged: its bytes hash to sha256:" in found["message"]
        await assert_image_works(service, pushed)


async def test_a_blob_whose_registry_is_gone_is_named_with_its_images(
        root: Path, layout: OCILayout, tmp_path: Path, clean_up: None) -> None:
    gone = start_registry(tmp_path / "gone-registry")
    try:
        pushed = push_simple(layout, gone, "check/gone", files={"hello.txt": b"hello\n"})
        async with pulled(root, pushed) as service:
            gone.stop()
            digest = image_blobs(service, pushed.ref)["layer"]
            blob_file(root, digest).unlink()
            report = await service.check(repair=True)
            assert report["ok"] is False
            [found] = report["findings"]
            assert found["kind"] == check.BLOB_MISSING and found["repaired"] is False
            assert found["images"] == [pushed.ref]
            assert found["message"].startswith(f"blob {digest} is missing from content/blobs; "
                                               f"images: {pushed.ref} (not repaired: could not "
                                               f"fetch blob {digest} again ({pushed.ref}: ")
            assert [f["kind"] for f in await findings(service)] == [check.BLOB_MISSING]
    finally:
        gone.stop()


async def test_a_removed_layer_is_applied_again(root: Path, pushed: Pushed,
                                                clean_up: None) -> None:
    async with pulled(root, pushed) as service:
        driver = service.store.driver()
        chain = str(service.store.image(pushed.ref).layers[-1].chain_id)
        driver.remove_layer(chain.split(":")[1])
        report = await service.check()
        kinds = sorted(f["kind"] for f in report["findings"])
        # overlay also keeps a short link per layer, left dangling when the layer goes by hand
        assert check.LAYER_MISSING in kinds
        [missing] = [f for f in report["findings"] if f["kind"] == check.LAYER_MISSING]
        assert missing["subject"] == chain and missing["images"] == [pushed.ref]
        repaired = await findings(service, repair=True)
        assert all(f["repaired"] for f in repaired), repaired
        assert await findings(service, verify_data=True) == []
        assert service.store.meta.layer_state(Digest.parse(chain)) == "ready"
        await assert_image_works(service, pushed)


async def test_a_layer_left_half_applied_is_removed(root: Path, pushed: Pushed,
                                                    clean_up: None) -> None:
    chain = Digest.of(b"half-applied")
    async with pulled(root, pushed) as service:
        driver = service.store.driver()
        service.store.meta.begin_layer(chain, None, chain, driver.name)
        (driver.prepare_layer(chain.hex, None) / "partial").write_bytes(b"x")
        await assert_repaired(service, check.LAYER_INTERRUPTED, str(chain))
        assert chain.hex not in driver.list_layers()
        assert service.store.meta.layer_state(chain) is None
        # Left by a crash, the same row is what opening the root repairs, and says so.
        service.store.meta.begin_layer(chain, None, chain, driver.name)
        driver.prepare_layer(chain.hex, None)
    async with service_on(root) as service:
        report = await service.check()
        assert report["ok"] and report["recovered"] == [f"removed half-applied layer {chain}"]
        await assert_image_works(service, pushed)


async def test_a_layer_directory_with_no_record_is_removed(root: Path, pushed: Pushed,
                                                           clean_up: None) -> None:
    key = Digest.of(b"stray layer").hex
    async with pulled(root, pushed) as service:
        driver = service.store.driver()
        driver.prepare_layer(key, None)
        await assert_repaired(service, check.LAYER_UNRECORDED, f"sha256:{key}")
        assert key not in driver.list_layers()
        await assert_image_works(service, pushed)


@pytest.mark.parametrize("damage", ["directory removed", "row creating", "row removing",
                                    "no row"])
async def test_container_damage(root: Path, pushed: Pushed, damage: str,
                                clean_up: None) -> None:
    async with pulled(root, pushed) as service:
        driver = service.store.driver()
        await service.create(pushed.ref, "victim", None, False)
        kind = {"directory removed": check.CONTAINER_MISSING,
                "row creating": check.CONTAINER_INTERRUPTED,
                "row removing": check.CONTAINER_INTERRUPTED,
                "no row": check.CONTAINER_UNRECORDED}[damage]
        if damage == "directory removed":
            driver.remove_container("victim")
        elif damage == "no row":
            service.store.meta.delete_container("victim")
        else:
            service.store.meta.update_container("victim", state=damage.split()[1])
        await assert_repaired(service, kind, "victim")
        assert "victim" not in driver.list_containers()
        assert service.store.meta.container("victim") is None
        await assert_image_works(service, pushed, "victim")  # the name is free again


async def test_a_mount_record_whose_mount_went(root: Path, pushed: Pushed,
                                               clean_up: None) -> None:
    async with pulled(root, pushed) as service:
        path = Path((await service.mount(pushed.ref, "c", None, False, None))["path"])
        (path / "written").write_bytes(b"kept\n")
        unmount(path)  # an operator's umount, or a reboot
        found = await assert_repaired(service, check.MOUNT_STALE, "c")
        assert found["message"] == (f"container c is recorded as mounted at {path}, but "
                                    "nothing is mounted there")
        again = Path((await service.mount(None, "c", None, False, None))["path"])
        assert (again / "written").read_bytes() == b"kept\n"
        await service.rm("c", force=True)


async def test_mounts_under_the_root_that_nothing_records(root: Path, pushed: Pushed,
                                                          tmp_path: Path,
                                                          clean_up: None) -> None:
    async with pulled(root, pushed) as service:
        await service.mount(pushed.ref, "c", 32 << 20, False, None)
        await service.umount("c")
        merged = service.store.driver().home / "containers" / "c" / "merged"
        elsewhere = root / "content" / "stray"
        elsewhere.mkdir()
        (tmp_path / "src").mkdir()
        bind_mount(tmp_path / "src", merged)
        bind_mount(tmp_path / "src", elsewhere)
        found = {f["subject"]: f for f in await findings(service)}
        assert set(found) == {str(merged), str(elsewhere)}
        assert found[str(merged)]["message"].startswith(
            "container c is recorded as not mounted, but ")
        assert found[str(elsewhere)]["message"].endswith(
            f"is mounted at {elsewhere}, under the root, and nothing records it")
        assert all(f["repaired"] for f in await findings(service, repair=True))
        assert not is_mounted(merged) and not is_mounted(elsewhere)
        assert await findings(service) == []
        path = Path((await service.mount(None, "c", None, False, None))["path"])
        assert (path / "hello.txt").read_bytes() == b"hello\n"


async def test_a_loop_device_left_on_a_quota_image(root: Path, pushed: Pushed,
                                                   clean_up: None) -> None:
    need_tools("losetup")
    async with pulled(root, pushed) as service:
        await service.mount(pushed.ref, "q", 32 << 20, False, None)
        await service.umount("q")
        image = service.store.driver().home / "containers" / "q" / "quota.img"
        if not image.exists():
            pytest.skip("this root's containers have no loop quota images (project quotas)")
        # bound without autoclear, as losetup does: nothing lets go of it by itself
        device = (await trio.run_process(["losetup", "--find", "--show", str(image)],
                                         capture_stdout=True)).stdout.decode().strip()
        found = await assert_repaired(service, check.LOOP_UNRECORDED, device)
        assert found["message"] == (f"loop device {device} holds {image}, but nothing mounts "
                                    "or uses it")
        assert loopdev.find_by_backing_file(image) == []
        path = Path((await service.mount(None, "q", None, False, None))["path"])
        (path / "f").write_bytes(b"quota still works\n")


async def test_a_removal_left_for_later_is_found_once_nothing_holds_it(
        root: Path, pushed: Pushed, clean_up: None) -> None:
    """``rm --force`` with a file open keeps a loop quota's image for the detached mount;
    while the file is open that is no finding, once it closes it is one, and its repair
    removes what was left."""
    async with pulled(root, pushed) as service:
        path = Path((await service.mount(pushed.ref, "q", 32 << 20, False, None))["path"])
        home = service.store.driver().home
        if not (home / "containers" / "q" / "quota.img").exists():
            pytest.skip("this root's containers have no loop quota images (project quotas)")
        held = os.open(path / "held", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            await service.rm("q", force=True)
            [left] = os.listdir(home / "removed")
            assert left.startswith("q.") and (home / "removed" / left / "quota.img").exists()
            assert await findings(service) == []
        finally:
            os.close(held)
        found = await assert_repaired(service, check.REMOVAL_UNFINISHED, left)
        assert found["message"] == (f"removed container {left} left {home / 'removed' / left} "
                                    "behind, which nothing holds any more (imaged gc removes "
                                    "it)")
        assert os.listdir(home / "removed") == []


async def test_a_quota_that_differs_from_its_record(root: Path, pushed: Pushed,
                                                    clean_up: None) -> None:
    async with pulled(root, pushed) as service:
        await service.mount(pushed.ref, "q", 32 << 20, False, None)
        await service.umount("q")
        service.store.meta.update_container("q", quota=64 << 20)  # an operator's edit
        found = await assert_repaired(service, check.QUOTA_MISMATCH, "q")
        assert found["message"].startswith("container q has a quota of 32.")
        assert found["message"].endswith(" MiB on disk; its record says 64 MiB")
        assert (await service.container("q"))["quota"] == 64 << 20
        path = Path((await service.mount(None, "q", None, False, None))["path"])
        with (path / "big").open("wb") as f:
            f.write(b"\0" * (48 << 20))  # more than the old quota, within the new one


async def test_a_blob_file_with_no_record_goes_back_to_ingest(root: Path, pushed: Pushed,
                                                              clean_up: None) -> None:
    data = b"a blob nobody recorded\n"
    digest = Digest.of(data)
    async with pulled(root, pushed) as service:
        blob_file(root, str(digest)).write_bytes(data)
        await assert_repaired(service, check.BLOB_UNRECORDED, str(digest))
        assert (root / "content" / "ingest" / f"sha256-{digest.hex}").read_bytes() == data


async def test_btrfs_finds_a_writable_layer(root: Path, pushed: Pushed, tmp_path: Path,
                                            clean_up: None) -> None:
    btrfsutil = pytest.importorskip("btrfsutil")
    with loop_filesystem(["mkfs.btrfs", "--quiet"], tmp_path / "btrfs.img", root):
        try:
            async with pulled(root, pushed, "btrfs") as service:
                chain = service.store.image(pushed.ref).layers[0].chain_id
                layer = service.store.driver().home / "layers" / chain.hex
                btrfsutil.set_subvolume_read_only(layer, False)
                found = await assert_repaired(service, "layer-writable", str(chain))
                assert found["message"] == (f"layer {chain} is a writable subvolume; a ready "
                                            "layer is read-only")
                assert btrfsutil.get_subvolume_read_only(layer)
                await assert_image_works(service, pushed)
        finally:
            unmount_below(root)


@pytest.mark.cli_modes
def test_the_command_prints_a_line_per_finding_and_exits_1(
        imaged: CLI, pushed: Pushed, root: Path, cli_mode: str, clean_up: None) -> None:
    """The CLI, embedded and through the daemon's ``GET /v1/check``; repair is embedded only
    (the daemon holds the root), so in daemon mode it is refused until the daemon stops."""
    assert imaged("pull", pushed.ref).code == 0
    clean = imaged("check", "--verify-data")
    assert (clean.code, clean.out) == (0, "no findings\n")
    assert imaged("--json", "check").json() == {"ok": True, "findings": [], "recovered": []}
    digest = pushed.manifest_digest
    blob_file(root, digest).unlink()
    found = imaged("check")
    assert found.code == 1
    assert found.out == (f"blob-missing: blob {digest} is missing from content/blobs; images: "
                         f"{pushed.ref}\n")
    as_json = imaged("--json", "check")
    assert as_json.code == 1 and as_json.json()["ok"] is False
    if cli_mode == "daemon":
        refused = imaged("check", "--repair")
        assert refused.code == 1 and "--repair works only without a daemon" in refused.err
        assert imaged.daemon is not None
        imaged.daemon.stop()  # the next commands find no daemon and run embedded
    repaired = imaged("check", "--repair")
    assert repaired.code == 1 and repaired.out.endswith(" (repaired)\n"), repaired
    after = imaged("check", "--verify-data")
    assert (after.code, after.out) == (0, "no findings\n")
