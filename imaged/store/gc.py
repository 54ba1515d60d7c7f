"""Garbage collection: removing the blobs and driver layers nothing needs, and saying what that
freed.

What is kept, and why:

- a blob an image references (its manifest, config or a layer) or a name resolved through (an
  index): the metadata is the record of what is wanted;
- a layer in any recorded image's chain. An image stays recorded while a container sits on it,
  even once ``rmi --force`` took its last name (the containers table's foreign key on images
  holds it there), so the chains of recorded images cover every container's layers as well;
- anything leased (``Service.leases``): a pull's blobs and layers exist on disk before the one
  transaction that records them, and only its lease says they are wanted. A leased blob keeps
  its file; its row, if it had one, goes, and the pull records it again when it finishes.

Everything else goes: unreferenced blob files and rows, ready layers outside every chain, layers
still in state ``creating`` that no lease holds (nobody is applying them: recovery at open
removes them for the same reason), layer directories with no row at all (as recovery does), and
partial downloads no running pull holds (a failed pull leaves its partial blobs for a retry to
resume; gc is how an operator who needs the space back gets it).

What to remove is decided from the directories, listed in a worker thread (``listing``), and
then the rows, read on the trio thread: in that order, since a pull records a layer's row before
it makes its directory (``candidates`` says why that suffices). The removal itself runs in a
worker thread (``Service._remove``), walking each layer for the bytes it frees and deleting it,
which on a layer of thousands of files held the loop for a third of a second; one removal runs
at a time, gc's listing included, so an ``rmi`` cannot delete rows between gc's listing and
its rows.
A pull may lease a key meanwhile; what keeps it from reusing what is being removed is that the
service holds the pulls' flights and records off every key being removed
(``Puller.holding_off``): the pull waits, then finds the key gone and fetches or applies it
again. Once they are held off, what a pull recorded while the service waited for that is taken
out of the removal (no pull can record meanwhile), and the lease is checked again, in the
thread, right before each removal.

Freed bytes are what ``du`` stops seeing: allocated blocks, not apparent sizes (see
``imaged.fsutil.freed_by_removing``), measured just before each removal.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaged.digest import Digest
from imaged.drivers import Driver
from imaged.errors import ConflictError
from imaged.fsutil import freed_by_removing
from imaged.store.leases import Leases
from imaged.store.metadata import Metadata
from imaged.store.root import Store, why_layer_stays

log = logging.getLogger("imaged.store.gc")


@dataclass(frozen=True)
class Removed:
    freed_bytes: int
    blobs: int
    layers: int
    partials: int = 0  # partial downloads (gc only)
    failed: tuple[str, ...] = ()  # what could not be removed, and why: not counted as freed
    containers: int = 0  # removals of containers finished (gc only: ``finish_removals``)
    pending: tuple[str, ...] = ()  # removals still held, and by what

    def to_json(self) -> dict[str, Any]:
        """The shape of ``POST /v1/gc`` (DESIGN §5, with ``partials``, ``containers``,
        ``failed`` and ``pending`` added)."""
        return {"freed_bytes": self.freed_bytes,
                "removed": {"blobs": self.blobs, "layers": self.layers,
                            "partials": self.partials, "containers": self.containers},
                "failed": list(self.failed), "pending": list(self.pending)}


def release(store: Store, leases: Leases, blobs: Iterable[Digest],
            layers: Iterable[str], driver: Driver | None, meta: Metadata) -> Removed:
    """Remove blobs and layers (by ChainID, ``sha256:<hex>``) the metadata no longer needs,
    except what a lease holds; ``driver`` is the root's recorded one (None: no layers).

    Blobs arrive with their rows already deleted (in the transaction that orphaned them), so
    only files remain to go. A layer's row goes before its directory: a crash in between leaves
    a directory without a row, which recovery removes, never a ready row whose files are gone.
    ``meta`` deletes the rows: ``store.meta`` on the trio thread, ``from_thread(store.meta)``
    in a worker thread (``imaged.store.metadata``).
    """
    freed = removed_blobs = removed_layers = 0
    failed: list[str] = []
    for digest in blobs:
        if leases.held(str(digest)):
            continue
        freed += freed_by_removing([store.content.path(digest)])
        store.content.remove(digest)
        removed_blobs += 1
    if driver is not None:
        for chain in layers:
            if leases.held(chain):
                continue
            key = chain.split(":", 1)[1]
            paths = driver.layer_paths(key)
            before = freed_by_removing(paths)
            meta.delete_layer(chain)
            why = why_layer_stays(driver, key)
            if why is not None:  # what stayed on disk was not freed
                freed += before - freed_by_removing(paths)
                failed.append(f"layer {chain}: {why}")
                log.warning("gc could not remove layer %s: %s", chain, why)
                continue
            freed += before
            removed_layers += 1
    return Removed(freed, removed_blobs, removed_layers, failed=tuple(failed))


def finish_removals(driver: Driver | None, removed: Removed) -> Removed:
    """``removed`` with the containers finished that ``rm`` had to leave to a later time (a
    mount that a forced umount detached still held part of them: ``Driver.removals``) and
    that nothing holds any more; those still held are listed as pending, with their holder."""
    if driver is None:
        return removed
    freed = finished = 0
    pending = []
    for key, why in driver.removals().items():
        if why is not None:
            pending.append(f"{key}: {why}")
            continue
        before = freed_by_removing([driver.home / "removed" / key])
        try:
            driver.finish_removal(key)
        except ConflictError as exc:  # held again since it was looked at
            pending.append(str(exc))
            continue
        freed += before
        finished += 1
    return dataclasses.replace(removed, freed_bytes=removed.freed_bytes + freed,
                               containers=finished, pending=tuple(pending))


@dataclass(frozen=True)
class Listing:
    """What is on disk, listed in a worker thread before ``candidates`` reads the rows."""

    blobs: list[Digest]  # committed blob files
    layers: set[str]  # the driver's layers, by key
    partials: list[tuple[Digest, Path]]  # partial downloads in ingest


def listing(store: Store, driver: Driver | None) -> Listing:
    """The blob files, the driver's layers (None: no driver recorded) and the partial
    downloads; in a worker thread, since on a slow disk each directory read waits on it."""
    return Listing([digest for digest, _ in store.content.iter_blobs()],
                   driver.list_layers() if driver is not None else set(),
                   store.content.partials())


def candidates(store: Store, listed: Listing) -> tuple[list[Digest], list[str]]:
    """Everything nothing references (module docstring): blobs, then layers, children before
    parents, from ``listed`` and the rows read after it on the trio thread. Files before rows
    is what keeps this right without holding the loop: a pull records a layer's row before it
    makes its directory, so a listed layer's row is there when the rows are read; a blob file
    or layer a pull makes after the listing is not a candidate; one whose row a pull records
    after the listing is taken out again (``Service._remove``)."""
    blobs = set(store.meta.drop_orphan_blobs())
    referenced = store.meta.referenced_blobs()
    blobs.update(digest for digest in listed.blobs if str(digest) not in referenced)
    # Children before parents: layers with no row (a crash between a row and its removal)
    # sit on top of recorded ones, and layers being created on top of ready ones.
    creating = store.meta.layers_in_state("creating")
    recorded = {chain.split(":", 1)[1] for chain in
                (*store.meta.layers_in_state("ready"), *creating)}
    layers = [f"sha256:{key}" for key in sorted(listed.layers - recorded)]
    layers += creating + store.meta.unused_layers()
    return sorted(blobs), layers


def remove_partials(store: Store, leases: Leases, partials: Iterable[tuple[Digest, Path]],
                    removed: Removed) -> Removed:
    """``removed`` with the partial downloads no running pull holds removed too (a running
    pull's download is leased)."""
    gone = [path for digest, path in partials if not leases.held(str(digest))]
    freed = freed_by_removing(gone)
    for path in gone:
        path.unlink(missing_ok=True)
    return dataclasses.replace(removed, freed_bytes=removed.freed_bytes + freed,
                               partials=len(gone))
