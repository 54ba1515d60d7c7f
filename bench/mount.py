"""``imaged bench mount``: per driver, mount latency against layer count, container
create+mount+umount+rm cycles per second, and the space ten containers of one 300 MB image take.

Images are pulled through the real path (local registry, pull, unpack); the timings are taken
in-process through the service, so they measure the driver and the store, not Python's start-up.
Each driver runs on the storage it needs (``imaged.bench.stores``): overlay and vfs on the
dedicated ext4, btrfs on a loop-mounted btrfs, zfs on a zfs-fuse pool, devmapper on a thin pool
of its own on loop files in that ext4 (in the guest kernel: ``scripts/bench-guest``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import trio

from imaged.bench.images import OCILayout, file, push, streamed
from imaged.bench.registry import local_registry
from imaged.bench.report import Series, machine_facts, write_report
from imaged.bench.scratch import scratch_fs, settle
from imaged.bench.stores import DriverStore, driver_store
from imaged.config import Config
from imaged.drivers import registry
from imaged.service import Service

LAYER_COUNTS = (1, 16, 128, 500)
SPACE_IMAGE_BYTES = 300 << 20
SPACE_CONTAINERS = 10
_SPACE_FILES = 30  # ten-MiB files: a realistic image is many files, not one blob


async def _latency(service: Service, driver: str, refs: dict[int, str], runs: int,
                   series: list[Series]) -> None:
    for count, ref in refs.items():
        await service.pull(ref, None, lambda event: None)
        latency = Series(f"{driver}: mount {count} layer{'s' * (count > 1)}", "milliseconds")
        for i in range(runs):
            name = f"m{count}-{i}"
            await service.mount(ref, name, None, False, None)
            await service.umount(name)
            start = time.perf_counter()
            await service.mount(ref, name, None, False, None)
            latency.samples.append((time.perf_counter() - start) * 1000)
            await service.rm(name, force=True)
        series.append(latency)


async def _cycles(service: Service, driver: str, ref: str, runs: int,
                  series: list[Series]) -> None:
    cycles = Series(f"{driver}: create+mount+umount+rm, 16 layers", "cycles/s")
    for i in range(runs):
        start = time.perf_counter()
        batch = 10
        for j in range(batch):
            name = f"cycle-{i}-{j}"
            await service.mount(ref, name, None, False, None)
            await service.umount(name)
            await service.rm(name)
        cycles.samples.append(batch / (time.perf_counter() - start))
    series.append(cycles)


async def _space(service: Service, store: DriverStore, ref: str, runs: int,
                 series: list[Series]) -> None:
    """Bytes the backing storage gains when ten containers of the image are created and
    mounted: snapshots and overlays should cost next to nothing, copies the whole image each."""
    await service.pull(ref, None, lambda event: None)
    space = Series(f"{store.driver}: space of {SPACE_CONTAINERS} containers of a 300 MB image",
                   "MB")
    for i in range(runs):
        settle()
        before = store.used_bytes()
        names = [f"space-{i}-{j}" for j in range(SPACE_CONTAINERS)]
        for name in names:
            await service.mount(ref, name, None, False, None)
        space.samples.append((store.used_bytes() - before) / 1e6)
        for name in names:
            await service.rm(name, force=True)
    series.append(space)


async def _measure(store: DriverStore, refs: dict[int, str], space_ref: str, runs: int,
                   series: list[Series]) -> None:
    root = store.base / f"root-{store.driver}"
    try:
        async with Service.open(store.config(root), "imaged bench mount") as service:
            await _latency(service, store.driver, refs, runs, series)
            await _cycles(service, store.driver, refs[16], runs, series)
            await _space(service, store, space_ref, runs, series)
    finally:
        store.wipe(root)


def _push_images(layout: OCILayout, host: str) -> tuple[dict[int, str], str]:
    refs = {}
    for count in LAYER_COUNTS:
        print(f"building and pushing a {count}-layer image", file=sys.stderr)
        layers = [layout.add_layer([file(f"layer-{i:03d}", b"x" * 512)], None)
                  for i in range(count)]
        layout.tag(layout.add_image(layers), f"l{count}")
        refs[count] = f"{host}/bench/layers:{count}"
        push(layout, f"l{count}", refs[count])
    print("building and pushing a 300 MB image", file=sys.stderr)
    size = SPACE_IMAGE_BYTES // _SPACE_FILES
    big = layout.add_layer([streamed(f"data-{i:02d}.bin", size, random=True)
                            for i in range(_SPACE_FILES)])
    layout.tag(layout.add_image([big]), "space")
    space_ref = f"{host}/bench/space:v1"
    push(layout, "space", space_ref)
    return refs, space_ref


def run(out: Path, runs: int, drivers: list[str]) -> list[Path]:
    series: list[Series] = []
    notes = []
    with scratch_fs(16 << 30) as (scratch, where), \
            local_registry(scratch / "registry") as reg:
        refs, space_ref = _push_images(OCILayout(scratch / "layout"), reg.host)
        for name, (probe, factory) in registry().items():
            if name not in drivers:
                continue
            if factory is None:
                reason = probe(Config(root=scratch / "probe")).reason
                notes.append(f"{name}: not measured ({reason})")
                continue
            with contextlib.ExitStack() as stack:
                try:
                    store = stack.enter_context(driver_store(name, scratch, where))
                except (OSError, RuntimeError) as e:
                    notes.append(f"{name}: not measured (its storage could not be made: {e})")
                    continue
                result = probe(store.config(store.base / "probe"))
                if not result.supported:
                    notes.append(f"{name}: not measured ({result.reason})")
                    continue
                print(f"measuring {name} on {store.where}", file=sys.stderr)
                trio.run(_measure, store, refs, space_ref, runs, series)
                notes.append(f"{name}: on {store.where}")
        notes.append(f"{runs} runs per point; the layer-count images have one 512-byte file "
                     f"per layer; the space image is {_SPACE_FILES} files of random data in one "
                     "gzip layer; space is the growth of the driver's backing storage (statvfs, "
                     "or the dataset's `used` on zfs) after sync, containers mounted, no quota")
    return write_report(out, "mount", "Mount latency, container cycles and space per driver",
                        series, machine_facts(), {}, notes)
