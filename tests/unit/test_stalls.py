"""The daemon's event-loop stall watch (imaged.server.stalls) on a real trio loop: a step that
blocks is reported with its task and the line that blocked, a step that awaits is not."""

from __future__ import annotations

import time
import traceback

import pytest
import trio

from imaged.server.stalls import Stall, task_frames, watching

pytestmark = pytest.mark.unit

THRESHOLD = 0.1


def blocks_the_loop() -> None:
    time.sleep(THRESHOLD * 2)  # what a blocking call on the loop looks like to it


async def blocking_task() -> None:
    await trio.lowlevel.checkpoint()
    blocks_the_loop()


async def awaiting_task() -> None:
    await trio.sleep(THRESHOLD * 2)


def test_a_blocking_step_is_reported_with_its_task_and_line() -> None:
    seen: list[Stall] = []

    async def main() -> Stall:
        with watching(THRESHOLD, seen.append) as watch:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(awaiting_task)
                nursery.start_soon(blocking_task)
        return watch.longest

    longest = trio.run(main)
    assert [stall.task for stall in seen] == [f"{__name__}.blocking_task"]
    (stall,) = seen
    assert stall.seconds >= THRESHOLD * 2
    assert longest == stall
    assert "in blocks_the_loop" in stall.where[-1], stall.where
    assert any("in blocking_task" in frame for frame in stall.where), stall.where
    assert stall.describe().startswith(f"event loop blocked {stall.seconds * 1000:.0f} ms by "
                                       f"task {__name__}.blocking_task at ")


def test_awaiting_steps_are_not_stalls() -> None:
    seen: list[Stall] = []

    async def main() -> Stall:
        with watching(THRESHOLD, seen.append) as watch:
            await awaiting_task()
        return watch.longest

    longest = trio.run(main)
    assert seen == []
    assert longest.seconds < THRESHOLD


def test_frames_below_the_scheduler_and_the_import_machinery() -> None:
    stack = traceback.StackSummary.from_list([
        ("/lib/trio/_core/_run.py", 1, "run", None),
        ("/srv/imaged/api.py", 10, "handle", None),
        ("/srv/imaged/service.py", 20, "info", None),
        ("<frozen importlib._bootstrap>", 30, "_find_and_load", None),
    ])
    assert task_frames(stack) == ("/srv/imaged/api.py:10 in handle",
                                  "/srv/imaged/service.py:20 in info")
    assert task_frames(stack, limit=1) == ("/srv/imaged/service.py:20 in info",)
    assert Stall("t", 0.25).describe() == "event loop blocked 250 ms by task t"
