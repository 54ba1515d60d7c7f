"""The daemon's event-loop stall watch (imaged.server.stalls) on a real trio loop: a step that
blocks is reported with its task and the line that blocked, a step that awaits is not, and the
sampler is a trio worker thread that ends with the watch."""

from __future__ import annotations

import subprocess
import threading
import time
import traceback
from pathlib import Path

import pytest
import trio

from imaged.server.stalls import DiskCall, Stall, task_frames, watching

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
        async with watching(THRESHOLD, seen.append) as watch, trio.open_nursery() as nursery:
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
        async with watching(THRESHOLD, seen.append) as watch:
            await awaiting_task()
        return watch.longest

    longest = trio.run(main)
    assert seen == []
    assert longest.seconds < THRESHOLD


def samplers() -> list[str]:
    """Threads running a watch's sampler: trio names a worker thread after its function while
    it runs one."""
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("sample ")]


def test_the_sampler_is_a_trio_worker_thread_that_ends_with_the_watch() -> None:
    """A watchdog of the loop runs outside it, in trio's worker threads, never a bare thread:
    it ends when the block ends, failed or cancelled, not when the process does."""
    during: list[list[str]] = []

    async def main() -> None:
        with pytest.raises(LookupError):
            async with watching(THRESHOLD, lambda stall: None):
                during.append(samplers())
                raise LookupError("the daemon failed")
        assert samplers() == []
        with trio.move_on_after(THRESHOLD):
            async with watching(THRESHOLD, lambda stall: None):
                during.append(samplers())
                await trio.sleep_forever()
        assert samplers() == []

    trio.run(main)
    assert during == [["sample from imaged.server.stalls._sampling"]] * 2


def lists_the_root(root: Path) -> list[str]:
    return [path.name for path in root.iterdir()]


def test_calls_on_the_loop_that_wait_on_the_root_are_counted_with_their_site(
        tmp_path: Path) -> None:
    """Whatever the disk's speed: a listing of the root on the loop is named with its task
    and line, twice counted and once reported; the same in a worker thread, a file outside
    the root and an ``await`` are not; a process started on the loop is, wherever it runs."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").write_text("not the root's disk")
    calls: list[DiskCall] = []

    async def loop_work() -> None:
        await trio.lowlevel.checkpoint()
        for _ in range(2):
            lists_the_root(root)

    async def main() -> int:
        async with watching(THRESHOLD, lambda stall: None, root, calls.append) as watch:
            await trio.to_thread.run_sync(lists_the_root, root)
            (tmp_path / "outside").read_text()
            await trio.lowlevel.checkpoint()
            assert watch.disk_calls == 0
            await loop_work()
            subprocess.run(["true"], check=True)  # noqa: ASYNC221 - what the watch must see
        return watch.disk_calls

    assert trio.run(main) == 3
    assert [(call.event, call.path) for call in calls] == \
        [("os.listdir", str(root)), ("subprocess.Popen", "true")]
    assert calls[0].task.endswith("<locals>.main"), calls[0].task
    assert "in iterdir" in calls[0].where[-1], calls[0].where
    assert any("in lists_the_root" in frame for frame in calls[0].where), calls[0].where
    assert any("in loop_work" in frame for frame in calls[0].where), calls[0].where
    assert calls[0].describe().startswith(f"os.listdir {root} on the event loop by task ")


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


def test_a_step_that_holds_the_gil_delays_the_samplers_wake_up() -> None:
    """``sum`` over a ``range`` runs in C without letting go of the interpreter lock, so the
    sampler cannot wake while it runs: its delay covers the hold, less one sampling period."""
    period = THRESHOLD / 4
    held: list[float] = []

    async def main() -> float:
        async with watching(THRESHOLD, lambda stall: None) as watch:
            await trio.sleep(period * 2)  # the sampler waiting
            began = time.perf_counter()
            sum(range(20_000_000))
            held.append(time.perf_counter() - began)
            await trio.sleep(period * 2)
        return watch.wake_delay

    delay = trio.run(main)
    assert delay >= held[0] - period, (delay, held)
