"""Partial copy-up on real mounts (issue 14, slice 4): a written lower file becomes a sparse
upper plus a range record; reads mix upper and lower bytes as the record says, the record
survives remounts and kill -9, the quota sees only what was copied, and once materialised the
upper is one kernel overlay shows as the same tree."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imaged.config import Config
from imaged.drivers.fuse import FuseDriver
from imaged.errors import NoSpaceError
from imaged.fuse import control, partial, ranges
from imaged.fuse.server import can_reflink
from tests.integration.fusebed import Mount
from tests.integration.fusebed import stop as _stop
from tests.integration.fusebed import walk as _walk
from tests.integration.test_fuse_server import _start

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")

SIZE = (1 << 20) + 1234  # not a whole number of blocks: the last block is partial
_TIMEOUT = 20.0


def _lowers(tmp: Path, size: int = SIZE) -> bytes:
    """l1 (top, a small file) over l2 (``big``, random bytes, and a hard link of it)."""
    top, base = tmp / "l1", tmp / "l2"
    (base / "dir").mkdir(parents=True)
    top.mkdir()
    data = random.Random(1).randbytes(size)  # noqa: S311 - reproducible data, not a secret
    (base / "dir" / "big").write_bytes(data)
    (base / "small").write_bytes(b"small\n")
    (top / "note").write_text("top\n")
    return data


def _mount(tmp: Path, *extra: str, size: int = SIZE) -> tuple[Mount, bytearray]:
    data = _lowers(tmp, size) if not (tmp / "l1").exists() else (tmp / "l2/dir/big").read_bytes()
    return _start(tmp, "--copy-up", "partial", *extra), bytearray(data)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Mount, bytearray]]:
    mount, model = _mount(tmp_path)
    try:
        yield mount, model
    finally:
        _stop(mount)


def _is_partial(mount: Mount, name: str) -> bool:
    upper = mount.upper / name
    try:
        marked = os.getxattr(upper, partial.MARKER) == partial.MARKER_VALUE
    except OSError:
        marked = False
    logged = str(upper.stat().st_ino) in os.listdir(mount.work / "ranges")
    assert marked == logged, "mark and log disagree"
    return marked


def _pwrite(path: Path, model: bytearray, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)
    if off > len(model):
        model.extend(bytes(off - len(model)))
    model[off:off + len(data)] = data


def test_reads_and_writes_at_block_edges(mounted: tuple[Mount, bytearray]) -> None:
    mount, model = mounted
    big = mount.path / "dir" / "big"
    for off, length in ((0, 1), (4095, 2), (8192, 4096), (10_000, 20_000), (SIZE - 1, 1),
                        (SIZE - 10, 100)):
        _pwrite(big, model, off, bytes([off % 251 + 1]) * length)
    assert _is_partial(mount, "dir/big")
    assert (mount.upper / "dir" / "big").stat().st_blocks * 512 < 128 << 10
    fd = os.open(big, os.O_RDONLY)
    try:
        for off, length in ((0, 10), (4090, 20), (12_285, 8), (29_990, 5000), (SIZE - 20, 200),
                            (500_000, 300_000), (0, len(model) + 10)):
            assert os.pread(fd, length, off) == model[off:off + length], (off, length)
    finally:
        os.close(fd)
    assert (mount.lowers[1] / "dir" / "big").stat().st_size == SIZE


def test_truncate_shrink_then_regrow_reads_zeros(mounted: tuple[Mount, bytearray]) -> None:
    mount, model = mounted
    big = mount.path / "dir" / "big"
    os.truncate(big, 100)
    os.truncate(big, 5000)
    del model[100:]
    model.extend(bytes(4900))
    assert big.read_bytes() == model
    _pwrite(big, model, 8000, b"end")
    assert big.read_bytes() == model
    assert bytes(model[100:8000]) == bytes(7900)


def test_append_past_the_lower_size(mounted: tuple[Mount, bytearray]) -> None:
    mount, model = mounted
    with open(mount.path / "dir" / "big", "ab") as f:
        f.write(b"appended")
    model.extend(b"appended")
    assert (mount.path / "dir" / "big").read_bytes() == model
    assert _is_partial(mount, "dir/big")


def test_shared_writable_mmap(mounted: tuple[Mount, bytearray]) -> None:
    mount, model = mounted
    big = mount.path / "dir" / "big"
    with open(big, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        mapped[70_000:70_005] = b"mmap!"
        mapped.flush()
    model[70_000:70_005] = b"mmap!"
    assert big.read_bytes() == model


def test_remount_keeps_partial_state(tmp_path: Path) -> None:
    mount, model = _mount(tmp_path)
    try:
        _pwrite(mount.path / "dir" / "big", model, 300_000, b"before remount")
        os.truncate(mount.path / "dir" / "big", 900_000)
        del model[900_000:]
    finally:
        _stop(mount)
    assert _is_partial(mount, "dir/big")
    log = mount.work / "ranges" / str((mount.upper / "dir" / "big").stat().st_ino)
    with open(log, "ab") as f:  # a long history of writes, then half an entry: a kill's
        f.write(ranges.encode_add(300_000 // 4096 * 4096, 303_104) * 4000)
        f.write(ranges.encode_add(0, 4096)[:10])
    mount, _ = _mount(tmp_path)
    try:
        big = mount.path / "dir" / "big"
        assert big.read_bytes() == model  # the torn entry recorded nothing
        assert log.stat().st_size < 1024  # compacted as it was replayed
        _pwrite(big, model, 5, b"after")
        assert big.read_bytes() == model
    finally:
        _stop(mount)
    with open(log, "ab") as f:
        f.write(ranges.encode_add(0, 4096)[:10])  # torn again, in a short log: cut, not lost
    for _ in range(2):
        mount, _ = _mount(tmp_path)
        try:
            big = mount.path / "dir" / "big"
            assert big.read_bytes() == model
            _pwrite(big, model, 600_000, b"appended after the cut")
        finally:
            _stop(mount)


_WRITER = textwrap.dedent("""
    import os, random, sys
    path, size = sys.argv[1], int(sys.argv[2])
    rng = random.Random(5)
    fd = os.open(path, os.O_WRONLY)
    for i in range(100000):
        off, n = rng.randrange(size + 8192), rng.randrange(1, 9000)
        data = rng.randbytes(n)
        os.write(1, b"w %d\\n" % i)
        try:
            os.pwrite(fd, data, off)
        except OSError:
            sys.exit(0)
        os.write(1, b"a %d\\n" % i)
""")


def _writes() -> Iterator[tuple[int, bytes]]:
    """The writer's sequence, replayed."""
    rng = random.Random(5)  # noqa: S311 - the writer's sequence again, not a secret
    while True:
        off, n = rng.randrange(SIZE + 8192), rng.randrange(1, 9000)
        yield off, rng.randbytes(n)


def test_kill9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    mount, model = _mount(tmp_path)
    big = mount.path / "dir" / "big"
    with subprocess.Popen([sys.executable, "-c", _WRITER, str(big), str(SIZE)],
                          stdout=subprocess.PIPE) as writer:
        try:
            assert writer.stdout is not None
            acked = -1
            while acked < 60:
                line = writer.stdout.readline().split()
                if line and line[0] == b"a":
                    acked = int(line[1])
            os.kill(mount.proc.pid, signal.SIGKILL)
            mount.proc.wait()
            for raw in writer.stdout:
                if raw.split()[0] == b"a":
                    acked = int(raw.split()[1])
            writer.wait(timeout=_TIMEOUT)
        finally:
            if writer.poll() is None:
                writer.kill()
            _stop(mount)
    writes = _writes()
    for _ in range(acked + 1):
        off, data = next(writes)
        if off > len(model):
            model.extend(bytes(off - len(model)))
        model[off:off + len(data)] = data
    maybe_off, maybe = next(writes)  # in flight at the kill: old or new bytes, nothing else
    mount, _ = _mount(tmp_path)
    try:
        seen = (mount.path / "dir" / "big").read_bytes()
    finally:
        _stop(mount)
    end = maybe_off + len(maybe)
    assert seen[:maybe_off] == model[:maybe_off]
    assert seen[end:] == model[end:]
    assert len(seen) in (len(model), max(len(model), end))
    for i in range(maybe_off, min(end, len(seen))):
        before = model[i] if i < len(model) else 0
        assert seen[i] in (before, maybe[i - maybe_off]), i


def test_quota_charges_only_copied_bytes_and_materialize(tmp_path: Path) -> None:
    size = 8 << 20
    control_dir = tmp_path / "ctl"
    control_dir.mkdir()
    mount, model = _mount(tmp_path, "--quota", str(1 << 20), "--control", str(control_dir),
                          size=size)
    try:
        big = mount.path / "dir" / "big"
        _pwrite(big, model, 4 << 20, b"q" * 4096)  # a full copy would need 8 MiB
        used = control.ask(control_dir, {"op": "usage"})["used"]
        assert used < 64 << 10
        refused = control.ask(control_dir, {"op": "materialize"})
        assert "grow the quota" in refused["error"]
        assert _is_partial(mount, "dir/big")
        assert control.ask(control_dir, {"op": "set_quota", "quota": 16 << 20}) == {"ok": True}
        done = control.ask(control_dir, {"op": "materialize"})
        assert done["ok"] and done["files"] == 1
        assert not _is_partial(mount, "dir/big")
        assert big.read_bytes() == model
        used = control.ask(control_dir, {"op": "usage"})["used"]
        assert size <= used < size + (1 << 20)
    finally:
        _stop(mount)


def test_materialize_then_kernel_overlay_shows_the_same_tree(tmp_path: Path) -> None:
    mount, model = _mount(tmp_path)
    try:
        m = mount.path
        _pwrite(m / "dir" / "big", model, 123_456, b"materialise me")
        os.rename(m / "dir" / "big", m / "moved")
        os.link(m / "moved", m / "dir" / "again")
        seen = _walk(m)
    finally:
        _stop(mount)
    assert _is_partial(mount, "moved")
    merged, work2 = tmp_path / "merged", tmp_path / "work2"
    merged.mkdir()
    work2.mkdir()
    options = (f"lowerdir={':'.join(str(p) for p in mount.lowers)},upperdir={mount.upper},"
               f"workdir={work2}")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                   check=True)
    try:  # a partial file is never shown as complete: overlay refuses it
        with pytest.raises(OSError) as refused:
            (merged / "moved").read_bytes()
        assert refused.value.errno in (errno.EIO, errno.EPERM)
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY)
           for p in (mount.upper, mount.work, *mount.lowers)]
    try:
        done = partial.materialize(fds[0], fds[1], fds[2:], quota=None, usage=0)
    finally:
        for fd in fds:
            os.close(fd)
    assert done.files == 1
    assert not _is_partial(mount, "moved") and os.listdir(mount.work / "ranges") == []
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                   check=True)
    try:
        assert _walk(merged) == seen
        assert (merged / "moved").read_bytes() == model
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


def test_hard_link_of_a_partial_file(mounted: tuple[Mount, bytearray]) -> None:
    mount, model = mounted
    m = mount.path
    _pwrite(m / "dir" / "big", model, 1000, b"one")
    os.link(m / "dir" / "big", m / "twin")
    _pwrite(m / "twin", model, 2000, b"two")
    assert os.stat(m / "twin").st_ino == os.stat(m / "dir" / "big").st_ino
    assert (m / "dir" / "big").read_bytes() == model
    os.unlink(m / "dir" / "big")
    assert (m / "twin").read_bytes() == model
    assert _is_partial(mount, "twin")
    with open(m / "twin", "rb") as held:
        os.unlink(m / "twin")
        assert held.read() == model  # still open: still read through its record
    # FUSE sends RELEASE after close(2) returns: wait for the server to drop the log.
    deadline = time.monotonic() + _TIMEOUT
    while os.listdir(mount.work / "ranges") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.listdir(mount.work / "ranges") == []


def test_auto_copies_large_files_by_range(tmp_path: Path) -> None:
    _lowers(tmp_path)
    mount = _start(tmp_path, "--copy-up", "auto", "--partial-threshold", str(64 << 10))
    try:
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (mount.work, mount.lowers[1])]
        try:
            clones = can_reflink(fds[0], fds[1:])[0]
        finally:
            for fd in fds:
                os.close(fd)
        for name in ("dir/big", "small"):
            with open(mount.path / name, "r+b") as f:
                f.write(b"x")
        assert _is_partial(mount, "dir/big") is not clones  # a reflink where it can
        assert not _is_partial(mount, "small")
    finally:
        _stop(mount)


def test_writeback_cache(tmp_path: Path) -> None:
    mount, model = _mount(tmp_path, "--writeback")
    try:
        big = mount.path / "dir" / "big"
        fd = os.open(big, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"tail")
            os.fsync(fd)
        finally:
            os.close(fd)
        model.extend(b"tail")
        _pwrite(big, model, 77, b"mid")
        assert big.read_bytes() == model
    finally:
        _stop(mount)


def test_the_driver_counts_and_materializes(tmp_path: Path) -> None:
    """drivers/fuse.py: the settings reach the server, ps counts partial files, and update
    --materialize completes them mounted (refused while the quota is too small) and not."""
    config = Config(root=tmp_path, drivers={"fuse": {"copy_up": "partial"}})
    driver = FuseDriver(config, tmp_path / "fuse")
    data = random.Random(3).randbytes(4 << 20)  # noqa: S311 - reproducible data, not a secret
    (driver.prepare_layer("base", None) / "big").write_bytes(data)
    model = bytearray(data)
    model[100:104] = b"edit"
    for name, mounted in (("online", True), ("offline", False)):
        driver.create_container(name, ["base"], quota=1 << 20, read_only=False)
        path = driver.mount(name, ["base"], False, None).path
        try:
            with open(path / "big", "r+b") as f:
                f.seek(100)
                f.write(b"edit")
            assert driver.usage(name).partial_files == 1
            if mounted:
                with pytest.raises(NoSpaceError, match="grow the quota"):
                    driver.materialize(name, ["base"], True)
                driver.resize_quota(name, 8 << 20, True)
                driver.materialize(name, ["base"], True)
        finally:
            driver.unmount(name, None)
        if not mounted:
            with pytest.raises(NoSpaceError, match="grow the quota"):
                driver.materialize(name, ["base"], False)
            driver.resize_quota(name, 8 << 20, False)
            driver.materialize(name, ["base"], False)
        usage = driver.usage(name)
        assert usage.partial_files == 0 and usage.used >= len(data)
        upper = tmp_path / "fuse" / "containers" / name / "upper" / "big"
        assert upper.read_bytes() == model
