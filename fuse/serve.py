"""The server process: ``python -m imaged.fuse.serve --upper DIR --work DIR [--lower DIR ...]
[--quota BYTES] [--read-only] [--copy-up auto|full|partial] [--partial-threshold BYTES]
[--writeback] [--control DIR] [--ready-fd N] [--count-requests FILE] [--debug] MOUNTPOINT``.

One process per mounted container, since ``pyfuse3.init`` serves one filesystem per process.
``--lower`` is repeated top first, as overlay's lowerdir. The parent learns the outcome on
``--ready-fd``: ``ready`` once the mount is made, or one ``error: ...`` line and exit status 1,
so ``imaged mount`` can return only once the mount answers, or say why it failed. With
``--control``, the server answers usage, quota and shutdown requests on ``DIR/control``
(``imaged.fuse.control``) and keeps its usage count across runs in ``DIR/usage``.

The count in ``DIR/usage`` is trusted only because of when it exists: the server writes it
when it exits cleanly (its mount gone, so nothing can write any more) and removes it, durably,
before it mounts. A server killed with SIGKILL therefore leaves no count behind, and the next
start (or a ``ps`` with no server running) walks the upper as ``du`` would. A count written
while serving would be stale after a kill as soon as the next write landed, so none is
written; a running server is asked over the control socket instead.

``--writeback`` turns on the kernel's writeback cache (``drivers.fuse.writeback``). Without it
(the default) ``write(2)`` returns once this server has written the data to the upper file
(and, for a partial file, made data and range record durable): an acknowledged write survives
a kill of the server, and a quota refusal is that write's own ENOSPC. With it, ``write(2)``
returns once the data is in the kernel's page cache, before this server has seen it: the
kernel writes it back later in large WRITEs, a failure (ENOSPC included) shows only at
``fsync(2)`` or ``close(2)``, and whatever is dirty when the server dies is lost. Only
``fsync(2)`` returning means the server has the data.

``--count-requests FILE`` counts the requests each handler answered and writes them to FILE as
JSON when the server exits: what a workload costs in round trips to this process, each of
which costs CPU time in pyfuse3, trio and the handler (``python -m imaged.bench.fusecpu``
divides the one by the other; docs/drivers.md, "Metadata speed"). Off by
default: the count is one more Python call per request. Requests libfuse answers itself
(operations pyfuse3 does not offer, such as ``ioctl`` or ``fallocate``) are not counted.
``--debug`` passes libfuse's ``debug`` option: every request and reply on stderr (the
container's ``server.log``), and the INIT flags the kernel and libfuse agreed on.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import os
import signal
import stat
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from imaged.fsutil import FS_XFLAG_EXTSZINHERIT, disk_usage, fsync_dir, get_fsxattr, set_fsxattr
from imaged.fuse import control, loop, partial
from imaged.fuse.changes import DEFAULT_PARTIAL_THRESHOLD, CopyUpPolicy, CopyUpSetting
from imaged.fuse.server import Server, clear_work
from imaged.host.mounts import backing_filesystem

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class StartError(Exception):
    """A refusal at start, said in one line on the ready fd."""


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m imaged.fuse.serve")
    parser.add_argument("--upper", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--lower", type=Path, action="append", default=[],
                        help="a lower layer directory; repeated, top first")
    parser.add_argument("--quota", type=int, default=None, help="bytes the upper may allocate")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--copy-up", type=CopyUpSetting, default=CopyUpSetting.AUTO,
                        choices=list(CopyUpSetting), metavar="auto|full|partial")
    parser.add_argument("--partial-threshold", type=int, default=DEFAULT_PARTIAL_THRESHOLD,
                        help="auto: lower files at least this big are copied up by range")
    parser.add_argument("--writeback", action="store_true",
                        help="the kernel's writeback cache (see the module docstring)")
    parser.add_argument("--control", type=Path, default=None,
                        help="directory for the control socket")
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--count-requests", type=Path, default=None, metavar="FILE",
                        help="write the requests answered, by operation, to FILE at exit")
    parser.add_argument("--debug", action="store_true",
                        help="libfuse's debug output: every request, and the INIT flags")
    parser.add_argument("mountpoint", type=Path)
    return parser.parse_args(argv)


def _inside(path: Path, mountpoint: Path) -> bool:
    return path == mountpoint or mountpoint in path.parents


def open_layers(args: argparse.Namespace) -> tuple[int, int, list[int]]:
    """The upper, work and lower descriptors, refusing a layout the mount would break: a
    layer under the mount point would be served through itself (a deadlock, fuse-overlayfs
    #277/#386), and copy-up renames from work into upper need one filesystem."""
    if not args.lower:
        raise StartError("at least one --lower is needed")
    if args.quota is not None and args.quota < 0:
        raise StartError("--quota must be a number of bytes")
    if args.partial_threshold < 1:
        raise StartError("--partial-threshold must be a positive number of bytes")
    mountpoint = args.mountpoint.resolve()
    for path in (args.upper, args.work, *args.lower):
        if _inside(path.resolve(), mountpoint):
            raise StartError(f"{path} is the mount point or lies under it")
    fds = []
    for path in (args.upper, args.work, *args.lower):
        try:
            fds.append(os.open(path, _DIR_FLAGS))
        except OSError as exc:
            raise StartError(f"{path}: {exc.strerror}") from exc
    upper, work, *lowers = fds
    if os.fstat(upper).st_dev != os.fstat(work).st_dev:
        raise StartError(f"{args.work} is not on the filesystem of {args.upper}")
    return upper, work, lowers


def allocate_exactly(directory: Path) -> None:
    """On xfs, give ``directory`` an extent-size hint of one block, which the files and
    directories made in it from now on inherit (``FS_XFLAG_EXTSZINHERIT``).

    The server counts a write as the growth of the upper file's ``st_blocks``, and on xfs that
    includes speculative preallocation: an appending write reserves blocks beyond EOF (as many
    again as the file holds, up to 8 GiB), counted in ``st_blocks`` at once and trimmed at
    close only when xfs thinks the file is not being appended to repeatedly. The quota would
    then refuse writes at half of it, and the count drift above what ``du`` sees. A file with an
    extent-size hint is allocated without delayed allocation, so without preallocation: its
    ``st_blocks`` is the blocks written. ext4's preallocation does not show in ``st_blocks``,
    so it needs no hint; files and directories made before the hint (an upper from an older
    imaged) keep xfs's default."""
    if backing_filesystem(directory).fstype != "xfs":
        return
    attrs = get_fsxattr(directory)
    block = os.statvfs(directory).f_bsize
    if attrs.xflags & FS_XFLAG_EXTSZINHERIT and attrs.extsize == block:
        return
    set_fsxattr(directory, replace(attrs, xflags=attrs.xflags | FS_XFLAG_EXTSZINHERIT,
                                   extsize=block))


def _say(fd: int | None, line: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Served:
    """The server behind its control socket: its count and quota, and the shutdown that a
    stop signal would also cause."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def quota(self) -> int | None:
        return self.server.quota

    @quota.setter
    def quota(self, value: int | None) -> None:
        self.server.quota = value

    @property
    def usage(self) -> int:
        return self.server.usage

    @usage.setter
    def usage(self, value: int) -> None:
        self.server.usage = value

    def shutdown(self) -> None:
        pyfuse3.terminate()

    async def materialize(self) -> dict[str, Any]:
        return await self.server.materialize()


def count_requests(server: Server) -> Counter[str]:
    """Wrap every request handler of ``server`` to count its calls (``--count-requests``);
    pyfuse3 looks each handler up on the object per request, so the wrappers are what it
    calls."""
    counts: Counter[str] = Counter()
    for name in dir(pyfuse3.Operations):
        handler = getattr(server, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(handler):
            continue

        async def counted(*args: Any, _name: str = name, _handler: Any = handler) -> Any:
            counts[_name] += 1
            return await _handler(*args)

        setattr(server, name, counted)
    return counts


def _forget_usage(control_dir: Path) -> None:
    """Remove the saved count before serving, durably: after a crash it would be stale."""
    try:
        (control_dir / control.USAGE).unlink()
    except FileNotFoundError:
        return
    fsync_dir(control_dir)


def _save_usage(control_dir: Path, used: int) -> None:
    temporary = control_dir / f"{control.USAGE}.tmp"
    with temporary.open("w") as out:
        out.write(f"{used}\n")
        out.flush()
        os.fsync(out.fileno())
    temporary.rename(control_dir / control.USAGE)
    fsync_dir(control_dir)


async def _serve(server: Server, control_dir: Path | None) -> None:
    """Serve until SIGTERM, SIGINT or a shutdown request, which end the main loop; the caller
    unmounts."""
    async with trio.open_nursery() as nursery:
        if control_dir is not None:
            nursery.start_soon(control.serve, Served(server), control_dir)
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        trio.lowlevel.add_instrument(loop.install())
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    os.umask(0)  # every mode the server sets is the caller's mode with the caller's umask
    try:
        upper, work, lowers = open_layers(args)
        if not args.read_only:
            allocate_exactly(args.upper)
            allocate_exactly(args.work)
            clear_work(work)
            records = partial.records_dir(work, create=False)
            if records is not None:
                try:
                    partial.sweep(upper, records)
                finally:
                    os.close(records)
        saved = control.saved_usage(args.control) if args.control is not None else None
        if args.control is not None:
            _forget_usage(args.control)
        server = Server(upper, work, lowers, quota=args.quota, read_only=args.read_only,
                        usage=disk_usage(args.upper) if saved is None else saved,
                        copy_up=CopyUpPolicy(args.copy_up, args.partial_threshold),
                        writeback=args.writeback)
        counts = count_requests(server) if args.count_requests is not None else None
        options = {"fsname=imaged", "subtype=imaged", "default_permissions", "allow_other"}
        if args.read_only:
            options.add("ro")
        if args.debug:
            options.add("debug")
        if not stat.S_ISDIR(os.stat(args.mountpoint).st_mode):
            raise StartError(f"{args.mountpoint} is not a directory")
        pyfuse3.init(server, str(args.mountpoint), options)
    except (StartError, OSError, RuntimeError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, OSError) and exc.errno == errno.ENOENT and exc.filename:
            message = f"{exc.filename}: {message}"
        _say(args.ready_fd, f"error: {message}\n")
        print(f"imaged.fuse.serve: {message}", file=sys.stderr)
        return 1
    # A parent may stop the server as soon as it reads "ready": the signal waits, blocked,
    # until the receiver is in place, instead of killing the process and leaving the mount
    # dead (ENOTCONN) behind it.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    _say(args.ready_fd, "ready\n")
    try:
        trio.run(_serve, server, args.control)
    finally:
        pyfuse3.close(unmount=True)
    if args.control is not None:
        _save_usage(args.control, server.usage)
    if counts is not None:
        args.count_requests.write_text(json.dumps(dict(counts.most_common()), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
