"""What the fuse server's control socket answers (imaged.fuse.control.answer), without a mount:
the driver relies on these answers to change a mounted container's quota and to stop its
server; and the saved count it reads when no server runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imaged.fuse.control import USAGE, answer, saved_usage


@dataclass
class FakeServer:
    quota: int | None = 64 << 20
    usage: int = 10 << 20
    stopped: bool = False

    def shutdown(self) -> None:
        self.stopped = True


def test_usage_is_the_servers_count() -> None:
    assert answer(FakeServer(), {"op": "usage"}) == {"used": 10 << 20, "quota": 64 << 20}


def test_a_quota_at_or_above_usage_is_taken() -> None:
    server = FakeServer()
    assert answer(server, {"op": "set_quota", "quota": 10 << 20}) == {"ok": True}
    assert server.quota == 10 << 20


def test_a_quota_below_usage_is_refused_and_kept() -> None:
    server = FakeServer()
    reply = answer(server, {"op": "set_quota", "quota": 1 << 20})
    assert reply == {"error": "the container uses 10 MiB, more than the new quota of 1 MiB: "
                              "delete files first"}
    assert server.quota == 64 << 20


@pytest.mark.parametrize("request_", [
    [], "usage", {"op": "grow"}, {"op": "set_quota"}, {"op": "set_quota", "quota": -1},
    {"op": "set_quota", "quota": True}, {"op": "set_quota", "quota": "1G"},
])
def test_malformed_requests_get_an_error_and_change_nothing(request_: Any) -> None:
    server = FakeServer()
    assert "error" in answer(server, request_)
    assert server.quota == 64 << 20
    assert not server.stopped


def test_shutdown_stops_the_server_and_says_ok() -> None:
    server = FakeServer()
    assert answer(server, {"op": "shutdown"}) == {"ok": True}
    assert server.stopped


@pytest.mark.parametrize("op", [None, 1, ["shutdown"], "Shutdown", "__class__"])
def test_an_op_that_is_not_one_of_the_names_stops_nothing(op: Any) -> None:
    server = FakeServer()
    assert answer(server, {"op": op}) == {"error": f"unknown op {op!r}"}
    assert not server.stopped


@pytest.mark.parametrize(("text", "saved"), [
    (None, None), ("123\n", 123), ("", None), ("12 clean\n", None), ("x", None)])
def test_only_a_whole_saved_count_is_trusted(tmp_path: Path, text: str | None,
                                            saved: int | None) -> None:
    if text is not None:
        (tmp_path / USAGE).write_text(text)
    assert saved_usage(tmp_path) == saved
