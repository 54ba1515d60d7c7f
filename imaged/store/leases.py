"""Leases: what in-flight work relies on but has not recorded yet.

A pull downloads blobs into ingest and applies layers long before one transaction records the
image that references them. Until then nothing in the metadata says those blobs and layers are
wanted, so garbage collection, ``rmi`` and the clean-up of a failed pull must ask here before they
remove anything (containerd's leases play the same part). Leases live in memory: one process
holds the root's lock, so no other process can be mid-pull on this store, and a crash ends every
lease together with the work that held it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Lease:
    """One holder's set of keys (``sha256:…`` blob digests and layer chain IDs); it may grow as
    the holder learns more (a pull learns its chain IDs only from the image config)."""

    def __init__(self, table: Leases) -> None:
        self._table = table
        self.keys: set[str] = set()

    def add(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key not in self.keys:
                self.keys.add(key)
                self._table._held[key] += 1

    def discard(self, key: str) -> None:
        """Stop relying on one key before the lease ends. A failing pull lets go of each key as
        it decides to keep or remove it, so that of several holders failing at once exactly the
        last one to decide sees nobody else holding it, and removes it."""
        if key in self.keys:
            self.keys.remove(key)
            self._table._release(key)


class Leases:
    def __init__(self) -> None:
        self._held: Counter[str] = Counter()

    @contextmanager
    def hold(self, keys: Iterable[str] = ()) -> Iterator[Lease]:
        lease = Lease(self)
        try:
            lease.add(keys)
            yield lease
        finally:
            for key in lease.keys:
                self._release(key)

    def _release(self, key: str) -> None:
        self._held[key] -= 1
        if not self._held[key]:
            del self._held[key]

    def held(self, key: str) -> bool:
        return key in self._held

    def held_by_others(self, key: str, mine: Lease) -> bool:
        """Whether anyone but ``mine`` relies on ``key``: what a failing holder may remove."""
        return self._held[key] > (1 if key in mine.keys else 0)
