"""A zfs-fuse daemon and pools on sparse files, for tests and benchmarks (DESIGN §8).

Debian's ``zfs-fuse`` is a real ZFS (pool version 23: snapshots, clones, quota) in userspace.
What running it for tests takes, learned the hard way:

- It daemonizes, so it is not our child: its PID comes from ``--pidfile`` and is watched through
  a pidfd (no PID reuse can fool the stop), and a stale pid file makes it exit 1 silently.
- There is one daemon per machine (its socket is ``/var/run/zfs/zfs_socket``). One that answers
  already is used as it is. A daemon this module started keeps its pid file at ``PIDFILE``, and
  the last user of this module to leave it, with no pool in it, stops it (another user's pools
  would go with it): the session that started it may end while another still uses it, and
  the one that ends last must not leave the daemon behind. A daemon started any other way (an
  operator's) is never stopped here.
- ``zpool create`` records pools in ``/etc/zfs/zpool.cache`` unless ``cachefile=none``, and the
  next daemon would try to import a pool whose file is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imaged.drivers.zfs import ZfsError, zfs, zpool

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POOL_SIZE = 4 << 30  # sparse: the host pays only for what is written
PIDFILE = Path("/run/imaged-zfs-fuse.pid")  # a daemon this module started, whoever did
LOCK = Path("/run/imaged-zfs-fuse.lock")  # shared by each user of the daemon (``running``)


def answers() -> bool:
    """Whether a ZFS daemon answers the CLI."""
    try:
        zpool("list", "-H", "-o", "name")
    except ZfsError as exc:
        if exc.kind != "daemon":
            raise
        return False
    return True


@dataclass
class Daemon:
    """A zfs-fuse daemon; ``pidfd`` is None for one that was running already (not ours)."""

    pidfd: int | None

    @property
    def ours(self) -> bool:
        return self.pidfd is not None


def _wait(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} after {timeout:.0f} s")
        time.sleep(0.05)


def _start() -> Daemon:
    pidfile = PIDFILE
    pidfile.unlink(missing_ok=True)  # a stale one makes zfs-fuse exit 1 without a word
    proc = subprocess.run(["zfs-fuse", "--pidfile", str(pidfile)], capture_output=True,
                          text=True, timeout=READY_TIMEOUT, check=False)
    if proc.returncode != 0:
        if answers():  # another session started one at the same moment: use it
            return Daemon(None)
        raise RuntimeError(f"zfs-fuse exited {proc.returncode}: {proc.stderr.strip()}")
    _wait(lambda: pidfile.exists() and pidfile.read_text().strip(), READY_TIMEOUT,
          "zfs-fuse wrote no pid file")
    daemon = Daemon(os.pidfd_open(int(pidfile.read_text())))
    try:
        _wait(answers, READY_TIMEOUT, "zfs-fuse does not answer")
    except BaseException:
        _stop(daemon)
        raise
    return daemon


def _stop(daemon: Daemon) -> None:
    """SIGTERM by pidfd, wait for the exit (it unmounts first), SIGKILL if it hangs."""
    if daemon.pidfd is None:
        return
    try:
        signal.pidfd_send_signal(daemon.pidfd, signal.SIGTERM)
        if not select.select([daemon.pidfd], [], [], STOP_TIMEOUT)[0]:
            signal.pidfd_send_signal(daemon.pidfd, signal.SIGKILL)
            select.select([daemon.pidfd], [], [], STOP_TIMEOUT)
    except ProcessLookupError:
        pass
    finally:
        os.close(daemon.pidfd)
        PIDFILE.unlink(missing_ok=True)


def _started_here() -> Daemon:
    """The daemon ``PIDFILE`` names, if that process is still a zfs-fuse (checked after its
    pidfd is open, so a reused PID cannot be stopped in its place); else none."""
    try:
        pid = int(PIDFILE.read_text())
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return Daemon(None)
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = ""
    if comm != "zfs-fuse":
        os.close(pidfd)
        return Daemon(None)
    return Daemon(pidfd)


@contextlib.contextmanager
def running() -> Iterator[Daemon]:
    """A zfs-fuse daemon for the duration (``ours``: started for it). Every user holds a
    shared lock on ``LOCK`` meanwhile; the last one out (its lock the only one, nested users
    in one process included) stops the daemon by its PID if this module started it, whichever
    user did, and no pool is left in it."""
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        daemon = Daemon(None) if answers() else _start()
        try:
            yield daemon
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:  # another user still has it
                last = False
            if last and not zpool("list", "-H", "-o", "name").split():
                _stop(daemon if daemon.ours else _started_here())
            elif daemon.pidfd is not None:
                os.close(daemon.pidfd)


def _destroy(name: str) -> None:
    try:
        zpool("destroy", "-f", name)
    except ZfsError as exc:
        if exc.kind != "no-pool":
            raise


@dataclass(frozen=True)
class Pool:
    name: str
    dataset: str  # <pool>/imaged: the parent dataset to configure as [drivers.zfs] dataset
    mountpoint: Path  # where that dataset is mounted


_POOL_NUMBERS = itertools.count()


@contextlib.contextmanager
def pool(workdir: Path, size: int = POOL_SIZE) -> Iterator[Pool]:
    """A fresh pool on a sparse file in ``workdir`` (not cached, named for this process so
    concurrent sessions never meet), with one dataset mounted at ``workdir/mnt``; destroyed
    with its file afterwards, whatever happened in between. Needs a running daemon."""
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "pool.img"
    name = f"imaged{os.getpid()}n{next(_POOL_NUMBERS)}"
    with image.open("wb") as f:
        f.truncate(size)
    try:
        zpool("create", "-o", "cachefile=none", "-m", "none", name, str(image))
        try:
            zfs("create", "-o", f"mountpoint={workdir / 'mnt'}", f"{name}/imaged")
            yield Pool(name, f"{name}/imaged", workdir / "mnt")
        finally:
            _destroy(name)
    finally:
        image.unlink()


@contextlib.contextmanager
def zfs_pool(workdir: Path, size: int = POOL_SIZE) -> Iterator[Pool]:
    """A daemon (started if none runs) and a fresh pool in it, for one benchmark run."""
    with running(), pool(workdir, size) as made:
        yield made
