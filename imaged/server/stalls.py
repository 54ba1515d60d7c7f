"""Event-loop stalls: steps of a trio task that kept the daemon's loop from everything else.

Blocking work belongs in worker threads (``trio.to_thread.run_sync``): while one task step runs
on the loop, no other request is read or answered, and on a slow disk every blocking write
costs that disk's latency to every client at once. The daemon watches its own steps (a trio
instrument) so a regression shows itself in its log instead of as an occasional slow answer:
each step over ``threshold`` is logged with its task and where the loop thread was when the step
had run half the threshold (a watcher thread samples it then, since after the step the culprit's
frames are gone), and the longest step is logged when the daemon stops.

The sampler is a watchdog of the loop, so it cannot be a task on it: it runs in a trio worker
thread (``trio.to_thread.run_sync``) in the watch's own nursery, on a limiter of its own so it
never takes a slot of the service's blocking work, and the end of the watch (the daemon
stopping, or failing) stops it before the nursery closes.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

FRAMES = 6  # innermost frames named in a report: enough to see the call and who made it


@dataclass(frozen=True)
class Stall:
    task: str
    seconds: float
    where: tuple[str, ...] = ()  # "path:line in function", innermost last; () if not sampled

    def describe(self) -> str:
        at = f" at {' <- '.join(reversed(self.where))}" if self.where else ""
        return f"event loop blocked {self.seconds * 1000:.0f} ms by task {self.task}{at}"


def task_frames(stack: traceback.StackSummary, limit: int = FRAMES) -> tuple[str, ...]:
    """The innermost ``limit`` frames below trio's own: the task's code, not the scheduler
    (nor the import machinery, when a step imports a module)."""
    frames = list(stack)
    trio_frames = [i for i, frame in enumerate(frames) if "/trio/" in frame.filename]
    own = [frame for frame in (frames[trio_frames[-1] + 1:] if trio_frames else frames)
           if not frame.filename.startswith("<frozen importlib")]  # the import, not how
    return tuple(f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in own[-limit:])


@asynccontextmanager
async def watching(threshold: float,
                   report: Callable[[Stall], None]) -> AsyncIterator[StallWatch]:
    """A ``StallWatch`` on the running trio loop, with its sampler in a worker thread, for
    the block; the block's own error comes out as it was raised, not in a group."""
    watch = StallWatch(threshold, report)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_sampling, watch)  # sampling before the first step is timed
            trio.lowlevel.add_instrument(watch)
            try:
                yield watch
            finally:
                trio.lowlevel.remove_instrument(watch)
                watch.stop()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
        raise error from error.__cause__


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

    def __init__(self, threshold: float, report: Callable[[Stall], None]) -> None:
        self.threshold = threshold
        self.report = report
        self.longest = Stall("none", 0.0)
        self._step = 0  # counts steps, so a sample is never pinned on the wrong one
        self._began: float | None = None
        self._sampled: tuple[int, tuple[str, ...]] = (0, ())
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()

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

    def sample(self) -> None:
        """Sample the loop thread's stack once in each step that runs past half the
        threshold."""
        while not self._stop.wait(self.threshold / 4):
            began, step = self._began, self._step
            if began is None or step == self._sampled[0] or \
                    time.perf_counter() - began < self.threshold / 2:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is not None and step == self._step:
                self._sampled = (step, task_frames(traceback.extract_stack(frame)))
