"""The conformance battery's fixtures: every test runs once per driver this host supports.

Like trio's ``check_two_way_stream``, the battery is the bar every driver is held to; a driver
that cannot do something says so in its capabilities, and the test follows what it says.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imaged.bench.images import Entry, OCILayout, file, push
from imaged.bench.registry import LocalRegistry
from tests.conftest import Result, unmount_below


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


@pytest.fixture(scope="session")
def deep_images(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[int, str]:
    """128- and 500-layer images, pushed once for every driver (a push costs ~25 s)."""
    layout = OCILayout(tmp_path_factory.mktemp("deep"))
    refs = {}
    for count in (128, 500):
        layers = [layout.add_layer([file(f"layer-{i:03d}", f"{i}\n".encode()),
                                    file("top", f"{i}\n".encode())], None)
                  for i in range(count)]
        manifest = layout.add_image(layers)
        layout.tag(manifest, f"deep{count}")
        refs[count] = f"{registry.host}/conformance/deep:{count}"
        push(layout, f"deep{count}", refs[count])
    return refs


@pytest.fixture
def bed(driver: str, root: Path, registry: LocalRegistry, layout: OCILayout,
        imaged: Any) -> Iterator[Bed]:
    yield Bed(driver, root, registry, layout, imaged)
    # Whatever a test left mounted under its root goes, even when the test failed.
    unmount_below(root)
