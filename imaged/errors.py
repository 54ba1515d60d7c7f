"""The one exception hierarchy of imaged.

Every error a user can cause or meet carries a stable ``code`` (the socket API's error codes of
DESIGN §5) and a message written for the person reading it. The three edges translate it once:
the CLI into ``imaged: error: …`` and an exit status, the API into an HTTP status, FUSE into an
errno. Anything that is not an ``ImagedError`` is a bug and is reported as ``internal``.
"""

from __future__ import annotations

import errno
from typing import ClassVar


class ImagedError(Exception):
    """Base of every error meant for a user; ``str(exc)`` is the message."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidError(ImagedError):
    """Input that can never succeed: a malformed reference, size, name, body or layer."""

    code = "invalid"
    http_status = 400


class ForbiddenError(ImagedError):
    code = "forbidden"
    http_status = 403


class NotFoundError(ImagedError):
    code = "not_found"
    http_status = 404


class ConflictError(ImagedError):
    """The request is valid but the store's state forbids it now (in use, exists, locked)."""

    code = "conflict"
    http_status = 409


class NoSpaceError(ConflictError):
    """A filesystem imaged writes to has no room for what was asked; freeing space fixes it."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full filesystem, or a quota on it


class QuotaUnsupportedError(ImagedError):
    code = "quota_unsupported"
    http_status = 422


class RegistryError(ImagedError):
    """A registry could not be reached, refused us, or served something we will not accept."""

    code = "registry"
    http_status = 502


class ConfigError(InvalidError):
    """A configuration file or option that cannot be used; names the key and the file."""


class RootInUseError(ConflictError):
    """Another process holds the root's lock."""


class ContentError(RegistryError):
    """Bytes that do not match what was promised: wrong digest, wrong size, wrong media type."""


class InternalError(ImagedError):
    code = "internal"
    http_status = 500


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, however deeply its groups nest (``exc`` if none)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def describe(exc: BaseException) -> str:
    """A bug in one line: the type and message of each exception a group holds, not the
    group's own "Exceptions from Trio nursery"."""
    return "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves(exc))


def collapse(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to show for a nursery's exception group.

    When every failure in the group is a user-facing error (two layers that both failed to
    download), the first one speaks for all; anything else (a bug, a KeyboardInterrupt) keeps
    the whole group so nothing is hidden.
    """
    found = leaves(group)
    if found and all(isinstance(e, ImagedError) for e in found):
        return found[0]
    return group


def error_from_json(body: object) -> ImagedError:
    """The error a daemon answered with, as the class the embedded service would have raised,
    so the CLI reports it alike in both modes."""
    inner = body.get("error") if isinstance(body, dict) else None
    if not isinstance(inner, dict):
        return InternalError(f"the daemon answered with an unexpected error body: {body!r:.200}")
    code, message = inner.get("code"), str(inner.get("message", ""))
    for cls in (InvalidError, ForbiddenError, NotFoundError, ConflictError,
                QuotaUnsupportedError, RegistryError):
        if cls.code == code:
            return cls(message)
    return InternalError(message)
