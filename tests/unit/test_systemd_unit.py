"""The shipped systemd unit stops the daemon without stopping the fuse servers it started
(issue 14: restarting the daemon must not kill them). No systemd runs here as PID 1, so the
unit's settings are read as systemd reads them; tests/integration/test_fuse_lifecycle.py
stops a real daemon the way this unit makes systemd stop it (SIGTERM to the main process
only) and checks its server still serves."""

from __future__ import annotations

from pathlib import Path

UNIT = Path(__file__).parents[2] / "scripts" / "systemd" / "imaged.service"


def settings(text: str) -> dict[str, dict[str, list[str]]]:
    """``[Section]`` → key → values in order (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_stopping_the_daemon_signals_its_main_process_only() -> None:
    service = settings(UNIT.read_text())["Service"]
    # mixed or control-group would SIGKILL the fuse servers in the unit's cgroup, leaving
    # every fuse mount answering ENOTCONN.
    assert service["KillMode"] == ["process"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["ExecStart"][-1].split()[1:] == ["serve"]


def test_the_settings_reader_keeps_repeated_keys_and_skips_comments() -> None:
    parsed = settings("# c\n[Service]\nKillMode=mixed\n; x\nKillMode = process\n[Unit]\nA=b=c\n")
    assert parsed == {"Service": {"KillMode": ["mixed", "process"]}, "Unit": {"A": ["b=c"]}}
