"""The peer endpoint's pure parts: what a request path asks for, Range, and which recorded name
answers a tag (imaged/server/registry.py). Tables of cases, no sockets."""

from __future__ import annotations

import pytest

from imaged.config import Address, parse_address
from imaged.digest import Digest
from imaged.errors import InvalidError
from imaged.server.registry import (
    Base,
    Blob,
    Manifest,
    Refusal,
    Unsatisfiable,
    parse_range,
    parse_target,
    pick_name,
)

pytestmark = pytest.mark.unit

HEX = "a" * 64
DIGEST = Digest("sha256", HEX)
OTHER = Digest("sha256", "b" * 64)


@pytest.mark.parametrize(("method", "path", "target"), [
    ("GET", "/v2/", Base()),
    ("HEAD", "/v2", Base()),
    ("GET", f"/v2/library/debian/blobs/sha256:{HEX}", Blob("library/debian", DIGEST)),
    ("HEAD", f"/v2/a/blobs/sha256:{HEX}", Blob("a", DIGEST)),
    ("GET", "/v2/library/debian/manifests/12", Manifest("library/debian", "12", None)),
    ("GET", f"/v2/x/y/z/manifests/sha256:{HEX}", Manifest("x/y/z", None, DIGEST)),
    ("GET", "/v2/a-b.c__d/manifests/v1.2_rc-3", Manifest("a-b.c__d", "v1.2_rc-3", None)),
])
def test_targets(method: str, path: str, target: object) -> None:
    assert parse_target(method, path) == target


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
                                    "CONNECT", "get"])
def test_every_other_method_is_405(method: str) -> None:
    with pytest.raises(Refusal) as info:
        parse_target(method, f"/v2/a/blobs/sha256:{HEX}")
    assert info.value.status == 405


@pytest.mark.parametrize("path", [
    "/", "/v1/images", "/v2/_catalog", "/v2/a/tags/list", "/v2/a/blobs/uploads/",
    "/v2/a/blobs/sha256:" + "A" * 64, "/v2/a/blobs/sha256:" + HEX[:-1],
    "/v2/a/blobs/md5:" + "a" * 32, "/v2/a/blobs/../../../etc/passwd",
    f"/v2/../blobs/sha256:{HEX}", f"/v2/a/../b/blobs/sha256:{HEX}",
    f"/v2/%2e%2e/blobs/sha256:{HEX}", f"/v2/a/blobs/sha256%3a{HEX}",
    f"/v2/a/blobs/sha256:{HEX}/", f"/v2//blobs/sha256:{HEX}", f"/v2/A/blobs/sha256:{HEX}",
    f"/v2/a/blobs/sha256:{HEX}%00", "/v2/a/manifests/.hidden", "/v2/a/manifests/" + "t" * 129,
    "/v2/a/manifests/", f"/v2/{'a/' * 200}manifests/v1", "/v2/a/manifests/a:b",
])
def test_anything_else_is_404(path: str) -> None:
    with pytest.raises(Refusal) as info:
        parse_target("GET", path)
    assert info.value.status == 404


@pytest.mark.parametrize(("header", "size", "span"), [
    (None, 100, None),
    ("bytes=0-", 100, (0, 99)),
    ("bytes=10-19", 100, (10, 19)),
    ("bytes=90-1000", 100, (90, 99)),
    ("bytes=-10", 100, (90, 99)),
    ("bytes=-1000", 100, (0, 99)),
    ("bytes=99-99", 100, (99, 99)),
    ("BYTES = 5-6", 100, (5, 6)),
    ("bytes=5-4", 100, None),  # malformed: ignored, the whole blob
    ("bytes=0-1,5-6", 100, None),  # several ranges: ignored
    ("items=0-1", 100, None),
    ("bytes=a-b", 100, None),
    ("bytes=-", 100, None),
    ("bytes=²-", 100, None),
    ("bytes=1", 100, None),
])
def test_range(header: str | None, size: int, span: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == span


@pytest.mark.parametrize(("header", "size"), [
    ("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0),
    ("bytes=-5", 0),
])
def test_unsatisfiable_range(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


NAMES = {
    "r.example/library/debian:12": DIGEST,
    "other.example/library/debian:12": OTHER,
    "r.example/app:v1": DIGEST,
    "r.example/team/app:v1": OTHER,  # ends in "/app:v1" but is another repository
}


@pytest.mark.parametrize(("repo", "tag", "namespace", "found"), [
    ("library/debian", "12", "r.example", DIGEST),
    ("library/debian", "12", "other.example", OTHER),
    ("library/debian", "12", "", None),  # two registries have it: no guessing
    ("library/debian", "12", "third.example", None),
    ("app", "v1", "", DIGEST),
    ("app", "v1", "r.example", DIGEST),
    ("team/app", "v1", "", OTHER),
    ("app", "v2", "", None),
])
def test_pick_name(repo: str, tag: str, namespace: str, found: Digest | None) -> None:
    suffix = f"/{repo}:{tag}"
    names = {name: d for name, d in NAMES.items() if name.endswith(suffix)}
    assert pick_name(names, repo, tag, namespace) == found


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1:5050", Address("127.0.0.1", 5050)),
    ("node-1.cluster.local:1", Address("node-1.cluster.local", 1)),
    ("[fd00::5]:65535", Address("fd00::5", 65535)),
    ("0.0.0.0:5000", Address("0.0.0.0", 5000)),  # noqa: S104 - parsed, never bound here
])
def test_parse_address(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert parse_address(str(address)) == address


@pytest.mark.parametrize("text", [
    ":5000", "5000", "host", "host:", "host:0", "host:65536", "host:-1", "host:5e3", "fd00::5:80",
    "[fd00::5]", "http://host:5000", "host/path:5000", " host:5000", "host:\uff15000",
])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(InvalidError, match="is not HOST:PORT"):
        parse_address(text)
