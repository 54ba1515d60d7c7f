"""Pull: reference → manifest (through an index if need be) → config → layers → one record.

Nothing is recorded until everything has been fetched, verified and applied: blobs and layers
exist on disk before the one transaction that records the image, wanted only by the pull's lease
(``imaged.store.leases``). Concurrent pulls share the work on each blob and each layer
(``Flights``):
a shared blob is downloaded once and a shared layer unpacked once. A pull that fails or is
cancelled undoes what nobody else relies on, so the store is as it was; the bytes it fetched go
back to ingest and the next attempt resumes from them (after hashing them again).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from imaged.digest import Digest, chain_ids
from imaged.errors import (
    ContentError,
    ImagedError,
    collapse,
    os_failure,
)
from imaged.events import PullEvent, Reporter
from imaged.fsutil import syncfs
from imaged.layers.unpack import UnpackLimits, UnpackStats, unpack_layer
from imaged.ops.flights import Flights
from imaged.registry_client.client import RegistryClient
from imaged.registry_client.manifest import (
    Descriptor,
    Index,
    Manifest,
    Platform,
    parse_image_config,
    parse_manifest_document,
    select_platform,
)
from imaged.registry_client.reference import Reference
from imaged.store.leases import Lease, Leases
from imaged.store.metadata import LayerRow, NewImage
from imaged.store.root import Store

# Layer blobs up to this size are fetched whole into memory: no resume (nothing worth resuming),
# no progress between start and end (a fraction of a second on any link worth pulling over).
SMALL_BLOB_BYTES = 256 * 1024


async def _clean_up(undo: Callable[[], Awaitable[None]]) -> None:
    """Undo after a failure, shielded from the cancellation that may be the failure. An undo
    that fails in turn (the disk that failed the work fails the removal too) must not hide the
    failure the user needs to see; what it leaves, opening the root recovers: a layer row still
    'creating', a layer directory or a blob file with no row."""
    with trio.CancelScope(shield=True), contextlib.suppress(ImagedError, OSError):
        await undo()


def _unpack_progress(desc: Descriptor, emit: Reporter) -> Callable[[int], None]:
    """For the unpacking thread: how far into the blob it has read, as an ``unpacking`` event
    at most every ``_PROGRESS_SECONDS``, delivered on trio's thread."""
    last = 0.0

    def report(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= _PROGRESS_SECONDS:
            last = now
            trio.from_thread.run_sync(emit, PullEvent("unpacking", layer=str(desc.digest),
                                                      current=done, total=desc.size))

    return report


_PROGRESS_SECONDS = 0.2


@dataclass(frozen=True)
class PullResult:
    id: Digest
    config_digest: Digest
    ref: str
    layers: int


class Puller:
    """Every pull of one service: the flights they share, the layers applied but not yet
    flushed, and the lock that serializes recording."""

    def __init__(self, store: Store, client: RegistryClient, leases: Leases,
                 nursery: trio.Nursery) -> None:
        self.store = store
        self.client = client
        self.leases = leases
        self._downloads: Flights[None, PullEvent] = Flights(nursery)
        self._configs: Flights[bytes, PullEvent] = Flights(nursery)
        self._unpacks: Flights[UnpackStats | None, PullEvent] = Flights(nursery)
        # Applied layers still in state 'creating' until a pull that relies on them has flushed
        # them; each is always in a flight or leased by a pull that will flush or remove it.
        self._applied: dict[Digest, UnpackStats] = {}
        # Unpacking is CPU-bound (decompression, hashing) and disk-bound: one worker per core,
        # however many pulls run.
        self._unpack_limiter = trio.CapacityLimiter(os.cpu_count() or 2)
        self._record_lock = trio.Lock()

    async def pull(self, ref: Reference, platform: Platform, report: Reporter,
                   platform_explicit: bool = False) -> PullResult:
        with self.leases.hold() as lease:
            held = _Held(lease)
            try:
                return await self._pull(held, ref, platform, report, platform_explicit)
            except BaseException:
                await _clean_up(functools.partial(self._undo, held))
                raise

    async def _pull(self, held: _Held, ref: Reference, platform: Platform, report: Reporter,
                    platform_explicit: bool) -> PullResult:
        store, client = self.store, self.client
        limits = store.config.limits
        report(PullEvent("resolving", extra={"ref": str(ref)}))
        top = await client.fetch_manifest(ref, ref.object, limits.max_manifest_bytes)
        held.add_blobs([top.digest])
        document = parse_manifest_document(top.data, top.content_type)
        small_blobs: list[tuple[Digest, bytes, str]] = []
        index_digest = None
        if isinstance(document, Index):
            index_digest = top.digest
            small_blobs.append((top.digest, top.data, document.media_type))
            chosen = select_platform(document, platform)
            if chosen.size > limits.max_manifest_bytes:
                raise ContentError(f"manifest {chosen.digest} of {chosen.size} bytes exceeds "
                                   f"limits.max_manifest_bytes")
            fetched = await client.fetch_manifest(ref, str(chosen.digest),
                                                  limits.max_manifest_bytes)
            held.add_blobs([fetched.digest])
            if len(fetched.data) != chosen.size:
                raise ContentError(f"manifest {chosen.digest} is {len(fetched.data)} bytes, the "
                                   f"index says {chosen.size}")
            manifest_doc = parse_manifest_document(fetched.data, fetched.content_type)
            if not isinstance(manifest_doc, Manifest):
                raise ContentError(f"index entry {chosen.digest} is itself an index; nested "
                                   "indexes are not supported")
            manifest, manifest_digest, manifest_bytes = manifest_doc, fetched.digest, fetched.data
        else:
            manifest, manifest_digest, manifest_bytes = document, top.digest, top.data
        small_blobs.append((manifest_digest, manifest_bytes, manifest.media_type))

        held.add_blobs([manifest.config.digest])
        config_bytes = await self._configs.run(
            str(manifest.config.digest), functools.partial(self._fetch_config, ref,
                                                           manifest.config), report)
        small_blobs.append((manifest.config.digest, config_bytes, manifest.config.media_type))
        config = parse_image_config(config_bytes, manifest)
        if platform_explicit and platform.accepts(config.platform) is None:
            raise ContentError(f"{ref} is an image for {config.platform}, not {platform}")
        name, capabilities = await trio.to_thread.run_sync(self.store.capabilities)
        capabilities.check_depth(len(manifest.layers), name)
        for i, layer in enumerate(manifest.layers):
            if layer.size > limits.max_layer_bytes:
                raise ContentError(f"layer {i} ({layer.digest}) is {layer.size} bytes, over "
                                   "limits.max_layer_bytes")
        chains = chain_ids(list(config.diff_ids))
        held.add_blobs([layer.digest for layer in manifest.layers])
        held.add_chains(chains)
        report(PullEvent("resolved", id=str(manifest_digest),
                         extra={"config_digest": str(manifest.config.digest),
                                "layers": len(manifest.layers)}))

        await self._fetch_layers(ref, manifest.layers, report, limits.concurrent_downloads)
        await self._unpack_layers(manifest.layers, config.diff_ids, chains, report)
        layer_rows = tuple(
            LayerRow(i, layer.digest, config.diff_ids[i], chains[i], layer.media_type,
                     layer.size)
            for i, layer in enumerate(manifest.layers)
        )
        blobs = {d: (d, len(data), mt) for d, data, mt in small_blobs}
        for layer in manifest.layers:
            blobs.setdefault(layer.digest, (layer.digest, layer.size, layer.media_type))
        await self._record(small_blobs, NewImage(
            ref=str(ref), id=manifest_digest, media_type=manifest.media_type,
            config_digest=manifest.config.digest, platform=str(config.platform),
            index_digest=index_digest, layers=layer_rows, blobs=tuple(blobs.values()),
        ))
        report(PullEvent("done", id=str(manifest_digest)))
        return PullResult(manifest_digest, manifest.config.digest, str(ref),
                          len(manifest.layers))

    async def _fetch_config(self, ref: Reference, desc: Descriptor, _: Reporter) -> bytes:
        """A config flight: the config's bytes, placed in the store like a layer's blob, so a
        pull of the same image arriving after this flight has ended finds it there."""
        content = self.store.content
        if content.has(desc.digest, desc.size):
            return content.read_bytes(desc.digest)
        data = await self.client.fetch_small_blob(ref, desc,
                                                  self.store.config.limits.max_manifest_bytes)
        await trio.to_thread.run_sync(self._place_bytes, desc.digest, data)
        return data

    def _place_bytes(self, digest: Digest, data: bytes) -> None:
        ingest = self.store.content.ingest_bytes(digest, data)
        try:
            self.store.content.place(ingest)
        finally:
            ingest.close()

    async def _fetch_layers(self, ref: Reference, layers: tuple[Descriptor, ...],
                            report: Reporter, concurrency: int) -> None:
        """Have every layer blob in the store, at most ``concurrency`` of this pull's at once.

        An image may list one blob several times (empty layers); each is fetched once.
        """
        unique: dict[Digest, Descriptor] = {}
        for layer in layers:
            unique.setdefault(layer.digest, layer)
        limiter = trio.CapacityLimiter(concurrency)

        async def one(desc: Descriptor) -> None:
            async with limiter:
                key = str(desc.digest)
                if self._downloads.busy(key):
                    report(PullEvent("waiting", layer=key, total=desc.size))
                await self._downloads.run(key, functools.partial(self._download, ref, desc),
                                          report)

        try:
            async with trio.open_nursery() as nursery:
                for desc in unique.values():
                    nursery.start_soon(one, desc)
        except BaseExceptionGroup as group:
            raise collapse(group) from None

    async def _download(self, ref: Reference, desc: Descriptor, emit: Reporter) -> None:
        """A download flight: the blob verified at its place in the store (see
        ``ContentStore.place``), or an error; a partial download stays in ingest to resume."""
        content = self.store.content
        layer = str(desc.digest)
        if content.has(desc.digest, desc.size):
            emit(PullEvent("exists", layer=layer, current=desc.size, total=desc.size))
            return
        if desc.size <= SMALL_BLOB_BYTES:
            # Most layers of most images: one request read into memory, then one thread call
            # to write and place it. Four thread hops fewer a blob than streaming through an
            # ingest, which on 128 tiny layers was a tenth of the pull.
            emit(PullEvent("downloading", layer=layer, current=0, total=desc.size))
            data = await self.client.fetch_small_blob(ref, desc, desc.size)
            await trio.to_thread.run_sync(content.write_bytes, desc.digest, data)
            emit(PullEvent("verified", layer=layer, current=desc.size, total=desc.size))
            return
        ingest = await trio.to_thread.run_sync(content.open_ingest, desc.digest, desc.size)
        try:
            emit(PullEvent("downloading", layer=layer, current=ingest.offset, total=desc.size))

            def progress(current: int) -> None:
                emit(PullEvent("downloading", layer=layer, current=current, total=desc.size))

            await self.client.fetch_blob(ref, desc, ingest, progress)
            await trio.to_thread.run_sync(content.place, ingest)
        finally:
            ingest.close()
        emit(PullEvent("verified", layer=layer, current=desc.size, total=desc.size))

    async def _unpack_layers(self, layers: tuple[Descriptor, ...], diff_ids: tuple[Digest, ...],
                             chains: list[Digest], report: Reporter) -> None:
        """Have every layer applied, flushed and ready.

        Stacked drivers apply layers independently, so all of them run at once; snapshot drivers
        build each layer on its parent, so they go in order. One flush covers every layer this
        pull relies on that is not ready yet, before any is marked ready: recovery trusts ready
        layers, and a syncfs per layer cost more than the layers (128 small layers spent longer
        in syncfs than in unpacking). A layer another pull applied may be flushed twice; never
        not at all.
        """
        driver = await self.store.open_driver()
        applied: dict[Digest, UnpackStats] = {}

        async def one(i: int) -> None:
            key = str(chains[i])
            if self._unpacks.busy(key):
                report(PullEvent("waiting", layer=str(layers[i].digest)))
            stats = await self._unpacks.run(
                key, functools.partial(self._apply, layers, diff_ids, chains, i), report)
            if stats is not None:
                applied[chains[i]] = stats

        try:
            if driver.capabilities().family == "stacked":
                async with trio.open_nursery() as nursery:
                    for i in range(len(chains)):
                        nursery.start_soon(one, i)
            else:
                for i in range(len(chains)):
                    await one(i)
        except BaseExceptionGroup as group:
            raise collapse(group) from None
        if applied:
            await trio.to_thread.run_sync(syncfs, driver.home)
            flushed = {chain: (stats.entries, stats.bytes) for chain, stats in applied.items()
                       if self._applied.pop(chain, None) is not None}
            if flushed:
                self.store.meta.finish_layers(flushed)

    async def _apply(self, layers: tuple[Descriptor, ...], diff_ids: tuple[Digest, ...],
                     chains: list[Digest], i: int, emit: Reporter) -> UnpackStats | None:
        """An unpack flight: layer ``i`` applied (state 'creating', in ``_applied``) and its
        stats, or None when it is ready already. A failed apply removes its half-written layer
        before the flight ends, so no other flight meets it."""
        chain, desc = chains[i], layers[i]
        if chain in self._applied:
            return self._applied[chain]
        if self.store.meta.layer_state(chain) == "ready":
            return None
        parent = chains[i - 1] if i else None
        driver = await self.store.open_driver()
        # The blob is read by this flight even if the pull that started it goes away.
        with self.leases.hold([str(desc.digest)]):
            self.store.meta.begin_layer(chain, parent, diff_ids[i], driver.name)
            emit(PullEvent("unpacking", layer=str(desc.digest), current=0, total=desc.size))
            try:
                stats = await trio.to_thread.run_sync(self._unpack, desc, diff_ids[i], chain,
                                                      parent, _unpack_progress(desc, emit),
                                                      limiter=self._unpack_limiter)
            except BaseException:
                await _clean_up(functools.partial(self._remove_layer, chain))
                raise
        self._applied[chain] = stats
        emit(PullEvent("unpacked", layer=str(desc.digest),
                       extra={"entries": stats.entries, "bytes": stats.bytes,
                              "xattrs_skipped": stats.xattrs_skipped}))
        return stats

    def _unpack(self, desc: Descriptor, diff_id: Digest, chain: Digest,
                parent: Digest | None, progress: Callable[[int], None]) -> UnpackStats:
        driver = self.store.driver()
        limits = UnpackLimits(self.store.config.limits.max_layer_bytes,
                              self.store.config.limits.max_layer_entries)
        target = driver.prepare_layer(chain.hex, None if parent is None else parent.hex)
        try:
            stats = unpack_layer(self.store.content.path(desc.digest), desc.media_type, diff_id,
                                 target, driver.capabilities().whiteouts, limits,
                                 progress=progress)
        except OSError as exc:
            # The target filesystem failed us (full, read-only, I/O error): say where.
            notes = "; ".join(getattr(exc, "__notes__", []))
            raise os_failure(exc, f"unpacking layer {desc.digest} into",
                             f"{target}{f' ({notes})' if notes else ''}") from None
        driver.commit_layer(chain.hex)
        return stats

    async def refetch(self, ref: Reference, desc: Descriptor, manifest: bool) -> None:
        """A recorded blob whose file is gone or damaged, fetched again from ``ref``'s
        repository and flushed (``imaged check --repair``); a manifest or index through the
        manifests endpoint, where registries keep them."""
        content = self.store.content
        with self.leases.hold([str(desc.digest)]):
            if manifest:
                fetched = await self.client.fetch_manifest(
                    ref, str(desc.digest), self.store.config.limits.max_manifest_bytes)
                await trio.to_thread.run_sync(content.write_bytes, desc.digest, fetched.data)
            else:
                await self._downloads.run(str(desc.digest),
                                          functools.partial(self._download, ref, desc),
                                          lambda _: None)
            await trio.to_thread.run_sync(content.flush)

    async def restore_layer(self, chain: Digest, parent: Digest | None, diff_id: Digest,
                            desc: Descriptor) -> None:
        """Apply a recorded layer again from its blob (``imaged check --repair`` of a layer the
        driver lost), recorded as a pull records it: 'creating' until applied and flushed, so
        a crash meanwhile leaves what recovery removes."""
        driver = await self.store.open_driver()
        with self.leases.hold([str(chain), str(desc.digest)]):
            async with self._unpacks.exclusive(str(chain)):
                self.store.meta.begin_layer(chain, parent, diff_id, driver.name)
                try:
                    stats = await trio.to_thread.run_sync(
                        self._unpack, desc, diff_id, chain, parent, lambda _: None,
                        limiter=self._unpack_limiter)
                    await trio.to_thread.run_sync(syncfs, driver.home)
                except BaseException:
                    await _clean_up(functools.partial(self._remove_layer, chain))
                    raise
                self.store.meta.finish_layers({chain: (stats.entries, stats.bytes)})

    @asynccontextmanager
    async def holding_off(self, blobs: Iterable[str], chains: Iterable[str]) -> AsyncIterator[None]:
        """No download, config, unpack or record on these keys while the block runs, once
        those under way have ended: what gc and ``rmi`` remove in a worker thread meanwhile can
        then not be taken up by a pull, which leases a key before it looks for it and looks
        only in these (``imaged.store.gc``); it waits, and finds the key gone. Callers hold
        off one set at a time (``Service``): two sets taken in different orders would wait on
        each other."""
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(set(chains)):
                await stack.enter_async_context(self._unpacks.exclusive(key))
            for key in sorted(set(blobs)):
                await stack.enter_async_context(self._downloads.exclusive(key))
                await stack.enter_async_context(self._configs.exclusive(key))
            await stack.enter_async_context(self._record_lock)
            yield

    async def _remove_layer(self, chain: Digest) -> None:
        """Row first: a crash before the directory goes leaves a directory without a row, which
        recovery removes, never a row whose files are gone."""
        self._applied.pop(chain, None)
        self.store.meta.delete_layer(str(chain))
        await trio.to_thread.run_sync((await self.store.open_driver()).remove_layer, chain.hex)

    async def _record(self, small_blobs: list[tuple[Digest, bytes, str]],
                      new: NewImage) -> None:
        """Write the manifest, config and index, flush every blob not yet recorded, record.

        The lock serializes records: two pulls of one image would otherwise write the same
        manifest's ingest file at once. The file work runs in a thread; the transaction runs on
        the trio thread afterwards, because the one SQLite connection is shared and every other
        metadata call runs there: statements from a worker thread would land inside whatever
        transaction the trio thread had open, and the trio thread cannot interleave with itself.
        """
        content, meta = self.store.content, self.store.meta
        async with self._record_lock:
            new_small = [(d, data) for d, data, _ in small_blobs
                         if not content.has(d, len(data))]
            flush = any(not meta.has_blob(digest) for digest, _, _ in new.blobs)

            def write() -> None:
                for digest, data in new_small:
                    self._place_bytes(digest, data)
                if flush:
                    content.flush()

            await trio.to_thread.run_sync(write)
            meta.record_image(new)
            # Returned means durable: SQLite syncs its WAL only at checkpoints.
            await trio.to_thread.run_sync(self.store.flush_records)

    async def _undo(self, held: _Held) -> None:
        """Leave the store as it was (DESIGN §6), except for what others rely on.

        A key goes only when no other pull holds it and nothing recorded refers to it; children
        before parents, layers before the blobs they were read from. Each key is let go of as
        soon as it is decided, so of several pulls failing together the last to decide removes
        it. Removal waits for any flight on the key to wind down first (a cancelled unpack
        finishes its thread before it notices).
        """
        meta, lease = self.store.meta, held.lease
        for chain in reversed(held.chains):
            key = str(chain)
            if not self.leases.held_by_others(key, lease):
                async with self._unpacks.exclusive(key):
                    if not self.leases.held_by_others(key, lease) and \
                            not meta.layer_referenced(chain) and \
                            (chain in self._applied or meta.layer_state(chain) is not None):
                        await self._remove_layer(chain)
            lease.discard(key)
        for digest in held.blobs:
            key = str(digest)
            if not self.leases.held_by_others(key, lease):
                # Taken back in a thread, as gc removes: held off, a pull that leases the key
                # meanwhile cannot find the file and then lose it (a manifest's is looked for
                # under the record lock, not in a flight).
                async with self.holding_off([key], []):
                    if not self.leases.held_by_others(key, lease) and not meta.has_blob(digest):
                        await trio.to_thread.run_sync(self.store.content.uncommit, digest)
            lease.discard(key)


@dataclass
class _Held:
    """What one pull relies on, in the order it learned it: the lease's keys, ordered for
    undoing."""

    lease: Lease
    blobs: list[Digest] = field(default_factory=list)
    chains: list[Digest] = field(default_factory=list)

    def add_blobs(self, digests: list[Digest]) -> None:
        known = set(self.blobs)  # a list keeps the order; 128 layers made `in` on it quadratic
        for digest in digests:
            if digest not in known:
                known.add(digest)
                self.blobs.append(digest)
        self.lease.add(str(d) for d in digests)

    def add_chains(self, chains: list[Digest]) -> None:
        self.chains.extend(chains)
        self.lease.add(str(c) for c in chains)
