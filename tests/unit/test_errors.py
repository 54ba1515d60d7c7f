"""A failing disk as the user's error: ``os_failure`` for an OSError, ``sqlite_failure`` for the
metadata database (the guest's tests/guest/test_ioerrors.py meets both on real failing disks)."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from imaged.errors import (
    ImagedError,
    NoSpaceError,
    StorageError,
    os_failure,
    reporting_os_errors,
    sqlite_failure,
)
from imaged.fsutil import remove_tree
from imaged.store.metadata import Metadata

EIO, EROFS = os.strerror(errno.EIO), os.strerror(errno.EROFS)


@pytest.mark.parametrize(("exc", "action", "path", "kind", "message"), [
    (OSError(errno.EIO, EIO, "/r/lock"), None, None, StorageError, f"/r/lock: {EIO}"),
    (OSError(errno.EIO, EIO), "writing", "/r/ingest/x", StorageError,
     f"writing /r/ingest/x: {EIO}"),
    (OSError(errno.EROFS, EROFS, "/r/a", None, "/r/b"), None, None, StorageError,
     f"/r/a to /r/b: {EROFS}"),
    (OSError(errno.EROFS, EROFS, "three1"), "removing", "/r/layers/x/three1", StorageError,
     f"removing /r/layers/x/three1: {EROFS}"),  # the caller's whole path, not rmtree's name
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/r/x"), "flushing", None, NoSpaceError,
     f"flushing /r/x: {os.strerror(errno.ENOSPC)}"),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), None, None, NoSpaceError,
     os.strerror(errno.EDQUOT)),
])
def test_os_failure_names_the_operation_the_path_and_the_errno(
        exc: OSError, action: str | None, path: str | None, kind: type[ImagedError],
        message: str) -> None:
    failure = os_failure(exc, action, path)
    assert type(failure) is kind
    assert failure.message == message
    assert failure.code == ("conflict" if kind is NoSpaceError else "internal")
    assert "internal error" not in failure.message


def test_reporting_os_errors_names_the_file_a_descriptor_call_cannot() -> None:
    with pytest.raises(StorageError, match=f"^flushing /r/blobs: {EIO}$") as caught, \
            reporting_os_errors("flushing", "/r/blobs"):
        raise OSError(errno.EIO, EIO)
    assert isinstance(caught.value.__cause__, OSError)


def test_a_file_that_is_not_a_database_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    """A real SQLite failure (SQLITE_NOTADB), as a damaged disk leaves the file."""
    path = tmp_path / "metadata.db"
    path.write_bytes(b"not a database, whatever the disk did to it\n" * 200)
    with pytest.raises(StorageError) as caught:
        Metadata(path)
    assert caught.value.message == (f"the metadata database {path}: file is not a database "
                                    "(SQLITE_NOTADB)")


def _failure(db: sqlite3.Connection, path: Path, *statements: str) -> ImagedError | None:
    """``sqlite_failure`` of the error the last of ``statements`` raises on ``db`` (closed)."""
    try:
        for statement in statements[:-1]:
            db.execute(statement)
        with pytest.raises(sqlite3.Error) as caught:
            db.execute(statements[-1])
    finally:
        db.close()
    return sqlite_failure(caught.value, path)


def test_a_read_only_database_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "db"
    sqlite3.connect(path).close()
    failure = _failure(sqlite3.connect(f"file:{path}?mode=ro", uri=True), path,
                       "CREATE TABLE t (x)")
    assert isinstance(failure, StorageError)
    assert failure.message == (f"the metadata database {path}: attempt to write a readonly "
                               "database (SQLITE_READONLY)")


def test_a_full_database_is_no_space(tmp_path: Path) -> None:
    """SQLITE_FULL, real: the database at its page limit, as a full disk stops it."""
    path = tmp_path / "db"
    failure = _failure(sqlite3.connect(path), path, "CREATE TABLE t (x)",
                       "PRAGMA max_page_count=3", "INSERT INTO t VALUES (zeroblob(100000))")
    assert isinstance(failure, NoSpaceError)
    assert str(path) in failure.message and os.strerror(errno.ENOSPC) in failure.message


def test_an_sql_mistake_stays_a_bug(tmp_path: Path) -> None:
    """Errors of our SQL or our rows are not the disk's: left alone, they are reported as
    internal errors with ``--debug`` tracebacks."""
    db = sqlite3.connect(tmp_path / "db")
    try:
        db.execute("CREATE TABLE t (x PRIMARY KEY)")
        db.execute("INSERT INTO t VALUES (1)")
        for statement in ("INSERT INTO t VALUES (1)", "SELECT nothing FROM t"):
            with pytest.raises(sqlite3.Error) as caught:
                db.execute(statement)
            assert sqlite_failure(caught.value, tmp_path / "db") is None
    finally:
        db.close()


def test_remove_tree_names_the_whole_path_of_what_it_could_not_remove(tmp_path: Path) -> None:
    """rmtree names a failing entry relative to its directory; remove_tree names it whole. The
    entry cannot be removed because its directory is read-only to us, or, for root, because the
    file is immutable (``chattr +i``)."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    inner = tree / "sub" / "kept"
    inner.write_bytes(b"x")
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(inner)], check=True)
    else:
        os.chmod(tree / "sub", 0o500)
    try:
        with pytest.raises(OSError) as caught:
            remove_tree(tree)
        assert caught.value.filename == str(inner), caught.value
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(inner)], check=True)
        else:
            os.chmod(tree / "sub", 0o700)
    remove_tree(tree)
    remove_tree(tree)  # already gone: not an error
    assert not tree.exists()
