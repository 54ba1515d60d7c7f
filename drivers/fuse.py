"""The fuse driver: overlay's layers, stacked by a userspace copy-on-write filesystem.

Where kernel overlay is missing or refuses the backing filesystem, this driver gives the same
tree from the same on-disk form (``imaged.fuse``): layers are ``layers/<chainid>/diff`` with
overlay's whiteouts and opaque marks, and a container's writes go to ``containers/<name>/upper``
in the form kernel overlay reads, so the upper stays usable by it.

Each mounted container is served by its own process (``python -m imaged.fuse.serve``; pyfuse3
serves one filesystem per process), started in a session of its own so that neither the CLI
exiting nor the daemon restarting ends it, and ended by unmounting. The mount returns once the
server says the mount answers. The server enforces the quota itself (quota mode ``fuse``): a
write past it fails with ENOSPC from write(2).

A server that dies leaves its mount behind, answering ENOTCONN: the container is *broken*
(``broken``) until it is unmounted or mounted again. The dead mount is detached (MNT_DETACH):
a plain umount2 works on this kernel only while nothing holds the mount, and whatever holds it
gets ENOTCONN either way. ``serving_fd`` gives the daemon a pidfd of the server to notice a
death by.

Layout under ``ROOT/drivers/fuse``::

    layers/<chainid>/diff       the layer's own files, as the overlay driver keeps them
    containers/<name>/upper     the container's writes; work/ for copy-up's temporary files
    containers/<name>/quota     the quota in bytes, when it has one (the server's --quota)
    containers/<name>/server    "PID STARTTIME" of the server while it serves (mounted, or detached
                                by a forced umount with files still open); server.log
    containers/<name>/usage     the server's count of the upper's bytes, left by a clean exit
                                (imaged.fuse.serve says why only then)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from imaged.config import Config
from imaged.drivers import Capabilities, Mounted, Probe, QuotaMode, Usage
from imaged.drivers.base import DirectoryDriver
from imaged.errors import InternalError, InvalidError, NoSpaceError, QuotaUnsupportedError
from imaged.fsutil import disk_usage
from imaged.fuse import control, partial
from imaged.host.mounts import kernel_filesystems, unmount
from imaged.layers.unpack import WhiteoutMode
from imaged.sizes import shrink_refused

_START_TIMEOUT = 30.0  # for the server to mount: a Python process importing trio and pyfuse3
_STOP_TIMEOUT = 10.0  # for the server to exit once its mount is gone
_MATERIALIZE_TIMEOUT = 3600.0  # copying what partial files lack: a disk's speed, not a reply's


def _capabilities() -> Capabilities:
    return Capabilities("stacked", WhiteoutMode.OVERLAY, QuotaMode.FUSE, "writable",
                        rename_lower_dirs=False, xattrs=True)


def probe(config: Config) -> Probe:
    if importlib.util.find_spec("pyfuse3") is None:
        return Probe("fuse", False, "pyfuse3 is not installed (scripts/setup builds it)")
    if not Path("/dev/fuse").exists() or "fuse" not in kernel_filesystems():
        return Probe("fuse", False, "no FUSE in this kernel (/dev/fuse; modprobe fuse)")
    return Probe("fuse", True, "FUSE available; layers stacked by imaged's own server; quota "
                 "mode fuse (enforced by the server); lower directories rename with EXDEV",
                 _capabilities())


class FuseDriver(DirectoryDriver):
    """A directory driver for its layers; its quota is the server's, not a loop filesystem's
    or a project's, so the base's quota machinery is left unused."""

    name = "fuse"
    project_quotas = False
    partial_copy_up = True

    def capabilities(self) -> Capabilities:
        return _capabilities()

    def _tree(self, key: str) -> Path:
        return self._layer(key) / "diff"

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        super().prepare_layer(key, parent)
        diff = self._tree(key)
        diff.mkdir(mode=0o755)
        return diff

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None:
        home = self._new_container_home(name)
        (home / "upper").mkdir(mode=0o755)
        (home / "work").mkdir(mode=0o700)
        if quota is not None:
            (home / "quota").write_text(f"{quota}\n")

    def _quota(self, name: str) -> int | None:
        try:
            return int((self._container(name) / "quota").read_text())
        except FileNotFoundError:
            return None

    def resize_quota(self, name: str, quota: int, mounted: bool) -> None:
        """Through the server while mounted (it alone knows what its writes hold), else
        against the upper as it lies on disk: also where the server died, whose successor
        starts with the quota recorded here."""
        if self._quota(name) is None:
            raise QuotaUnsupportedError(f"container {name} was created without a quota; "
                                        "its quota cannot be set afterwards")
        if self._serving(name):
            reply = control.ask(self._container(name), {"op": "set_quota", "quota": quota})
            if "error" in reply:
                raise InvalidError(f"container {name}: {reply['error']}")
        else:
            used = self.usage(name).used
            if (why := shrink_refused(used, quota)) is not None:
                raise InvalidError(f"container {name} {why}")
        (self._container(name) / "quota").write_text(f"{quota}\n")

    def _mount_at(self, path: Path, name: str, layers: Sequence[str],
                  read_only: bool) -> Mounted:
        if not layers:
            raise InvalidError("an image without layers cannot be mounted")
        self._retire(name)
        home = self._container(name)
        argv = [sys.executable, "-m", "imaged.fuse.serve", "--upper", str(home / "upper"),
                "--work", str(home / "work"), "--control", str(home)]
        for key in reversed(layers):  # top first, as overlay's lowerdir
            argv += ["--lower", str(self._layer(key) / "diff")]
        quota = self._quota(name)
        if quota is not None:
            argv += ["--quota", str(quota)]
        if read_only:
            argv.append("--read-only")
        settings = self.config.drivers.get("fuse", {})
        argv += ["--copy-up", settings.get("copy_up", "auto")]
        if "partial_threshold" in settings:
            argv += ["--partial-threshold", str(settings["partial_threshold"])]
        if settings.get("writeback", False):
            argv.append("--writeback")
        self._start(home, argv, path)
        return Mounted(path)  # no spec: mount(2) cannot replay a FUSE mount; a runtime binds path

    def _start(self, home: Path, argv: list[str], path: Path) -> None:
        """Start the server and wait for the line it writes once the mount answers.

        posix_spawn, not Popen: the server outlives this call (and the CLI) by design, and a
        Popen object dropped with its process running is a leak warning."""
        ready, writer = os.pipe()
        try:
            os.set_inheritable(writer, True)
            log = str(home / "server.log")
            pid = os.posix_spawn(argv[0], [*argv, "--ready-fd", str(writer), str(path)],
                                 os.environ, setsid=True, file_actions=[
                                     (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_OPEN, 1, log,
                                      os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                                     (os.POSIX_SPAWN_DUP2, 1, 2)])
            os.close(writer)
            writer = -1
            said = _read_line(ready, _START_TIMEOUT)
        finally:
            os.close(ready)
            if writer != -1:
                os.close(writer)
        if said != "ready":
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            detail = said.removeprefix("error: ") if said else _tail(home / "server.log")
            raise InternalError(f"the fuse server did not mount {path}: {detail}")
        (home / "server").write_text(f"{pid} {_start_time(pid)}\n")

    def _server(self, name: str) -> tuple[int, int] | None:
        """The recorded server's PID and start time, if one was started and not unmounted."""
        try:
            pid, started = (int(n) for n in (self._container(name) / "server").read_text().split())
        except (FileNotFoundError, ValueError):
            return None
        return pid, started

    def _serving(self, name: str) -> bool:
        """Whether a server runs for the container: mounted, or detached by a forced unmount
        and still serving the files open then."""
        server = self._server(name)
        return server is not None and _alive(*server)

    def broken(self, name: str) -> str | None:
        server = self._server(name)
        if server is None or _alive(*server):
            return None
        return f"its fuse server (pid {server[0]}) is gone"

    def serving_fd(self, name: str) -> int | None:
        server = self._server(name)
        if server is None:
            return None
        try:
            fd = os.pidfd_open(server[0])
        except ProcessLookupError:
            return None
        if not _alive(*server):  # checked after the open: the descriptor names this process
            os.close(fd)
            return None
        return fd

    def unmount(self, name: str, target: Path | None, force: bool = False) -> None:
        """Unmount (EBUSY while files are open, as for the other drivers); the server, whose
        /dev/fuse connection that ends, then exits by itself. A broken container's dead mount
        is detached, whoever holds it (module docstring).

        Forced, the mount is detached: the server goes on serving the files still open, and
        exits by itself when the last one closes (the kernel then ends its connection). Its
        record stays until then, so ``usage`` still asks it and the next mount or removal
        stops it first (``_retire``) rather than run two servers over one upper."""
        server = self._server(name)
        if server is not None and not _alive(*server):
            unmount(target or self._container(name) / "merged", lazy=True)
        else:
            super().unmount(name, target, force)
            if force:
                return
        if server is not None:
            _wait_gone(*server)
            (self._container(name) / "server").unlink(missing_ok=True)

    def _retire(self, name: str) -> None:
        """Stop the server a forced unmount left serving files still open (they then answer
        ENOTCONN, as files of a dead server do), and drop its record: one server per upper.

        SIGTERM, not the control socket's shutdown: both end its loop, and the signal needs
        no reply from a server that may be exiting by itself. Its mount is detached already,
        so the unmount it does on the way out finds nothing at the mount point."""
        server = self._server(name)
        if server is None:
            return
        if _alive(*server):
            with contextlib.suppress(ProcessLookupError):
                os.kill(server[0], signal.SIGTERM)
        _wait_gone(*server)  # also reaps one that already exited, where it is our child
        (self._container(name) / "server").unlink(missing_ok=True)

    def remove_container(self, name: str) -> None:
        if self._container(name).exists():
            self._retire(name)
        super().remove_container(name)

    def usage(self, name: str) -> Usage:
        """The running server's count, else the count its clean exit left: both O(1). The
        upper is walked as ``du`` would only where neither is there (a server that was killed).
        And how many files are partial: one listing of their logs."""
        home = self._container(name)
        partials = partial.count(home / "work")
        if self._serving(name):
            with contextlib.suppress(InternalError):
                reply = control.ask(home, {"op": "usage"})
                return Usage(int(reply["used"]), self._quota(name), partial_files=partials)
        saved = control.saved_usage(home)
        used = disk_usage(home / "upper") if saved is None else saved
        return Usage(used, self._quota(name), partial_files=partials)

    def materialize(self, name: str, layers: Sequence[str], mounted: bool) -> None:
        """Through the server while one serves the container (its writes and its count stay
        exact), else directly on disk (a broken container's dead server writes nothing), where
        the count a clean exit saved no longer holds."""
        home = self._container(name)
        if self._serving(name):
            reply = control.ask(home, {"op": "materialize"}, timeout=_MATERIALIZE_TIMEOUT)
            if "need" in reply:
                raise NoSpaceError(f"container {name}: {reply['error']}")
            if "error" in reply:
                raise InternalError(f"container {name}: {reply['error']}")
            return
        paths = [home / "upper", home / "work",
                 *(self._layer(key) / "diff" for key in reversed(layers))]
        with contextlib.ExitStack() as stack:
            fds = []
            for path in paths:
                fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                stack.callback(os.close, fds[-1])
            stack.callback((home / control.USAGE).unlink, missing_ok=True)
            try:
                partial.materialize(fds[0], fds[1], fds[2:], quota=self._quota(name),
                                    usage=disk_usage(home / "upper"))
            except partial.NoRoom as exc:
                raise NoSpaceError(f"container {name}: {exc}") from None


def _read_line(fd: int, timeout: float) -> str:
    """What the server wrote on its ready pipe before closing it, or "" if nothing in time."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1] if lines else "it said nothing (server.log is empty)"


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks (/proc/PID/stat field 22): with the PID it names
    one process, never a later one that reuses the number."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, started: int) -> bool:
    """Whether that process still runs: a zombie, which no one has reaped yet, has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and int(fields[19]) == started


def _wait_gone(pid: int, started: int) -> None:
    """Wait for the server to exit, reaping it where it is our child (the daemon's); one still
    there after the timeout is killed."""
    deadline = time.monotonic() + _STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not _alive(pid, started):  # another's zombie is for its parent to reap
                return
        time.sleep(0.02)
    if not _alive(pid, started):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
