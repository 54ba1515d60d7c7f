"""When to retry a registry request and how long to wait: pure policy, no I/O, no clock.

Retries 408, 429, 502, 503, 504 and dropped connections; waits exponentially with full jitter up
to a cap, except that a ``Retry-After`` from the server wins (clamped, so a hostile server cannot
park us for a day). Tested with trio's autojump clock, so backoff costs no real time in tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})


def _digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts '²', which ``int`` then refuses."""
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # total tries, the first included
    base: float = 0.5
    cap: float = 20.0
    retry_after_cap: float = 60.0

    def delay(self, attempt: int, retry_after: float | None,
              rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before try number ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        ceiling = min(self.cap, self.base * (2 ** (attempt - 1)))
        # Full jitter, but never less than half the ceiling: clients retrying together spread out
        # while none of them hammers the server at once.
        return float(ceiling * (0.5 + 0.5 * rand()))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` in seconds from ``now`` (delta-seconds or HTTP-date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if _digits(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - now).total_seconds(), 0.0)


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes START-END/TOTAL`` → (start, end inclusive, total or None for ``*``)."""
    if value is None:
        return None
    unit, _, spec = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None
    span, _, total = spec.partition("/")
    start, _, end = span.partition("-")
    if not (_digits(start) and _digits(end)) or int(end) < int(start):
        return None
    if total == "*":
        return int(start), int(end), None
    if not _digits(total):
        return None
    return int(start), int(end), int(total)
