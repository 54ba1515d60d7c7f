"""``imaged update NAME --materialize`` end to end, through the CLI in both of its modes: it
completes a fuse container's partial files (``ps`` says how many there are), after which kernel
overlay over the same lowers and the upper shows the tree the server showed; it changes nothing
when the quota has no room for the copies, succeeds doing nothing once there are no partial
files, and is refused for a missing container and by a driver that copies up whole files.
tests/integration/test_fuse_partial.py holds the server's and the driver's side of it (control
socket, offline materialising, kill -9)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from imaged.host.mounts import unmount
from imaged.testing.images import OCILayout, directory, file, push
from imaged.testing.registry import LocalRegistry
from tests.conftest import CLI, add_config, unmount_below
from tests.integration.fusebed import mount_overlay, walk
from tests.integration.test_fuse_lifecycle import (
    _cli,
    _server,
    _state,
    fuse_root,  # noqa: F401 - a fixture, by name
)

pytestmark = [pytest.mark.cli_modes]

BIG = 4 << 20


def _image(layout: OCILayout, registry: LocalRegistry, request: pytest.FixtureRequest) -> str:
    """Two layers: ``dir/big`` (random bytes) and ``gone`` below, a note and a whiteout of
    ``gone`` above."""
    data = random.Random(5).randbytes(BIG)  # noqa: S311 - reproducible data, not a secret
    base = layout.add_layer([directory("dir"), file("dir/big", data), file("small", b"small\n"),
                             file("gone", b"hidden\n")])
    top = layout.add_layer([file("note", b"top\n"), file(".wh.gone", b"")])
    name = f"m{hashlib.sha256(request.node.name.encode()).hexdigest()[:12]}"
    layout.tag(layout.add_image([base, top]), name)
    ref = f"{registry.host}/materialize/{name}:v1"
    push(layout, name, ref)
    return ref


def _lowers(root: Path, name: str) -> list[Path]:
    """The lowers the container's server stacks, top first: its own ``--lower`` arguments."""
    pid, _ = _server(root, name)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return [Path(argv[i + 1]) for i, arg in enumerate(argv) if arg == "--lower"]


def _update(imaged: CLI, *args: str) -> Any:
    return imaged("--driver", "fuse", "--json", "update", *args)


@pytest.mark.usefixtures("fuse_root")
def test_materialize_completes_partial_files_then_kernel_overlay_agrees(
        root: Path, tmp_path: Path, registry: LocalRegistry, layout: OCILayout,
        imaged: CLI, request: pytest.FixtureRequest) -> None:
    add_config(tmp_path, '[drivers.fuse]\ncopy_up = "partial"\n')
    ref = _image(layout, registry, request)
    _cli(imaged, "pull", ref)
    merged = Path(_cli(imaged, "mount", ref, "--name", "m", "--quota", "1M").out.strip())
    with (merged / "dir" / "big").open("r+b") as big:
        big.seek(BIG // 2)
        big.write(b"edited")
    (merged / "small").unlink()
    (merged / "new").write_text("new\n")
    before = _state(imaged, "m")
    assert before["partial_files"] == 1, before

    # The copies need 4 MiB, the quota has 1: refused, and nothing changed.
    refused = _update(imaged, "m", "--materialize")
    assert refused.code == 1 and refused.json()["error"]["code"] == "conflict", refused.err
    assert "grow the quota" in refused.err
    after = _state(imaged, "m")
    assert (after["partial_files"], after["used_bytes"], after["quota"]) == \
        (1, before["used_bytes"], 1 << 20)

    # A bigger quota first, then the copies, in one call.
    done = _update(imaged, "m", "--quota", "16M", "--materialize")
    assert done.code == 0, done.err
    assert done.json()["partial_files"] == 0 and done.json()["quota"] == 16 << 20
    listed = _state(imaged, "m")
    assert listed["partial_files"] == 0 and listed["used_bytes"] >= BIG, listed

    # Without partial files (any more) it has nothing to do, and says so by succeeding; a
    # container that does not exist is not found.
    again = _update(imaged, "m", "--materialize")
    assert again.code == 0 and again.json()["partial_files"] == 0, again.err
    assert _state(imaged, "m")["used_bytes"] == listed["used_bytes"]
    missing = _update(imaged, "nosuch", "--materialize")
    assert missing.code == 1 and missing.json()["error"]["code"] == "not_found", missing.err
    seen = walk(merged)
    expected = bytearray(random.Random(5).randbytes(BIG))  # noqa: S311 - the image's bytes
    expected[BIG // 2:BIG // 2 + 6] = b"edited"
    assert (merged / "dir" / "big").read_bytes() == expected
    lowers = _lowers(root, "m")
    _cli(imaged, "umount", "m")

    home = root / "drivers" / "fuse" / "containers" / "m"
    kernel, work = tmp_path / "kernel", tmp_path / "kwork"
    kernel.mkdir()
    work.mkdir()
    mount_overlay(lowers, home / "upper", work, kernel)
    try:
        assert walk(kernel) == seen
    finally:
        unmount(kernel, lazy=True)


@pytest.mark.parametrize("driver", ["vfs"], indirect=True)
def test_materialize_is_refused_by_a_driver_without_partial_files(
        driver: str, root: Path, registry: LocalRegistry, layout: OCILayout, imaged: CLI,
        request: pytest.FixtureRequest) -> None:
    ref = _image(layout, registry, request)
    try:
        assert imaged("--driver", driver, "pull", ref).code == 0
        assert imaged("--driver", driver, "mount", ref, "--name", "c").code == 0
        before = imaged("--driver", driver, "--json", "ps").json()
        for extra in ((), ("--quota", "64M")):
            refused = imaged("--driver", driver, "--json", "update", "c", *extra,
                             "--materialize")
            assert refused.code == 1 and refused.json()["error"]["code"] == "invalid", \
                refused.err
            assert "imaged: error: container c has no partial files to materialize: the vfs " \
                   "driver copies up whole files" in refused.err
        assert imaged("--driver", driver, "--json", "ps").json() == before  # no quota either
        imaged.finish()  # the store checked before its mount goes
    finally:
        unmount_below(root)
