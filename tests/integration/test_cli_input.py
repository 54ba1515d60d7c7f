"""Bad input at the command line and through the API gets one clear line, never a traceback;
and commands that meet each other on one root wait rather than fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imaged.cli.client import DaemonClient
from imaged.errors import InvalidError
from imaged.store.lock import RootLock
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conftest import Daemon, push_simple
from tests.integration.test_daemon import _admin_group


@pytest.mark.parametrize("args", [
    ["mount", "x", "--quota", "16X"], ["mount", "x", "--quota", "-1"],
    ["mount", "x", "--quota", "1e9"], ["mount", "x", "--quota", ""],
    ["mount", "x", "--quota", "3.9M"], ["mount", "x", "--quota", "0"],
    ["mount", "x", "--quota", "99999999T"], ["update", "c1", "--quota", "99999999T"],
    ["mount", "x", "--name", ""], ["rm", ""], ["umount", "../etc"],
    ["bench", "fetch", "--out", "/tmp/x", "--size", "lots"],
])
def test_usage_errors_exit_2_with_one_line(imaged_proc: Any, args: list[str]) -> None:
    result = imaged_proc(*args)
    assert result.code == 2, result.err
    assert result.err.startswith("imaged: error: ") and result.err.count("\n") == 1, result.err
    assert "Traceback" not in result.err
    as_json = imaged_proc("--json", *args)
    assert as_json.code == 2
    assert json.loads(as_json.out)["error"]["code"] == "invalid"


def test_a_port_outside_the_range_is_an_invalid_reference(imaged_proc: Any) -> None:
    result = imaged_proc("pull", "127.0.0.1:99999/x/y:1")
    assert result.code == 1
    assert "port 99999 is not in 1-65535" in result.err


@pytest.mark.parametrize("body", [{"name": ""}, {"quota": 10**26}, {"quota": 0}])
def test_the_api_refuses_an_empty_name_and_impossible_quotas(
        daemon: Daemon, registry: LocalRegistry, layout: OCILayout, body: dict[str, Any]) -> None:
    pushed = push_simple(layout, registry, "input/api")
    client = DaemonClient(daemon.socket, timeout=60)
    try:
        list(client.stream("POST", "/v1/images/pull", {"ref": pushed.ref}))
        with pytest.raises(InvalidError):
            client.call("POST", "/v1/containers", {"image": pushed.ref, **body})
        assert client.call("GET", "/v1/containers") == []
    finally:
        client.close()


def test_a_user_who_may_not_use_the_socket_is_told_so(daemon: Daemon) -> None:
    """Not root, not in the group: the socket (0660) refuses the connection, and the CLI says
    that rather than failing on the root's files."""
    daemon.dir.chmod(0o755)
    with _admin_group():
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-m", "imaged", "--root", str(daemon.root), "ps"],
            capture_output=True, text=True, timeout=60, check=False,
            env={**daemon.env, "HOME": "/", "IMAGED_CONFIG": ""})  # theirs is unreadable
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"imaged: error: permission denied on {daemon.socket} (root or "
                           "group imaged)\n")


def test_an_embedded_command_waits_for_another(imaged_proc: Any, root: Path,
                                               isolated_env: dict[str, str]) -> None:
    root.mkdir(parents=True)
    lock = RootLock(root / "lock", "imaged pull")
    try:
        fast = imaged_proc("--no-wait", "ps")
        assert fast.code == 1 and "root is in use by imaged pull" in fast.err
        with subprocess.Popen([sys.executable, "-m", "imaged", "--root", str(root), "ps"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **isolated_env}) as waiting:
            try:
                assert waiting.stderr is not None
                line = waiting.stderr.readline()  # blocks until it says it is waiting
                assert line.startswith("imaged: waiting for the root: root is in use by imaged "
                                       "pull (pid "), line
                lock.release()
                out, err = waiting.communicate(timeout=60)
            finally:
                waiting.kill()
        assert waiting.returncode == 0, err
        assert out.startswith("NAME "), out  # the (empty) table, once the root was free
    finally:
        lock.release()


def test_each_benchmark_has_its_own_flags(imaged_proc: Any) -> None:
    fetch = imaged_proc("bench", "fetch", "--help").out
    mount = imaged_proc("bench", "mount", "--help").out
    assert "--size" in fetch and "--shapes" not in fetch and "--drivers" not in fetch
    assert "--drivers" in mount and "--size" not in mount
    assert imaged_proc("bench", "mount", "--out", "/tmp/x", "--size", "1G").code == 2
    copyup = imaged_proc("bench", "copyup", "--help").out
    assert "--sizes" in copyup and "--quick" in copyup and "--quick" not in mount
    assert imaged_proc("bench", "copyup", "--out", "/tmp/x", "--sizes", "1M,lots").code == 2
