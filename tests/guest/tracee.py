"""A stopped child of ours whose XSAVE area is read and written whole with ptrace, and the xstate
shim's ``ptrace`` called on it as user-mode-linux calls it: the ground the harness stands on to
probe the host (``xstate.host_xstate_size``) and to check the shim before it would ever skip the
guest tier (``python -m tests.guest.tracee SHIM``, run by ``xstate.self_check``).

The checks use a buffer of 576 bytes (the legacy area and the XSAVE header), shorter than any
x86-64 host's area with AVX, so that every host keeps state outside it. Each check raises
``ShimFault`` saying what the shim got wrong.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

NT_X86_XSTATE = 0x202
PTRACE_PEEKUSER = 3
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
SYS_PTRACE = 101  # x86-64
PROBE_BYTES = 64 * 1024  # larger than any XSAVE area (AMX's is about 11 KiB)

PREFIX = 576
XSTATE_BV = slice(512, 520)
XMM0 = slice(160, 176)
RIP = 16 * 8  # offsetof(struct user_regs_struct, rip), for PTRACE_PEEKUSER
# Never written: PKRU changes what the child may access, AMX's tiles need a permission.
SPARED = (1 << 9) | (1 << 17) | (1 << 18)

Buffer = ctypes.Array[ctypes.c_char]


class ShimFault(Exception):
    pass


def _iov(buf: Buffer) -> ctypes.c_void_p:
    iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), len(buf))
    return ctypes.cast(iov, ctypes.c_void_p)


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


class Tracee:
    """``sleep`` stopped under ptrace. Requests go through the raw syscall, never libc's
    ``ptrace``: the shim may be loaded into this process. Use as a context manager."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.proc = subprocess.Popen(["sleep", "60"])
        self.pid = self.proc.pid
        try:
            self.request(PTRACE_SEIZE)
            self.request(PTRACE_INTERRUPT)
            os.waitpid(self.pid, 0)
            self.size = len(self.get())
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Tracee:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, request: int, addr: int = 0, data: ctypes.c_void_p | None = None) -> int:
        result = int(self.libc.syscall(ctypes.c_long(SYS_PTRACE), ctypes.c_long(request),
                                       ctypes.c_long(self.pid), ctypes.c_void_p(addr), data))
        if result < 0:
            _raise_errno()
        return result

    def get(self) -> bytes:
        buf = ctypes.create_string_buffer(PROBE_BYTES)
        iov = _iov(buf)
        self.request(PTRACE_GETREGSET, NT_X86_XSTATE, iov)
        length = ctypes.cast(iov, ctypes.POINTER(ctypes.c_size_t))[1]
        return buf.raw[:length]

    def set(self, state: bytes) -> None:
        self.request(PTRACE_SETREGSET, NT_X86_XSTATE,
                     _iov(ctypes.create_string_buffer(state, len(state))))

    def features(self) -> int:
        """The state components the host's kernel takes from ptrace (but ``SPARED``): a set
        naming one it does not have is refused."""
        state = bytearray(self.get())
        found = 0
        for bit in range(2, 63):
            if (1 << bit) & SPARED:
                continue
            state[XSTATE_BV] = (0b11 | 1 << bit).to_bytes(8, "little")
            try:
                self.set(bytes(state))
            except OSError:
                continue
            found |= 1 << bit
        return found

    def rich(self, seed: int) -> bytes:
        """Give the child a state with every component holding a pattern, and return it as the
        kernel reads it back."""
        state = bytearray(self.get())
        state[XMM0] = bytes([seed]) * 16
        state[PREFIX:] = bytes((seed + n) % 251 + 1 for n in range(len(state) - PREFIX))
        state[XSTATE_BV] = (0b11 | self.features()).to_bytes(8, "little")
        self.set(bytes(state))
        back = self.get()
        if not any(back[PREFIX:]):
            raise ShimFault("the host kept no state outside the first 576 bytes: nothing to check")
        return back

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Shim:
    """The shim loaded into this process from ``path`` (a copy of its own per use: a library is
    loaded once per path, and its table would carry over), acting, its report in ``report``."""

    def __init__(self, path: Path, report: Path) -> None:
        saved = {key: os.environ.get(key) for key in ("IMAGED_XSTATE_SHIM", "IMAGED_XSTATE_REPORT")}
        os.environ.update(IMAGED_XSTATE_SHIM="on", IMAGED_XSTATE_REPORT=str(report))
        try:
            self.lib = ctypes.CDLL(str(path), use_errno=True)  # its constructor reads them
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.lib.ptrace.restype = ctypes.c_long
        self.lib.ptrace.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.report_path = report

    def ptrace(self, request: int, pid: int, addr: int, data: ctypes.c_void_p | None) -> int:
        return int(self.lib.ptrace(request, pid, addr, data))

    def get(self, pid: int, buf: Buffer) -> None:
        if self.ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, _iov(buf)) < 0:
            _raise_errno()

    def set(self, pid: int, buf: Buffer) -> None:
        if self.ptrace(PTRACE_SETREGSET, pid, NT_X86_XSTATE, _iov(buf)) < 0:
            _raise_errno()

    def slots(self) -> tuple[int, int]:
        """Tasks in the table now, and the table's bound."""
        return int(self.lib.imaged_xstate_slots_used()), int(self.lib.imaged_xstate_slot_limit())


def expect(condition: bool, fault: str) -> None:
    if not condition:
        raise ShimFault(fault)


def check_task_that_ran(tracee: Tracee, shim: Shim) -> None:
    state = tracee.rich(7)
    buf = ctypes.create_string_buffer(PREFIX)
    shim.get(tracee.pid, buf)
    expect(buf.raw == state[:PREFIX], "a get did not hand over the state's prefix")
    tracee.rich(99)  # another task's registers on the same host process
    shim.set(tracee.pid, buf)
    expect(tracee.get() == state, "a task that ran did not get its whole state back")


def check_new_task(tracee: Tracee, shim: Shim) -> None:
    tracee.rich(7)
    buf = ctypes.create_string_buffer(PREFIX)
    shim.get(tracee.pid, buf)
    ctypes.memmove(ctypes.addressof(buf) + XMM0.start, b"\x42" * 16, 16)  # its own registers
    shim.set(tracee.pid, buf)
    after = tracee.get()
    expect(after[XMM0] == b"\x42" * 16, "a new task did not get its own prefix")
    # Every component outside the prefix in its initial state: all zeros in this format.
    expect(not any(after[PREFIX:]), "a new task got a dead task's state outside the prefix")


def check_signal_return(tracee: Tracee, shim: Shim) -> None:
    interrupted = tracee.rich(7)
    buf = ctypes.create_string_buffer(PREFIX)
    shim.get(tracee.pid, buf)  # the task stops; the guest kernel delivers a signal
    tracee.rich(50)  # the handler runs and changes every register
    shim.get(tracee.pid, buf)
    ctypes.memmove(buf, interrupted[:PREFIX], PREFIX)  # sigreturn: the frame's prefix
    shim.set(tracee.pid, buf)
    expect(tracee.get() == interrupted, "a signal return did not restore the interrupted state")


def check_bounded(tracee: Tracee, shim: Shim) -> None:
    _, limit = shim.slots()
    buffers = [ctypes.create_string_buffer(PREFIX) for _ in range(limit + 5)]
    for buf in buffers:
        shim.get(tracee.pid, buf)
    expect(shim.slots() == (limit, limit), f"the table holds {shim.slots()[0]} of {limit} tasks")
    shim.set(tracee.pid, buffers[0])  # evicted first: it starts afresh, and works


def check_long_buffers_pass(tracee: Tracee, shim: Shim) -> None:
    state = tracee.rich(7)
    long = ctypes.create_string_buffer(tracee.size + 264)
    shim.get(tracee.pid, long)
    shim.set(tracee.pid, long)
    expect(tracee.get() == state, "a buffer longer than the host's area did not pass through")
    expect(shim.slots()[0] == 0, "a buffer longer than the host's area took a slot")


def check_peek(tracee: Tracee, shim: Shim) -> None:
    word = ctypes.c_long()  # the raw request stores the word here
    tracee.request(PTRACE_PEEKUSER, RIP, ctypes.cast(ctypes.pointer(word), ctypes.c_void_p))
    expect(shim.ptrace(PTRACE_PEEKUSER, tracee.pid, RIP, None) == word.value != 0,
           "PTRACE_PEEKUSER lost glibc's convention (the word is the return value)")


CHECKS: list[Callable[[Tracee, Shim], None]] = [
    check_task_that_ran, check_new_task, check_signal_return, check_bounded,
    check_long_buffers_pass, check_peek]


def main(shim: Path) -> int:
    """Every check, each on a fresh copy of ``shim`` and a fresh child; prints each fault."""
    faults = 0
    with tempfile.TemporaryDirectory() as tmp:
        for number, check in enumerate(CHECKS):
            copy = Path(tmp) / f"shim-{number}.so"
            shutil.copy(shim, copy)
            try:
                with Tracee() as tracee:
                    check(tracee, Shim(copy, copy.with_suffix(".report")))
            except (ShimFault, OSError) as exc:
                print(f"{check.__name__}: {exc}")
                faults += 1
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
