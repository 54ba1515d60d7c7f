"""``imaged serve`` against hostile and careless peers: nothing a peer sends ends the daemon, a
refused peer cannot crowd out root, and a burst of clients is queued rather than refused."""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.integration.test_daemon import raw, status_and_body

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
           "PROPFIND", "BREW"]
PATHS = ["/v1/info", "/v1/images", "/v1/images/pull", "/v1/images/x", "/v1/containers",
         "/v1/containers/x", "/v1/containers/x/mount", "/v1/gc", "/v1/openapi.json", "/", "*",
         "http://imaged/v1/info", "/v1/containers/%ff"]
MALFORMED = [
    b"\r\n\r\n", b"GET\r\n\r\n", b"GET /v1/info\r\n\r\n", b"GET /v1/info HTTP/9.9\r\n\r\n",
    b"GET /v1/info HTTP/1.1\r\n\r\n",  # no Host
    b"GET  /v1/info  HTTP/1.1\r\nHost: x\r\n\r\n", b"G\x00T /v1/info HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/info HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /v1/info HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    b"POST /v1/gc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/gc HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n{}{}",
    b"GET /v1/info HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET /v1/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /v1/info HTTP/1.1\r\nHost: x\r\n\r\nHEAD /v1/images HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\xff\xfe\xfd\r\n\r\n",
]


def alive(daemon: Daemon) -> None:
    assert daemon.proc.poll() is None, daemon.output()
    code, body = status_and_body(raw(daemon, b"GET /v1/info HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n"))
    assert code == 200 and "root" in body


def head_of(answer: bytes) -> tuple[int, str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    _, code, phrase = status_line.split(" ", 2)
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(code), phrase, headers, body


def test_head_gets_gets_head_without_a_body(daemon: Daemon) -> None:
    get = raw(daemon, b"GET /v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = raw(daemon, b"HEAD /v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    code, phrase, headers, body = head_of(head)
    assert (code, phrase, body) == (200, "OK", b"")
    assert int(headers["content-length"]) == len(head_of(get)[3])
    code, phrase, headers, body = head_of(raw(
        daemon, b"HEAD /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert (code, phrase, body) == (404, "Not Found", b"")
    alive(daemon)


def test_405_names_the_methods_and_has_a_reason_phrase(daemon: Daemon) -> None:
    code, phrase, headers, _ = head_of(raw(
        daemon, b"DELETE /v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert (code, phrase, headers["allow"]) == (405, "Method Not Allowed", "GET, HEAD")


def test_every_method_on_every_path_and_malformed_heads_leave_it_answering(
        daemon: Daemon) -> None:
    for method in METHODS:
        for path in PATHS:
            answer = raw(daemon, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                 "Connection: close\r\n\r\n".encode())
            assert answer == b"" or answer.startswith(b"HTTP/1.1 "), (method, path, answer)
    for request in MALFORMED:
        raw(daemon, request)
    full = b"POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{\"image\": 5}\n"
    for cut in range(len(full)):  # every truncated head and body, the peer then hanging up
        raw(daemon, full[:cut])
    rng = random.Random(12)  # noqa: S311 - reproducible junk
    for _ in range(200):
        raw(daemon, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
    alive(daemon)
    assert "Traceback" not in daemon.output()


def _loosen(daemon: Daemon) -> None:
    daemon.dir.chmod(0o755)
    daemon.socket.chmod(0o666)  # only the credential check stands in the way now


HOLDER = """
import socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    socks.append(s)
print("ready", flush=True)
time.sleep(120)
"""


def test_refused_peers_cannot_crowd_out_root(daemon: Daemon) -> None:
    _loosen(daemon)
    with subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-c", HOLDER, str(daemon.socket), "600"], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
            alive(daemon)  # root is served while 600 forbidden connections are open
        finally:
            holder.kill()
    assert "refusing a connection from uid 65534" in daemon.output()


def test_a_refused_peer_gets_one_answer_then_the_connection_closes(daemon: Daemon) -> None:
    _loosen(daemon)
    two = (b"HEAD /v1/info HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /v1/images HTTP/1.1\r\nHost: x\r\n\r\n")
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         "import socket, sys\n"
         "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
         "s.sendall(sys.stdin.buffer.read())\n"
         "out = b''\n"
         "while chunk := s.recv(65536): out += chunk\n"
         "sys.stdout.buffer.write(out)\n", str(daemon.socket)],
        input=two, capture_output=True, timeout=30, check=True)
    assert proc.stdout.count(b"HTTP/1.1 ") == 1  # and then EOF, though it asked twice
    code, phrase, headers, body = head_of(proc.stdout)
    assert (code, phrase, headers["connection"], body) == (403, "Forbidden", "close", b"")
    alive(daemon)


def _somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def test_the_socket_listens_with_the_systems_maximum_backlog(daemon: Daemon) -> None:
    line = subprocess.run(["ss", "-xlnH", "src", str(daemon.socket)], capture_output=True,
                          text=True, timeout=10, check=True).stdout.split()
    assert int(line[3]) == _somaxconn()  # Send-Q of a listening socket: its backlog


def test_a_burst_of_clients_is_queued_not_refused(daemon: Daemon) -> None:
    """While the daemon cannot accept (stopped), 300 clients connect at once: all are queued,
    where listen(128) refused the 130th. Then each is answered."""
    burst = min(300, _somaxconn())
    clients: list[socket.socket] = []
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(burst):
            sock = socket.socket(socket.AF_UNIX)
            clients.append(sock)
            sock.setblocking(False)
            try:
                sock.connect(str(daemon.socket))
            except BlockingIOError as exc:
                pytest.fail(f"connection {len(clients)} refused: {exc}")
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    try:
        for sock in clients:
            sock.setblocking(True)
            sock.settimeout(30)
            sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        deadline = time.monotonic() + 60
        for sock in clients:
            assert sock.recv(12) == b"HTTP/1.1 200"
            assert time.monotonic() < deadline
    finally:
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.close()
    alive(daemon)
