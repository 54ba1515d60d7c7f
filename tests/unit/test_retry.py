"""Retry policy, Retry-After and Content-Range parsing, and the client's retry loop.

The loop runs under trio's autojump clock, so every backoff costs no real time.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import trio
import trio.testing

from imaged.config import Config
from imaged.errors import NotFoundError, RegistryError
from imaged.registry_client.client import RegistryClient, _Retryable
from imaged.registry_client.retry import (
    RETRY_STATUSES,
    RetryPolicy,
    parse_content_range,
    parse_retry_after,
)

ALMOST_ONE = 0.999999


# -- RetryPolicy.delay --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [
        (1, 0.25, 0.5),
        (2, 0.5, 1.0),
        (3, 1.0, 2.0),
        (4, 2.0, 4.0),
        (5, 4.0, 8.0),
        (6, 8.0, 16.0),
        (7, 10.0, 20.0),  # 0.5 * 2**6 = 32, capped at 20
        (30, 10.0, 20.0),
    ],
)
def test_delay_bounds(attempt: int, low: float, high: float) -> None:
    policy = RetryPolicy()
    assert policy.delay(attempt, None, rand=lambda: 0.0) == pytest.approx(low)
    assert policy.delay(attempt, None, rand=lambda: ALMOST_ONE) == pytest.approx(high, rel=1e-5)
    assert policy.delay(attempt, None, rand=lambda: ALMOST_ONE) < high
    for _ in range(50):
        assert low <= policy.delay(attempt, None) < high


@pytest.mark.parametrize(
    ("policy", "attempt", "low", "high"),
    [
        (RetryPolicy(base=1.0, cap=5.0), 1, 0.5, 1.0),
        (RetryPolicy(base=1.0, cap=5.0), 3, 2.0, 4.0),
        (RetryPolicy(base=1.0, cap=5.0), 4, 2.5, 5.0),
        (RetryPolicy(base=2.0, cap=3.0), 2, 1.5, 3.0),
        (RetryPolicy(base=0.0, cap=3.0), 5, 0.0, 0.0),
    ],
)
def test_delay_custom_policy(policy: RetryPolicy, attempt: int, low: float,
                             high: float) -> None:
    assert policy.delay(attempt, None, rand=lambda: 0.0) == pytest.approx(low)
    assert policy.delay(attempt, None, rand=lambda: 1.0) == pytest.approx(high)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (0.0, 0.0),
        (5.0, 5.0),
        (59.5, 59.5),
        (60.0, 60.0),
        (61.0, 60.0),
        (86400.0, 60.0),
        (-3.0, 0.0),
    ],
)
def test_retry_after_wins_and_is_clamped(retry_after: float, expected: float) -> None:
    policy = RetryPolicy()

    def rand() -> float:
        raise AssertionError("no jitter when the server said how long to wait")

    for attempt in (1, 2, 10):
        assert policy.delay(attempt, retry_after, rand=rand) == expected


def test_retry_after_cap_is_the_policy_s() -> None:
    assert RetryPolicy(retry_after_cap=5.0).delay(1, 30.0) == 5.0


def test_retry_statuses() -> None:
    assert {408, 429, 502, 503, 504} == RETRY_STATUSES
    assert not {400, 401, 403, 404, 500, 501} & RETRY_STATUSES


# -- parse_retry_after --------------------------------------------------------------------------

NOW = datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("007", 7.0),
        ("Mon, 01 Jan 2024 00:01:40 GMT", 100.0),
        ("Mon, 01 Jan 2024 01:00:00 GMT", 3600.0),
        ("Mon, 01 Jan 2024 00:00:00 GMT", 0.0),
        ("Sun, 31 Dec 2023 23:00:00 GMT", 0.0),  # in the past: retry now
        ("Sat, 01 Jan 2000 00:00:00 GMT", 0.0),
        ("Mon, 01 Jan 2024 01:00:00 +0100", 0.0),
        ("Mon, 01 Jan 2024 00:00:30 +0000", 30.0),
        ("Mon, 01 Jan 2024 00:00:30 -0000", None),  # RFC 2822's "unknown zone": naive
        ("Mon, 01 Jan 2024 00:00:30", None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("5 seconds", None),
        ("0x10", None),
        # Header values are Latin-1: a hostile byte must not crash the parser.
        ("\u00b2", None),
        ("\u00b9\u00b2\u00b3", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_relative_to_now() -> None:
    later = NOW + timedelta(seconds=10)
    assert parse_retry_after("Mon, 01 Jan 2024 00:01:40 GMT", later) == 90.0


# -- parse_content_range ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("bytes 0-99/100", (0, 99, 100)),
        ("bytes 100-199/200", (100, 199, 200)),
        ("bytes 100-199/*", (100, 199, None)),
        ("bytes 0-0/1", (0, 0, 1)),
        ("BYTES 5-9/10", (5, 9, 10)),
        ("  bytes 5-9/10  ", (5, 9, 10)),
        ("bytes 1048576-2097151/3145728", (1048576, 2097151, 3145728)),
        ("", None),
        ("bytes", None),
        ("bytes ", None),
        ("items 0-99/100", None),
        ("bytes */100", None),
        ("bytes 0-99", None),
        ("bytes 0-99/", None),
        ("bytes 0-99/abc", None),
        ("bytes 0-99/-1", None),
        ("bytes 9-5/10", None),
        ("bytes -5/10", None),
        ("bytes 5-/10", None),
        ("bytes a-b/10", None),
        ("bytes -1-5/10", None),
        ("bytes 0-99/100/5", None),
        ("bytes=0-99/100", None),
        ("bytes \u00b2-\u00b3/10", None),
        ("bytes 0-5/\u00b9\u00b2", None),
    ],
)
def test_parse_content_range(value: str | None,
                             expected: tuple[int, int, int | None] | None) -> None:
    assert parse_content_range(value) == expected


# -- RegistryClient._attempts --------------------------------------------------------------------


class Flaky:
    """An operation (run in a worker thread) failing as scripted, then returning ``result``."""

    def __init__(self, failures: list[_Retryable], result: str = "ok") -> None:
        self.failures = list(failures)
        self.result = result
        self.calls = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self.calls += 1
            self.threads.add(threading.get_ident())
            if self.failures:
                raise self.failures.pop(0)
        return self.result


def client(policy: RetryPolicy | None = None) -> RegistryClient:
    return RegistryClient(Config(), environ={}, policy=policy)


async def run_attempts(registry: RegistryClient, operation: Flaky) -> str:
    """The retry loop around a blocking operation, as the client runs its HTTP exchanges."""
    return await registry._attempts(registry._threaded(operation))


@pytest.mark.parametrize(
    ("retry_afters", "attempts"),
    [
        ([3.0], 6),
        ([3.0, 5.0], 6),
        ([1.0, 2.0, 4.0, 8.0, 16.0], 6),  # five failures, the sixth and last try succeeds
        ([0.0, 0.0], 3),
        ([100.0], 2),  # clamped to the 60 s cap
    ],
)
async def test_attempts_retries_with_policy_waits(autojump_clock: trio.testing.MockClock,
                                                  retry_afters: list[float],
                                                  attempts: int) -> None:
    policy = RetryPolicy(attempts=attempts)
    operation = Flaky([_Retryable("registry r answered 503", ra) for ra in retry_afters])
    start = trio.current_time()
    result = await run_attempts(client(policy), operation)
    elapsed = trio.current_time() - start
    assert result == "ok"
    assert operation.calls == len(retry_afters) + 1
    expected = sum(min(ra, policy.retry_after_cap) for ra in retry_afters)
    assert elapsed >= expected
    assert elapsed == pytest.approx(expected, abs=0.5)
    assert threading.get_ident() not in operation.threads  # ran in worker threads


async def test_attempts_without_retry_after_use_backoff(
        autojump_clock: trio.testing.MockClock) -> None:
    policy = RetryPolicy(attempts=4, base=2.0, cap=3.0)
    operation = Flaky([_Retryable("dropped") for _ in range(3)])
    start = trio.current_time()
    assert await run_attempts(client(policy), operation) == "ok"
    elapsed = trio.current_time() - start
    # Waits before tries 2, 3, 4: ceilings 2, 3 (capped), 3, each at least half the ceiling.
    assert 1.0 + 1.5 + 1.5 <= elapsed < 2.0 + 3.0 + 3.0
    assert operation.calls == 4


async def test_attempts_succeeds_at_once_without_waiting(
        autojump_clock: trio.testing.MockClock) -> None:
    operation = Flaky([])
    start = trio.current_time()
    assert await run_attempts(client(), operation) == "ok"
    assert trio.current_time() == start
    assert operation.calls == 1


@pytest.mark.parametrize("attempts", [1, 2, 3, 6])
async def test_attempts_gives_up(autojump_clock: trio.testing.MockClock,
                                 attempts: int) -> None:
    policy = RetryPolicy(attempts=attempts)
    operation = Flaky([_Retryable("registry r answered 429", 2.0) for _ in range(attempts + 5)])
    start = trio.current_time()
    with pytest.raises(RegistryError) as info:
        await run_attempts(client(policy), operation)
    assert info.value.message == f"registry r answered 429 (gave up after {attempts} attempts)"
    assert operation.calls == attempts
    # No wait after the last failure: it would only delay the error.
    assert trio.current_time() - start == pytest.approx(2.0 * (attempts - 1))


async def test_attempts_default_policy_gives_up_after_six(
        autojump_clock: trio.testing.MockClock) -> None:
    operation = Flaky([_Retryable("dropped", 1.0) for _ in range(10)])
    with pytest.raises(RegistryError, match="gave up after 6 attempts"):
        await run_attempts(client(), operation)
    assert operation.calls == 6


async def test_progress_resets_the_count(autojump_clock: trio.testing.MockClock) -> None:
    policy = RetryPolicy(attempts=3)
    # Far more failures than attempts, but each one moved the download forward.
    operation = Flaky([_Retryable("dropped at byte n", 1.0, progressed=True)
                       for _ in range(10)])
    start = trio.current_time()
    assert await run_attempts(client(policy), operation) == "ok"
    assert operation.calls == 11
    assert trio.current_time() - start >= 10.0


async def test_progress_resets_then_gives_up(autojump_clock: trio.testing.MockClock) -> None:
    policy = RetryPolicy(attempts=3)
    no = _Retryable("stalled", 1.0)
    yes = _Retryable("dropped after progress", 1.0, progressed=True)
    # Two failures, then one that made progress: the budget starts afresh, and three more
    # failures without progress exhaust it.
    operation = Flaky([no, no, yes, no, no, no, no, no])
    with pytest.raises(RegistryError, match=r"^stalled \(gave up after 3 attempts\)$"):
        await run_attempts(client(policy), operation)
    assert operation.calls == 6


async def test_progress_lets_a_later_success_through(
        autojump_clock: trio.testing.MockClock) -> None:
    policy = RetryPolicy(attempts=3)
    no = _Retryable("stalled", 1.0)
    yes = _Retryable("dropped after progress", 1.0, progressed=True)
    # Without the reset this would give up at the third call to fail without progress.
    operation = Flaky([no, no, yes, no, no])
    assert await run_attempts(client(policy), operation) == "ok"
    assert operation.calls == 6


@pytest.mark.parametrize(
    "error",
    [
        RegistryError("registry r denied access"),
        NotFoundError("manifest not found"),
        ValueError("a bug"),
    ],
)
async def test_other_errors_are_not_retried(autojump_clock: trio.testing.MockClock,
                                            error: Exception) -> None:
    calls = 0

    def operation() -> str:
        nonlocal calls
        calls += 1
        raise error

    registry = client()
    start = trio.current_time()
    with pytest.raises(type(error)) as info:
        await registry._attempts(registry._threaded(operation))
    assert info.value is error
    assert calls == 1
    assert trio.current_time() == start


async def test_attempts_accepts_async_operations(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def operation() -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(1.0)
        if calls < 3:
            raise _Retryable("dropped", 2.0)
        return calls

    start = trio.current_time()
    assert await client()._attempts(operation) == 3
    assert trio.current_time() - start == pytest.approx(3 * 1.0 + 2 * 2.0)


async def test_attempts_wait_is_cancellable(autojump_clock: trio.testing.MockClock) -> None:
    operation = Flaky([_Retryable("busy", 50.0) for _ in range(5)])
    with trio.move_on_after(30.0) as scope:
        await run_attempts(client(), operation)
    assert scope.cancelled_caught
    assert operation.calls == 1


def test_retryable_defaults() -> None:
    exc = _Retryable("m")
    assert (exc.message, exc.retry_after, exc.progressed) == ("m", None, False)
    assert str(exc) == "m"

