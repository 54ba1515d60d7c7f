"""What later issues need from the guest kernel, shown working there: it is a 6.1 kernel,
device-mapper thin pools on loop devices, project quotas on xfs, and overlay with 500 lower
layers through the pre-6.8 mount option string (no ``lowerdir+``). The host kernel has none of
the first three, and only the new mount API's way of stacking many layers."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imaged.host import loopdev
from imaged.host.mounts import MountSpec, mount_with_command, unmount
from tests.conftest import need_tools

pytestmark = pytest.mark.guest

MiB = 1 << 20


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr}"
    return proc.stdout


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


@contextlib.contextmanager
def mounted(image: Path, target: Path, options: str) -> Iterator[Path]:
    """``image`` mounted at ``target`` through an autoclear loop device, released on exit."""
    target.mkdir()
    with loopdev.attach(image) as attachment:  # held open until the mount holds the device
        run("mount", "-o", options, str(attachment.device.path), str(target))
    try:
        yield target
    finally:
        unmount(target)


def test_guest_kernel_is_6_1() -> None:
    assert os.uname().release.startswith("6.1."), os.uname().release


def test_thin_pool_on_loop_devices(tmp_path: Path) -> None:
    need_tools("dmsetup", "thin_check", "mkfs.ext4")
    run("modprobe", "dm-thin-pool")
    size = 256 * MiB
    meta = sparse(tmp_path / "meta", 16 * MiB)  # zeroed: the pool formats it
    pool, thin = f"imaged-test-{os.getpid()}-pool", f"imaged-test-{os.getpid()}-thin"
    with contextlib.ExitStack() as stack:
        meta_loop = stack.enter_context(loopdev.attach(meta))
        data_loop = stack.enter_context(loopdev.attach(sparse(tmp_path / "data", size)))
        # 64 KiB blocks (128 sectors), no low-water mark.
        run("dmsetup", "create", pool, "--table", f"0 {size // 512} thin-pool "
            f"{meta_loop.device.path} {data_loop.device.path} 128 0")
        stack.callback(run, "dmsetup", "remove", pool)
        run("dmsetup", "message", pool, "0", "create_thin 0")
        run("dmsetup", "create", thin, "--table", f"0 {size // 512} thin /dev/mapper/{pool} 0")
        stack.callback(run, "dmsetup", "remove", thin)
        run("mkfs.ext4", "-q", f"/dev/mapper/{thin}")
        with contextlib.ExitStack() as mount:
            target = tmp_path / "mnt"
            target.mkdir()
            run("mount", f"/dev/mapper/{thin}", str(target))
            mount.callback(unmount, target)
            (target / "data").write_bytes(os.urandom(8 * MiB))
        # <start> <length> thin-pool <transaction> <used>/<total> metadata <used>/<total> data
        used, total = run("dmsetup", "status", pool).split()[5].split("/")
        assert 8 * MiB // (64 << 10) <= int(used) < int(total)
    # thin-provisioning-tools read what the kernel wrote (through a device: they use O_DIRECT,
    # which tmpfs refuses).
    with loopdev.attach(meta, read_only=True) as check:
        run("thin_check", str(check.device.path))


def test_xfs_project_quota(tmp_path: Path) -> None:
    need_tools("mkfs.xfs", "xfs_quota")
    image = sparse(tmp_path / "xfs.img", 320 * MiB)  # mkfs.xfs refuses below 300 MB
    run("mkfs.xfs", "-q", str(image))
    with mounted(image, tmp_path / "mnt", "prjquota") as mnt:
        container = mnt / "container"
        container.mkdir()
        run("xfs_quota", "-x", "-c", f"project -s -p {container} 42",
            "-c", "limit -p bhard=4m 42", str(mnt))
        written = 0
        with pytest.raises(OSError) as exc, (container / "file").open("wb", buffering=0) as f:
            while written < 8 * MiB:
                written += f.write(b"x" * MiB)
        # xfs reports a full project as a full filesystem, as df shows it for that directory.
        assert exc.value.errno == errno.ENOSPC
        assert written <= 4 * MiB
        (container / "file").unlink()  # deleting frees the project's space
        (container / "again").write_bytes(b"x" * (3 * MiB))


def test_overlay_with_500_lower_layers(tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    for i in range(500):  # overlay's maximum stack depth
        (layers / str(i)).mkdir(parents=True)
        (layers / str(i) / f"only-{i}").write_text("")
        (layers / str(i) / "top").write_text(str(i))
    # Relative to the mount's working directory, 500 lower directories fit in one page.
    lowerdir = "lowerdir=" + ":".join(str(i) for i in reversed(range(500)))
    target = tmp_path / "merged"
    target.mkdir()
    mount_with_command(MountSpec("overlay", "overlay", (lowerdir,)), target, cwd=layers)
    try:
        assert (target / "top").read_text() == "499"
        assert len(os.listdir(target)) == 501
    finally:
        unmount(target)
