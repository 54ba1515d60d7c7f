"""The operations behind every CLI command and (later) every API endpoint, in one place.

Results are plain JSON-ready dicts so the CLI's ``--json``, its tables and the socket API all
print the same facts.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
import platform as _platform
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from imaged import __version__
from imaged.config import Config
from imaged.digest import Digest
from imaged.drivers import Capabilities, Finding, Mounted, Usage, probe_all
from imaged.errors import ConflictError, ImagedError, InvalidError, NotFoundError, RegistryError
from imaged.events import Reporter
from imaged.faults import pause_point
from imaged.fsutil import syncfs
from imaged.host.mounts import MountEntry, backing_filesystem, is_mounted
from imaged.host.targets import attach, beneath, detach, open_target
from imaged.layers.unpack import UnpackLimits
from imaged.names import name_or_new
from imaged.ops import advise
from imaged.ops.probes import DriverProbes
from imaged.ops.pull import Puller, PullResult
from imaged.registry_client.client import RegistryClient
from imaged.registry_client.manifest import Descriptor, Platform
from imaged.registry_client.reference import parse_reference
from imaged.store import check
from imaged.store.check import container_key
from imaged.store.gc import (
    Removed,
    candidates,
    finish_removals,
    listing,
    release,
    remove_partials,
)
from imaged.store.leases import Leases
from imaged.store.lock import Waiting
from imaged.store.metadata import ContainerRow, ImageRow, Target, from_thread
from imaged.store.root import Store

log = logging.getLogger("imaged.ops.service")
# A container whose server dies this often within the window is left broken by the daemon
# instead of revived again: a server that cannot stay up would otherwise be restarted forever.
MAX_REVIVALS = 3
REVIVAL_WINDOW = 600.0


def image_json(row: ImageRow) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "config_digest": str(row.config_digest),
        "refs": list(row.refs),
        "size": row.size,
        "layers": len(row.layers),
        "platform": row.platform,
        "created": row.created,
    }


class Service:
    def __init__(self, store: Store, client: RegistryClient, nursery: trio.Nursery) -> None:
        """``nursery`` runs work shared by concurrent pulls (``imaged.ops.flights``): it must
        outlive every call into this service, since that work outlives the pull that started it."""
        self.store = store
        self.client = client
        self.leases = Leases()
        self._puller = Puller(store, client, self.leases, nursery)
        self._nursery = nursery
        self._probes = DriverProbes(
            lambda: [probe.to_json() for probe in probe_all(store.config)], nursery)
        # One mount, unmount or revival of a container at a time: a server that exits because
        # it was unmounted must not look like one that died to the watch (watch_mounts).
        self._container_locks: collections.defaultdict[str, trio.Lock] = \
            collections.defaultdict(trio.Lock)
        self._watching = False
        self._revivals: collections.defaultdict[str, list[float]] = \
            collections.defaultdict(list)
        self._removing = trio.Lock()  # one gc, rmi or rm removal at a time (_remove)

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config, holder: str,
                   waiting: Waiting | None = None) -> AsyncIterator[Service]:
        store = Store(config, holder, waiting)
        client = RegistryClient(config)
        try:
            async with trio.open_nursery() as nursery:
                try:
                    yield cls(store, client, nursery)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps even the caller's own error; give it back as it was raised.
            if len(group.exceptions) != 1:
                raise
            error = group.exceptions[0]
            raise error from error.__cause__
        finally:
            client.close()
            store.close()

    async def pull(self, ref_text: str, platform_text: str | None,
                   report: Reporter) -> PullResult:
        ref = parse_reference(ref_text)
        platform = Platform.parse(platform_text) if platform_text else Platform.host()
        await trio.to_thread.run_sync(self.store.check_driver)
        return await self._puller.pull(ref, platform, report,
                                       platform_explicit=platform_text is not None)

    def images(self) -> list[dict[str, Any]]:
        return [image_json(row) for row in self.store.meta.images()]

    def image(self, text: str) -> dict[str, Any]:
        return image_json(self.store.image(text))

    async def rmi(self, text: str, force: bool = False) -> dict[str, Any]:
        """Drop a reference (or, given an ID, all of its references) and unused blobs.

        Given an ID with several names, refuse without ``force`` as Docker does: removing every
        name of an image at once is rarely what was meant.
        """
        await trio.to_thread.run_sync(self.store.make_room)
        image_id, name = self.store.resolve_image(text)
        users = self.store.meta.containers_of(image_id)
        if users and not force:
            raise ConflictError(f"image {image_id.short} is used by container(s) "
                                f"{', '.join(sorted(users))}; remove them first or use --force "
                                "(the image's layers then stay until those containers go)")
        if name is None:
            names = list(self.store.image(str(image_id)).refs)
            if len(names) > 1 and not force and not users:
                raise ConflictError(
                    f"image {image_id.short} is referenced by {len(names)} names "
                    f"({', '.join(names)}); remove them by name or use --force")
        else:
            names = [name]
        orphans = self.store.meta.remove_refs(names)
        freed = await self._release(orphans)
        deleted = self.store.meta.image(image_id) is None
        return {"ok": True, "id": str(image_id), "untagged": names, "deleted": deleted,
                "freed_bytes": freed}

    async def _release(self, blobs: list[Digest]) -> int:
        """Remove what an rmi or rm just orphaned, through garbage collection's own removal so
        leases are respected here too; bytes freed as ``du`` counts them."""
        async with self._removing:
            return (await self._remove(blobs, self.store.meta.unused_layers())).freed_bytes

    async def _remove(self, blobs: list[Digest], layers: list[str],
                      partials: list[tuple[Digest, Path]] | None = None) -> Removed:
        """``imaged.store.gc``'s removal in a worker thread, the pulls held off its keys (the
        module says why that is safe). The caller holds ``_removing``: one removal at a time
        (``Puller.holding_off``)."""
        store, leases = self.store, self.leases
        driver = await store.open_recorded_driver() if layers else None

        def work(blobs: list[Digest], layers: list[str]) -> Removed:
            removed = release(store, leases, blobs, layers, driver, from_thread(store.meta))
            return removed if partials is None else \
                remove_partials(store, leases, partials, removed)

        keys = [str(digest) for digest in blobs] + \
            [str(digest) for digest, _ in partials or []]
        async with self._puller.holding_off(keys, layers):
            # A pull that ended while this waited may have recorded an image that needs some
            # of these (its lease is gone with it); none can record while they are held off.
            referenced = store.meta.referenced_blobs()
            blobs = [digest for digest in blobs if str(digest) not in referenced]
            layers = [chain for chain in layers
                      if not store.meta.layer_referenced(Digest.parse(chain))]
            return await trio.to_thread.run_sync(work, blobs, layers)

    async def gc(self) -> dict[str, Any]:
        """Remove every blob and layer nothing references or leases, partial downloads no
        running pull holds (``imaged.store.gc``), and what removed containers left that
        nothing holds any more: the directories listed and the removals done in worker
        threads, the rows read between them on the loop."""
        store = self.store
        await trio.to_thread.run_sync(store.make_room)
        driver = await store.open_recorded_driver()
        async with self._removing:
            listed = await trio.to_thread.run_sync(listing, store, driver)
            blobs, layers = candidates(store, listed)
            removed = await self._remove(blobs, layers, listed.partials)
            return (await trio.to_thread.run_sync(finish_removals, driver, removed)).to_json()

    # containers

    async def _describe(self, rows: list[ContainerRow]) -> list[dict[str, Any]]:
        """Containers as the API shows them; the driver reads all their usage in one batch (one
        ``zfs list`` or ``qgroup show`` for a whole ``ps``), off the event loop."""
        driver = await self.store.open_driver()

        def facts() -> tuple[dict[str, Usage], dict[str, str | None]]:
            ready = [row for row in rows if row.state == "ready"]
            return (driver.usages([row.name for row in ready]),
                    {row.name: driver.broken(row.name) for row in ready if row.mount_path})

        usages, broken = await trio.to_thread.run_sync(facts)
        caps = driver.capabilities()
        return [self._container_row(row, usages.get(row.name), caps, broken.get(row.name))
                for row in rows]

    def _container_row(self, row: ContainerRow, usage: Usage | None,
                       caps: Capabilities, broken: str | None) -> dict[str, Any]:
        state = "broken" if broken is not None else \
            "unmounted" if row.mount_path is None else "mounted"
        return {
            "name": row.name,
            "image": str(row.image_id),
            "image_refs": list(self.store.meta.refs_of(str(row.image_id))),
            "driver": row.driver,
            "quota": row.quota,
            "quota_mode": f"{caps.quota_mode}/{caps.quota_semantics}" if row.quota else None,
            "used_bytes": usage.used if usage else 0,
            "used_inodes": usage.inodes_used if usage else None,
            "inodes": usage.inodes if usage else None,
            "partial_files": usage.partial_files if usage else None,
            "read_only": row.read_only,
            "mounted": row.mount_path is not None,
            "path": row.mount_path,
            "state": state,
        }

    async def _container_json(self, row: ContainerRow) -> dict[str, Any]:
        return (await self._describe([row]))[0]

    def _get(self, name: str) -> ContainerRow:
        row = self.store.meta.container(name)
        if row is None or row.state != "ready":
            raise NotFoundError(f"no container {name}")
        return row

    def _layers_of(self, image_id: Digest) -> list[str]:
        return self.store.meta.chain_keys(image_id)

    async def create(self, image_text: str, name: str | None, quota: int | None,
                     read_only: bool) -> dict[str, Any]:
        """A new container on the image, not mounted (the API's POST /v1/containers)."""
        image_id, _ = self.store.resolve_image(image_text)
        name = name_or_new(name)
        if read_only and quota is not None:
            raise InvalidError("a read-only container has no writable layer to put a quota on")
        row = self.store.meta.container(name)
        if row is not None:
            raise ConflictError(f"container {name} already exists"
                                + ("" if row.state == "ready" else f" (being {row.state})"))
        await self._create(image_id, name, quota, read_only)
        return await self._container_json(self._get(name))

    async def _create(self, image_id: Digest, name: str, quota: int | None,
                      read_only: bool) -> None:
        driver = await self.store.open_driver()
        with self.leases.hold([container_key(name)]):  # 'creating' is not a crash's leftover
            self.store.meta.insert_container(ContainerRow(
                name, image_id, driver.name, quota, read_only, "creating", None, Target.OWN,
                time.time()))
            try:
                await trio.to_thread.run_sync(driver.create_container, name,
                                              self._layers_of(image_id), quota, read_only)
                # Acknowledged means durable: the container's files before its 'ready' row,
                # then the row. A disk failing either fails the creation, which is undone.
                await trio.to_thread.run_sync(syncfs, driver.home)
                self.store.meta.update_container(name, state="ready")
                await trio.to_thread.run_sync(self.store.flush_records)
            except BaseException:
                with trio.CancelScope(shield=True), \
                        contextlib.suppress(ImagedError, OSError):  # recovery's, if it fails
                    await trio.to_thread.run_sync(driver.remove_container, name)
                    self.store.meta.delete_container(name)
                raise

    async def mount(self, image_text: str | None, name: str | None, quota: int | None,
                    read_only: bool, target: Path | None,
                    confined: bool = False) -> dict[str, Any]:
        """Mount container ``name``; given an image, create it first if it does not exist (the
        CLI's ``mount``), refusing an existing one that differs from what was asked.

        ``confined`` (a non-root peer of the daemon): a ``target`` must lie beneath
        ``api.mount_prefixes``, and the container is mounted in the driver's own directory and
        attached there through a descriptor (``imaged.host.targets``)."""
        prefixes = self.store.config.mount_prefixes
        if confined and target is not None:
            beneath(target, prefixes)  # refused before anything is created
        if image_text is None:
            if name is None:
                raise InvalidError("mount needs a container name or an image")
            row = self._get(name)
        else:
            row = await self._ensure(image_text, name, quota, read_only)
        pause_point("created-not-mounted")
        async with self._container_locks[row.name]:
            row = self._get(row.name)  # as it is now that nothing else changes it
            if row.mount_path is not None:
                if target is not None and Path(row.mount_path) != target:
                    raise ConflictError(f"container {row.name} is already mounted at "
                                        f"{row.mount_path}")
                driver = await self.store.open_driver()
                why = await trio.to_thread.run_sync(driver.broken, row.name)
                if why is None:
                    return {"name": row.name, "path": row.mount_path, "mounts": []}
                log.warning("container %s is broken (%s): clearing its dead mount at %s to "
                            "mount it again there", row.name, why, row.mount_path)
                return await self._revive(row)
            return await self._mount_row(row, target, confined)

    async def _revive(self, row: ContainerRow) -> dict[str, Any]:
        """Unmount a broken container and mount it again at the same place, attached again
        if it was (the caller holds its lock)."""
        await trio.to_thread.run_sync(self._unmount, row)
        self.store.meta.update_container(row.name, mount_path=None, target=Target.OWN)
        target = None if row.target is Target.OWN else Path(row.mount_path or "")
        return await self._mount_row(self._get(row.name), target, row.target is Target.ATTACHED)

    async def _mount_row(self, row: ContainerRow, target: Path | None,
                         confined: bool) -> dict[str, Any]:
        prefixes = self.store.config.mount_prefixes
        driver = await self.store.open_driver()
        layers = self._layers_of(row.image_id)
        if confined and target is not None:
            mounted = await trio.to_thread.run_sync(self._attach, row, layers, target, prefixes)
            kind = Target.ATTACHED
        else:
            mounted = await trio.to_thread.run_sync(driver.mount, row.name, layers,
                                                    row.read_only, target)
            kind = Target.OWN if target is None else Target.GIVEN
        self.store.meta.update_container(row.name, mount_path=str(mounted.path), target=kind)
        if self._watching:
            self._nursery.start_soon(self._watch, row.name)
        return {"name": row.name, "path": str(mounted.path),
                "mounts": [spec.to_json() for spec in mounted.mounts]}

    def _attach(self, row: ContainerRow, layers: list[str], target: Path,
                prefixes: tuple[Path, ...]) -> Mounted:
        """Mount in the driver's own directory, then attach a clone of that mount at
        ``target``, opened beneath its prefix; the own mount is undone if that fails."""
        driver = self.store.driver()
        own = driver.mount(row.name, layers, row.read_only, None)
        try:
            with open_target(target, prefixes) as fd:
                attach(own.path, fd, target)
        except BaseException:
            driver.unmount(row.name, None)
            raise
        return Mounted(target, own.mounts)  # replayed at the target, they give the same tree

    async def _ensure(self, image_text: str, name: str | None, quota: int | None,
                      read_only: bool) -> ContainerRow:
        if read_only and quota is not None:
            raise InvalidError("a read-only container has no writable layer to put a quota on")
        image_id, _ = self.store.resolve_image(image_text)
        name = name_or_new(name)
        row = self.store.meta.container(name)
        if row is None:
            await self._create(image_id, name, quota, read_only)
            return self._get(name)
        if row.state != "ready":
            raise ConflictError(f"container {name} is being {row.state[:-3]}ed")
        if row.image_id != image_id:
            raise ConflictError(f"container {name} exists on another image "
                                f"({row.image_id.short})")
        if quota is not None and row.quota != quota:
            raise ConflictError(f"container {name} exists with quota "
                                f"{row.quota if row.quota is not None else 'none'}; "
                                "change it with imaged update")
        if row.read_only != read_only:
            raise ConflictError(f"container {name} exists "
                                f"{'read-only' if row.read_only else 'writable'}")
        return row

    async def umount(self, name: str, force: bool = False) -> dict[str, Any]:
        """Unmount, a conflict while files are open on the mount; ``force`` detaches it
        instead (MNT_DETACH: gone for new opens, kept for the open files until they close)."""
        await trio.to_thread.run_sync(self.store.make_room)
        async with self._container_locks[name]:
            row = self._get(name)
            if row.mount_path is not None:
                try:
                    await trio.to_thread.run_sync(self._unmount, row, force)
                except ConflictError as exc:
                    if force:
                        raise
                    raise ConflictError(f"container {name}: {exc} (umount --force detaches "
                                        "it)") from None
                self.store.meta.update_container(name, mount_path=None, target=Target.OWN)
        return {"ok": True, "name": name}

    def watch_mounts(self) -> None:
        """From now on, remount a container whose mount stops being served (a fuse server
        that died), at the same place: every container mounted now, and every one mounted
        later. The daemon's; an embedded CLI lives too short to watch anything."""
        self._watching = True
        for row in self.store.meta.containers():
            if row.state == "ready" and row.mount_path is not None:
                self._nursery.start_soon(self._watch, row.name)

    async def _watch(self, name: str) -> None:
        """Wait for the server of ``name`` to end, then revive the container if its mount is
        still recorded and dead. One already dead when the watch starts is revived at once."""
        fd = await trio.to_thread.run_sync((await self.store.open_driver()).serving_fd, name)
        if fd is not None:
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        async with self._container_locks[name]:
            row = self.store.meta.container(name)
            if row is None or row.state != "ready" or row.mount_path is None or \
                    not is_mounted(Path(row.mount_path)):
                return  # unmounted meanwhile, by imaged or by hand (imaged check reports that)
            why = await trio.to_thread.run_sync((await self.store.open_driver()).broken, name)
            if why is None:
                return
            now = trio.current_time()
            recent = [at for at in self._revivals[name] if now - at < REVIVAL_WINDOW]
            if len(recent) >= MAX_REVIVALS:
                log.error("container %s is broken (%s) and stays so: mounted again %d times "
                          "in %d s already; imaged mount mounts it again", name, why,
                          len(recent), REVIVAL_WINDOW)
                return
            self._revivals[name] = [*recent, now]
            log.warning("container %s is broken (%s): mounting it again at %s", name, why,
                        row.mount_path)
            try:
                await self._revive(row)
            except ImagedError as exc:
                log.error("container %s could not be mounted again: %s", name, exc)
                return
        log.info("container %s is mounted again at %s; files opened on the dead mount stay "
                 "dead", name, row.mount_path)

    def _unmount(self, row: ContainerRow, force: bool = False) -> None:
        driver = self.store.driver()
        path = Path(row.mount_path or "")
        if row.target is Target.ATTACHED:
            # The clone of a dead mount is as dead: detached whoever holds it, as the driver
            # detaches its own.
            detach(path, self.store.config.mount_prefixes,
                   lazy=force or driver.broken(row.name) is not None)
            driver.unmount(row.name, None, force)
        else:
            driver.unmount(row.name, path if row.target is Target.GIVEN else None, force)

    async def rm(self, name: str, force: bool = False) -> dict[str, Any]:
        """Remove a container; a mounted one only with ``force``, which unmounts it as
        ``umount --force`` does (detached while files are open on it, as ``podman rm -f``
        removes a running container). What the detached mount still holds is the driver's
        to finish later (``Driver.removals``): the name is free and ``ps`` no longer shows
        it as soon as this returns."""
        await trio.to_thread.run_sync(self.store.make_room)
        row = self._get(name)
        if row.mount_path is not None:
            if not force:
                raise ConflictError(f"container {name} is mounted at {row.mount_path}; "
                                    "unmount it first or use --force")
            await self.umount(name, force=True)
        with self.leases.hold([container_key(name)]):  # 'removing' is not a crash's leftover
            self.store.meta.update_container(name, state="removing")
            pause_point("mid-removal")
            await trio.to_thread.run_sync((await self.store.open_driver()).remove_container, name)
            freed = await self._release(self.store.meta.delete_container(name))
        return {"ok": True, "name": name, "freed_bytes": freed}

    async def update(self, name: str, quota: int | None,
                     materialize: bool = False) -> dict[str, Any]:
        """A new quota first, then the partial files completed, so one call can make room for
        them and fill it."""
        if quota is None and not materialize:
            raise InvalidError("nothing to update: give a quota, materialize, or both")
        row = self._get(name)
        if row.read_only:
            raise InvalidError(f"container {name} is read-only: it has no writable layer")
        driver = await self.store.open_driver()
        if materialize and not driver.partial_copy_up:  # refused before the quota changes
            raise InvalidError(f"container {name} has no partial files to materialize: the "
                               f"{driver.name} driver copies up whole files (only fuse copies "
                               "up by range)")
        mounted = row.mount_path is not None
        if quota is not None:
            await trio.to_thread.run_sync(driver.resize_quota, name, quota, mounted)
            self.store.meta.update_container(name, quota=quota)
        if materialize:
            await trio.to_thread.run_sync(driver.materialize, name,
                                          self._layers_of(row.image_id), mounted)
        return await self._container_json(self._get(name))

    async def container(self, name: str) -> dict[str, Any]:
        return await self._container_json(self._get(name))

    async def ps(self) -> list[dict[str, Any]]:
        return await self._describe([row for row in self.store.meta.containers()
                                     if row.state == "ready"])

    async def advise(self, text: str, report: str | None, confined: bool) -> dict[str, Any]:
        """The large files of an image a container will likely write, with their predicted
        first-write costs and advice (``imaged.ops.advise``); reads every layer blob, so in a
        thread."""
        return await trio.to_thread.run_sync(
            advise.advise, self.store, text, None if report is None else Path(report), confined)

    # check

    async def check(self, verify_data: bool = False, repair: bool = False) -> dict[str, Any]:
        """The store-wide consistency check (``imaged.store.check``), and with ``repair`` the
        repair of what can be repaired: ``{ok, findings, recovered}``.

        ``ok`` is whether nothing was found, repaired or not (DESIGN §4: exit 1 when anything
        is found); a run after a repair says whether it all held. ``recovered`` is what opening
        the root repaired before the check looked (``Store.recover``): a crash's leftovers that
        the check can no longer see. Repair is for the embedded CLI only (DESIGN §5)."""
        store = self.store
        if repair:
            await trio.to_thread.run_sync(store.make_room)
        records = check.Records.read(store.meta)
        driver = await store.open_recorded_driver()
        limits = UnpackLimits(store.config.limits.max_layer_bytes,
                              store.config.limits.max_layer_entries)
        found = await trio.to_thread.run_sync(functools.partial(
            check.inspect, records, store.content, driver, store.root, self.leases.held,
            verify_data, limits))
        found = [f for f in found if not check.explained(store.meta, self.leases, f)]
        if repair:
            found = [await self._repair(f) for f in sorted(found, key=self._repair_order())]
        return {"ok": not found, "findings": [f.to_json() for f in found],
                "recovered": list(store.recovered)}

    def _repair_order(self) -> Callable[[Finding], tuple[int, int]]:
        """``check.REPAIR_ORDER``; layers base first, since each is applied on its parent."""
        positions = {str(layer.chain_id): layer.position for image in self.store.meta.images()
                     for layer in image.layers}
        order = {kind: rank for rank, kind in enumerate(check.REPAIR_ORDER)}
        return lambda f: (order.get(f.kind, len(order)), positions.get(f.subject, 0))

    async def _repair(self, finding: Finding) -> Finding:
        try:
            if finding.kind in check.BLOB_DAMAGE:
                await self._refetch(finding)
            elif finding.kind == check.LAYER_MISSING:
                await self._restore_layer(Digest.parse(finding.subject))
            elif finding.kind == check.LAYER_DAMAGED:
                await self._reapply_layer(finding)
            elif finding.kind == check.MOUNT_BROKEN:
                async with self._container_locks[finding.subject]:
                    await self._revive(self._get(finding.subject))
            else:
                await self._repair_store(finding)
        except (ImagedError, OSError) as exc:
            return dataclasses.replace(finding, error=str(getattr(exc, "strerror", None) or exc))
        return dataclasses.replace(finding, repaired=True)

    async def _repair_store(self, finding: Finding) -> None:
        """``check.repair`` in a worker thread, as a removal: one at a time with gc's, ``rmi``'s
        and ``rm``'s, and the pulls held off the blob or layer it removes, so none takes it up
        meanwhile (a container's blobs and layers are released under their leases, as ``rm``
        releases them)."""
        store = self.store
        driver = await store.open_driver()
        subject = finding.kind in (check.LAYER_INTERRUPTED, check.LAYER_UNRECORDED)
        blobs = [finding.subject] if finding.kind == check.BLOB_UNRECORDED else []
        async with self._removing, \
                self._puller.holding_off(blobs, [finding.subject] if subject else []):
            await trio.to_thread.run_sync(check.repair, store, self.leases, finding, driver,
                                          from_thread(store.meta))

    async def _refetch(self, finding: Finding) -> None:
        """A damaged or missing blob fetched again from a repository of an image that uses
        it, trying each until one answers. Damaged bytes go first so nothing reads them; a
        short file goes back to ingest, where the download resumes from it once re-hashed."""
        digest = Digest.parse(finding.subject)
        content, meta = self.store.content, self.store.meta
        if finding.kind == check.BLOB_SIZE:
            await trio.to_thread.run_sync(content.uncommit, digest)
        else:
            await trio.to_thread.run_sync(content.remove, digest)
        row = meta.blob_rows().get(finding.subject)
        if row is None:
            raise NotFoundError(f"blob {digest} is no longer recorded")
        records = check.Records.read(meta)
        refs = records.refs_using_blob(finding.subject)
        if not refs:
            raise NotFoundError(f"no image that uses blob {digest} has a name to fetch it by")
        desc = Descriptor(row[1], digest, row[0])
        errors = []
        for ref in refs:
            try:
                await self._puller.refetch(parse_reference(ref), desc,
                                           finding.subject in records.manifests())
                return
            except ImagedError as exc:
                errors.append(f"{ref}: {exc}")
        raise RegistryError(f"could not fetch blob {digest} again ({'; '.join(errors)})")

    async def _restore_layer(self, chain: Digest) -> None:
        """A layer the driver lost, applied again from its blob: the first recorded image
        that has it says its parent, DiffID and blob."""
        for image in self.store.meta.images():
            for layer in image.layers:
                if layer.chain_id != chain:
                    continue
                parent = image.layers[layer.position - 1].chain_id if layer.position else None
                if not self.store.content.has(layer.blob_digest, layer.size):
                    raise NotFoundError(f"its blob {layer.blob_digest} is not in the store")
                await self._puller.restore_layer(
                    chain, parent, layer.diff_id,
                    Descriptor(layer.media_type, layer.blob_digest, layer.size))
                return
        raise NotFoundError(f"no recorded image has layer {chain}")

    async def _reapply_layer(self, finding: Finding) -> None:
        """A layer whose tree differs from its verified blob, applied again from it in place:
        ``_restore_layer``, whose ``prepare_layer`` removes the damaged tree first, recorded
        'creating' meanwhile so a crash leaves what recovery removes and check restores.

        Not while something reads the tree, since removing files from under it is undefined
        (overlayfs(5): lower layers must not change while mounted): a mounted container
        stacked on it, or bound to it read-only; nor under what ZFS cloned from it, which it
        refuses to destroy. The error then says what the user must do; no container is
        touched (docs/store.md, "Damaged layers")."""
        chain = Digest.parse(finding.subject)
        driver = await self.store.open_driver()
        stacked = driver.capabilities().family == "stacked"
        readers = sorted(row.name for row in self.store.meta.containers()
                         if row.state == "ready" and row.mount_path is not None
                         and (stacked or row.read_only)
                         and chain.hex in self._layers_of(row.image_id))
        if readers:
            raise ConflictError(
                f"mounted container{'s' if len(readers) > 1 else ''} {', '.join(readers)} "
                "read it: unmount (imaged umount NAME), then run imaged check --repair again")
        clones = await trio.to_thread.run_sync(driver.layer_dependents, chain.hex)
        if clones:
            raise ConflictError(
                f"ZFS clones of it remain ({', '.join(clones)}): remove the containers and "
                "images built on it (imaged rm, imaged rmi, imaged gc), then imaged pull "
                f"{' '.join(finding.images) or 'the image'} again")
        await self._restore_layer(chain)

    async def info(self) -> dict[str, Any]:
        """The root, host and drivers. Everything but the metadata runs in a thread: probing
        the drivers writes a test file into the root (vfs' reflink probe), reads mount tables
        and asks device-mapper, and counting the blobs stats every one, which on a slow disk
        kept every other request waiting (issue 17). The probes are the dearest part, and are
        kept between requests (``imaged.ops.probes``)."""
        store = self.store

        def host() -> tuple[MountEntry, tuple[int, int]]:
            return backing_filesystem(store.root), store.content_usage()

        probed = await self._probes.get()
        backing, (blobs, blob_bytes) = await trio.to_thread.run_sync(host)
        return {
            "version": __version__,
            "root": str(store.root),
            "backing_filesystem": {"type": backing.fstype, "mount_point": backing.mount_point},
            "driver": store.meta.get_setting("driver"),
            "drivers": probed.drivers,
            "drivers_probed_at": probed.wall,
            "platform": str(Platform.host()),
            "kernel": _platform.release(),
            "content": {"blobs": blobs, "bytes": blob_bytes},
            "images": len(store.meta.images()),
        }

