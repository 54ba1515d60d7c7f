"""Where a FUSE server's time goes over the metadata workloads of ``imaged bench copyup
--metadata``: ``python -m imaged.bench.fusecpu [--runs N] [--files N] [--scratch DIR]
[--config imaged|writeback|fuse-overlayfs ...] [--profile FILE]``.

Wall time on this shared 2-core machine swings with the other work on it; the CPU time the
server process itself spends (user + system, from ``/proc/PID/stat``) moves far less, and
divided by the requests it answered it is the per-request cost the untar's multiple comes
from. Per sample: a fresh upper, work and mount over the same seeded tree (bench.copyup's
``_make_tree``) as the lower; the tree's tarball unpacked into the container and syncfs, then
``find | xargs stat`` over the lower tree, twice; the server's CPU seconds across each, and
(imaged) the requests by handler (``--count-requests``, counted after the server exits).
``--profile FILE`` runs one more imaged untar with the server under cProfile and writes its
stats to FILE (``python -m pstats FILE``). Prints one table of medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imaged.bench.copyup import _make_tree
from imaged.fsutil import syncfs

_TICK = os.sysconf("SC_CLK_TCK")
MOUNT_TIMEOUT = 30.0


def cpu_seconds(pid: int) -> float:
    """User plus system seconds the process has run (fields 14 and 15 of /proc/PID/stat,
    counted after the command name, which may hold spaces)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Sample:
    untar_wall: float
    untar_cpu: float
    find_wall: list[float]
    find_cpu: list[float]
    requests: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def _served(config: str, lower: Path, home: Path, counts: Path | None,
            profile: Path | None) -> Iterator[int]:
    """The server of ``config`` mounted on home/mnt over ``lower``; yields its PID, and
    unmounts and waits for it whatever happens."""
    upper, work, target = home / "upper", home / "work", home / "mnt"
    for path in (upper, work, target):
        path.mkdir()
    log = (home / "server.log").open("wb")
    read_fd = -1
    if config == "fuse-overlayfs":
        argv = ["fuse-overlayfs", "-f", "-o",
                f"lowerdir={lower},upperdir={upper},workdir={work}", str(target)]
        proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    else:
        read_fd, write_fd = os.pipe()
        python = [sys.executable] if profile is None else \
            [sys.executable, "-m", "cProfile", "-o", str(profile)]
        argv = [*python, "-m", "imaged.fuse.serve", "--upper", str(upper), "--work", str(work),
                "--lower", str(lower), "--ready-fd", str(write_fd), str(target)]
        if config == "writeback":
            argv[-1:-1] = ["--writeback"]
        if counts is not None:
            argv[-1:-1] = ["--count-requests", str(counts)]
        proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True,
                                pass_fds=(write_fd,))
        os.close(write_fd)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        if read_fd >= 0:
            if not select.select([read_fd], [], [], MOUNT_TIMEOUT)[0] or \
                    os.read(read_fd, 100).strip() != b"ready":
                raise RuntimeError(f"{config} did not mount; see {home / 'server.log'}")
        else:
            while not os.path.ismount(target):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{config} did not mount; see {home / 'server.log'}")
                time.sleep(0.01)
        yield proc.pid
    finally:
        if read_fd >= 0:
            os.close(read_fd)
        subprocess.run(["umount", str(target)], check=False, capture_output=True)
        try:
            proc.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
        log.close()


def _find_stat(tree: Path) -> None:
    find = subprocess.Popen(["find", str(tree), "-print0"], stdout=subprocess.PIPE)
    subprocess.run(["xargs", "-0", "stat"], stdin=find.stdout, stdout=subprocess.DEVNULL,
                   check=True)
    assert find.stdout is not None  # noqa: S101 - asked for above
    find.stdout.close()
    if find.wait() != 0:
        raise RuntimeError("find failed")


def sample(config: str, lower: Path, tarball: Path, scratch: Path, *,
           counted: bool = False, profile: Path | None = None) -> Sample:
    """One untar in a fresh container, then ``find | xargs stat`` twice in another fresh
    mount (so the server's caches start empty, as the bench's cold pass); ``counted``: the
    untar's requests by handler, which costs the server one more call per request."""
    home = scratch / "container"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    counts = home / "requests.json" if counted else None
    with _served(config, lower, home, counts, profile) as pid:
        mount = home / "mnt"
        (mount / "untar").mkdir()
        cpu, start = cpu_seconds(pid), time.perf_counter()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(mount / "untar")], check=True)
        syncfs(mount)
        untar_wall, untar_cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    requests = json.loads(counts.read_text()) if counts is not None else {}
    shutil.rmtree(home)
    home.mkdir()
    find_wall, find_cpu = [], []
    with _served(config, lower, home, None, None) as pid:
        for _ in range(2):
            cpu, start = cpu_seconds(pid), time.perf_counter()
            _find_stat(home / "mnt" / "tree")
            find_wall.append(time.perf_counter() - start)
            find_cpu.append(cpu_seconds(pid) - cpu)
    shutil.rmtree(home)
    return Sample(untar_wall, untar_cpu, find_wall, find_cpu, requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imaged.bench.fusecpu")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--files", type=int, default=6000)
    parser.add_argument("--scratch", type=Path, default=None,
                        help="a directory on the filesystem to test (default: a new one in /tmp)")
    parser.add_argument("--config", action="append",
                        choices=["imaged", "writeback", "fuse-overlayfs"])
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args(argv)
    configs = args.config or ["imaged", "fuse-overlayfs"]
    scratch = Path(tempfile.mkdtemp(prefix="fusecpu-", dir=args.scratch))
    try:
        lower = scratch / "lower"
        _make_tree(lower / "tree", args.files)
        tarball = scratch / "tree.tar"
        subprocess.run(["tar", "-cf", str(tarball), "-C", str(lower), "tree"], check=True)
        load = os.getloadavg()
        samples: dict[str, list[Sample]] = {c: [] for c in configs}
        for run in range(args.runs):
            for config in configs[run % len(configs):] + configs[:run % len(configs)]:
                samples[config].append(sample(config, lower, tarball, scratch))
        for config in configs:
            if config != "fuse-overlayfs":
                samples[config][-1].requests = sample(config, lower, tarball, scratch,
                                                      counted=True).requests
        if args.profile is not None:
            sample("imaged", lower, tarball, scratch, profile=args.profile)
        _print(samples, args.files, load, os.getloadavg())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _print(samples: dict[str, list[Sample]], files: int, before: tuple[float, ...],
           after: tuple[float, ...]) -> None:
    med = statistics.median
    print(f"{files}-file tree, medians of {len(next(iter(samples.values())))} runs; load "
          f"{before[0]:.2f} at the start, {after[0]:.2f} at the end")
    print("| configuration | untar wall s | untar server CPU s | requests | CPU µs/request "
          "| find\\|stat wall s (1st, 2nd) | find\\|stat server CPU s (1st, 2nd) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for config, got in samples.items():
        requests = sum(got[-1].requests.values())
        per = f"{med(s.untar_cpu for s in got) / requests * 1e6:.1f}" if requests else "-"
        print(f"| {config} | {med(s.untar_wall for s in got):.2f} "
              f"| {med(s.untar_cpu for s in got):.2f} | {requests or '-'} | {per} "
              f"| {med(s.find_wall[0] for s in got):.2f}, {med(s.find_wall[1] for s in got):.2f} "
              f"| {med(s.find_cpu[0] for s in got):.2f}, {med(s.find_cpu[1] for s in got):.2f} |")
    for config, got in samples.items():
        if got[-1].requests:
            print(f"{config} requests over one untar: {json.dumps(got[-1].requests)}")


if __name__ == "__main__":
    sys.exit(main())
