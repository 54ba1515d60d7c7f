"""Loop-backed quotas on the real kernel (DESIGN §3 "Quotas", the mechanism for any kernel).

The contract: a container created with quota Q can write Q bytes (within 2 MiB) and the next
write fails with ENOSPC; the quota's space is reserved on the host, so a host that fills loses
no acknowledged write, and a quota the host cannot back is refused with the numbers; deleting
files frees space in the container; usage is within 5% of ``du``; growing and shrinking keep
the data; nothing is left mounted or bound. Every filesystem a test makes is torn down by the
fixture, failing or not.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imaged.errors import ConflictError, NoSpaceError, NotFoundError
from imaged.host import loopdev
from imaged.quota import ext4layout as ext4
from imaged.quota import loopquota as lq
from tests.conftest import hog, loop_filesystem, need_tools

MiB, GiB = 1024**2, 1024**3
MNT_DETACH = 2
LAZYINIT_SECONDS = 4.0  # ext4lazyinit had zeroed (and so punched) within this in the guest
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(autouse=True)
def _root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no /dev/loop-control: the loop module is not loaded")
    need_tools("mkfs.ext4", "e2fsck", "resize2fs")


def bound_to(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image``, read straight from sysfs."""
    wanted = os.path.realpath(image)
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            if (entry / "loop" / "backing_file").read_text().rstrip("\n") == wanted:
                found.append(entry.name)
    return found


def mounted_points() -> set[str]:
    return {line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


def gone(fs: lq.LoopFS, timeout: float = 5.0) -> bool:
    """Nothing mounted at the mount point and no device bound to the image (autoclear can trail
    the unmount by a moment)."""
    deadline = time.monotonic() + timeout
    while bound_to(fs.image) or str(fs.mount_point) in mounted_points():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def force_cleanup(image: Path) -> None:
    """The last resort when the code under test failed: lazy unmounts, LOOP_CLR_FD, unlink."""
    for name in bound_to(image):
        dev = (Path("/sys/block") / name / "dev").read_text().strip()
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" ")
            if fields[2] == dev:
                _libc.umount2(os.fsencode(fields[4]), MNT_DETACH)
        with contextlib.suppress(OSError):
            fd = os.open(f"/dev/{name}", os.O_RDONLY)
            try:
                fcntl.ioctl(fd, loopdev.LOOP_CLR_FD)
            finally:
                os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        image.unlink()


@pytest.fixture
def make_fs(tmp_path: Path) -> Iterator[Callable[..., lq.LoopFS]]:
    """``make_fs(quota)`` creates and mounts a loop filesystem; all are removed afterwards."""
    made: list[lq.LoopFS] = []

    def make(quota: int, name: str = "c") -> lq.LoopFS:
        fs = lq.LoopFS(tmp_path / f"{name}.img", tmp_path / f"{name}-mnt")
        made.append(fs)
        return lq.create(fs.image, fs.mount_point, quota)

    try:
        yield make
    finally:
        failures = []
        for fs in made:
            try:
                lq.remove(fs)
            except Exception as exc:  # noqa: BLE001 - clean up everything, report after
                failures.append(f"{fs.image}: {exc}")
            finally:
                force_cleanup(fs.image)
        assert not failures, failures


def fill(directory: Path, name: str = "fill", chunk: int = MiB) -> int:
    """Write into a new file until the filesystem refuses; return the bytes written.

    1 MiB writes first (the way a container fills a disk), then 4 KiB ones: near full, ext4
    refuses a large write whole rather than writing part of it, and the quota promise is about
    bytes, not write sizes.
    """
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    written = 0
    try:
        for size in (chunk, 4096):
            buf = os.urandom(size)
            while True:
                try:
                    written += os.write(fd, buf)
                except OSError as exc:
                    assert exc.errno in (errno.ENOSPC, errno.EDQUOT), exc
                    break
        # Whatever comes next fails too: the quota is reached, not a write size.
        with pytest.raises(OSError) as refused:
            os.write(fd, b"x")
            os.fsync(fd)
        assert refused.value.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        os.close(fd)
    return written


def write_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def in_window(capacity: int, quota: int) -> bool:
    return quota <= capacity < quota + 2 * MiB


# -- the quota promise ---------------------------------------------------------------------------


@pytest.mark.parametrize("quota", [ext4.MIN_QUOTA, 16 * MiB, 64 * MiB, 300 * MiB],
                         ids=["min", "16M", "64M", "300M"])
def test_quota_can_be_written_and_no_more(make_fs: Callable[..., lq.LoopFS],
                                          quota: int) -> None:
    fs = make_fs(quota)
    st = os.statvfs(fs.mount_point)
    assert quota <= st.f_bavail * st.f_frsize < quota + 2 * MiB
    space = lq.usage(fs)
    assert in_window(space.capacity, quota)
    assert space.used < 64 * 1024  # a fresh filesystem: root directory and lost+found
    written = fill(fs.mount_point)
    assert quota <= written <= quota + 2 * MiB, (written - quota) / MiB
    assert allocated(fs.image) >= os.path.getsize(fs.image)  # reserved on the host


def test_deleting_frees_space_in_the_container_and_the_host_keeps_the_reservation(
        make_fs: Callable[..., lq.LoopFS]) -> None:
    quota = 64 * MiB
    fs = make_fs(quota)
    reserved = allocated(fs.image)
    assert reserved >= os.path.getsize(fs.image) >= quota
    first = fill(fs.mount_point, "a")
    (fs.mount_point / "a").unlink()
    os.sync()
    second = fill(fs.mount_point, "b")
    assert abs(second - first) <= 256 * 1024
    assert allocated(fs.image) >= reserved  # no discard punches the reservation out


def test_a_full_host_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """The host fills up under a container: its writes still land, since its space was
    reserved; and a quota the host cannot back is refused, with the numbers."""
    with loop_filesystem(["mkfs.ext4", "-q", "-F", "-m", "0"], tmp_path / "host.img",
                         tmp_path / "host", size=256 * MiB) as host:
        fs = lq.create(host / "c.img", host / "c-mnt", 32 * MiB)
        try:
            hog(host / "hog")
            assert os.statvfs(host).f_bavail == 0
            data = os.urandom(10 * MiB)
            fd = os.open(fs.mount_point / "data", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                assert os.write(fd, data) == len(data)
                os.fsync(fd)
            finally:
                os.close(fd)
            lq.unmount(fs)  # read back from the image, not the page cache
            lq.mount(fs)
            assert (fs.mount_point / "data").read_bytes() == data
            with pytest.raises(NoSpaceError, match=r"needs \d+\.\d MiB reserved there and "
                                                   r"0 B is free"):
                lq.create(host / "d.img", host / "d-mnt", 64 * MiB)
            assert not (host / "d.img").exists()
            lq.unmount(fs)
            with pytest.raises(NoSpaceError, match="reserved there"):
                lq.resize(fs, 512 * MiB, mounted=False)  # a grow reserves first, too
            lq.mount(fs)
            assert (fs.mount_point / "data").read_bytes() == data
        finally:
            lq.remove(fs)


def test_mounting_a_sparse_image_reserves_it(make_fs: Callable[..., lq.LoopFS]) -> None:
    """Images an older imaged made sparse get their reservation when next mounted."""
    fs = make_fs(64 * MiB)
    lq.unmount(fs)
    sparse = fs.image.with_name("sparse.img")
    subprocess.run(["cp", "--sparse=always", str(fs.image), str(sparse)], check=True,
                   timeout=60)
    sparse.rename(fs.image)
    assert allocated(fs.image) < 32 * MiB
    lq.mount(fs)
    assert allocated(fs.image) >= os.path.getsize(fs.image)


def test_usage_is_within_five_percent_of_du(make_fs: Callable[..., lq.LoopFS]) -> None:
    fs = make_fs(64 * MiB)
    for i, size in enumerate([5 * MiB, 3 * MiB + 123, 700 * 1024, 1]):
        write_file(fs.mount_point / f"f{i}", size)
    small = fs.mount_point / "many"
    small.mkdir()
    for i in range(300):
        (small / f"s{i}").write_bytes(b"x" * (i * 37 % 9000))
    os.sync()
    space = lq.usage(fs)
    expected = du(fs.mount_point)
    assert abs(space.used - expected) <= expected * 0.05, (space.used, expected)
    assert in_window(space.capacity, 64 * MiB)
    # Unmounted, usage mounts the filesystem read-only for a moment and says the same.
    lq.unmount(fs)
    assert gone(fs)
    assert lq.usage(fs) == space
    assert gone(fs)
    assert not [p for p in fs.image.parent.iterdir() if ".measure-" in p.name]


# -- resizing ------------------------------------------------------------------------------------


def _has_cap_sys_resource() -> bool:
    return lq.has_capability(Path("/proc/self/status").read_text(), lq.CAP_SYS_RESOURCE)


@pytest.mark.skipif(not _has_cap_sys_resource(),
                    reason="ext4 online resize needs CAP_SYS_RESOURCE, which this root lacks")
def test_grow_online_then_write_more(make_fs: Callable[..., lq.LoopFS]) -> None:
    # No larger: the guest's /tmp is RAM, shared with the guest tier's other tests, and must
    # hold the whole reservation (an 80 MiB quota's image is 94 MiB; a 112 MiB one's, 131 MiB,
    # did not fit). Still five 16 MiB block groups added online.
    grown = 80 * MiB
    fs = make_fs(16 * MiB)
    kept = write_file(fs.mount_point / "kept", 10 * MiB)
    lq.resize(fs, grown, mounted=True)
    assert str(fs.mount_point) in mounted_points()
    space = lq.usage(fs)
    assert in_window(space.capacity, grown)
    assert space.inodes >= grown // ext4.INODE_RATIO  # online growth adds inodes too
    # ext4lazyinit zeroes the new groups' inode tables in the background, a few seconds on;
    # through the loop device that punched holes in the image (4 MiB here) until the mount
    # took noinit_itable.
    time.sleep(LAZYINIT_SECONDS)
    assert allocated(fs.image) >= os.path.getsize(fs.image)  # reserved before it grew
    write_file(fs.mount_point / "more", 60 * MiB)  # far past the old quota
    assert digest(fs.mount_point / "kept") == kept
    # The same quota after a remount: the kernel's reservation was set as a mount sets it.
    lq.unmount(fs)
    lq.mount(fs)
    assert in_window(lq.usage(fs).capacity, grown)


@pytest.mark.skipif(_has_cap_sys_resource(), reason="this process may resize ext4 online")
def test_grow_online_without_cap_sys_resource_says_what_to_do(
        make_fs: Callable[..., lq.LoopFS]) -> None:
    fs = make_fs(16 * MiB)
    with pytest.raises(ConflictError, match=r"CAP_SYS_RESOURCE.*unmount the container"):
        lq.resize(fs, 64 * MiB, mounted=True)
    assert in_window(lq.usage(fs).capacity, 16 * MiB)  # nothing changed
    assert os.path.getsize(fs.image) < 32 * MiB


def test_grow_offline_from_16M_to_2G(make_fs: Callable[..., lq.LoopFS]) -> None:
    fs = make_fs(16 * MiB)
    kept = write_file(fs.mount_point / "kept", 10 * MiB)
    lq.unmount(fs)
    lq.resize(fs, 2 * GiB, mounted=False)
    lq.mount(fs)
    assert digest(fs.mount_point / "kept") == kept
    assert in_window(lq.usage(fs).capacity, 2 * GiB)
    write_file(fs.mount_point / "more", 100 * MiB)  # far past the old quota
    assert allocated(fs.image) >= os.path.getsize(fs.image) > 2 * GiB  # grown and reserved
    lq.unmount(fs)
    check = subprocess.run(["e2fsck", "-f", "-n", str(fs.image)], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def make_files(directory: Path, size: int = 0) -> int:
    """Make files of ``size`` bytes until the filesystem refuses; return how many were made."""
    directory.mkdir()
    data = b"x" * size
    made = 0
    while True:
        try:
            fd = os.open(directory / str(made), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return made
        try:
            os.write(fd, data)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return made
        finally:
            os.close(fd)
        made += 1


def test_inodes_follow_the_quota_and_grow_with_it(make_fs: Callable[..., lq.LoopFS]) -> None:
    """One inode per 4 KiB of quota (docs/drivers.md): files with data run out of bytes first;
    only blockless ones (here empty files) can run out of inodes, and growing adds inodes."""
    fs = make_fs(16 * MiB)
    fresh = lq.usage(fs)
    assert fresh.inodes >= 16 * MiB // ext4.INODE_RATIO
    small = make_files(fs.mount_point / "small", size=1)
    after = lq.usage(fs)
    assert small > 3000  # each took a block: about the quota's 4 KiB blocks
    assert after.available < 64 * 1024 and after.inodes_used < after.inodes  # bytes ran out
    shutil.rmtree(fs.mount_point / "small")

    empty = make_files(fs.mount_point / "empty")
    full = lq.usage(fs)
    assert full.inodes_used == full.inodes  # inodes ran out
    assert empty == fresh.inodes - fresh.inodes_used - 1  # all of them (the directory took one)

    lq.unmount(fs)
    lq.resize(fs, 64 * MiB, mounted=False)
    lq.mount(fs)
    grown = lq.usage(fs)
    assert grown.inodes >= 64 * MiB // ext4.INODE_RATIO
    assert make_files(fs.mount_point / "more") == grown.inodes - grown.inodes_used - 1


def test_shrink_is_refused_below_usage_and_while_mounted(
        make_fs: Callable[..., lq.LoopFS]) -> None:
    fs = make_fs(64 * MiB)
    write_file(fs.mount_point / "big", 40 * MiB)
    with pytest.raises(ConflictError, match="already uses"):
        lq.resize(fs, 32 * MiB, mounted=True)
    with pytest.raises(ConflictError, match="must be unmounted to shrink"):
        lq.resize(fs, 48 * MiB, mounted=True)
    # A caller that wrongly believes it unmounted is refused all the same.
    with pytest.raises(ConflictError, match="must be unmounted to shrink"):
        lq.resize(fs, 48 * MiB, mounted=False)
    lq.unmount(fs)
    with pytest.raises(ConflictError, match="already uses"):
        lq.resize(fs, 32 * MiB, mounted=False)
    lq.mount(fs)
    assert in_window(lq.usage(fs).capacity, 64 * MiB)


def test_shrink_offline_keeps_data_and_enforces_the_new_quota(
        make_fs: Callable[..., lq.LoopFS]) -> None:
    fs = make_fs(300 * MiB)
    kept = write_file(fs.mount_point / "kept", 20 * MiB)
    lq.unmount(fs)
    lq.resize(fs, 64 * MiB, mounted=False)
    # 64 MiB, a sixteenth for inode tables, and what the 300 MiB filesystem keeps: its journal
    # and the descriptor blocks reserved for growth.
    assert os.path.getsize(fs.image) < 90 * MiB
    lq.mount(fs)
    assert digest(fs.mount_point / "kept") == kept
    space = lq.usage(fs)
    assert in_window(space.capacity, 64 * MiB)
    more = fill(fs.mount_point)
    assert 64 * MiB <= space.used + more <= 66 * MiB
    # Resizing to the quota it has is a no-op, mounted or not.
    lq.resize(fs, 64 * MiB, mounted=True)


# -- lifecycle and recovery ----------------------------------------------------------------------


def test_unmount_and_mount_keep_data_and_quota(make_fs: Callable[..., lq.LoopFS]) -> None:
    fs = make_fs(16 * MiB)
    kept = write_file(fs.mount_point / "kept", 3 * MiB)
    before = lq.usage(fs)
    lq.mount(fs)  # already mounted: nothing happens
    assert len(bound_to(fs.image)) == 1
    lq.unmount(fs)
    assert gone(fs)
    lq.unmount(fs)  # idempotent
    lq.mount(fs)
    assert digest(fs.mount_point / "kept") == kept
    assert lq.usage(fs) == before
    assert len(bound_to(fs.image)) == 1


def test_a_lazy_unmount_leaves_the_device_to_the_open_files(
        make_fs: Callable[..., lq.LoopFS]) -> None:
    """``umount --force``: refused while a file is open, then detached; the file still writes.
    A mount meanwhile mounts the same device again, sharing the detached filesystem (one
    filesystem over the image's blocks, not a second device's), so both see each other's
    writes; an offline resize is refused while the detached mount lives; a removal keeps the
    image and names the device; once the file closes the device unbinds itself."""
    fs = make_fs(16 * MiB)
    held = os.open(fs.mount_point / "held", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(ConflictError):
            lq.unmount(fs)
        lq.unmount(fs, lazy=True)
        assert str(fs.mount_point) not in mounted_points() and len(bound_to(fs.image)) == 1
        os.write(held, b"after the detach")
        assert [device.path.name for device in lq.held(fs)] == bound_to(fs.image)
        with pytest.raises(ConflictError, match="forced umount"):
            lq.resize(fs, 32 * MiB, mounted=False)
        lq.mount(fs)
        assert len(bound_to(fs.image)) == 1
        assert (fs.mount_point / "held").read_bytes() == b"after the detach"
        os.write(held, b", and after the mount")
        assert (fs.mount_point / "held").read_bytes() == b"after the detach, and after the mount"
        lq.unmount(fs)  # this mount is not busy; the detached one keeps the device
        assert len(bound_to(fs.image)) == 1
        assert [device.path.name for device in lq.remove(fs)] == bound_to(fs.image)
        assert fs.image.exists()
    finally:
        os.close(held)
    assert gone(fs)
    lq.mount(fs)
    assert (fs.mount_point / "held").read_bytes() == b"after the detach, and after the mount"
    assert len(bound_to(fs.image)) == 1


def test_remove_leaves_no_mount_no_device_no_image(make_fs: Callable[..., lq.LoopFS]) -> None:
    fs = make_fs(16 * MiB)
    write_file(fs.mount_point / "f", MiB)
    lq.remove(fs)
    assert gone(fs)
    assert not fs.image.exists()
    assert not fs.mount_point.exists()
    lq.remove(fs)  # idempotent
    with pytest.raises(NotFoundError):
        lq.mount(fs)


def test_a_forgotten_filesystem_is_found_by_its_backing_file_and_cleaned(
        make_fs: Callable[..., lq.LoopFS], tmp_path: Path) -> None:
    fs = make_fs(16 * MiB)
    kept = write_file(fs.mount_point / "kept", MiB)
    lq.unmount(fs)
    # A daemon that crashed after mounting: another process bound and mounted the image (at a
    # place nobody recorded) and died; the mount outlives it.
    elsewhere = tmp_path / "crashed-mount"
    elsewhere.mkdir()
    script = ("import sys; from pathlib import Path; from imaged.quota import loopquota as lq; "
              "lq._attach_and_mount(Path(sys.argv[1]), Path(sys.argv[2]), lq.MOUNT_FLAGS)")
    subprocess.run([sys.executable, "-c", script, str(fs.image), str(elsewhere)], check=True,
                   timeout=30)
    # And a binding without autoclear, as `losetup` makes, left over as well.
    loopdev.attach(fs.image, read_only=True, autoclear=False).close()
    assert len(bound_to(fs.image)) == 2
    # A new process knows only the image path.
    found = lq.LoopFS(fs.image, fs.mount_point)
    assert [d.path.name for d in lq.devices(found)] == sorted(bound_to(fs.image),
                                                             key=lambda n: int(n[4:]))
    assert lq.mounts(found) == [str(elsewhere)]
    with pytest.raises(ConflictError, match="crashed-mount"):
        lq.mount(found)
    lq.unmount(found)
    assert gone(found) and str(elsewhere) not in mounted_points()
    lq.mount(found)
    assert digest(found.mount_point / "kept") == kept


def test_a_stale_unmounted_binding_does_not_stop_a_mount(
        make_fs: Callable[..., lq.LoopFS]) -> None:
    fs = make_fs(16 * MiB)
    lq.unmount(fs)
    loopdev.attach(fs.image, autoclear=False).close()
    assert len(bound_to(fs.image)) == 1
    lq.mount(fs)  # releases the stale device, binds its own
    assert len(bound_to(fs.image)) == 1
    lq.unmount(fs)
    assert gone(fs)


def test_concurrent_creates_get_their_own_devices(
        make_fs: Callable[..., lq.LoopFS]) -> None:
    results: dict[int, BaseException | lq.LoopFS] = {}

    def one(i: int) -> None:
        try:
            results[i] = make_fs(8 * MiB, name=f"c{i}")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [r for r in results.values() if isinstance(r, lq.LoopFS)]
    assert len(made) == 6, results
    devices = {bound_to(fs.image)[0] for fs in made}
    assert len(devices) == 6


def test_a_quota_larger_than_the_host_is_refused(make_fs: Callable[..., lq.LoopFS],
                                                  tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    quota = (free // GiB + 8) * GiB  # more than this host has free
    with pytest.raises(NoSpaceError, match="in loop mode a quota holds its whole size"):
        make_fs(quota)


def test_mount_refuses_a_mount_point_in_use(make_fs: Callable[..., lq.LoopFS],
                                            tmp_path: Path) -> None:
    fs = make_fs(8 * MiB)
    other = lq.LoopFS(tmp_path / "other.img", fs.mount_point)
    with pytest.raises(ConflictError, match="already exists"):
        lq.create(fs.image, tmp_path / "x", 8 * MiB)
    lq.create(other.image, tmp_path / "other-mnt", 8 * MiB)
    try:
        lq.unmount(other)
        with pytest.raises(ConflictError, match="mounted on it"):
            lq.mount(other)
    finally:
        lq.remove(other)
        force_cleanup(other.image)
