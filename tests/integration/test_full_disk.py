"""A root whose filesystem is full: the commands that free space still work, a pull that runs
out of space says so (not as a network error) and how much it needed, and gc removes the partial
downloads a failed pull left."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imaged.testing.images import OCILayout, file, push
from imaged.testing.registry import LocalRegistry
from tests.conftest import Result, hog, loop_filesystem, push_simple

MiB = 1 << 20


@pytest.fixture
def small_root(root: Path, tmp_path: Path) -> Iterator[Path]:
    """The root on an ext4 of its own, small enough to fill."""
    root.mkdir(parents=True, exist_ok=True)
    with loop_filesystem(["mkfs.ext4", "-q", "-F", "-m", "0"], tmp_path / "root.img", root,
                         size=192 * MiB) as mounted:
        yield mounted


def ok(imaged: Any, *args: str) -> Result:
    result: Result = imaged(*args)
    assert result.code == 0, result.err
    return result


@pytest.mark.cli_modes
def test_commands_that_free_space_work_on_a_full_root(
        small_root: Path, imaged: Any, registry: LocalRegistry, layout: OCILayout) -> None:
    pushed = push_simple(layout, registry, "full/app")
    ok(imaged, "pull", pushed.ref)
    ok(imaged, "mount", pushed.ref, "--name", "c1")
    ok(imaged, "mount", pushed.ref, "--name", "c2")
    hog(small_root / "hog")
    assert os.statvfs(small_root).f_bavail == 0
    assert "c1" in ok(imaged, "ps").out
    ok(imaged, "umount", "c2")
    ok(imaged, "rm", "--force", "c1")
    ok(imaged, "rm", "c2")
    ok(imaged, "rmi", pushed.ref)
    ok(imaged, "gc")  # rmi already removed what the image alone held
    assert ok(imaged, "--json", "images").json() == []


def test_a_pull_out_of_space_says_so_and_gc_removes_its_partial(
        small_root: Path, imaged: Any, registry: LocalRegistry, layout: OCILayout,
        tmp_path: Path) -> None:
    big = layout.add_layer([file("big", os.urandom(48 * MiB))], None)
    manifest = layout.add_image([big])
    layout.tag(manifest, "big")
    ref = f"{registry.host}/full/big:v1"
    push(layout, "big", ref)
    ok(imaged, "images")  # the root exists
    hog(small_root / "hog")
    os.truncate(small_root / "hog", os.path.getsize(small_root / "hog") - 24 * MiB)
    result = imaged("pull", ref)
    assert result.code == 1
    assert "no space left for blob" in result.err and "more (48" in result.err, result.err
    assert "attempts" not in result.err and "connection" not in result.err
    partials = list((small_root / "content" / "ingest").iterdir())
    assert partials and sum(p.stat().st_size for p in partials) > 16 * MiB
    removed = ok(imaged, "--json", "gc").json()
    assert removed["removed"]["partials"] == len(partials)
    assert removed["freed_bytes"] > 16 * MiB
    assert list((small_root / "content" / "ingest").iterdir()) == []
