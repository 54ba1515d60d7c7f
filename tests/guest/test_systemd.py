"""The shipped systemd unit under a real systemd (issue 14: "Restarting the daemon must not kill
the servers"). This host's PID 1 is not systemd, so a guest of its own boots systemd as PID 1
(``uml.boot(..., systemd=True)``), installs ``scripts/systemd/imaged.{socket,service}`` and runs
``systemd_scenario.py`` there: a fuse container mounted through the socket with a file open in
it, ``systemctl restart`` and ``systemctl stop`` of the daemon, ``umount`` through the next one,
and the same restart with ``KillMode=control-group`` in a drop-in, which must kill the server:
so the test shows that the unit's ``KillMode=process`` is what keeps servers serving.

Integration tier, like test_harness.py: it runs on the host and boots its own guest, once for
the module; each test judges one phase of what the guest recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest import uml

# Boot (about 5 s to systemd's target), a registry, a pull and four daemon starts over hostfs:
# about 40 s through the xstate shim on this host; the rest is room for a loaded machine.
TIMEOUT = 180.0
TAIL = 3000


@pytest.fixture(scope="module")
def guest(kernel: uml.Kernel, boot_env: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[uml.GuestRun, Path]]:
    share = tmp_path_factory.mktemp("systemd")
    script = (f"cd {uml.TREE}\n"
              f"exec .venv/bin/python -m tests.guest.systemd_scenario {share}/facts.json\n")
    yield uml.boot(kernel, share, script, timeout=TIMEOUT, env=boot_env, systemd=True), share


def _phase(guest: tuple[uml.GuestRun, Path], name: str) -> dict[str, Any]:
    """What the guest recorded for phase ``name``; a missing one fails with why."""
    run, share = guest
    facts_file = share / "facts.json"
    facts: dict[str, Any] = json.loads(facts_file.read_text()) if facts_file.exists() else {}
    assert name in facts, (f"no {name!r} from the guest (status {run.status}, timed out "
                           f"{run.timed_out}):\n{run.output[-TAIL:]}\n--- console ---\n"
                           f"{run.console[-TAIL:]}")
    phase: dict[str, Any] = facts[name]
    return phase


def test_the_scenario_ran_to_its_end(guest: tuple[uml.GuestRun, Path]) -> None:
    run, _ = guest
    assert (run.status, run.timed_out) == (0, False), f"{run.output[-TAIL:]}\n{run.console[-TAIL:]}"
    assert uml.session_members(run.pid) == []


def test_the_server_runs_in_the_units_cgroup_under_the_shipped_kill_mode(
        guest: tuple[uml.GuestRun, Path]) -> None:
    before = _phase(guest, "before")
    assert before["pid1"] == "systemd"
    assert before["kill_mode"] == "process"
    # In the unit's cgroup, not a scope of its own: only KillMode spares it.
    assert before["cgroup"] == "0::/system.slice/imaged.service"
    assert before["server"] != before["main_pid"]


def test_a_restart_leaves_the_server_serving_and_the_new_daemon_adopts_it(
        guest: tuple[uml.GuestRun, Path]) -> None:
    before, restart = _phase(guest, "before"), _phase(guest, "restart")
    assert restart["main_pid"] != before["main_pid"]  # a new daemon
    assert restart["server_alive"]  # the same process: a pidfd opened before the restart
    assert restart["cgroup"] == before["cgroup"]
    assert restart["write"] == "ok"  # through the file opened before the restart
    assert restart["read"] == "kept open\nafter restart\n"
    assert restart["listing"] == ["etc", "open.txt"]
    assert (restart["api_state"], restart["ps_state"]) == ("mounted", "mounted")


def test_a_stop_leaves_the_server_serving(guest: tuple[uml.GuestRun, Path]) -> None:
    stop = _phase(guest, "stop")
    assert stop["active"] == "inactive"
    assert stop["server_alive"]
    assert stop["write"] == "ok"
    assert stop["read"] == "kept open\nafter restart\nafter stop\n"


def test_the_next_daemon_unmounts_and_ends_the_server(guest: tuple[uml.GuestRun, Path]) -> None:
    assert _phase(guest, "started_again")["api_state"] == "mounted"
    umount = _phase(guest, "umount")
    assert umount == {"server_gone": True, "api_state": "unmounted", "mounted": False}


def test_with_kill_mode_control_group_a_restart_kills_the_server(
        guest: tuple[uml.GuestRun, Path]) -> None:
    """The negative: the setting is what matters. The server gets the unit's SIGTERM, so the
    file opened on its mount is dead (ENOTCONN) even where a new server comes."""
    killed = _phase(guest, "control_group")
    assert killed["kill_mode"] == "control-group"
    assert killed["cgroup"] == "0::/system.slice/imaged.service"
    assert not killed["server_alive"]
    assert killed["write"] == "ENOTCONN"
