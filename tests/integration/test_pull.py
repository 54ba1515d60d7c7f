"""Pulls from a real registry (Debian's docker-registry on 127.0.0.1), through the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imaged.bench.images import OCILayout
from imaged.bench.registry import LocalRegistry

from tests.conftest import push_simple


def test_pull_records_image_and_prints_id(registry: LocalRegistry, layout: OCILayout,
                                          imaged: Any, root: Path) -> None:
    pushed = push_simple(layout, registry, "pull/basic")
    result = imaged("pull", pushed.ref)
    assert result.code == 0, result.err
    assert result.out.strip().splitlines()[-1] == pushed.manifest_digest
    listing = imaged("--json", "images").json()
    assert [img["id"] for img in listing] == [pushed.manifest_digest]
    assert listing[0]["refs"] == [pushed.ref]
    assert listing[0]["layers"] == 2
    blobs = {p.name for p in (root / "content" / "blobs" / "sha256").iterdir()}
    assert pushed.manifest_digest.split(":")[1] in blobs
    assert not any((root / "content" / "ingest").iterdir())
