"""Content digests (``sha256:<hex>``), parsed strictly because they become file names."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from imaged.errors import InvalidError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"(?P<alg>[a-z0-9]+(?:[+._-][a-z0-9]+)*):(?P<hex>[0-9a-f]+)")


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Accept only algorithms we can verify and hex of exactly their length.

        The OCI grammar allows any registered algorithm, but a digest we cannot check is a
        digest we would have to trust, so anything but sha256/sha512 is refused here.
        """
        match = _DIGEST_RE.fullmatch(text)
        if match is None:
            raise InvalidError(f"invalid digest {text!r}: expected sha256:<64 lowercase hex>")
        alg, hexpart = match["alg"], match["hex"]
        if alg not in _HEX_LENGTH:
            raise InvalidError(f"unsupported digest algorithm {alg!r} in {text!r}")
        if len(hexpart) != _HEX_LENGTH[alg]:
            raise InvalidError(
                f"invalid digest {text!r}: {alg} needs {_HEX_LENGTH[alg]} hex digits"
            )
        return cls(alg, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Hasher:
        return hashlib.new(self.algorithm)

    @property
    def short(self) -> str:
        """The 12-digit form tables show, as Docker does."""
        return self.hex[:12]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def chain_ids(diff_ids: list[Digest]) -> list[Digest]:
    """OCI ChainIDs: ChainID(0) = DiffID(0); ChainID(n) = sha256(ChainID(n-1) + " " + DiffID(n))."""
    out: list[Digest] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append(Digest.of(f"{out[-1]} {diff_id}".encode()))
    return out
