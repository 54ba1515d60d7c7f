"""pyfuse3's main loop with one task switch per request instead of two.

pyfuse3 reads ``/dev/fuse`` from trio tasks that take turns under one "read lock": the task
holding it waits for the descriptor to become readable, releases it, reads the request and runs
its handler inline; another task waits for the lock meanwhile, so that a handler that awaits (a
copy-up in a worker thread) never stops the mount from reading the next request. With
``trio.Lock`` every release hands the lock to that waiting task, so each request costs a second
task step and a second pass of trio's run loop (wake the waiter, register the descriptor with
epoll again), whether or not the handler awaited anything: most do not, metadata syscalls being
inline. Without that second step the server spent about a third less CPU time over the
6,000-file untar of ``python -m imaged.bench.fusecpu`` (docs/drivers.md, "Metadata speed").

``install()`` swaps in ``ReadLock``, through the hook pyfuse3 keeps for replacing trio (its
module attribute ``trio``, which its own ``pyfuse3.asyncio`` sets): a released lock is handed
to a waiting task only once the releasing task's step ends with the lock still free, that is
when its handler awaited. A handler that does not await comes back for the lock in the same
step and takes it again, and the waiting task never runs. ``HandOff``, a trio instrument,
looks at the end of each task step. Everything else pyfuse3 asks of trio is trio's own.
"""

from __future__ import annotations

import collections
import types
from typing import Any

import pyfuse3
import trio


class ReadLock:
    """The lock pyfuse3 takes around waiting for ``/dev/fuse``: free to take at once, without
    a checkpoint (waiting for the descriptor, which follows, is one), and handed to a waiting
    task only by ``hand_off``."""

    def __init__(self) -> None:
        self.held = False
        self.waiting: collections.deque[trio.lowlevel.Task] = collections.deque()

    async def __aenter__(self) -> None:
        if not self.held:
            self.held = True
            return
        task = trio.lowlevel.current_task()
        self.waiting.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.waiting.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)  # woken holding it (hand_off)

    async def __aexit__(self, *_: object) -> None:
        self.held = False

    def hand_off(self) -> None:
        """Give a free lock to the task waiting longest, if any."""
        if not self.held and self.waiting:
            self.held = True
            trio.lowlevel.reschedule(self.waiting.popleft())


class HandOff(trio.abc.Instrument):
    """At the end of every task step, ``ReadLock.hand_off``: a step that ends with the read
    lock free is one whose handler awaited (or whose task is leaving), and another task must
    read the next request meanwhile."""

    def __init__(self, lock: ReadLock) -> None:
        self.lock = lock

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.lock.hand_off()


def install() -> HandOff:
    """Make pyfuse3's next ``main()`` use a ``ReadLock``; the returned instrument must be
    added to the trio run that calls it (``trio.lowlevel.add_instrument``)."""
    lock = ReadLock()
    shim = types.ModuleType("imaged.fuse.loop.trio")
    shim.__dict__.update({name: getattr(trio, name) for name in
                          ("lowlevel", "open_nursery", "ClosedResourceError")})
    shim.Lock = lambda: lock  # type: ignore[attr-defined]
    pyfuse3.trio = shim  # type: ignore[attr-defined]
    return HandOff(lock)
