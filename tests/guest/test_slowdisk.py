"""A slow disk (issue 17): the root on ext4 over ``dm-delay`` adding 50 ms to every write, and
the daemon still answers ``GET /v1/info`` while a pull and a gc run, because blocking work runs
in threads, never on the event loop.

Timings are not asserted in this project's tests, but this responsiveness is the property the
issue asks for, so the latencies are recorded and printed and the test fails only on a bound no
healthy run comes near: one answer taking over ``BOUND`` seconds means the event loop sat in a
write (each costs 50 ms here, a pull's syncfs many of them). The test also requires that the
answers were sampled while the pull and gc ran, so a run too quick to overlap cannot pass.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imaged.cli.client import DaemonClient, segment
from imaged.host import loopdev
from imaged.host.mounts import unmount
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conftest import push_simple, unmount_below
from tests.guest.test_powercut import run

pytestmark = pytest.mark.guest

MiB = 1 << 20
DISK_SIZE = 256 * MiB
DELAY_MS = 50
BOUND = 1.0


@contextlib.contextmanager
def delayed(image: Path, name: str) -> Iterator[Path]:
    """A dm-delay device over ``image``: reads at once, writes ``DELAY_MS`` late."""
    with loopdev.attach(image) as under:
        dev = under.device.path
        run("dmsetup", "create", name, "--table",
            f"0 {DISK_SIZE // 512} delay {dev} 0 0 {dev} 0 {DELAY_MS}")
    try:
        yield Path("/dev/mapper") / name
    finally:
        run("dmsetup", "remove", "--retry", name)


def test_info_answers_while_a_pull_and_gc_write_to_a_slow_disk(
        tmp_path: Path, root: Path, registry: LocalRegistry, layout: OCILayout,
        start_daemon: Any) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    run("mkfs.ext4", "-q", str(image))
    files = {f"blob{i}": bytes([i]) * MiB for i in range(16)}
    pushed = push_simple(layout, registry, "slowdisk/one", files=files)
    root.mkdir()
    latencies: list[float] = []
    spans: dict[str, float] = {}
    with delayed(image, f"imaged-slow-{id(image)}") as device:
        run("mount", str(device), str(root))
        try:
            daemon = start_daemon("vfs")
            with contextlib.closing(DaemonClient(daemon.socket, timeout=60)) as work, \
                    contextlib.closing(DaemonClient(daemon.socket, timeout=60)) as probe:

                removed = f"/v1/images/{segment(pushed.ref)}"

                def operations() -> None:
                    for label, call in (
                            ("pull", lambda: list(work.stream("POST", "/v1/images/pull",
                                                              {"ref": pushed.ref}))),
                            ("rmi", lambda: work.call("DELETE", removed)),
                            ("gc", lambda: work.call("POST", "/v1/gc"))):
                        began = time.monotonic()
                        call()
                        spans[label] = time.monotonic() - began

                async def main() -> None:
                    done = trio.Event()

                    async def load() -> None:
                        await trio.to_thread.run_sync(operations)
                        done.set()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(load)
                        while not done.is_set():
                            began = time.monotonic()
                            await trio.to_thread.run_sync(probe.call, "GET", "/v1/info")
                            latencies.append(time.monotonic() - began)
                            await trio.sleep(0.02)

                trio.run(main)
            daemon.stop()
        finally:
            unmount_below(root)
            unmount(root)
    took = ", ".join(f"{label} {span:.2f} s" for label, span in spans.items())
    print(f"slow disk ({DELAY_MS} ms per write): {took}; "
          f"GET /v1/info x{len(latencies)}: median {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")
    assert len(latencies) >= 5, (spans, latencies)
    assert max(latencies) < BOUND, latencies
