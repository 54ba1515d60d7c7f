"""Concurrent pulls in one process, as the daemon runs them (DESIGN §5, imaged.ops.flights).

Shared blobs are downloaded once and shared layers unpacked once; a pull whose client goes away
cancels nothing another pull waits on and leaves nothing behind; leases cover a pull's blobs and
layers from the moment it knows them until it ends; a failed pull keeps what another relies on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from imaged.config import Overrides, load_config
from imaged.digest import Digest, chain_ids
from imaged.errors import ImagedError
from imaged.events import PullEvent
from imaged.layers.unpack import unpack_layer
from imaged.ops.pull import PullResult
from imaged.ops.service import Service
from imaged.testing.images import OCILayout, file, push
from imaged.testing.registry import LocalRegistry
from tests.conftest import upstream_gets
from tests.integration.faulty import (
    BIG,
    FaultyRegistry,
    Gate,
    Image,
    Layer,
    big_image,
    blob_path,
    make_image,
    make_layer,
    noise,
    sha256,
)

GATE_AT = BIG // 4


@pytest.fixture
def unpacked(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """DiffIDs as the pull machinery unpacks them: a spy around the real unpacker."""
    seen: Counter[str] = Counter()

    def spy(blob: Path, media_type: str, diff_id: Digest, *args: Any, **kwargs: Any) -> Any:
        seen[str(diff_id)] += 1
        return unpack_layer(blob, media_type, diff_id, *args, **kwargs)

    monkeypatch.setattr("imaged.ops.pull.unpack_layer", spy)
    return seen


@contextlib.asynccontextmanager
async def open_service(root: Path) -> AsyncIterator[Service]:
    async with Service.open(load_config(Overrides(root=root)), "test concurrent pulls") as svc:
        yield svc


class Pull:
    """One pull running in the background: its events, its result or error, a way to cancel."""

    def __init__(self, service: Service, ref: str, cancel_on: str | None = None) -> None:
        self.service = service
        self.ref = ref
        self.cancel_on = cancel_on  # a status that cancels the pull as it is reported
        self.events: list[PullEvent] = []
        self.result: PullResult | None = None
        self.error: ImagedError | None = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def run(self) -> None:
        try:
            with self.scope:
                self.result = await self.service.pull(self.ref, None, self.report)
        except ImagedError as exc:
            self.error = exc
        finally:
            self.done.set()

    def report(self, event: PullEvent) -> None:
        self.events.append(event)
        if event.status == self.cancel_on:
            self.scope.cancel()

    def saw(self, status: str, layer: str | None = None) -> bool:
        return any(e.status == status and (layer is None or e.layer == layer)
                   for e in self.events)



async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(20):
        # Conditions span the registry's threads and several tasks: polling is the one way
        # to wait on all of them.
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


def held_at_gate(faulty: FaultyRegistry, repo: str, layer: str, *pulls: Pull) -> Callable[
        [], bool]:
    """True once the registry holds ``layer``'s download at its gate and every pull follows
    that download (its own, or the one it waits on)."""
    return lambda: bool(faulty.requests_for(blob_path(repo, layer))) and all(
        p.saw("downloading", layer) for p in pulls)


def keys_of(image: Image) -> list[str]:
    """Every key a pull of ``image`` must lease: blobs, then layer chain IDs."""
    chains = chain_ids([Digest.parse(layer.diff_id) for layer in image.layers])
    return [image.manifest.digest, image.config.digest,
            *(layer.blob.digest for layer in image.layers), *(str(c) for c in chains)]


async def assert_consistent(service: Service) -> None:
    """The store checks clean (``imaged check``: no half-applied layer, no layer or blob
    without a row, …), and no lease is left over."""
    report = await service.check()
    assert report["findings"] == [], report
    assert not service.leases._held


def gated(faulty: FaultyRegistry, repo: str, blob_digest: str) -> threading.Event:
    """Hold the first download of a blob after ``GATE_AT`` bytes until the event is set."""
    release = threading.Event()
    faulty.routes[blob_path(repo, blob_digest)].script = [Gate(GATE_AT, release)]
    return release


# -- shared downloads and unpacks, on the real registry ---------------------------------------


@pytest.mark.parametrize("pulls", [("a", "b"), ("a", "a"), ("a", "b", "a", "b")])
async def test_concurrent_pulls_fetch_and_unpack_shared_content_once(
        registry: LocalRegistry, layout: OCILayout, root: Path, isolated_env: dict[str, str],
        unpacked: Counter[str], pulls: tuple[str, ...]) -> None:
    # A base big enough (16 MiB, incompressible) that pulls started together overlap on it.
    base = layout.add_layer([file("base.bin", hashlib.shake_256(b"base").digest(16 << 20))])
    repos = {}
    manifests = {}
    for name in sorted(set(pulls)):
        top = layout.add_layer([file(f"{name}.txt", f"image {name}\n".encode())])
        manifests[name] = layout.add_image([base, top])
        layout.tag(manifests[name], name)
        repos[name] = f"concurrent/shared-{'-'.join(pulls)}-{name}"
        push(layout, name, f"{registry.host}/{repos[name]}:v1")
    blobs = {base.blob.digest}
    for name in repos:
        doc = layout.path / "blobs" / "sha256" / manifests[name].digest.split(":")[1]
        manifest = json.loads(doc.read_bytes())
        blobs |= {manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])}

    async with open_service(root) as service:
        running = [Pull(service, f"{registry.host}/{repos[name]}:v1") for name in pulls]
        async with trio.open_nursery() as nursery:
            for pull in running:
                nursery.start_soon(pull.run)

        for pull, name in zip(running, pulls, strict=True):
            assert pull.error is None, pull.error
            assert pull.result is not None and str(pull.result.id) == manifests[name].digest
        assert any(pull.saw("waiting") for pull in running), "the pulls never overlapped"
        gets = [line for repo in repos.values() for line in upstream_gets(registry, repo)
                if "/blobs/" in line]
        for digest in blobs:
            assert sum(f"/blobs/{digest} " in line for line in gets) == 1, digest
        assert set(unpacked.values()) == {1}, unpacked
        assert len(unpacked) == 1 + len(repos)
        await assert_consistent(service)
        for name, repo in repos.items():
            mounted = await service.mount(f"{registry.host}/{repo}:v1", f"c-{name}",
                                          None, True, None)
            path = Path(mounted["path"])
            assert (path / f"{name}.txt").read_text() == f"image {name}\n"
            assert (path / "base.bin").stat().st_size == 16 << 20
            await service.rm(f"c-{name}", force=True)


# -- cancellation ------------------------------------------------------------------------------


def serve_big(repo: str, faulty: FaultyRegistry) -> Image:
    image = big_image(len(repo))
    faulty.add_image(repo, "v1", image)
    return image


async def test_cancelled_pull_leaves_shared_download_to_the_other(
        faulty: FaultyRegistry, root: Path, isolated_env: dict[str, str],
        unpacked: Counter[str]) -> None:
    repo = "concurrent/cancel-one"
    image = serve_big(repo, faulty)
    top = image.layers[-1].blob
    release = gated(faulty, repo, top.digest)

    async with open_service(root) as service:
        first, second = (Pull(service, f"{faulty.host}/{repo}:v1") for _ in range(2))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.run)
            nursery.start_soon(second.run)
            await wait_until(held_at_gate(faulty, repo, top.digest, first, second))
            first.scope.cancel()
            await first.done.wait()
            await trio.sleep(0.2)  # time enough for a wrongly cancelled download to show
            assert not second.done.is_set()
            assert all(service.leases.held(key) for key in keys_of(image))
            release.set()

        assert first.result is None and first.error is None  # cancelled
        assert second.error is None and second.result is not None
        assert str(second.result.id) == image.id
        assert len(faulty.requests_for(blob_path(repo, top.digest))) == 1
        assert set(unpacked.values()) == {1}
        await assert_consistent(service)


@pytest.mark.parametrize("during", ["download", "unpack"])
async def test_cancelling_the_only_pull_leaves_nothing(
        faulty: FaultyRegistry, root: Path, isolated_env: dict[str, str], during: str) -> None:
    repo = f"concurrent/cancel-only-{during}"
    image = serve_big(repo, faulty)
    top = image.layers[-1].blob
    release = gated(faulty, repo, top.digest) if during == "download" else None

    async with open_service(root) as service:
        pull = Pull(service, f"{faulty.host}/{repo}:v1",
                    cancel_on="unpacking" if during == "unpack" else None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull.run)
            if release is not None:
                await wait_until(held_at_gate(faulty, repo, top.digest, pull))
                pull.scope.cancel()
                # The cancelled download's thread notices only when bytes arrive (or at the
                # client's read timeout); the pull's undo waits for it.
                release.set()

        assert pull.result is None and pull.error is None
        assert service.store.meta.layers_in_state("ready") == []
        await assert_consistent(service)
        assert service.images() == []
        assert list(service.store.content.iter_blobs()) == []


# -- leases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["success", "failure"])
async def test_leases_cover_a_pull_until_it_ends(
        faulty: FaultyRegistry, root: Path, isolated_env: dict[str, str], outcome: str) -> None:
    repo = f"concurrent/leases-{outcome}"
    image = serve_big(repo, faulty)
    top = image.layers[-1].blob
    if outcome == "failure":
        faulty.routes[blob_path(repo, top.digest)].data = bytes(top.size)
    release = gated(faulty, repo, top.digest)

    async with open_service(root) as service:
        pull = Pull(service, f"{faulty.host}/{repo}:v1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull.run)
            await wait_until(held_at_gate(faulty, repo, top.digest, pull))
            assert [key for key in keys_of(image) if not service.leases.held(key)] == []
            release.set()

        if outcome == "success":
            assert pull.error is None
        else:
            assert pull.error is not None and top.digest in pull.error.message
        assert [key for key in keys_of(image) if service.leases.held(key)] == []
        await assert_consistent(service)


async def test_waiters_on_a_failed_download_all_get_its_error(
        faulty: FaultyRegistry, root: Path, isolated_env: dict[str, str]) -> None:
    repo = "concurrent/fail-together"
    image = serve_big(repo, faulty)
    top = image.layers[-1].blob
    faulty.routes[blob_path(repo, top.digest)].data = bytes(top.size)
    release = gated(faulty, repo, top.digest)

    async with open_service(root) as service:
        pulls = [Pull(service, f"{faulty.host}/{repo}:v1") for _ in range(3)]
        async with trio.open_nursery() as nursery:
            for pull in pulls:
                nursery.start_soon(pull.run)
            await wait_until(held_at_gate(faulty, repo, top.digest, *pulls))
            release.set()

        for pull in pulls:
            assert pull.error is not None and "failed verification" in pull.error.message
        await assert_consistent(service)
        assert list(service.store.content.iter_blobs()) == []


# -- a failed pull next to a successful one ----------------------------------------------------


async def test_failed_pull_keeps_the_layer_another_pull_relies_on(
        faulty: FaultyRegistry, root: Path, isolated_env: dict[str, str],
        unpacked: Counter[str]) -> None:
    repo = "concurrent/keep-shared"
    base = make_layer({"etc/os-release": b"ID=shared\n"})
    good = make_image([base, make_layer({"big.bin": noise(7)})])
    # Its blob verifies, but the config promises another DiffID: the unpack fails.
    bad_top = Layer(make_layer({"bad.txt": b"bad\n"}).blob, sha256(b"some other tar"))
    bad = make_image([base, bad_top])
    faulty.add_image(repo, "good", good)
    faulty.add_image(repo, "bad", bad)
    release = gated(faulty, repo, good.layers[-1].blob.digest)
    base_chain = base.diff_id

    async with open_service(root) as service:
        keeper = Pull(service, f"{faulty.host}/{repo}:good")
        failing = Pull(service, f"{faulty.host}/{repo}:bad")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keeper.run)
            # The good pull holds everything it relies on before the other starts.
            await wait_until(held_at_gate(faulty, repo, good.layers[-1].blob.digest, keeper))
            nursery.start_soon(failing.run)
            await failing.done.wait()
            assert failing.error is not None and "DiffID" in failing.error.message, \
                failing.error
            # The shared base survived the failure, applied, for the pull still holding it.
            meta = service.store.meta
            assert meta.layer_state(Digest.parse(base_chain)) is not None
            assert base_chain.split(":")[1] in service.store.driver().list_layers()
            assert service.store.content.has(Digest.parse(base.blob.digest))
            release.set()

        assert keeper.error is None and keeper.result is not None
        assert unpacked[base.diff_id] == 1
        assert meta.layer_state(Digest.parse(base_chain)) == "ready"
        assert not service.store.content.has(Digest.parse(bad.config.digest))
        assert not service.store.content.has(Digest.parse(bad_top.blob.digest))
        assert [img["id"] for img in service.images()] == [good.id]
        await assert_consistent(service)
