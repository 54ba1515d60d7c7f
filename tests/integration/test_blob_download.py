"""The blob download's two-thread pipeline (registry_client/client.py, ``_BlobDownload``).

Above ``_INLINE_BYTES`` a blob is received into ``_PIPELINE_DEPTH`` reused buffers by one thread
and hashed by another (docs/design.md, "Concurrency"). Pulls of big images go through it
incidentally; these tests aim at it: the right bytes and digest through a real registry, a
corrupt blob refused, a connection dropped (FIN) or reset (RST) mid-blob resumed with Range, and
a cancelled download that leaves no pipeline thread running and resumes where it stopped.

Blobs above the threshold are more than twice ``_PIPELINE_DEPTH`` buffers long and not a whole
number of them, so every buffer is reused and the last one is partly filled. On loopback the
hasher keeps up and the queue between the threads stays nearly empty; ``slow_hasher`` delays each
hash so the receiver runs ``_PIPELINE_DEPTH`` buffers ahead and waits for free ones: the regime
where a buffer handed back too early, or queued buffers forgotten after a drop or a cancel, would
show (a delay to create back-pressure, never a timing that is asserted). A spy on the two
pipeline threads proves the pipeline ran (a test that silently went inline would prove nothing).
Each download runs its own trio loop in a thread of the test's, so a pipeline that deadlocks
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from imaged.config import Overrides, load_config
from imaged.digest import Digest
from imaged.errors import ContentError
from imaged.registry_client.client import (
    _INLINE_BYTES,
    _PIPELINE_DEPTH,
    CHUNK,
    RegistryClient,
    _BlobDownload,
)
from imaged.registry_client.manifest import Descriptor
from imaged.registry_client.reference import parse_reference
from imaged.registry_client.retry import RetryPolicy
from imaged.store.content import ContentStore, Ingest
from imaged.testing.images import OCILayout, file, push
from imaged.testing.registry import LocalRegistry
from tests.integration.faulty import OCTET, Drop, FaultyRegistry, Reset, blob_path, sha256

T = TypeVar("T")
FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)
HANG = 120.0  # seconds: not a timing assertion, only how long a deadlock may hold the suite
BIG = 2 * _PIPELINE_DEPTH * CHUNK + 12_345  # every buffer reused twice, the last one partial
SMALL = _INLINE_BYTES // 4 + 6_789
REPO = "pipeline/blob"
HASH_DELAY = 0.02  # seconds per buffer hashed under slow_hasher


def noise(size: int, seed: bytes = b"pipeline") -> bytes:
    return hashlib.shake_256(seed).digest(size)


@dataclass
class PipelineSpy:
    """Counts the pipeline's threads: how many ran, how many are running now."""

    started: int = 0
    live: int = 0
    linger: float = 0.0  # how long a finished thread stays counted (makes a leaked one visible)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, method: Callable[..., None]) -> Callable[..., None]:
        def spied(download: _BlobDownload, *args: Any) -> None:
            with self.lock:
                self.started += 1
                self.live += 1
            try:
                method(download, *args)
            finally:
                time.sleep(self.linger)
                with self.lock:
                    self.live -= 1

        return spied


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> PipelineSpy:
    spy = PipelineSpy()
    monkeypatch.setattr(_BlobDownload, "_produce", spy.wrap(_BlobDownload._produce))
    monkeypatch.setattr(_BlobDownload, "_digest", spy.wrap(_BlobDownload._digest))
    return spy


@pytest.fixture
def slow_hasher(monkeypatch: pytest.MonkeyPatch) -> None:
    absorb = Ingest.absorb

    def slow(ingest: Ingest, data: bytes | memoryview) -> None:
        time.sleep(HASH_DELAY)
        absorb(ingest, data)

    monkeypatch.setattr(Ingest, "absorb", slow)


def bounded(main: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(main)`` in a thread of its own, failing the test if it has not ended in HANG
    seconds (a worker thread blocked for good cannot be cancelled, so trio would wait forever)."""
    outcome: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(trio.run(main))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            error.append(exc)

    thread = threading.Thread(target=run, name="blob-download-test", daemon=True)
    thread.start()
    thread.join(HANG)
    if thread.is_alive():
        pytest.fail(f"the blob download hung for {HANG} s")
    if error:
        raise error[0]
    return outcome[0]


@dataclass
class Downloader:
    client: RegistryClient
    content: ContentStore

    def descriptor(self, data: bytes) -> Descriptor:
        return Descriptor(OCTET, Digest.parse(sha256(data)), len(data))

    def open(self, desc: Descriptor) -> Ingest:
        return self.content.open_ingest(desc.digest, desc.size)

    def fetch(self, host: str, desc: Descriptor, ingest: Ingest,
              progress: Callable[[int], None] | None = None) -> None:
        ref = parse_reference(f"{host}/{REPO}:v1")
        bounded(lambda: self.client.fetch_blob(ref, desc, ingest, progress))


@pytest.fixture
def downloader(tmp_path: Path, isolated_env: dict[str, str]) -> Iterator[Downloader]:
    config = load_config(Overrides(root=tmp_path / "root"))
    client = RegistryClient(config, policy=FAST)
    try:
        yield Downloader(client, ContentStore(tmp_path / "root" / "content"))
    finally:
        client.close()


def fetched(ingest: Ingest) -> bytes:
    return ingest.path.read_bytes()


def serve_blob(faulty: FaultyRegistry, desc: Descriptor, data: bytes, **route: Any) -> str:
    """Serve ``data`` as the blob ``desc`` names (whatever its bytes hash to)."""
    path = blob_path(REPO, str(desc.digest))
    faulty.add(path, data, headers={"Docker-Content-Digest": str(desc.digest)}, **route)
    return path


# -- the right bytes, through a real registry ------------------------------------------------


@pytest.mark.parametrize(("size", "pipelined"), [(SMALL, False), (BIG, True)],
                         ids=["below-threshold", "above-threshold"])
def test_blob_from_real_registry_is_byte_exact(
        registry: LocalRegistry, layout: OCILayout, downloader: Downloader, spy: PipelineSpy,
        size: int, pipelined: bool) -> None:
    layer = layout.add_layer([file("blob.bin", noise(size, str(size).encode()))], None)
    tag = f"pipeline-{size}"
    layout.tag(layout.add_image([layer]), tag)
    push(layout, tag, f"{registry.host}/{REPO}:{tag}")
    expected = (layout.path / "blobs" / "sha256" / layer.blob.digest.split(":", 1)[1]).read_bytes()
    desc = Descriptor(layer.blob.media_type, Digest.parse(layer.blob.digest), layer.blob.size)
    assert (desc.size > _INLINE_BYTES) is pipelined

    ingest = downloader.open(desc)
    try:
        downloader.fetch(registry.host, desc, ingest)  # verifies size and digest itself
        assert ingest.complete
        assert fetched(ingest) == expected
    finally:
        ingest.close()
    assert spy.started == (2 if pipelined else 0)
    assert spy.live == 0


def test_hasher_slower_than_receiver_hashes_every_byte(
        faulty: FaultyRegistry, downloader: Downloader, spy: PipelineSpy,
        slow_hasher: None) -> None:
    data = noise(BIG, b"slow")
    desc = downloader.descriptor(data)
    serve_blob(faulty, desc, data)

    ingest = downloader.open(desc)
    try:
        downloader.fetch(faulty.host, desc, ingest)  # would fail verification on a refilled buffer
        assert fetched(ingest) == data
    finally:
        ingest.close()
    assert spy.started == 2
    assert spy.live == 0


# -- a corrupt blob is refused ---------------------------------------------------------------


@pytest.mark.parametrize("where", [100, BIG - 10], ids=["first-buffer", "last-buffer"])
def test_corrupt_blob_above_threshold_is_refused(
        faulty: FaultyRegistry, downloader: Downloader, spy: PipelineSpy, where: int) -> None:
    good = noise(BIG)
    desc = downloader.descriptor(good)
    bad = bytearray(good)
    bad[where] ^= 0x01
    serve_blob(faulty, desc, bytes(bad))  # under the good blob's digest, as a broken mirror would

    ingest = downloader.open(desc)
    try:
        with pytest.raises(ContentError, match=r"failed verification: its bytes hash to "
                                                rf"sha256:{hashlib.sha256(bad).hexdigest()}"):
            downloader.fetch(faulty.host, desc, ingest)
        assert ingest.offset == 0, "bad bytes must not be kept for a resume"
        assert fetched(ingest) == b""
    finally:
        ingest.close()
    assert spy.started == 2
    assert spy.live == 0


# -- a connection dropped mid-blob resumes with Range ----------------------------------------


@pytest.mark.parametrize(("drops", "honour_range", "slow"), [
    ([20 * CHUNK + 7], True, False),  # the rest (over the threshold) goes through the pipeline
    ([20 * CHUNK + 7], True, True),  # ... with buffers still queued for hashing at the drop
    ([BIG - CHUNK - 3], True, False),  # the rest is small: the inline path carries on the hash
    ([BIG - CHUNK - 3], True, True),
    ([9 * CHUNK + 1, 6 * CHUNK + 5], True, False),  # dropped twice
    ([20 * CHUNK + 7], False, False),  # the server ignores Range: everything again, from byte 0
], ids=["rest-pipelined", "rest-pipelined-slow-hasher", "rest-inline", "rest-inline-slow-hasher",
        "twice", "range-ignored"])
def test_dropped_connection_above_threshold_resumes(
        faulty: FaultyRegistry, downloader: Downloader, spy: PipelineSpy,
        request: pytest.FixtureRequest, drops: list[int], honour_range: bool,
        slow: bool) -> None:
    if slow:
        request.getfixturevalue("slow_hasher")
    data = noise(BIG)
    desc = downloader.descriptor(data)
    path = serve_blob(faulty, desc, data, script=[Drop(after) for after in drops],
                      honour_range=honour_range)

    ingest = downloader.open(desc)
    try:
        downloader.fetch(faulty.host, desc, ingest)
        assert ingest.complete
        assert fetched(ingest) == data
    finally:
        ingest.close()
    asked = faulty.requests_for(path)
    offsets = [sum(drops[:i]) for i in range(len(drops) + 1)]
    assert [r.range for r in asked] == [None, *(f"bytes={o}-" for o in offsets[1:])], asked
    assert [r.status for r in asked] == [200, *[206 if honour_range else 200] * len(drops)]
    assert spy.started >= 2
    assert spy.live == 0


@pytest.mark.parametrize("slow", [False, True], ids=["fast-hasher", "slow-hasher"])
def test_reset_connection_above_threshold_resumes(
        faulty: FaultyRegistry, downloader: Downloader, spy: PipelineSpy,
        request: pytest.FixtureRequest, slow: bool) -> None:
    """A reset fails the receiver's read (a drop above ended the body early): the buffers it
    had queued must still be hashed before the resume carries on from the ingest's offset."""
    if slow:
        request.getfixturevalue("slow_hasher")
    data = noise(BIG)
    desc = downloader.descriptor(data)
    after = 20 * CHUNK + 7
    path = serve_blob(faulty, desc, data, script=[Reset(after)])

    ingest = downloader.open(desc)
    try:
        downloader.fetch(faulty.host, desc, ingest)
        assert ingest.complete
        assert fetched(ingest) == data
    finally:
        ingest.close()
    asked = faulty.requests_for(path)
    assert len(asked) == 2 and asked[0].range is None, asked
    resumed = asked[1].range  # where the resume starts: the reset may lose bytes in flight
    assert resumed is None or resumed.startswith("bytes="), resumed
    assert resumed is None or int(resumed[6:].rstrip("-")) <= after, resumed
    assert spy.started >= 2
    assert spy.live == 0


# -- cancellation stops both threads and leaves a resumable ingest ---------------------------


@pytest.mark.parametrize("slow", [False, True], ids=["at-first-report", "queue-full-slow-hasher"])
def test_cancelled_download_leaves_no_thread_and_resumes(
        faulty: FaultyRegistry, downloader: Downloader, spy: PipelineSpy,
        request: pytest.FixtureRequest, slow: bool) -> None:
    # Slow: cancelled once the receiver is a whole pipeline ahead of the hasher, buffers queued.
    cancel_beyond = _PIPELINE_DEPTH * CHUNK if slow else 0
    if slow:
        request.getfixturevalue("slow_hasher")
    data = noise(BIG)
    desc = downloader.descriptor(data)
    path = serve_blob(faulty, desc, data)
    spy.linger = 0.2  # a thread trio did not wait for is still counted when the fetch returns
    scope = trio.CancelScope()
    reports: list[int] = []
    live_after: list[int] = []
    ref = parse_reference(f"{faulty.host}/{REPO}:v1")

    def progress(current: int) -> None:  # runs on the trio side, mid-download
        reports.append(current)
        if current > cancel_beyond:
            scope.cancel()

    ingest = downloader.open(desc)
    try:
        async def cancelled() -> None:
            with scope:
                await downloader.client.fetch_blob(ref, desc, ingest, progress)
            live_after.append(spy.live)

        bounded(cancelled)
        assert scope.cancelled_caught, "the download ended before it was cancelled"
        assert live_after == [0], "a pipeline thread outlived the cancelled download"
        assert spy.started == 2
        assert cancel_beyond < ingest.offset < desc.size, (reports, ingest.offset)
        stopped_at = ingest.offset
        assert len(fetched(ingest)) == stopped_at

        downloader.fetch(faulty.host, desc, ingest)  # same ingest: its hash state carries on
        assert ingest.complete
        assert fetched(ingest) == data
    finally:
        ingest.close()
    assert [r.range for r in faulty.requests_for(path)] == [None, f"bytes={stopped_at}-"]
    assert spy.live == 0
