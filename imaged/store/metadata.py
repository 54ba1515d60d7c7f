"""The metadata database: one SQLite file in WAL mode, versioned by ``PRAGMA user_version``.

Calls are short local transactions, so they run on the trio thread (as s3ql does) rather than
paying a thread hop each. Every change that spans several rows happens in one transaction.
Work in a worker thread that must change rows between its file operations (gc's and repair's
removals: a row goes before its files) uses ``from_thread``, which hands each call back to the
trio thread: a statement run from the worker would land inside whatever transaction the trio
thread had open.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from imaged.digest import Digest
from imaged.errors import ConflictError, sqlite_failure

# Each entry upgrades the schema from version i to i+1; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    -- Store-wide facts, e.g. ('driver', 'overlay'): one root is bound to one driver.
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    -- Every verified blob in content/blobs. A row exists only once its file is committed;
    -- a file without a row is an orphan of a crash and is taken back to ingest at open.
    CREATE TABLE blobs (
        digest     TEXT PRIMARY KEY,      -- 'sha256:<hex>'
        size       INTEGER NOT NULL,      -- bytes as stored (compressed for layers)
        media_type TEXT NOT NULL,
        created    REAL NOT NULL          -- unix time
    );
    -- One row per platform manifest pulled. id is the manifest's digest (the image ID).
    CREATE TABLE images (
        id            TEXT PRIMARY KEY,
        media_type    TEXT NOT NULL,
        config_digest TEXT NOT NULL REFERENCES blobs(digest),
        platform      TEXT NOT NULL,      -- 'os/arch[/variant]' from the config
        size          INTEGER NOT NULL,   -- sum of layer blob sizes plus config and manifest
        created       REAL NOT NULL
    );
    -- The ordered layers of an image. chain_id identifies the unpacked layer a driver holds,
    -- so images sharing a base share rows' chain_ids and the layers on disk.
    CREATE TABLE image_layers (
        image_id    TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        position    INTEGER NOT NULL,     -- 0 is the base layer
        blob_digest TEXT NOT NULL REFERENCES blobs(digest),
        diff_id     TEXT NOT NULL,        -- sha256 of the uncompressed tar, from the config
        chain_id    TEXT NOT NULL,
        media_type  TEXT NOT NULL,
        size        INTEGER NOT NULL,
        PRIMARY KEY (image_id, position)
    );
    CREATE INDEX image_layers_blob ON image_layers(blob_digest);
    -- Names pointing at images: 'registry/repo:tag' or 'registry/repo@digest'. index_digest is
    -- the index or manifest list the name resolved through (the repo digest), when there was one.
    CREATE TABLE refs (
        name         TEXT PRIMARY KEY,
        image_id     TEXT NOT NULL REFERENCES images(id),
        index_digest TEXT REFERENCES blobs(digest),
        created      REAL NOT NULL
    );
    CREATE INDEX refs_image ON refs(image_id);
    """,
    """
    -- Unpacked layers as the driver holds them, named by ChainID. A row in state 'creating'
    -- is a layer being applied: if found at open, its directory is half-written and removed.
    CREATE TABLE layers (
        chain_id    TEXT PRIMARY KEY,
        parent      TEXT,                 -- chain_id of the layer below; NULL for a base layer
        diff_id     TEXT NOT NULL,
        driver      TEXT NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('creating', 'ready')),
        entries     INTEGER NOT NULL DEFAULT 0,
        size        INTEGER NOT NULL DEFAULT 0,  -- uncompressed bytes of the layer's tar
        created     REAL NOT NULL
    );
    -- Writable (or read-only) layers on top of an image. 'creating' and 'removing' are intents
    -- recorded before the driver acts, so recovery knows what to finish or undo.
    CREATE TABLE containers (
        name       TEXT PRIMARY KEY,
        image_id   TEXT NOT NULL REFERENCES images(id),
        driver     TEXT NOT NULL,
        quota      INTEGER,               -- bytes; NULL means no quota
        read_only  INTEGER NOT NULL,      -- 0/1
        state      TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
        mount_path TEXT,                  -- where it is mounted now; NULL when not mounted
        target     INTEGER NOT NULL DEFAULT 0,  -- a Target: where mount_path came from
        created    REAL NOT NULL
    );
    CREATE INDEX containers_image ON containers(image_id);
    """,
)


@dataclass(frozen=True)
class LayerRow:
    position: int
    blob_digest: Digest
    diff_id: Digest
    chain_id: Digest
    media_type: str
    size: int


@dataclass(frozen=True)
class ImageRow:
    id: Digest
    media_type: str
    config_digest: Digest
    platform: str
    size: int
    created: float
    refs: tuple[str, ...]
    layers: tuple[LayerRow, ...]


class Target(enum.IntEnum):
    """Where a mounted container's ``mount_path`` came from."""

    OWN = 0  # the driver's own directory for the container
    GIVEN = 1  # a path the caller gave, where the driver mounted
    ATTACHED = 2  # a confined target (imaged.host.targets): a clone of the driver's own mount


@dataclass(frozen=True)
class ContainerRow:
    name: str
    image_id: Digest
    driver: str
    quota: int | None
    read_only: bool
    state: str
    mount_path: str | None
    target: Target
    created: float


_CONTAINER_COLUMNS = ("name, image_id, driver, quota, read_only, state, mount_path, target, "
                      "created")
_SELECT_CONTAINERS = "SELECT " + _CONTAINER_COLUMNS + " FROM containers"  # noqa: S608 - constant
_INSERT_CONTAINER = (
    f"INSERT INTO containers({_CONTAINER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)")  # noqa: S608


def _container(row: tuple[object, ...]) -> ContainerRow:
    name, image_id, driver, quota, read_only, state, mount_path, target, created = row
    return ContainerRow(str(name), Digest.parse(str(image_id)), str(driver),
                        None if quota is None else int(str(quota)), bool(read_only), str(state),
                        None if mount_path is None else str(mount_path), Target(int(str(target))),
                        float(str(created)))


@dataclass(frozen=True)
class NewImage:
    """Everything a finished pull records, in one transaction."""

    ref: str
    id: Digest
    media_type: str
    config_digest: Digest
    platform: str
    index_digest: Digest | None
    layers: tuple[LayerRow, ...]
    blobs: tuple[tuple[Digest, int, str], ...]  # (digest, size, media type) of every blob used


@contextmanager
def _disk_errors(path: Path, cursor: sqlite3.Cursor | None = None) -> Iterator[None]:
    """SQLite's errors that the disk caused leave as the user's error naming the database.

    The failed ``cursor`` is closed first: the traceback keeps it alive, and a live cursor's
    statement keeps SQLite from closing the database file when the connection closes, which
    keeps the filesystem busy (no unmount for the operator who would check it)."""
    try:
        yield
    except sqlite3.Error as exc:
        if cursor is not None:
            with contextlib.suppress(sqlite3.Error):
                cursor.close()
        failure = sqlite_failure(exc, path)
        if failure is None:
            raise
        raise failure from exc


class _Connection(sqlite3.Connection):
    """A connection whose statements run through ``_Cursor``, so a failing disk is reported
    alike whichever of the many queries met it."""

    path = Path()

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self.cursor(_Cursor).execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        return self.cursor(_Cursor).executemany(sql, parameters)


class _Cursor(sqlite3.Cursor):
    """Every step that may read or write the file: executing, and fetching later rows."""

    def _path(self) -> Path:
        connection = self.connection
        return connection.path if isinstance(connection, _Connection) else Path()

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        with _disk_errors(self._path(), self):
            return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> _Cursor:
        with _disk_errors(self._path(), self):
            return super().executemany(sql, parameters)

    def fetchone(self) -> Any:
        with _disk_errors(self._path(), self):
            return super().fetchone()

    def fetchall(self) -> list[Any]:
        with _disk_errors(self._path(), self):
            return super().fetchall()

    def __next__(self) -> Any:
        with _disk_errors(self._path(), self):
            return super().__next__()


class Metadata:
    def __init__(self, path: Path) -> None:
        self.path = path
        with _disk_errors(path):
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                      factory=_Connection)
        self.db.path = path
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.migrate()
        except BaseException:  # a failing disk among them: the open file would keep it busy
            self.db.close()
            raise

    @property
    def version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        current = self.version
        if current > len(MIGRATIONS):
            raise ConflictError(
                f"{self.path} has schema version {current}, newer than this imaged "
                f"understands ({len(MIGRATIONS)}): upgrade imaged"
            )
        for version in range(current, len(MIGRATIONS)):
            with self.transaction():
                for statement in _split_sql(MIGRATIONS[version]):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={version + 1}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # settings

    def get_setting(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?, ?)", (key, value))

    # blobs

    def blob_digests(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT digest FROM blobs")}

    def blob_rows(self) -> dict[str, tuple[int, str]]:
        """Every recorded blob: digest → (size, media type)."""
        return {r[0]: (int(r[1]), str(r[2])) for r in self.db.execute(
            "SELECT digest, size, media_type FROM blobs")}

    def has_blob(self, digest: Digest) -> bool:
        """Whether the blob is recorded (its file flushed); a file alone may be a pull's work."""
        return self.db.execute("SELECT 1 FROM blobs WHERE digest=?",
                               (str(digest),)).fetchone() is not None

    def blob(self, digest: Digest) -> tuple[int, str] | None:
        """A recorded blob's (size, media type), or None."""
        row = self.db.execute("SELECT size, media_type FROM blobs WHERE digest=?",
                              (str(digest),)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    # images

    def record_image(self, new: NewImage) -> None:
        now = time.time()
        size = sum(s for d, s, _ in new.blobs if d != new.index_digest)
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO blobs(digest, size, media_type, created) VALUES (?,?,?,?)",
                [(str(d), s, m, now) for d, s, m in new.blobs],
            )
            exists = db.execute("SELECT 1 FROM images WHERE id=?", (str(new.id),)).fetchone()
            if exists is None:
                db.execute(
                    "INSERT INTO images(id, media_type, config_digest, platform, size, created)"
                    " VALUES (?,?,?,?,?,?)",
                    (str(new.id), new.media_type, str(new.config_digest), new.platform, size, now),
                )
                db.executemany(
                    "INSERT INTO image_layers(image_id, position, blob_digest, diff_id, chain_id,"
                    " media_type, size) VALUES (?,?,?,?,?,?,?)",
                    [
                        (str(new.id), layer.position, str(layer.blob_digest), str(layer.diff_id),
                         str(layer.chain_id), layer.media_type, layer.size)
                        for layer in new.layers
                    ],
                )
            db.execute(
                "INSERT OR REPLACE INTO refs(name, image_id, index_digest, created)"
                " VALUES (?,?,?,?)",
                (new.ref, str(new.id), None if new.index_digest is None else str(new.index_digest),
                 now),
            )

    def images(self) -> list[ImageRow]:
        rows = self.db.execute(
            "SELECT id, media_type, config_digest, platform, size, created FROM images"
            " ORDER BY created DESC, id"
        ).fetchall()
        return [self._image(row) for row in rows]

    def image(self, image_id: Digest) -> ImageRow | None:
        row = self.db.execute(
            "SELECT id, media_type, config_digest, platform, size, created FROM images WHERE id=?",
            (str(image_id),),
        ).fetchone()
        return None if row is None else self._image(row)

    def refs_of(self, image_id: str) -> tuple[str, ...]:
        return tuple(r[0] for r in self.db.execute(
            "SELECT name FROM refs WHERE image_id=? ORDER BY name", (image_id,)))

    def _image(self, row: tuple[str, str, str, str, int, float]) -> ImageRow:
        refs = self.refs_of(row[0])
        layers = tuple(
            LayerRow(pos, Digest.parse(blob), Digest.parse(diff), Digest.parse(chain), mt, size)
            for pos, blob, diff, chain, mt, size in self.db.execute(
                "SELECT position, blob_digest, diff_id, chain_id, media_type, size"
                " FROM image_layers WHERE image_id=? ORDER BY position",
                (row[0],),
            )
        )
        return ImageRow(Digest.parse(row[0]), row[1], Digest.parse(row[2]), row[3], row[4],
                        row[5], refs, layers)

    def chain_keys(self, image_id: Digest) -> list[str]:
        """An image's layer keys (ChainID hex), base first: what drivers are handed at mount.

        Read raw on purpose: this is on every mount's path, and 500 parsed digests cost more
        than the mount syscalls themselves.
        """
        return [r[0].split(":", 1)[1] for r in self.db.execute(
            "SELECT chain_id FROM image_layers WHERE image_id=? ORDER BY position",
            (str(image_id),))]

    def index_refs(self) -> list[tuple[str, str]]:
        """(name, index digest) of every name that resolved through an index."""
        return [(r[0], r[1]) for r in self.db.execute(
            "SELECT name, index_digest FROM refs WHERE index_digest IS NOT NULL ORDER BY name")]

    def ref_target(self, name: str) -> Digest | None:
        row = self.db.execute("SELECT image_id FROM refs WHERE name=?", (name,)).fetchone()
        return None if row is None else Digest.parse(row[0])

    def names_ending(self, suffix: str) -> dict[str, Digest]:
        """Names that end in ``suffix``, each with what a registry answers for it: the index it
        resolved through, else its image (a peer asks for ``repo:tag``, not for our name)."""
        return {r[0]: Digest.parse(r[1]) for r in self.db.execute(
            "SELECT name, COALESCE(index_digest, image_id) FROM refs"
            " WHERE substr(name, -?) = ?", (len(suffix), suffix))}

    def ids_with_prefix(self, hex_prefix: str) -> list[Digest]:
        pattern = f"sha256:{hex_prefix}%"
        return [Digest.parse(r[0]) for r in self.db.execute(
            "SELECT id FROM images WHERE id LIKE ?", (pattern,))]

    def remove_refs(self, names: list[str]) -> list[Digest]:
        """Drop names; images left with none are deleted. Returns blobs no longer referenced."""
        with self.transaction() as db:
            images = {r[0] for name in names for r in db.execute(
                "SELECT image_id FROM refs WHERE name=?", (name,))}
            db.executemany("DELETE FROM refs WHERE name=?", [(n,) for n in names])
            for image_id in images:
                self._drop_image_if_unused(image_id)
            return self._orphan_blobs()

    def _drop_image_if_unused(self, image_id: str) -> None:
        """An image with no name and no container goes (rmi --force leaves such images)."""
        if self.db.execute("SELECT 1 FROM refs WHERE image_id=? UNION ALL "
                           "SELECT 1 FROM containers WHERE image_id=?",
                           (image_id, image_id)).fetchone():
            return
        self.db.execute("DELETE FROM images WHERE id=?", (image_id,))

    def _orphan_blobs(self) -> list[Digest]:
        """Blobs nothing references any more, deleted from the table (the caller deletes files)."""
        db = self.db
        orphans = [Digest.parse(r[0]) for r in db.execute(
            """SELECT digest FROM blobs WHERE
                 digest NOT IN (SELECT id FROM images)
             AND digest NOT IN (SELECT config_digest FROM images)
             AND digest NOT IN (SELECT blob_digest FROM image_layers)
             AND digest NOT IN (SELECT index_digest FROM refs WHERE index_digest IS NOT NULL)
            """)]
        db.executemany("DELETE FROM blobs WHERE digest=?", [(str(d),) for d in orphans])
        return orphans

    # layers

    def layer_state(self, chain_id: Digest) -> str | None:
        row = self.db.execute("SELECT state FROM layers WHERE chain_id=?",
                              (str(chain_id),)).fetchone()
        return None if row is None else str(row[0])

    def begin_layer(self, chain_id: Digest, parent: Digest | None, diff_id: Digest,
                    driver: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO layers(chain_id, parent, diff_id, driver, state,"
                       " created) VALUES (?,?,?,?,'creating',?)",
                       (str(chain_id), None if parent is None else str(parent), str(diff_id),
                        driver, time.time()))

    def finish_layers(self, stats: dict[Digest, tuple[int, int]]) -> None:
        """Mark applied (and flushed) layers ready, with their (entries, bytes)."""
        with self.transaction() as db:
            db.executemany("UPDATE layers SET state='ready', entries=?, size=? WHERE chain_id=?",
                           [(e, b, str(c)) for c, (e, b) in stats.items()])

    def delete_layer(self, chain_id: str) -> None:
        self.db.execute("DELETE FROM layers WHERE chain_id=?", (chain_id,))

    # Lists of layers come newest row first, so children come before their parents (a layer's
    # row is always inserted after its parent's): removed in this order, no layer is ever
    # removed under one cloned from it, which zfs refuses.

    def layers_in_state(self, state: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT chain_id FROM layers WHERE state=? ORDER BY rowid DESC", (state,))]

    def layer_rows(self) -> dict[str, str]:
        """Every layer row: chain ID → state, children before parents (see above)."""
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT chain_id, state FROM layers ORDER BY rowid DESC")}

    def unused_layers(self) -> list[str]:
        """Ready layers no image references (images pin every layer of their chain)."""
        return [r[0] for r in self.db.execute(
            "SELECT chain_id FROM layers WHERE state='ready' AND chain_id NOT IN "
            "(SELECT chain_id FROM image_layers) ORDER BY rowid DESC")]

    def layer_referenced(self, chain_id: Digest) -> bool:
        """Whether a recorded image has this layer in its chain."""
        return self.db.execute("SELECT 1 FROM image_layers WHERE chain_id=? LIMIT 1",
                               (str(chain_id),)).fetchone() is not None

    # containers

    def containers(self) -> list[ContainerRow]:
        return [_container(r) for r in self.db.execute(
            _SELECT_CONTAINERS + " ORDER BY created, name")]

    def container(self, name: str) -> ContainerRow | None:
        row = self.db.execute(_SELECT_CONTAINERS + " WHERE name=?", (name,)).fetchone()
        return None if row is None else _container(row)

    def containers_of(self, image_id: Digest) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM containers WHERE image_id=?",
                                              (str(image_id),))]

    def insert_container(self, row: ContainerRow) -> None:
        self.db.execute(
            _INSERT_CONTAINER,
            (row.name, str(row.image_id), row.driver, row.quota, int(row.read_only), row.state,
             row.mount_path, int(row.target), row.created))

    def update_container(self, name: str, **fields: object) -> None:
        allowed = {"state", "mount_path", "target", "quota"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        assignments = ", ".join(f"{key}=?" for key in fields)
        self.db.execute(f"UPDATE containers SET {assignments} WHERE name=?",  # noqa: S608
                        (*fields.values(), name))

    def delete_container(self, name: str) -> list[Digest]:
        """Remove a container's row; its image goes too if rmi --force left it nameless."""
        with self.transaction() as db:
            row = db.execute("SELECT image_id FROM containers WHERE name=?", (name,)).fetchone()
            db.execute("DELETE FROM containers WHERE name=?", (name,))
            if row is not None:
                self._drop_image_if_unused(row[0])
            return self._orphan_blobs()

    # garbage collection

    def referenced_blobs(self) -> set[str]:
        """Every blob an image or a name still needs: manifests, configs, layers, indexes."""
        return {r[0] for r in self.db.execute(
            """SELECT id FROM images UNION SELECT config_digest FROM images
             UNION SELECT blob_digest FROM image_layers
             UNION SELECT index_digest FROM refs WHERE index_digest IS NOT NULL""")}

    def drop_orphan_blobs(self) -> list[Digest]:
        """Delete the rows of blobs nothing references; returns them (the caller deletes files)."""
        with self.transaction():
            return self._orphan_blobs()


_M = TypeVar("_M", bound="Metadata")


def from_thread(meta: _M) -> _M:
    """``meta`` for a trio worker thread: each method call runs on the trio thread and returns
    its result there. Only whole calls cross: ``transaction`` (a block of statements) and
    attributes that are not methods are refused."""
    return cast(_M, _FromThread(meta))


class _FromThread:
    def __init__(self, meta: Metadata) -> None:
        self._meta = meta

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._meta, name)
        if name == "transaction" or not callable(method):
            raise AttributeError(f"{name} cannot be used from a worker thread")

        def call(*args: Any, **kwargs: Any) -> Any:
            return trio.from_thread.run_sync(functools.partial(method, *args, **kwargs))

        return call


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements so each runs inside our transaction.

    ``executescript`` would commit the open transaction first, so a crash mid-migration could
    leave a half-upgraded schema; our migrations have no semicolons inside statements.
    """
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
