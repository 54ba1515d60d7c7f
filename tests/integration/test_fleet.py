"""A fleet behind a pull-through cache: the recipe of docs/fleet.md, tested end to end.

An upstream registry (the session's ``registry``) and a pull-through cache in front of it (the
same ``docker-registry`` with ``proxy.remoteurl``), both on 127.0.0.1; several nodes, each its
own root and its own process, list the cache in ``registries."HOST".mirrors``. Upstream's
access log says what really reached it, and through whom (the cache's requests carry Go's
User-Agent, imaged's its own).

distribution 2.8's proxy fetches a blob twice on its first miss (a HEAD for the size, then a
GET it streams to the client while a second GET fills its storage, depending on timing), so a
cold cache costs up to twice the image upstream; the counts below allow for it and no more.

A cache that is down, answers 5xx, redirects elsewhere, or serves wrong or truncated bytes is
the tests' own server (tests/integration/faulty.py): each is passed over, with one log line
naming it and why, and ``imaged check --verify-data`` finds nothing unverified in the store.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imaged.ops.pull import SMALL_BLOB_BYTES
from imaged.registry_client.client import MIRROR_ATTEMPTS
from imaged.testing.fleet import Node, finish
from imaged.testing.images import OCILayout
from imaged.testing.registry import Access, LocalRegistry, free_port, start_registry
from tests.conftest import Pushed, push_simple
from tests.integration.faulty import (
    Drop,
    Fail,
    FaultyRegistry,
    Image,
    Redirect,
    blob_path,
    image_from_layout,
    manifest_path,
)

IMAGED_AGENT = "imaged/"
STREAMED_LAYER = SMALL_BLOB_BYTES + 1024 * 1024


@dataclass
class Fleet:
    upstream: LocalRegistry
    cache: LocalRegistry
    pushed: Pushed
    image: Image
    repo: str
    workdir: Path

    def node(self, name: str, *mirrors: str) -> Node:
        return Node(self.workdir / name, self.upstream.host).configure(mirrors)

    def upstream_since(self, before: int) -> list[Access]:
        return self.upstream.accesses(self.repo)[before:]

    @property
    def blobs(self) -> list[str]:
        return [self.image.config.digest, *(layer.blob.digest for layer in self.image.layers)]


@pytest.fixture
def fleet(registry: LocalRegistry, layout: OCILayout, tmp_path: Path,
          request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """A fresh (cold) cache in front of the session's registry, and an image of this test's."""
    repo = "fleet/" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:60].strip("-")
    pushed = push_simple(layout, registry, repo)
    cache = start_registry(tmp_path / "cache", proxy=registry.url)
    try:
        yield Fleet(registry, cache, pushed, image_from_layout(layout, pushed.manifest_digest),
                    repo, tmp_path)
    finally:
        cache.stop()


def pull_ok(node: Node, ref: str) -> str:
    result = node.run("pull", ref)
    assert result.returncode == 0, result.stderr
    return result.stderr


def pull_all_at_once(nodes: list[Node], ref: str, timeout: float) -> None:
    """Every node pulls ``ref`` in its own process, all started before any is waited for."""
    procs = [node.start("pull", ref) for node in nodes]
    try:
        results = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            finish(proc)
    assert [proc.returncode for proc in procs] == [0] * len(nodes), results


def assert_verified(node: Node, image: Image) -> None:
    """Every blob in the store hashes to its name, and the image's are exactly its bytes."""
    checked = node.run("--json", "check", "--verify-data")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["findings"] == []
    blobs = node.root / "content" / "blobs" / "sha256"
    for blob in (image.manifest, image.config, *(layer.blob for layer in image.layers)):
        assert (blobs / blob.hex).read_bytes() == blob.data


def blob_gets(accesses: list[Access]) -> collections.Counter[str]:
    return collections.Counter(a.path.rsplit("/", 1)[1] for a in accesses
                               if a.method == "GET" and "/blobs/" in a.path)


def test_nodes_reach_upstream_only_through_the_cache(fleet: Fleet) -> None:
    before = len(fleet.upstream.accesses(fleet.repo))
    first = fleet.node("n1", fleet.cache.url)

    log = pull_ok(first, fleet.pushed.ref)

    assert "passed over" not in log
    seen = fleet.upstream_since(before)
    assert seen and not [a for a in seen if a.agent.startswith(IMAGED_AGENT)], seen
    fetched = blob_gets(seen)
    # Every blob came up through the cache, each at most twice (the proxy's double fetch).
    assert set(fetched) == set(fleet.blobs), fetched
    assert max(fetched.values()) <= 2, fetched
    assert_verified(first, fleet.image)


def test_a_warm_cache_adds_no_upstream_traffic(fleet: Fleet) -> None:
    pull_ok(fleet.node("n1", fleet.cache.url), fleet.pushed.ref)
    before = len(fleet.upstream.accesses(fleet.repo))
    nodes = [fleet.node(f"n{i}", fleet.cache.url) for i in range(2, 6)]

    pull_all_at_once(nodes, fleet.pushed.ref, timeout=120)
    seen = fleet.upstream_since(before)
    # The cache checks the tag's freshness with a HEAD (no body); it fetches nothing.
    assert [a for a in seen if a.method != "HEAD"] == [], seen
    assert {a.path for a in seen} <= {f"/v2/{fleet.repo}/manifests/v1"}, seen
    for node in nodes:
        assert_verified(node, fleet.image)


def test_nodes_pulling_at_once_on_a_cold_cache(fleet: Fleet) -> None:
    """Every node's pull succeeds and is verified, however the cache splits their misses."""
    before = len(fleet.upstream.accesses(fleet.repo))
    nodes = [fleet.node(f"n{i}", fleet.cache.url) for i in range(4)]
    pull_all_at_once(nodes, fleet.pushed.ref, timeout=180)
    seen = fleet.upstream_since(before)
    assert not [a for a in seen if a.agent.startswith(IMAGED_AGENT)], seen
    for node in nodes:
        assert_verified(node, fleet.image)


def test_a_cache_that_is_down_is_passed_over(fleet: Fleet) -> None:
    down = f"127.0.0.1:{free_port()}"
    node = fleet.node("n1", f"http://{down}")

    log = pull_ok(node, fleet.pushed.ref)

    assert (f"mirror {down} passed over for {fleet.pushed.ref}: cannot reach registry {down}: "
            "connection refused; trying registry " + fleet.upstream.host) in log
    assert_verified(node, fleet.image)


def test_mirrors_are_tried_in_order(fleet: Fleet) -> None:
    """A dead first mirror, the cache second: the pull goes through the cache, not upstream."""
    down = f"127.0.0.1:{free_port()}"
    before = len(fleet.upstream.accesses(fleet.repo))
    node = fleet.node("n1", f"http://{down}", fleet.cache.url)

    log = pull_ok(node, fleet.pushed.ref)

    assert f"mirror {down} passed over" in log
    assert f"; trying mirror {fleet.cache.host}" in log
    assert f"; trying registry {fleet.upstream.host}" not in log
    assert not [a for a in fleet.upstream_since(before) if a.agent.startswith(IMAGED_AGENT)]
    assert_verified(node, fleet.image)


@pytest.mark.parametrize("status", [500, 503])
def test_a_cache_answering_5xx_is_passed_over(fleet: Fleet, faulty: FaultyRegistry,
                                              status: int) -> None:
    faulty.override = Fail(status, retry_after="1" if status == 503 else None)
    node = fleet.node("n1", faulty.url)

    log = pull_ok(node, fleet.pushed.ref)

    assert (f"mirror {faulty.host} passed over for {fleet.pushed.ref}: registry {faulty.host} "
            f"answered {status} for manifest") in log
    # 500 is final; 503 may pass, so it gets one retry, and no more, before the registry.
    tries = len(faulty.requests_for(manifest_path(fleet.repo, "v1")))
    assert tries == (MIRROR_ATTEMPTS if status == 503 else 1)
    assert_verified(node, fleet.image)


@pytest.mark.parametrize("size", ["small", "streamed"])
@pytest.mark.parametrize("fault", ["wrong-digest", "truncated", "dropped", "wrong-then-5xx"])
def test_bad_bytes_from_a_cache_are_never_stored(fleet: Fleet, faulty: FaultyRegistry,
                                                 layout: OCILayout, fault: str,
                                                 size: str) -> None:
    """The mirror serves the manifest and config right and one layer wrong: that layer is
    fetched from upstream, and the wrong bytes never leave ingest (a small layer is read into
    memory, a large one streamed through an ingest file: both paths)."""
    if size == "streamed":
        big = hashlib.shake_256(fleet.repo.encode()).digest(STREAMED_LAYER)
        fleet.pushed = push_simple(layout, fleet.upstream, fleet.repo, tag="v1",
                                   compression=None, files={"big.bin": big})
        fleet.image = image_from_layout(layout, fleet.pushed.manifest_digest)
    faulty.add_image(fleet.repo, "v1", fleet.image)
    layer = fleet.image.layers[-1].blob
    route = faulty.routes[blob_path(fleet.repo, layer.digest)]
    if fault == "wrong-digest":
        route.data = bytes(len(layer.data))
    elif fault == "truncated":
        route.data = layer.data[:len(layer.data) // 2]
    elif fault == "dropped":
        route.always = Drop(0)  # no progress to resume from, attempt after attempt
    else:
        # Half a body of wrong bytes, then errors: resuming that half from upstream would
        # make a blob that fails its digest, so what the mirror wrote must be dropped.
        route.data = bytes(len(layer.data))
        route.script = [Drop(len(layer.data) // 2)]
        route.always = Fail(500)
    before = len(fleet.upstream.accesses(fleet.repo))
    node = fleet.node("n1", faulty.url)

    log = pull_ok(node, fleet.pushed.ref)

    # A small layer is read into memory and checked there, a large one streamed to ingest:
    # each says so in its own words.
    reasons = {"wrong-digest": ("failed verification", "does not match its digest"),
               "truncated": ("is truncated", "does not match its digest or size"),
               "dropped": ("dropped",), "wrong-then-5xx": ("answered 500",)}[fault]
    passed = [line for line in log.splitlines() if "passed over" in line]
    assert len(passed) == 1 and f"mirror {faulty.host} passed over" in passed[0], log
    assert any(reason in passed[0] for reason in reasons) and layer.digest in passed[0], log
    fetched = blob_gets(fleet.upstream_since(before))
    assert fetched == {layer.digest: 1}, fetched  # the layer alone, and once
    assert_verified(node, fleet.image)


def test_a_cache_redirecting_elsewhere_is_passed_over(fleet: Fleet, faulty: FaultyRegistry,
                                                      tmp_path: Path) -> None:
    """A redirect within the mirror is followed; one to another host is not."""
    faulty.add_image(fleet.repo, "v1", fleet.image)
    config = faulty.routes.pop(blob_path(fleet.repo, fleet.image.config.digest))
    faulty.routes["/moved/config"] = config
    faulty.add(blob_path(fleet.repo, fleet.image.config.digest), b"",
               always=Redirect("/moved/config"))
    layer = fleet.image.layers[-1].blob
    elsewhere = start_registry(tmp_path / "elsewhere")
    try:
        faulty.routes[blob_path(fleet.repo, layer.digest)].always = Redirect(
            f"{elsewhere.url}{blob_path(fleet.repo, layer.digest)}")
        node = fleet.node("n1", faulty.url)

        log = pull_ok(node, fleet.pushed.ref)

        assert f"mirror {faulty.host} redirected {blob_path(fleet.repo, layer.digest)} to " \
            f"another host ({elsewhere.host})" in log
        assert elsewhere.accesses() == []
    finally:
        elsewhere.stop()
    assert len(faulty.requests_for("/moved/config")) == 1
    assert not [line for line in log.splitlines()
                if "passed over" in line and fleet.image.config.digest in line], log
    assert_verified(node, fleet.image)


def test_a_mirror_url_without_a_scheme_is_refused(fleet: Fleet) -> None:
    node = fleet.node("n1", fleet.cache.host)  # "127.0.0.1:PORT", no http://

    result = node.run("pull", fleet.pushed.ref)

    assert result.returncode == 1
    assert (f"imaged: error: {node.config}: registries.\"{fleet.upstream.host}\".mirrors: "
            f"'{fleet.cache.host}' is not an http(s) URL: give its scheme, e.g. "
            f"'https://{fleet.cache.host}'") in result.stderr
    assert fleet.cache.accesses() == []
    assert not (node.root / "metadata.db").exists()
