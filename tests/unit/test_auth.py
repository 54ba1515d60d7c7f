"""Authentication's pure part: WWW-Authenticate challenges, token responses, the token cache."""

from __future__ import annotations

import json

import pytest

from imaged.errors import RegistryError
from imaged.registry_client.auth import (
    Challenge,
    Credentials,
    Token,
    TokenCache,
    parse_challenges,
    parse_token_response,
)

HUB = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
       'scope="repository:library/alpine:pull"')


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (HUB, [Challenge("bearer", {"realm": "https://auth.docker.io/token",
                                    "service": "registry.docker.io",
                                    "scope": "repository:library/alpine:pull"})]),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ("Basic", [Challenge("basic")]),
        ("Basic ", [Challenge("basic")]),
        ("", []),
        ("   ", []),
        ('BEARER Realm="https://a/token"', [Challenge("bearer", {"realm": "https://a/token"})]),
        ('Bearer realm = "https://a/token" , service = reg ',
         [Challenge("bearer", {"realm": "https://a/token", "service": "reg"})]),
        ('Bearer realm="https://a/token",service=registry.example.com',
         [Challenge("bearer", {"realm": "https://a/token", "service": "registry.example.com"})]),
        # A comma inside quotes belongs to the value.
        ('Bearer realm="https://a/token",scope="repository:a/b:pull,push"',
         [Challenge("bearer", {"realm": "https://a/token", "scope": "repository:a/b:pull,push"})]),
        # Escaped quotes and backslashes are unescaped.
        (r'Bearer realm="https://a/token",error="invalid_token",'
         r'error_description="the \"token\", it expired"',
         [Challenge("bearer", {"realm": "https://a/token", "error": "invalid_token",
                               "error_description": 'the "token", it expired'})]),
        (r'Basic realm="back\\slash \x"', [Challenge("basic", {"realm": "back\\slash x"})]),
        ('Bearer realm=""', [Challenge("bearer", {"realm": ""})]),
        # Several challenges in one header.
        ('Basic realm="r1", Bearer realm="https://a/token",service="s"',
         [Challenge("basic", {"realm": "r1"}),
          Challenge("bearer", {"realm": "https://a/token", "service": "s"})]),
        ('Bearer realm="https://a/token", Basic realm="r, with comma"',
         [Challenge("bearer", {"realm": "https://a/token"}),
          Challenge("basic", {"realm": "r, with comma"})]),
        ('Bearer realm="https://a/token",service="s", Basic',
         [Challenge("bearer", {"realm": "https://a/token", "service": "s"}),
          Challenge("basic")]),
        ('Basic realm="a", charset="UTF-8"',
         [Challenge("basic", {"realm": "a", "charset": "UTF-8"})]),
        # A scheme without parameters followed by another challenge (RFC 7235 §4.1 example).
        ('Negotiate, Basic realm="r"',
         [Challenge("negotiate"), Challenge("basic", {"realm": "r"})]),
        ('Negotiate, NTLM', [Challenge("negotiate"), Challenge("ntlm")]),
    ],
)
def test_parse_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


def test_parse_challenges_later_parameter_wins() -> None:
    [challenge] = parse_challenges('Bearer realm="a",realm="b"')
    assert challenge.params == {"realm": "b"}


NOW = 1000.0


@pytest.mark.parametrize(
    ("doc", "value", "expires_at"),
    [
        ({"token": "t", "expires_in": 300}, "t", NOW + 300 - 10),
        ({"token": "t", "expires_in": 120.5}, "t", NOW + 120.5 - 10),
        ({"token": "t"}, "t", NOW + 60 - 10),
        ({"access_token": "a"}, "a", NOW + 60 - 10),
        ({"access_token": "a", "expires_in": 3600}, "a", NOW + 3600 - 10),
        ({"token": "t", "access_token": "a"}, "t", NOW + 50),
        ({"token": "", "access_token": "a"}, "a", NOW + 50),
        ({"token": None, "access_token": "a"}, "a", NOW + 50),
        # Shorter than Docker's minimum of 60 s: raised to 60.
        ({"token": "t", "expires_in": 30}, "t", NOW + 50),
        ({"token": "t", "expires_in": 1}, "t", NOW + 50),
        ({"token": "t", "expires_in": 60}, "t", NOW + 50),
        ({"token": "t", "expires_in": 61}, "t", NOW + 51),
        # Nonsense lifetimes fall back to the default.
        ({"token": "t", "expires_in": 0}, "t", NOW + 50),
        ({"token": "t", "expires_in": -500}, "t", NOW + 50),
        ({"token": "t", "expires_in": "300"}, "t", NOW + 50),
        ({"token": "t", "expires_in": True}, "t", NOW + 50),
        ({"token": "t", "expires_in": None}, "t", NOW + 50),
        ({"token": "t", "expires_in": [300]}, "t", NOW + 50),
        ({"token": "t", "issued_at": "2024-01-01T00:00:00Z", "refresh_token": "r"}, "t",
         NOW + 50),
    ],
)
def test_parse_token_response(doc: dict[str, object], value: str, expires_at: float) -> None:
    token = parse_token_response(json.dumps(doc).encode(), NOW, "auth.example.com")
    assert token.value == value
    assert token.expires_at == pytest.approx(expires_at)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", ["not JSON"]),
        (b"<html>502 Bad Gateway</html>", ["not JSON"]),
        (b"\xff\xfe", ["not JSON"]),
        (b"[]", ["not JSON"]),
        (b'"token"', ["not JSON"]),
        (b"{}", ["returned no token"]),
        (b'{"token": ""}', ["returned no token"]),
        (b'{"token": 42}', ["returned no token"]),
        (b'{"token": ["t"]}', ["returned no token"]),
        (b'{"access_token": null}', ["returned no token"]),
        (b'{"expires_in": 300}', ["returned no token"]),
    ],
)
def test_parse_token_response_refuses(body: bytes, words: list[str]) -> None:
    with pytest.raises(RegistryError) as info:
        parse_token_response(body, NOW, "auth.example.com")
    assert "token server auth.example.com" in info.value.message
    for word in words:
        assert word in info.value.message


KEY = ("https://auth.example.com/token", "registry.example.com", "repository:a/b:pull")
OTHER = ("https://auth.example.com/token", "registry.example.com", "repository:c/d:pull")


def test_token_cache_returns_until_expiry_then_forgets() -> None:
    cache = TokenCache()
    assert cache.get(KEY, 0.0) is None
    cache.put(KEY, Token("tok", 100.0))
    assert cache.get(KEY, 0.0) == "tok"
    assert cache.get(KEY, 99.9) == "tok"
    assert cache.get(KEY, 100.0) is None
    # Expired tokens are dropped, not kept for a clock that goes backwards.
    assert cache.get(KEY, 50.0) is None


def test_token_cache_keys_are_independent_and_drop_works() -> None:
    cache = TokenCache()
    cache.put(KEY, Token("one", 100.0))
    cache.put(OTHER, Token("two", 200.0))
    assert cache.get(KEY, 150.0) is None
    assert cache.get(OTHER, 150.0) == "two"
    cache.drop(OTHER)
    assert cache.get(OTHER, 0.0) is None
    cache.drop(OTHER)  # dropping what is not there is fine
    cache.put(KEY, Token("three", 300.0))
    assert cache.get(KEY, 250.0) == "three"


def test_token_cache_with_parsed_token() -> None:
    cache = TokenCache()
    token = parse_token_response(b'{"token": "t", "expires_in": 300}', NOW, "auth")
    cache.put(KEY, token)
    assert cache.get(KEY, NOW + 289) == "t"
    assert cache.get(KEY, NOW + 290) is None


@pytest.mark.parametrize(
    "creds",
    [
        Credentials("alice", "hunter2-secret"),
        Credentials("alice", "hunter2-secret", "idtoken-secret"),
        Credentials("", "", "idtoken-secret"),
    ],
)
def test_credentials_never_show_the_secret(creds: Credentials) -> None:
    for shown in (repr(creds), str(creds), f"{creds}", f"{creds!r}", repr([creds]),
                  repr({"creds": creds}), str((creds,))):
        assert "hunter2" not in shown
        assert "idtoken-secret" not in shown
        assert "<hidden>" in shown
        assert f"username={creds.username!r}" in shown


def test_credentials_keep_their_values() -> None:
    creds = Credentials("alice", "pw", "tok")
    assert (creds.username, creds.password, creds.identity_token) == ("alice", "pw", "tok")
    assert creds == Credentials("alice", "pw", "tok")
    assert creds != Credentials("alice", "other", "tok")
