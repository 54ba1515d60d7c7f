"""Pull progress events: what the CLI draws and the API streams (DESIGN §5).

Kept apart from ``imaged.ops.pull`` so a CLI talking to the daemon can rebuild them from NDJSON
without importing the pull machinery (trio, requests, the unpacker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_FIELDS = ("layer", "current", "total", "id")


@dataclass(frozen=True)
class PullEvent:
    """One step of a pull."""

    # resolving, resolved, exists, waiting (on another pull's download or unpack), downloading,
    # verified, unpacking, unpacked, done
    status: str
    layer: str | None = None
    current: int | None = None
    total: int | None = None
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        for key in _FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PullEvent:
        known = {key: obj[key] for key in _FIELDS if key in obj}
        extra = {k: v for k, v in obj.items() if k != "status" and k not in _FIELDS}
        return cls(str(obj.get("status", "")), **known, extra=extra)


Reporter = Callable[[PullEvent], None]
