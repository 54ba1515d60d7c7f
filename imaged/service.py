"""The operations behind every CLI command and (later) every API endpoint, in one place.

Results are plain JSON-ready dicts so the CLI's ``--json``, its tables and the socket API all
print the same facts.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from imaged import __version__
from imaged.config import Config
from imaged.errors import ConflictError
from imaged.metadata import ImageRow
from imaged.pull import PullResult, Reporter, pull
from imaged.registry_client.client import RegistryClient
from imaged.registry_client.manifest import Platform
from imaged.registry_client.reference import parse_reference
from imaged.store import Store, backing_filesystem


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
    def __init__(self, store: Store, client: RegistryClient) -> None:
        self.store = store
        self.client = client

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config, holder: str) -> AsyncIterator[Service]:
        store = Store(config, holder)
        client = RegistryClient(config)
        try:
            yield cls(store, client)
        finally:
            client.close()
            store.close()

    async def pull(self, ref_text: str, platform_text: str | None,
                   report: Reporter) -> PullResult:
        ref = parse_reference(ref_text)
        platform = Platform.parse(platform_text) if platform_text else Platform.host()
        return await pull(self.store, self.client, ref, platform, report,
                          platform_explicit=platform_text is not None)

    def images(self) -> list[dict[str, Any]]:
        return [image_json(row) for row in self.store.meta.images()]

    def image(self, text: str) -> dict[str, Any]:
        return image_json(self.store.image(text))

    def rmi(self, text: str, force: bool = False) -> dict[str, Any]:
        """Drop a reference (or, given an ID, all of its references) and unused blobs.

        Given an ID with several names, refuse without ``force`` as Docker does: removing every
        name of an image at once is rarely what was meant.
        """
        image_id, name = self.store.resolve_image(text)
        if name is None:
            names = list(self.store.image(str(image_id)).refs)
            if len(names) > 1 and not force:
                raise ConflictError(
                    f"image {image_id.short} is referenced by {len(names)} names "
                    f"({', '.join(names)}); remove them by name or use --force")
        else:
            names = [name]
        orphans = self.store.meta.remove_refs(names)
        freed = sum(self.store.content.remove(digest) for digest in orphans)
        deleted = self.store.meta.image(image_id) is None
        return {"ok": True, "id": str(image_id), "untagged": names, "deleted": deleted,
                "freed_bytes": freed}

    def info(self) -> dict[str, Any]:
        fstype, mount_point = backing_filesystem(self.store.root)
        blobs, blob_bytes = self.store.content_usage()
        return {
            "version": __version__,
            "root": str(self.store.root),
            "backing_filesystem": {"type": fstype, "mount_point": mount_point},
            "driver": self.store.meta.get_setting("driver"),
            "drivers": [],
            "platform": str(Platform.host()),
            "kernel": _platform.release(),
            "content": {"blobs": blobs, "bytes": blob_bytes},
            "images": len(self.store.meta.images()),
        }

