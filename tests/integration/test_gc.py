"""Garbage collection (``Service.gc``) on real drivers with images from a real registry.

Freed bytes are checked against ``du -s --block-size=1`` (allocated blocks) of ``content/`` and
``drivers/`` before and after: metadata.db and its WAL change size for reasons of their own,
and the root's ext4 never shrinks a directory, so the two must agree to the byte.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from imaged.config import Overrides, load_config
from imaged.digest import Digest
from imaged.ops.service import Service
from imaged.store.root import why_layer_stays
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conformance.conftest import Bed
from tests.conftest import push_simple

T = TypeVar("T")
NOTHING = {"freed_bytes": 0,
           "removed": {"blobs": 0, "layers": 0, "partials": 0, "containers": 0},
           "failed": [], "pending": []}


class GcBed(Bed):
    """The conformance bed (driver, root, registry, CLI) with what gc tests look at."""

    def push_pull(self, repo: str) -> str:
        """Push and pull a two-layer image; every image of a test shares the same base layer."""
        pushed = push_simple(self.layout, self.registry, repo,
                             files={"data.bin": os.urandom(256 * 1024)})
        self.ok("pull", pushed.ref)
        return pushed.ref

    def with_service(self, action: Callable[[Service], Awaitable[T]]) -> T:
        async def main() -> T:
            config = load_config(Overrides(root=self.root))
            async with Service.open(config, "test gc") as service:
                return await action(service)

        return trio.run(main)

    def gc(self, hold: Iterable[str] = ()) -> dict[str, Any]:
        async def run(service: Service) -> dict[str, Any]:
            with service.leases.hold(hold):
                return await service.gc()

        return self.with_service(run)

    def du(self, *paths: Path) -> int:
        """What ``du`` sees of these paths together (hardlinks once). Not ``-x``: btrfs layers
        are subvolumes, each with a device number of its own; tests measure with nothing
        mounted below these paths instead."""
        targets = paths or (self.root / "content", self.root / "drivers")
        out = subprocess.run(["du", "-sc", "--block-size=1", *map(str, targets)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.splitlines()[-1].split()[0])

    def layer_keys(self) -> set[str]:
        return {p.name for p in (self.root / "drivers" / self.driver / "layers").iterdir()}

    def blob_names(self) -> set[str]:
        return {p.name for p in (self.root / "content" / "blobs" / "sha256").iterdir()}

    def parts(self, ref: str) -> tuple[list[str], list[str]]:
        """An image's blobs (manifest, config, layers base first) and its chain IDs."""
        db = sqlite3.connect(self.root / "metadata.db")
        try:
            (image_id,) = db.execute("SELECT image_id FROM refs WHERE name=?", (ref,)).fetchone()
            (config,) = db.execute("SELECT config_digest FROM images WHERE id=?",
                                   (image_id,)).fetchone()
            layers = db.execute("SELECT blob_digest, chain_id FROM image_layers WHERE image_id=?"
                                " ORDER BY position", (image_id,)).fetchall()
        finally:
            db.close()
        return [image_id, config, *(b for b, _ in layers)], [c for _, c in layers]

    def forget(self, ref: str) -> tuple[list[str], list[str]]:
        """Drop an image from the metadata behind imaged's back: its blobs and layers are left
        unreferenced (as a crash or a bug could leave them). Returns ``parts(ref)``."""
        parts = self.parts(ref)
        db = sqlite3.connect(self.root / "metadata.db")
        try:
            db.execute("PRAGMA foreign_keys=ON")  # image_layers rows go with their image
            with db:
                db.execute("DELETE FROM refs WHERE name=?", (ref,))
                db.execute("DELETE FROM images WHERE id=?", (parts[0][0],))
        finally:
            db.close()
        return parts


def hexes(digests: Iterable[str]) -> set[str]:
    return {d.split(":", 1)[1] for d in digests}


@pytest.fixture
def bed(driver: str, root: Path, registry: LocalRegistry, layout: OCILayout,
        imaged: Any) -> GcBed:
    return GcBed(driver, root, registry, layout, imaged)


def test_gc_on_an_empty_store(root: Path, isolated_env: dict[str, str]) -> None:
    async def main() -> tuple[dict[str, Any], str | None]:
        async with Service.open(load_config(Overrides(root=root)), "test gc") as service:
            return await service.gc(), service.store.meta.get_setting("driver")

    result, driver = trio.run(main)
    assert result == NOTHING
    assert driver is None  # gc did not choose (and so bind) a driver for the root


def test_orphans_go_and_freed_bytes_match_du(bed: GcBed) -> None:
    kept = bed.push_pull(f"gc/{bed.driver}/kept")
    orphan = bed.push_pull(f"gc/{bed.driver}/orphan")
    blobs, chains = bed.forget(orphan)
    stray = Digest.of(b"a layer directory nobody recorded")
    loose = os.urandom(300 * 1024)

    async def plant_and_collect(service: Service) -> tuple[dict[str, Any], int]:
        # Planted in the same session as gc runs: recovery at open would take them first.
        service.store.content.write_bytes(Digest.of(loose), loose)
        target = service.store.driver().prepare_layer(stray.hex, None)
        (target / "big").write_bytes(os.urandom(200 * 1024))
        os.link(target / "big", target / "big-again")  # one inode, counted once
        (target / "dir").mkdir()
        before = bed.du()
        return await service.gc(), before

    result, before = bed.with_service(plant_and_collect)
    after = bed.du()
    # manifest, config, top layer blob and the loose blob; the base blob is the kept image's too
    assert result["removed"] == {"blobs": 4, "layers": 2, "partials": 0, "containers": 0}
    assert result["freed_bytes"] == before - after
    assert result["freed_bytes"] > 500 * 1024
    kept_blobs, kept_chains = bed.parts(kept)
    assert bed.blob_names() == hexes(kept_blobs)
    assert bed.layer_keys() == hexes(kept_chains)
    assert blobs[2] in kept_blobs and chains[0] in kept_chains  # the shared base stays
    assert bed.gc() == NOTHING
    assert bed.du() == after
    path = bed.ok("mount", kept, "--name", "after-gc", "--read-only").out.splitlines()[-1]
    assert (Path(path) / "etc" / "os-release").read_bytes() == b"ID=imaged-test\n"
    bed.ok("rm", "--force", "after-gc")


def test_a_layer_that_cannot_be_removed_is_reported_not_counted(bed: GcBed) -> None:
    """An immutable file (chattr +i: even root cannot delete it) keeps its layer on disk: gc
    says so, counts none of its bytes as freed, and it goes once it can."""
    if bed.driver not in ("overlay", "vfs", "fuse"):
        pytest.skip("chattr +i is an ext4 attribute; this driver's layers are elsewhere")
    stray = Digest.of(b"a layer gc cannot remove")

    async def plant(service: Service) -> Path:
        target = service.store.driver().prepare_layer(stray.hex, None)
        (target / "stuck").write_bytes(os.urandom(200 * 1024))
        subprocess.run(["chattr", "+i", str(target / "stuck")], check=True)  # noqa: ASYNC221 - setup, nothing else runs
        return target

    target = bed.with_service(plant)
    try:
        result = bed.gc()
        assert result["removed"]["layers"] == 0
        assert result["freed_bytes"] < 200 * 1024
        assert [line.split(":", 2)[:2] for line in result["failed"]] == [
            ["layer sha256", stray.hex]]
        assert (target / "stuck").exists()
    finally:
        subprocess.run(["chattr", "-i", str(target / "stuck")], check=True)
    assert bed.gc()["failed"] == []  # the next open's recovery removed it
    assert not target.exists()


def test_leased_blobs_and_layers_are_kept(bed: GcBed) -> None:
    bed.push_pull(f"gc/{bed.driver}/base")
    orphan = bed.push_pull(f"gc/{bed.driver}/leased")
    blobs, chains = bed.forget(orphan)
    applying = Digest.of(b"a layer a pull is still applying")

    async def collect_around_leases(service: Service) -> None:
        # What a pull leaves while it applies a layer: a 'creating' row and a directory.
        driver = service.store.driver()
        service.store.meta.begin_layer(applying, None, applying, driver.name)
        (driver.prepare_layer(applying.hex, None) / "partial").write_bytes(b"x" * 10000)

        with service.leases.hold([blobs[3], chains[1], str(applying)]):
            result = await service.gc()
        # the manifest and the config
        assert result["removed"] == {"blobs": 2, "layers": 0, "partials": 0, "containers": 0}
        assert blobs[3].split(":")[1] in bed.blob_names()
        assert {chains[1].split(":")[1], applying.hex} <= bed.layer_keys()
        assert service.store.meta.layer_state(applying) == "creating"

        before = bed.du()
        result = await service.gc()
        assert result["removed"] == {"blobs": 1, "layers": 2, "partials": 0, "containers": 0}
        assert result["freed_bytes"] == before - bed.du()
        assert not {chains[1].split(":")[1], applying.hex} & bed.layer_keys()
        assert service.store.meta.layer_state(applying) is None

    bed.with_service(collect_around_leases)


def test_containers_keep_their_layers_until_they_go(bed: GcBed) -> None:
    ref = bed.push_pull(f"gc/{bed.driver}/used")
    blobs, chains = bed.parts(ref)
    bed.ok("mount", ref, "--name", "user")
    bed.ok("umount", "user")
    assert bed.gc() == NOTHING

    # rmi --force takes the name; the image stays recorded for its container
    bed.ok("rmi", "--force", ref)
    assert bed.gc() == NOTHING
    assert bed.layer_keys() == hexes(chains)
    assert bed.blob_names() == hexes(blobs)

    # the container goes: rm frees the image's blobs and layers, measured as du sees them
    measured = [bed.root / "content", bed.root / "drivers" / bed.driver / "layers"]
    links = bed.root / "drivers" / bed.driver / "l"
    measured += [links] if links.exists() else []
    before = bed.du(*measured)
    removed = bed.ok("--json", "rm", "user").json()
    assert removed["freed_bytes"] == before - bed.du(*measured)
    assert bed.layer_keys() == set()
    assert bed.blob_names() == set()
    assert bed.gc() == NOTHING


def test_rmi_keeps_what_a_pull_has_leased(bed: GcBed) -> None:
    ref = bed.push_pull(f"gc/{bed.driver}/rmi-lease")
    blobs, chains = bed.parts(ref)

    async def rmi_then_collect(service: Service) -> None:
        with service.leases.hold([blobs[2], chains[0]]):
            assert (await service.rmi(ref))["deleted"]
        assert bed.blob_names() == hexes(blobs[2:3])
        assert bed.layer_keys() == hexes(chains[:1])
        before = bed.du()
        result = await service.gc()
        assert result["removed"] == {"blobs": 1, "layers": 1, "partials": 0, "containers": 0}
        assert result["freed_bytes"] == before - bed.du()

    bed.with_service(rmi_then_collect)


def test_a_pull_during_a_removal_waits_and_finds_it_gone(
        bed: GcBed, monkeypatch: pytest.MonkeyPatch) -> None:
    """``rmi`` removes in a worker thread (``imaged.store.gc``); a pull of the same image that
    starts meanwhile must not take up the blob or layer being removed: it waits until the
    removal ends, then fetches and applies them again, and the store checks clean."""
    ref = bed.push_pull(f"gc/{bed.driver}/during")
    entered, go = threading.Event(), threading.Event()

    def paused(driver: Any, key: str) -> str | None:
        """The removal, stopped after its row went and before its directory does."""
        entered.set()
        go.wait(30)
        return why_layer_stays(driver, key)

    monkeypatch.setattr("imaged.store.gc.why_layer_stays", paused)

    async def rmi_and_pull(service: Service) -> None:
        pulled = trio.Event()

        async def pull() -> None:
            await service.pull(ref, None, lambda event: None)
            pulled.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.rmi, ref)
            await trio.to_thread.run_sync(entered.wait, 30)
            nursery.start_soon(pull)
            await trio.sleep(0.5)  # time enough to reach the keys being removed
            assert not pulled.is_set()  # held off them
            go.set()
        report = await service.check(verify_data=True)
        assert report["findings"] == [], report
        assert [image["refs"] for image in service.images()] == [[ref]]

    bed.with_service(rmi_and_pull)


@pytest.mark.cli_modes
def test_gc_command(imaged: Any, registry: LocalRegistry, layout: OCILayout, root: Path) -> None:
    """``imaged gc`` prints the bytes freed; ``--json`` gives the API's shape, in both modes."""
    pushed = push_simple(layout, registry, "gc/cli")
    assert imaged("pull", pushed.ref).code == 0
    assert imaged("mount", pushed.ref, "--name", "user").code == 0
    assert imaged("rmi", "--force", pushed.ref).code == 0  # the container keeps the layers

    kept = imaged("gc")
    assert kept.code == 0, kept.err
    assert kept.out.strip() == "0"
    assert imaged("rm", "--force", "user").code == 0
    assert (root / "content" / "blobs" / "sha256").exists()
    result = imaged("--json", "gc")
    assert result.code == 0, result.err
    assert result.json() == NOTHING  # rm released the image, its blobs and layers already
