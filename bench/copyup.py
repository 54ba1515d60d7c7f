"""``imaged bench copyup``: what the first write into a lower file costs a container, per
configuration, on the same lower layers, in one interleaved run (DESIGN §7).

The question is how copy-up grows with the size of the file written. Kernel overlay and
fuse-overlayfs copy the whole file before the first write returns; imaged's fuse server does
too in full mode, and in partial mode copies only what is written. Beside the first write the
bench measures what a container does most: reading a large lower file, unpacking a tree into
the container, and walking a Debian-like image with ``find | xargs stat``.

Every configuration mounts the same two lower directories on one dedicated loop-mounted ext4
(``imaged.bench.scratch``): a top layer of files of random data, one per size, and a base layer
holding a synthetic tree shaped like a Debian image. Every sample gets a fresh container (fresh
upper and work directories, a fresh mount), removed after it; every run measures every
configuration, the order rotating from run to run, so a machine that slows down for a while
slows all of them alike.

A configuration is one entry of ``CONFIGURATIONS``: how to mount and with which options, and
when it cannot be measured here, why (a report row that says so, not a missing row). The
backing filesystem is a parameter of the run, so more filesystems, configurations and
operations extend this module (issue 15) rather than replace it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imaged import __version__
from imaged.bench.report import Panel, Series, machine_facts, write_report
from imaged.bench.scratch import scratch_fs, settle
from imaged.fsutil import fsync_dir, syncfs
from imaged.host.mounts import MountSpec, kernel_filesystems, mount_with_command, mountinfo, unmount
from imaged.ops import advise, copycost

SIZES = (1 << 20, 16 << 20, 256 << 20, 1 << 30)
QUICK_SIZES = (1 << 20, 16 << 20)
TREE_FILES = 6000
QUICK_TREE_FILES = 1000
WRITE = b"w" * 4096
READ_CHUNK = 1 << 20
MOUNT_TIMEOUT = 30.0  # a fuse server is a Python process importing trio and pyfuse3
STOP_TIMEOUT = 15.0
_TREE_SEED = 14  # the number: any fixed seed makes every run's tree the same


@dataclass(frozen=True)
class Configuration:
    """One way to stack the layers. ``kind`` says how it mounts (``overlay``: the kernel's;
    ``imaged``: ``python -m imaged.fuse.serve``; ``fuse-overlayfs``: Debian's); ``options``
    are mount options for the kernel and fuse-overlayfs, server arguments for imaged.
    ``implied`` marks options a server that lacks them does anyway (full copy-up was the
    only mode before ``--copy-up`` existed), so the row runs without them there."""

    name: str
    kind: str
    options: tuple[str, ...] = ()
    implied: bool = False


CONFIGURATIONS = (
    Configuration("overlay", "overlay"),
    Configuration("fuse full", "imaged", ("--copy-up", "full"), implied=True),
    Configuration("fuse partial", "imaged", ("--copy-up", "partial")),
    Configuration("fuse-overlayfs", "fuse-overlayfs"),
)
PEERS = ("fuse-overlayfs", "overlay")  # what imaged's rows are divided by


@dataclass(frozen=True)
class Layers:
    """The lower directories every configuration stacks (top first, as overlay's
    lowerdir), the files in them and the tarball unpacked into containers."""

    lowers: tuple[Path, ...]
    big: dict[int, str]  # size -> its path inside the mount
    tree: str
    tarball: Path
    tar_bytes: int
    tree_files: int


@dataclass(frozen=True)
class Container:
    mount: Path
    upper: Path


# ----------------------------------------------------------------------------- configurations

def _server_help() -> str:
    return subprocess.run([sys.executable, "-m", "imaged.fuse.serve", "--help"],
                          capture_output=True, text=True, check=False, timeout=60).stdout


def _arguments(config: Configuration, server_help: str) -> tuple[tuple[str, ...] | None, str]:
    """The options this host can run ``config`` with, or None and why it cannot."""
    if config.kind == "overlay":
        if "overlay" not in kernel_filesystems():
            return None, "no overlay in this kernel"
        return config.options, ""
    if config.kind == "fuse-overlayfs":
        if shutil.which("fuse-overlayfs") is None:
            return None, "fuse-overlayfs is not installed (scripts/setup installs it)"
        return config.options, ""
    try:
        import pyfuse3  # noqa: F401, PLC0415 - only to say why the fuse rows cannot run
    except ImportError:
        return None, "pyfuse3 is not installed (scripts/setup builds it)"
    missing = [o for o in config.options if o.startswith("--") and o not in server_help]
    if not missing:
        return config.options, ""
    if config.implied:
        return (), f"this server has no {', '.join(missing)} option: its only mode is used"
    return None, f"this server has no {', '.join(missing)} option"


def _mount_entry(target: Path) -> str | None:
    """``fstype options`` of the mount at ``target``, or None while there is none."""
    point = os.path.realpath(target)
    for entry in mountinfo():
        if entry.mount_point == point:
            return f"{entry.fstype} {','.join(entry.super_options)}"
    return None


@contextlib.contextmanager
def _fuse_process(argv: list[str], target: Path, log: Path,
                  ready: Callable[[subprocess.Popen[bytes]], None],
                  pass_fds: tuple[int, ...] = ()) -> Iterator[None]:
    """A FUSE server as a child process; unmounted, waited for, and killed by PID if it
    lingers, whatever happens."""
    with log.open("ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True, pass_fds=pass_fds)
    try:
        ready(proc)
        yield
    finally:
        with contextlib.suppress(Exception):
            unmount(target)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            unmount(target, lazy=True)


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(nothing in its log)"


@contextlib.contextmanager
def _mounted(config: Configuration, options: tuple[str, ...], lowers: Sequence[Path],
             upper: Path, work: Path, target: Path, log: Path) -> Iterator[None]:
    lowerdir = ":".join(str(p) for p in lowers)
    dirs = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
    if config.kind == "overlay":
        mount_with_command(MountSpec("overlay", "overlay", (dirs, *options)), target)
        try:
            yield
        finally:
            unmount(target)
    elif config.kind == "fuse-overlayfs":
        def wait_mounted(proc: subprocess.Popen[bytes]) -> None:
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while _mount_entry(target) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fuse-overlayfs did not mount: {_tail(log)}")
                time.sleep(0.01)

        with _fuse_process(["fuse-overlayfs", "-f", "-o", ",".join((dirs, *options)),
                            str(target)], target, log, wait_mounted):
            yield
    else:
        read_fd, write_fd = os.pipe()
        open_fds = [read_fd, write_fd]
        try:
            argv = [sys.executable, "-m", "imaged.fuse.serve", "--upper", str(upper),
                    "--work", str(work), *(a for p in lowers for a in ("--lower", str(p))),
                    *options, "--ready-fd", str(write_fd), str(target)]

            def wait_ready(proc: subprocess.Popen[bytes]) -> None:
                """The server's line on the ready pipe: ``ready`` once the mount answers."""
                os.close(write_fd)  # ours: else the pipe never reads as closed
                open_fds.remove(write_fd)
                said = b""
                if select.select([read_fd], [], [], MOUNT_TIMEOUT)[0]:
                    said = os.read(read_fd, 4096)
                if said.strip() != b"ready":
                    raise RuntimeError("the fuse server did not mount: "
                                       f"{said.decode(errors='replace').strip() or _tail(log)}")

            with _fuse_process(argv, target, log, wait_ready, (write_fd,)):
                yield
        finally:
            for fd in open_fds:
                os.close(fd)


@contextlib.contextmanager
def _container(config: Configuration, options: tuple[str, ...], layers: Layers,
               base: Path) -> Iterator[Container]:
    """A fresh container: new upper and work directories, a new mount; gone on exit."""
    home = base / "container"
    shutil.rmtree(home, ignore_errors=True)
    upper, work, target = home / "upper", home / "work", home / "mnt"
    for path in (upper, work, target):
        path.mkdir(parents=True)
    try:
        with _mounted(config, options, layers.lowers, upper, work, target,
                      base / f"{config.name.replace(' ', '-')}.log"):
            yield Container(target, upper)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ----------------------------------------------------------------------------- the layers

def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        for _ in range(size // READ_CHUNK):
            fh.write(os.urandom(READ_CHUNK))
        fh.write(os.urandom(size % READ_CHUNK))
        os.fsync(fh.fileno())


def _make_tree(root: Path, files: int) -> None:
    """A tree shaped like a Debian image, the same in every run: about one directory per
    6.5 files, up to six deep, file sizes log-normal around 3 KB (median) with a long tail
    capped at 2 MiB, one entry in twelve a symlink."""
    rng = random.Random(_TREE_SEED)  # noqa: S311 - a reproducible tree, not a secret
    dirs = [root]
    root.mkdir(parents=True)
    for i in range(max(1, files * 2 // 13)):
        parent = rng.choice(dirs)
        if len(parent.relative_to(root).parts) >= 6:
            parent = root
        dirs.append(parent / f"d{i:04d}")
        dirs[-1].mkdir()
    names: list[Path] = []
    for i in range(files):
        path = rng.choice(dirs) / f"f{i:05d}"
        if names and i % 12 == 0:
            path.symlink_to(os.path.relpath(rng.choice(names), path.parent))
            continue
        size = min(int(rng.lognormvariate(math.log(3000), 1.7)), 2 << 20)
        path.write_bytes(rng.randbytes(size))
        names.append(path)


def _make_layers(scratch: Path, sizes: Sequence[int], tree_files: int) -> Layers:
    top, base = scratch / "lower-top", scratch / "lower-base"
    (top / "big").mkdir(parents=True)
    big = {}
    for size in sizes:
        print(f"writing a {_label(size)} lower file of random data", file=sys.stderr)
        _write_random(top / "big" / f"{_label(size)}.bin", size)
        big[size] = f"big/{_label(size)}.bin"
    print(f"making a {tree_files}-file tree", file=sys.stderr)
    _make_tree(base / "tree", tree_files)
    tarball = scratch / "tree.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(base), "tree"], check=True,
                   timeout=600)
    settle()
    return Layers((top, base), big, "tree", tarball, tarball.stat().st_size, tree_files)


def _label(size: int) -> str:
    return f"{size >> 30}G" if size >= 1 << 30 else f"{size >> 20}M"


# ----------------------------------------------------------------------------- measurements

def _drop_caches() -> None:
    """Cold means the page, dentry and inode caches dropped (after the mount, so the
    mount's own start is not what is cold)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _warm(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(READ_CHUNK):
            pass


def _allocated(tree: Path) -> int:
    """Bytes allocated under ``tree`` (st_blocks, not apparent sizes: a sparse upper file
    costs what it holds)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _first_write(path: Path, size: int) -> tuple[float, float]:
    """Seconds for open O_RDWR + 4 KiB pwrite in the middle + close, then for the fsync
    that makes it durable (its own open and close)."""
    offset = size // 2 // len(WRITE) * len(WRITE)
    start = time.perf_counter()
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, WRITE, offset)
    finally:
        os.close(fd)
    written = time.perf_counter()
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return written - start, time.perf_counter() - written


def _read_rate(path: Path) -> float:
    """MB/s of one sequential read of the whole file, 1 MiB at a time (``dd bs=1M``)."""
    buf = bytearray(READ_CHUNK)
    total = 0
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return total / 1e6 / (time.perf_counter() - start)


def _timed_shell(command: str) -> float:
    start = time.perf_counter()
    subprocess.run(["sh", "-c", command], check=True, timeout=1800,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


class _Table:
    """The run's series by (configuration, measure), in the order they were first named."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], Series] = {}

    def add(self, config: str, measure: str, unit: str, value: float) -> None:
        key = (config, measure)
        if key not in self.series:
            self.series[key] = Series(f"{config}: {measure}", unit)
        self.series[key].samples.append(value)

    def get(self, config: str, measure: str) -> Series | None:
        return self.series.get((config, measure))


def _sample(config: Configuration, options: tuple[str, ...], layers: Layers, base: Path,
            table: _Table) -> None:
    """One run's samples of one configuration, each in a fresh container."""
    for size, rel in layers.big.items():
        for temperature in ("cold", "warm"):
            settle()
            if temperature == "warm":
                _warm(layers.lowers[0] / rel)
            with _container(config, options, layers, base) as box:
                before = _allocated(box.upper)
                if temperature == "cold":
                    _drop_caches()
                written, synced = _first_write(box.mount / rel, size)
                grown = _allocated(box.upper) - before
            label = f"{_label(size)} {temperature}"
            table.add(config.name, f"first write {label}", "milliseconds", written * 1000)
            table.add(config.name, f"fsync after it {label}", "milliseconds", synced * 1000)
            table.add(config.name, f"upper growth {label}", "KiB", grown / 1024)
    settle()
    with _container(config, options, layers, base) as box:
        if layers.big:
            largest = max(layers.big)
            _drop_caches()
            for temperature in ("cold", "warm"):
                table.add(config.name, f"read {_label(largest)} {temperature}", "MB/s",
                          _read_rate(box.mount / layers.big[largest]))
        _drop_caches()
        walk = f"find {box.mount / layers.tree} -print0 | xargs -0 stat > /dev/null"
        for temperature in ("cold", "warm"):
            table.add(config.name, f"find | xargs stat {temperature}", "seconds",
                      _timed_shell(walk))
        settle()
        table.add(config.name, f"untar {layers.tree_files} files + syncfs", "seconds",
                  _untar(box, layers))


def _untar(box: Container, layers: Layers) -> float:
    """Seconds to unpack the tree into a new directory of the container and syncfs it."""
    (box.mount / "untar").mkdir()
    start = time.perf_counter()
    subprocess.run(["tar", "-xf", str(layers.tarball), "-C", str(box.mount / "untar")],
                   check=True, timeout=1800, stdin=subprocess.DEVNULL)
    syncfs(box.upper)
    return time.perf_counter() - start


# fuse-overlayfs's debug log names each request by its opcode; imaged counts by handler.
_OPCODE = re.compile(rb"opcode: ([A-Z_]+)")
_NOT_REQUESTS = {"init", "destroy"}  # the session's own, answered inside libfuse for imaged


def _requests(config: Configuration, options: tuple[str, ...], layers: Layers,
              base: Path) -> dict[str, int]:
    """The requests a FUSE server answers over one untar in a fresh container, mount to
    unmount, by operation: imaged's ``--count-requests``, fuse-overlayfs's ``debug`` log.
    Untimed (both ways of counting cost time); the kernel decides what it sends, so one
    untar gives the number."""
    counts = base / "requests.json"
    log = base / f"{config.name.replace(' ', '-')}.log"
    logged = log.stat().st_size if log.exists() else 0
    counting = (*options, "--count-requests", str(counts)) if config.kind == "imaged" \
        else (*options, "debug")
    with _container(config, counting, layers, base) as box:
        _untar(box, layers)
    if config.kind == "imaged":
        found: dict[str, int] = json.loads(counts.read_text())
        counts.unlink()
        return found
    with log.open("rb") as fh:
        fh.seek(logged)
        names = Counter(m.group(1).decode().lower() for m in _OPCODE.finditer(fh.read()))
    names["forget"] += names.pop("batch_forget", 0)
    return {name: n for name, n in names.most_common() if name not in _NOT_REQUESTS}


# ----------------------------------------------------------------------------- the report

def _ratios(table: _Table, measured: list[Configuration], sizes: Sequence[int],
            tree_files: int) -> dict[str, float]:
    """imaged's rows against each peer's, medians of the same run: times divided by the
    peer's time, read rates by the peer's rate."""
    measures = [f"untar {tree_files} files + syncfs",
                "find | xargs stat cold", "find | xargs stat warm"]
    if sizes:
        largest = _label(max(sizes))
        measures = [f"first write {largest} cold", f"first write {largest} warm",
                    f"read {largest} cold", f"read {largest} warm", *measures]
    ratios = {}
    names = {c.name for c in measured}
    for config in measured:
        if config.kind != "imaged":
            continue
        for peer in (p for p in PEERS if p in names):
            for measure in measures:
                mine, theirs = table.get(config.name, measure), table.get(peer, measure)
                if mine is not None and theirs is not None and theirs.median > 0:
                    ratios[f"{measure}: {config.name} / {peer}"] = mine.median / theirs.median
    return ratios


def _cell(series: Series | None, digits: int) -> str:
    return "—" if series is None else f"{series.median:.{digits}f}"


def _summary(table: _Table, measured: list[Configuration], absent: dict[str, str],
             sizes: Sequence[int], tree_files: int) -> list[str]:
    """The medians a reader wants side by side, before the full table; a configuration not
    measured keeps its row, saying why."""
    if not sizes:
        return _metadata_summary(table, measured, absent, tree_files)
    lines = ["First 4 KiB write in the middle of a lower file (open O_RDWR + pwrite + close), "
             "median ms, cold / warm; the fsync after it; what the upper grew by:", "",
             "| configuration | " + " | ".join(_label(s) for s in sizes) +
             f" | fsync after, {_label(max(sizes))} cold | upper growth, "
             f"{_label(max(sizes))} |",
             "|---|" + "---:|" * (len(sizes) + 2)]
    largest = _label(max(sizes))
    for config in measured:
        name = config.name
        cells = [f"{_cell(table.get(name, f'first write {_label(s)} cold'), 1)} / "
                 f"{_cell(table.get(name, f'first write {_label(s)} warm'), 1)}" for s in sizes]
        growth = table.get(name, f"upper growth {largest} cold")
        grown = "—" if growth is None else _size_text(growth.median * 1024)
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {_cell(table.get(name, f'fsync after it {largest} cold'), 1)} | "
                     f"{grown} |")
    lines += [f"| {name} | not measured: {why} |" + " |" * (len(sizes) + 1)
              for name, why in absent.items()]
    lines += ["", f"Reading the {largest} lower file through the mount (MB/s), unpacking a "
              f"{tree_files}-file tree into the container (s), and `find | xargs stat` over "
              "the same tree as a lower layer (s), medians:", "",
              "| configuration | read cold | read warm | untar + syncfs | find+stat cold | "
              "find+stat warm |", "|---|---:|---:|---:|---:|---:|"]
    for config in measured:
        name = config.name
        lines.append(
            f"| {name} | {_cell(table.get(name, f'read {largest} cold'), 0)} | "
            f"{_cell(table.get(name, f'read {largest} warm'), 0)} | "
            f"{_cell(table.get(name, f'untar {tree_files} files + syncfs'), 2)} | "
            f"{_cell(table.get(name, 'find | xargs stat cold'), 2)} | "
            f"{_cell(table.get(name, 'find | xargs stat warm'), 2)} |")
    lines += [f"| {name} | not measured: {why} | | | | |" for name, why in absent.items()]
    return lines


def _metadata_summary(table: _Table, measured: list[Configuration], absent: dict[str, str],
                      tree_files: int) -> list[str]:
    """The metadata rows alone (``--metadata``), each imaged row also as a multiple of
    fuse-overlayfs's, the peer issue 14 measures against."""
    untar = f"untar {tree_files} files + syncfs"
    measures = (untar, "find | xargs stat cold", "find | xargs stat warm")
    lines = [f"Unpacking a {tree_files}-file tree into the container (s), and `find | xargs "
             "stat` over the same tree as a lower layer (s), medians; in brackets, the "
             "multiple of fuse-overlayfs's median in the same run:", "",
             "| configuration | untar + syncfs | find+stat cold | find+stat warm |",
             "|---|---:|---:|---:|"]
    for config in measured:
        cells = []
        for measure in measures:
            mine, peer = table.get(config.name, measure), table.get("fuse-overlayfs", measure)
            cell = _cell(mine, 2)
            if config.kind == "imaged" and mine is not None and peer is not None \
                    and peer.median > 0:
                cell += f" ({mine.median / peer.median:.1f}x)"
            cells.append(cell)
        lines.append(f"| {config.name} | " + " | ".join(cells) + " |")
    lines += [f"| {name} | not measured: {why} | | |" for name, why in absent.items()]
    return lines


def _requests_table(requests: dict[str, dict[str, int]], tree_files: int) -> list[str]:
    """Requests each FUSE server answered over one untar, by operation, side by side."""
    if not requests:
        return []
    names = list(requests)
    totals = Counter[str]()
    for counts in requests.values():
        totals.update(counts)
    lines = [f"Requests each FUSE server answered over one untar of the {tree_files}-file tree "
             "(mount to unmount, untimed), by operation:", "",
             "| operation | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {op} | " + " | ".join(str(requests[name].get(op, 0)) for name in names) + " |"
              for op, _ in totals.most_common()]
    lines.append("| all | " + " | ".join(str(sum(requests[name].values())) for name in names)
                 + " |")
    return lines


def _size_text(n: float) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n:.0f} B"


def _panels(table: _Table, measured: list[Configuration], sizes: Sequence[int]) -> list[Panel]:
    def lines(measure: Callable[[int], str]) -> dict[str, list[tuple[float, Series]]]:
        found: dict[str, list[tuple[float, Series]]] = {}
        for config in measured:
            points = [(s / (1 << 20), series) for s in sizes
                      if (series := table.get(config.name, measure(s))) is not None]
            if points:
                found[config.name] = points
        return found

    def first_write(temperature: str) -> Callable[[int], str]:
        return lambda size: f"first write {_label(size)} {temperature}"

    return [Panel(f"first 4 KiB write, {temperature}", "lower file size (MiB)",
                  "milliseconds", lines(first_write(temperature)))
            for temperature in ("cold", "warm")] + \
        [Panel("upper growth after it (allocated)", "lower file size (MiB)", "KiB",
               lines(lambda size: f"upper growth {_label(size)} cold"))]


def _version(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return "not installed"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return next((line for line in text if line.startswith(cmd[0])), "?")


def keep_model(report: Path, root: Path) -> Path | None:
    """Keep the report's model where ``imaged advise`` looks for it, ``ROOT/bench/copyup.json``
    (written atomically: an advisor never reads half a model), when ``root`` holds a store;
    the path, or None when there is no store there to advise on."""
    if not (root / "metadata.db").exists():
        return None
    model = copycost.from_report(json.loads(report.read_text()), str(report))
    target = root / advise.MODEL_PATH
    target.parent.mkdir(exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    with partial.open("w") as fh:
        json.dump(model.to_json(), fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(partial, target)
    fsync_dir(target.parent)
    return target


def run(out: Path, runs: int, sizes: Sequence[int] | None, quick: bool,
        filesystem: str = "ext4", *, metadata: bool = False) -> list[Path]:
    """The report's paths. ``metadata``: only the untar and find | xargs stat rows, as
    ``metadata.{json,md,png}`` (no lower files of random data, no model for advise): the
    metadata path of the fuse server measured alone, in minutes rather than an hour."""
    if os.geteuid() != 0:
        raise RuntimeError("imaged bench copyup needs root: it mounts loop filesystems, "
                           "overlays and FUSE filesystems and drops the page cache")
    sizes = [] if metadata else sorted(sizes or (QUICK_SIZES if quick else SIZES))
    runs = 1 if quick else runs
    tree_files = QUICK_TREE_FILES if quick else TREE_FILES
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    started = time.monotonic()
    notes: list[str] = []
    server_help = _server_help()
    measured: list[tuple[Configuration, tuple[str, ...]]] = []
    absent: dict[str, str] = {}
    for config in CONFIGURATIONS:
        options, why = _arguments(config, server_help)
        if options is None:
            notes.append(f"{config.name}: not measured: {why}")
            absent[config.name] = why
            continue
        measured.append((config, options))
        if why:
            notes.append(f"{config.name}: {why}")
    table = _Table()
    requests: dict[str, dict[str, int]] = {}
    failed: set[str] = set()
    facts = machine_facts()
    facts["imaged"] = __version__
    scratch_size = max(8 << 30, 4 * sum(sizes) + (4 << 30))
    with scratch_fs(scratch_size, filesystem) as (scratch, where):
        layers = _make_layers(scratch, sizes, tree_files)
        facts["scratch"] = f"{where}, mounted {_mount_entry(scratch) or 'not a mount'}"
        for i in range(runs):
            order = measured[i % len(measured):] + measured[:i % len(measured)]
            print(f"run {i + 1}/{runs}: {', '.join(c.name for c, _ in order)}",
                  file=sys.stderr)
            for config, options in order:
                if config.name in failed:
                    continue
                try:
                    _sample(config, options, layers, scratch, table)
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    # One configuration failing should not cost the others their report.
                    failed.add(config.name)
                    absent[config.name] = f"failed in run {i + 1} (see the notes)"
                    notes.append(f"{config.name}: failed in run {i + 1}, not reported: "
                                 f"{e}"[:600])
        for config, options in measured:
            if config.name not in failed:
                with _container(config, options, layers, scratch) as box:
                    facts[f"mount: {config.name}"] = _mount_entry(box.mount) or "?"
                if config.kind != "overlay":
                    requests[config.name] = _requests(config, options, layers, scratch)
    kept = [c for c, _ in measured if c.name not in failed]
    series = [s for (name, _), s in table.series.items() if name not in failed]
    facts["fuse-overlayfs"] = _version(["fuse-overlayfs", "--version"])
    elapsed = time.monotonic() - started
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    notes += [
        f"{runs} run{'s' * (runs > 1)}, {len(sizes) or 'no'} file sizes "
        f"({'--metadata: untar and find | xargs stat only' if metadata else 'first writes'}), "
        f"{elapsed / 60:.1f} minutes; in each "
        "run every configuration in turn, the order rotating from run to run; every sample in "
        "a fresh container (new upper and work directories, a new mount) on the same two lower "
        f"directories on {where}",
        f"load average (1, 5, 15 min) {' '.join(load_start)} at the start, "
        f"{' '.join(load_end)} at the end: this 2-core machine is shared with other work, "
        "so compare ratios within this run, not absolute numbers across reports",
        "cold: `echo 3 > /proc/sys/vm/drop_caches` after the mount (the page, dentry and "
        "inode caches of this kernel); the host under this VM may still cache the loop file's "
        "blocks, so cold here is colder than warm but not a disk read. warm: the lower file "
        "read once through its lower directory before the mount",
        "first write: open O_RDWR + 4 KiB pwrite at the middle + close, through the mount; "
        "fsync after it: open O_RDWR + fsync + close; upper growth: st_blocks * 512 summed "
        "over the upper directory after that fsync, minus before the write",
        "read: one sequential read of the largest file, 1 MiB at a time, cold then warm on "
        f"one mount; untar: `tar -xf` of the {tree_files}-file tree "
        f"({layers.tar_bytes / 1e6:.0f} MB tarball) into a new directory of "
        "the container, then syncfs of the filesystem holding the upper; find | xargs stat: "
        "`find TREE -print0 | xargs -0 stat` over the same tree in the base lower layer",
        "the tree is synthetic and the same every run (seeded): about one directory per 6.5 "
        "files, up to six deep, sizes log-normal around 3 KB with a tail to 2 MiB, one "
        "entry in twelve a symlink",
        "ratios: imaged's configurations against fuse-overlayfs and kernel overlay, medians of "
        "this run; for times below 1 means imaged is faster, for read rates above 1 does",
        "requests: after the timed runs, one more untar per FUSE configuration in a fresh "
        "container, untimed, imaged's server started with `--count-requests` (calls of each "
        "handler) and fuse-overlayfs with `-o debug` (the `opcode:` lines of its log, "
        "BATCH_FORGET counted as forget, INIT and DESTROY left out), mount to unmount",
    ]
    ratios = _ratios(table, kept, sizes, tree_files)
    summary = [*_summary(table, kept, absent, sizes, tree_files), "",
               *_requests_table(requests, tree_files)]
    if metadata:
        return write_report(out, "metadata", f"Untar and find | xargs stat on {filesystem}",
                            series, facts, ratios, notes, summary=summary,
                            data={"requests": requests})
    return write_report(out, "copyup", f"Copy-up and container I/O on {filesystem}", series,
                        facts, ratios, notes, _panels(table, kept, sizes), summary,
                        data={"requests": requests})
