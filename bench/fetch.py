"""``imaged bench fetch``: pull a single-layer image of random bytes from a loopback registry,
against ``curl`` fetching the same blob, interleaved in one run.

What it answers: does imaged's download path (stream, hash while receiving, write,
verify) keep up with a plain HTTP client on the same machine, and does its memory stay flat
whatever the blob's size. imaged runs as a child process (``python -m imaged.bench.fetch ROOT
REF``) that pulls through the service and reports when each phase ended, so the download can be
compared with curl and the whole pull (unpack included) is reported beside it; peak RSS is the
child's, from wait4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import trio

from imaged.bench.report import Series, machine_facts, write_report
from imaged.bench.scratch import scratch_fs, settle
from imaged.config import Overrides, load_config
from imaged.events import PullEvent
from imaged.ops.service import Service
from imaged.testing.images import Entry, OCILayout, push
from imaged.testing.registry import local_registry


class _RandomReader:
    """A file-like source of ``size`` random bytes (incompressible, like real binaries)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


@dataclass
class Sample:
    seconds: float
    max_rss_kib: int
    stdout: bytes


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> Sample:
    """Run a command, returning its wall time and peak RSS (from wait4, not polling)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        out = proc.stdout.read() if proc.stdout is not None else b""
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[0]} failed ({code}): {err.read().decode()[-2000:]}")
    return Sample(elapsed, int(usage.ru_maxrss), out)


def child(root: Path, ref: str) -> None:
    """The measured side: one pull, phases timed from the first request, printed as JSON."""
    marks: dict[str, float] = {}

    def report(event: PullEvent) -> None:
        marks[event.status] = time.perf_counter()

    async def main() -> None:
        config = load_config(Overrides(root=root))
        async with Service.open(config, "imaged bench fetch") as service:
            marks["start"] = time.perf_counter()
            await service.pull(ref, None, report)

    trio.run(main)
    start = marks["start"]
    print(json.dumps({"download": marks["verified"] - start, "pull": marks["done"] - start}))


def run(out: Path, size: int, runs: int) -> list[Path]:
    for tool in ("curl", "skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not installed: run scripts/setup")
    with scratch_fs(4 * size + (2 << 30)) as (scratch, where), \
            local_registry(scratch / "registry") as registry:
        layout = OCILayout(scratch / "layout")
        print(f"building a {size >> 20} MiB single-layer image", file=sys.stderr)
        source = cast(IO[bytes], _RandomReader(size))
        layer = layout.add_layer([Entry("blob.bin", size=size, source=source)], compression=None)
        manifest = layout.add_image([layer])
        layout.tag(manifest, "big")
        push(layout, "big", f"{registry.host}/bench/big:v1")
        shutil.rmtree(layout.path)
        blob_url = f"{registry.url}/v2/bench/big/blobs/{layer.blob.digest}"
        ref = f"{registry.host}/bench/big:v1"
        env = {**os.environ, "IMAGED_CONFIG": str(scratch / "none.toml")}
        (scratch / "none.toml").write_text("")
        curl, durable, imaged, whole, startup = (
            Series("curl (blob only)", "seconds"),
            Series("curl then fsync (durable)", "seconds"),
            Series("imaged download (received, hashed, written, verified)", "seconds"),
            Series("imaged whole pull (download, unpack, record)", "seconds"),
            Series("imaged process start", "seconds"))
        rss = Series("imaged peak RSS", "MiB")
        for i in range(runs):
            print(f"run {i + 1}/{runs}", file=sys.stderr)
            order = ("curl", "durable", "imaged")
            for who in order[i % 3:] + order[:i % 3]:
                settle()
                target = scratch / "curl.out"
                if who == "curl":
                    curl.samples.append(_timed(["curl", "-sS", "-o", str(target),
                                                blob_url]).seconds)
                    target.unlink()
                elif who == "durable":
                    durable.samples.append(_timed(
                        ["sh", "-c", 'curl -sS -o "$1" "$2" && sync "$1"', "sh", str(target),
                         blob_url]).seconds)
                    target.unlink()
                else:
                    root = scratch / "root"
                    sample = _timed([sys.executable, "-m", "imaged.bench.fetch", str(root),
                                     ref], env)
                    phases = json.loads(sample.stdout)
                    imaged.samples.append(phases["download"])
                    whole.samples.append(phases["pull"])
                    rss.samples.append(sample.max_rss_kib / 1024)
                    shutil.rmtree(root)
            startup.samples.append(_timed([sys.executable, "-m", "imaged", "--version"],
                                          env).seconds)
    throughput = size / 1e6
    # Only against plain curl: imaged's download clock stops before it flushes (it fsyncs when
    # it records the image), so a ratio to 'curl then fsync' would flatter it.
    ratios = {"imaged download throughput / curl throughput": curl.median / imaged.median}
    notes = [
        f"{runs} interleaved runs; blob of {size} bytes of random data, uncompressed tar layer",
        f"files written to {where}; the registry's copy is in the page cache for both",
        f"curl median {throughput / curl.median:.0f} MB/s, imaged download median "
        f"{throughput / imaged.median:.0f} MB/s",
        f"the whole pull also unpacks the layer into the driver (a second write of "
        f"{size >> 20} MiB) and records it; process start is outside both imaged figures",
        "imaged fsyncs the blob when it records the image, after unpacking (inside the whole "
        "pull); 'curl then fsync' shows what durability costs a plain download",
    ]
    return write_report(out, "fetch", "Pull of one large blob from a loopback registry",
                        [curl, durable, imaged, whole, startup, rss], machine_facts(), ratios,
                        notes)


if __name__ == "__main__":
    child(Path(sys.argv[1]), sys.argv[2])
