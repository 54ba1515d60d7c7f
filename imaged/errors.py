"""The one exception hierarchy of imaged.

Every error a user can cause or meet carries a stable ``code`` (the socket API's error codes of
DESIGN §5) and a message written for the person reading it. The three edges translate it once:
the CLI into ``imaged: error: …`` and an exit status, the API into an HTTP status, FUSE into an
errno. Anything that is not an ``ImagedError`` is a bug and is reported as ``internal``.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
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


class StorageError(ImagedError):
    """A filesystem under the store failed an operation: an I/O error, a filesystem the kernel
    turned read-only after one, a damaged database. Not a bug of ours, so the message is the
    operation, the file and the errno's text (``writing /r/content/ingest/sha256-…:
    Input/output error``), telling an operator which disk to look at; the API keeps DESIGN §5's
    code for a failure on the server's side, ``internal`` (500)."""

    code = "internal"
    http_status = 500


def os_failure(exc: OSError, action: str | None = None,
               path: str | os.PathLike[str] | None = None) -> ImagedError:
    """An ``OSError`` from the store's own files as the user's error: ``action path: strerror``
    (a rename's second path after "to"), ``NoSpaceError`` for a full filesystem or quota.
    ``path`` is for calls on a descriptor, whose errors carry no file name."""
    where = path if path is not None else exc.filename
    subject = " ".join(str(part) for part in (action, where) if part is not None)
    if exc.filename2 is not None and path is None:
        subject += f" to {exc.filename2}"
    text = exc.strerror or str(exc)
    message = f"{subject}: {text}" if subject else text
    return (NoSpaceError if exc.errno in NO_SPACE_ERRNOS else StorageError)(message)


@contextmanager
def reporting_os_errors(action: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Around calls on a descriptor (write, fsync, syncfs), whose ``OSError`` names no file:
    it leaves as ``os_failure(exc, action, path)``."""
    try:
        yield
    except OSError as exc:
        raise os_failure(exc, action, path) from exc


# SQLite's primary result codes (sqlite3.h) that mean the disk or the file, not our SQL, failed.
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN = 8, 10, 11, 13, 14
_SQLITE_NOTADB = 26
_SQLITE_STORAGE = frozenset({_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_CANTOPEN,
                             _SQLITE_NOTADB})


def sqlite_failure(exc: sqlite3.Error, path: Path) -> ImagedError | None:
    """A database error that the file or the disk under it caused, as the user's error naming
    the database (SQLite does not pass the errno on, so its own words and the code's name stand
    for it: ``disk I/O error (SQLITE_IOERR_FSYNC)``); None for any other, which is a bug."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    name = getattr(exc, "sqlite_errorname", "")
    if code & 0xFF == _SQLITE_FULL:
        return NoSpaceError(f"writing the metadata database {path}: {os.strerror(errno.ENOSPC)} "
                            f"({name})")
    if code & 0xFF in _SQLITE_STORAGE:
        return StorageError(f"the metadata database {path}: {exc} ({name})")
    return None


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
