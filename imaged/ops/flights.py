"""Single-flight: one run of a piece of shared work per key, however many tasks wait on it.

Concurrent pulls of images that share layers want the same blobs downloaded and the same chain
IDs unpacked; doing either twice at once would write one ingest file or one layer directory from
two places. A flight runs the work once, in a nursery that outlives any one caller (the
service's), and every caller asking for the same key meanwhile waits on it instead.

Lifetime. A flight counts its waiters. A waiter that is cancelled (its client went away) only
leaves; the work goes on while anyone still waits, and is cancelled when the last waiter leaves.
A cancelled flight is never joined again: it keeps its key until its work has wound down (a
worker thread cannot be interrupted, and a half-done step must not meet a fresh one on the same
files), then a newcomer starts a flight of its own.

Failure. When the work raises, every waiter gets that error. Retrying as a new leader would repeat
the same request against the same registry, which the registry client has already retried with
backoff, multiplying a failure's latency by the number of waiters for nothing. The only way work
ends without a result while someone waits is the service's nursery closing under it; waiters then
get ``InternalError`` rather than a ``Cancelled`` that belongs to another task's scope.

Progress. The work emits events; each waiter relays the latest one to its own reporter from its
own task, so one pull's reporter failing (a closed stream) fails that pull only, never the shared
work, and a slow reporter sees coalesced progress rather than a backlog.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

from imaged.errors import InternalError

T = TypeVar("T")
E = TypeVar("E")


class _Flight(Generic[T, E]):
    def __init__(self, joinable: bool) -> None:
        self.joinable = joinable
        self.waiters = 0
        self.scope = trio.CancelScope()
        self.finished = trio.Event()
        self.result: list[T] = []  # one item once the work returned
        self.error: BaseException | None = None
        self.event: E | None = None
        self.version = 0  # bumped per event, so a waiter knows what it has relayed
        self.lot = trio.lowlevel.ParkingLot()

    def emit(self, event: E) -> None:
        self.event = event
        self.version += 1
        self.lot.unpark_all()

    def finish(self) -> None:
        self.finished.set()
        self.lot.unpark_all()


class Flights(Generic[T, E]):
    """Flights of one kind of work, keyed by a string (a digest)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._flights: dict[str, _Flight[T, E]] = {}

    def busy(self, key: str) -> bool:
        """Whether work on ``key`` is under way: a caller can say it is waiting on another's."""
        return key in self._flights

    async def run(self, key: str, work: Callable[[Callable[[E], None]], Awaitable[T]],
                  listener: Callable[[E], None]) -> T:
        """``work(emit)``'s result for ``key``, from the flight under way or from a new one."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                flight = _Flight(joinable=True)
                self._flights[key] = flight
                self._nursery.start_soon(self._fly, key, flight, work)
            elif not flight.joinable:
                await flight.finished.wait()
                continue
            return await self._wait(flight, listener)

    async def _wait(self, flight: _Flight[T, E], listener: Callable[[E], None]) -> T:
        flight.waiters += 1
        try:
            seen = 0
            while True:
                if flight.version != seen and flight.event is not None:
                    seen = flight.version
                    listener(flight.event)
                if flight.finished.is_set():
                    break
                await flight.lot.park()
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.finished.is_set():
                flight.joinable = False
                flight.scope.cancel()
        if flight.error is not None:
            raise flight.error
        if not flight.result:
            raise InternalError("shared pull work was interrupted: the service is closing")
        return flight.result[0]

    async def _fly(self, key: str, flight: _Flight[T, E],
                   work: Callable[[Callable[[E], None]], Awaitable[T]]) -> None:
        try:
            with flight.scope:
                flight.result.append(await work(flight.emit))
        except Exception as exc:  # noqa: BLE001 - handed to every waiter, who raise it
            flight.error = exc
        finally:
            del self._flights[key]
            flight.finish()

    @asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        """Hold ``key`` with no flight on it: for undoing what flights made, which must neither
        overlap a flight on the same files nor be joined as if it were one."""
        while (flight := self._flights.get(key)) is not None:
            await flight.finished.wait()
        marker: _Flight[T, E] = _Flight(joinable=False)
        self._flights[key] = marker
        try:
            yield
        finally:
            del self._flights[key]
            marker.finish()
