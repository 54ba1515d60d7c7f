"""A root directory opened for use: its lock, content store and metadata, recovered on open.

Opening is where crashes are repaired (DESIGN §2), so every command starts from a consistent
store: blob files with no metadata row (a crash between commit and record) go back to ingest,
where they are verified again before anyone uses them; stale partial downloads expire.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from imaged.config import Config
from imaged.content import ContentStore
from imaged.digest import Digest
from imaged.errors import ConflictError, InvalidError, NotFoundError
from imaged.lock import RootLock
from imaged.metadata import ImageRow, Metadata
from imaged.registry_client.reference import parse_reference

_ID_PREFIX_RE = re.compile(r"(?:sha256:)?([0-9a-f]{12,64})")
MIN_ID_PREFIX = 12


class Store:
    def __init__(self, config: Config, holder: str) -> None:
        self.config = config
        self.root = config.root
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.lock = RootLock(self.root / "lock", holder)
        try:
            self.content = ContentStore(self.root / "content")
            self.meta = Metadata(self.root / "metadata.db")
            self.recovered = self.recover()
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        self.meta.close()
        self.lock.release()

    def recover(self) -> list[str]:
        """Repair what an interrupted process left; returns a line per repair for the logs."""
        notes = []
        known = self.meta.blob_digests()
        for digest, _ in list(self.content.iter_blobs()):
            if str(digest) not in known:
                self.content.uncommit(digest)
                notes.append(f"blob {digest} had no record; moved back to ingest")
        for path in self.content.expire_ingests():
            notes.append(f"removed stale partial download {path.name}")
        return notes

    def resolve_image(self, text: str) -> tuple[Digest, str | None]:
        """An image by unique ID prefix (≥ 12 hex digits, optionally ``sha256:``) or by reference.

        Returns the image ID and, when ``text`` was a reference, its normalized name.
        """
        match = _ID_PREFIX_RE.fullmatch(text)
        if match is not None:
            found = self.meta.ids_with_prefix(match[1])
            if len(found) == 1:
                return found[0], None
            if len(found) > 1:
                raise ConflictError(f"image ID prefix {text!r} is ambiguous: it matches "
                                    f"{len(found)} images; give more digits")
            if text.startswith("sha256:") or len(match[1]) == 64:
                raise NotFoundError(f"no image with ID {text}")
        elif re.fullmatch(r"(?:sha256:)?[0-9a-f]{1,11}", text):
            raise InvalidError(f"image ID prefix {text!r} is too short: give at least "
                               f"{MIN_ID_PREFIX} hex digits")
        ref = parse_reference(text)
        target = self.meta.ref_target(str(ref))
        if target is None:
            raise NotFoundError(f"no image {ref} in this store (pull it first)")
        return target, str(ref)

    def image(self, text: str) -> ImageRow:
        row = self.meta.image(self.resolve_image(text)[0])
        if row is None:  # pragma: no cover - resolve_image only returns recorded IDs
            raise NotFoundError(f"no image {text}")
        return row

    def content_usage(self) -> tuple[int, int]:
        count = total = 0
        for _, size in self.content.iter_blobs():
            count += 1
            total += size
        return count, total


def backing_filesystem(path: Path) -> tuple[str, str]:
    """(fstype, mount point) of the filesystem holding ``path``, from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    best = ("unknown", "/")
    best_len = -1
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        mount_point = fields[4].encode().decode("unicode_escape")
        fstype = fields[sep + 1]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # Later lines win on ties: they are mounted on top of earlier ones.
        if inside and len(mount_point) >= best_len:
            best, best_len = (fstype, mount_point), len(mount_point)
    return best
