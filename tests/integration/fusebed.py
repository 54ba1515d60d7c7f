"""The fuse server started directly (``python -m imaged.fuse.serve``) on a test's own layers,
and stopped however it ended: the shared harness of the fuse server's integration tests."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_TIMEOUT = 20.0


@dataclass
class Mount:
    path: Path
    upper: Path
    work: Path
    lowers: list[Path]
    proc: subprocess.Popen[bytes]


def serve(lowers: list[Path], home: Path, *extra: str) -> Mount:
    """A server for ``lowers`` (top first) with its upper, work and mount point in ``home``
    (made if missing, kept if there: a restart finds the upper it left), once it is mounted."""
    upper, work, mnt = home / "upper", home / "work", home / "mnt"
    for path in (upper, work, mnt):
        path.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "imaged.fuse.serve", "--upper", str(upper), "--work",
            str(work)]
    for lower in lowers:
        argv += ["--lower", str(lower)]
    reader, writer = os.pipe()
    proc = subprocess.Popen([*argv, *extra, "--ready-fd", str(writer), str(mnt)],
                            pass_fds=(writer,))
    os.close(writer)
    mount = Mount(mnt, upper, work, lowers, proc)
    try:
        with os.fdopen(reader, "rb") as ready:
            line = ready.readline()
        if line != b"ready\n":
            raise AssertionError(f"server said {line!r}")
    except BaseException:
        stop(mount)
        raise
    return mount


def stop(mount: Mount, sig: int = signal.SIGTERM) -> None:
    """End the server with ``sig`` (SIGKILL: a crash) and make sure no mount stays behind."""
    if mount.proc.poll() is None:
        mount.proc.send_signal(sig)
        try:
            mount.proc.wait(timeout=_TIMEOUT)
        except subprocess.TimeoutExpired:
            mount.proc.kill()
            mount.proc.wait()
    # Unconditionally: a dead server's mount fails lstat (ENOTCONN), so ismount misses it.
    subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=False,
                   stderr=subprocess.DEVNULL)


def walk(root: Path) -> dict[str, tuple[object, ...]]:
    """What a user sees of every entry under ``root``: type and mode, owner, device, and the
    contents of files and targets of symlinks."""
    tree: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            st = os.lstat(path)
            body: object = None
            if stat.S_ISREG(st.st_mode):
                body = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            tree[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev,
                                                 body)
    return tree


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path,
                  options: str = "") -> None:
    """Kernel overlay over ``lowers`` (top first): the reference the server is held to."""
    spec = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"{spec},{options}" if options else spec, str(target)], check=True)


@contextlib.contextmanager
def overlay_view(mount: Mount, scratch: Path, options: str = "") -> Iterator[Path]:
    """Kernel overlay over the upper a (stopped) server left, with a work directory of its
    own in ``scratch``, unmounted afterwards."""
    merged, work = scratch / "merged", scratch / "kwork"
    merged.mkdir(parents=True)
    work.mkdir()
    mount_overlay(mount.lowers, mount.upper, work, merged, options)
    try:
        yield merged
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)
