"""Human sizes, both ways, always in powers of 1024 (DESIGN §4)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from imaged.errors import InvalidError

_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
# The largest size Linux can give a file or a filesystem (off_t): no quota can be larger.
MAX_BYTES = 2**63 - 1
_SIZE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse ``10G``, ``1.5MiB``, ``512k``, ``4096`` into bytes.

    Decimals are allowed so ``1.5G`` works, but the result must be a whole number of bytes: a
    quota of half a byte is more likely a typo than a wish. ``B`` alone (``100B``) is bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidError(f"size must not be negative: {text}")
        return text
    if not isinstance(text, str):
        raise InvalidError(f"size must be a string or an integer, not {type(text).__name__}")
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise InvalidError(
            f"invalid size {text!r}: expected a number with an optional k, M, G or T suffix"
        )
    unit = match["unit"].lower()
    if unit == "" and text.strip().lower().endswith("ib"):
        raise InvalidError(f"invalid size {text!r}: 'iB' needs a unit before it (KiB, MiB, …)")
    try:
        value = Decimal(match["num"]) * (1024 ** _UNITS[unit])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise InvalidError(f"invalid size {text!r}") from exc
    if value != value.to_integral_value():
        raise InvalidError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def check_quota(n: int) -> int:
    """A quota any driver could be asked for: positive and within ``MAX_BYTES``. A driver may
    refuse less, naming its own limit."""
    if n < 1:
        raise InvalidError(f"quota must be a positive size, not {n}")
    if n > MAX_BYTES:
        raise InvalidError(f"quota of {n} bytes is past the largest size Linux can address "
                           f"({format_size(MAX_BYTES)})")
    return n


def shrink_refused(used: int, quota: int) -> str | None:
    """Why a quota below what a container already holds is refused (every driver refuses it:
    the container could not even rewrite what it has), or None when the quota is not."""
    if quota >= used:
        return None
    return (f"uses {format_size(used)}, more than the new quota of {format_size(quota)}: "
            "delete files first")


def format_size(n: int) -> str:
    """Render bytes for tables: three significant digits, binary units."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    value /= 1024
    if value >= 1024 * 1024:
        return f"{value / 1024 / 1024:.3g} EiB"
    return f"{value:.3g} TiB" if value < 100 else f"{value:.0f} TiB"
