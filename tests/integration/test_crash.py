"""kill -9 of the daemon at chosen points, then a restart: the store must be consistent.

A real ``imaged serve`` runs with ``IMAGED_FAULT_PAUSE=<point>``; when it reaches the point it
stops itself (SIGSTOP), the test sees it stopped and sends SIGKILL, as a crash would, mid-way.
After a restart on the same root: interrupted work is rolled back (or resumed by retrying it),
nothing is orphaned (directories, rows, mounts), and what existed before is intact.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imaged.cli.client import DaemonClient, segment
from imaged.config import Overrides, load_config
from imaged.host.mounts import is_mounted
from imaged.ops.service import Service
from imaged.testing.images import OCILayout, file, push
from imaged.testing.registry import LocalRegistry
from tests.conftest import Daemon, push_simple


@contextlib.contextmanager
def client(daemon: Daemon) -> Iterator[DaemonClient]:
    api = DaemonClient(daemon.socket, timeout=120)
    try:
        yield api
    finally:
        api.close()


def _state(pid: int) -> str:
    # /proc/PID/stat: "pid (comm) S ..."; comm may hold spaces, so split after the last ')'.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def kill_when_paused(daemon: Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _state(daemon.proc.pid) != "T":
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the daemon never reached its pause point: {daemon.output()}")
        time.sleep(0.02)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(30)


def start_request(daemon: Daemon, method: str, path: str, body: str | None = None
                  ) -> subprocess.Popen[bytes]:
    """The request that will reach the pause point, from another process (it never returns
    normally: its daemon is killed under it)."""
    args = ["curl", "-sS", "--unix-socket", str(daemon.socket), "-X", method]
    if body is not None:
        args += ["-d", body]
    return subprocess.Popen([*args, f"http://imaged{path}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture
def before(start_daemon: Any, registry: LocalRegistry, layout: OCILayout) -> dict[str, Any]:
    """A store with an image and a mounted container holding a written file; daemon stopped."""
    pushed = push_simple(layout, registry, "crash/keep")
    daemon: Daemon = start_daemon()
    with client(daemon) as api:
        list(api.stream("POST", "/v1/images/pull", {"ref": pushed.ref}))
        path = Path(api.call("POST", "/v1/containers/keep/mount",
                             {"image": pushed.ref})["path"])
        (path / "written.txt").write_text("survives\n")
        api.call("POST", "/v1/containers", {"name": "idle", "image": pushed.ref})
    daemon.stop()
    return {"ref": pushed.ref, "id": pushed.manifest_digest, "path": path}


def check_clean(root: Path) -> list[str]:
    """``imaged check`` in this process on the root, which no daemon holds now: nothing found
    once opening the root has recovered (what it recovered is returned)."""
    async def run() -> dict[str, Any]:
        async with Service.open(load_config(Overrides(root=root)), "test crash check") as svc:
            return await svc.check()

    report = trio.run(run)
    assert report["findings"] == [], report
    recovered: list[str] = report["recovered"]
    return recovered


def assert_intact(api: DaemonClient, before: dict[str, Any]) -> None:
    """What existed before the crash is as it was."""
    images = {i["id"]: i for i in api.call("GET", "/v1/images")}
    assert before["ref"] in images[before["id"]]["refs"]
    keep = api.call("GET", "/v1/containers/keep")
    assert keep["mounted"] and keep["path"] == str(before["path"])
    assert (before["path"] / "written.txt").read_text() == "survives\n"
    assert api.call("GET", "/v1/containers/idle")["mounted"] is False


def _big_image(layout: OCILayout, registry: LocalRegistry, repo: str) -> str:
    entries = [file(f"big/{i}", os.urandom(1 << 20)) for i in range(24)]
    layer = layout.add_layer(entries, None)
    tag = repo.replace("/", "-")
    layout.tag(layout.add_image([layer]), tag)
    ref = f"{registry.host}/{repo}:v1"
    push(layout, tag, ref)
    return ref


@pytest.mark.parametrize("point", ["mid-download", "mid-unpack"])
def test_crash_mid_pull(point: str, before: dict[str, Any], start_daemon: Any, root: Path,
                        registry: LocalRegistry, layout: OCILayout) -> None:
    ref = _big_image(layout, registry, f"crash/{point}")
    daemon: Daemon = start_daemon(env={"IMAGED_FAULT_PAUSE": point})
    request = start_request(daemon, "POST", "/v1/images/pull", f'{{"ref": "{ref}"}}')
    kill_when_paused(daemon)
    request.wait(30)

    recovered = check_clean(root)
    if point == "mid-unpack":
        assert any(note.startswith("removed half-applied layer") for note in recovered)
    restarted: Daemon = start_daemon()
    with client(restarted) as api:
        assert_intact(api, before)
        assert ref not in {r for i in api.call("GET", "/v1/images") for r in i["refs"]}
        events = list(api.stream("POST", "/v1/images/pull", {"ref": ref}))  # retried: works
        assert events[-1]["status"] == "done", events[-1]
    restarted.stop()
    assert check_clean(root) == []
    again: Daemon = start_daemon()
    with client(again) as api:
        assert_intact(api, before)
        mounted = Path(api.call("POST", "/v1/containers/after/mount", {"image": ref})["path"])
        assert (mounted / "big" / "23").stat().st_size == 1 << 20


def test_crash_between_create_and_mount(before: dict[str, Any], start_daemon: Any,
                                        root: Path) -> None:
    daemon: Daemon = start_daemon(env={"IMAGED_FAULT_PAUSE": "created-not-mounted"})
    request = start_request(daemon, "POST", "/v1/containers/half/mount",
                            f'{{"image": "{before["ref"]}"}}')
    kill_when_paused(daemon)
    request.wait(30)

    check_clean(root)
    restarted: Daemon = start_daemon()
    with client(restarted) as api:
        assert_intact(api, before)
        half = api.call("GET", "/v1/containers/half")  # created before the crash: kept
        assert half["mounted"] is False
        path = Path(api.call("POST", "/v1/containers/half/mount")["path"])
        assert is_mounted(path)
        api.call("DELETE", "/v1/containers/half?force=true")


def test_crash_mid_removal(before: dict[str, Any], start_daemon: Any, root: Path) -> None:
    daemon: Daemon = start_daemon(env={"IMAGED_FAULT_PAUSE": "mid-removal"})
    with client(daemon) as api:
        api.call("POST", "/v1/containers", {"name": "doomed", "image": before["ref"]})
    request = start_request(daemon, "DELETE", f"/v1/containers/{segment('doomed')}")
    kill_when_paused(daemon)
    request.wait(30)

    assert "finished removing interrupted container doomed" in check_clean(root)
    restarted: Daemon = start_daemon()
    with client(restarted) as api:
        assert_intact(api, before)
        assert "doomed" not in {c["name"] for c in api.call("GET", "/v1/containers")}
