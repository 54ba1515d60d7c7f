"""The read lock pyfuse3's main loop takes around waiting for /dev/fuse (imaged.fuse.loop):
handed to a waiting task only when the holder's step ends with it free, so a request whose
handler does not await costs one task step, and one whose handler awaits never keeps the
mount from reading the next."""

from __future__ import annotations

import pyfuse3
import trio
import trio.testing

from imaged.fuse.loop import HandOff, ReadLock, install


def _run(scenario: object) -> None:
    async def main() -> None:
        lock = ReadLock()
        trio.lowlevel.add_instrument(HandOff(lock))
        await scenario(lock)  # type: ignore[operator]

    trio.run(main)


def test_taken_again_within_one_step_the_waiter_never_runs() -> None:
    async def scenario(lock: ReadLock) -> None:
        ran: list[str] = []

        async def reader() -> None:
            async with lock:
                ran.append("other")

        await lock.__aenter__()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):  # a request answered without awaiting, three times
                await lock.__aexit__()
                await lock.__aenter__()
                await trio.testing.wait_all_tasks_blocked()
            assert ran == []
            assert list(lock.waiting) != []
            await lock.__aexit__()
            await trio.testing.wait_all_tasks_blocked()  # this step ends with the lock free
            assert ran == ["other"]
        assert not lock.held

    _run(scenario)


def test_a_holder_that_awaits_hands_the_lock_to_the_waiter() -> None:
    async def scenario(lock: ReadLock) -> None:
        order: list[str] = []

        async def request(name: str, work: trio.Event) -> None:
            async with lock:
                order.append(f"{name} read")
            await work.wait()  # a handler that awaits, as a copy-up in a thread does
            order.append(f"{name} answered")

        first, second = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "first", first)
            nursery.start_soon(request, "second", second)
            await trio.testing.wait_all_tasks_blocked()
            # both read while the first to read still awaits (trio starts them in any order)
            assert sorted(order) == ["first read", "second read"]
            second.set()
            await trio.testing.wait_all_tasks_blocked()
            first.set()
        assert order[2:] == ["second answered", "first answered"]

    _run(scenario)


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario(lock: ReadLock) -> None:
        got: list[str] = []
        cancelled = trio.CancelScope()

        async def reader(name: str) -> None:
            async with lock:
                got.append(name)

        async def cancellable() -> None:
            with cancelled:
                await reader("cancelled")

        await lock.__aenter__()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancellable)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(reader, "later")
            await trio.testing.wait_all_tasks_blocked()
            assert len(lock.waiting) == 2
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert len(lock.waiting) == 1
            await lock.__aexit__()
        assert got == ["later"]

    _run(scenario)


def test_install_gives_pyfuse3_the_lock_and_trio_for_the_rest() -> None:
    before = pyfuse3.trio  # type: ignore[attr-defined]
    try:
        hand_off = install()
        shim = pyfuse3.trio  # type: ignore[attr-defined]
        assert shim.Lock() is hand_off.lock
        assert shim.lowlevel is trio.lowlevel
        assert shim.open_nursery is trio.open_nursery
        assert shim.ClosedResourceError is trio.ClosedResourceError
    finally:
        pyfuse3.trio = before  # type: ignore[attr-defined]
