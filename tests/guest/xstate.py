"""Whether the guest kernel can keep its tasks' vector registers on this host, and the shim that
lets it where it cannot by itself.

user-mode-linux saves and restores each guest task's FP state with
``PTRACE_GETREGSET``/``PTRACE_SETREGSET(NT_X86_XSTATE)`` into a buffer of its own size. The host
kernel cuts a longer buffer down to its standard-format XSAVE area, whose size depends on the CPU
and on what the host kernel enables (2432 bytes with AVX-512 here, several KiB with AMX), and takes
a set only with that whole area. Debian's 6.1 build has been seen passing 2696 bytes (more than
the host's area: fine) and 832 bytes (``struct _xstate``: x87, SSE, AVX); with a shorter buffer
every set fails with EFAULT, UML kills the task, and the guest panics at once (init killed with
``exitcode=0x0000000b``). Upstream fixed this only in 6.13.

So the harness asks rather than guesses: the host's size from the kernel (a ptrace get with a
large buffer on a child of ours), UML's from UML itself (a short boot with ``xstate_shim.c``
preloaded in ``observe`` mode, which passes every call through and records the lengths). Where
UML's is shorter, the real boot preloads the shim in ``on`` mode (into the UML process only), which
keeps each guest task's whole area; see the C file for how. CPU names are never consulted.

A host where the guest cannot run user space at all, with or without the shim, is skipped with
one reason; anything else that stops a guest is an error (``classify``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.cache import user_cache
from tests.guest import uml
from tests.guest.tracee import Tracee

SOURCE = Path(__file__).with_name("xstate_shim.c")
# The length of older UML builds' buffer (x87 + SSE + AVX): what ``IMAGED_GUEST_XSTATE_EMULATE``
# is meant to be set to, to run the shim's whole path on a host whose UML needs no shim.
LEGACY_UML_BYTES = 832
EMULATE_ENV = "IMAGED_GUEST_XSTATE_EMULATE"
MODE_ENV = "IMAGED_GUEST_XSTATE"  # in the guest: the Mode its kernel was booted in
# What the kernel prints when init dies of SIGSEGV: the guest ran no user space.
INIT_SEGV = "Attempted to kill init! exitcode=0x0000000b"
INIT_EXITED = "Attempted to kill init! exitcode=0x00000000"


class Mode(enum.Enum):
    DIRECT = "direct"  # UML's buffer is the host's size: nothing to do
    SHIM = "shim"  # the shim keeps the whole area per guest task


class Outcome(enum.Enum):
    RAN = "ran user space"
    INIT_SEGV = "init killed by SIGSEGV at once"
    OTHER = "stopped otherwise"


@dataclass(frozen=True)
class Report:
    """The shim's counters (``struct report`` in xstate_shim.c, same field order)."""

    magic: int
    mode: int
    host_size: int
    get_len: int
    set_len: int
    keep_mask: int
    gets: int
    sets: int
    fresh: int
    older: int
    evictions: int
    errors: int
    last_errno: int

    MAGIC = 0x31657461747378
    FORMAT = "<13Q"

    @classmethod
    def read(cls, path: Path) -> Report | None:
        """The report at ``path``; None where the shim never ran (no file, or not its format)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != struct.calcsize(cls.FORMAT):
            return None
        report = cls(*struct.unpack(cls.FORMAT, data))
        return report if report.magic == cls.MAGIC else None

    @property
    def uml_lengths(self) -> set[int]:
        return {n for n in (self.get_len, self.set_len) if n}


@dataclass(frozen=True)
class Plan:
    """How the guest boots on this host, and why."""

    mode: Mode
    host_size: int
    uml_size: int
    emulated: bool  # the UML length is IMAGED_GUEST_XSTATE_EMULATE's, not UML's own
    shim: Path

    def describe(self) -> str:
        if self.mode is Mode.DIRECT:
            return f"xstate direct (UML {self.uml_size} B, host {self.host_size} B)"
        source = "emulated" if self.emulated else "UML's"
        return f"xstate shim (host {self.host_size} B, {source} {self.uml_size} B)"

    def environment(self, report: Path) -> dict[str, str]:
        """What the UML process's environment gains: nothing in direct mode."""
        if self.mode is Mode.DIRECT:
            return {}
        env = {"LD_PRELOAD": str(self.shim), "IMAGED_XSTATE_SHIM": "on",
               "IMAGED_XSTATE_REPORT": str(report)}
        if self.emulated:
            env["IMAGED_XSTATE_EMULATE"] = str(self.uml_size)
        return env


def decide(host_size: int, uml_lengths: set[int]) -> Mode:
    """The shim is needed exactly where UML passed a buffer shorter than the host's area: the
    kernel cuts a longer one down to its own size and takes that (``ptrace_regset``)."""
    if host_size <= 0 or not uml_lengths:
        raise ValueError(f"cannot decide from host {host_size} B and UML lengths {uml_lengths}")
    return Mode.DIRECT if min(uml_lengths) >= host_size else Mode.SHIM


def outcome(console: str) -> Outcome:
    if INIT_SEGV in console:
        return Outcome.INIT_SEGV
    if INIT_EXITED in console:
        return Outcome.RAN
    return Outcome.OTHER


def skip_reason(direct: Outcome, shim: Outcome, shim_report: Report | None,
                shim_faults: str) -> str | None:
    """Why the guest tier is skipped on this host, or None where a failure is an error.

    Only the known signature counts, in both modes, and only where the shim is known good: it
    ran, the host refused no call it shaped, and its checks against a real child passed
    (``self_check``). A broken shim on a host that needs it looks like the signature too."""
    if direct is not Outcome.INIT_SEGV or shim is not Outcome.INIT_SEGV:
        return None
    if shim_report is None or shim_report.errors or shim_faults:
        return None
    return ("the guest kernel cannot run user space on this host: init is killed by SIGSEGV at "
            "once, without and with the xstate shim")


def host_xstate_size() -> int:
    """The host's standard-format XSAVE area, as the kernel reports it to a ptrace get."""
    with Tracee() as child:
        return child.size


def self_check(shim: Path) -> str:
    """The shim's bookkeeping checked against a real child (``tracee.main``), in a process of
    its own so that this one never loads the shim: what it got wrong, or "" when nothing."""
    proc = subprocess.run([sys.executable, "-m", "tests.guest.tracee", str(shim)],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=uml.TREE)
    return "" if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()


def build_shim(cache: Path | None = None) -> Path:
    """The shim built from this checkout's source, into the cache on first use.

    Named by the source's digest, so an edited source is rebuilt; renamed into place whole."""
    cache = cache or user_cache() / "xstate-shim"
    source = SOURCE.read_bytes()
    target = cache / f"xstate-shim-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                               "-o", str(out), str(SOURCE)],
                              capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed: {proc.stderr.strip()}")
        out.rename(target)
    return target


def emulated_length() -> int | None:
    value = os.environ.get(EMULATE_ENV)
    if not value:
        return None
    length = int(value)
    if length < 576:  # the legacy area and the XSAVE header at least
        raise ValueError(f"{EMULATE_ENV}={value}: below 576 bytes")
    return length



@dataclass(frozen=True)
class Probe:
    plan: Plan
    direct: Outcome  # how /bin/true as init fared with the shim only watching


def probe(kernel: uml.Kernel, scratch: Path) -> Probe:
    """Boot ``/bin/true`` as init with the shim watching, and plan the real boot from what UML
    passed and what the host takes."""
    host = host_xstate_size()
    shim = build_shim()
    report_path, console = scratch / "observe.report", scratch / "observe.console"
    uml.boot_init(kernel, "/bin/true", console,
                  env={"LD_PRELOAD": str(shim), "IMAGED_XSTATE_SHIM": "observe",
                       "IMAGED_XSTATE_REPORT": str(report_path)})
    report = Report.read(report_path)
    text = console.read_text(errors="replace")
    if report is None or not report.uml_lengths:
        tail = "\n".join(text.splitlines()[-20:])
        raise RuntimeError(f"user-mode-linux made no xstate call in a probe boot:\n{tail}")
    emulate = emulated_length()
    if emulate is not None:
        plan = Plan(Mode.SHIM, host, emulate, emulated=True, shim=shim)
    else:
        plan = Plan(decide(host, report.uml_lengths), host, max(report.uml_lengths),
                    emulated=False, shim=shim)
    return Probe(plan, outcome(text))


def shim_outcome(kernel: uml.Kernel, probed: Probe, scratch: Path) -> tuple[Outcome,
                                                                            Report | None]:
    """How /bin/true as init fares with the shim acting, and the shim's report of it."""
    report_path, console = scratch / "shim.report", scratch / "shim.console"
    env = dataclasses.replace(probed.plan, mode=Mode.SHIM).environment(report_path)
    uml.boot_init(kernel, "/bin/true", console, env=env)
    return outcome(console.read_text(errors="replace")), Report.read(report_path)
