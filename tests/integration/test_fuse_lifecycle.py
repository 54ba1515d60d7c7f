"""The fuse driver's server processes over their lives (issue 14, "Processes"): a server killed
with SIGKILL leaves a broken container that ``ps`` shows, ``umount`` clears and ``mount``
brings back with its writes; the daemon revives one by itself, for servers it started, found
at start, or found dead as it starts; a restart of the daemon leaves servers serving; open
files make ``umount`` busy, and ``umount --force`` detaches; the usage count survives a clean
exit; the control socket's shutdown ends a server.

Real mounts, real SIGKILLs, real daemons. Every server a test starts is killed by PID at
teardown and every mount under the root detached, whether the test passed or not.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imaged.cli.client import DaemonClient
from imaged.config import Config
from imaged.drivers.fuse import probe
from imaged.fuse import control
from imaged.host.mounts import is_mounted
from imaged.ops.service import MAX_REVIVALS
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conftest import CLI, Daemon, add_config, push_simple, unmount_below
from tests.integration.test_daemon import _admin_group, _as_nobody

_WAIT = 30.0  # for a process to end or a daemon to revive a mount: generous, never a timing


def _containers(root: Path) -> Path:
    return root / "drivers" / "fuse" / "containers"


def _server(root: Path, name: str) -> tuple[int, int]:
    pid, started = (_containers(root) / name / "server").read_text().split()
    return int(pid), int(started)


def _same_process(pid: int, started: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return int(fields[19]) == started


def _kill_servers(root: Path) -> None:
    """SIGKILL every server recorded under ``root`` that is still that process, and reap the
    ones this process started (embedded mounts)."""
    for record in _containers(root).glob("*/server"):
        pid, started = (int(n) for n in record.read_text().split())
        if _same_process(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


@pytest.fixture
def fuse_root(root: Path, tmp_path: Path) -> Iterator[Path]:
    """The root, for the fuse driver; at teardown its servers are killed and whatever is
    mounted under the test's directory (the root, targets given or attached) is detached."""
    if os.geteuid() != 0:
        pytest.skip("fuse mounts need root")
    found = probe(Config(root=root))
    if not found.supported:
        pytest.skip(f"fuse not supported here: {found.reason}")
    try:
        yield root
    finally:
        _kill_servers(root)
        unmount_below(tmp_path)


@pytest.fixture
def image(fuse_root: Path, registry: LocalRegistry, layout: OCILayout, imaged: CLI,
          request: pytest.FixtureRequest) -> str:
    """A small image, pulled into the fuse root."""
    repo = f"lifecycle/t{hashlib.sha256(request.node.name.encode()).hexdigest()[:12]}"
    ref = push_simple(layout, registry, repo).ref
    _cli(imaged, "pull", ref)
    return ref


def _kill(pid: int) -> None:
    """SIGKILL, and return once the process has ended (a zombie counts: it serves nothing)."""
    fd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        assert select.select([fd], [], [], _WAIT)[0], f"server {pid} outlived SIGKILL"
    finally:
        os.close(fd)


def _wait_gone(pid: int) -> None:
    """Return once the process has ended (already reaped, by the driver, counts)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], _WAIT)[0], f"server {pid} did not exit"
    finally:
        os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _cli(imaged: CLI, *args: str) -> Any:
    result = imaged("--driver", "fuse", *args)
    assert result.code == 0, f"imaged {' '.join(args)}: {result.err}"
    return result


def _state(imaged: CLI, name: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = _cli(imaged, "--json", "ps").json()
    return next(row for row in rows if row["name"] == name)


def _enotconn(path: Path) -> bool:
    try:
        os.listdir(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def test_a_killed_server_leaves_a_broken_container_that_umount_clears(
        fuse_root: Path, image: str, imaged: CLI) -> None:
    merged = Path(_cli(imaged, "mount", image, "--name", "c1").out.strip())
    (merged / "kept.txt").write_text("written and closed\n")
    held = os.open(merged / "kept.txt", os.O_RDONLY)  # a runtime's open file on the mount
    try:
        pid, _ = _server(fuse_root, "c1")
        _kill(pid)
        assert _enotconn(merged)
        row = _state(imaged, "c1")
        assert row["state"] == "broken" and row["mounted"] and row["path"] == str(merged)
        assert f"{merged} (broken)" in _cli(imaged, "ps").out
        checked = imaged("--driver", "fuse", "check")
        assert checked.code == 1
        assert f"mount-broken: container c1 is mounted at {merged}, but its fuse server" \
            in checked.out
        # A dead mount with a file still open on it: a plain umount2 says EBUSY on this kernel,
        # so the driver detaches it; the holder keeps a dead descriptor.
        _cli(imaged, "umount", "c1")
        assert not is_mounted(merged)
        assert not (_containers(fuse_root) / "c1" / "server").exists()
        with pytest.raises(OSError) as dead:
            os.read(held, 10)
        assert dead.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):
            os.close(held)
    row = _state(imaged, "c1")
    assert row["state"] == "unmounted" and row["path"] is None
    assert row["used_bytes"] > 0  # walked: a killed server leaves no count to trust
    assert _cli(imaged, "check").out.strip() == "no findings"


def test_mount_brings_a_broken_container_back_with_its_acknowledged_writes(
        fuse_root: Path, image: str, imaged: CLI) -> None:
    merged = Path(_cli(imaged, "mount", image, "--name", "c2").out.strip())
    data = os.urandom(200_000)
    (merged / "big.bin").write_bytes(data)  # closed, not fsynced: acknowledged by write(2)
    (merged / "hello.txt").unlink()  # a whiteout over the image's file
    (merged / "dir").mkdir()
    old, _ = _server(fuse_root, "c2")
    _kill(old)
    assert _state(imaged, "c2")["state"] == "broken"
    assert Path(_cli(imaged, "mount", image, "--name", "c2").out.strip()) == merged
    new, started = _server(fuse_root, "c2")
    assert new != old and _same_process(new, started)
    assert (merged / "big.bin").read_bytes() == data
    assert not (merged / "hello.txt").exists() and (merged / "dir").is_dir()
    assert (merged / "etc" / "os-release").read_bytes() == b"ID=imaged-test\n"
    assert _state(imaged, "c2")["state"] == "mounted"
    # imaged check --repair revives it the same way.
    _kill(new)
    repaired = imaged("--driver", "fuse", "check", "--repair")
    assert "mount-broken: container c2" in repaired.out and "(repaired)" in repaired.out
    assert _state(imaged, "c2")["state"] == "mounted"
    assert (merged / "big.bin").read_bytes() == data
    last, _ = _server(fuse_root, "c2")
    _cli(imaged, "umount", "c2")
    _wait_gone(last)


def test_umount_with_a_file_open_is_busy_and_changes_nothing(
        fuse_root: Path, image: str, imaged: CLI) -> None:
    merged = Path(_cli(imaged, "mount", image, "--name", "c3").out.strip())
    pid, started = _server(fuse_root, "c3")
    with (merged / "open.txt").open("w") as held:
        held.write("still open")
        result = imaged("--driver", "fuse", "umount", "c3")
        assert result.code == 1
        assert "busy" in result.err and "imaged: error:" in result.err
        assert _same_process(pid, started) and is_mounted(merged)
        assert _state(imaged, "c3")["state"] == "mounted"
    assert (merged / "open.txt").read_text() == "still open"
    _cli(imaged, "umount", "c3")
    _wait_gone(pid)
    assert not is_mounted(merged)


@pytest.mark.cli_modes  # through a daemon too, whose child the server then is
def test_a_forced_umount_leaves_the_server_to_the_open_files_and_a_mount_ends_it(
        fuse_root: Path, image: str, imaged: CLI) -> None:
    """``umount --force`` detaches: the server serves the files still open and exits by
    itself when the last one closes. A mount while one is still open stops that server first
    (one server per upper), and the open file then answers ENOTCONN."""
    merged = Path(_cli(imaged, "mount", image, "--name", "c9").out.strip())
    pid, started = _server(fuse_root, "c9")
    held = os.open(merged / "open.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(held, b"one")
        _cli(imaged, "umount", "--force", "c9")
        assert not is_mounted(merged) and _state(imaged, "c9")["state"] == "unmounted"
        assert _same_process(pid, started)
        os.write(held, b" two")
    finally:
        os.close(held)
    _wait_gone(pid)  # the last file closed: the kernel ended the connection, the server left
    again = Path(_cli(imaged, "mount", image, "--name", "c9").out.strip())
    assert (again / "open.txt").read_text() == "one two"
    held = os.open(again / "open.txt", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(held, b" three")
        _cli(imaged, "umount", "--force", "c9")
        old = _server(fuse_root, "c9")
        assert _same_process(*old)
        third = Path(_cli(imaged, "mount", image, "--name", "c9").out.strip())
        assert not _same_process(*old) and _server(fuse_root, "c9") != old
        with pytest.raises(OSError) as dead:
            os.write(held, b" four")
        assert dead.value.errno == errno.ENOTCONN
    finally:
        os.close(held)
    assert (third / "open.txt").read_text() == "one two three"
    pid, _ = _server(fuse_root, "c9")
    _cli(imaged, "umount", "c9")
    _wait_gone(pid)


def test_rm_force_stops_the_server_of_a_busy_container(
        fuse_root: Path, image: str, imaged: CLI) -> None:
    """``rm --force`` with a file open: unlike ``umount --force``, which leaves the server
    to the open files, removing the container stops it (nothing serves a removed container's
    upper), the open file answers ENOTCONN, and neither process nor record stays behind."""
    merged = Path(_cli(imaged, "mount", image, "--name", "c8", "--quota", "16M").out.strip())
    pid, started = _server(fuse_root, "c8")
    held = os.open(merged / "open.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(held, b"one")
        _cli(imaged, "rm", "--force", "c8")
        assert not _same_process(pid, started)
        with pytest.raises(OSError) as dead:
            os.write(held, b" two")
        assert dead.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):  # the stopped server's file may fail its close too
            os.close(held)
    assert not is_mounted(merged) and not (_containers(fuse_root) / "c8").exists()
    assert _cli(imaged, "--json", "ps").json() == []
    again = Path(_cli(imaged, "mount", image, "--name", "c8").out.strip())
    assert not (again / "open.txt").exists()
    pid, _ = _server(fuse_root, "c8")
    _cli(imaged, "umount", "c8")
    _wait_gone(pid)


def test_usage_is_kept_across_a_clean_exit_and_walked_after_a_kill(
        fuse_root: Path, image: str, imaged: CLI) -> None:
    home = _containers(fuse_root) / "c4"
    merged = Path(_cli(imaged, "mount", image, "--name", "c4", "--quota", "64M").out.strip())
    (merged / "one.bin").write_bytes(b"\1" * (1 << 20))
    served = _state(imaged, "c4")["used_bytes"]
    assert served >= 1 << 20
    pid, _ = _server(fuse_root, "c4")
    _cli(imaged, "umount", "c4")
    _wait_gone(pid)
    assert control.saved_usage(home) == served  # the server's own count, left at exit
    # ps, and then the next server, read the saved count instead of walking the upper: a
    # count no walk would give shows through both. The server removes the count before
    # serving, so none is left to trust after a SIGKILL, and the upper is walked again.
    (home / control.USAGE).write_text(f"{served + (5 << 20)}\n")
    assert _state(imaged, "c4")["used_bytes"] == served + (5 << 20)
    _cli(imaged, "mount", image, "--name", "c4")
    assert control.saved_usage(home) is None
    assert _state(imaged, "c4")["used_bytes"] == served + (5 << 20)
    _kill(_server(fuse_root, "c4")[0])
    assert _state(imaged, "c4")["used_bytes"] == served
    # A broken container's quota changes as an unmounted one's; its next server enforces it.
    assert imaged("--driver", "fuse", "update", "c4", "--quota", "512K").code == 1
    _cli(imaged, "update", "c4", "--quota", "3M")
    _cli(imaged, "mount", image, "--name", "c4")
    with pytest.raises(OSError) as full:
        (merged / "two.bin").write_bytes(b"\2" * (3 << 20))
    assert full.value.errno in (errno.ENOSPC, errno.EDQUOT)
    _cli(imaged, "umount", "c4")


def test_the_control_sockets_shutdown_unmounts_and_ends_the_server(
        fuse_root: Path, image: str, imaged: CLI) -> None:
    home = _containers(fuse_root) / "c5"
    merged = Path(_cli(imaged, "mount", image, "--name", "c5").out.strip())
    (merged / "f").write_bytes(b"x" * 8192)
    pid, _ = _server(fuse_root, "c5")
    assert control.ask(home, {"op": "shutdown"}) == {"ok": True}
    _wait_gone(pid)
    assert not is_mounted(merged)
    assert control.saved_usage(home) is not None  # a clean exit
    _cli(imaged, "umount", "c5")  # the record goes; nothing was left mounted
    assert _state(imaged, "c5")["state"] == "unmounted"


def _wait_logged(daemon: Daemon, text: str, times: int = 1) -> None:
    deadline = time.monotonic() + _WAIT
    while daemon.output().count(text) < times:
        assert time.monotonic() < deadline, f"{text!r} not logged {times}x: {daemon.output()}"
        time.sleep(0.05)


def _wait_revived(daemon: Daemon, root: Path, name: str, times: int = 1) -> tuple[int, int]:
    """The server of the daemon's ``times``-th revival of ``name``, once the revival is done
    (logged after the mount is recorded, and attached where it was)."""
    _wait_logged(daemon, f"container {name} is mounted again at", times)
    pid, started = _server(root, name)
    assert _same_process(pid, started)
    return pid, started


def test_the_daemon_revives_a_killed_server_and_a_restart_leaves_servers_serving(
        fuse_root: Path, image: str, imaged: CLI, start_daemon: Any) -> None:
    first: Daemon = start_daemon("fuse")
    api = DaemonClient(first.socket, timeout=60)
    try:
        api.call("POST", "/v1/containers", {"name": "d1", "image": image})
        merged = Path(api.call("POST", "/v1/containers/d1/mount", {})["path"])
        (merged / "before.txt").write_text("one\n")
        old, _ = _server(fuse_root, "d1")
        _kill(old)
        pid, started = _wait_revived(first, fuse_root, "d1")
        assert pid != old
        assert (merged / "before.txt").read_text() == "one\n"
        assert api.call("GET", "/v1/containers/d1")["state"] == "mounted"
        assert "container d1 is broken (its fuse server" in first.output()
    finally:
        api.close()
    # Stopped as systemd stops it (SIGTERM to the main process only, KillMode=process): the
    # server goes on serving, and the next daemon watches it from its record.
    assert first.stop() == 0
    assert _same_process(pid, started)
    (merged / "between.txt").write_text("two\n")
    second: Daemon = start_daemon("fuse")
    api = DaemonClient(second.socket, timeout=60)
    try:
        assert api.call("GET", "/v1/containers/d1")["state"] == "mounted"
        _kill(pid)
        again, _ = _wait_revived(second, fuse_root, "d1")
        assert (merged / "between.txt").read_text() == "two\n"
        assert "container d1 is broken (its fuse server" in second.output()
    finally:
        api.close()
    # A server that dies while no daemon runs is revived by the next daemon as it starts.
    assert second.stop() == 0
    _kill(again)
    third: Daemon = start_daemon("fuse")
    last, _ = _wait_revived(third, fuse_root, "d1")
    assert (merged / "between.txt").read_text() == "two\n"
    api = DaemonClient(third.socket, timeout=60)
    try:
        api.call("POST", "/v1/containers/d1/unmount", {})
        _wait_gone(last)
        assert not is_mounted(merged)
        assert api.call("GET", "/v1/containers/d1")["state"] == "unmounted"
    finally:
        api.close()


def test_a_broken_container_comes_back_at_the_target_it_was_given(
        fuse_root: Path, image: str, imaged: CLI, tmp_path: Path) -> None:
    target = tmp_path / "given"
    target.mkdir()
    assert _cli(imaged, "mount", image, "--name", "c7", "--target", str(target)).out.strip() \
        == str(target)
    (target / "kept").write_text("at the given target\n")
    old, _ = _server(fuse_root, "c7")
    _kill(old)
    assert _state(imaged, "c7")["state"] == "broken"
    assert _cli(imaged, "mount", image, "--name", "c7").out.strip() == str(target)
    assert (target / "kept").read_text() == "at the given target\n"
    _cli(imaged, "umount", "c7")
    assert not is_mounted(target)


def test_the_daemon_revives_an_attached_target_and_gives_up_on_a_server_that_keeps_dying(
        fuse_root: Path, image: str, start_daemon: Any, tmp_path: Path) -> None:
    """A member of group imaged mounts beneath a prefix (the daemon's own mount, attached
    there); the revival detaches the dead clone at the target even while a file is open on it,
    and attaches the new mount at the same target. A server that keeps dying is left broken
    after MAX_REVIVALS revivals, until someone mounts it again."""
    prefix = tmp_path / "run-containers"
    prefix.mkdir()
    add_config(tmp_path, f'[api]\nmount_prefixes = ["{prefix}"]\n')
    target = prefix / "a1" / "rootfs"
    with _admin_group() as gid:
        daemon: Daemon = start_daemon("fuse")
        code, body = _as_nobody(daemon, "-X", "POST", "-d", json.dumps({"target": str(target)}),
                                "http://x/v1/containers/a1/mount", groups=str(gid))
        assert code == 404, body  # not created yet: root creates it, the member mounts it
        api = DaemonClient(daemon.socket, timeout=60)
        try:
            api.call("POST", "/v1/containers", {"name": "a1", "image": image})
            code, body = _as_nobody(daemon, "-X", "POST", "-d",
                                    json.dumps({"target": str(target)}),
                                    "http://x/v1/containers/a1/mount", groups=str(gid))
            assert code == 200 and body["path"] == str(target), body
            (target / "kept").write_text("attached\n")
            pid, _ = _server(fuse_root, "a1")
            held = os.open(target / "kept", os.O_RDONLY)
            try:
                for times in range(1, MAX_REVIVALS + 1):
                    _kill(pid)
                    pid, _ = _wait_revived(daemon, fuse_root, "a1", times)
                    assert (target / "kept").read_text() == "attached\n"
            finally:
                with contextlib.suppress(OSError):  # ENOTCONN: its flush reached a dead mount
                    os.close(held)
            assert api.call("GET", "/v1/containers/a1")["path"] == str(target)
            _kill(pid)
            _wait_logged(daemon, "and stays so")
            assert "container a1 is broken (its fuse server" in daemon.output()
            assert api.call("GET", "/v1/containers/a1")["state"] == "broken"
            assert _enotconn(target)
            assert api.call("POST", "/v1/containers/a1/mount", {})["path"] == str(target)
            assert (target / "kept").read_text() == "attached\n"
            api.call("POST", "/v1/containers/a1/unmount", {})
            assert not is_mounted(target)
        finally:
            api.close()
