"""The conformance battery's fixtures: every test runs once per driver this host supports, and
fuse once more on xfs (``FILESYSTEM_AXIS``).

Like trio's ``check_two_way_stream``, the battery is the bar every driver is held to; a driver
that cannot do something says so in its capabilities, and the test follows what it says.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imaged.errors import ConflictError
from imaged.fsutil import remove_tree
from imaged.host.mounts import bind_mount, unmount
from imaged.testing.images import Entry, OCILayout, file, push
from imaged.testing.registry import LocalRegistry, local_registry, start_registry
from tests.cache import user_cache
from tests.conftest import (
    CLI,
    DRIVERS,
    Result,
    driver_bed,
    filesystem_type,
    unmount_below,
)


@dataclass
class Bed:
    """One driver, one root, one registry: build an image, pull it, run CLI commands."""

    driver: str
    root: Path
    registry: LocalRegistry
    layout: OCILayout
    run_cli: Any
    counter: int = 0

    def __call__(self, *args: str) -> Result:
        result: Result = self.run_cli("--driver", self.driver, *args)
        return result

    def ok(self, *args: str) -> Result:
        result = self(*args)
        assert result.code == 0, f"imaged {' '.join(args)}: {result.err}"
        return result

    def image(self, *layers: list[Entry], compression: str | None = "gzip") -> str:
        """Build, push and pull an image of these layers; returns its reference."""
        self.counter += 1
        name = f"conf-{self.driver}-{os.getpid()}-{id(self)}-{self.counter}"
        built = [self.layout.add_layer(entries, compression) for entries in layers]
        manifest = self.layout.add_image(built)
        self.layout.tag(manifest, name)
        ref = f"{self.registry.host}/conformance/{name}:v1"
        push(self.layout, name, ref)
        self.ok("pull", ref)
        return ref

    def pull(self, ref: str) -> str:
        self.ok("pull", ref)
        return ref

    def mount(self, ref: str, *extra: str) -> Path:
        return Path(self.ok("mount", ref, *extra).out.strip().splitlines()[-1])


DEEP_COUNTS = (128, 500)


@pytest.fixture(scope="session")
def deep_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, str]]:
    """128- and 500-layer images in a registry of their own, for every driver."""
    storage = deep_storage(tmp_path_factory.mktemp("deep"))
    registry = start_registry(tmp_path_factory.mktemp("deep-registry"), storage=storage)
    try:
        yield {count: f"{registry.host}/conformance/deep:{count}" for count in DEEP_COUNTS}
    finally:
        registry.stop()


def deep_storage(workdir: Path) -> Path:
    """Registry storage holding the deep images, filled (using ``workdir``) if not cached yet.

    Pushing their 628 blobs costs ~40 s on the host and ~4 min in the guest kernel, so the
    storage is kept in the user's cache under the images' digests (they are built the same way
    every time). The guest sees the host's cache read-only: the host fills it before booting."""
    layout = OCILayout(workdir / "layout")
    digests = []
    for count in DEEP_COUNTS:
        layers = [layout.add_layer([file(f"layer-{i:03d}", f"{i}\n".encode()),
                                    file("top", f"{i}\n".encode())], None)
                  for i in range(count)]
        manifest = layout.add_image(layers)
        layout.tag(manifest, f"deep{count}")
        digests.append(manifest.digest)
    key = hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]
    storage = user_cache() / "deep-registry" / key
    if not storage.is_dir():
        _fill_deep_storage(layout, storage, workdir / "registry")
    return storage


def _fill_deep_storage(layout: OCILayout, storage: Path, workdir: Path) -> None:
    """Push the deep images into a fresh storage directory, then move it to ``storage`` whole
    (a concurrent run that got there first wins) and drop storages of older images."""
    storage.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=".filling-", dir=storage.parent))
    try:
        with local_registry(workdir, storage=fresh) as registry:
            for count in DEEP_COUNTS:
                push(layout, f"deep{count}", f"{registry.host}/conformance/deep:{count}")
        with contextlib.suppress(OSError):
            fresh.rename(storage)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    for old in storage.parent.iterdir():
        if old != storage and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


# Beds that run a driver on a filesystem other than the one the tests' temporary directories are
# on (ext4 here), by id: the driver they run. Only fuse has one: its server counts the bytes the
# upper's filesystem allocates (st_blocks), and xfs allocates its own way (docs/drivers.md).
FILESYSTEM_AXIS = {"fuse-xfs": "fuse"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The filesystem axis runs in embedded mode only: what it adds (the upper's filesystem
    under the same server) does not depend on which process runs the CLI, and the daemon mode
    is the same code on every filesystem, which the ext4 bed runs in both modes. Deselected,
    not skipped: nothing is missing (docs/testing.md says what it saves)."""
    daemon_axis = [item for item in items
                   if (spec := getattr(item, "callspec", None)) is not None
                   and spec.params.get("driver") in FILESYSTEM_AXIS
                   and spec.params.get("cli_mode") == "daemon"]
    if daemon_axis:
        config.hook.pytest_deselected(items=daemon_axis)
        dropped = set(daemon_axis)
        items[:] = [item for item in items if item not in dropped]


@contextlib.contextmanager
def bound_directory(source: Path, target: Path) -> Iterator[None]:
    """``source`` (made fresh) bind-mounted at ``target``; afterwards unmounted, whatever is
    mounted under it first, and removed."""
    source.mkdir()
    target.mkdir(parents=True, exist_ok=True)
    bind_mount(source, target)
    try:
        yield
    finally:
        unmount_below(target)
        try:
            unmount(target)
        except ConflictError:  # a server still exiting holds the upper: detach, freed after
            unmount(target, lazy=True)
        remove_tree(source)


@pytest.fixture(params=[*DRIVERS, *FILESYSTEM_AXIS])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each built driver in turn on the temporary directory's filesystem, and the drivers of
    ``FILESYSTEM_AXIS`` on theirs: a test's id says which (``fuse``, ``fuse-xfs``)."""
    name = FILESYSTEM_AXIS.get(request.param, request.param)
    with contextlib.ExitStack() as stack:
        if request.param in FILESYSTEM_AXIS:
            stack.enter_context(bound_directory(
                request.getfixturevalue("xfs_filesystem") / tmp_path.name, tmp_path / "root"))
            assert filesystem_type(tmp_path / "root") == "xfs"
        yield stack.enter_context(driver_bed(request, tmp_path, name))


@pytest.fixture
def bed(driver: str, root: Path, registry: LocalRegistry, layout: OCILayout,
        imaged: CLI) -> Iterator[Bed]:
    try:
        yield Bed(driver, root, registry, layout, imaged)
        imaged.finish()  # the store checked before its mounts go
    finally:
        # Whatever a test left mounted under its root goes, even when the test failed.
        unmount_below(root)
