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

from imaged.bench.report import Series, machine_facts, write_report
from imaged.bench.scratch import scratch_fs, settle
from imaged.bench.stores import DriverStore, driver_store
from imaged.drivers import registry
from imaged.ops.service import Service
from imaged.testing.images import OCILayout, file, push, streamed
from imaged.testing.registry import local_registry

LAYER_COUNTS = (1, 16, 128, 500)
SPACE_IMAGE_BYTES = 300 << 20
SPACE_CONTAINERS = 10
_SPACE_FILES = 30  # ten-MiB files: a realistic image is many files, not one blob


async def _latency(service: Service, root: Path, ref: str, count: int,
                   i: int) -> tuple[float, float | None]:
    """Milliseconds to mount a container of ``ref`` made and mounted once before (so the
    first mount's setup is not what is timed), and the MiB its server holds once mounted, for
    a driver that serves each container from a process of its own."""
    name = f"m{count}-{i}"
    await service.mount(ref, name, None, False, None)
    await service.umount(name)
    start = time.perf_counter()
    await service.mount(ref, name, None, False, None)
    elapsed = (time.perf_counter() - start) * 1000
    rss = _server_rss(root / "drivers" / service.store.driver().name / "containers" / name /
                      "server")
    await service.rm(name, force=True)
    return elapsed, rss


def _server_rss(record: Path) -> float | None:
    """VmRSS in MiB of the process named by a container's ``server`` file ("PID STARTTIME",
    the fuse driver's), or None where the driver keeps no such process."""
    try:
        pid = int(record.read_text().split()[0])
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ValueError, IndexError):
        return None
    kib = next(int(line.split()[1]) for line in status.splitlines()
               if line.startswith("VmRSS:"))
    return kib / 1024


async def _cycles(service: Service, ref: str, i: int) -> float:
    start = time.perf_counter()
    batch = 10
    for j in range(batch):
        name = f"cycle-{i}-{j}"
        await service.mount(ref, name, None, False, None)
        await service.umount(name)
        await service.rm(name)
    return batch / (time.perf_counter() - start)


async def _space(service: Service, store: DriverStore, ref: str, i: int) -> float:
    """MB the backing storage gains when ten containers of the image are created and mounted:
    snapshots and overlays should cost next to nothing, copies the whole image each."""
    settle()
    before = store.used_bytes()
    names = [f"space-{i}-{j}" for j in range(SPACE_CONTAINERS)]
    for name in names:
        await service.mount(ref, name, None, False, None)
    grown = (store.used_bytes() - before) / 1e6
    for name in names:
        await service.rm(name, force=True)
    return grown


async def _measure(stores: list[DriverStore], refs: dict[int, str], space_ref: str, runs: int,
                   series: list[Series]) -> None:
    """Every driver in every run, the order rotating per run: a machine that slows down for a
    while (this VM does) then slows every driver alike instead of the one measured then."""
    async with contextlib.AsyncExitStack() as stack:
        services = {}
        roots = {}
        for store in stores:
            root = roots[store.driver] = store.base / f"root-{store.driver}"
            stack.callback(store.wipe, root)  # after its service has closed
            services[store.driver] = await stack.enter_async_context(
                Service.open(store.config(root), "imaged bench mount"))
            for ref in (*refs.values(), space_ref):
                await services[store.driver].pull(ref, None, lambda event: None)
        table: dict[tuple[str, str], Series] = {}
        for store in stores:
            for count in refs:
                table[store.driver, f"l{count}"] = Series(
                    f"{store.driver}: mount {count} layer{'s' * (count > 1)}", "milliseconds")
            table[store.driver, "cycles"] = Series(
                f"{store.driver}: create+mount+umount+rm, 16 layers", "cycles/s")
            table[store.driver, "space"] = Series(
                f"{store.driver}: space of {SPACE_CONTAINERS} containers of a 300 MB image", "MB")
        for i in range(runs):
            for store in stores[i % len(stores):] + stores[:i % len(stores)]:
                service = services[store.driver]
                for count, ref in refs.items():
                    elapsed, rss = await _latency(service, roots[store.driver], ref, count, i)
                    table[store.driver, f"l{count}"].samples.append(elapsed)
                    if rss is not None:
                        table.setdefault((store.driver, f"rss{count}"), Series(
                            f"{store.driver}: server RSS, {count} layer"
                            f"{'s' * (count > 1)} mounted", "MiB")).samples.append(rss)
                table[store.driver, "cycles"].samples.append(await _cycles(service, refs[16], i))
                table[store.driver, "space"].samples.append(
                    await _space(service, store, space_ref, i))
        series.extend(table.values())


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
            local_registry(scratch / "registry") as reg, contextlib.ExitStack() as stack:
        refs, space_ref = _push_images(OCILayout(scratch / "layout"), reg.host)
        stores = []
        for name, (probe, _) in registry().items():
            if name not in drivers:
                continue
            try:
                store = stack.enter_context(driver_store(name, scratch, where))
            except (OSError, RuntimeError) as e:
                notes.append(f"{name}: not measured (its storage could not be made: {e})")
                continue
            result = probe(store.config(store.base / "probe"))
            if not result.supported:
                notes.append(f"{name}: not measured ({result.reason})")
                continue
            stores.append(store)
            notes.append(f"{name}: on {store.where}")
        print(f"measuring {', '.join(s.driver for s in stores)}, interleaved", file=sys.stderr)
        trio.run(_measure, stores, refs, space_ref, runs, series)
        notes.append(f"{runs} runs per point, interleaved: each run measures every driver in "
                     "turn, the order rotating from run to run; the layer-count images have one "
                     f"512-byte file per layer; the space image is {_SPACE_FILES} files of "
                     "random data in one gzip layer; space is the growth of the driver's "
                     "backing storage (statvfs, or the dataset's `used` on zfs) after sync, "
                     "containers mounted, no quota")
        if any(s.unit == "MiB" for s in series):
            notes.append("a driver with a server per container (fuse): its mount latency is "
                         "the server's start, from spawn to the mount answering; server RSS is "
                         "VmRSS of the PID in the container's server file, read just after "
                         "the timed mount")
    return write_report(out, "mount", "Mount latency, container cycles and space per driver",
                        series, machine_facts(), {}, notes)
