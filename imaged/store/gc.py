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

Removal runs on the caller's thread without a trio checkpoint between a key's lease check and
its removal, so a pull cannot lease something and start reusing it in between. The price is
that the event loop waits while a large layer is deleted.

Freed bytes are what ``du`` stops seeing: allocated blocks, not apparent sizes (see
``imaged.fsutil.freed_by_removing``), measured just before each removal.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from imaged.digest import Digest
from imaged.fsutil import freed_by_removing
from imaged.store.leases import Leases
from imaged.store.root import Store, why_layer_stays

log = logging.getLogger("imaged.store.gc")


@dataclass(frozen=True)
class Removed:
    freed_bytes: int
    blobs: int
    layers: int
    partials: int = 0  # partial downloads (gc only)
    failed: tuple[str, ...] = ()  # what could not be removed, and why: not counted as freed

    def to_json(self) -> dict[str, Any]:
        """The shape of ``POST /v1/gc`` (DESIGN §5, with ``partials`` and ``failed`` added)."""
        return {"freed_bytes": self.freed_bytes,
                "removed": {"blobs": self.blobs, "layers": self.layers,
                            "partials": self.partials},
                "failed": list(self.failed)}


def release(store: Store, leases: Leases, blobs: Iterable[Digest],
            layers: Iterable[str]) -> Removed:
    """Remove blobs and layers (by ChainID, ``sha256:<hex>``) the metadata no longer needs,
    except what a lease holds.

    Blobs arrive with their rows already deleted (in the transaction that orphaned them), so
    only files remain to go. A layer's row goes before its directory: a crash in between leaves
    a directory without a row, which recovery removes, never a ready row whose files are gone.
    """
    freed = removed_blobs = removed_layers = 0
    failed: list[str] = []
    for digest in blobs:
        if leases.held(str(digest)):
            continue
        freed += freed_by_removing([store.content.path(digest)])
        store.content.remove(digest)
        removed_blobs += 1
    wanted = [chain for chain in layers if not leases.held(chain)]
    driver = store.recorded_driver() if wanted else None
    if driver is not None:
        for chain in wanted:
            key = chain.split(":", 1)[1]
            paths = driver.layer_paths(key)
            before = freed_by_removing(paths)
            store.meta.delete_layer(chain)
            why = why_layer_stays(driver, key)
            if why is not None:  # what stayed on disk was not freed
                freed += before - freed_by_removing(paths)
                failed.append(f"layer {chain}: {why}")
                log.warning("gc could not remove layer %s: %s", chain, why)
                continue
            freed += before
            removed_layers += 1
    return Removed(freed, removed_blobs, removed_layers, failed=tuple(failed))


def collect(store: Store, leases: Leases) -> Removed:
    """Find everything nothing references or leases (module docstring) and remove it."""
    blobs = set(store.meta.drop_orphan_blobs())
    referenced = store.meta.referenced_blobs()
    blobs.update(digest for digest, _ in store.content.iter_blobs()
                 if str(digest) not in referenced)
    # Children before parents: layers with no row (a crash between a row and its removal)
    # sit on top of recorded ones, and layers being created on top of ready ones.
    creating = store.meta.layers_in_state("creating")
    layers = []
    driver = store.recorded_driver()
    if driver is not None:
        recorded = {chain.split(":", 1)[1] for chain in
                    (*store.meta.layers_in_state("ready"), *creating)}
        layers += [f"sha256:{key}" for key in sorted(driver.list_layers() - recorded)]
    layers += creating + store.meta.unused_layers()
    removed = release(store, leases, sorted(blobs), layers)
    partials = [path for digest, path in store.content.partials()
                if not leases.held(str(digest))]  # a running pull's download is leased
    freed = freed_by_removing(partials)
    for path in partials:
        path.unlink(missing_ok=True)
    return dataclasses.replace(removed, freed_bytes=removed.freed_bytes + freed,
                               partials=len(partials))
