"""``imaged bench fleet``: N nodes pulling one image at once, directly, through a pull-through
cache, or from a peer node, with the bytes that reached the registry counted.

Each node is a root of its own and pulls in a process of its own (``imaged.testing.fleet``), as
nodes of a real fleet would; the registry, the cache (``docker-registry`` with
``proxy.remoteurl``) and the serving peer (``imaged serve --registry-addr``) run on 127.0.0.1.
Four ways, interleaved in one run, for each N:

- direct: every node pulls from the registry;
- cold cache: a fresh cache in front of the registry, every node pulls through it at once;
- warmed cache: one node pulls through a fresh cache first, then the N pull at once;
- peer: one node pulls from the registry and serves its root, then the N pull from it.

Upstream bytes are counted from the registry's access log (body bytes of GETs under the
image's repository), warm-up pulls included: they are what the fleet costs the registry. Wall
time is the N-node phase only, from starting the processes to the last one's exit.

Every node here shares this machine's cores, disk and loopback, so wall time says how this box
copes with N concurrent pulls, not how a fleet of N machines would; the figure that carries over
is upstream bytes. The report says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imaged.bench.report import Panel, Series, machine_facts, write_report
from imaged.bench.scratch import scratch_fs, settle
from imaged.testing.fleet import Node, finish
from imaged.testing.images import OCILayout, file, push
from imaged.testing.registry import LocalRegistry, free_port, local_registry, start_registry

WAYS = ("direct", "cold cache", "warmed cache", "peer")
REPO = "bench/fleet"
LAYERS = 4
MIB = 1024 * 1024


@dataclass
class Sample:
    seconds: float
    upstream: int  # bytes


def _image(layout: OCILayout, size: int) -> None:
    """``LAYERS`` uncompressed layers of incompressible bytes, ``size`` in all: what the nodes
    pull. Random bytes so that no layer of one run is a blob of another's."""
    layers = [layout.add_layer([file(f"part{i}.bin", os.urandom(size // LAYERS))],
                               compression=None) for i in range(LAYERS)]
    layout.tag(layout.add_image(layers), "fleet")


def _upstream_bytes(registry: LocalRegistry, since: int) -> tuple[int, int]:
    """Body bytes of GETs the registry answered for the image since access number ``since``,
    and the new access count."""
    accesses = registry.accesses(REPO)
    got = sum(a.size for a in accesses[since:] if a.method == "GET" and a.status in (200, 206))
    return got, len(accesses)


def _pull_all(nodes: list[Node], ref: str) -> float:
    """Every node pulls at once, each in its own process; seconds until the last is done."""
    start = time.perf_counter()
    procs = [node.start("pull", ref) for node in nodes]
    try:
        errors = [proc.communicate(timeout=600)[1] for proc in procs]
    finally:
        for proc in procs:
            finish(proc)
    elapsed = time.perf_counter() - start
    failed = [(proc.returncode, err[-500:]) for proc, err in zip(procs, errors, strict=True)
              if proc.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(nodes)} pulls failed: {failed[0]}")
    return elapsed


@contextmanager
def _cache(workdir: Path, registry: LocalRegistry) -> Iterator[LocalRegistry]:
    cache = start_registry(workdir, proxy=registry.url)
    try:
        yield cache
    finally:
        cache.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(way: str, count: int, scratch: Path, registry: LocalRegistry, ref: str) -> Sample:
    work = scratch / "nodes"
    shutil.rmtree(work, ignore_errors=True)

    def nodes(*mirrors: str) -> list[Node]:
        return [Node(work / f"n{i}", registry.host).configure(mirrors) for i in range(count)]

    _, since = _upstream_bytes(registry, 0)
    settle()
    if way == "direct":
        seconds = _pull_all(nodes(), ref)
    elif way in ("cold cache", "warmed cache"):
        with _cache(scratch / "cache", registry) as cache:
            if way == "warmed cache":
                _pull_all([Node(work / "warm", registry.host).configure([cache.url])], ref)
                settle()
            seconds = _pull_all(nodes(cache.url), ref)
    else:
        seed = Node(work / "seed", registry.host).configure()
        _pull_all([seed], ref)
        settle()
        with seed.serving(free_port()) as url:
            seconds = _pull_all(nodes(url), ref)
    upstream, _ = _upstream_bytes(registry, since)
    shutil.rmtree(work, ignore_errors=True)
    return Sample(seconds, upstream)


def run(out: Path, runs: int, counts: list[int], size: int,
        progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
        ) -> list[Path]:
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not installed: run scripts/setup")
    wall = {(way, n): Series(f"{way}, {n} nodes: wall time", "seconds")
            for n in counts for way in WAYS}
    upstream = {(way, n): Series(f"{way}, {n} nodes: upstream", "MiB")
                for n in counts for way in WAYS}
    started = time.monotonic()
    need = (max(counts) + 2) * size * 3 + (2 << 30)  # blobs and unpacked layers, a cache
    with scratch_fs(need) as (scratch, where), \
            local_registry(scratch / "registry") as registry:
        layout = OCILayout(scratch / "layout")
        progress(f"building a {size // MIB} MiB image of {LAYERS} layers")
        _image(layout, size)
        ref = f"{registry.host}/{REPO}:v1"
        push(layout, "fleet", ref)
        shutil.rmtree(layout.path)
        for i in range(runs):
            for n in counts:
                order = WAYS[i % len(WAYS):] + WAYS[:i % len(WAYS)]
                for way in order:
                    progress(f"run {i + 1}/{runs}: {n} nodes, {way}")
                    sample = _measure(way, n, scratch, registry, ref)
                    wall[way, n].samples.append(sample.seconds)
                    upstream[way, n].samples.append(sample.upstream / MIB)
    minutes = (time.monotonic() - started) / 60
    cores = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    biggest = max(counts)
    ratios = {f"upstream bytes, {biggest} nodes: {way} / direct":
              upstream[way, biggest].median / upstream["direct", biggest].median
              for way in WAYS[1:]}
    summary = [
        f"**All {biggest} nodes share this machine's {cores} cores, its disk and its loopback: "
        "wall time here says how one box copes with N concurrent pulls, not how a fleet of N "
        "machines would. The figure that carries over to a real fleet is upstream bytes.**",
        "",
        "| nodes | " + " | ".join(f"{way}: upstream MiB" for way in WAYS) + " | "
        + " | ".join(f"{way}: wall s" for way in WAYS) + " |",
        "|---:|" + "---:|" * (2 * len(WAYS)),
        *(f"| {n} | " + " | ".join(f"{upstream[way, n].median:.0f}" for way in WAYS) + " | "
          + " | ".join(f"{wall[way, n].median:.2f}" for way in WAYS) + " |" for n in counts),
    ]
    notes = [
        f"{runs} interleaved runs (the ways' order rotating per run), N in {counts}; one "
        f"image of {LAYERS} uncompressed layers of random bytes, {size // MIB} MiB in all",
        "each node is its own root and its own `imaged pull` process; wall time is from "
        "starting the N processes to the last one's exit (process start included)",
        "upstream bytes: body bytes of GETs under the image's repository in the registry's "
        "access log, warm-up included (the warming pull, the peer's own pull from the "
        "registry): what the whole fleet cost the registry",
        "cold cache: distribution 2.8's proxy fetches a blob twice on its first miss, and "
        "nodes missing the same blob at once each go upstream, so a cold cache can cost more "
        "than pulling directly; warmed first by one node, it costs about twice the image once",
        f"files on {where}; {minutes:.1f} minutes in all",
    ]
    panels = [
        Panel("bytes that reached the registry", "nodes pulling at once", "MiB",
              {way: [(float(n), upstream[way, n]) for n in counts] for way in WAYS}, log=False),
        Panel(f"wall time (all nodes on {cores} cores: not a fleet's)",
              "nodes pulling at once", "seconds",
              {way: [(float(n), wall[way, n]) for n in counts] for way in WAYS}, log=False),
    ]
    return write_report(out, "fleet", "A fleet pulling one image: direct, through a "
                        "pull-through cache, from a peer", [*upstream.values(), *wall.values()],
                        machine_facts(), ratios, notes, panels, summary)
