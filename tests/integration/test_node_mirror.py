"""A node as a mirror for its peers: ``imaged serve --registry-addr`` (imaged/server/registry.py).

Node A pulls from a real registry and serves its root; node B lists A as its mirror. B's pull
must not reach the registry at all, the endpoint must speak enough of the distribution API for
that (HEAD, Range, digests, 404s) and nothing more (405, no catalog), and no request may get a
byte that is not a recorded blob out of it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from imaged.testing.fleet import Node
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry, free_port
from tests.conftest import Pushed, push_simple

BIG = 6 * 1024 * 1024  # past the client's inline size: the endpoint's reads and its pipeline


@dataclass
class Served:
    node: Node
    url: str
    port: int
    pushed: Pushed
    repo: str
    big: str  # digest of the large layer


def blob_of(layout: OCILayout, digest: str) -> bytes:
    return (layout.path / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def layers_of(layout: OCILayout, manifest_digest: str) -> list[dict[str, str]]:
    doc = json.loads(blob_of(layout, manifest_digest))
    return [doc["config"], *doc["layers"]]


@pytest.fixture
def served(registry: LocalRegistry, layout: OCILayout, tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[Served]:
    """Node A: an image pulled from the registry, served to peers on a port of its own."""
    repo = f"peer/{request.node.name.replace('_', '-')[:60]}"
    data = hashlib.shake_256(repo.encode()).digest(BIG)
    pushed = push_simple(layout, registry, repo, compression=None,
                         files={"big.bin": data, "hello.txt": b"hi\n"})
    big = max(layers_of(layout, pushed.manifest_digest), key=lambda d: int(d["size"]))
    node = Node(tmp_path / "a", registry.host).configure()
    pulled = node.run("pull", pushed.ref)
    assert pulled.returncode == 0, pulled.stderr
    port = free_port()
    with node.serving(port) as url:
        yield Served(node, url, port, pushed, repo, big["digest"])


def request(served: Served, method: str, path: str,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_peer_pulls_from_node_without_the_registry(served: Served, registry: LocalRegistry,
                                                   tmp_path: Path) -> None:
    peer = Node(tmp_path / "b", registry.host).configure([served.url])
    before = len(registry.accesses(served.repo))

    result = peer.run("pull", served.pushed.ref)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == served.pushed.manifest_digest
    assert registry.accesses(served.repo)[before:] == []  # not a manifest, not a blob
    assert "passed over" not in result.stderr
    checked = peer.run("--json", "check", "--verify-data")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["findings"] == []


def test_peer_falls_back_for_what_the_node_lacks(served: Served, registry: LocalRegistry,
                                                 layout: OCILayout, tmp_path: Path) -> None:
    other = push_simple(layout, registry, served.repo, tag="v2",
                        files={"other.txt": b"only upstream has this\n"})
    peer = Node(tmp_path / "b", registry.host).configure([served.url])
    before = len(registry.accesses(served.repo))

    result = peer.run("pull", other.ref)

    assert result.returncode == 0, result.stderr
    assert (f"mirror 127.0.0.1:{served.port} passed over for {other.ref}: manifest "
            in result.stderr)
    assert f"; trying registry {registry.host}" in result.stderr
    fetched = [a.path for a in registry.accesses(served.repo)[before:] if a.method == "GET"]
    assert f"/v2/{served.repo}/manifests/v2" in fetched
    # The base layer both images share came from the node, not from upstream.
    shared = layers_of(layout, served.pushed.manifest_digest)[1]["digest"]
    assert f"/v2/{served.repo}/blobs/{shared}" not in fetched


def test_manifests_by_tag_and_digest(served: Served, registry: LocalRegistry) -> None:
    digest = served.pushed.manifest_digest
    manifest = blob_of(served.pushed.layout, digest)
    tag_path = f"/v2/{served.repo}/manifests/v1"
    for path in (tag_path, f"{tag_path}?ns={registry.host}",
                 f"/v2/{served.repo}/manifests/{digest}"):
        status, headers, body = request(served, "GET", path)
        assert (status, body) == (200, manifest), path
        assert headers["docker-content-digest"] == digest
        assert headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
        assert headers["content-length"] == str(len(manifest))
    status, headers, body = request(served, "HEAD", tag_path)
    assert (status, body, headers["content-length"]) == (200, b"", str(len(manifest)))
    assert request(served, "GET", "/v2/")[0] == 200
    assert request(served, "HEAD", "/v2/")[0] == 200
    # Another registry's name for the same repository, a tag never pulled, a layer asked for
    # as a manifest: nothing recorded answers them.
    for path in (f"{tag_path}?ns=elsewhere.example", f"/v2/{served.repo}/manifests/v9",
                 f"/v2/{served.repo}/manifests/{served.big}"):
        status, headers, body = request(served, "GET", path)
        assert status == 404, path
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_blobs_heads_and_ranges(served: Served) -> None:
    data = blob_of(served.pushed.layout, served.big)
    path = f"/v2/{served.repo}/blobs/{served.big}"
    status, headers, body = request(served, "GET", path)
    assert status == 200 and hashlib.sha256(body).hexdigest() == served.big.split(":")[1]
    assert headers["docker-content-digest"] == served.big
    assert headers["content-length"] == str(len(data))
    status, headers, body = request(served, "HEAD", path)
    assert (status, body, headers["content-length"]) == (200, b"", str(len(data)))
    for spec, first, last in (("bytes=10-19", 10, 19), (f"bytes={len(data) - 5}-", len(data) - 5,
                              len(data) - 1), ("bytes=-7", len(data) - 7, len(data) - 1)):
        status, headers, body = request(served, "GET", path, {"Range": spec})
        assert (status, body) == (206, data[first:last + 1]), spec
        assert headers["content-range"] == f"bytes {first}-{last}/{len(data)}"
    status, headers, _ = request(served, "GET", path, {"Range": f"bytes={len(data)}-"})
    assert status == 416
    # Unknown digests, and every path that is not a manifest or a blob, are 404.
    for missing in (f"/v2/{served.repo}/blobs/sha256:{'0' * 64}", "/v2/_catalog",
                    f"/v2/{served.repo}/tags/list", "/v1/images", "/"):
        assert request(served, "GET", missing)[0] == 404, missing


def test_every_other_method_is_405(served: Served) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        for path in (f"/v2/{served.repo}/blobs/uploads/", f"/v2/{served.repo}/blobs/{served.big}",
                     f"/v2/{served.repo}/manifests/v1", "/v2/"):
            status, headers, _ = request(served, method, path)
            assert status == 405, (method, path)
            assert headers["allow"] == "GET, HEAD"
    # Nothing was deleted or replaced.
    assert request(served, "HEAD", f"/v2/{served.repo}/manifests/v1")[0] == 200


def test_concurrent_clients(served: Served) -> None:
    data = blob_of(served.pushed.layout, served.big)
    path = f"/v2/{served.repo}/blobs/{served.big}"

    def fetch(i: int) -> bytes:
        status, _, body = request(served, "GET", path, {"Range": f"bytes={i * 1000}-"})
        assert status == 206
        return body

    with ThreadPoolExecutor(12) as pool:
        bodies = list(pool.map(fetch, range(12)))
    assert all(body == data[i * 1000:] for i, body in enumerate(bodies))


def raw(served: Served, payload: bytes) -> bytes:
    """What the endpoint answers to bytes no HTTP library would send."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:  # closed with our bytes unread: what came first stands
            pass
    return out


def test_hostile_requests_get_nothing_outside_the_store(served: Served) -> None:
    secret = b"not for peers\n"
    outside = served.node.workdir / "secret"
    outside.write_bytes(secret)
    hexed = hashlib.sha256(secret).hexdigest()
    # Planted where a blob of that digest would be, but never recorded: still 404.
    planted = served.node.root / "content" / "blobs" / "sha256" / hexed
    planted.symlink_to(outside)
    for target in (f"/v2/{served.repo}/blobs/sha256:{hexed}",
                   f"/v2/{served.repo}/manifests/sha256:{hexed}",
                   "/v2/../../secret", f"/v2/{served.repo}/blobs/..%2f..%2f..%2fsecret",
                   f"/v2/{served.repo}/blobs/sha256:{hexed}/../../../../secret",
                   "//etc/passwd", "/v2/%00/blobs/x", f"http://x/v2/{served.repo}/manifests/v1"):
        answer = raw(served, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 404 ") or answer.startswith(b"HTTP/1.1 400 "), \
            (target, answer[:200])
        assert secret not in answer
    # A recorded blob whose file was swapped for a symlink is not followed out of the store.
    path = served.node.root / "content" / "blobs" / "sha256" / served.big.split(":")[1]
    path.unlink()
    path.symlink_to(outside)
    status, _, body = request(served, "GET", f"/v2/{served.repo}/blobs/{served.big}")
    assert status == 404 and secret not in body
    # Garbage and oversized heads end in an error, not in a crashed endpoint.
    assert raw(served, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    oversized = raw(served, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
    assert oversized.startswith(b"HTTP/1.1 431 ") or not oversized
    assert request(served, "GET", "/v2/")[0] == 200


def test_registry_addr_errors(served: Served, tmp_path: Path) -> None:
    node = Node(tmp_path / "c", "unused.example").configure()
    bad = node.run("serve", "--registry-addr", "5000", timeout=60)
    assert bad.returncode == 2 and "'5000' is not HOST:PORT" in bad.stderr
    env = {**node.env(), "IMAGED_SOCKET": str(tmp_path / "c" / "s.sock")}
    taken = subprocess.run(node.command("serve", "--registry-addr", f"127.0.0.1:{served.port}"),
                           capture_output=True, text=True, env=env, timeout=60, check=False)
    assert taken.returncode == 1
    assert f"imaged: error: cannot listen on 127.0.0.1:{served.port} for peers" in taken.stderr
    assert not os.path.exists(tmp_path / "c" / "s.sock")
    node.configure(extra='[serve]\nregistry_addr = "nowhere"\n')
    wrong = node.run("serve", timeout=60)
    assert wrong.returncode == 1 and "serve.registry_addr: 'nowhere' is not HOST:PORT" in \
        wrong.stderr
