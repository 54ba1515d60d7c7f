"""The guest harness itself, run on the host (integration tier): a script's exit status, output
and files come back, with init.sh or systemd as PID 1, its writes to the root stay in the guest,
and a hung guest is killed with no process or RAM file left behind. Guests boot as the guest
tier boots them on this host: directly, or through the xstate shim where the host's XSAVE area
is larger than UML's (tests/guest/xstate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guest import uml


@pytest.mark.parametrize("systemd", [False, True], ids=["init.sh", "systemd"])
def test_status_output_and_share_come_back(kernel: uml.Kernel, boot_env: dict[str, str],
                                           tmp_path: Path, systemd: bool) -> None:
    """With init.sh as PID 1, or systemd running the script as a service."""
    probe = Path("/usr/imaged-guest-probe")
    pid1 = "systemd" if systemd else "init.sh"
    script = (f"echo out; echo err >&2; touch {probe} && echo written > {tmp_path}/file\n"
              f"[ \"$IMAGED_GUEST\" = 1 ] && [ \"$(cat /proc/1/comm)\" = {pid1} ] && exit 7\n")
    run = uml.boot(kernel, tmp_path, script, timeout=60, env=boot_env, systemd=systemd)
    assert (run.status, run.timed_out) == (7, False), run.console
    assert run.output.split() == ["out", "err"]
    assert (tmp_path / "file").read_text() == "written\n"
    assert not probe.exists()  # the guest's root is an overlay: the host's stays as it was
    assert uml.session_members(run.pid) == []


def test_hung_guest_is_killed_without_leftovers(kernel: uml.Kernel, boot_env: dict[str, str],
                                                tmp_path: Path) -> None:
    run = uml.boot(kernel, tmp_path, "sleep 600\n", timeout=8, env=boot_env)
    assert (run.status, run.timed_out) == (None, True)
    assert run.seconds < 8 + uml.REAP_SECONDS
    assert uml.session_members(run.pid) == []
    # This guest's own RAM directory: other guests (another test run) may boot meanwhile.
    assert run.ram.parent == uml.RAM_DIR
    assert not run.ram.exists()
