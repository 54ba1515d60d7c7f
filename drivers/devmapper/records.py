"""What the driver knows of its thin devices. The driver is only given its home, so its records live
there, in ``devices.db`` (SQLite, WAL, synchronous=FULL): key, thin id, state, size, quota. This
departs from DESIGN §2's "one metadata store" because a driver cannot reach ``metadata.db`` through
the Protocol, and the records are the pool's bookkeeping, not the image store's; the store's own
intent states still cover layers and containers as for every driver. Here the intent is one level
down: a thin id is recorded ``creating`` before ``create_thin``/``create_snap`` and ``ready``
after, and a removal is ``removing`` until the pool has deleted the id. The pool's transaction id
is set to a counter kept with the records after every change (as Docker's driver does), so a pool
whose transaction id differs from the records' has been changed behind their back (a crash between
the two, or records lost): then the pool's ids are listed with ``thin_ls`` on a metadata snapshot,
ids the records do not know are deleted, and records whose id the pool lacks are reported (logged,
and in ``recovered``). Records left ``creating`` are undone at every start whatever the transaction
id says.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Record:
    key: str
    id: int
    state: str  # creating | ready | removing
    sectors: int
    quota: int | None = None
    read_only: bool = False


@dataclass(frozen=True)
class Reconciliation:
    """What to do at start, from the records and (when the transaction ids disagree) the ids
    the pool holds."""

    undo: tuple[Record, ...]  # creating: the id may or may not exist; delete it, drop the record
    finish: tuple[Record, ...]  # removing: finish the removal
    strays: tuple[int, ...]  # ids in the pool no record knows: delete them
    missing: tuple[Record, ...]  # ready records whose id the pool lacks: report them


def reconcile(records: Iterable[Record], pool_ids: set[int] | None) -> Reconciliation:
    records = list(records)
    known = {record.id for record in records}
    undo = tuple(r for r in records if r.state == "creating")
    finish = tuple(r for r in records if r.state == "removing")
    strays: tuple[int, ...] = ()
    missing: tuple[Record, ...] = ()
    if pool_ids is not None:
        strays = tuple(sorted(pool_ids - known))
        missing = tuple(r for r in records if r.state == "ready" and r.id not in pool_ids)
    return Reconciliation(undo, finish, strays, missing)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    key TEXT PRIMARY KEY,         -- base, l/<chainid hex>, c/<container name>, dead/<id>
    id INTEGER NOT NULL UNIQUE,   -- the thin device id in the pool (24 bits)
    state TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    sectors INTEGER NOT NULL,     -- the device's size: what its table says when activated
    quota INTEGER,                -- a container's quota in bytes; NULL without one
    read_only INTEGER NOT NULL DEFAULT 0  -- activated read-only (read-only containers)
);
-- next_id: where id allocation resumes; transaction_id: what the pool's must equal
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = "key, id, state, sectors, quota, read_only"


class Records:
    """The driver's ``devices.db``: one connection shared by the service's worker threads,
    serialized by a lock; each write, or each ``transaction()`` block, is durable when it
    returns."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _select(self, where: str = "1", *args: str) -> list[Record]:
        with self._lock:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM devices WHERE {where}",  # noqa: S608 - where is ours
                                   args).fetchall()
        return [Record(k, i, s, n, q, bool(r)) for k, i, s, n, q, r in rows]

    def all(self) -> list[Record]:
        return self._select()

    def get(self, key: str) -> Record | None:
        return next(iter(self._select("key = ?", key)), None)

    def with_prefix(self, prefix: str) -> list[Record]:
        return self._select("substr(key, 1, length(?1)) = ?1", prefix)

    def ids(self) -> set[int]:
        with self._lock:
            return {row[0] for row in self.db.execute("SELECT id FROM devices")}

    def put(self, record: Record) -> None:
        with self._lock:
            self.db.execute(f"INSERT OR REPLACE INTO devices ({_COLUMNS}) "  # noqa: S608 - ours
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (record.key, record.id, record.state, record.sectors, record.quota,
                             int(record.read_only)))

    def rekey(self, old: str, new: str) -> None:
        with self._lock:
            self.db.execute("UPDATE devices SET key = ? WHERE key = ?", (new, old))

    def drop(self, key: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM devices WHERE key = ?", (key,))

    def counter(self, name: str) -> int:
        with self._lock:
            row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_counter(self, name: str, value: int) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (name, value))

