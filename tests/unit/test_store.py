"""The content store, the metadata database, the root lock and the store's recovery at open."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from imaged.config import Config
from imaged.digest import Digest, chain_ids
from imaged.errors import (
    ConflictError,
    ContentError,
    InvalidError,
    NotFoundError,
    RootInUseError,
)
from imaged.store.content import INGEST_EXPIRY_SECONDS, ContentStore, Ingest
from imaged.store.lock import RootLock, Waiting
from imaged.store.metadata import MIGRATIONS, LayerRow, Metadata, NewImage, from_thread
from imaged.store.root import Store

DATA = bytes(range(256)) * 40  # 10240 bytes
DATA_DIGEST = Digest.of(DATA)
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture
def content(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


@pytest.fixture
def ingest(content: ContentStore) -> Iterator[Ingest]:
    opened = content.open_ingest(DATA_DIGEST, len(DATA))
    yield opened
    opened.close()


# -- Ingest -------------------------------------------------------------------------------------


def test_content_store_layout(content: ContentStore) -> None:
    for sub in ("blobs/sha256", "blobs/sha512", "ingest"):
        assert (content.root / sub).is_dir()
    assert content.path(DATA_DIGEST) == content.root / "blobs" / "sha256" / DATA_DIGEST.hex


def test_fresh_ingest(ingest: Ingest) -> None:
    assert ingest.offset == 0
    assert not ingest.complete
    assert ingest.path.name == f"sha256-{DATA_DIGEST.hex}"
    assert stat.S_IMODE(ingest.path.stat().st_mode) == 0o600


@pytest.mark.parametrize("split", [1, 100, 5000, len(DATA) - 1])
def test_resume_rehashes_existing_prefix(content: ContentStore, split: int) -> None:
    first = content.open_ingest(DATA_DIGEST, len(DATA))
    first.write(DATA[:split])
    first.close()
    resumed = content.open_ingest(DATA_DIGEST, len(DATA))
    try:
        assert resumed.offset == split
        resumed.write(DATA[split:])
        assert resumed.complete
        resumed.verify()
    finally:
        resumed.close()
    assert resumed.path.read_bytes() == DATA


def test_resume_detects_a_corrupted_prefix(content: ContentStore) -> None:
    first = content.open_ingest(DATA_DIGEST, len(DATA))
    first.write(DATA[:4000])
    first.close()
    # Flip a byte the earlier attempt wrote: the resumed ingest must hash the file's bytes,
    # not trust what it appended before.
    with open(first.path, "r+b") as fh:
        fh.seek(1234)
        fh.write(bytes([DATA[1234] ^ 0xFF]))
    resumed = content.open_ingest(DATA_DIGEST, len(DATA))
    try:
        assert resumed.offset == 4000
        resumed.write(DATA[4000:])
        with pytest.raises(ContentError, match="failed verification"):
            resumed.verify()
        assert resumed.offset == 0
    finally:
        resumed.close()
    assert resumed.path.stat().st_size == 0


def test_ingest_longer_than_blob_starts_over(content: ContentStore) -> None:
    path = content.ingest_dir / f"sha256-{DATA_DIGEST.hex}"
    path.write_bytes(DATA + b"extra")
    opened = content.open_ingest(DATA_DIGEST, len(DATA))
    try:
        assert opened.offset == 0
        assert path.stat().st_size == 0
        opened.write(DATA)
        opened.verify()
    finally:
        opened.close()


def test_write_beyond_size_is_refused(ingest: Ingest) -> None:
    ingest.write(DATA[:-10])
    with pytest.raises(ContentError) as info:
        ingest.write(DATA[-10:] + b"x")
    assert info.value.message == (f"blob {DATA_DIGEST} is larger than the {len(DATA)} bytes its "
                                  "descriptor declares")
    assert ingest.offset == len(DATA) - 10
    assert ingest.path.stat().st_size == len(DATA) - 10
    ingest.write(DATA[-10:])
    ingest.verify()


def test_write_accepts_memoryview(ingest: Ingest) -> None:
    ingest.write(memoryview(DATA)[:5000])
    ingest.write(memoryview(DATA)[5000:])
    ingest.verify()


def test_append_and_absorb_split_writing_from_hashing(ingest: Ingest) -> None:
    """The download pipeline writes on one thread and hashes on another: verify must not pass
    until the hasher has caught up, and then must judge every byte."""
    ingest.append(DATA[:6000])
    ingest.append(DATA[6000:])
    ingest.absorb(DATA[:6000])
    with pytest.raises(RuntimeError, match="before all its bytes were hashed"):
        ingest.verify()
    ingest.absorb(DATA[6000:])
    ingest.verify()


def test_absorbed_bytes_decide_the_digest(ingest: Ingest) -> None:
    ingest.append(DATA)
    ingest.absorb(bytes(len(DATA)))
    with pytest.raises(ContentError, match="failed verification"):
        ingest.verify()


@pytest.mark.parametrize("written", [0, 1, len(DATA) - 1])
def test_verify_truncated(ingest: Ingest, written: int) -> None:
    ingest.write(DATA[:written])
    with pytest.raises(ContentError) as info:
        ingest.verify()
    assert info.value.message == (f"blob {DATA_DIGEST} is truncated: got {written} of "
                                  f"{len(DATA)} bytes")
    assert ingest.offset == written  # a short blob can still be resumed


def test_verify_mismatch_restarts(ingest: Ingest) -> None:
    wrong = bytes(len(DATA))
    ingest.write(wrong)
    with pytest.raises(ContentError) as info:
        ingest.verify()
    assert f"blob {DATA_DIGEST} failed verification" in info.value.message
    assert f"sha256:{Digest.of(wrong).hex}" in info.value.message
    assert ingest.offset == 0
    assert not ingest.complete
    assert ingest.path.stat().st_size == 0
    # The same ingest can take the right bytes afterwards.
    ingest.write(DATA)
    ingest.verify()


def test_restart_forgets_everything(ingest: Ingest) -> None:
    ingest.write(b"garbage")
    ingest.restart()
    assert ingest.offset == 0
    ingest.write(DATA)
    ingest.verify()
    assert ingest.path.read_bytes() == DATA


def test_place_makes_a_read_only_blob(content: ContentStore, ingest: Ingest) -> None:
    ingest.write(DATA)
    path = content.place(ingest)
    assert path == content.path(DATA_DIGEST)
    assert path.read_bytes() == DATA
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert list(content.ingest_dir.iterdir()) == []
    assert content.has(DATA_DIGEST)
    assert content.has(DATA_DIGEST, len(DATA))
    assert not content.has(DATA_DIGEST, len(DATA) + 1)
    assert content.read_bytes(DATA_DIGEST) == DATA
    assert list(content.iter_blobs()) == [(DATA_DIGEST, len(DATA))]


def test_place_refuses_bad_bytes(content: ContentStore, ingest: Ingest) -> None:
    ingest.write(DATA[:100])
    with pytest.raises(ContentError, match="truncated"):
        content.place(ingest)
    assert not content.has(DATA_DIGEST)
    assert ingest.path.exists()


def test_sha512_blob(content: ContentStore) -> None:
    digest = Digest.of(DATA, "sha512")
    path = content.write_bytes(digest, DATA)
    assert path == content.root / "blobs" / "sha512" / digest.hex
    assert (digest, len(DATA)) in list(content.iter_blobs())


def test_write_bytes_is_idempotent_and_checked(content: ContentStore) -> None:
    first = content.write_bytes(DATA_DIGEST, DATA)
    assert content.write_bytes(DATA_DIGEST, DATA) == first
    with pytest.raises(ContentError, match="failed verification"):
        content.write_bytes(Digest.of(b"other"), b"OTHER")
    assert not content.has(Digest.of(b"other"))


def test_uncommit_moves_the_blob_back_to_ingest(content: ContentStore) -> None:
    content.write_bytes(DATA_DIGEST, DATA)
    content.uncommit(DATA_DIGEST)
    assert not content.has(DATA_DIGEST)
    ingest_path = content.ingest_dir / f"sha256-{DATA_DIGEST.hex}"
    assert ingest_path.read_bytes() == DATA
    # Resuming finds every byte already there, re-hashed.
    reopened = content.open_ingest(DATA_DIGEST, len(DATA))
    try:
        assert reopened.complete
        reopened.verify()
        content.place(reopened)
    finally:
        reopened.close()
    assert content.has(DATA_DIGEST, len(DATA))


def test_uncommit_of_a_missing_blob_is_a_no_op(content: ContentStore) -> None:
    content.uncommit(DATA_DIGEST)
    assert list(content.ingest_dir.iterdir()) == []


def test_remove(content: ContentStore) -> None:
    content.write_bytes(DATA_DIGEST, DATA)
    assert content.remove(DATA_DIGEST) == len(DATA)
    assert not content.has(DATA_DIGEST)
    assert content.remove(DATA_DIGEST) == 0


def test_iter_blobs_skips_misnamed_files(content: ContentStore) -> None:
    content.write_bytes(DATA_DIGEST, DATA)
    (content.blobs / "sha256" / "not-a-digest").write_bytes(b"x")
    (content.blobs / "sha256" / ("A" * 64)).write_bytes(b"x")
    (content.blobs / "sha512" / ("0" * 64)).write_bytes(b"x")
    assert list(content.iter_blobs()) == [(DATA_DIGEST, len(DATA))]


def test_expire_ingests(content: ContentStore) -> None:
    now = 2_000_000_000.0
    hexes = {name: Digest.of(name.encode()).hex for name in ("fresh", "old", "edge", "edge2")}
    files = {
        "fresh": (f"sha256-{hexes['fresh']}", now - 60),
        "old": (f"sha256-{hexes['old']}", now - INGEST_EXPIRY_SECONDS - 3600),
        "edge": (f"sha256-{hexes['edge']}", now - INGEST_EXPIRY_SECONDS),
        "just_over": (f"sha256-{hexes['edge2']}", now - INGEST_EXPIRY_SECONDS - 1),
        "sha512": (f"sha512-{'0' * 128}", now - 60),
        "misnamed": ("garbage", now),
        "short": ("sha256-abc", now),
        "colon": (f"sha256:{hexes['fresh']}", now),
        "md5": (f"md5-{'0' * 32}", now),
        "upper": (f"sha256-{hexes['fresh'].upper()}", now),
    }
    for name, mtime in files.values():
        path = content.ingest_dir / name
        path.write_bytes(b"partial")
        os.utime(path, (mtime, mtime))
    removed = content.expire_ingests(now)
    expected_removed = {files[k][0] for k in ("old", "just_over", "misnamed", "short", "colon",
                                              "md5", "upper")}
    assert {p.name for p in removed} == expected_removed
    assert all(p.parent == content.ingest_dir for p in removed)
    assert {p.name for p in content.ingest_dir.iterdir()} == {
        files[k][0] for k in ("fresh", "edge", "sha512")}


def test_expire_ingests_uses_the_clock(content: ContentStore) -> None:
    path = content.ingest_dir / f"sha256-{DATA_DIGEST.hex}"
    path.write_bytes(b"x")
    assert content.expire_ingests() == []
    old = time.time() - INGEST_EXPIRY_SECONDS - 10
    os.utime(path, (old, old))
    assert content.expire_ingests() == [path]
    assert not path.exists()


# -- Metadata -----------------------------------------------------------------------------------


def d(n: int) -> Digest:
    return Digest.parse(f"sha256:{n:064x}")


def new_image(ref: str, image: Digest, config: Digest, layers: list[Digest],
              index: Digest | None = None) -> NewImage:
    diff_ids = [Digest.of(f"diff {layer}".encode()) for layer in layers]
    chains = chain_ids(diff_ids)
    rows = tuple(LayerRow(i, layer, diff_ids[i], chains[i], GZIP, 1000 + i)
                 for i, layer in enumerate(layers))
    blobs = [(image, 300, OCI_MANIFEST), (config, 200, OCI_CONFIG)]
    blobs += [(layer, 1000 + i, GZIP) for i, layer in enumerate(layers)]
    if index is not None:
        blobs.append((index, 400, OCI_INDEX))
    return NewImage(ref=ref, id=image, media_type=OCI_MANIFEST, config_digest=config,
                    platform="linux/amd64", index_digest=index, layers=rows,
                    blobs=tuple(blobs))


@pytest.fixture
def meta(tmp_path: Path) -> Iterator[Metadata]:
    db = Metadata(tmp_path / "metadata.db")
    yield db
    db.close()


def test_fresh_database_reaches_the_latest_schema(meta: Metadata) -> None:
    assert meta.version == len(MIGRATIONS)
    tables = {r[0] for r in meta.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"settings", "blobs", "images", "image_layers", "refs"} <= tables
    assert meta.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert meta.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    first = Metadata(tmp_path / "m.db")
    first.set_setting("driver", "overlay")
    first.close()
    again = Metadata(tmp_path / "m.db")
    try:
        assert again.version == len(MIGRATIONS)
        assert again.get_setting("driver") == "overlay"
        assert again.get_setting("absent") is None
    finally:
        again.close()


@pytest.mark.parametrize("ahead", [1, 5])
def test_newer_schema_is_refused(tmp_path: Path, ahead: int) -> None:
    path = tmp_path / "m.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + ahead}")
    db.commit()
    db.close()
    with pytest.raises(ConflictError) as info:
        Metadata(path)
    assert f"schema version {len(MIGRATIONS) + ahead}" in info.value.message
    assert f"understands ({len(MIGRATIONS)})" in info.value.message
    assert "upgrade imaged" in info.value.message
    # Nothing was changed in the database it refused.
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + ahead
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    finally:
        db.close()


def test_failed_transaction_rolls_back(meta: Metadata) -> None:
    with pytest.raises(RuntimeError), meta.transaction() as db:
        db.execute("INSERT INTO settings(key, value) VALUES ('a', 'b')")
        raise RuntimeError("boom")
    assert meta.get_setting("a") is None


def test_record_image_and_list(meta: Metadata) -> None:
    image = new_image("docker.io/library/a:1", d(1), d(2), [d(10), d(11)], index=d(3))
    meta.record_image(image)
    [row] = meta.images()
    assert row.id == d(1)
    assert row.config_digest == d(2)
    assert row.platform == "linux/amd64"
    assert row.media_type == OCI_MANIFEST
    assert row.refs == ("docker.io/library/a:1",)
    assert row.layers == image.layers
    assert row.size == 300 + 200 + 1000 + 1001  # the index is not part of the image's size
    assert meta.image(d(1)) == row
    assert meta.image(d(99)) is None
    assert meta.ref_target("docker.io/library/a:1") == d(1)
    assert meta.ref_target("docker.io/library/a:2") is None
    assert meta.blob_digests() == {str(x) for x in (d(1), d(2), d(3), d(10), d(11))}


def test_second_ref_to_the_same_image(meta: Metadata) -> None:
    meta.record_image(new_image("r/a:1", d(1), d(2), [d(10)]))
    meta.record_image(new_image("r/a:latest", d(1), d(2), [d(10)]))
    [row] = meta.images()
    assert row.refs == ("r/a:1", "r/a:latest")
    assert len(row.layers) == 1


def test_ref_moves_to_a_new_image(meta: Metadata) -> None:
    meta.record_image(new_image("r/a:latest", d(1), d(2), [d(10)]))
    meta.record_image(new_image("r/a:latest", d(4), d(5), [d(10), d(11)]))
    assert meta.ref_target("r/a:latest") == d(4)
    assert {row.id: row.refs for row in meta.images()} == {d(1): (), d(4): ("r/a:latest",)}


def test_remove_refs_returns_only_unshared_blobs(meta: Metadata) -> None:
    meta.record_image(new_image("r/a:1", d(1), d(2), [d(10), d(11)], index=d(3)))
    meta.record_image(new_image("r/b:1", d(4), d(5), [d(10), d(12)]))
    orphans = meta.remove_refs(["r/a:1"])
    # d(10) is b's base layer too: it stays.
    assert set(orphans) == {d(1), d(2), d(3), d(11)}
    assert [row.id for row in meta.images()] == [d(4)]
    assert meta.blob_digests() == {str(x) for x in (d(4), d(5), d(10), d(12))}
    assert set(meta.remove_refs(["r/b:1"])) == {d(4), d(5), d(10), d(12)}
    assert meta.images() == []
    assert meta.blob_digests() == set()


def test_remove_one_of_two_refs_keeps_the_image(meta: Metadata) -> None:
    meta.record_image(new_image("r/a:1", d(1), d(2), [d(10)]))
    meta.record_image(new_image("r/a:latest", d(1), d(2), [d(10)]))
    assert meta.remove_refs(["r/a:1"]) == []
    assert meta.images()[0].refs == ("r/a:latest",)
    assert set(meta.remove_refs(["r/a:latest"])) == {d(1), d(2), d(10)}


def test_shared_config_and_index_survive(meta: Metadata) -> None:
    meta.record_image(new_image("r/a:amd64", d(1), d(2), [d(10)], index=d(3)))
    meta.record_image(new_image("r/a:other", d(4), d(2), [d(11)], index=d(3)))
    assert set(meta.remove_refs(["r/a:amd64"])) == {d(1), d(10)}


def test_remove_several_refs_at_once(meta: Metadata) -> None:
    meta.record_image(new_image("r/a:1", d(1), d(2), [d(10)]))
    meta.record_image(new_image("r/b:1", d(4), d(5), [d(10)]))
    assert set(meta.remove_refs(["r/a:1", "r/b:1", "r/absent:1"])) == {d(1), d(2), d(4), d(5),
                                                                      d(10)}


def test_remove_unknown_ref(meta: Metadata) -> None:
    meta.record_image(new_image("r/a:1", d(1), d(2), [d(10)]))
    assert meta.remove_refs(["r/nope:1"]) == []
    assert meta.remove_refs([]) == []
    assert len(meta.images()) == 1


def test_ids_with_prefix(meta: Metadata) -> None:
    meta.record_image(new_image("r/a:1", d(0xABC1), d(2), []))
    meta.record_image(new_image("r/b:1", d(0xABC2), d(5), []))
    assert sorted(meta.ids_with_prefix("0" * 60)) == [d(0xABC1), d(0xABC2)]
    assert sorted(meta.ids_with_prefix("0" * 60 + "abc")) == [d(0xABC1), d(0xABC2)]
    assert meta.ids_with_prefix("0" * 60 + "abc2") == [d(0xABC2)]
    assert meta.ids_with_prefix(f"{0xABC1:064x}") == [d(0xABC1)]
    assert meta.ids_with_prefix("f") == []


# -- RootLock -----------------------------------------------------------------------------------


def test_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = RootLock(tmp_path / "lock", "imaged pull")
    try:
        with pytest.raises(RootInUseError) as info:
            RootLock(tmp_path / "lock", "imaged images")
        assert info.value.message == f"root is in use by imaged pull (pid {os.getpid()})"
        assert isinstance(info.value, ConflictError)
        assert info.value.code == "conflict"
    finally:
        first.release()


def test_server_holder_gets_a_hint(tmp_path: Path) -> None:
    first = RootLock(tmp_path / "lock", "imaged serve")
    try:
        with pytest.raises(RootInUseError, match=r"in use by imaged serve \(pid \d+\); use its "
                                                 "socket"):
            RootLock(tmp_path / "lock", "imaged images")
    finally:
        first.release()


def test_released_lock_can_be_taken_again(tmp_path: Path) -> None:
    first = RootLock(tmp_path / "lock", "imaged pull")
    assert (tmp_path / "lock").read_text().rstrip(" ") == f"{os.getpid()}\nimaged pull\n"
    first.release()
    first.release()  # twice is harmless
    second = RootLock(tmp_path / "lock", "imaged rmi")
    try:
        assert (tmp_path / "lock").read_text().rstrip(" ") == f"{os.getpid()}\nimaged rmi\n"
    finally:
        second.release()


def test_the_holders_record_is_rewritten_in_place(tmp_path: Path) -> None:
    """Always the same size, so naming a holder on a full disk needs no new block."""
    sizes = set()
    for holder in ("imaged pull", "imaged gc", "x" * 500):
        RootLock(tmp_path / "lock", holder).release()
        sizes.add((tmp_path / "lock").stat().st_size)
    assert sizes == {256}


def test_a_command_waits_for_another_and_says_who(tmp_path: Path) -> None:
    first = RootLock(tmp_path / "lock", "imaged pull")
    heard: list[str] = []
    releaser = threading.Timer(0.5, first.release)
    releaser.start()
    try:
        second = RootLock(tmp_path / "lock", "imaged ps", Waiting(60, heard.append))
    finally:
        releaser.join()
    second.release()
    assert heard == [f"waiting for the root: root is in use by imaged pull (pid {os.getpid()})"]


def test_waiting_is_bounded(tmp_path: Path) -> None:
    first = RootLock(tmp_path / "lock", "imaged pull")
    try:
        with pytest.raises(RootInUseError, match=r"imaged pull \(pid \d+\) \(waited 0.3 s\)"):
            RootLock(tmp_path / "lock", "imaged ps", Waiting(0.3, lambda line: None))
    finally:
        first.release()


def test_a_daemon_is_never_waited_for(tmp_path: Path) -> None:
    first = RootLock(tmp_path / "lock", "imaged serve")
    heard: list[str] = []
    try:
        with pytest.raises(RootInUseError, match="use its socket"):
            RootLock(tmp_path / "lock", "imaged ps", Waiting(60, heard.append))
    finally:
        first.release()
    assert heard == []


def test_refused_lock_leaves_the_holder_s_file_alone(tmp_path: Path) -> None:
    first = RootLock(tmp_path / "lock", "imaged pull")
    try:
        with pytest.raises(RootInUseError):
            RootLock(tmp_path / "lock", "imaged images")
        assert (tmp_path / "lock").read_text().rstrip(" ") == f"{os.getpid()}\nimaged pull\n"
    finally:
        first.release()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", ["another imaged", "(pid ?)"]),
        (b"garbage", ["another imaged", "(pid ?)"]),
        (b"1234\n", ["another imaged", "(pid 1234)"]),
        (b"1234\n\n", ["another imaged", "(pid 1234)"]),
        (b"\xff\xfe\nimaged pull\n", ["imaged pull", "(pid ?)"]),
    ],
)
def test_lock_held_by_someone_who_wrote_little(tmp_path: Path, content: bytes,
                                               words: list[str]) -> None:
    path = tmp_path / "lock"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RootInUseError) as info:
            RootLock(path, "imaged images")
        for word in words:
            assert word in info.value.message
    finally:
        os.close(fd)


# -- Store --------------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(root=tmp_path / "root")


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    opened = Store(config, "imaged test")
    yield opened
    opened.close()


def test_store_creates_its_root(store: Store, config: Config) -> None:
    assert store.root == config.root
    assert (config.root / "lock").exists()
    assert (config.root / "metadata.db").exists()
    assert (config.root / "content" / "blobs" / "sha256").is_dir()
    assert store.recovered == []
    assert store.content_usage() == (0, 0)


def test_second_store_on_the_same_root_is_refused(store: Store, config: Config) -> None:
    with pytest.raises(RootInUseError, match="in use by imaged test"):
        Store(config, "imaged other")


def test_store_can_be_reopened_after_close(config: Config) -> None:
    Store(config, "first").close()
    Store(config, "second").close()


def test_recover_moves_unrecorded_blobs_back_to_ingest(config: Config) -> None:
    first = Store(config, "imaged test")
    recorded = Digest.of(b"recorded")
    first.content.write_bytes(recorded, b"recorded")
    first.meta.record_image(NewImage(
        ref="docker.io/library/a:1", id=recorded, media_type=OCI_MANIFEST,
        config_digest=recorded, platform="linux/amd64", index_digest=None, layers=(),
        blobs=((recorded, 8, OCI_MANIFEST),)))
    # A crash between commit and record: a blob file without a row.
    orphan = Digest.of(b"orphan")
    first.content.write_bytes(orphan, b"orphan")
    first.close()

    second = Store(config, "imaged test")
    try:
        assert second.recovered == [f"blob {orphan} had no record; moved back to ingest"]
        assert not second.content.has(orphan)
        assert second.content.has(recorded)
        assert (second.content.ingest_dir / f"sha256-{orphan.hex}").read_bytes() == b"orphan"
        assert second.content_usage() == (1, 8)
    finally:
        second.close()


def test_recover_removes_stale_partial_downloads(config: Config) -> None:
    Store(config, "imaged test").close()
    ingest_dir = config.root / "content" / "ingest"
    stale = ingest_dir / f"sha256-{DATA_DIGEST.hex}"
    stale.write_bytes(b"partial")
    old = time.time() - INGEST_EXPIRY_SECONDS - 60
    os.utime(stale, (old, old))
    fresh = ingest_dir / f"sha256-{Digest.of(b'x').hex}"
    fresh.write_bytes(b"partial")
    (ingest_dir / "stray").write_bytes(b"?")
    reopened = Store(config, "imaged test")
    try:
        assert sorted(reopened.recovered) == sorted([
            f"removed stale partial download {stale.name}",
            "removed stale partial download stray",
        ])
        assert {p.name for p in ingest_dir.iterdir()} == {fresh.name}
    finally:
        reopened.close()


def test_failed_open_releases_the_lock(config: Config) -> None:
    config.root.mkdir(parents=True)
    db = sqlite3.connect(config.root / "metadata.db")
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(ConflictError, match="upgrade imaged"):
        Store(config, "imaged test")
    lock = RootLock(config.root / "lock", "someone else")  # the failed open let go of it
    lock.release()


# -- resolve_image ------------------------------------------------------------------------------

ID_A = Digest.parse("sha256:abcdef123456" + "0" * 52)
ID_B = Digest.parse("sha256:abcdef123456" + "1" * 52)
ID_C = Digest.parse("sha256:" + "fedcba987654" * 5 + "3210")


@pytest.fixture
def images(store: Store) -> Store:
    for ref, image in (("docker.io/library/alpine:latest", ID_A),
                       ("quay.io/org/app:v1", ID_B),
                       ("localhost:5000/x:latest", ID_C)):
        store.meta.record_image(new_image(ref, image, d(int(image.hex[-4:], 16) + 7), [d(10)]))
    return store


@pytest.mark.parametrize(
    ("text", "image", "name"),
    [
        (str(ID_A), ID_A, None),
        (ID_A.hex, ID_A, None),
        ("abcdef1234560", ID_A, None),
        ("sha256:abcdef1234561", ID_B, None),
        ("fedcba987654", ID_C, None),
        ("sha256:fedcba987654", ID_C, None),
        (ID_C.hex, ID_C, None),
        ("alpine", ID_A, "docker.io/library/alpine:latest"),
        ("alpine:latest", ID_A, "docker.io/library/alpine:latest"),
        ("docker.io/library/alpine", ID_A, "docker.io/library/alpine:latest"),
        ("index.docker.io/alpine", ID_A, "docker.io/library/alpine:latest"),
        ("quay.io/org/app:v1", ID_B, "quay.io/org/app:v1"),
        ("localhost:5000/x", ID_C, "localhost:5000/x:latest"),
    ],
)
def test_resolve_image(images: Store, text: str, image: Digest, name: str | None) -> None:
    assert images.resolve_image(text) == (image, name)


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("abcdef123456", ConflictError, ["'abcdef123456' is ambiguous", "matches 2 images",
                                         "more digits"]),
        ("sha256:abcdef123456", ConflictError, ["ambiguous"]),
        ("abcdef12345", InvalidError, ["too short", "at least 12 hex digits"]),
        ("sha256:abc", InvalidError, ["too short"]),
        ("a", InvalidError, ["too short"]),
        ("sha256:" + "9" * 12, NotFoundError, ["no image with ID sha256:999999999999"]),
        ("sha256:" + "9" * 64, NotFoundError, ["no image with ID"]),
        # A full image ID can never be a name: unknown is "not found", not "invalid reference".
        ("9" * 64, NotFoundError, ["no image with ID"]),
        # Twelve hex digits may also be a repository name: not found either way.
        ("999999999999", NotFoundError, ["no image docker.io/library/999999999999:latest",
                                         "pull it first"]),
        ("busybox", NotFoundError, ["no image docker.io/library/busybox:latest"]),
        ("alpine:3", NotFoundError, ["no image docker.io/library/alpine:3"]),
        ("Alpine", InvalidError, ["lowercase"]),
        # Not hex in lower case, so not an ID: Docker reads it as repository "sha256", a tag.
        ("sha256:" + "A" * 12, NotFoundError, ["no image docker.io/library/sha256:AAAAAAAAAAAA"]),
    ],
)
def test_resolve_image_refuses(images: Store, text: str, error: type[Exception],
                               words: list[str]) -> None:
    with pytest.raises(error) as info:
        images.resolve_image(text)
    assert type(info.value) is error
    for word in words:
        assert word in str(info.value), str(info.value)


def test_image_row_by_reference(images: Store) -> None:
    row = images.image("quay.io/org/app:v1")
    assert row.id == ID_B
    assert row.refs == ("quay.io/org/app:v1",)


def test_blobs_removed_while_listed_are_skipped(content: ContentStore) -> None:
    """``GET /v1/info`` counts blobs in a thread while gc or ``rmi`` remove them on the event
    loop: a blob gone between the listing and its stat is not counted, and nothing raises."""
    digests = [Digest.of(bytes([i])) for i in range(3)]
    for i, digest in enumerate(digests):
        content.write_bytes(digest, bytes([i]))
    listing = content.iter_blobs()
    first, _ = next(listing)  # the directory is read; the other two are not stat'ed yet
    gone = next(d for d in digests if d != first)
    content.remove(gone)
    rest = [digest for digest, _ in listing]
    assert gone not in rest
    assert sorted(map(str, [first, *rest])) == sorted(str(d) for d in digests if d != gone)


class _Where(Metadata):
    def where(self) -> int:
        return threading.get_ident()


def test_metadata_from_a_worker_thread_runs_on_the_trio_thread(tmp_path: Path) -> None:
    """A worker's calls through ``from_thread`` run on the trio thread, which owns the
    connection; a transaction (a block of statements) cannot cross, nor an attribute."""
    meta = _Where(tmp_path / "metadata.db")

    def worker() -> tuple[int, int, str | None]:
        through = from_thread(meta)
        through.set_setting("driver", "vfs")
        with pytest.raises(AttributeError, match="worker thread"):
            through.transaction()
        with pytest.raises(AttributeError, match="worker thread"):
            through.path  # noqa: B018 - the refusal is what is tested
        return threading.get_ident(), through.where(), through.get_setting("driver")

    async def main() -> tuple[int, tuple[int, int, str | None]]:
        return threading.get_ident(), await trio.to_thread.run_sync(worker)

    try:
        loop, (worker_thread, ran_on, value) = trio.run(main)
    finally:
        meta.close()
    assert (ran_on, value) == (loop, "vfs")
    assert worker_thread != loop
