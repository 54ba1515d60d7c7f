"""Boot Debian's user-mode-linux kernel as a host process and run a shell script inside it.

This host's kernel has no device-mapper and no quotas; user-mode-linux is a real Linux 6.1 with
both, and it needs no KVM (``/dev/kvm`` here is PVM, which cannot run a stock kernel). The guest
sees the host's root read-only through hostfs under a writable overlay, so it runs this checkout's
own ``.venv`` and the host's tools unchanged; a writable hostfs share carries the script in and its
exit status and output out. ``init.sh`` beside this file is the guest's PID 1.

The kernel is not installed: ``apt-get download`` + ``dpkg-deb -x`` into a cache directory needs
no root and leaves the host's packages as ``scripts/setup`` made them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.cache import user_cache

PACKAGE = "user-mode-linux"
INIT = Path(__file__).with_name("init.sh")
TREE = INIT.resolve().parents[2]  # this checkout, visible in the guest at the same path
BUSYBOX = Path("/bin/busybox")  # init.sh's shell: static, so it runs before anything is mounted
SYSTEMD = Path("/lib/systemd/systemd")  # what init.sh execs for boot(systemd=True): the host's
# The guest's RAM is a file UML maps; on the host's tmpfs it costs only the pages the guest touches.
RAM_DIR = Path("/dev/shm")
# After a SIGKILL the kernel reaps UML's helper processes asynchronously.
REAP_SECONDS = 10.0
# The host's root, read-only, as the guest's; console 0 writes to stdout and no other console or
# serial line gets a host device.
ROOT_ARGS = ["rootfstype=hostfs", "rootflags=/", "ro", "con=null", "ssl=null", "con0=null,fd:1"]


@dataclass(frozen=True)
class Kernel:
    binary: Path  # linux.uml
    modules: Path  # the package's module tree for this kernel, bound on /lib/modules/<version>

    @property
    def version(self) -> str:
        return self.modules.name


@dataclass(frozen=True)
class GuestRun:
    pid: int  # the kernel's host PID, its processes' session ID: none is left on return
    status: int | None  # the script's exit status; None if it never finished
    timed_out: bool
    seconds: float  # from starting the kernel to its exit
    ram: Path  # as Exit's
    output: str  # the script's stdout and stderr
    console: str  # the kernel's and init's messages: why a guest that gave no status failed


def cache_dir() -> Path:
    return user_cache() / PACKAGE


def _kernel_in(tree: Path) -> Kernel:
    (modules,) = (tree / "usr/lib/uml/modules").iterdir()  # the package ships one kernel
    return Kernel(binary=tree / "usr/bin/linux.uml", modules=modules)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


def fetch_kernel(cache: Path | None = None) -> Kernel:
    """The kernel extracted in ``cache``, downloaded and extracted first if it is not there.

    The extraction is renamed into place whole, so an interrupted fetch leaves no half tree to be
    mistaken for a kernel. An empty package list (a machine whose apt lists were cleaned after
    ``scripts/setup``) is refreshed once, which needs root.
    """
    cache = cache or cache_dir()
    if cache.is_dir():
        return _kernel_in(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{PACKAGE}-", dir=cache.parent))
    try:
        download = ["apt-get", "download", "-q", PACKAGE]
        proc = _run(download, work)
        if proc.returncode != 0 and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"], work)
            proc = _run(download, work)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get download {PACKAGE} failed: {proc.stderr.strip()}")
        (deb,) = work.glob("*.deb")
        proc = _run(["dpkg-deb", "-x", str(deb), "tree"], work)
        if proc.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")
        try:
            (work / "tree").rename(cache)
        except OSError:  # a concurrent fetch put its tree there first: use that one
            if not cache.is_dir():
                raise
    finally:
        shutil.rmtree(work)
    return _kernel_in(cache)


def session_members(sid: int) -> list[int]:
    """PIDs whose session is ``sid`` (zombies included: they are gone only once reaped)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # Fields after the parenthesised command: state ppid pgrp session ...
        if int(stat.rpartition(")")[2].split()[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process of the kernel's session and wait until none is left.

    UML runs as many host processes (one per guest address space plus helpers), all in the
    session ``start_new_session`` gave it, so a timeout or an exception here leaves none behind.
    """
    deadline = time.monotonic() + REAP_SECONDS
    while True:
        proc.kill()  # a no-op once it was reaped, so never a recycled PID
        for pid in session_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        left = session_members(proc.pid)
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"user-mode-linux processes {left} survived SIGKILL")
        time.sleep(0.05)


def _check_cmdline_path(path: Path) -> None:
    # UML joins its arguments into the kernel command line with spaces.
    if not path.is_absolute() or any(c.isspace() for c in str(path)):
        raise ValueError(f"{path}: the guest needs an absolute path without whitespace")


@dataclass(frozen=True)
class Exit:
    pid: int  # the kernel's host PID, its processes' session ID: none is left on return
    timed_out: bool
    seconds: float  # from starting the kernel to its exit
    ram: Path  # the directory its RAM file lived in: gone on return, whoever else boots guests


class Running:
    """A kernel started with ``cmdline``, console to ``console``; ``env`` is added to the UML
    process's environment only. ``finish`` waits for it until ``timeout`` has passed since the
    start (or kills it at once, ``abort``); every host process it made and its RAM file are gone
    once ``finish`` returns, and it must be called."""

    def __init__(self, kernel: Kernel, cmdline: list[str], console: IO[bytes], *,
                 timeout: float, env: Mapping[str, str] | None = None) -> None:
        self._ram = tempfile.TemporaryDirectory(prefix="imaged-guest-", dir=RAM_DIR)
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        try:
            self.proc = subprocess.Popen([str(kernel.binary), *cmdline],
                                         stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT, cwd=self._ram.name,
                                         env={**os.environ, "TMPDIR": self._ram.name,
                                              **(env or {})},
                                         start_new_session=True)
        except BaseException:
            self._ram.cleanup()
            raise

    def finish(self, abort: bool = False) -> Exit:
        timed_out = False
        try:
            if not abort:
                self.proc.wait(max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            try:
                _kill_session(self.proc)
            finally:
                self._ram.cleanup()
        return Exit(pid=self.proc.pid, timed_out=timed_out,
                    seconds=time.monotonic() - self.start, ram=Path(self._ram.name))


def launch(kernel: Kernel, cmdline: list[str], console: IO[bytes], *, timeout: float,
           env: Mapping[str, str] | None = None) -> Exit:
    """Run the kernel until it exits or ``timeout`` passes (``Running``)."""
    return Running(kernel, cmdline, console, timeout=timeout, env=env).finish()


class Booting:
    """A guest ``start_boot`` started; ``finish`` is ``Running.finish`` and reads back what came
    from the guest."""

    def __init__(self, kernel: Kernel, share: Path, cmdline: list[str], *, timeout: float,
                 env: Mapping[str, str] | None) -> None:
        self.share = share
        self._console = (share / "console").open("wb")
        try:
            self.running = Running(kernel, cmdline, self._console, timeout=timeout, env=env)
        except BaseException:
            self._console.close()
            raise

    def finish(self, abort: bool = False) -> GuestRun:
        try:
            end = self.running.finish(abort)
        finally:
            self._console.close()
        share = self.share
        status_file = share / "status"
        # Empty if the guest was killed while writing it.
        status_text = status_file.read_text().strip() if status_file.exists() else ""
        status = int(status_text) if status_text else None
        output_file = share / "output"
        output = output_file.read_text(errors="replace") if output_file.exists() else ""
        return GuestRun(pid=end.pid, status=status, timed_out=end.timed_out,
                        seconds=end.seconds, ram=end.ram, output=output,
                        console=(share / "console").read_text(errors="replace"))


def start_boot(kernel: Kernel, share: Path, script: str, *, timeout: float,
               memory: str = "1G", env: Mapping[str, str] | None = None,
               systemd: bool = False) -> Booting:
    """Boot the guest to run ``script`` (sh) in it as root, and return at once; the returned
    ``Booting.finish`` waits for it and says what came back.

    ``share`` (an existing directory) is mounted writable at the same path in the guest; the
    script, its output and exit status pass through it, and the script may leave files there.
    The guest is killed ``timeout`` seconds after it started. ``env`` goes to the UML process
    (the xstate shim's preload), not to the guest. With ``systemd`` the guest's PID 1 is systemd
    (init.sh execs it once the root is ready) and the script runs as its service
    ``imaged-guest``.
    """
    for path in (share, kernel.modules, INIT, TREE):
        _check_cmdline_path(path)
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} not found: install busybox-static (scripts/setup)")
    if systemd and not SYSTEMD.is_file():
        raise FileNotFoundError(f"{SYSTEMD} not found: a systemd guest boots the host's systemd")
    (share / "run").write_text(script)
    cmdline = [f"mem={memory}", *ROOT_ARGS, f"init={INIT}",
               # Unknown name=value arguments become init's environment.
               f"IMAGED_GUEST_SHARE={share}", f"IMAGED_GUEST_MODULES={kernel.modules}",
               f"IMAGED_GUEST_TREE={TREE}"]
    if systemd:
        # fstab=no: the host's /etc/fstab names the host's disks, which the guest does not have.
        cmdline += [f"IMAGED_GUEST_INIT={SYSTEMD}", "fstab=no"]
    return Booting(kernel, share, cmdline, timeout=timeout, env=env)


def boot(kernel: Kernel, share: Path, script: str, *, timeout: float,
         memory: str = "1G", env: Mapping[str, str] | None = None,
         systemd: bool = False) -> GuestRun:
    """``start_boot``, waited for."""
    return start_boot(kernel, share, script, timeout=timeout, memory=memory, env=env,
                      systemd=systemd).finish()


def boot_init(kernel: Kernel, init: str, console: Path, *, timeout: float = 30.0,
              env: Mapping[str, str] | None = None) -> Exit:
    """Boot with ``init`` as PID 1 and nothing else: the kernel panics when it exits, which
    says on the console whether it ran (exitcode 0) or died (its signal)."""
    _check_cmdline_path(Path(init))
    with console.open("wb") as out:
        return launch(kernel, ["mem=64M", *ROOT_ARGS, f"init={init}"], out, timeout=timeout,
                      env=env)
