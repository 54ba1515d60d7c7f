"""The drivers' probes, kept between requests of one service.

Probing every driver is the dearest part of ``info``: vfs writes a test file into the root, the
others read mount tables, ``/proc`` and device-mapper. In the user-mode guest, under a pull,
that was most of an answer that must come within 100 ms (issue 17: docs/testing.md, slow disks),
and ``info`` is also the CLI's first call to a daemon. What a probe finds changes when the host
does (a module loaded, a pool made), not from one request to the next, so a service answers a
probe up to ``MAX_AGE`` old; an older one is refreshed, and a request waits for the refresh at
most ``WAIT`` before it answers the last probe, with its time, while the refresh goes on for the
next request. Only a service's first request waits for the whole probe: there is nothing older
to answer. One refresh runs at a time, however many requests ask.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from imaged.errors import InternalError

MAX_AGE = 1.0  # seconds: a probe this recent is answered without probing again
WAIT = 0.02  # seconds a request waits for a refresh before it answers the older probe

Drivers = list[dict[str, Any]]


@dataclass(frozen=True)
class Probed:
    drivers: Drivers
    at: float  # trio.current_time() when the probe began
    wall: float  # time.time() then: what an answer reports, so that it stays the same bytes

    def age(self) -> float:
        return trio.current_time() - self.at


class _Refresh:
    """One probe under way: its waiters learn how it ended once ``done`` is set."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.probed: Probed | None = None
        # What a waiter raises when the refresh brought no probe; this, if the service
        # closed under it.
        self.error: Exception = InternalError("the drivers' probe was interrupted: the service "
                                              "is closing")


class DriverProbes:
    def __init__(self, probe: Callable[[], Drivers], nursery: trio.Nursery, *,
                 max_age: float = MAX_AGE, wait: float = WAIT) -> None:
        """``probe`` blocks (it runs in a worker thread); ``nursery`` holds a refresh that
        outlives the request that started it."""
        self._probe = probe
        self._nursery = nursery
        self._max_age = max_age
        self._wait = wait
        self._last: Probed | None = None
        self._refresh: _Refresh | None = None

    async def get(self) -> Probed:
        """The newest probe that is at most ``max_age`` old, else the one a refresh brings
        within ``wait``, else the last one. A refresh that failed is raised to the requests
        that waited for it; the last probe stays for the others."""
        last = self._last
        if last is not None and last.age() < self._max_age:
            return last
        refresh = self._refresh
        if refresh is None:
            refresh = self._refresh = _Refresh()
            self._nursery.start_soon(self._run, refresh)
        if last is None:
            await refresh.done.wait()
        else:
            with trio.move_on_after(self._wait):
                await refresh.done.wait()
            if not refresh.done.is_set():
                return last
        if refresh.probed is None:
            raise refresh.error
        return refresh.probed

    async def _run(self, refresh: _Refresh) -> None:
        began, wall = trio.current_time(), time.time()
        try:
            drivers = await trio.to_thread.run_sync(self._probe)
        except Exception as exc:  # noqa: BLE001 - handed to the waiters, who raise it
            refresh.error = exc
        else:
            self._last = refresh.probed = Probed(drivers, began, wall)
        finally:
            self._refresh = None
            refresh.done.set()
