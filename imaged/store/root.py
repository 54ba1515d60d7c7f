"""A root directory opened for use: its lock, content store and metadata, recovered on open.

Opening is where crashes are repaired (DESIGN §2), so every command starts from a consistent
store: blob files with no metadata row (a crash between commit and record) go back to ingest,
where they are verified again before anyone uses them; stale partial downloads expire.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import trio

from imaged.config import Config
from imaged.digest import Digest
from imaged.drivers import Capabilities, Driver, choose, registry
from imaged.errors import ConflictError, ImagedError, InvalidError, NotFoundError
from imaged.fsutil import syncfs
from imaged.host.mounts import backing_filesystem, is_mounted
from imaged.registry_client.reference import parse_reference
from imaged.store import reserve
from imaged.store.content import ContentStore
from imaged.store.lock import RootDeniedError, RootLock, Waiting
from imaged.store.metadata import ImageRow, Metadata, Target

_ID_PREFIX_RE = re.compile(r"(?:sha256:)?([0-9a-f]{12,64})")
MIN_ID_PREFIX = 12


def why_layer_stays(driver: Driver, key: str) -> str | None:
    """Remove a layer nothing wants; None when it went, else why it could not (busy,
    immutable, an I/O error). Recovery and gc name such a layer and leave it for the next open
    or gc, rather than failing the whole command: its row is gone already."""
    try:
        driver.remove_layer(key)
    except (OSError, ImagedError) as exc:
        return str(getattr(exc, "strerror", None) or exc)
    return None


def _removing_layer(driver: Driver, key: str, what: str) -> str:
    why = why_layer_stays(driver, key)
    return f"removed {what}" if why is None else f"could not remove {what}: {why}"


class Store:
    def __init__(self, config: Config, holder: str, waiting: Waiting | None = None) -> None:
        self.config = config
        self.root = config.root
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        except PermissionError:
            raise RootDeniedError(f"permission denied on {self.root}: only root may use this "
                                  "root") from None
        self.lock = RootLock(self.root / "lock", holder, waiting)
        self._driver: Driver | None = None
        try:
            if not reserve.release_if_full(self.root):
                reserve.renew(self.root)  # a daemon may hold the root long before it fills
            self.content = ContentStore(self.root / "content")
            self.meta = Metadata(self.root / "metadata.db")
        except BaseException:
            self.lock.release()
            raise
        try:
            self.recovered = self.recover()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the database and the lock whatever the disk does meanwhile: a connection
        or lock left open keeps the filesystem busy, so an operator cannot even unmount it to
        check it. Renewing the reserve is best effort (``reserve.renew``): a disk failing now
        must not hide the command's own result or error."""
        try:
            self.meta.close()
            with contextlib.suppress(OSError):
                reserve.renew(self.root)
        finally:
            self.lock.release()

    def flush_records(self) -> None:
        """Make the metadata's last commits durable before they are acknowledged: in WAL mode
        with ``synchronous=NORMAL`` SQLite syncs only at checkpoints, so one syncfs of the
        root (the WAL is a file on it) does what a sync per commit would, and a disk that
        failed the writes says so here (``StorageError``) instead of after the command
        returned."""
        syncfs(self.root)

    def make_room(self) -> None:
        """Before a command that frees space: on a full filesystem, give back the reserve."""
        reserve.release_if_full(self.root)

    def driver(self) -> Driver:
        """The root's driver, chosen and recorded at first use (one root, one driver)."""
        if self._driver is None:
            return self.adopt_driver(self.make_driver(self.meta.get_setting("driver")))
        return self._driver

    async def open_driver(self) -> Driver:
        """``driver()`` for the event loop: opening a driver probes the root, makes its
        directories and tests what the filesystem can do (vfs writes a file to try a reflink),
        so the first opening runs in a worker thread; the metadata stays on the loop."""
        if self._driver is None:
            recorded = self.meta.get_setting("driver")

            def make() -> Driver:
                driver = self.make_driver(recorded)
                driver.capabilities()  # tested at the first call (vfs' reflink): here, too
                return driver

            return self.adopt_driver(await trio.to_thread.run_sync(make))
        return self._driver

    async def open_recorded_driver(self) -> Driver | None:
        """``recorded_driver()`` for the event loop (``open_driver``)."""
        return await self.open_driver() if self.meta.get_setting("driver") is not None else None

    def make_driver(self, recorded: str | None) -> Driver:
        """The driver ``recorded`` names (None: the one this root's filesystem chooses), made
        but not recorded."""
        name = choose(self.config, backing_filesystem(self.root).fstype, recorded)
        _, factory = registry()[name]
        return factory(self.config, self.root / "drivers" / name)

    def adopt_driver(self, driver: Driver) -> Driver:
        """Record ``driver`` as the root's if none is (its first use), unless one is open
        already (two requests made one each meanwhile): the open one stays."""
        if self._driver is None:
            if self.meta.get_setting("driver") is None:
                self.meta.set_setting("driver", driver.name)
            self._driver = driver
        return self._driver

    def check_driver(self) -> None:
        """Refuse now what ``driver()`` would refuse, recording and creating nothing: a pull
        must not download an image for a driver that cannot take it."""
        if self._driver is None:
            choose(self.config, backing_filesystem(self.root).fstype,
                   self.meta.get_setting("driver"))

    def capabilities(self) -> tuple[str, Capabilities]:
        """The driver's name and capabilities, from its probe when it is not open yet: like
        ``check_driver``, recording and creating nothing (a pull checks an image's depth
        before it downloads a layer)."""
        if self._driver is not None:
            return self._driver.name, self._driver.capabilities()
        name = choose(self.config, backing_filesystem(self.root).fstype,
                      self.meta.get_setting("driver"))
        caps = registry()[name][0](self.config).capabilities
        if caps is None:
            return name, self.driver().capabilities()  # recorded, but its probe says no
        return name, caps

    def recorded_driver(self) -> Driver | None:
        """The driver if one was ever recorded: recovery must not choose one by itself."""
        return self.driver() if self.meta.get_setting("driver") is not None else None

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
        driver = self.recorded_driver()
        if driver is None:
            return notes
        # Containers before layers, children before parents: a snapshot driver's layer cannot
        # go while something is cloned from it (zfs).
        for row in self.meta.containers():
            if row.state in ("creating", "removing"):
                driver.remove_container(row.name)
                self.meta.delete_container(row.name)
                notes.append(f"finished removing interrupted container {row.name}")
            elif row.mount_path is not None and not is_mounted(Path(row.mount_path)):
                if row.target is Target.ATTACHED:  # its clone went; the driver's own may not
                    driver.unmount(row.name, None)
                self.meta.update_container(row.name, mount_path=None, target=Target.OWN)
                notes.append(f"container {row.name} is no longer mounted at {row.mount_path}")
        known = {row.name for row in self.meta.containers()}
        for name in driver.list_containers() - known:
            driver.remove_container(name)
            notes.append(f"removed container directory {name} with no record")
        for chain_id in self.meta.layers_in_state("creating"):
            # The row goes first: a directory that stays is one with no record, retried below
            # at every open and by gc.
            self.meta.delete_layer(chain_id)
            notes.append(_removing_layer(driver, Digest.parse(chain_id).hex,
                                         f"half-applied layer {chain_id}"))
        known_layers = {Digest.parse(c).hex for c in self.meta.layers_in_state("ready")}
        for key in driver.list_layers() - known_layers:
            notes.append(_removing_layer(driver, key, f"layer directory {key} with no record"))
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

