"""``imaged bench mount``: mount latency against layer count, per driver, and container
create+mount+umount+rm cycles per second.

Images of 1, 16, 128 and 500 layers are pulled through the real path (local registry, pull,
unpack); the timings are taken in-process through the service, so they measure the driver and
the store, not Python's start-up.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import trio

from imaged.bench.images import OCILayout, file, push
from imaged.bench.registry import local_registry
from imaged.bench.report import Series, machine_facts, write_report
from imaged.bench.scratch import scratch_ext4
from imaged.config import Config
from imaged.drivers import probe_all, registry
from imaged.service import Service

LAYER_COUNTS = (1, 16, 128, 500)


async def _measure(config: Config, refs: dict[int, str], runs: int,
                   series: list[Series]) -> None:
    async with Service.open(config, "imaged bench mount") as service:
        driver = config.driver
        for count, ref in refs.items():
            await service.pull(ref, None, lambda event: None)
            latency = Series(f"{driver}: mount {count} layers", "milliseconds")
            for i in range(runs):
                name = f"m{count}-{i}"
                await service.mount(ref, name, None, False, None)
                await service.umount(name)
                start = time.perf_counter()
                await service.mount(ref, name, None, False, None)
                latency.samples.append((time.perf_counter() - start) * 1000)
                await service.rm(name, force=True)
            series.append(latency)
        cycles = Series(f"{driver}: create+mount+umount+rm, 16 layers", "cycles/s")
        for i in range(runs):
            start = time.perf_counter()
            batch = 10
            for j in range(batch):
                name = f"cycle-{i}-{j}"
                await service.mount(refs[16], name, None, False, None)
                await service.umount(name)
                await service.rm(name)
            cycles.samples.append(batch / (time.perf_counter() - start))
        series.append(cycles)


def run(out: Path, runs: int) -> list[Path]:
    series: list[Series] = []
    notes = []
    with scratch_ext4(8 << 30) as (scratch, where), \
            local_registry(scratch / "registry") as reg:
        layout = OCILayout(scratch / "layout")
        refs = {}
        for count in LAYER_COUNTS:
            print(f"building and pushing a {count}-layer image", file=sys.stderr)
            layers = [layout.add_layer([file(f"layer-{i:03d}", b"x" * 512)], None)
                      for i in range(count)]
            manifest = layout.add_image(layers)
            layout.tag(manifest, f"l{count}")
            refs[count] = f"{reg.host}/bench/layers:{count}"
            push(layout, f"l{count}", refs[count])
        config_path = scratch / "imaged.toml"
        config_path.write_text("")
        factories = registry()
        for probe in probe_all(Config(root=scratch / "probe")):
            if not probe.supported or factories[probe.name][1] is None:
                notes.append(f"{probe.name}: not measured ({probe.reason})")
                continue
            print(f"measuring {probe.name}", file=sys.stderr)
            config = Config(root=scratch / f"root-{probe.name}", driver=probe.name)
            trio.run(_measure, config, refs, runs, series)
        notes.append(f"stores on {where}; {runs} runs per point, layers of one 512-byte file")
    return write_report(out, "mount", "Mount latency against layer count", series,
                        machine_facts(), {}, notes)
