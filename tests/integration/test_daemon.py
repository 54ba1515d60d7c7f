"""``imaged serve`` as a real process: the socket, who may use it, the API's answers to good and
bad requests, NDJSON pulls, the CLI through it, and stopping."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imaged.cli.client import DaemonClient, segment
from imaged.digest import Digest
from imaged.errors import ConflictError, InvalidError, NotFoundError
from imaged.host.mounts import is_mounted
from imaged.testing.images import OCILayout, file, push
from imaged.testing.registry import LocalRegistry
from tests.conftest import Daemon, need_tools, push_simple, upstream_gets
from tests.integration.faulty import FaultyRegistry, Gate, big_image, blob_path, top_layer


@pytest.fixture
def api(daemon: Daemon) -> Iterator[DaemonClient]:
    client = DaemonClient(daemon.socket, timeout=60)
    yield client
    client.close()


def raw(daemon: Daemon, data: bytes) -> bytes:
    """Send bytes as they are and return the whole answer (the server closes after errors)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := sock.recv(65536):
            out += chunk
    return bytes(out)


def status_and_body(answer: bytes) -> tuple[int, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.strip() else None


def test_socket_is_0660_and_removed_at_stop(daemon: Daemon) -> None:
    st = daemon.socket.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == 0
    assert daemon.stop() == 0
    assert not daemon.socket.exists()
    assert "stopped" in daemon.output()


def test_info_and_openapi(api: DaemonClient, root: Path) -> None:
    info = api.call("GET", "/v1/info")
    assert info["root"] == str(root)
    assert {"driver", "drivers", "version"} <= set(info)
    document = api.call("GET", "/v1/openapi.json")
    assert document["openapi"].startswith("3.")
    assert "/v1/containers/{name}/mount" in document["paths"]


def test_second_daemon_on_the_root_is_refused(daemon: Daemon, start_daemon: Any) -> None:
    with pytest.raises(RuntimeError, match="in use by imaged serve"):
        start_daemon()


@pytest.mark.parametrize(("request_bytes", "status", "words"), [
    (b"GARBAGE\r\n\r\n", 400, "malformed HTTP"),
    (b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such endpoint"),
    (b"GET /v2/info HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such endpoint"),
    (b"DELETE /v1/info HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not allowed"),
    (b"POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{nope", 400,
     "not valid JSON"),
    (b"POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]", 400,
     "JSON object"),
    (b'POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\n\r\n'
     b'{"image": "a", "extra": 1}\n', 400, "unknown field"),
    (b'POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{"image": 5}\n',
     400, "must be a string"),
    (b'POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}', 400,
     "'image' is required"),
    (b'POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 29\r\n\r\n'
     b'{"image": "a", "image": "b"}\n', 400, "appears twice"),
    (b'PATCH /v1/containers/c1 HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n'
     b'{"quota": true}\n', 400, "must be an integer"),
    (b"GET /v1/containers/..%2F..%2Fetc HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "invalid container name"),
    (b"GET /v1/containers/" + b"a" * 200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "invalid container name"),
    (b"GET /v1/containers/../info HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "invalid container name"),
    (b"GET /v1/images/%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400, "UTF-8"),
    (b"GET /v1/images/" + b"a" * 600 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid image"),
    (b"DELETE /v1/images/x?force=maybe HTTP/1.1\r\nHost: x\r\n\r\n", 400, "true or false"),
    (b"GET /v1/check?verify_data= HTTP/1.1\r\nHost: x\r\n\r\n", 400, "true or false"),
    (b"GET /v1/check?verify_data=1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "true or false"),
    (b"GET /v1/images?color=red HTTP/1.1\r\nHost: x\r\n\r\n", 400, "unknown query"),
    (b"GET /v1/images/x/advice?report=/a&report=/b HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "given more than once"),
    (b"GET /v1/images/x/advice?report=relative.json HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "must be an absolute path"),
    (b"POST /v1/images/pull HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n"
     b'{"ref": "a b:c d"}', 400, "invalid reference"),
    (b"POST /v1/gc HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413, "limit"),
])
def test_bad_requests_get_documented_errors(daemon: Daemon, request_bytes: bytes, status: int,
                                            words: str) -> None:
    got, body = status_and_body(raw(daemon, request_bytes))
    assert got == status, body
    assert body["error"]["code"] == "invalid" if status in (400, 405, 413) else True
    assert words in body["error"]["message"], body
    assert daemon.proc.poll() is None  # and the daemon is still there
    assert status_and_body(raw(daemon, b"GET /v1/images HTTP/1.1\r\nHost: x\r\n"
                                       b"Connection: close\r\n\r\n"))[0] == 200


def _as_nobody(daemon: Daemon, *curl_args: str, groups: str = "") -> tuple[int, Any]:
    """curl over the socket as uid/gid 65534, with only the supplementary groups given."""
    daemon.dir.chmod(0o755)
    daemon.socket.chmod(0o666)  # loosened: only the credential check stands in the way now
    groups_arg = [f"--groups={groups}"] if groups else ["--clear-groups"]
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", *groups_arg, "curl", "-sS",
         "--unix-socket", str(daemon.socket), "-w", "\n%{http_code}", *curl_args],
        capture_output=True, text=True, timeout=30, check=True)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code), json.loads(body) if body.strip() else None


def test_unprivileged_peer_is_forbidden_and_nothing_is_done(
        daemon: Daemon, api: DaemonClient, registry: LocalRegistry, layout: OCILayout) -> None:
    pushed = push_simple(layout, registry, "daemon/forbidden")
    events = list(api.stream("POST", "/v1/images/pull", {"ref": pushed.ref}))
    assert events[-1]["status"] == "done"

    code, body = _as_nobody(daemon, "-X", "DELETE",
                            f"http://x/v1/images/{segment(pushed.ref)}?force=true")

    assert code == 403
    assert body["error"]["code"] == "forbidden"
    assert "uid 65534" in body["error"]["message"]
    assert [image["refs"] for image in api.call("GET", "/v1/images")] == [[pushed.ref]]


@contextlib.contextmanager
def _admin_group() -> Iterator[int]:
    """The ``imaged`` group, made for the test when the host has none, removed after."""
    try:
        yield grp.getgrnam("imaged").gr_gid
        return
    except KeyError:
        pass
    subprocess.run(["groupadd", "--system", "imaged"], check=True)
    try:
        yield grp.getgrnam("imaged").gr_gid
    finally:
        subprocess.run(["groupdel", "imaged"], check=True)


def test_member_of_the_imaged_group_is_allowed(start_daemon: Any) -> None:
    with _admin_group() as gid:
        daemon: Daemon = start_daemon()
        assert daemon.socket.stat().st_gid == gid
        code, body = _as_nobody(daemon, "http://x/v1/containers", groups=str(gid))
        assert (code, body) == (200, [])
        code, _ = _as_nobody(daemon, "http://x/v1/containers")
        assert code == 403
        daemon.stop()


def test_pull_streams_ndjson_and_ends_with_done(api: DaemonClient, registry: LocalRegistry,
                                                layout: OCILayout) -> None:
    pushed = push_simple(layout, registry, "daemon/stream")

    events = list(api.stream("POST", "/v1/images/pull", {"ref": pushed.ref}))

    assert events[0]["status"] == "resolving"
    assert events[-1] == {"status": "done", "id": pushed.manifest_digest,
                          "config_digest": events[-1]["config_digest"], "ref": pushed.ref,
                          "layers": 2}
    assert {e["status"] for e in events} >= {"resolved", "unpacked"}
    assert [e["status"] for e in events].count("done") == 1
    image = api.call("GET", f"/v1/images/{segment(pushed.ref)}")
    assert image["id"] == pushed.manifest_digest


def test_pull_error_is_the_last_object(api: DaemonClient, registry: LocalRegistry) -> None:
    events = list(api.stream("POST", "/v1/images/pull",
                             {"ref": f"{registry.host}/daemon/absent:v1"}))
    assert events[-1]["status"] == "error"
    assert events[-1]["error"]["code"] == "not_found"


def test_containers_through_the_api(api: DaemonClient, registry: LocalRegistry,
                                    layout: OCILayout) -> None:
    pushed = push_simple(layout, registry, "daemon/containers")
    list(api.stream("POST", "/v1/images/pull", {"ref": pushed.ref}))

    created = api.call("POST", "/v1/containers", {"name": "c1", "image": pushed.ref})
    assert created["name"] == "c1" and created["mounted"] is False
    with pytest.raises(ConflictError, match="already exists"):
        api.call("POST", "/v1/containers", {"name": "c1", "image": pushed.ref})
    mounted = api.call("POST", "/v1/containers/c1/mount")
    path = Path(mounted["path"])
    assert (path / "hello.txt").read_text() == "hello from daemon/containers\n"
    assert api.call("GET", "/v1/containers/c1")["mounted"] is True
    with pytest.raises(ConflictError, match="mounted"):
        api.call("DELETE", "/v1/containers/c1")
    assert api.call("POST", "/v1/containers/c1/unmount") == {"ok": True, "name": "c1"}
    assert not is_mounted(path)
    assert api.call("DELETE", "/v1/containers/c1")["ok"] is True
    with pytest.raises(NotFoundError):
        api.call("GET", "/v1/containers/c1")
    with pytest.raises(InvalidError, match="only go with 'image'"):
        api.call("POST", "/v1/containers/c2/mount", {"quota": 1 << 20})
    gc = api.call("POST", "/v1/gc")
    assert set(gc) == {"freed_bytes", "removed", "failed", "pending"}


def test_sigterm_leaves_mounts_and_the_next_start_reconciles(
        start_daemon: Any, registry: LocalRegistry, layout: OCILayout, root: Path) -> None:
    pushed = push_simple(layout, registry, "daemon/restart")
    first: Daemon = start_daemon()
    with contextlib.closing(DaemonClient(first.socket, timeout=60)) as api:
        list(api.stream("POST", "/v1/images/pull", {"ref": pushed.ref}))
        path = Path(api.call("POST", "/v1/containers/keep/mount",
                             {"image": pushed.ref})["path"])
    assert first.stop(signal.SIGTERM) == 0
    assert is_mounted(path)  # mounts outlive the daemon, as containerd's do

    second: Daemon = start_daemon()
    with contextlib.closing(DaemonClient(second.socket, timeout=60)) as api:
        assert api.call("GET", "/v1/containers/keep")["path"] == str(path)
        api.call("POST", "/v1/containers/keep/unmount")
    assert not is_mounted(path)
    os.sync()


def test_socket_activation_and_readiness(root: Path, isolated_env: dict[str, str],
                                         tmp_path: Path) -> None:
    """systemd's protocol end to end: a socket handed over as fd 3, READY=1 on NOTIFY_SOCKET."""
    need_tools("systemd-socket-activate")
    where = Path(tempfile.mkdtemp(prefix="imd-", dir="/tmp"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(where / "notify"))
    notify.settimeout(30)
    env = {**os.environ, **isolated_env, "NOTIFY_SOCKET": str(where / "notify"),
           "IMAGED_SOCKET": str(where / "unused.sock")}
    passed = [arg for var in (*isolated_env, "NOTIFY_SOCKET") for arg in ("-E", var)]
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(where / "act.sock"), *passed, sys.executable,
         "-m", "imaged", "--root", str(root), "serve"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (where / "act.sock").is_socket() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.closing(DaemonClient(where / "act.sock", timeout=60)) as api:
            assert api.call("GET", "/v1/info")["root"] == str(root)  # the first connection
        assert notify.recv(64) == b"READY=1"
        assert not (where / "unused.sock").exists()  # it served the socket it was given
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        shutil.rmtree(where, ignore_errors=True)


def _shared_base_images(layout: OCILayout, registry: LocalRegistry, repo: str,
                        count: int) -> tuple[list[str], str]:
    """``count`` images on one big base layer; returns their refs and the base blob's digest."""
    # 64 MiB, uncompressed: big enough that a pull is still running when a client hangs up.
    base = layout.add_layer([file(f"base/{i}", os.urandom(8 << 20)) for i in range(8)], None)
    refs = []
    for n in range(count):
        top = layout.add_layer([file(f"app{n}.txt", f"app {n}\n".encode())])
        tag = f"{repo.replace('/', '-')}-{n}"
        layout.tag(layout.add_image([base, top]), tag)
        refs.append(f"{registry.host}/{repo}:v{n}")
        push(layout, tag, refs[-1])
    return refs, base.blob.digest


def test_concurrent_api_pulls_fetch_a_shared_blob_once(
        daemon: Daemon, registry: LocalRegistry, layout: OCILayout, root: Path) -> None:
    refs, base = _shared_base_images(layout, registry, "daemon/shared", 3)
    before = len(upstream_gets(registry, "daemon/shared"))
    curls = [subprocess.Popen(["curl", "-sS", "--unix-socket", str(daemon.socket), "-d",
                               json.dumps({"ref": ref}), "http://imaged/v1/images/pull"],
                              stdout=subprocess.PIPE) for ref in refs]
    outputs = [proc.communicate(timeout=120)[0] for proc in curls]

    for out in outputs:
        assert json.loads(out.splitlines()[-1])["status"] == "done", out[-500:]
    fetched = upstream_gets(registry, "daemon/shared")[before:]
    assert len([line for line in fetched if f"/blobs/{base}" in line]) == 1, fetched
    with contextlib.closing(DaemonClient(daemon.socket, timeout=60)) as api:
        assert len(api.call("GET", "/v1/images")) == 3


def test_client_hanging_up_cancels_only_unshared_work(
        daemon: Daemon, registry: LocalRegistry, layout: OCILayout, root: Path) -> None:
    refs, _ = _shared_base_images(layout, registry, "daemon/hangup", 1)
    body = json.dumps({"ref": refs[0]})

    def pull() -> subprocess.Popen[bytes]:
        return subprocess.Popen(["curl", "-sS", "-N", "--unix-socket", str(daemon.socket),
                                 "-d", body, "http://imaged/v1/images/pull"],
                                stdout=subprocess.PIPE)

    staying, leaving = pull(), pull()
    assert leaving.stdout is not None
    leaving.stdout.readline()  # its pull has begun
    leaving.kill()
    leaving.wait()
    leaving.stdout.close()
    out = staying.communicate(timeout=120)[0]
    assert json.loads(out.splitlines()[-1])["status"] == "done", out[-500:]

    # Alone, a client that leaves takes its work with it and leaves nothing half-made.
    with contextlib.closing(DaemonClient(daemon.socket, timeout=60)) as api:
        api.call("DELETE", f"/v1/images/{segment(refs[0])}")
        api.call("POST", "/v1/gc")
        lone = pull()
        assert lone.stdout is not None
        lone.stdout.readline()
        lone.kill()
        lone.wait()
        lone.stdout.close()
        deadline = time.monotonic() + 30
        while _layer_rows(root, "state != 'ready'") and time.monotonic() < deadline:
            time.sleep(0.1)  # the cancelled pull's clean-up runs after the hang-up
        assert api.call("GET", "/v1/images") == []
    assert _layer_rows(root, "state != 'ready'") == set()
    ready = {Digest.parse(c).hex for c in _layer_rows(root, "state = 'ready'")}
    layers_dir = root / "drivers" / "overlay" / "layers"
    assert {p.name for p in layers_dir.iterdir()} == ready if layers_dir.exists() else True


def _layer_rows(root: Path, where: str) -> set[str]:
    db = sqlite3.connect(root / "metadata.db")
    try:
        return {c for (c,) in db.execute(f"SELECT chain_id FROM layers WHERE {where}")}  # noqa: S608
    finally:
        db.close()


def test_sigterm_lets_a_pull_in_flight_finish(daemon: Daemon, faulty: FaultyRegistry) -> None:
    image = big_image(7)
    faulty.add_image("daemon/drain", "v1", image)
    path = blob_path("daemon/drain", top_layer(image).digest)
    release = threading.Event()
    faulty.routes[path].script = [Gate(1000, release)]  # the download waits for us
    curl = subprocess.Popen(["curl", "-sS", "-N", "--unix-socket", str(daemon.socket), "-d",
                             json.dumps({"ref": f"{faulty.host}/daemon/drain:v1"}),
                             "http://imaged/v1/images/pull"], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not faulty.requests_for(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "finishing requests in flight" not in daemon.output() and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        assert daemon.proc.poll() is None  # draining, not gone
    finally:
        release.set()
    rest = curl.communicate(timeout=60)[0]
    assert json.loads(rest.splitlines()[-1])["status"] == "done", rest[-500:]
    assert daemon.proc.wait(30) == 0
