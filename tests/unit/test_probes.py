"""The drivers' probes kept between requests (``imaged.ops.probes``): who waits, for what, and
how often the drivers are probed."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from imaged.ops.probes import DriverProbes, Drivers

pytestmark = pytest.mark.unit

GATE_SECONDS = 10.0  # a probe held longer than this is a failed test, not a hang


class Probe:
    """Answers ``[{"n": k}]`` for its k-th call; while ``gate`` is clear, a call waits."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail

    def __call__(self) -> Drivers:
        self.calls += 1
        assert self.gate.wait(GATE_SECONDS)
        if self.fail:
            raise OSError(5, "Input/output error", "/srv/root")
        return [{"n": self.calls}]


async def test_the_first_request_waits_for_the_whole_probe() -> None:
    probe = Probe()
    async with trio.open_nursery() as nursery:
        probes = DriverProbes(probe, nursery, wait=0.0)
        probe.gate.clear()
        with trio.move_on_after(0.2):
            await probes.get()
            pytest.fail("answered before any probe ended")
        probe.gate.set()
        assert (await probes.get()).drivers == [{"n": 1}]
    assert probe.calls == 1  # the second request waited for the first's probe


async def test_a_recent_probe_is_answered_without_probing() -> None:
    probe = Probe()
    before = time.time()
    async with trio.open_nursery() as nursery:
        probes = DriverProbes(probe, nursery, max_age=60.0)
        first = await probes.get()
        assert before <= first.wall <= time.time()  # what an answer reports
        second = await probes.get()
    assert (first, probe.calls) == (second, 1)
    assert 0 <= second.age() < 60.0


async def test_an_old_probe_is_refreshed_when_the_refresh_comes_in_time() -> None:
    probe = Probe()
    async with trio.open_nursery() as nursery:
        probes = DriverProbes(probe, nursery, max_age=0.0, wait=GATE_SECONDS)
        assert (await probes.get()).drivers == [{"n": 1}]
        assert (await probes.get()).drivers == [{"n": 2}]


async def test_a_slow_refresh_answers_the_last_probe_and_serves_the_next_request() -> None:
    probe = Probe()
    async with trio.open_nursery() as nursery:
        probes = DriverProbes(probe, nursery, max_age=0.0, wait=0.01)
        first = await probes.get()
        probe.gate.clear()
        # Both requests answer the last probe; they started one refresh between them.
        assert await probes.get() is first
        assert await probes.get() is first
        assert probe.calls == 2
        probe.gate.set()
        with trio.fail_after(GATE_SECONDS):
            # Polled: a refresh has no event of its own to await.
            while (now := await probes.get()) is first:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert now.drivers[0]["n"] >= 2
        assert now.at > first.at


async def test_a_failed_probe_is_raised_to_those_that_waited_for_it() -> None:
    probe = Probe(fail=True)
    async with trio.open_nursery() as nursery:
        probes = DriverProbes(probe, nursery, max_age=0.0, wait=GATE_SECONDS)
        with pytest.raises(OSError, match="Input/output error"):
            await probes.get()  # nothing older to answer
        probe.fail = False
        good = await probes.get()
        assert good.drivers == [{"n": 2}]
        probe.fail = True
        with pytest.raises(OSError):
            await probes.get()  # waited for the refresh, which failed
        fast = DriverProbes(probe, nursery, max_age=0.0, wait=0.0)
        probe.fail = False
        kept = await fast.get()
        probe.fail = True
        probe.gate.clear()
        assert await fast.get() is kept  # answered before the refresh failed
        probe.gate.set()
    # The service's nursery outlived the failures: they went to the waiters, not to it.
