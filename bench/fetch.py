"""``imaged bench fetch``: pull a single-layer image of random bytes from a loopback registry,
against ``curl`` fetching the same blob, interleaved in one run.

What it answers: does imaged's download path (stream, hash while receiving, write, fsync,
verify, record) keep up with a plain HTTP client on the same machine, and does its memory stay
flat whatever the blob's size. imaged is timed end to end as a user runs it (process start
included, reported separately), curl for the blob alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from imaged.bench.images import Entry, OCILayout, push
from imaged.bench.registry import local_registry
from imaged.bench.report import Series, machine_facts, write_report
from imaged.bench.scratch import scratch_ext4


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


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> Sample:
    """Run a command, returning its wall time and peak RSS (from wait4, not polling)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = proc.stderr.read() if proc.stderr is not None else b""
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return Sample(elapsed, int(usage.ru_maxrss))


def run(out: Path, size: int, runs: int) -> list[Path]:
    for tool in ("curl", "skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not installed: run scripts/setup")
    with scratch_ext4(4 * size + (2 << 30)) as (scratch, where), \
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
        curl, durable, imaged, startup = (Series("curl (blob only)", "seconds"),
                                          Series("curl then fsync (durable)", "seconds"),
                                          Series("imaged pull (end to end)", "seconds"),
                                          Series("imaged process start", "seconds"))
        rss = Series("imaged peak RSS", "MiB")
        for i in range(runs):
            print(f"run {i + 1}/{runs}", file=sys.stderr)
            order = ("curl", "durable", "imaged")
            for who in order[i % 3:] + order[:i % 3]:
                os.sync()
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
                    sample = _timed([sys.executable, "-m", "imaged", "--root", str(root),
                                     "pull", ref], env)
                    imaged.samples.append(sample.seconds)
                    rss.samples.append(sample.max_rss_kib / 1024)
                    shutil.rmtree(root)
            startup.samples.append(_timed([sys.executable, "-m", "imaged", "--version"],
                                          env).seconds)
    throughput = size / 1e6
    ratios = {
        "imaged throughput / curl throughput": curl.median / imaged.median,
        "same, process start excluded": curl.median / (imaged.median - startup.median),
        "imaged throughput / durable curl throughput": durable.median / imaged.median,
    }
    notes = [
        f"{runs} interleaved runs; blob of {size} bytes of random data, uncompressed tar layer",
        f"files written to {where}; the registry's copy is in the page cache for both",
        f"curl median {throughput / curl.median:.0f} MB/s, imaged median "
        f"{throughput / imaged.median:.0f} MB/s",
        "imaged fsyncs the blob before recording it (a store must not lose acknowledged "
        "data); 'curl then fsync' is the like-for-like peer",
    ]
    return write_report(out, "fetch", "Pull of one large blob from a loopback registry",
                        [curl, durable, imaged, startup, rss], machine_facts(), ratios, notes)
