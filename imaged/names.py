"""Container names (DESIGN §2): they become directory names, so the rule is strict, and an empty
name is a mistake to report, never a request for a generated one."""

from __future__ import annotations

import re
import secrets

from imaged.errors import InvalidError

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise InvalidError(f"invalid container name {name!r}: use 1-128 of [a-zA-Z0-9_.-], "
                           "starting with a letter or digit")
    return name


def name_or_new(name: str | None) -> str:
    """``name`` checked, or a new ``c-`` + 12 hex digits when none was given."""
    return check_name(f"c-{secrets.token_hex(6)}" if name is None else name)
