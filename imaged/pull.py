"""Pull: reference → manifest (through an index if need be) → config → layers → one record.

Nothing enters the store until everything has been fetched and verified: layers wait in ingest,
then the blobs are committed and the image is recorded in one transaction. A pull that fails at
any point therefore leaves the store as it was; the bytes it did fetch stay in ingest and the
next attempt resumes from them (after hashing them again).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from imaged.content import Ingest
from imaged.digest import Digest, chain_ids
from imaged.errors import ContentError, InternalError, collapse
from imaged.fsutil import syncfs
from imaged.metadata import LayerRow, NewImage
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
from imaged.store import Store
from imaged.unpack import UnpackLimits, UnpackStats, unpack_layer


@dataclass(frozen=True)
class PullEvent:
    """One step of a pull, as the CLI shows it and the API streams it (DESIGN §5)."""

    status: str  # resolving, resolved, exists, downloading, verified, unpacking, unpacked, done
    layer: str | None = None
    current: int | None = None
    total: int | None = None
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        for key in ("layer", "current", "total", "id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out


Reporter = Callable[[PullEvent], None]


@dataclass(frozen=True)
class PullResult:
    id: Digest
    config_digest: Digest
    ref: str
    layers: int


async def pull(store: Store, client: RegistryClient, ref: Reference, platform: Platform,
               report: Reporter, platform_explicit: bool = False) -> PullResult:
    limits = store.config.limits
    report(PullEvent("resolving", extra={"ref": str(ref)}))
    top = await client.fetch_manifest(ref, ref.object, limits.max_manifest_bytes)
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
        fetched = await client.fetch_manifest(ref, str(chosen.digest), limits.max_manifest_bytes)
        if len(fetched.data) != chosen.size:
            raise ContentError(f"manifest {chosen.digest} is {len(fetched.data)} bytes, the index "
                               f"says {chosen.size}")
        manifest_doc = parse_manifest_document(fetched.data, fetched.content_type)
        if not isinstance(manifest_doc, Manifest):
            raise ContentError(f"index entry {chosen.digest} is itself an index; nested indexes "
                               "are not supported")
        manifest, manifest_digest, manifest_bytes = manifest_doc, fetched.digest, fetched.data
    else:
        manifest, manifest_digest, manifest_bytes = document, top.digest, top.data
    small_blobs.append((manifest_digest, manifest_bytes, manifest.media_type))

    if store.content.has(manifest.config.digest, manifest.config.size):
        config_bytes = store.content.read_bytes(manifest.config.digest)
    else:
        config_bytes = await client.fetch_small_blob(ref, manifest.config,
                                                     limits.max_manifest_bytes)
    small_blobs.append((manifest.config.digest, config_bytes, manifest.config.media_type))
    config = parse_image_config(config_bytes, manifest)
    if platform_explicit and platform.accepts(config.platform) is None:
        raise ContentError(f"{ref} is an image for {config.platform}, not {platform}")
    for i, layer in enumerate(manifest.layers):
        if layer.size > limits.max_layer_bytes:
            raise ContentError(f"layer {i} ({layer.digest}) is {layer.size} bytes, over "
                               "limits.max_layer_bytes")
    report(PullEvent("resolved", id=str(manifest_digest),
                     extra={"config_digest": str(manifest.config.digest),
                            "layers": len(manifest.layers)}))

    ingests = await _fetch_layers(store, client, ref, manifest.layers, report,
                                  limits.concurrent_downloads)
    try:
        created = await unpack_layers(store, manifest.layers, config.diff_ids, ingests, report)
    except BaseException:
        for ingest in ingests.values():
            ingest.close()
        raise
    # Renames, fsyncs and one SQLite transaction: blocking work, so off the trio thread.
    try:
        await trio.to_thread.run_sync(_record, store, ref, manifest, manifest_digest,
                                      index_digest, small_blobs, config.diff_ids,
                                      config.platform, ingests)
    except BaseException:
        await trio.to_thread.run_sync(_remove_layers, store, created)
        raise
    report(PullEvent("done", id=str(manifest_digest)))
    return PullResult(manifest_digest, manifest.config.digest, str(ref), len(manifest.layers))


async def _fetch_layers(store: Store, client: RegistryClient, ref: Reference,
                        layers: tuple[Descriptor, ...], report: Reporter,
                        concurrency: int) -> dict[Digest, Ingest]:
    """Download every layer not in the store, at most ``concurrency`` at once, into ingest.

    An image may list one blob several times (empty layers); each is fetched once.
    """
    unique: dict[Digest, Descriptor] = {}
    for layer in layers:
        unique.setdefault(layer.digest, layer)
    ingests: dict[Digest, Ingest] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def one(desc: Descriptor) -> None:
        layer = str(desc.digest)
        if store.content.has(desc.digest, desc.size):
            report(PullEvent("exists", layer=layer, current=desc.size, total=desc.size))
            return
        async with limiter:
            ingest = await trio.to_thread.run_sync(store.content.open_ingest, desc.digest,
                                                   desc.size)
            ingests[desc.digest] = ingest
            report(PullEvent("downloading", layer=layer, current=ingest.offset, total=desc.size))

            def progress(current: int) -> None:
                report(PullEvent("downloading", layer=layer, current=current, total=desc.size))

            await client.fetch_blob(ref, desc, ingest, progress)
            await trio.to_thread.run_sync(ingest.verify)
            report(PullEvent("verified", layer=layer, current=desc.size, total=desc.size))

    try:
        async with trio.open_nursery() as nursery:
            for desc in unique.values():
                nursery.start_soon(one, desc)
    except BaseException as exc:
        for ingest in ingests.values():
            ingest.close()
        if isinstance(exc, BaseExceptionGroup):
            raise collapse(exc) from None
        raise
    return ingests


async def unpack_layers(store: Store, layers: tuple[Descriptor, ...],
                        diff_ids: tuple[Digest, ...], ingests: dict[Digest, Ingest],
                        report: Reporter) -> list[Digest]:
    """Apply every layer the driver does not hold yet; returns the chain IDs it created.

    Stacked drivers apply layers independently, so all of them run at once (bounded by the
    cores); snapshot drivers build each layer on its parent, so they go in order. On failure
    every layer this call created is removed again: a failed pull adds nothing.
    """
    driver = store.driver()
    caps = driver.capabilities()
    chains = chain_ids(list(diff_ids))
    limits = UnpackLimits(store.config.limits.max_layer_bytes,
                          store.config.limits.max_layer_entries)
    todo = [i for i, chain in enumerate(chains) if store.meta.layer_state(chain) != "ready"]
    created: list[Digest] = []
    applied: dict[Digest, UnpackStats] = {}
    # Unpacking is CPU-bound (decompression, hashing) and disk-bound: one worker per core.
    limiter = trio.CapacityLimiter(os.cpu_count() or 2)

    def apply(i: int) -> UnpackStats:
        desc = layers[i]
        blob = ingests[desc.digest].path if desc.digest in ingests else \
            store.content.path(desc.digest)
        parent = chains[i - 1] if i else None
        target = driver.prepare_layer(chains[i].hex, None if parent is None else parent.hex)
        try:
            stats = unpack_layer(blob, desc.media_type, diff_ids[i], target, caps.whiteouts,
                                 limits)
        except OSError as exc:
            # The target filesystem failed us (full, read-only, I/O error): say where.
            notes = "; ".join(getattr(exc, "__notes__", []))
            raise InternalError(f"unpacking layer {desc.digest} into {target} failed: "
                                f"{exc.strerror or exc}{f' ({notes})' if notes else ''}") \
                from None
        driver.commit_layer(chains[i].hex)
        return stats

    async def one(i: int) -> None:
        chain = chains[i]
        store.meta.begin_layer(chain, chains[i - 1] if i else None, diff_ids[i], driver.name)
        created.append(chain)
        report(PullEvent("unpacking", layer=str(layers[i].digest)))
        stats = await trio.to_thread.run_sync(apply, i, limiter=limiter)
        applied[chain] = stats
        report(PullEvent("unpacked", layer=str(layers[i].digest),
                         extra={"entries": stats.entries, "bytes": stats.bytes}))

    try:
        if caps.family == "stacked":
            async with trio.open_nursery() as nursery:
                for i in todo:
                    nursery.start_soon(one, i)
        else:
            for i in todo:
                await one(i)
        if applied:
            # One flush for every layer of this pull, before any is marked ready: recovery
            # trusts ready layers, and a syncfs per layer cost more than the layers (128 small
            # layers spent longer in syncfs than in unpacking).
            await trio.to_thread.run_sync(syncfs, driver.home)
            store.meta.finish_layers({chain: (s.entries, s.bytes) for chain, s in applied.items()})
    except BaseException as exc:
        await trio.to_thread.run_sync(_remove_layers, store, created)
        if isinstance(exc, BaseExceptionGroup):
            raise collapse(exc) from None
        raise
    return created


def _remove_layers(store: Store, chains: list[Digest]) -> None:
    driver = store.driver()
    for chain in chains:
        driver.remove_layer(chain.hex)
        store.meta.delete_layer(str(chain))


def _record(store: Store, ref: Reference, manifest: Manifest, manifest_digest: Digest,
            index_digest: Digest | None, small_blobs: list[tuple[Digest, bytes, str]],
            diff_ids: tuple[Digest, ...], image_platform: Platform,
            ingests: dict[Digest, Ingest]) -> None:
    """Commit the fetched blobs and record the image; on failure take the new blobs back out."""
    committed: list[Digest] = []
    pending = dict(ingests)
    try:
        for digest, data, _ in small_blobs:
            if digest not in pending and not store.content.has(digest, len(data)):
                pending[digest] = store.content.ingest_bytes(digest, data)
        committed = list(pending)  # uncommit of a blob not yet renamed is a no-op
        store.content.commit_all(list(pending.values()))
        chains = chain_ids(list(diff_ids))
        layer_rows = tuple(
            LayerRow(i, layer.digest, diff_ids[i], chains[i], layer.media_type, layer.size)
            for i, layer in enumerate(manifest.layers)
        )
        blobs = {d: (d, len(data), mt) for d, data, mt in small_blobs}
        for layer in manifest.layers:
            blobs.setdefault(layer.digest, (layer.digest, layer.size, layer.media_type))
        store.meta.record_image(NewImage(
            ref=str(ref), id=manifest_digest, media_type=manifest.media_type,
            config_digest=manifest.config.digest, platform=str(image_platform),
            index_digest=index_digest, layers=layer_rows, blobs=tuple(blobs.values()),
        ))
    except BaseException:
        for digest in committed:
            store.content.uncommit(digest)
        raise
    finally:
        for ingest in pending.values():
            ingest.close()

