"""``imaged check --verify-data`` reads the unpacked layers too (issue 17): a file damaged in a
layer's tree, by a disk fault or by hand, is one ``layer-damaged`` finding naming the layer, its
images and what differs; ``--repair`` applies the layer again from its verified blob, after
which the store verifies and a new container reads the pushed bytes. Each driver family keeps
its layers its own way (overlay and fuse: the layer's own diff with overlay whiteouts; vfs and
btrfs: the whole tree after the layer), so each is damaged where its layers really live."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imaged.digest import Digest
from imaged.drivers import Driver
from imaged.ops.service import Service
from imaged.store import check
from imaged.testing.images import Entry, OCILayout, directory, file, push, symlink
from imaged.testing.registry import LocalRegistry
from tests.conftest import CLI, Pushed, driver_bed, unmount_below
from tests.integration.test_check import assert_repaired, findings, pulled

TOOL = bytes(range(256)) * 512  # 128 KiB: more than one of the unpacker's reads
CONFIG = b"key = value\n"


def base_entries() -> list[Entry]:
    return [directory("etc"), file("etc/os-release", b"ID=imaged-test\n"),
            file("etc/app.conf", CONFIG, mode=0o640), symlink("etc/config", "app.conf"),
            file("etc/old", b"replaced by the top layer's whiteout\n"),
            directory("usr"), directory("usr/bin"), file("usr/bin/tool", TOOL, mode=0o755),
            Entry("usr/bin/tool-alias", type=tarfile.LNKTYPE, target="usr/bin/tool"),
            directory("var"), file("var/cache", b"hidden by the top layer\n")]


def top_entries() -> list[Entry]:
    return [file("hello.txt", b"hello\n"), file("etc/.wh.old", b""),
            directory("var"), file("var/.wh..wh..opq", b""), file("var/fresh", b"new\n")]


@pytest.fixture
def image(registry: LocalRegistry, layout: OCILayout, request: pytest.FixtureRequest) -> Pushed:
    """Two layers with a file of each kind the unpacker writes, a whiteout and an opaque
    directory."""
    manifest = layout.add_image([layout.add_layer(base_entries()),
                                 layout.add_layer(top_entries())])
    name = f"verify-{hashlib.sha256(request.node.name.encode()).hexdigest()[:12]}"
    layout.tag(manifest, name)
    ref = f"{registry.host}/verify/{name}:v1"
    push(layout, name, ref)
    return Pushed(ref, manifest.digest, layout)


@pytest.fixture(params=["overlay", "fuse", "vfs", "btrfs"])
def driver(request: pytest.FixtureRequest, tmp_path: Path, root: Path,
           isolated_env: dict[str, str]) -> Iterator[str]:
    """Stacked (overlay, fuse) and snapshot drivers (vfs; btrfs on a loop btrfs); whatever a
    test leaves mounted under the root goes, failing or not."""
    with driver_bed(request, tmp_path, request.param) as name:
        try:
            yield name
        finally:
            unmount_below(root)


@contextlib.contextmanager
def writable_tree(driver: Driver, key: str) -> Iterator[Path]:
    """The layer's tree for the test to damage: a btrfs layer is a read-only subvolume, made
    writable for the moment (and read-only again, so the only finding is the damage)."""
    with driver.layer_tree(key) as tree:
        if driver.name != "btrfs":
            yield tree
            return
        import btrfsutil

        btrfsutil.set_subvolume_read_only(tree, False)
        try:
            yield tree
        finally:
            btrfsutil.set_subvolume_read_only(tree, True)


def overwrite(tree: Path) -> str:
    with (tree / "usr/bin/tool").open("r+b") as f:
        f.seek(70_000)
        f.write(b"\xff" * 16)
    return "usr/bin/tool: contents differ"


def truncate(tree: Path) -> str:
    os.truncate(tree / "usr/bin/tool", 1000)
    return f"usr/bin/tool: size 1000, not {len(TOOL)}"


def chmod(tree: Path) -> str:
    (tree / "etc/app.conf").chmod(0o666)
    return "etc/app.conf: mode 0666, not 0640"


def delete(tree: Path) -> str:
    (tree / "etc/app.conf").unlink()
    return "etc/app.conf: missing"


def retarget(tree: Path) -> str:
    (tree / "etc/config").unlink()
    (tree / "etc/config").symlink_to("/etc/shadow")
    return "etc/config: symlink target '/etc/shadow', not 'app.conf'"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "overwrite": overwrite, "truncate": truncate, "chmod": chmod, "delete": delete,
    "retarget": retarget}


async def assert_reads_pushed(service: Service, ref: str, name: str) -> None:
    """A container created now reads every file as pushed, through the driver's stacking."""
    mounted = Path((await service.mount(ref, name, None, False, None))["path"])
    try:
        assert (mounted / "usr/bin/tool").read_bytes() == TOOL
        assert (mounted / "usr/bin/tool-alias").read_bytes() == TOOL
        assert (mounted / "etc/app.conf").stat().st_mode & 0o7777 == 0o640
        assert os.readlink(mounted / "etc/config") == "app.conf"
        assert (mounted / "etc/config").read_bytes() == CONFIG
        assert not (mounted / "etc/old").exists()
        assert sorted(os.listdir(mounted / "var")) == ["fresh"]
    finally:
        await service.rm(name, force=True)


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_a_damaged_layer_file_is_found_and_the_layer_applied_again(
        root: Path, image: Pushed, driver: str, damage: str) -> None:
    async with pulled(root, image, driver) as service:
        assert await findings(service, verify_data=True) == []
        base = service.store.image(image.ref).layers[0].chain_id
        with writable_tree(service.store.driver(), base.hex) as tree:
            what = DAMAGE[damage](tree)
        assert await findings(service) == []  # only reading the data shows it
        found = await assert_repaired(service, check.LAYER_DAMAGED, str(base), verify_data=True)
        blob = service.store.image(image.ref).layers[0].blob_digest
        assert found["message"] == (f"layer {base} differs from its blob {blob}: {what}; "
                                    f"images: {image.ref}")
        assert found["images"] == [image.ref]
        assert service.store.meta.layer_state(base) == "ready"
        await assert_reads_pushed(service, image.ref, "after")


async def test_a_fault_in_every_file_is_one_finding_naming_the_first_paths(
        root: Path, image: Pushed, driver: str) -> None:
    """However many files a fault hurt, one line per layer: the first paths, then a count;
    the top layer's whiteout and opaque directory, as the driver stores them, are compared
    too."""
    async with pulled(root, image, driver) as service:
        layers = service.store.image(image.ref).layers
        base, top = layers[0].chain_id, layers[1].chain_id
        with writable_tree(service.store.driver(), base.hex) as tree:
            for what in DAMAGE.values():
                with contextlib.suppress(FileNotFoundError):
                    what(tree)
        with writable_tree(service.store.driver(), top.hex) as tree:
            (tree / "etc/old").unlink(missing_ok=True)  # overlay's whiteout; vfs/btrfs: none
            (tree / "etc/old").write_bytes(b"back\n")
            (tree / "var/cache").write_bytes(b"not hidden any more\n")
        found = {f["subject"]: f["message"] for f in await findings(service, verify_data=True)}
        assert sorted(found) == sorted([str(base), str(top)])
        assert "etc/app.conf: missing; etc/config: symlink target" in found[str(base)]
        assert "usr/bin/tool: size 1000, not 131072" in found[str(base)]
        whiteout = "is a regular file, not a whiteout (a 0/0 character device)" \
            if driver in ("overlay", "fuse") else "is a regular file, but the layer deletes it"
        hidden = "not in the layer" if driver in ("overlay", "fuse") else \
            "present, but the layer's opaque marker removes it"
        assert found[str(top)] == (f"layer {top} differs from its blob {layers[1].blob_digest}: "
                                   f"etc/old: {whiteout}; var/cache: {hidden}; images: "
                                   f"{image.ref}")
        repaired = await findings(service, verify_data=True, repair=True)
        assert [f["repaired"] for f in repaired] == [True, True], repaired
        assert await findings(service, verify_data=True) == []
        await assert_reads_pushed(service, image.ref, "after")


async def test_a_layer_a_mounted_container_reads_is_left_with_what_to_do(
        root: Path, image: Pushed, driver: str) -> None:
    """A stacked driver's mounted container reads the layer's own directory (overlayfs: lower
    layers must not change while mounted), so the repair waits for its unmount and says so;
    a snapshot driver's container is a copy of its own, so the layer is applied again under
    it, and the container keeps its data."""
    async with pulled(root, image, driver) as service:
        mounted = Path((await service.mount(image.ref, "busy", None, False, None))["path"])
        (mounted / "mine").write_bytes(b"acknowledged\n")
        base = service.store.image(image.ref).layers[0].chain_id
        with writable_tree(service.store.driver(), base.hex) as tree:
            overwrite(tree)
        [found] = await findings(service, verify_data=True, repair=True)
        stacked = service.store.driver().capabilities().family == "stacked"
        if stacked:
            assert found["repaired"] is False
            assert found["error"] == ("mounted container busy read it: unmount (imaged umount "
                                      "NAME), then run imaged check --repair again")
            await service.umount("busy")
            [found] = await findings(service, verify_data=True, repair=True)
        assert found["repaired"] is True, found
        assert await findings(service, verify_data=True) == []
        if stacked:
            mounted = Path((await service.mount(image.ref, "busy", None, False, None))["path"])
        assert (mounted / "mine").read_bytes() == b"acknowledged\n"
        assert (mounted / "usr/bin/tool").read_bytes() == TOOL
        await service.rm("busy", force=True)


async def test_zfs_says_what_to_do_when_clones_hold_the_damaged_layer(
        request: pytest.FixtureRequest, tmp_path: Path, root: Path,
        isolated_env: dict[str, str], image: Pushed) -> None:
    """zfs-fuse: the top layer is a clone of the base layer's snapshot, which ZFS will not
    destroy under it, so the base is not applied again; the finding names the clone and what
    the user must do, and nothing is removed. The top layer, which nothing is cloned from,
    is applied again. (The service reads the pool's dataset from the test's config file.)"""
    with driver_bed(request, tmp_path, "zfs"):
        try:
            async with pulled(root, image, "zfs") as service:
                layers = service.store.image(image.ref).layers
                base, top = layers[0].chain_id, layers[1].chain_id
                driver = service.store.driver()
                with driver.layer_tree(base.hex) as tree:
                    overwrite(tree)
                with driver.layer_tree(top.hex) as tree:
                    (tree / "hello.txt").write_bytes(b"goodbye\n")
                found = await findings(service, verify_data=True, repair=True)
                dataset = service.store.config.drivers["zfs"]["dataset"]
                assert [(f["subject"], f["repaired"]) for f in found] == \
                    [(str(base), False), (str(top), True)], found
                assert found[0]["error"] == (
                    f"ZFS clones of it remain ({dataset}/layers/{top.hex}): "
                    "remove the containers and images built on it (imaged rm, imaged rmi, "
                    f"imaged gc), then imaged pull {image.ref} again")
                after = await findings(service, verify_data=True)
                assert [f["subject"] for f in after] == [str(base)]
                assert service.store.meta.layer_state(base) == "ready"
        finally:
            unmount_below(root)


def test_the_command_names_the_layer_and_exits_1(imaged: CLI, image: Pushed,
                                                 root: Path) -> None:
    assert imaged("pull", image.ref).code == 0
    assert imaged("check", "--verify-data").code == 0
    diff = next((root / "drivers" / "overlay" / "layers").glob("*/diff/usr/bin/tool"))
    diff.chmod(0o700)
    chain = f"sha256:{diff.parents[3].name}"
    assert imaged("check").code == 0
    found = imaged("check", "--verify-data")
    assert found.code == 1
    assert found.out.startswith(f"layer-damaged: layer {chain} differs from its blob ")
    assert found.out.endswith(f": usr/bin/tool: mode 0700, not 0755; images: {image.ref}\n")
    repaired = imaged("check", "--verify-data", "--repair")
    assert repaired.code == 1 and repaired.out.endswith(" (repaired)\n"), repaired
    assert (imaged("check", "--verify-data").code, diff.stat().st_mode & 0o7777) == (0, 0o755)
    assert Digest.parse(chain).hex in os.listdir(root / "drivers" / "overlay" / "layers")
