"""kill -9 of the fuse server in the middle of a whole-file copy-up and of a stream of writes
(issue 14, "Crash tests"), then the differential test's check: the server mounted again shows
what kernel overlay shows over the same upper and lowers, and every acknowledged write is there.
Partial copy-up's own kill -9 test is in test_fuse_partial.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.fusebed import Mount, overlay_view, serve, stop, walk

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")

BIG = 256 << 20  # long enough a copy that the kill lands inside it
_TIMEOUT = 60.0


def _lowers(tmp: Path) -> list[Path]:
    top, base = tmp / "l1", tmp / "l2"
    for layer in (top, base):
        layer.mkdir()
    with open(base / "big", "wb") as f:
        for mib in range(BIG >> 20):
            f.write((b"%08d" % mib) * (1 << 17))
    (base / "small").write_text("small\n")
    (top / "dir").mkdir()
    (top / "dir" / "file").write_text("file\n")
    return [top, base]


def _start(tmp: Path) -> Mount:
    lowers = [tmp / "l1", tmp / "l2"] if (tmp / "l1").exists() else _lowers(tmp)
    return serve(lowers, tmp / "c", "--copy-up", "full")


def _same_as_kernel_overlay(tmp: Path) -> dict[str, tuple[object, ...]]:
    """The tree the server shows after the crash, checked against kernel overlay's view of
    the same upper; returned for the caller's own checks."""
    mount = _start(tmp)
    try:
        assert [n for n in os.listdir(mount.work) if n.startswith("#imaged-")] == []
        seen = walk(mount.path)
    finally:
        stop(mount)
    with overlay_view(mount, tmp / "kernel", "index=on") as merged:
        assert walk(merged) == seen
    return seen


def _copies_in_flight(work: Path) -> list[int]:
    return [entry.stat(follow_symlinks=False).st_size for entry in os.scandir(work)
            if entry.name.startswith("#imaged-")]


def test_kill9_during_a_full_copy_up(tmp_path: Path) -> None:
    """The copy is made aside in work and renamed in only when whole: killed half way, the
    lower file shows unchanged, the half copy is cleared at the next start, and no write that
    waited for the copy was acknowledged."""
    mount = _start(tmp_path)
    opener = [sys.executable, "-c",
              "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
              "os.pwrite(fd, b'X', 0); print('acked', flush=True)", str(mount.path / "big")]
    try:
        with subprocess.Popen(opener, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as child:
            deadline = time.monotonic() + _TIMEOUT
            while not any(0 < size < BIG for size in _copies_in_flight(mount.work)):
                assert child.poll() is None, "the copy-up ended before the kill could land"
                assert time.monotonic() < deadline
                time.sleep(0.0005)
            os.kill(mount.proc.pid, signal.SIGKILL)
            mount.proc.wait()
            out, _ = child.communicate(timeout=_TIMEOUT)
        assert out == b"" and child.returncode != 0
    finally:
        stop(mount)
    assert not (mount.upper / "big").exists()
    seen = _same_as_kernel_overlay(tmp_path)
    body = seen["big"][-1]
    assert isinstance(body, bytes) and len(body) == BIG and body[:8] == b"00000000"


_WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
done = 0
for i in range(1_000_000):
    done += os.write(fd, b"%07d\\n" % i * 512)
    print(done, flush=True)
"""


def test_kill9_during_writes_loses_no_acknowledged_one(tmp_path: Path) -> None:
    """Appends to a copied-up file, each acknowledged by write(2) returning (writeback off):
    after kill -9 every acknowledged byte is there, and after them at most the one record in
    flight, or a prefix of it. write(2) counts as acknowledging only the bytes it returns: a
    record straddling a page boundary can reach the server as two requests, and when the kill
    falls between them write(2) returns short, the first part written (seen once in ~35 runs:
    4090 of 4096 bytes)."""
    mount = _start(tmp_path)
    target = mount.path / "small"
    try:
        with subprocess.Popen([sys.executable, "-c", _WRITER, str(target)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as child:
            assert child.stdout is not None
            acked = 0
            while acked < 200 * 4096:
                acked = int(child.stdout.readline())
            os.kill(mount.proc.pid, signal.SIGKILL)
            mount.proc.wait()
            for line in child.stdout:
                acked = int(line)
            child.wait(timeout=_TIMEOUT)
    finally:
        stop(mount)
    body = _same_as_kernel_overlay(tmp_path)["small"][-1]
    assert isinstance(body, bytes)
    record = 4096
    assert body.startswith(b"small\n")
    records = body[len(b"small\n"):]
    assert acked <= len(records) <= -(-(acked + 1) // record) * record
    for i in range(-(-len(records) // record)):
        whole = b"%07d\n" % i * 512
        assert records[i * record:(i + 1) * record] == whole[:len(records) - i * record], i
