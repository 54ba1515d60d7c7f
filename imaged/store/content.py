"""The content store: blobs addressed by digest, written atomically, never trusted unverified.

Layout under ``<root>/content``::

    blobs/<alg>/<hex>     verified blobs, read-only, the only files anything else reads
    ingest/<alg>-<hex>    partial or unverified downloads, kept so a dropped pull can resume

An ingest file is only ever a cache: when it is reopened its bytes are hashed again before a
single new byte is appended, and it becomes a blob only through ``place``, which checks size and
digest and renames it in; ``flush`` then makes a pull's blobs durable (syncfs, then fsync of the
directories) before any metadata row names them. A crash at any point leaves either a verified
blob or an ingest file, never a blob that lies; a blob with no row goes back to ingest at open.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from imaged.digest import Digest, Hasher
from imaged.errors import ContentError, InvalidError
from imaged.fsutil import fsync_dir, syncfs

# An abandoned partial download older than this is removed at open (containerd's ingest expiry).
INGEST_EXPIRY_SECONDS = 24 * 3600
_READ_CHUNK = 4 * 1024 * 1024


class Ingest:
    """One blob being written: appends are hashed as they land, so resume needs no second pass."""

    def __init__(self, path: Path, digest: Digest, size: int) -> None:
        self.path = path
        self.digest = digest
        self.size = size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._hasher: Hasher = digest.hasher()
        self.offset = 0
        self._hashed = 0
        try:
            self._rehash_existing()
        except BaseException:
            os.close(self._fd)
            raise

    def _rehash_existing(self) -> None:
        """Hash what an earlier attempt left; an ingest longer than the blob is garbage."""
        existing = os.fstat(self._fd).st_size
        if existing > self.size:
            self.restart()
            return
        while self.offset < existing:
            chunk = os.pread(self._fd, min(_READ_CHUNK, existing - self.offset), self.offset)
            if not chunk:
                break
            self.absorb(chunk)
            self.offset += len(chunk)
        os.lseek(self._fd, self.offset, os.SEEK_SET)

    @property
    def complete(self) -> bool:
        return self.offset == self.size

    def restart(self) -> None:
        """Throw away everything written: the server ignored our Range, or the bytes were bad."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hasher = self.digest.hasher()
        self.offset = 0
        self._hashed = 0

    def write(self, data: bytes | memoryview) -> None:
        self.append(data)
        self.absorb(data)

    def append(self, data: bytes | memoryview) -> None:
        """Write without hashing, for a pipeline that hashes on another thread through
        ``absorb``; each of the two must see the bytes in order, and ``verify`` waits for both.
        """
        if self.offset + len(data) > self.size:
            raise ContentError(
                f"blob {self.digest} is larger than the {self.size} bytes its descriptor declares"
            )
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.offset += len(data)

    def absorb(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self._hashed += len(data)

    def verify(self) -> None:
        """Check size and digest; a mismatch deletes the bytes so they are never resumed."""
        if self.offset != self.size:
            raise ContentError(
                f"blob {self.digest} is truncated: got {self.offset} of {self.size} bytes"
            )
        if self._hashed != self.offset:
            raise RuntimeError(f"blob {self.digest} verified before all its bytes were hashed")
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            self.restart()
            raise ContentError(
                f"blob {self.digest} failed verification: its bytes hash to "
                f"{self.digest.algorithm}:{actual}"
            )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1



class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.ingest_dir = root / "ingest"
        for d in (self.blobs / "sha256", self.blobs / "sha512", self.ingest_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex

    def has(self, digest: Digest, size: int | None = None) -> bool:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def _ingest_path(self, digest: Digest) -> Path:
        return self.ingest_dir / f"{digest.algorithm}-{digest.hex}"

    def open_ingest(self, digest: Digest, size: int) -> Ingest:
        return Ingest(self._ingest_path(digest), digest, size)

    def place(self, ingest: Ingest) -> Path:
        """Verify a blob and rename it into the store without flushing it; ``flush`` later.

        Concurrent pulls share one download per blob, so the blob must sit at its one final path
        as soon as it is verified: were it left in ingest until each pull's commit, one pull's
        commit would move it away under another still reading it. Until ``flush``, a crash can
        leave a blob file with no row, exactly what recovery at open already moves back to
        ingest to be verified again, so no row may name a placed blob before ``flush``.
        """
        ingest.verify()
        ingest.close()
        target = self.path(ingest.digest)
        os.chmod(ingest.path, 0o444)
        os.rename(ingest.path, target)
        return target

    def flush(self) -> None:
        """Make every placed blob durable: one syncfs and one fsync per algorithm directory,
        however many blobs a pull placed."""
        syncfs(self.blobs)
        for alg_dir in self.blobs.iterdir():
            fsync_dir(alg_dir)

    def ingest_bytes(self, digest: Digest, data: bytes) -> Ingest:
        """A small blob already in memory (manifest, config) as an ingest."""
        ingest = self.open_ingest(digest, len(data))
        try:
            if ingest.offset:
                ingest.restart()
            ingest.write(data)
        except BaseException:
            ingest.close()
            raise
        return ingest

    def write_bytes(self, digest: Digest, data: bytes) -> Path:
        """Place a small blob already in memory through the same checks (durable at the next
        ``flush``, like any placed blob)."""
        if self.has(digest, len(data)):
            return self.path(digest)
        ingest = self.ingest_bytes(digest, data)
        try:
            return self.place(ingest)
        finally:
            ingest.close()

    def read_bytes(self, digest: Digest) -> bytes:
        return self.path(digest).read_bytes()

    def uncommit(self, digest: Digest) -> None:
        """Take a blob back out of the store into ingest, where it will be re-verified before use.

        A failed pull leaves the store as it was, yet the bytes it fetched need not be fetched
        again: they wait in ingest like any partial download.
        """
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(digest), self._ingest_path(digest))

    def remove(self, digest: Digest) -> int:
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def iter_blobs(self) -> Iterator[tuple[Digest, int]]:
        """Every committed blob and its size. A blob removed between the listing and its stat
        (``GET /v1/info`` counts in a thread while gc, ``rmi`` or a failed pull remove) is
        skipped: it is no longer in the store."""
        for alg_dir in self.blobs.iterdir():
            for entry in os.scandir(alg_dir):
                try:
                    digest = Digest.parse(f"{alg_dir.name}:{entry.name}")
                    size = entry.stat().st_size
                except (InvalidError, FileNotFoundError):
                    continue
                yield digest, size

    def partials(self) -> list[tuple[Digest, Path]]:
        """The partial downloads in ingest, by the digest they are becoming."""
        return [(digest, Path(entry.path)) for entry in os.scandir(self.ingest_dir)
                if (digest := _ingest_digest(entry.name)) is not None]

    def expire_ingests(self, now: float | None = None) -> list[Path]:
        """Remove partial downloads nobody resumed for a day, and anything not named like one."""
        now = time.time() if now is None else now
        removed = []
        for entry in os.scandir(self.ingest_dir):
            if _ingest_digest(entry.name) is None or \
                    now - entry.stat().st_mtime > INGEST_EXPIRY_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
        return removed


def _ingest_digest(name: str) -> Digest | None:
    """The digest an ingest file named ``<alg>-<hex>`` is becoming; None for any other name."""
    alg, _, hexpart = name.partition("-")
    try:
        return Digest.parse(f"{alg}:{hexpart}")
    except InvalidError:
        return None
