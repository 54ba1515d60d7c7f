"""Registry authentication, the pure part: challenges, token responses, the token cache.

The distribution token flow: a request answered 401 carries ``WWW-Authenticate: Bearer
realm=…,service=…,scope=…``; we fetch a token from the realm (with credentials when we have them)
and retry. Tokens are cached per (realm, service, scope) until shortly before they expire.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field

from imaged.errors import RegistryError

_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf'\s*({_TCHARS})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TCHARS}))\s*(?:,|$)')
_SCHEME_RE = re.compile(rf"\s*({_TCHARS})(?:\s+|(?=,)|$)")
# Docker's spec: a token without expires_in lives 60 s; we renew 10 s before the end.
DEFAULT_TCHARS_LIFETIME = 60.0
EXPIRY_MARGIN = 10.0


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-cased: 'bearer' or 'basic'
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value (RFC 7235), possibly holding several challenges."""
    out: list[Challenge] = []
    pos = 0
    while pos < len(header):
        scheme_match = _SCHEME_RE.match(header, pos)
        if scheme_match is None:
            break
        challenge = Challenge(scheme_match[1].lower())
        pos = scheme_match.end()
        while pos < len(header):
            param = _PARAM_RE.match(header, pos)
            if param is None:
                break
            value = param[2] if param[2] is not None else param[3]
            challenge.params[param[1].lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = param.end()
        out.append(challenge)
        while pos < len(header) and header[pos] in ", ":
            pos += 1
    return out


@dataclass(frozen=True)
class Credentials:
    """A username and secret, or an identity (refresh) token. Never printed: see ``__repr__``."""

    username: str
    password: str
    identity_token: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, secret=<hidden>)"

    __str__ = __repr__


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float  # monotonic seconds


def parse_token_response(body: bytes, now: float, realm_host: str) -> Token:
    """Read a token endpoint's answer: ``token`` or ``access_token``, ``expires_in`` seconds."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise RegistryError(f"token server {realm_host} answered with something that is not JSON")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise RegistryError(f"token server {realm_host} returned no token")
    lifetime = doc.get("expires_in", DEFAULT_TCHARS_LIFETIME)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) \
            or not math.isfinite(lifetime) or lifetime <= 0:
        lifetime = DEFAULT_TCHARS_LIFETIME
    lifetime = max(float(lifetime), DEFAULT_TCHARS_LIFETIME)
    return Token(value, now + lifetime - EXPIRY_MARGIN)


class TokenCache:
    """Tokens by (realm, service, scope); shared by the download threads, hence the lock."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], Token] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str], now: float) -> str | None:
        with self._lock:
            token = self._tokens.get(key)
            if token is None or token.expires_at <= now:
                self._tokens.pop(key, None)
                return None
            return token.value

    def put(self, key: tuple[str, str, str], token: Token) -> None:
        with self._lock:
            self._tokens[key] = token

    def drop(self, key: tuple[str, str, str]) -> None:
        with self._lock:
            self._tokens.pop(key, None)

