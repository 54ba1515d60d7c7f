"""Event-loop stalls: steps of a trio task that kept the daemon's loop from everything else.

Blocking work belongs in worker threads (``trio.to_thread.run_sync``): while one task step runs
on the loop, no other request is read or answered, and on a slow disk every blocking write
costs that disk's latency to every client at once. The daemon watches its own steps (a trio
instrument) so a regression shows itself in its log instead of as an occasional slow answer:
each step over ``threshold`` is logged with its task and where the loop thread was when the step
had run half the threshold (a watcher thread samples it then, since after the step the culprit's
frames are gone), and the longest step is logged when the daemon stops.

A stall's length depends on the disk and on the machine's load, so it says that the loop was
held, not reliably by whom. The watch also names the calls themselves: with a ``root``, every
call made on the loop thread that waits on that root's disk (Python's audit events for opening,
listing, making, renaming and removing files there, and for starting a process anywhere: see
``DISK_EVENTS``) is counted, and each call site is reported once, with its task and frames,
however fast the disk was. That count does not depend on timing, so a test can require it to be
zero. SQLite's own reads and writes are not audited (metadata stays on the loop on purpose:
docs/design.md), nor are ``stat`` and ``fsync``.

The sampler also measures how late its own thread wakes (``wake_delay``). A step is timed only
while the loop runs it; an answer can also wait while the loop is idle in ``epoll``, for the
interpreter lock another thread holds (C code that keeps the GIL, such as zero-filling a large
``bytearray``) before the loop may run at all, and the sampler waits for that lock the same way.
So a long wake delay with short steps says the loop was starved, not blocked; it is the CPU's
wait too, which the guest's other processes saw as under 50 ms where the daemon's answers took
up to 600 ms (issue 17: ``tests/guest/test_slowdisk.py`` at a9454bd).

The sampler is a watchdog of the loop, so it cannot be a task on it: it runs in a trio worker
thread (``trio.to_thread.run_sync``) in the watch's own nursery, on a limiter of its own so it
never takes a slot of the service's blocking work, and the end of the watch (the daemon
stopping, or failing) stops it before the nursery closes.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

FRAMES = 6  # innermost frames named in a report: enough to see the call and who made it
# Audit events of calls that wait on a disk, their path the first argument (PEP 578's table);
# starting a process waits on fork and exec wherever its program lies.
DISK_EVENTS = frozenset({
    "open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rmdir", "os.rename",
    "os.link", "os.symlink", "os.truncate", "os.chmod", "os.chown", "os.utime",
    "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.copyfile",
})
PROCESS_EVENT = "subprocess.Popen"


@dataclass(frozen=True)
class Stall:
    task: str
    seconds: float
    where: tuple[str, ...] = ()  # "path:line in function", innermost last; () if not sampled

    def describe(self) -> str:
        at = f" at {' <- '.join(reversed(self.where))}" if self.where else ""
        return f"event loop blocked {self.seconds * 1000:.0f} ms by task {self.task}{at}"


@dataclass(frozen=True)
class DiskCall:
    event: str  # the audit event: "open", "os.scandir", "subprocess.Popen", ...
    path: str  # its path; one relative to a directory descriptor stays relative
    task: str
    where: tuple[str, ...]  # as in ``Stall``

    def describe(self) -> str:
        return (f"{self.event} {self.path} on the event loop by task {self.task} at "
                f"{' <- '.join(reversed(self.where))}")


def task_frames(stack: traceback.StackSummary, limit: int = FRAMES) -> tuple[str, ...]:
    """The innermost ``limit`` frames below trio's own: the task's code, not the scheduler
    (nor the import machinery, when a step imports a module)."""
    frames = list(stack)
    trio_frames = [i for i, frame in enumerate(frames) if "/trio/" in frame.filename]
    own = [frame for frame in (frames[trio_frames[-1] + 1:] if trio_frames else frames)
           if not frame.filename.startswith("<frozen importlib")]  # the import, not how
    return tuple(f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in own[-limit:])


@asynccontextmanager
async def watching(threshold: float, report: Callable[[Stall], None], root: Path | None = None,
                   report_call: Callable[[DiskCall], None] = lambda call: None,
                   ) -> AsyncIterator[StallWatch]:
    """A ``StallWatch`` on the running trio loop, with its sampler in a worker thread, for
    the block; the block's own error comes out as it was raised, not in a group. With
    ``root``, calls on the loop that wait on its disk are counted and reported too."""
    watch = StallWatch(threshold, report, root, report_call)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_sampling, watch)  # sampling before the first step is timed
            trio.lowlevel.add_instrument(watch)
            if root is not None:
                _audit_into(watch)
            try:
                yield watch
            finally:
                _audited.discard(watch)
                trio.lowlevel.remove_instrument(watch)
                watch.stop()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
        raise error from error.__cause__


# The watches the process's audit hook reports to: a hook cannot be removed (PEP 578), so one
# is added, at the first watch with a root, and the watches come and go from this set.
_audited: set[StallWatch] = set()


@functools.cache
def _hook() -> None:
    """Add the audit hook, once per process."""
    sys.addaudithook(_audit)


def _audit_into(watch: StallWatch) -> None:
    _hook()
    _audited.add(watch)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in DISK_EVENTS or event == PROCESS_EVENT:
        for watch in list(_audited):
            watch.audited(event, args)


async def _sampling(watch: StallWatch,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """``watch.sample`` in a trio worker thread until ``watch.stop``. Not abandoned on cancel:
    the nursery waits for the thread instead of leaving it running."""
    def sample() -> None:
        trio.from_thread.run_sync(task_status.started)
        watch.sample()

    await trio.to_thread.run_sync(sample, limiter=trio.CapacityLimiter(1))


class StallWatch(trio.abc.Instrument):
    """Times every task step; ``report`` gets each ``Stall`` of at least ``threshold`` seconds,
    on the loop thread right after the step. ``longest`` is the longest step seen so far.
    Made on the loop's thread (``watching``); ``sample`` runs in another until ``stop``."""

    def __init__(self, threshold: float, report: Callable[[Stall], None],
                 root: Path | None = None,
                 report_call: Callable[[DiskCall], None] = lambda call: None) -> None:
        self.threshold = threshold
        self.report = report
        self.longest = Stall("none", 0.0)
        self.report_call = report_call
        self.disk_calls = 0  # calls on the loop thread that waited on the root's disk
        self._roots = () if root is None else tuple(
            {os.path.join(os.path.abspath(root), ""), os.path.join(os.path.realpath(root), "")})
        self._call_sites: set[tuple[str, tuple[str, ...]]] = set()
        self._step = 0  # counts steps, so a sample is never pinned on the wrong one
        self._began: float | None = None
        self._sampled: tuple[int, tuple[str, ...]] = (0, ())
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        # Seconds past its timeout the sampler's thread woke, at most (the module's docstring).
        self.wake_delay = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._step += 1
        self._began = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        began, self._began = self._began, None
        if began is None:
            return
        seconds = time.perf_counter() - began
        if seconds < self.longest.seconds and seconds < self.threshold:
            return
        step, where = self._sampled
        stall = Stall(task.name, seconds, where if step == self._step else ())
        if seconds >= self.longest.seconds:
            self.longest = stall
        if seconds >= self.threshold:
            self.report(stall)

    def stop(self) -> None:
        self._stop.set()

    def audited(self, event: str, args: tuple[Any, ...]) -> None:
        """Count a call that waits on the root's disk if the loop thread made it; report its
        call site the first time (the audit hook's, in the thread that made the call)."""
        if threading.get_ident() != self._loop_thread:
            return
        path = args[0] if args else ""
        if isinstance(path, int):
            path = f"(descriptor {path})"
        path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        # A path relative to a directory descriptor may lie anywhere: counted.
        if event != PROCESS_EVENT and os.path.isabs(path) and \
                not any(os.path.join(path, "").startswith(root) for root in self._roots):
            return
        self.disk_calls += 1
        try:
            task = trio.lowlevel.current_task().name
        except RuntimeError:  # between tasks: trio's own code
            task = "(none)"
        # Without source lines: reading them would open files from inside the hook.
        stack = traceback.StackSummary.extract(traceback.walk_stack(sys._getframe(2)),
                                               lookup_lines=False)
        stack.reverse()
        call = DiskCall(event, path, task, task_frames(stack))
        if (event, call.where) not in self._call_sites:
            self._call_sites.add((event, call.where))
            self.report_call(call)

    def sample(self) -> None:
        """Sample the loop thread's stack once in each step that runs past half the
        threshold, and time this thread's own wake-ups."""
        period = self.threshold / 4
        while True:
            asked = time.perf_counter()
            if self._stop.wait(period):
                return
            woke = time.perf_counter()
            self.wake_delay = max(self.wake_delay, woke - asked - period)
            began, step = self._began, self._step
            if began is None or step == self._sampled[0] or woke - began < self.threshold / 2:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is not None and step == self._step:
                self._sampled = (step, task_frames(traceback.extract_stack(frame)))
