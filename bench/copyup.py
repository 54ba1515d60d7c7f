"""``imaged bench copyup``: what copy-on-write costs a container, per backing filesystem and
configuration, on the same lower layers, in one interleaved run per filesystem (DESIGN §7,
issue 15).

The question is how the first write into a lower file grows with the file's size, and what
else a container pays for it. Kernel overlay (default, ``metacopy=on``, ``volatile``) and
fuse-overlayfs copy the whole file before the first write returns; imaged's fuse server does
too in full mode, clones it in reflink mode where the filesystem can (FICLONE), and in
partial mode copies only what is written. Beside them: imaged's vfs driver, which pays its
copy once, for the whole layer, when the container is created (its writes then touch plain
files); a btrfs subvolume snapshot (on btrfs only); and a "volume", a plain directory on the
same filesystem, what Docker's docs tell write-heavy workloads to use.

Each kernel backing filesystem (ext4, xfs with reflink, btrfs) is a dedicated loop filesystem on its
own loop device with direct I/O (``imaged.bench.scratch.loop_fs``): cold means that
filesystem unmounted and mounted again before the container mounts, so neither its caches
nor the host's cache of its backing file hold the lower file; warm means the lower file read
once before. On each, the same two lower directories: a top layer with files of random data,
one per size, and a directory of 1,000 files to rename, and a base layer holding a synthetic
tree shaped like a Debian image. Every sample gets a fresh container (fresh upper and work
directories, a fresh mount, a fresh snapshot), removed after it; every run measures every
configuration, the order rotating from run to run, so a machine that slows down for a while
slows all of them alike.

Operations, each on a lower file in a fresh container: open ``O_RDWR`` without writing; a
4 KiB overwrite in the middle; append 1 byte; an ``O_TRUNC`` rewrite of 4 KiB; ``chmod``.
Each is timed twice (the first, which may copy up, and the second, which should not), with
the ``fsync`` after the first and what the writable layer grew by (allocated blocks). The
overwrite runs at every size; the others at the smallest and largest (the middle sizes only
interpolate them). And a rename of a lower directory of 1,000 files: ``ok`` or ``EXDEV``,
and then the time ``mv``'s copy-and-delete fallback takes.

zfs-fuse, asked for by name (``--filesystems zfs``): this kernel has no ZFS, so the pool is
Debian's userspace zfs-fuse behind FUSE, on a loop device of its own
(``imaged.bench.scratch.zfs_fs``), and every row says so. Its cold is the pool exported and
imported (which unloads it from the daemon, its ARC with it), and its ``zfs`` row is a
container as the zfs driver makes one, a clone of the top layer's snapshot. A run on it alone
writes ``copyup-zfs.*``, beside, not over, the kernel filesystems' report.

devmapper, asked for by name (``--filesystems devmapper``, that is ``thin-ext4``, or
``thin-xfs``): a device-mapper thin pool as the devmapper driver makes one, on loop devices of
its own (``imaged.bench.scratch.thin_fs``), with the driver's filesystem on a thin device of
it, where every other configuration keeps its directories, and a ``devmapper`` row that is a
container as the driver makes one, a snapshot of the top layer's device. This host's kernel
has no device-mapper: ``scripts/bench-guest DIR copyup --filesystems devmapper`` runs the
bench in the user-mode-linux guest of the test tier, and the report, ``copyup-devmapper.*``,
opens by saying that its numbers are the guest's (one CPU, no disk) and how to relate them
to the host's: through its overlay row.

A configuration is one entry of ``CONFIGURATIONS``: how to stack and with which options, and
when it cannot be measured on a filesystem, why: a report row that says so, never a missing
row or a zero. Stacked configurations are tried once on each filesystem first (a mount and a
copy-up), so one the filesystem cannot carry (kernel overlay and imaged's fuse server on
zfs-fuse, which has no xattrs) is such a row with the kernel's or the server's reason, and
so is devmapper in a run without a thin pool (where it is measured instead).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imaged import __version__
from imaged.bench.report import BarPanel, Panel, Series, cell, machine_facts, write_report
from imaged.bench.scratch import (
    GUEST_COMMAND,
    LoopFs,
    ScratchError,
    ThinFs,
    ZfsFs,
    loop_fs,
    settle,
    thin_fs,
    zfs_fs,
)
from imaged.drivers.devmapper.ioctl import kernel_support
from imaged.drivers.vfs import copy_tree, reflink_supported
from imaged.errors import ImagedError, InvalidError
from imaged.fsutil import fsync_dir
from imaged.host.mounts import MountSpec, kernel_filesystems, mount_with_command, mountinfo, unmount
from imaged.ops import advise, copycost

SIZES = (1 << 20, 16 << 20, 256 << 20, 1 << 30)
QUICK_SIZES = (1 << 20, 16 << 20)
ZFS = "zfs-fuse"  # userspace ZFS behind FUSE: named so that nobody reads it as kernel ZFS
# The devmapper driver's filesystems on a thin device of its pool: named apart from the plain
# filesystems, since every layer below them is device-mapper's (and, on this host, a guest's).
THIN = ("thin-ext4", "thin-xfs")
FILESYSTEMS = ("ext4", "xfs", "btrfs", ZFS, *THIN)
# zfs: the only ZFS this machine has; devmapper: the driver's default filesystem (drivers.
# devmapper.fs = "ext4")
FILESYSTEM_ALIASES = {"zfs": ZFS, "devmapper": "thin-ext4"}
# zfs-fuse measures a userspace daemon and takes as long as the three others; device-mapper
# exists only in the guest kernel here: both asked for only
DEFAULT_FILESYSTEMS = ("ext4", "xfs", "btrfs")
GUEST_REPORT = "docs/bench/copyup-devmapper.md"
SPACE_SOURCE = {False: "statvfs", True: "the thin pool's data blocks"}
# The command line that made the report, when it is not this process's own (scripts/bench-guest
# runs imaged in the guest and names itself here): recorded in the report's facts.
COMMAND_ENV = "IMAGED_BENCH_COMMAND"
# A file the host keeps its /proc/loadavg copied into, for a guest whose own load says nothing
# of the machine's (scripts/bench-guest writes it into the share).
HOST_LOAD_ENV = "IMAGED_BENCH_HOST_LOADAVG"
HOST_LOAD_WHOSE = "the host's "
OPERATIONS = ("open", "overwrite", "append", "truncate", "chmod")
EVERY_SIZE = ("overwrite",)  # the others at the smallest and largest size only
TEMPERATURES = ("cold", "warm")
TREE_FILES = 6000
QUICK_TREE_FILES = 1000
RENAME_FILES = 1000
WRITE = b"w" * 4096
READ_CHUNK = 1 << 20
MOUNT_TIMEOUT = 30.0  # a fuse server is a Python process importing trio and pyfuse3
STOP_TIMEOUT = 15.0
NEVER_PARTIAL = str(1 << 62)  # a partial threshold no file reaches: reflink, else whole
_TREE_SEED = 14  # the number: any fixed seed makes every run's tree the same


@dataclass(frozen=True)
class Configuration:
    """One way to give a container its files. ``kind`` says how: ``overlay`` (the kernel's),
    ``imaged`` (``python -m imaged.fuse.serve``), ``fuse-overlayfs`` (Debian's), ``vfs``
    (imaged's copy driver: the layers copied at create), ``snapshot`` (a btrfs subvolume
    snapshot), ``clone`` (a zfs clone of the top layer's snapshot, as the zfs driver
    makes a container), ``volume`` (a plain directory). ``options`` are mount options for the kernel
    and fuse-overlayfs, server arguments for imaged. ``implied`` marks options a server that
    lacks them does anyway (full copy-up was the only mode before ``--copy-up`` existed), so
    the row runs without them there. ``only_on``: the filesystems it can run on at all;
    ``reflink``: it needs FICLONE on the backing filesystem."""

    name: str
    kind: str
    options: tuple[str, ...] = ()
    implied: bool = False
    only_on: tuple[str, ...] = ()
    reflink: bool = False


CONFIGURATIONS = (
    Configuration("overlay", "overlay"),
    Configuration("overlay metacopy", "overlay", ("metacopy=on",)),
    Configuration("overlay volatile", "overlay", ("volatile",)),
    Configuration("vfs", "vfs"),
    Configuration("btrfs", "snapshot", only_on=("btrfs",)),
    Configuration("zfs", "clone", only_on=(ZFS,)),
    Configuration("devmapper", "clone", only_on=THIN),
    Configuration("fuse full", "imaged", ("--copy-up", "full"), implied=True),
    Configuration("fuse reflink", "imaged",
                  ("--copy-up", "auto", "--partial-threshold", NEVER_PARTIAL), reflink=True),
    Configuration("fuse partial", "imaged", ("--copy-up", "partial")),
    # drivers.fuse.writeback: the kernel's writeback cache, writes acknowledged before the
    # server has them (docs/drivers.md); issue 14 asks for both measured
    Configuration("fuse writeback", "imaged", ("--copy-up", "full", "--writeback")),
    Configuration("fuse-overlayfs", "fuse-overlayfs"),
    Configuration("volume", "volume"),
)
MOUNTED = ("overlay", "imaged", "fuse-overlayfs")  # kinds with an upper, a work dir, a mount
PLAIN = ("vfs", "volume")  # kinds whose files are plain files, restored after each sample
FUSE_KINDS = ("imaged", "fuse-overlayfs")  # kinds whose requests are counted over an untar
PEERS = ("fuse-overlayfs", "overlay")  # what imaged's rows are divided by
METADATA_CONFIGS = ("overlay", "fuse full", "fuse partial", "fuse writeback", "fuse-overlayfs")


@dataclass(frozen=True)
class Layers:
    """The lower directories every configuration stacks (top first, as overlay's
    lowerdir), the files in them, the tarball unpacked into containers, and the flat copies
    the plain and snapshot configurations start from."""

    lowers: tuple[Path, ...]
    big: dict[int, str]  # size -> its path inside the container
    tree: str
    tarball: Path
    tar_bytes: int
    tree_files: int
    rename: str  # a lower directory of RENAME_FILES files
    flat: dict[str, Path]  # kind -> the directory holding both layers merged
    # what containers are clones of: the top layer's zfs snapshot, or its thin device's id
    origin: str | None = None


Backing = LoopFs | ZfsFs | ThinFs  # a backing filesystem: mount point, sync, free, remount


@dataclass(frozen=True)
class Container:
    mount: Path  # where the container's processes see its files
    upper: Path  # what grows when it writes
    warm: Path  # where the lower files are read to warm them


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
    if config.kind == "snapshot" and shutil.which("btrfs") is None:
        return None, "btrfs-progs is not installed"
    if config.kind != "imaged":
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


def _unfit(config: Configuration, filesystem: str, scratch: Path) -> str:
    """Why ``config`` cannot run on this filesystem, or "" when it can."""
    if config.only_on and filesystem not in config.only_on:
        return f"{config.name} runs on {' and '.join(config.only_on)} only"
    if config.reflink and not reflink_supported(scratch / "reflink-probe"):
        return f"{filesystem} cannot clone extents (FICLONE): reflink is full copy-up here"
    return ""


def _kernel_log() -> list[str]:
    """The kernel's log lines (with their timestamps, so new ones tell apart), or none when
    this host does not let us read it."""
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=False,
                          timeout=30).stdout.splitlines()


def _stores_xattrs(directory: Path) -> bool:
    probe = directory / "xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "trusted.imaged-probe", b"1")
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


def overlay_refusal(kernel_lines: Sequence[str]) -> str:
    """What overlayfs said in the kernel's log lines when it refused a mount, without its
    timestamps and its "...falling back" lines (what it would do instead, not why not)."""
    said = [m[1].strip() for line in kernel_lines
            if (m := re.search(r"overlayfs: (.*)", line)) and not m[1].startswith("...")]
    return "; ".join(said)


def _probe(config: Configuration, options: tuple[str, ...], fs: Backing,
           filesystem: str) -> str:
    """Why ``config`` cannot stack with its upper on this filesystem, or "" when it can:
    one mount and one copy-up of a lower file, which is where a filesystem lacking what
    the stack needs (RENAME_WHITEOUT, xattrs on zfs-fuse) fails. The kernel says why
    overlay refused in its log, not in mount's message."""
    home = fs.mount_point / "probe"
    lower, upper, work, target = (home / d for d in ("lower", "upper", "work", "mnt"))
    for path in (lower, upper, work, target):
        path.mkdir(parents=True)
    (lower / "file").write_bytes(b"lower")
    before = set(_kernel_log())
    try:
        with _mounted(config, options, (lower,), upper, work, target,
                      home.with_name("probe.log")), (target / "file").open("ab") as fh:
            fh.write(b"written")
    except (OSError, RuntimeError, subprocess.SubprocessError, ImagedError) as e:
        why = overlay_refusal([line for line in _kernel_log() if line not in before]) or (
            f"a copy-up failed: {e.strerror}" if isinstance(e, OSError) and e.strerror
            else str(e).strip().splitlines()[0])
        if not _stores_xattrs(upper):
            why += f" ({filesystem} stores no xattrs)"
        return f"{config.name} cannot stack on {filesystem}: {why}"
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return ""


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


def _btrfs(*args: str) -> None:
    subprocess.run(["btrfs", *args], check=True, capture_output=True, timeout=600)


@contextlib.contextmanager
def _container(config: Configuration, options: tuple[str, ...], layers: Layers, fs: Backing,
               *, cold: bool) -> Iterator[Container]:
    """A fresh container: new upper and work directories and a new mount, a new snapshot,
    or (vfs, volume) the plain copy restored after the sample; gone on exit. ``cold``: the
    backing filesystem is mounted again after the container's directories exist and before
    its mount, so what the container reads first comes from the device."""
    base = fs.mount_point
    home = base / "container"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    try:
        if config.kind in MOUNTED:
            upper, work, target = home / "upper", home / "work", home / "mnt"
            for path in (upper, work, target):
                path.mkdir()
            if cold:
                fs.remount()
            with _mounted(config, options, layers.lowers, upper, work, target,
                          base / f"{config.name.replace(' ', '-')}.log"):
                yield Container(target, upper, layers.lowers[0])
        elif config.kind == "clone":
            if not isinstance(fs, ZfsFs | ThinFs) or layers.origin is None:
                raise RuntimeError("a clone needs a zfs-fuse or thin pool and its layers")
            with fs.clone(layers.origin, "c", home / "rootfs",
                          before_mount=fs.remount if cold else lambda: None) as rootfs:
                yield Container(rootfs, rootfs, rootfs)
        elif config.kind == "snapshot":
            snap = home / "snap"
            _btrfs("subvolume", "snapshot", str(layers.flat["snapshot"]), str(snap))
            try:
                if cold:
                    fs.remount()
                yield Container(snap, snap, snap)
            finally:
                _btrfs("subvolume", "delete", str(snap))
        else:
            flat = layers.flat[config.kind]
            if cold:
                fs.remount()
            try:
                yield Container(flat, flat, flat)
            finally:
                _restore(flat, layers)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _restore(flat: Path, layers: Layers) -> None:
    """Undo a sample's changes to a plain copy: what the operations appended, truncated,
    chmodded or renamed, so the next sample meets the lower files again."""
    moved = flat / layers.rename
    if moved.with_name("moved").exists():
        os.rename(moved.with_name("moved"), moved)
    for size, rel in layers.big.items():
        path = flat / rel
        os.chmod(path, 0o644)
        if path.stat().st_size > size:
            os.truncate(path, size)
        elif path.stat().st_size < size:
            _plain_copy(layers.lowers[0] / rel, path)


def _plain_copy(source: Path, target: Path) -> None:
    """Copy data by read and write: no reflink, no copy_file_range, so a volume's file owns
    its blocks as a file a container wrote would."""
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(READ_CHUNK):
            dst.write(chunk)
        os.fsync(dst.fileno())


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


def _make_layers(fs: Backing, sizes: Sequence[int], tree_files: int,
                 kinds: set[str]) -> Layers:
    """The lower layers, and the flat copies the plain and snapshot ``kinds`` start from:
    vfs's as its driver makes it (``cp --reflink=auto``), a volume's by plain writes, the
    btrfs configuration's a subvolume whose data is cloned from the layers; for a zfs clone,
    the two layers as the zfs driver keeps them (the top a clone of the base's snapshot)."""
    scratch = fs.mount_point
    top, base = scratch / "lower-top", scratch / "lower-base"
    (top / "big").mkdir(parents=True)
    big = {}
    for size in sizes:
        print(f"writing a {_label(size)} lower file of random data", file=sys.stderr)
        _write_random(top / "big" / f"{_label(size)}.bin", size)
        big[size] = f"big/{_label(size)}.bin"
    rename = top / "rename" / "dir"
    rename.mkdir(parents=True)
    for i in range(RENAME_FILES):
        (rename / f"f{i:04d}").write_bytes(b"x" * 100)
    print(f"making a {tree_files}-file tree", file=sys.stderr)
    _make_tree(base / "tree", tree_files)
    tarball = scratch / "tree.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(base), "tree"], check=True,
                   timeout=600)
    flat = {}
    for kind in sorted(kinds & {"vfs", "volume", "snapshot"}):
        target = scratch / f"flat-{kind}"
        if kind == "snapshot":
            _btrfs("subvolume", "create", str(target))
        for layer in (base, top):  # the top layer last: its files win
            if kind == "vfs":
                copy_tree(layer, target)
            else:
                target.mkdir(exist_ok=True)
                reflink = "--reflink=always" if kind == "snapshot" else "--reflink=never"
                subprocess.run(["cp", "-a", reflink, "--no-target-directory", str(layer),
                                str(target)], check=True, timeout=1800)
        flat[kind] = target
    origin = None
    if "clone" in kinds and isinstance(fs, ZfsFs | ThinFs):
        origin = fs.layer("top", fs.layer("base", None, base), top)
    settle()
    return Layers((top, base), big, "tree", tarball, tarball.stat().st_size, tree_files,
                  "rename/dir", flat, origin)


def _label(size: int) -> str:
    return f"{size >> 30}G" if size >= 1 << 30 else f"{size >> 20}M"


# ----------------------------------------------------------------------------- measurements

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


def operate(operation: str, path: Path, size: int, *, second: bool = False) -> None:
    """One operation of ``OPERATIONS`` on a file of ``size`` bytes; ``second``: the one
    after the first (the overwrite moves on a block, chmod sets the other mode)."""
    if operation == "chmod":
        os.chmod(path, 0o600 if second else 0o640)
        return
    flags = {"open": os.O_RDWR, "overwrite": os.O_RDWR, "append": os.O_WRONLY | os.O_APPEND,
             "truncate": os.O_WRONLY | os.O_TRUNC}[operation]
    fd = os.open(path, flags)
    try:
        if operation == "overwrite":
            os.pwrite(fd, WRITE, size // 2 // len(WRITE) * len(WRITE) + second * len(WRITE))
        elif operation == "append":
            os.write(fd, b"a")
        elif operation == "truncate":
            os.write(fd, WRITE)
    finally:
        os.close(fd)


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _fsync(path: Path) -> None:
    """Open read-only and fsync: a read-only open copies nothing up, so this times only
    making the first operation durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _rename(source: Path) -> tuple[str, float, float | None]:
    """Rename a lower directory: the outcome (``ok`` or the errno's name), the seconds
    rename(2) took, and when it failed with EXDEV the seconds ``mv`` then takes (it copies
    and deletes, as every tool that meets EXDEV must)."""
    target = source.with_name("moved")
    start = time.perf_counter()
    try:
        os.rename(source, target)
    except OSError as e:
        took = time.perf_counter() - start
        if e.errno != errno.EXDEV:
            return errno.errorcode.get(e.errno or 0, str(e.errno)), took, None
        start = time.perf_counter()
        moved = subprocess.run(["mv", str(source), str(target)], capture_output=True,
                               text=True, check=False, timeout=1800)
        if moved.returncode != 0:  # the outcome to report, not a reason to stop the run
            why = moved.stderr.strip().splitlines()[-1].rpartition(": ")[2]
            return f"EXDEV, then mv failed: {why}", took, None
        return "EXDEV", took, time.perf_counter() - start
    return "ok", time.perf_counter() - start, None


class _Table:
    """The run's series by (configuration, filesystem, measure), in the order first named."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], Series] = {}

    def add(self, config: str, filesystem: str, measure: str, unit: str,
            value: float) -> None:
        key = (config, filesystem, measure)
        if key not in self.series:
            self.series[key] = Series(f"{config} on {filesystem}: {measure}", unit)
        self.series[key].samples.append(value)

    def get(self, config: str, filesystem: str, measure: str) -> Series | None:
        return self.series.get((config, filesystem, measure))


@dataclass(frozen=True)
class _Plan:
    """What one run measures: the operations at each size, the temperatures, and whether
    the container I/O rows (read, untar, find | xargs stat) are in it."""

    operations: dict[int, tuple[str, ...]]
    temperatures: tuple[str, ...]
    io: bool
    first_writes: bool


def plan(sizes: Sequence[int], *, quick: bool, metadata: bool) -> _Plan:
    """The matrix a run measures: every operation at the smallest and largest size, the
    overwrite (the first write advise predicts) at every size; ``quick``: no container I/O
    rows; ``metadata``: the container I/O rows alone."""
    if metadata:
        return _Plan({}, TEMPERATURES, io=True, first_writes=False)
    ends = {min(sizes), max(sizes)}
    return _Plan({s: OPERATIONS if s in ends else EVERY_SIZE for s in sorted(sizes)},
                 TEMPERATURES, io=not quick, first_writes=True)


def _sample(config: Configuration, options: tuple[str, ...], layers: Layers, fs: Backing,
            filesystem: str, the_plan: _Plan, table: _Table, outcomes: dict[str, set[str]]
            ) -> None:
    """One run's samples of one configuration on one filesystem, each in a fresh
    container."""
    name = config.name

    def add(measure: str, unit: str, value: float) -> None:
        table.add(name, filesystem, measure, unit, value)

    for size, operations in the_plan.operations.items():
        rel = layers.big[size]
        for operation in operations:
            for temperature in the_plan.temperatures:
                settle()
                with _container(config, options, layers, fs,
                                cold=temperature == "cold") as box:
                    if temperature == "warm":
                        _warm(box.warm / rel)
                    path = box.mount / rel
                    free, before = fs.free(), _allocated(box.upper)
                    first = _timed(functools.partial(operate, operation, path, size))
                    synced = _timed(functools.partial(_fsync, path))
                    used = free - fs.free()  # synced first: zfs counts synced blocks only
                    grown = _allocated(box.upper) - before
                    second = _timed(functools.partial(operate, operation, path, size,
                                                      second=True))
                label = f"{operation} {_label(size)} {temperature}"
                add(f"first {label}", "milliseconds", first * 1000)
                add(f"second {label}", "milliseconds", second * 1000)
                add(f"fsync after first {label}", "milliseconds", synced * 1000)
                add(f"growth after first {label}", "KiB", grown / 1024)
                add(f"space used after first {label}", "KiB", used / 1024)
    if the_plan.first_writes:
        for temperature in the_plan.temperatures:
            settle()
            with _container(config, options, layers, fs, cold=temperature == "cold") as box:
                outcome, took, fallback = _rename(box.mount / layers.rename)
            outcomes.setdefault(f"{name} on {filesystem}", set()).add(outcome)
            add(f"rename dir of {RENAME_FILES} files {temperature}", "milliseconds",
                took * 1000)
            if fallback is not None:
                add(f"mv fallback {temperature}", "seconds", fallback)
        if config.kind == "vfs":
            settle()
            fs.remount()
            create = fs.mount_point / "vfs-create"
            start = time.perf_counter()
            for layer in layers.lowers[::-1]:  # as the driver copies: base first
                copy_tree(layer, create)
            add("container create (whole-layer copy) cold", "seconds",
                time.perf_counter() - start)
            shutil.rmtree(create)
    if the_plan.io:
        _container_io(config, options, layers, fs, filesystem, table)


def _container_io(config: Configuration, options: tuple[str, ...], layers: Layers,
                  fs: Backing, filesystem: str, table: _Table) -> None:
    """What a container does most, in one cold container: ``find | xargs stat`` over the
    tree, reading the largest file, both cold then warm, and unpacking the tree into it."""
    settle()
    with _container(config, options, layers, fs, cold=True) as box:
        def add(measure: str, unit: str, value: float) -> None:
            table.add(config.name, filesystem, measure, unit, value)

        walk = f"find {box.mount / layers.tree} -print0 | xargs -0 stat > /dev/null"
        for temperature in TEMPERATURES:
            add(f"find | xargs stat {temperature}", "seconds", _timed_shell(walk))
        if layers.big:
            largest = max(layers.big)
            for temperature in TEMPERATURES:
                add(f"read {_label(largest)} {temperature}", "MB/s",
                    _read_rate(box.mount / layers.big[largest]))
        settle()
        add(f"untar {layers.tree_files} files + syncfs", "seconds", _untar(box, layers, fs))
        if config.kind in PLAIN:
            shutil.rmtree(box.mount / "untar")


def _untar(box: Container, layers: Layers, fs: Backing) -> float:
    """Seconds to unpack the tree into a new directory of the container and sync the
    backing filesystem (where the upper is)."""
    (box.mount / "untar").mkdir()
    start = time.perf_counter()
    subprocess.run(["tar", "-xf", str(layers.tarball), "-C", str(box.mount / "untar")],
                   check=True, timeout=1800, stdin=subprocess.DEVNULL)
    fs.sync()
    return time.perf_counter() - start


# fuse-overlayfs's debug log names each request by its opcode; imaged counts by handler.
_OPCODE = re.compile(rb"opcode: ([A-Z_]+)")
_NOT_REQUESTS = {"init", "destroy"}  # the session's own, answered inside libfuse for imaged


def _requests(config: Configuration, options: tuple[str, ...], layers: Layers,
              fs: Backing) -> dict[str, int]:
    """The requests a FUSE server answers over one untar in a fresh container, mount to
    unmount, by operation: imaged's ``--count-requests``, fuse-overlayfs's ``debug`` log.
    Untimed (both ways of counting cost time); the kernel decides what it sends, so one
    untar gives the number."""
    counts = fs.mount_point / "requests.json"
    log = fs.mount_point / f"{config.name.replace(' ', '-')}.log"
    logged = log.stat().st_size if log.exists() else 0
    counting = (*options, "--count-requests", str(counts)) if config.kind == "imaged" \
        else (*options, "debug")
    with _container(config, counting, layers, fs, cold=False) as box:
        _untar(box, layers, fs)
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

def _ratios(table: _Table, measured: dict[str, list[Configuration]], sizes: Sequence[int],
            tree_files: int) -> dict[str, float]:
    """imaged's rows against each peer's on the same filesystem, medians of the same run:
    times divided by the peer's time, read rates by the peer's rate."""
    measures = [f"untar {tree_files} files + syncfs",
                "find | xargs stat cold", "find | xargs stat warm"]
    if sizes:
        largest = _label(max(sizes))
        measures = [f"first overwrite {largest} cold", f"first overwrite {largest} warm",
                    f"read {largest} cold", f"read {largest} warm", *measures]
    ratios = {}
    for filesystem, configs in measured.items():
        names = {c.name for c in configs}
        for config in configs:
            if config.kind != "imaged":
                continue
            for peer in (p for p in PEERS if p in names):
                for measure in measures:
                    mine = table.get(config.name, filesystem, measure)
                    theirs = table.get(peer, filesystem, measure)
                    if mine is not None and theirs is not None and theirs.median > 0:
                        ratios[f"{filesystem}, {measure}: {config.name} / {peer}"] = \
                            mine.median / theirs.median
    return ratios


def _cell(series: Series | None, digits: int) -> str:
    return "—" if series is None else f"{series.median:.{digits}f}"


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
    """``n`` bytes in the largest unit it fills; negative when a layer shrank (a truncated
    plain file)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n:.0f} B"


def _summary(table: _Table, measured: dict[str, list[Configuration]],
             absent: dict[tuple[str, str], str], sizes: Sequence[int], the_plan: _Plan,
             tree_files: int, outcomes: dict[str, set[str]]) -> list[str]:
    """The medians a reader wants side by side, one section per filesystem, before the full
    table; a configuration not measured keeps its row, saying why."""
    lines: list[str] = []
    for filesystem, configs in measured.items():
        gone = [(c, why) for (c, fs), why in absent.items() if fs == filesystem]
        lines += [f"## {filesystem}", ""]
        if the_plan.first_writes:
            lines += _first_write_table(table, filesystem, configs, gone, sizes, the_plan)
            lines += _operations_table(table, filesystem, configs, gone, sizes, the_plan,
                                       outcomes)
        if the_plan.io:
            lines += _io_table(table, filesystem, configs, gone, sizes, tree_files)
    elsewhere = [(c, fs, why) for (c, fs), why in absent.items() if fs not in measured]
    if elsewhere:
        lines += ["## not measured", "", "| configuration | filesystem | why |", "|---|---|---|"]
        lines += [f"| {c} | {fs} | {why} |" for c, fs, why in elsewhere]
        lines.append("")
    return lines


def _first_write_table(table: _Table, filesystem: str, configs: list[Configuration],
                       gone: list[tuple[str, str]], sizes: Sequence[int],
                       the_plan: _Plan) -> list[str]:
    temps = the_plan.temperatures
    largest = _label(max(sizes))
    lines = [f"First 4 KiB overwrite in the middle of a lower file (open O_RDWR + pwrite + "
             f"close), median ms, {' / '.join(temps)}; the second overwrite, the fsync after "
             f"the first, what the writable layer grew by (st_blocks) and the space the "
             f"filesystem lost ({SPACE_SOURCE[filesystem in THIN]}) at {largest} cold:", "",
             "| configuration | " + " | ".join(_label(s) for s in sizes) +
             " | second | fsync after | growth | space used |",
             "|---|" + "---:|" * (len(sizes) + 4)]
    for config in configs:
        name = config.name

        def get(measure: str, name: str = name) -> Series | None:
            return table.get(name, filesystem, measure)

        cells = [" / ".join(_cell(get(f"first overwrite {_label(s)} {t}"), 1) for t in temps)
                 for s in sizes]
        growth = get(f"growth after first overwrite {largest} cold")
        used = get(f"space used after first overwrite {largest} cold")
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {_cell(get(f'second overwrite {largest} cold'), 2)} | "
                     f"{_cell(get(f'fsync after first overwrite {largest} cold'), 1)} | "
                     f"{'—' if growth is None else _size_text(growth.median * 1024)} | "
                     f"{'—' if used is None else _size_text(used.median * 1024)} |")
    lines += [f"| {name} | {why} |" + " |" * (len(sizes) + 3) for name, why in gone]
    return [*lines, ""]


def _operations_table(table: _Table, filesystem: str, configs: list[Configuration],
                      gone: list[tuple[str, str]], sizes: Sequence[int], the_plan: _Plan,
                      outcomes: dict[str, set[str]]) -> list[str]:
    largest = _label(max(sizes))
    lines = [f"Each operation on the {largest} lower file, cold, in a fresh container: first "
             "/ second, median ms, and the writable layer's growth; then the rename of a "
             f"lower directory of {RENAME_FILES} files and `mv`'s fallback when it is "
             "refused:", "",
             "| configuration | " + " | ".join(OPERATIONS) + " | rename | mv fallback |",
             "|---|" + "---:|" * (len(OPERATIONS) + 2)]
    for config in configs:
        name = config.name
        cells = []
        for operation in OPERATIONS:
            label = f"{operation} {largest} cold"
            first = table.get(name, filesystem, f"first {label}")
            growth = table.get(name, filesystem, f"growth after first {label}")
            cells.append(f"{_cell(first, 1)} / "
                         f"{_cell(table.get(name, filesystem, f'second {label}'), 2)}"
                         + ("" if growth is None else f", {_size_text(growth.median * 1024)}"))
        outcome = ", ".join(sorted(outcomes.get(f"{name} on {filesystem}", set()))) or "—"
        rename = table.get(name, filesystem, f"rename dir of {RENAME_FILES} files "
                           f"{the_plan.temperatures[0]}")
        fallback = table.get(name, filesystem, f"mv fallback {the_plan.temperatures[0]}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {outcome} "
                     f"({_cell(rename, 2)} ms) | "
                     f"{'—' if fallback is None else f'{fallback.median:.2f} s'} |")
        create = table.get(name, filesystem, "container create (whole-layer copy) cold")
        if create is not None:
            lines.append(f"| {name}: container create (whole-layer copy, cold) | "
                         f"{create.median:.2f} s |" + " |" * (len(OPERATIONS) + 1))
    lines += [f"| {name} | {why} |" + " |" * (len(OPERATIONS) + 1) for name, why in gone]
    return [*lines, ""]


def _io_table(table: _Table, filesystem: str, configs: list[Configuration],
              gone: list[tuple[str, str]], sizes: Sequence[int], tree_files: int
              ) -> list[str]:
    """Reads, untar and ``find | xargs stat``; with ``--metadata``, each imaged row also as
    a multiple of fuse-overlayfs's, the peer issue 14 measures against."""
    largest = _label(max(sizes)) if sizes else None
    measures = ([(f"read {largest} cold", 0), (f"read {largest} warm", 0)] if largest else [])
    measures += [(f"untar {tree_files} files + syncfs", 2), ("find | xargs stat cold", 2),
                 ("find | xargs stat warm", 2)]
    lines = [(f"Reading the {largest} lower file through the container (MB/s), u" if largest
              else "U") + f"npacking a {tree_files}-file tree into the container (s), and "
             "`find | xargs stat` over the same tree as a lower layer (s), medians; in "
             "brackets, the multiple of fuse-overlayfs's median in the same run:", "",
             "| configuration | " + " | ".join(cell(m) for m, _ in measures) + " |",
             "|---|" + "---:|" * len(measures)]
    for config in configs:
        cells = []
        for measure, digits in measures:
            mine = table.get(config.name, filesystem, measure)
            peer = table.get("fuse-overlayfs", filesystem, measure)
            text = _cell(mine, digits)
            if config.kind == "imaged" and mine is not None and peer is not None \
                    and peer.median > 0:
                text += f" ({mine.median / peer.median:.1f}x)"
            cells.append(text)
        lines.append(f"| {config.name} | " + " | ".join(cells) + " |")
    lines += [f"| {name} | {why} |" + " |" * (len(measures) - 1) for name, why in gone]
    return [*lines, ""]


def _panels(table: _Table, measured: dict[str, list[Configuration]], sizes: Sequence[int],
            temperature: str) -> list[Panel | BarPanel]:
    """One log-log panel per filesystem (first overwrite against file size, a line per
    configuration), then the space each configuration's first overwrite of the largest file
    took on the backing filesystem, grouped by filesystem."""
    panels: list[Panel | BarPanel] = []
    for filesystem, configs in measured.items():
        lines: dict[str, list[tuple[float, Series]]] = {}
        for config in configs:
            points = [(s / (1 << 20), series) for s in sizes if (series := table.get(
                config.name, filesystem, f"first overwrite {_label(s)} {temperature}"))]
            if points:
                lines[config.name] = points
        panels.append(Panel(f"{filesystem}: first 4 KiB overwrite, {temperature}",
                            "lower file size (MiB)", "milliseconds", lines))
    largest = _label(max(sizes))
    bars: dict[str, dict[str, float]] = {}
    for filesystem, configs in measured.items():
        for config in configs:
            used = table.get(config.name, filesystem,
                             f"space used after first overwrite {largest} {temperature}")
            if used is not None:
                bars.setdefault(config.name, {})[filesystem] = used.median / 1024
    panels.append(BarPanel(f"space the first overwrite of {largest} took ({temperature})",
                           f"MiB ({SPACE_SOURCE[set(measured) <= set(THIN)]}, after sync)",
                           bars))
    return panels


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


def _selected(names: Sequence[str] | None) -> tuple[Configuration, ...]:
    if not names:
        return CONFIGURATIONS
    known = {c.name: c for c in CONFIGURATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidError(f"no configuration {', '.join(map(repr, unknown))} (there are "
                         f"{', '.join(known)})")
    return tuple(known[n] for n in names)


def report_name(filesystems: Sequence[str]) -> str:
    """``copyup-zfs`` for a run on zfs-fuse alone, ``copyup-devmapper`` for one on a thin
    pool, else ``copyup``: the userspace ZFS and device-mapper (in the guest kernel here) are
    measured apart, and their reports must not replace the kernel filesystems' in ``DIR``."""
    if set(filesystems) & set(THIN):
        return "copyup-devmapper"
    return "copyup-zfs" if set(filesystems) == {ZFS} else "copyup"


def run(out: Path, runs: int, sizes: Sequence[int] | None, quick: bool,
        filesystems: Sequence[str] | None = None, configs: Sequence[str] | None = None, *,
        metadata: bool = False) -> list[Path]:
    """The report's paths. ``metadata``: only the untar and find | xargs stat rows, on ext4
    unless told, as ``metadata.{json,md,png}`` (no lower files of random data, no model for
    advise): the metadata path of the fuse server measured alone, in minutes."""
    if os.geteuid() != 0:
        raise RuntimeError("imaged bench copyup needs root: it mounts loop filesystems, "
                           "overlays and FUSE filesystems and drops the page cache")
    chosen = _selected(configs or (METADATA_CONFIGS if metadata else None))
    filesystems = [FILESYSTEM_ALIASES.get(f, f)
                   for f in filesystems or (("ext4",) if metadata else DEFAULT_FILESYSTEMS)]
    unknown = [f for f in filesystems if f not in FILESYSTEMS]
    if unknown:
        raise InvalidError(f"no filesystem {', '.join(unknown)} (there are "
                         f"{', '.join(FILESYSTEMS)}; zfs means zfs-fuse, devmapper "
                         "thin-ext4)")
    thin_missing = kernel_support() if set(filesystems) & set(THIN) else None
    if thin_missing is not None and set(filesystems) <= set(THIN):
        raise InvalidError(f"devmapper cannot be measured here: device-mapper is not usable in "
                           f"this kernel ({thin_missing}); {GUEST_COMMAND} runs it in the "
                           "user-mode-linux guest")
    sizes = [] if metadata else sorted(sizes or (QUICK_SIZES if quick else SIZES))
    the_plan = plan(sizes, quick=quick, metadata=metadata)
    runs = 1 if quick else runs
    tree_files = QUICK_TREE_FILES if quick else TREE_FILES
    load_start = _load()
    started = time.monotonic()
    notes: list[str] = []
    server_help = _server_help()
    runnable: list[tuple[Configuration, tuple[str, ...]]] = []
    absent: dict[tuple[str, str], str] = {}
    for config in chosen:
        options, why = _arguments(config, server_help)
        if options is None:
            absent.update({(config.name, fs): f"not measured: {why}" for fs in filesystems})
            continue
        runnable.append((config, options))
        if why:
            notes.append(f"{config.name}: {why}")
    table = _Table()
    requests: dict[str, dict[str, int]] = {}
    outcomes: dict[str, set[str]] = {}
    measured: dict[str, list[Configuration]] = {}
    facts = machine_facts()
    facts["imaged"] = __version__
    facts["loadavg"] = load_start  # the host's, in a guest that is given them
    if os.environ.get(COMMAND_ENV):
        facts["command"] = os.environ[COMMAND_ENV]
    guest = guest_facts() if os.environ.get("IMAGED_GUEST") == "1" else None
    if guest is not None:
        facts["guest"] = guest
    scratch_size = max(8 << 30, 5 * sum(sizes) + (4 << 30))
    for filesystem in filesystems:
        try:
            _filesystem(filesystem, scratch_size, runnable, sizes, the_plan, runs, tree_files,
                        table, outcomes, measured, absent, facts, notes, requests)
        except ScratchError as e:
            notes.append(f"{filesystem} not measured: {e}")
            measured.pop(filesystem, None)
            table.series = {k: v for k, v in table.series.items() if k[1] != filesystem}
            for key in [k for k in outcomes if k.endswith(f" on {filesystem}")]:
                del outcomes[key]
            absent.update({(c.name, filesystem): f"not measured: {e}" for c, _ in runnable})
    if not metadata and not set(filesystems) & set(THIN):
        absent[("devmapper", THIN[0])] = (
            "not measured here: device-mapper runs in the guest kernel tier "
            f"({GUEST_COMMAND}, {GUEST_REPORT})")
    for (name, filesystem), why in absent.items():
        notes.append(f"{name} on {filesystem}: {why}")
    for key, seen in outcomes.items():
        facts[f"rename of a lower directory: {key}"] = ", ".join(sorted(seen))
    series = list(table.series.values())
    facts["fuse-overlayfs"] = _version(["fuse-overlayfs", "--version"])
    elapsed = time.monotonic() - started
    load_end = _load()
    notes += _method(runs, sizes, the_plan, elapsed, tree_files, filesystems)
    notes += [
        f"{HOST_LOAD_WHOSE if HOST_LOAD_ENV in os.environ else ''}load average (1, 5, 15 "
        f"min) {' '.join(load_start)} at the start, "
        f"{' '.join(load_end)} at the end: this 2-core machine is shared with other work, "
        "so compare ratios within this run, not absolute numbers across reports",
    ]
    ratios = _ratios(table, measured, sizes, tree_files)
    summary = [*([guest_preamble(guest, facts.get("command")), ""] if guest else []),
               *_summary(table, measured, absent, sizes, the_plan, tree_files, outcomes), "",
               *_requests_table(requests, tree_files)]
    title = f"Copy-up and container I/O on {', '.join(filesystems)}"
    if metadata:
        return write_report(out, "metadata", f"Untar and find | xargs stat on "
                            f"{', '.join(filesystems)}", series, facts, ratios, notes,
                            summary=summary, data={"requests": requests})
    return write_report(out, report_name(filesystems), title, series, facts, ratios, notes,
                        _panels(table, measured, sizes, the_plan.temperatures[0]), summary,
                        data={"requests": requests})


def _filesystem(filesystem: str, size: int, runnable: list[tuple[Configuration, tuple[str, ...]]],
                sizes: Sequence[int], the_plan: _Plan, runs: int, tree_files: int,
                table: _Table, outcomes: dict[str, set[str]],
                measured: dict[str, list[Configuration]], absent: dict[tuple[str, str], str],
                facts: dict[str, object], notes: list[str],
                requests: dict[str, dict[str, int]]) -> None:
    """Every run of every configuration that fits on one backing filesystem."""
    backing = zfs_fs(size) if filesystem == ZFS else \
        thin_fs(size, filesystem.removeprefix("thin-")) if filesystem in THIN else \
        loop_fs(size, filesystem)
    with backing as fs:
        here = []
        for config, options in runnable:
            why = _unfit(config, filesystem, fs.mount_point)
            if not why and config.kind in MOUNTED:
                why = _probe(config, options, fs, filesystem)
            if why:
                absent[(config.name, filesystem)] = f"not measured: {why}"
            else:
                here.append((config, options))
        print(f"{filesystem}: {fs.description}", file=sys.stderr)
        layers = _make_layers(fs, sizes, tree_files, {c.kind for c, _ in here})
        facts[f"scratch {filesystem}"] = \
            f"{fs.description}, mounted {_mount_entry(fs.mount_point) or 'not a mount'}"
        if filesystem == ZFS:
            facts["zfs-fuse settings (/etc/zfs/zfsrc, read when its daemon starts)"] = \
                _zfsrc()
        failed: set[str] = set()
        for i in range(runs):
            order = here[i % max(1, len(here)):] + here[:i % max(1, len(here))]
            print(f"{filesystem} run {i + 1}/{runs}: {', '.join(c.name for c, _ in order)}",
                  file=sys.stderr)
            for config, options in order:
                if config.name in failed:
                    continue
                try:
                    _sample(config, options, layers, fs, filesystem, the_plan, table, outcomes)
                except ScratchError:
                    raise  # the filesystem is gone: not one configuration's failure
                except (OSError, RuntimeError, subprocess.SubprocessError, ImagedError) as e:
                    # One configuration failing should not cost the others their report.
                    failed.add(config.name)
                    absent[(config.name, filesystem)] = \
                        f"failed in run {i + 1}, not reported: {e}"[:600]
        kept = [c for c, _ in here if c.name not in failed]
        table.series = {k: s for k, s in table.series.items()
                        if k[1] != filesystem or k[0] not in failed}
        measured[filesystem] = kept
        for config, options in here:
            if config.name not in failed and config.kind in MOUNTED:
                with _container(config, options, layers, fs, cold=False) as box:
                    facts[f"mount: {config.name} on {filesystem}"] = \
                        _mount_entry(box.mount) or "?"
                if the_plan.io and config.kind in FUSE_KINDS:
                    requests[f"{config.name} on {filesystem}"] = \
                        _requests(config, options, layers, fs)


def _load() -> list[str]:
    """The 1, 5 and 15 minute load averages of the machine: the host's where the host copies
    them in (a guest's own are of its one CPU), else this kernel's."""
    return Path(os.environ.get(HOST_LOAD_ENV, "/proc/loadavg")).read_text().split()[:3]


def guest_facts() -> str:
    """What the user-mode-linux guest gives a benchmark: its CPUs, its RAM, and what its /tmp
    (where the scratch filesystems' files are) is."""
    memory = next((line.split(":", 1)[1].strip() for line in
                   Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), "?")
    where = tempfile.gettempdir()  # where the scratch filesystems' files go
    tmp = os.statvfs(where)
    fstype = next((m.fstype for m in mountinfo() if m.mount_point == where), "?")
    return (f"user-mode-linux {os.uname().release} (Linux as a host process, no KVM), "
            f"{os.cpu_count()} CPU, {memory} of RAM, {where} a {fstype} of "
            f"{tmp.f_blocks * tmp.f_frsize >> 20} MiB holding the scratch filesystems' "
            "backing files")


def guest_preamble(guest: str, command: object) -> str:
    """The paragraph a guest's report opens with: what its numbers are and are not."""
    return (f"**These are numbers from a user-mode-linux guest** ({guest}). Every system call "
            "and page fault of the guest is a round trip through the host's ptrace, it has one "
            "CPU for everything, and the thin pool's loop devices sit on files in its tmpfs, "
            "so there is no disk under any number: cold means the filesystem's caches "
            "dropped, not a read from a disk. Compare rows within this report only; to relate "
            "them to the host's tables ([copyup.md](copyup.md)), go through the in-guest "
            "overlay row (overlay on the same filesystem here, overlay on ext4 there): its "
            "ratio to the host's is the guest's own overhead." +
            (f" Made by `{command}`." if command else ""))


def _zfsrc() -> str:
    """The daemon's settings that shape what is measured (ARC size, FUSE cache timeouts)."""
    try:
        lines = Path("/etc/zfs/zfsrc").read_text().splitlines()
    except OSError:
        return "no /etc/zfs/zfsrc: zfs-fuse's defaults"
    return "; ".join(line.strip() for line in lines
                     if line.strip() and not line.lstrip().startswith("#"))


def _method(runs: int, sizes: Sequence[int], the_plan: _Plan, elapsed: float,
            tree_files: int, filesystems: Sequence[str]) -> list[str]:
    """The notes that say how the run measured what it reports."""
    notes = [
        f"{runs} run{'s' * (runs > 1)} on {', '.join(filesystems)} (one filesystem after "
        f"the other), {len(sizes) or 'no'} file sizes, {elapsed / 60:.1f} minutes; in each "
        "run every configuration in turn, the order rotating from run to run; every sample "
        "in a fresh container (new upper and work directories and a new mount, a new "
        "snapshot, or the plain copy restored) on the same lower directories",
    ]
    kernel = [f for f in filesystems if f != ZFS]
    notes.append(
        (f"cold on {', '.join(kernel)}: the loop filesystem unmounted and mounted again after "
         "the container's directories exist and before its mount (its loop device asked for "
         "direct I/O, so the host's cache of the backing file is not read either; the "
         "scratch facts say whether it was granted); " if kernel else "") +
        (f"cold on {ZFS}: the pool exported and imported at that moment (below); "
         if ZFS in filesystems else "") + "warm: the lower file read once before the operation")
    if ZFS in filesystems:
        notes.append(
            "zfs-fuse is Debian's userspace ZFS (pool version 23) behind FUSE, not kernel "
            "ZFS (this kernel has none): every number on it includes its daemon and FUSE. "
            "Its pool is on a loop device of its own with direct I/O; cold there means the "
            "pool exported and imported again (zpool export unmounts every dataset, unloads "
            "the pool from the daemon, its ARC and vdev cache with it, and closes the loop "
            "device; a dataset unmount alone would leave the daemon's ARC warm), the "
            "daemon itself is not restarted (another user's pools may be in it). The zfs row "
            "is a container as imaged's zfs driver makes it: the base and top layers "
            "datasets, the top a clone of the base's @layer snapshot, the container a "
            "canmount=noauto clone of the top's (the bind mount the driver adds on top is "
            "left out); vfs, a volume and the stacked rows put their directories in one "
            "dataset of the same pool. Sync on zfs-fuse (before statvfs, st_blocks and "
            "after untar) waits for a transaction group, as the zfs driver does: syncfs "
            "does not reach its daemon")
    thin = [f for f in filesystems if f in THIN]
    if thin:
        notes.append(
            f"{', '.join(thin)}: a device-mapper thin pool (dm-thin, 64 KiB blocks, as the "
            "devmapper driver makes its pool) on two loop devices of its own (data and "
            "metadata), and on its thin device 0 the driver's filesystem, made and mounted "
            "with the driver's own mkfs and mount options (discard included): the filesystem "
            "the stacked, vfs and volume rows keep their directories on. The devmapper row is "
            "a container as the driver makes one: the base layer a thin device with that "
            "filesystem, the top layer a snapshot of it, the container a snapshot of the "
            "top's, mounted; cold there is the bench filesystem remounted before the "
            "container's mount (the container's device is new in every sample, so nothing of "
            "it is cached). Space used on a thin pool is the pool's data blocks (its status "
            "after sync), not statvfs: a snapshot's first write allocates pool blocks that no "
            "filesystem's statvfs shows")
    if the_plan.first_writes:
        notes += [
            "operations: open = open O_RDWR + close; overwrite = open O_RDWR + 4 KiB pwrite "
            "at the middle + close; append = open O_APPEND + write 1 byte + close; truncate = "
            "open O_TRUNC + write 4 KiB + close; chmod. second: the same again (the overwrite "
            "a block further on, chmod to the other mode). The overwrite at every size, the "
            "others at the smallest and largest. fsync after first: open O_RDONLY + fsync + "
            "close; growth: st_blocks * 512 summed over the writable layer after that fsync, "
            "minus before the operation: extents shared by a clone (overlay and fuse reflink "
            "copy-ups on xfs and btrfs, btrfs snapshots, vfs copies) count in full, as "
            "st_blocks counts them; for vfs and a volume it is the change of the container's "
            "own files (negative when truncate freed blocks); space used: the backing "
            "filesystem's free blocks (statvfs after syncfs) before the operation minus after "
            "that fsync, where a clone costs only its metadata",
            "vfs: imaged's copy driver copies the layers when the container is created (cp -a "
            "--reflink=auto, as the driver does), so its operations touch plain files and "
            "its copy-up cost is the container create row; volume: the same files copied "
            "once by plain writes into a directory on the same filesystem",
            f"rename: rename(2) of a lower directory of {RENAME_FILES} files; its outcome "
            "(ok or EXDEV) is in the facts, and on EXDEV the time `mv` takes to copy and "
            "delete instead",
        ]
    if the_plan.io:
        notes.append(
            "read: one sequential read of the largest file, 1 MiB at a time, cold then warm "
            f"in one cold container; untar: `tar -xf` of the {tree_files}-file tree into a "
            "new directory of the container, then syncfs; find | xargs stat: `find TREE "
            "-print0 | xargs -0 stat` over the same tree in the base lower layer, cold then "
            "warm. The tree is synthetic and the same every run (seeded): about one "
            "directory per 6.5 files, up to six deep, sizes log-normal around 3 KB with a "
            "tail to 2 MiB, one entry in twelve a symlink")
        notes.append(
            "requests: after the timed runs, one more untar per FUSE configuration in a fresh "
            "container, untimed, imaged's server started with `--count-requests` (calls of "
            "each handler) and fuse-overlayfs with `-o debug` (the `opcode:` lines of its log, "
            "BATCH_FORGET counted as forget, INIT and DESTROY left out), mount to unmount")
    return notes
