"""The rules for files a container is likely to write (imaged.ops.writable), and the merge of
layer listings with their whiteouts, from real layer blobs listed by the unpacker's parser."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from imaged.digest import Digest
from imaged.layers.unpack import LayerError, UnpackLimits, list_layer
from imaged.ops.writable import RULES, candidates, image_files, match, volume_for

MIB = 1 << 20
TAR = "application/vnd.oci.image.layer.v1.tar"
LIMITS = UnpackLimits(1 << 34, 100_000)


@pytest.mark.parametrize(("path", "size", "reason", "volume"), [
    ("var/lib/postgresql/15/main/base/1/1259", 8 * MIB, "PostgreSQL data", "/var/lib/postgresql"),
    ("var/lib/mysql/ibdata1", 12 * MIB, "MySQL data", "/var/lib/mysql"),
    ("srv/app/shop.ibd", 2 * MIB, "an InnoDB table", "/srv/app"),
    ("opt/app/state.sqlite", 2 * MIB, "an SQLite database", "/opt/app"),
    ("var/lib/dpkg/status", 2 * MIB, "the dpkg package database (every apt install rewrites it)",
     None),
    ("var/lib/rpm/rpmdb.sqlite", 30 * MIB,
     "the rpm package database (every dnf or yum install rewrites it)", None),
    ("var/log/nginx/access.log", 3 * MIB, "a log (appended to while the container runs)",
     "/var/log"),
    ("var/cache/app/blob", 20 * MIB, "a cache (rewritten as the program runs)", None),
    ("var/lib/app/big.bin", 20 * MIB,
     "a large file under /var/lib, where programs keep data they write", "/var/lib/app"),
    ("data/model.bin", 20 * MIB,
     "a large file under /data, where programs keep data they write", "/data"),
    ("home/ann/video.mkv", 20 * MIB,
     "a large file under /home, where programs keep data they write", "/home/ann"),
])
def test_files_a_container_writes(path: str, size: int, reason: str, volume: str | None) -> None:
    found = match(path, size)
    assert found is not None
    assert (found.path, found.size, found.reason, found.volume) == \
        ("/" + path, size, reason, volume)


@pytest.mark.parametrize(("path", "size"), [
    ("usr/lib/x86_64-linux-gnu/libLLVM.so.15", 100 * MIB),  # large, but nobody writes it
    ("var/lib/dpkg/status", 100 * 1024),  # written, but too small to cost anything
    ("var/lib/app/small.bin", 2 * MIB),  # under a writable directory, below its threshold
    ("usr/share/app.db", 100),
])
def test_files_not_worth_advising_on(path: str, size: int) -> None:
    assert match(path, size) is None


def test_the_first_matching_rule_decides() -> None:
    """A database under /var/lib/postgresql is PostgreSQL data, not "a database file"."""
    found = match("var/lib/postgresql/data/x.db", 2 * MIB)
    assert found is not None and found.reason == "PostgreSQL data"
    assert all(rule.pattern and rule.reason for rule in RULES)


def test_volume_places() -> None:
    assert volume_for("var/lib/redis/dump.rdb", "program") == "/var/lib/redis"
    assert volume_for("tmp/x/y", "whole") == "/tmp"
    assert volume_for("srv/a/b/c.db", "parent") == "/srv/a/b"
    # Directly in a per-program directory: its own directory.
    assert volume_for("var/lib/big.bin", "program") == "/var/lib"


def _blob(tmp_path: Path, name: str, members: list[tuple[str, int | None]]) -> tuple[Path, Digest]:
    """An uncompressed layer: (path, size) regular files, size None for a directory; returns
    the blob and its DiffID."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, size in members:
            info = tarfile.TarInfo(path)
            if size is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = size
                tar.addfile(info, io.BytesIO(b"\0" * size))
    blob = tmp_path / name
    blob.write_bytes(out.getvalue())
    return blob, Digest.of(out.getvalue())


def test_later_layers_hide_earlier_files(tmp_path: Path) -> None:
    base = _blob(tmp_path, "base", [
        ("var/", None), ("var/lib/", None), ("var/lib/mysql/", None),
        ("var/lib/mysql/ibdata1", 2 * MIB), ("var/lib/dpkg/", None),
        ("var/lib/dpkg/status", 2 * MIB), ("var/log/", None), ("var/log/old.log", 2 * MIB),
        ("srv/", None), ("srv/a.db", 2 * MIB)])
    top = _blob(tmp_path, "top", [
        ("var/lib/mysql/.wh.ibdata1", 0),  # a whiteout of one file
        ("var/log/.wh..wh..opq", 0), ("var/log/new.log", 3 * MIB),  # an opaque directory
        (".wh.srv", 0),  # a whiteout of a directory and everything under it
        ("var/lib/dpkg/status", 3 * MIB)])  # replaced, bigger
    listings = [list_layer(blob, TAR, diff_id, LIMITS) for blob, diff_id in (base, top)]
    assert image_files(listings) == {"var/lib/dpkg/status": 3 * MIB,
                                     "var/log/new.log": 3 * MIB}
    assert [c.path for c in candidates(image_files(listings))] == \
        ["/var/lib/dpkg/status", "/var/log/new.log"]


def test_a_listing_checks_the_diff_id(tmp_path: Path) -> None:
    blob, _ = _blob(tmp_path, "base", [("a", 10)])
    with pytest.raises(LayerError, match="not to the DiffID"):
        list_layer(blob, TAR, Digest.of(b"something else"), LIMITS)
