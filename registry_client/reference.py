"""Image references, parsed and normalized with Docker's rules (distribution/reference).

Pure: a string in, a ``Reference`` or an ``InvalidError`` naming what is wrong out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from imaged.digest import Digest
from imaged.errors import InvalidError

DOCKER_HUB = "docker.io"
_LEGACY_HUB = ("index.docker.io", "registry-1.docker.io")
_NAME_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_ANCHORED_ID = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """A normalized reference: ``domain/path`` plus a tag, a digest, or both."""

    domain: str
    path: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest when there is one (it pins), else the tag."""
        return str(self.digest) if self.digest is not None else (self.tag or "latest")

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.domain, self.path, None, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def _split_domain(name: str) -> tuple[str, str]:
    """Docker's rule: the first component is a registry host only if it looks like one."""
    first, sep, rest = name.partition("/")
    if not sep or (
        "." not in first and ":" not in first and first != "localhost" and first.lower() == first
    ):
        return DOCKER_HUB, name
    return first, rest


def parse_reference(text: str) -> Reference:
    """Parse and normalize: ``alpine`` → ``docker.io/library/alpine:latest``."""
    if not isinstance(text, str) or not text:
        raise InvalidError("invalid reference: empty")
    if any(c.isspace() for c in text) or not text.isprintable():
        raise InvalidError(f"invalid reference {text!r}: contains whitespace or control characters")
    if _ANCHORED_ID.fullmatch(text):
        raise InvalidError(
            f"invalid reference {text!r}: a 64-digit hex string is an image ID, not a name"
        )
    remainder, at, digest_text = text.partition("@")
    digest = None
    if at:
        try:
            digest = Digest.parse(digest_text)
        except InvalidError as exc:
            raise InvalidError(f"invalid reference {text!r}: {exc.message}") from None
    domain, path = _split_domain(remainder)
    tag = None
    colon = path.rfind(":")
    if colon != -1:
        path, tag = path[:colon], path[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidError(
                f"invalid reference {text!r}: tag {tag!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]"
                "{0,127}"
            )
    if (domain != DOCKER_HUB or "/" in remainder) and not _DOMAIN_RE.fullmatch(domain):
        raise InvalidError(f"invalid reference {text!r}: bad registry host {domain!r}")
    _, has_port, digits = domain.rpartition("]")[2].partition(":")  # after an IPv6 literal
    if has_port and not 1 <= int(digits) <= 65535:
        raise InvalidError(f"invalid reference {text!r}: port {digits} is not in 1-65535")
    if not path:
        raise InvalidError(f"invalid reference {text!r}: repository name is empty")
    if path.lower() != path:
        raise InvalidError(f"invalid reference {text!r}: repository name must be lowercase")
    if not _PATH_RE.fullmatch(path):
        raise InvalidError(
            f"invalid reference {text!r}: repository name {path!r} may contain only lowercase "
            "letters, digits and single separators (., _, __, -) between them, split by /"
        )
    if domain in _LEGACY_HUB:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(f"{domain}/{path}") > _NAME_MAX:
        raise InvalidError(f"invalid reference {text!r}: name longer than {_NAME_MAX} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(domain, path, tag, digest)


def is_loopback_host(domain: str) -> bool:
    """Whether a registry host (with optional port) is this machine: plain HTTP is allowed there."""
    host = domain[1:domain.find("]")] if domain.startswith("[") else domain.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
