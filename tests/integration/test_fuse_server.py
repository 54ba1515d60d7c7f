"""The fuse server on real mounts (root, /dev/fuse): overlay's semantics over layers in
overlay's on-disk form, checked through the mount and in the upper it leaves behind, and
finally by kernel overlay mounting that same upper over the same lowers."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imaged.fsutil import FS_XFLAG_EXTSZINHERIT, disk_usage, get_fsxattr, remove_tree
from imaged.fuse.control import saved_usage
from imaged.fuse.server import TIMEOUT
from tests.conftest import ROOT_MKFS, loop_filesystem
from tests.integration.fusebed import Mount, overlay_view, serve
from tests.integration.fusebed import stop as _stop
from tests.integration.fusebed import walk as _walk

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")

_TIMEOUT = 20.0


def _make_layers(tmp: Path) -> list[Path]:
    """Two lowers, top first: the top one whites out ``gone`` and makes ``opq`` opaque."""
    top, base = tmp / "l1", tmp / "l2"
    for layer in (top, base):
        layer.mkdir()
    (base / "a").write_text("base a\n")
    (base / "gone").write_text("hidden\n")
    (base / "keep").write_text("keep\n")
    (base / "dir" / "sub").mkdir(parents=True)
    (base / "dir" / "sub" / "deep").write_text("deep\n")
    (base / "dir" / "low").write_text("low\n")
    (base / "opq").mkdir()
    (base / "opq" / "old").write_text("old\n")
    (base / "h1").write_text("hard\n")
    os.link(base / "h1", base / "h2")
    (base / "pub").mkdir()
    os.chmod(base / "pub", 0o1777)  # noqa: S103 (a /tmp-like dir for the non-root caller)
    (base / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(base / "suid", 0o4777)  # noqa: S103 (suid to be cleared by a write)
    (top / "a").write_text("top a\n")
    os.mknod(top / "gone", stat.S_IFCHR, 0)
    (top / "dir").mkdir()
    (top / "dir" / "upperlayer").write_text("l1\n")
    (top / "opq").mkdir()
    os.setxattr(top / "opq", "trusted.overlay.opaque", b"y")
    (top / "opq" / "new").write_text("new\n")
    os.setxattr(base / "keep", "user.color", b"blue")
    os.setxattr(base / "keep", "trusted.overlay.origin", b"private")
    return [top, base]


def _start(tmp: Path, *extra: str) -> Mount:
    lowers = _make_layers(tmp) if not (tmp / "l1").exists() else [tmp / "l1", tmp / "l2"]
    return serve(lowers, tmp, *extra)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mount]:
    mount = _start(tmp_path)
    try:
        yield mount
    finally:
        _stop(mount)


def _errno(call: object, *args: object) -> int:
    try:
        call(*args)  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_lookup_and_read_through_the_stack(mounted: Mount) -> None:
    m = mounted.path
    assert (m / "a").read_text() == "top a\n"
    assert (m / "dir" / "sub" / "deep").read_text() == "deep\n"
    assert (m / "dir" / "upperlayer").read_text() == "l1\n"


def test_whiteout_and_opaque_hide(mounted: Mount) -> None:
    m = mounted.path
    assert not (m / "gone").exists()
    assert sorted(os.listdir(m / "opq")) == ["new"]
    assert not (m / "opq" / "old").exists()


def test_readdir_merges_without_duplicates(mounted: Mount) -> None:
    m = mounted.path
    assert sorted(os.listdir(m)) == ["a", "dir", "h1", "h2", "keep", "opq", "pub", "suid"]
    assert sorted(os.listdir(m / "dir")) == ["low", "sub", "upperlayer"]


def test_a_lower_directory_listed_again_shows_what_changed_in_it(mounted: Mount) -> None:
    """The server keeps the listing of a directory that is only in lowers: a change in it
    (a new name, a whited-out one, a new directory's own listing) must show at the next
    listing, not the kept one."""
    sub = mounted.path / "dir" / "sub"
    assert os.listdir(sub) == ["deep"]
    assert os.listdir(sub) == ["deep"]
    (sub / "new").write_text("new\n")
    assert sorted(os.listdir(sub)) == ["deep", "new"]
    os.unlink(sub / "deep")
    assert os.listdir(sub) == ["new"]
    os.rename(sub / "new", mounted.path / "dir" / "moved")
    assert os.listdir(sub) == []
    assert sorted(os.listdir(mounted.path / "dir")) == ["low", "moved", "sub", "upperlayer"]


def test_write_copies_up(mounted: Mount) -> None:
    m = mounted.path
    with open(m / "dir" / "low", "a") as f:
        f.write("more\n")
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(m / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (m / "dir" / "low").read_text() == "low\nmore\n"
    assert (mounted.lowers[1] / "dir" / "low").read_text() == "low\n"
    assert (mounted.upper / "dir" / "low").read_text() == "low\nmore\n"
    assert (mounted.upper / "dir" / "low").stat().st_mode == \
        (mounted.lowers[1] / "dir" / "low").stat().st_mode


def _is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_remove_and_make_leave_overlay_marks(mounted: Mount) -> None:
    m, up = mounted.path, mounted.upper
    os.unlink(m / "a")
    assert _is_whiteout(up / "a") and not (m / "a").exists()
    assert _errno(os.rmdir, m / "dir") == errno.ENOTEMPTY
    for name in ("deep",):
        os.unlink(m / "dir" / "sub" / name)
    os.rmdir(m / "dir" / "sub")
    assert _is_whiteout(up / "dir" / "sub")
    os.mkdir(m / "dir" / "sub")
    assert os.getxattr(up / "dir" / "sub", "trusted.overlay.opaque") == b"y"
    assert os.listdir(m / "dir" / "sub") == []
    (m / "fresh").write_text("x")
    os.unlink(m / "fresh")
    assert not os.path.lexists(up / "fresh")


def test_rename(mounted: Mount) -> None:
    m, up = mounted.path, mounted.upper
    assert _errno(os.rename, m / "dir", m / "moved") == errno.EXDEV
    os.rename(m / "keep", m / "kept")
    assert (m / "kept").read_text() == "keep\n" and not (m / "keep").exists()
    assert _is_whiteout(up / "keep")
    os.mkdir(m / "mine")
    (m / "mine" / "f").write_text("f")
    os.rename(m / "mine", m / "yours")
    assert (m / "yours" / "f").read_text() == "f"


def test_hard_links_survive_copy_up(mounted: Mount) -> None:
    m = mounted.path
    before = os.stat(m / "h1").st_ino
    with open(m / "h1", "a") as f:
        f.write("more\n")
    assert (m / "h2").read_text() == "hard\nmore\n"
    assert os.stat(m / "h1").st_ino == os.stat(m / "h2").st_ino == before
    os.link(m / "h2", m / "h3")
    assert os.stat(m / "h3").st_ino == before


def test_special_files(mounted: Mount) -> None:
    m, up = mounted.path, mounted.upper
    os.symlink("a", m / "ln")
    assert os.readlink(m / "ln") == "a" and (m / "ln").read_text() == "top a\n"
    os.mkfifo(m / "fifo")
    assert stat.S_ISFIFO(os.lstat(m / "fifo").st_mode)
    os.mknod(m / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert os.lstat(m / "null").st_rdev == os.makedev(1, 3)
    assert os.lstat(up / "null").st_rdev == os.makedev(1, 3)
    assert _errno(os.mknod, m / "wh", stat.S_IFCHR | 0o600, 0) == errno.EPERM


def test_xattrs_hide_overlay_private_names(mounted: Mount) -> None:
    m = mounted.path
    names = os.listxattr(m / "keep")
    assert "user.color" in names and not any("overlay" in n for n in names)
    assert os.getxattr(m / "keep", "user.color") == b"blue"
    assert _errno(os.getxattr, m / "keep", "trusted.overlay.origin") == errno.EOPNOTSUPP
    os.setxattr(m / "a", "user.x", b"1")
    assert os.getxattr(mounted.upper / "a", "user.x") == b"1"
    assert _errno(os.setxattr, m / "a", "trusted.overlay.opaque", b"y") == errno.EOPNOTSUPP


def test_file_capabilities_of_a_new_file(mounted: Mount) -> None:
    """The server answers a file it made has no capability without asking the upper (the
    kernel asks before every write), until an xattr is set on it; then the capability shows,
    and the kernel's drop of it at the next write reaches the upper."""
    made, upper = mounted.path / "made", mounted.upper / "made"
    made.write_bytes(b"x")
    assert _errno(os.getxattr, made, "security.capability") == errno.ENODATA
    caps = struct.pack("<5I", 0x02000000, 1 << 13, 0, 0, 0)  # revision 2, CAP_NET_RAW
    os.setxattr(made, "security.capability", caps)
    assert os.getxattr(made, "security.capability") == caps
    assert os.getxattr(upper, "security.capability") == caps
    with made.open("r+b") as fh:
        fh.write(b"y")
    assert _errno(os.getxattr, made, "security.capability") == errno.ENODATA
    assert _errno(os.getxattr, upper, "security.capability") == errno.ENODATA


def test_setattr_copies_up(mounted: Mount) -> None:
    m, up = mounted.path, mounted.upper
    os.chmod(m / "keep", 0o600)
    assert stat.S_IMODE(os.stat(m / "keep").st_mode) == 0o600
    assert os.getxattr(up / "keep", "user.color") == b"blue"
    with pytest.raises(OSError):
        os.getxattr(up / "keep", "trusted.overlay.origin")
    os.chown(m / "dir" / "low", 123, 456)
    assert (os.stat(up / "dir" / "low").st_uid, os.stat(up / "dir" / "low").st_gid) == \
        (123, 456)
    os.truncate(m / "a", 2)
    assert (m / "a").read_text() == "to" and (up / "a").read_text() == "to"


def test_statfs(mounted: Mount) -> None:
    assert os.statvfs(mounted.path).f_blocks == os.statvfs(mounted.upper).f_blocks


def _upper_bytes(upper: Path) -> int:
    seen: set[int] = set()
    total = 0
    for path in upper.rglob("*"):
        st = os.lstat(path)
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def test_quota_enospc_from_write(tmp_path: Path) -> None:
    quota = 1 << 20
    mount = _start(tmp_path, "--quota", str(quota))
    try:
        vfs = os.statvfs(mount.path)
        assert vfs.f_blocks * vfs.f_frsize == quota
        fd = os.open(mount.path / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            chunk = b"x" * (64 << 10)
            with pytest.raises(OSError) as raised:
                for _ in range(32):
                    os.write(fd, chunk)
            assert raised.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert _upper_bytes(mount.upper) <= quota
        vfs = os.statvfs(mount.path)
        assert vfs.f_bfree * vfs.f_frsize < 128 << 10
    finally:
        _stop(mount)


def test_quota_and_count_on_xfs_are_the_blocks_written(tmp_path: Path,
                                                       xfs_filesystem: Path) -> None:
    """xfs counts speculative preallocation beyond EOF in ``st_blocks`` and keeps it past
    close for a file appended to in separate opens (as a log is): the server's extent-size hint
    on the upper keeps it out, so such appends fill the quota to its last chunk and the count
    the server leaves is what ``du`` sees of the upper."""
    home = xfs_filesystem / tmp_path.name
    (home / "control").mkdir(parents=True)
    quota = 16 << 20
    try:
        mount = serve(_make_layers(tmp_path), home, "--quota", str(quota), "--control",
                      str(home / "control"))
        try:
            assert get_fsxattr(mount.upper).xflags & FS_XFLAG_EXTSZINHERIT
            chunk, written = b"x" * (1 << 20), 0
            with pytest.raises(OSError) as raised:
                while written <= quota:
                    fd = os.open(mount.path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                 0o644)
                    try:
                        written += os.write(fd, chunk)
                    finally:
                        os.close(fd)
            assert raised.value.errno == errno.ENOSPC
            assert quota - len(chunk) - (64 << 10) <= written < quota
        finally:
            _stop(mount)
        assert mount.proc.returncode == 0
        assert saved_usage(home / "control") == disk_usage(mount.upper)
    finally:
        remove_tree(home)


def test_names_removed_on_btrfs_leave_the_listing(tmp_path: Path) -> None:
    """btrfs lists a directory descriptor kept open as it first saw it, until an explicit
    lseek to 0. The server keeps its upper directories open, so a removed lower name went on
    being listed, and ``mv``'s fallback for an EXDEV rename then found the directory not
    empty."""
    with loop_filesystem(ROOT_MKFS["btrfs"], tmp_path / "btrfs.img", tmp_path / "fs") as fs:
        lower = fs / "lower"
        (lower / "d").mkdir(parents=True)
        for name in ("f0", "f1", "f2"):
            (lower / "d" / name).write_text(name)
        mount = serve([lower], fs / "home")
        try:
            d = mount.path / "d"
            assert sorted(os.listdir(d)) == ["f0", "f1", "f2"]
            os.unlink(d / "f0")
            assert sorted(os.listdir(d)) == ["f1", "f2"]
            os.unlink(d / "f1")
            os.unlink(d / "f2")
            assert os.listdir(d) == []
            subprocess.run(["mv", str(mount.path / "d"), str(mount.path / "e")], check=True)
            assert os.listdir(mount.path) == ["e"]
        finally:
            _stop(mount)


def test_read_only_refuses_changes(tmp_path: Path) -> None:
    mount = _start(tmp_path, "--read-only")
    try:
        m = mount.path
        assert (m / "a").read_text() == "top a\n"
        assert _errno(os.open, m / "a", os.O_WRONLY) == errno.EROFS
        assert _errno(os.mkdir, m / "new") == errno.EROFS
        assert _errno(os.unlink, m / "a") == errno.EROFS
        assert os.listdir(mount.upper) == []
    finally:
        _stop(mount)


def test_caller_credentials_and_umask(mounted: Mount) -> None:
    # The child enters the mount as root, then drops to uid 65534: pytest's temporary
    # directories are 0700 all the way up, and only the mount is under test here.
    script = textwrap.dedent(f"""
        import os
        os.chdir({str(mounted.path)!r})
        os.setgid(65534); os.setgroups([]); os.setuid(65534)
        os.umask(0o027)
        with open("pub/f", "w") as f:
            f.write("mine")
        os.mkdir("pub/d")
        fd = os.open("suid", os.O_WRONLY)
        os.write(fd, b"#")
        os.close(fd)
        try:
            os.open("a", os.O_WRONLY)
        except PermissionError:
            pass
        else:
            raise SystemExit("wrote a root-owned 0644 file")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=_TIMEOUT)
    up = mounted.upper / "pub"
    st = os.stat(up / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)
    assert stat.S_IMODE(os.stat(up / "d").st_mode) == 0o750
    assert not os.stat(mounted.upper / "suid").st_mode & stat.S_ISUID


def test_setgid_directory_inheritance(mounted: Mount) -> None:
    m = mounted.path
    os.mkdir(m / "sg")
    os.chown(m / "sg", 0, 4242)
    os.chmod(m / "sg", 0o2775)  # noqa: S103 (setgid inheritance)
    (m / "sg" / "f").write_text("x")
    os.mkdir(m / "sg" / "d")
    assert os.stat(m / "sg" / "f").st_gid == 4242
    assert os.stat(m / "sg" / "d").st_gid == 4242
    assert os.stat(m / "sg" / "d").st_mode & stat.S_ISGID


def test_refuses_a_lower_under_the_mount_point(tmp_path: Path) -> None:
    (tmp_path / "mnt" / "inside").mkdir(parents=True)
    for name in ("upper", "work"):
        (tmp_path / name).mkdir()
    reader, writer = os.pipe()
    proc = subprocess.run(
        [sys.executable, "-m", "imaged.fuse.serve", "--upper", str(tmp_path / "upper"),
         "--work", str(tmp_path / "work"), "--lower", str(tmp_path / "mnt" / "inside"),
         "--ready-fd", str(writer), str(tmp_path / "mnt")],
        pass_fds=(writer,), capture_output=True, timeout=_TIMEOUT, check=False)
    os.close(writer)
    with os.fdopen(reader, "rb") as ready:
        said = ready.read()
    assert proc.returncode == 1
    assert said.startswith(b"error: ") and b"mount point" in said
    assert not os.path.ismount(tmp_path / "mnt")


def test_kernel_overlay_shows_the_same_tree(tmp_path: Path) -> None:
    mount = _start(tmp_path)
    try:
        m = mount.path
        os.unlink(m / "a")
        with open(m / "dir" / "low", "a") as f:
            f.write("more\n")
        os.unlink(m / "dir" / "sub" / "deep")
        os.rmdir(m / "dir" / "sub")
        os.mkdir(m / "dir" / "sub")
        (m / "dir" / "sub" / "again").write_text("again\n")
        os.rename(m / "keep", m / "kept")
        os.mkdir(m / "opq" / "nd")
        os.symlink("kept", m / "ln")
        os.chmod(m / "pub", 0o700)
        seen = _walk(m)
    finally:
        _stop(mount)
    with overlay_view(mount, tmp_path / "kernel") as merged:
        assert _walk(merged) == seen


def test_sigterm_unmounts(tmp_path: Path) -> None:
    mount = _start(tmp_path)
    try:
        assert os.path.ismount(mount.path)
        mount.proc.send_signal(signal.SIGTERM)
        assert mount.proc.wait(timeout=_TIMEOUT) == 0
        assert not os.path.ismount(mount.path)
    finally:
        _stop(mount)


def test_absent_names_are_cached_and_requests_counted(tmp_path: Path) -> None:
    """A name in no layer costs one LOOKUP however often it is missed (a negative entry with
    the entry timeout), and made through the mount it is there at once; ``--count-requests``
    leaves what the server answered, by operation, when it exits."""
    counts = tmp_path / "counts.json"
    mount = _start(tmp_path, "--count-requests", str(counts))
    try:
        started = time.monotonic()
        for _ in range(5):
            assert _errno(os.stat, mount.path / "missing") == errno.ENOENT
        (mount.path / "missing").write_text("now\n")
        elapsed = time.monotonic() - started
        assert (mount.path / "missing").read_text() == "now\n"
    finally:
        _stop(mount)
    answered = json.loads(counts.read_text())
    assert answered["create"] == 1
    # A stall past the timeout (a loaded machine) lets the kernel ask again; never more.
    assert answered["lookup"] == 1 or (elapsed >= TIMEOUT and answered["lookup"] <= 6)


def test_root_and_directory_copy_up_keep_metadata(mounted: Mount) -> None:
    m, up = mounted.path, mounted.upper
    os.setxattr(mounted.lowers[1] / "dir", "user.tag", b"d")
    os.setxattr(m, "user.root", b"r")
    assert os.getxattr(m, "user.root") == b"r" and os.getxattr(up, "user.root") == b"r"
    (m / "dir" / "new").write_text("n")  # copies up dir/ from the top lower
    assert (up / "dir" / "new").exists()
    low = os.stat(mounted.lowers[0] / "dir")
    assert os.stat(up / "dir").st_mtime_ns != 0
    assert stat.S_IMODE(os.stat(up / "dir").st_mode) == stat.S_IMODE(low.st_mode)


def test_copy_up_keeps_holes_and_happens_once(tmp_path: Path) -> None:
    mounted = _start(tmp_path, "--copy-up", "full")
    try:
        _check_full_copy_up(mounted)
    finally:
        _stop(mounted)


def _check_full_copy_up(mounted: Mount) -> None:
    lower = mounted.lowers[1] / "sparse"
    with open(lower, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data")
    script = textwrap.dedent(f"""
        import os, threading
        def write(i):
            fd = os.open({str(mounted.path / "sparse")!r}, os.O_WRONLY)
            os.pwrite(fd, b"%d" % i, i)
            os.close(fd)
        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=_TIMEOUT)
    upper = mounted.upper / "sparse"
    assert upper.stat().st_size == 64 << 20
    assert upper.stat().st_blocks * 512 < 1 << 20
    with open(mounted.path / "sparse", "rb") as f:
        assert f.read(8) == b"01234567"
        f.seek(32 << 20)
        assert f.read(4) == b"data"
    assert os.listdir(mounted.work) == []


def test_start_clears_a_crashed_copy_up(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "#imaged-1-1").write_bytes(b"half a copy")
    (tmp_path / "work" / "#imaged-1-2").mkdir()
    mount = _start(tmp_path)
    try:
        assert os.listdir(mount.work) == []
    finally:
        _stop(mount)


def test_names_over_upper_whiteouts(mounted: Mount) -> None:
    m, up = mounted.path, mounted.upper
    for name in ("a", "keep", "h1"):
        os.unlink(m / name)
    (m / "f").write_text("f")
    os.rename(m / "f", m / "a")  # onto a whiteout: the file replaces it
    assert (m / "a").read_text() == "f" and (up / "a").read_text() == "f"
    os.mkdir(m / "d")
    os.rename(m / "d", m / "keep")  # a directory cannot replace a device: swapped, then gone
    assert stat.S_ISDIR(os.stat(up / "keep").st_mode) and os.listdir(m / "keep") == []
    os.link(m / "a", m / "h1")
    assert os.stat(m / "h1").st_ino == os.stat(m / "a").st_ino
    os.rename(m / "dir" / "low", m / "opq" / "low")  # a lower file: a whiteout stays behind
    assert _is_whiteout(up / "dir" / "low") and (m / "opq" / "low").read_text() == "low\n"
    assert sorted(os.listdir(m)) == ["a", "dir", "h1", "h2", "keep", "opq", "pub", "suid"]
