"""Pulls against a registry that misbehaves on demand (tests/integration/faulty.py).

DESIGN §2, §4, §6: blobs verified while streaming and resumable with Range; 429/502/503 retried
honouring Retry-After; manifests size-capped and type-checked; a failed pull leaves the store as
it was; mirrors tried before the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from imaged.config import Overrides, load_config
from imaged.errors import ImagedError
from imaged.events import PullEvent
from imaged.ops.service import Service
from imaged.registry_client.client import RegistryClient
from imaged.registry_client.retry import RetryPolicy
from imaged.store.root import Store
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry, free_port
from tests.conftest import Result, push_simple, upstream_gets
from tests.integration.faulty import (
    Drop,
    Endless,
    Fail,
    FaultyRegistry,
    Hangup,
    Oversized,
    big_image,
    blob_path,
    image_from_layout,
    make_image,
    make_layer,
    manifest_path,
    noise,
    sha256,
    top_layer,
)

Imaged = Callable[..., Result]
DROP_AT = 100_000  # bytes of that layer sent before a dropped connection


def blob_file(root: Path, digest: str) -> Path:
    return root / "content" / "blobs" / "sha256" / digest.split(":", 1)[1]


def ingest_file(root: Path, digest: str) -> Path:
    return root / "content" / "ingest" / digest.replace(":", "-")


def snapshot(root: Path) -> dict[str, Any]:
    """Everything a pull may change: blobs and their hashes, the drivers' trees, every row."""
    blobs = root / "content" / "blobs"
    files = {str(p.relative_to(blobs)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(blobs.rglob("*")) if p.is_file()}
    drivers = root / "drivers"
    layers = sorted(str(p.relative_to(drivers)) for p in drivers.rglob("*")) \
        if drivers.exists() else []
    with contextlib.closing(sqlite3.connect(root / "metadata.db")) as db:
        tables = [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        rows = {table: sorted(repr(row) for row in db.execute(f'SELECT * FROM "{table}"'))  # noqa: S608
                for table in tables}
    return {"files": files, "drivers": layers, "rows": rows}


def images(imaged: Imaged) -> Any:
    result = imaged("--json", "images")
    assert result.code == 0, result.err
    return result.json()


def error_line(result: Result) -> str:
    """The one ``imaged: error: …`` line of a failed command (DESIGN §4)."""
    assert result.code == 1, (result.code, result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.startswith("imaged: error: ")]
    assert len(lines) == 1, result.err
    return lines[0]


def set_config(isolated_env: dict[str, str], text: str) -> None:
    path = Path(isolated_env["IMAGED_CONFIG"])
    path.write_text(path.read_text() + text)


def pull_with_policy(root: Path, ref: str, policy: RetryPolicy,
                     timeout: float) -> ImagedError | None:
    """Pull through Service with a RetryPolicy of our own (the CLI's waits are real seconds).

    Runs its own trio loop, so a test can mix it with the in-process CLI. ``timeout`` turns a
    pull that never gives up into a test failure instead of a hang.
    """
    events: list[PullEvent] = []  # progress is not what these tests look at
    config = load_config(Overrides(root=root))
    assert config.root == root.absolute()

    async def main() -> ImagedError | None:
        store = Store(config, "test")
        client = RegistryClient(config, policy=policy)
        try:
            with trio.fail_after(timeout):
                async with trio.open_nursery() as nursery:  # the Service's, for shared work
                    try:
                        await Service(store, client, nursery).pull(ref, None, events.append)
                    except ImagedError as exc:
                        return exc
        finally:
            client.close()
            store.close()
        return None

    return trio.run(main)


FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)


def imaged_with_deadline(root: Path, *args: str, deadline: float) -> Result:
    """The CLI as a child process we can kill: for faults where a bug would hang, not fail.

    A worker thread spinning in the registry client cannot be cancelled, so an in-process CLI
    would hang the suite; a process is killed (by subprocess.run, by its PID) at ``deadline``.
    """
    try:
        proc = subprocess.run([sys.executable, "-m", "imaged", "--root", str(root), *args],
                              capture_output=True, text=True, env=dict(os.environ),
                              timeout=deadline, check=False)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        pytest.fail(f"imaged {' '.join(args)} was still running after {deadline} s and was "
                    f"killed; its stderr so far:\n{err}")
    return Result(proc.returncode, proc.stdout, proc.stderr)


# -- the fake itself -------------------------------------------------------------------------


def test_faulty_registry_survives_garbage(faulty: FaultyRegistry) -> None:
    """A TLS ClientHello and a line of junk do not take the fake down (imaged sends the first)."""
    for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"NOT HTTP AT ALL\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", faulty.port), timeout=5) as sock:
            sock.sendall(junk)
            with contextlib.suppress(OSError):
                sock.recv(4096)
    with socket.create_connection(("127.0.0.1", faulty.port), timeout=5) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert len(faulty.garbage) == 1
    assert [r.path for r in faulty.requests] == ["/v2/"]


# -- 1. dropped connections resume with Range ------------------------------------------------


@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "range-ignored"])
def test_drop_mid_blob_resumes(faulty: FaultyRegistry, imaged: Imaged, root: Path,
                               honour_range: bool) -> None:
    image = big_image()
    faulty.add_image("faults/drop", "v1", image)
    layer = top_layer(image)
    route = faulty.routes[blob_path("faults/drop", layer.digest)]
    route.script = [Drop(DROP_AT)]
    route.honour_range = honour_range

    result = imaged("pull", f"{faulty.host}/faults/drop:v1")

    assert result.code == 0, result.err
    assert result.out.strip().splitlines()[-1] == image.id
    asked = faulty.requests_for(blob_path("faults/drop", layer.digest))
    assert len(asked) == 2, asked
    assert asked[0].range is None
    assert asked[1].range == f"bytes={DROP_AT}-"
    assert asked[1].status == (206 if honour_range else 200)
    assert blob_file(root, layer.digest).read_bytes() == layer.data
    assert not ingest_file(root, layer.digest).exists()
    assert faulty.garbage, "imaged should have tried TLS first (loopback rule)"


# -- 2. 429 / 502 / 503 honour Retry-After ---------------------------------------------------


def test_retry_after_is_honoured(faulty: FaultyRegistry, imaged: Imaged) -> None:
    image = big_image()
    faulty.add_image("faults/busy", "v1", image)
    manifest = manifest_path("faults/busy", "v1")
    config = blob_path("faults/busy", image.config.digest)
    layer = blob_path("faults/busy", top_layer(image).digest)
    faulty.routes[manifest].script = [Fail(429, "1"), Fail(429, "1")]
    faulty.routes[config].script = [Fail(502, "1")]
    faulty.routes[layer].script = [Fail(503, "1")]

    result = imaged("pull", f"{faulty.host}/faults/busy:v1")

    assert result.code == 0, result.err
    for path, failures in ((manifest, 2), (config, 1), (layer, 1)):
        asked = faulty.requests_for(path)
        assert [r.status for r in asked] == [*[asked[0].status] * failures, 200], asked
        assert asked[0].status in (429, 502, 503)
        gaps = [b.time - a.time for a, b in itertools.pairwise(asked)]
        assert all(gap >= 1.0 for gap in gaps), (path, gaps)


# -- 3. a blob that does not match its digest ------------------------------------------------


def test_wrong_digest_blob_leaves_store_as_it_was(faulty: FaultyRegistry, imaged: Imaged,
                                                  root: Path) -> None:
    image = big_image()
    faulty.add_image("faults/corrupt", "v1", image)
    layer = top_layer(image)
    route = faulty.routes[blob_path("faults/corrupt", layer.digest)]
    bad = bytearray(layer.data)
    bad[len(bad) // 2] ^= 0xFF
    route.data = bytes(bad)
    assert images(imaged) == []  # creates the store
    before = snapshot(root)

    line = error_line(imaged("pull", f"{faulty.host}/faults/corrupt:v1"))

    assert layer.digest in line
    assert "failed verification" in line
    assert snapshot(root) == before
    assert images(imaged) == []
    leftover = ingest_file(root, layer.digest)
    assert not leftover.exists() or leftover.stat().st_size == 0, \
        "bytes that failed verification were kept for resume"

    # Once the registry serves the right bytes, the next pull starts that blob from zero.
    route.data = layer.data
    mark = len(faulty.requests_for(blob_path("faults/corrupt", layer.digest)))
    result = imaged("pull", f"{faulty.host}/faults/corrupt:v1")
    assert result.code == 0, result.err
    again = faulty.requests_for(blob_path("faults/corrupt", layer.digest))[mark:]
    assert [r.range for r in again] == [None]
    assert blob_file(root, layer.digest).read_bytes() == layer.data


# -- 4. blobs shorter or longer than their descriptors ---------------------------------------


def test_truncated_blob_gives_up(faulty: FaultyRegistry, root: Path,
                                 isolated_env: dict[str, str]) -> None:
    """The registry's copy is short (with an honest Content-Length): retries end in an error.

    The fake answers a Range past its end with 416, as distribution does; the client must not
    take downloading the same short prefix again for progress and retry for ever.
    """
    image = big_image()
    faulty.add_image("faults/short", "v1", image)
    layer = top_layer(image)
    path = blob_path("faults/short", layer.digest)
    faulty.routes[path].data = layer.data[:-1000]

    try:
        error = pull_with_policy(root, f"{faulty.host}/faults/short:v1", FAST, timeout=5)
    except trio.TooSlowError:
        asked = faulty.requests_for(path)
        pytest.fail(f"still retrying after 5 s: {len(asked)} requests for the short blob, "
                    f"answered {sorted({r.status for r in asked})}")

    assert error is not None, "a blob shorter than its descriptor was accepted"
    assert layer.digest in error.message
    assert "truncated" in error.message or "dropped" in error.message, error.message
    assert len(faulty.requests_for(path)) <= 2 * FAST.attempts
    assert not blob_file(root, layer.digest).exists()


def test_overlong_blob_is_refused(faulty: FaultyRegistry, imaged: Imaged, root: Path) -> None:
    image = big_image()
    faulty.add_image("faults/long", "v1", image)
    layer = top_layer(image)
    faulty.routes[blob_path("faults/long", layer.digest)].data = layer.data + b"\0" * 1000
    assert images(imaged) == []
    before = snapshot(root)

    line = error_line(imaged("pull", f"{faulty.host}/faults/long:v1"))

    assert layer.digest in line
    assert "larger than" in line
    assert snapshot(root) == before


# -- 5. manifests are size-capped ------------------------------------------------------------


@pytest.mark.parametrize("fault", [Endless(chunked=True), Endless(chunked=False),
                                   Oversized(1024**3), None],
                         ids=["endless-chunked", "endless-unframed", "huge-length", "honest-100k"])
def test_manifest_over_the_limit(faulty: FaultyRegistry, imaged: Imaged,
                                 isolated_env: dict[str, str],
                                 fault: Endless | Oversized | None) -> None:
    set_config(isolated_env, '[limits]\nmax_manifest_bytes = "64k"\n')
    path = manifest_path("faults/huge", "v1")
    if fault is None:
        image = make_image([make_layer({"a": b"a"})])  # valid JSON, padded past the limit
        faulty.add(path, image.manifest.data + b" " * 100_000, image.manifest.media_type)
    else:
        faulty.add(path, b"", "application/vnd.oci.image.manifest.v1+json", always=fault)

    started = time.monotonic()
    line = error_line(imaged("pull", f"{faulty.host}/faults/huge:v1"))
    elapsed = time.monotonic() - started

    assert "limit" in line
    assert "65536" in line
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert len(faulty.requests_for(path)) == 1  # a size violation is not worth a retry


# -- 6. manifests are type- and digest-checked -----------------------------------------------

SCHEMA1 = {
    "schemaVersion": 1, "name": "faults/bad", "tag": "v1", "architecture": "amd64",
    "fsLayers": [{"blobSum": sha256(b"")}],
    "history": [{"v1Compatibility": "{}"}],
    "signatures": [],
}


@pytest.mark.parametrize("case", ["type-mismatch", "schema1", "digest-mismatch",
                                  "lying-docker-content-digest"])
def test_bad_manifest(faulty: FaultyRegistry, imaged: Imaged, root: Path, case: str) -> None:
    image = big_image()
    other = big_image(seed=2)
    faulty.add_image("faults/bad", "v1", image)
    ref = f"{faulty.host}/faults/bad:v1"
    if case == "type-mismatch":
        faulty.routes[manifest_path("faults/bad", "v1")].content_type = \
            "application/vnd.docker.distribution.manifest.v2+json"
        expected = ["disagrees", "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.oci.image.manifest.v1+json"]
    elif case == "schema1":
        faulty.add(manifest_path("faults/bad", "v1"), json.dumps(SCHEMA1).encode(),
                   "application/vnd.docker.distribution.manifest.v1+prettyjws")
        expected = ["schema 1", "unsupported"]
    elif case == "digest-mismatch":
        faulty.routes[manifest_path("faults/bad", image.id)].data = other.manifest.data
        ref = f"{faulty.host}/faults/bad@{image.id}"
        expected = [image.id, other.id]
    else:
        faulty.routes[manifest_path("faults/bad", "v1")].headers["Docker-Content-Digest"] = \
            other.id
        expected = ["Docker-Content-Digest", other.id, image.id]

    line = error_line(imaged("pull", ref))

    for word in expected:
        assert word in line, (word, line)
    assert images(imaged) == []
    assert not any((root / "content" / "blobs" / "sha256").iterdir())
    assert not [r for r in faulty.requests if "/blobs/" in r.path], \
        "blobs were fetched for a manifest that should have been refused"


# -- 7. nothing listening --------------------------------------------------------------------


def test_registry_down_fails_fast(imaged: Imaged) -> None:
    port = free_port()
    started = time.monotonic()
    line = error_line(imaged("pull", f"127.0.0.1:{port}/faults/down:v1"))
    elapsed = time.monotonic() - started
    assert f"127.0.0.1:{port}" in line
    assert "connection refused" in line
    assert elapsed < 3, f"took {elapsed:.1f} s: a refused connection is not worth retrying"


def test_connection_closed_without_response_is_retried(faulty: FaultyRegistry,
                                                       root: Path) -> None:
    """A registry that hangs up before answering (restarting, a proxy's idle reset) is retried."""
    image = big_image()
    faulty.add_image("faults/hangup", "v1", image)
    path = manifest_path("faults/hangup", "v1")
    faulty.routes[path].script = [Hangup()]

    result = imaged_with_deadline(root, "pull", f"{faulty.host}/faults/hangup:v1", deadline=10)

    assert result.code == 0, result.err
    assert [r.action for r in faulty.requests_for(path)] == [repr(Hangup()), "Serve()"]


# -- 8. a failed pull does not touch an image sharing its layers -----------------------------


def test_failed_pull_leaves_sharing_image_intact(faulty: FaultyRegistry, imaged: Imaged,
                                                 root: Path) -> None:
    base = make_layer({"etc/os-release": b"ID=shared\n"})
    a = make_image([base, make_layer({"a.txt": b"image a\n"})])
    b = make_image([base, make_layer({"b.bin": noise(3)})])
    faulty.add_image("faults/shared", "a", a)
    faulty.add_image("faults/shared", "b", b)
    b_top = top_layer(b)
    faulty.routes[blob_path("faults/shared", b_top.digest)].data = bytes(b_top.size)

    result = imaged("pull", f"{faulty.host}/faults/shared:a")
    assert result.code == 0, result.err
    listed = images(imaged)
    before = snapshot(root)

    line = error_line(imaged("pull", f"{faulty.host}/faults/shared:b"))

    assert b_top.digest in line and "failed verification" in line
    assert images(imaged) == listed
    assert snapshot(root) == before
    for blob in (a.manifest, a.config, *(layer.blob for layer in a.layers)):
        assert blob_file(root, blob.digest).read_bytes() == blob.data
    assert not blob_file(root, b.config.digest).exists()
    assert not blob_file(root, b.id).exists()
    # The shared base was not fetched again for b: it was already in the store.
    assert len(faulty.requests_for(blob_path("faults/shared", base.blob.digest))) == 1


# -- 9. mirrors ------------------------------------------------------------------------------


@pytest.mark.parametrize("mirror", ["404", "500", "refused", "corrupt-blob", "no-blobs"])
def test_broken_mirror_falls_back_to_registry(registry: LocalRegistry, layout: OCILayout,
                                              faulty: FaultyRegistry, root: Path,
                                              isolated_env: dict[str, str], mirror: str) -> None:
    """A mirror that is missing, failing, unreachable, corrupt or partial: the registry serves.

    ``no-blobs`` is a partial pull-through cache (manifest and config, no layers): the layers
    then fall back together, making the registry's very first requests concurrent ones.
    """
    repo = f"faults/mirror-{mirror}"
    pushed = push_simple(layout, registry, repo)
    image = image_from_layout(layout, pushed.manifest_digest)
    mirror_url = faulty.url
    if mirror == "500":
        faulty.override = Fail(500)
    elif mirror == "refused":
        mirror_url = f"http://127.0.0.1:{free_port()}"
    elif mirror in ("corrupt-blob", "no-blobs"):
        faulty.add_image(repo, "v1", image)
        for layer in image.layers:
            path = blob_path(repo, layer.blob.digest)
            if mirror == "no-blobs":
                del faulty.routes[path]
            else:
                faulty.routes[path].data = bytes(layer.blob.size)
    set_config(isolated_env, f'[registries."{registry.host}"]\nmirrors = ["{mirror_url}"]\n')
    gets_before = len(upstream_gets(registry, repo))

    result = imaged_with_deadline(root, "pull", pushed.ref, deadline=10)

    assert result.code == 0, result.err
    assert result.out.strip().splitlines()[-1] == pushed.manifest_digest
    mirror_host = mirror_url.split("://", 1)[1]
    assert f"mirror {mirror_host} passed over for {pushed.ref}: " in result.err
    assert f"; trying registry {registry.host}" in result.err
    if mirror != "refused":
        assert faulty.requests_for(manifest_path(repo, "v1")), "the mirror was not tried first"
    fetched = upstream_gets(registry, repo)[gets_before:]
    assert any("/blobs/" in line for line in fetched), fetched
    for blob in (image.manifest, image.config, *(layer.blob for layer in image.layers)):
        assert blob_file(root, blob.digest).read_bytes() == blob.data


def test_mirror_serving_the_image_spares_the_registry(registry: LocalRegistry,
                                                      layout: OCILayout, faulty: FaultyRegistry,
                                                      imaged: Imaged, root: Path,
                                                      isolated_env: dict[str, str]) -> None:
    repo = "faults/mirror-serves"
    pushed = push_simple(layout, registry, repo)
    image = image_from_layout(layout, pushed.manifest_digest)
    faulty.add_image(repo, "v1", image)
    set_config(isolated_env, f'[registries."{registry.host}"]\nmirrors = ["{faulty.url}"]\n')
    gets_before = len(upstream_gets(registry, repo))

    result = imaged("pull", pushed.ref)

    assert result.code == 0, result.err
    assert result.out.strip().splitlines()[-1] == pushed.manifest_digest
    assert upstream_gets(registry, repo)[gets_before:] == []
    for layer in image.layers:
        assert len(faulty.requests_for(blob_path(repo, layer.blob.digest))) == 1
        assert blob_file(root, layer.blob.digest).read_bytes() == layer.blob.data
    assert not faulty.garbage  # an http:// mirror is spoken to in plain HTTP from the start


# -- 10. a partial download survives a failed pull -------------------------------------------


def test_interrupted_pull_is_resumed_by_the_next(faulty: FaultyRegistry, imaged: Imaged,
                                                 root: Path) -> None:
    image = big_image()
    faulty.add_image("faults/resume", "v1", image)
    layer = top_layer(image)
    path = blob_path("faults/resume", layer.digest)
    # One drop that makes progress, then more drops without progress than the policy allows.
    faulty.routes[path].script = [Drop(DROP_AT), *[Drop(0)] * 5]
    ref = f"{faulty.host}/faults/resume:v1"

    error = pull_with_policy(root, ref, RetryPolicy(attempts=2, base=0.01, cap=0.05), timeout=20)

    assert error is not None
    assert "dropped" in error.message and "gave up" in error.message, error.message
    assert ingest_file(root, layer.digest).stat().st_size == DROP_AT
    assert not blob_file(root, layer.digest).exists()
    assert images(imaged) == []

    faulty.routes[path].script.clear()
    mark = len(faulty.requests_for(path))
    result = imaged("pull", ref)

    assert result.code == 0, result.err
    resumed = faulty.requests_for(path)[mark:]
    assert [r.range for r in resumed] == [f"bytes={DROP_AT}-"]
    assert resumed[0].status == 206
    assert blob_file(root, layer.digest).read_bytes() == layer.data
    assert not ingest_file(root, layer.digest).exists()
