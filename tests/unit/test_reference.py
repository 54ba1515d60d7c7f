"""Reference parsing and normalization (Docker's distribution/reference rules), loopback hosts."""

from __future__ import annotations

import pytest

from imaged.digest import Digest
from imaged.errors import InvalidError
from imaged.registry_client.reference import (
    Reference,
    is_loopback_host,
    parse_reference,
)

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("library/alpine", "docker.io", "library/alpine", "latest", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("docker.io/library/alpine:edge", "docker.io", "library/alpine", "edge", None),
        ("index.docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/org/app:v1", "docker.io", "org/app", "v1", None),
        ("registry-1.docker.io/org/app", "docker.io", "org/app", "latest", None),
        ("org/app", "docker.io", "org/app", "latest", None),
        ("org/team/app", "docker.io", "org/team/app", "latest", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/x", "localhost:5000", "x", "latest", None),
        ("localhost:5000/x:tag", "localhost:5000", "x", "tag", None),
        ("quay.io/org/app", "quay.io", "org/app", "latest", None),
        ("Registry.Example.com/app", "Registry.Example.com", "app", "latest", None),
        ("host:5000/a/b:tag@" + DIGEST, "host:5000", "a/b", "tag", DIGEST),
        ("host:5000/a/b@" + DIGEST, "host:5000", "a/b", None, DIGEST),
        ("alpine@" + DIGEST, "docker.io", "library/alpine", None, DIGEST),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
        ("[::1]/x:v2", "[::1]", "x", "v2", None),
        ("[2001:db8::1]:443/org/x", "[2001:db8::1]:443", "org/x", "latest", None),
        ("127.0.0.1:5000/org/app", "127.0.0.1:5000", "org/app", "latest", None),
        ("a.b-c/d.e__f-g--h/i_j:T_a.g-1", "a.b-c", "d.e__f-g--h/i_j", "T_a.g-1", None),
        ("app:" + "t" * 128, "docker.io", "library/app", "t" * 128, None),
        ("app:_underscore_first", "docker.io", "library/app", "_underscore_first", None),
        # Docker's rule: a first component without '.' or ':' and not 'localhost' is a path.
        ("localhostx/app", "docker.io", "localhostx/app", "latest", None),
        # The name of a host-only reference is the repository, the port a tag.
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),
    ],
)
def test_parse_reference_normalizes(text: str, domain: str, path: str, tag: str | None,
                                    digest: str | None) -> None:
    ref = parse_reference(text)
    expected_digest = Digest.parse(digest) if digest else None
    assert ref == Reference(domain, path, tag, expected_digest)


@pytest.mark.parametrize(
    ("text", "shown", "obj"),
    [
        ("alpine", "docker.io/library/alpine:latest", "latest"),
        ("localhost:5000/x:v1", "localhost:5000/x:v1", "v1"),
        ("host:5000/a/b:tag@" + DIGEST, "host:5000/a/b:tag@" + DIGEST, DIGEST),
        ("a@" + DIGEST, "docker.io/library/a@" + DIGEST, DIGEST),
    ],
)
def test_reference_str_and_object(text: str, shown: str, obj: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == shown
    assert ref.object == obj
    # A normalized reference is a fixed point of parsing.
    assert parse_reference(str(ref)) == ref


def test_reference_name_and_with_digest() -> None:
    ref = parse_reference("quay.io/org/app:v1")
    assert ref.name == "quay.io/org/app"
    pinned = ref.with_digest(Digest.parse(DIGEST))
    assert pinned == Reference("quay.io", "org/app", None, Digest.parse(DIGEST))
    assert str(pinned) == f"quay.io/org/app@{DIGEST}"
    assert Reference("quay.io", "org/app").object == "latest"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ["empty"]),
        (" alpine", ["whitespace"]),
        ("alpine ", ["whitespace"]),
        ("alp ine", ["whitespace"]),
        ("alpine\n", ["whitespace"]),
        ("alpine\t:latest", ["whitespace"]),
        ("alp\x00ine", ["control"]),
        ("alp\x7fine", ["control"]),
        (HEX, ["64-digit hex", "image ID"]),
        ("Alpine", ["lowercase"]),
        ("docker.io/Library/alpine", ["lowercase"]),
        ("localhost:5000/MyApp:v1", ["lowercase"]),
        ("org/App", ["lowercase"]),
        ("alpine:", ["tag ''"]),
        ("alpine:-x", ["tag '-x'"]),
        ("alpine:.x", ["tag '.x'"]),
        ("alpine:a/b", ["bad registry host 'alpine:a'"]),
        ("alpine:" + "t" * 129, ["tag"]),
        ("alpine:t@g", ["invalid digest"]),
        ("alpine:a+b", ["tag 'a+b'"]),
        # Docker's \w is ASCII-only; Python's is not unless told so.
        ("alpine:caf\u00e9", ["tag"]),
        ("alpine:\u0663", ["tag"]),
        ("alpine@", ["invalid digest"]),
        ("alpine@sha256:abc", ["invalid digest", "64 hex"]),
        ("alpine@sha256:" + HEX.upper(), ["invalid digest"]),
        ("alpine@md5:" + "0" * 32, ["unsupported digest algorithm 'md5'"]),
        ("alpine@sha512:" + HEX, ["sha512 needs 128"]),
        ("alpine@" + HEX, ["invalid digest"]),
        ("localhost:5000/", ["repository name is empty"]),
        (":tag", ["repository name is empty"]),
        ("docker.io/", ["repository name is empty"]),
        ("a//b", ["may contain only"]),
        ("a/b/", ["may contain only"]),
        ("a___b", ["may contain only"]),
        ("-a", ["may contain only"]),
        ("a-", ["may contain only"]),
        ("a..b", ["may contain only"]),
        ("host:port/x", ["bad registry host 'host:port'"]),
        ("-host.com/x", ["bad registry host"]),
        ("host_name.com/x", ["bad registry host"]),
        ("[::1/x", ["bad registry host"]),
        ("[zz::1]:5000/x", ["bad registry host"]),
        ("127.0.0.1:99999/x/y:1", ["port 99999 is not in 1-65535"]),
        ("host:0/x", ["port 0 is not in 1-65535"]),
        ("[::1]:65536/x", ["port 65536"]),
        ("docker.io/library/" + "a" * 238, ["longer than 255"]),
        ("a" * 238, ["longer than 255"]),
        ("quay.io/" + "a" * 248, ["longer than 255"]),
    ],
)
def test_parse_reference_refuses(text: str, words: list[str]) -> None:
    with pytest.raises(InvalidError) as info:
        parse_reference(text)
    message = info.value.message
    assert message.startswith("invalid reference") or "digest" in message
    for word in words:
        assert word in message, message
    assert info.value.code == "invalid"


@pytest.mark.parametrize(
    "text",
    [
        "docker.io/library/" + "a" * 237,  # exactly 255 characters normalized
        "a" * 237,
        "quay.io/" + "a" * 247,
    ],
)
def test_name_of_exactly_255_characters_is_accepted(text: str) -> None:
    ref = parse_reference(text)
    assert len(ref.name) == 255


def test_uppercase_message_names_the_reference() -> None:
    with pytest.raises(InvalidError, match="must be lowercase") as info:
        parse_reference("quay.io/Org/app")
    assert "'quay.io/Org/app'" in info.value.message


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3:80", True),
        ("[::1]", True),
        ("[::1]:5000", True),
        ("[0:0:0:0:0:0:0:1]:443", True),
        ("[::2]:5000", False),
        ("[2001:db8::1]:5000", False),
        ("10.0.0.1:5000", False),
        ("0.0.0.0:5000", False),
        ("128.0.0.1", False),
        ("example.com", False),
        ("example.com:5000", False),
        ("localhost.example.com", False),
        ("mylocalhost:5000", False),
        ("docker.io", False),
        ("", False),
    ],
)
def test_is_loopback_host(domain: str, expected: bool) -> None:
    assert is_loopback_host(domain) is expected
