"""In a guest whose PID 1 is systemd (``uml.boot(..., systemd=True)``): the shipped imaged units
restarted and stopped under a fuse container with a file open in it, and what became of its
server, recorded for ``test_systemd.py`` on the host to judge.

The units are the checkout's ``scripts/systemd/imaged.{socket,service}`` installed as docs/api.md
says (the group made, ``ExecStart`` pointed at this checkout's ``imaged``), with a drop-in for
that and for the config; the root is on the guest's tmpfs ``/tmp`` (the overlay root refuses
overlay's own xattrs, which the fuse driver writes). A registry on 127.0.0.1 serves the image.

It asserts nothing itself: each phase's observations go into a JSON file, written after every
phase, so a phase that fails still leaves what came before it. ``python -m
tests.guest.systemd_scenario FACTS`` runs it; its exit status is non-zero, with a traceback on
stderr, only when a step it needs failed (a pull, a mount, a ``systemctl``).
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from imaged.cli.client import DaemonClient
from imaged.testing.images import OCILayout, directory, file, push
from imaged.testing.registry import start_registry

TREE = Path(__file__).resolve().parents[2]
UNITS = TREE / "scripts" / "systemd"
UNIT_DIR = Path("/run/systemd/system")  # runtime units: gone with the guest's /run
SOCKET = Path("/run/imaged/imaged.sock")  # the shipped socket unit's ListenStream
CONTAINER = "c1"
WAIT = 30.0  # for a server to end once its container is unmounted: generous, never a timing
FILE_TEXT = "kept open\n"


def systemctl(*args: str) -> str:
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"systemctl {' '.join(args)}: exit {proc.returncode}: "
                           f"{proc.stderr.strip()}\n{journal()}")
    return proc.stdout.strip()


def journal() -> str:
    """The daemon's log, for a failure's message."""
    return subprocess.run(["journalctl", "-u", "imaged.service", "-o", "cat", "--no-pager"],
                          capture_output=True, text=True, check=False).stdout


def unit_property(name: str) -> str:
    return systemctl("show", "-p", name, "--value", "imaged.service")


def install(root: Path, config: Path) -> None:
    """The shipped units, the group their socket names, and a drop-in for this checkout."""
    subprocess.run(["groupadd", "--system", "imaged"], check=True)  # the guest's overlay /etc
    UNIT_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("imaged.socket", "imaged.service"):
        shutil.copy(UNITS / name, UNIT_DIR / name)
    config.write_text(f'root = "{root}"\ndriver = "fuse"\n')
    set_drop_in("checkout", f"ExecStart=\nExecStart={TREE}/.venv/bin/imaged serve\n"
                            f"Environment=IMAGED_CONFIG={config}\n")


def set_drop_in(name: str, service: str) -> None:
    drop_ins = UNIT_DIR / "imaged.service.d"
    drop_ins.mkdir(exist_ok=True)
    (drop_ins / f"{name}.conf").write_text(f"[Service]\n{service}")
    systemctl("daemon-reload")


def server_of(root: Path) -> tuple[int, int]:
    """The container's server as its record names it: its PID, and a pidfd of that process,
    which stays that process's however PIDs are reused and becomes readable when it ends."""
    record = root / "drivers" / "fuse" / "containers" / CONTAINER / "server"
    pid = int(record.read_text().split()[0])
    return pid, os.pidfd_open(pid)


def ended(pidfd: int, timeout: float = 0.0) -> bool:
    """Whether the process has ended (a zombie has), waiting up to ``timeout`` seconds."""
    return bool(select.select([pidfd], [], [], timeout)[0])


def cgroup(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text().strip()
    except FileNotFoundError:
        return ""


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def through(fd: int, merged: Path, line: str) -> dict[str, Any]:
    """Whether the mount still serves: a write through the descriptor kept open (writeback is
    off, so the server itself must take it: a page cache cannot answer for a dead one), then a
    fresh open that reads it back, and a listing."""
    seen: dict[str, Any] = {}
    try:
        os.write(fd, line.encode())
        seen["write"] = "ok"
    except OSError as exc:
        seen["write"] = errno_name(exc)
    try:
        seen["read"] = (merged / "open.txt").read_text()
        seen["listing"] = sorted(os.listdir(merged))
    except OSError as exc:
        seen["read"] = errno_name(exc)
    return seen


def container_state(api: DaemonClient) -> str:
    state: str = api.call("GET", f"/v1/containers/{CONTAINER}")["state"]
    return state


def ps_state(config: Path) -> str:
    """The container's state as ``imaged ps`` prints it, through the daemon on the socket."""
    proc = subprocess.run([str(TREE / ".venv/bin/imaged"), "--json", "ps"], capture_output=True,
                          text=True, check=True, env={**os.environ, "IMAGED_CONFIG": str(config)})
    rows = json.loads(proc.stdout)
    state: str = next(row["state"] for row in rows if row["name"] == CONTAINER)
    return state


def mount(api: DaemonClient, root: Path) -> tuple[Path, int, tuple[int, int]]:
    """Mount the container; its path, a file opened for writing in it, and its server (PID and
    pidfd)."""
    merged = Path(api.call("POST", f"/v1/containers/{CONTAINER}/mount", {})["path"])
    fd = os.open(merged / "open.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    os.write(fd, FILE_TEXT.encode())
    return merged, fd, server_of(root)


def run(facts: dict[str, Any], work: Path, save: Callable[[], None]) -> None:
    root, config = work / "root", work / "imaged.toml"
    registry = start_registry(work / "registry")
    try:
        layout = OCILayout(work / "layout")
        layer = layout.add_layer([directory("etc"), file("etc/hello.txt", b"hello\n")])
        layout.tag(layout.add_image([layer]), "systemd")
        ref = f"{registry.host}/systemd/fuse:v1"
        push(layout, "systemd", ref)
        install(root, config)
        systemctl("start", "imaged.socket", "imaged.service")
        with closing(DaemonClient(SOCKET, timeout=60)) as api:
            list(api.stream("POST", "/v1/images/pull", {"ref": ref}))
            api.call("POST", "/v1/containers", {"name": CONTAINER, "image": ref})
            merged, fd, (pid, pidfd) = mount(api, root)
        facts["before"] = {"pid1": Path("/proc/1/comm").read_text().strip(),
                           "kill_mode": unit_property("KillMode"), "server": pid,
                           "cgroup": cgroup(pid), "main_pid": int(unit_property("MainPID"))}
        save()

        systemctl("restart", "imaged.service")
        with closing(DaemonClient(SOCKET, timeout=60)) as api:
            facts["restart"] = {"main_pid": int(unit_property("MainPID")),
                                "server_alive": not ended(pidfd), "cgroup": cgroup(pid),
                                **through(fd, merged, "after restart\n"),
                                "api_state": container_state(api), "ps_state": ps_state(config)}
        save()

        systemctl("stop", "imaged.service")
        facts["stop"] = {"active": unit_property("ActiveState"),
                         "server_alive": not ended(pidfd),
                         **through(fd, merged, "after stop\n")}
        save()

        systemctl("start", "imaged.service")
        os.close(fd)  # an open file keeps umount busy
        with closing(DaemonClient(SOCKET, timeout=60)) as api:
            facts["started_again"] = {"api_state": container_state(api)}
            api.call("POST", f"/v1/containers/{CONTAINER}/unmount", {})
            facts["umount"] = {"server_gone": ended(pidfd, WAIT),
                               "api_state": container_state(api),
                               "mounted": os.path.ismount(merged)}
        save()

        # The negative: the same restart with the unit's whole cgroup signalled.
        set_drop_in("kill-mode", "KillMode=control-group\n")
        with closing(DaemonClient(SOCKET, timeout=60)) as api:
            os.close(pidfd)
            merged, fd, (pid, pidfd) = mount(api, root)
        facts["control_group"] = {"kill_mode": unit_property("KillMode"),
                                  "server": pid, "cgroup": cgroup(pid)}
        systemctl("restart", "imaged.service")
        facts["control_group"].update(server_alive=not ended(pidfd),
                                      **through(fd, merged, "after restart\n"))
        os.close(fd)
        os.close(pidfd)
        save()
        with closing(DaemonClient(SOCKET, timeout=60)) as api:
            api.call("POST", f"/v1/containers/{CONTAINER}/unmount", {})
        systemctl("stop", "imaged.service", "imaged.socket")
    finally:
        registry.stop()


def main() -> int:
    out = Path(sys.argv[1])
    facts: dict[str, Any] = {}

    def save() -> None:
        out.write_text(json.dumps(facts, indent=1) + "\n")

    # The guest's /tmp is RAM: the directory goes with the guest, whatever stayed mounted in it.
    run(facts, Path(tempfile.mkdtemp(prefix="imaged-systemd-")), save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
