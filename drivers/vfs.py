"""The vfs driver: every layer and container is a full copy of its parent (reflinked where the
filesystem can), the universal reference and fallback, like containerd's native snapshotter and
Docker's vfs.

Copies are made by ``cp -a --reflink=auto``: coreutils keeps owners, modes, xattrs, devices and
hardlinks, and clones extents on xfs and btrfs so a copy costs metadata only. A container's
rootfs lives on its quota filesystem when it has one, so the quota counts the image as well
as the container's writes (``total`` semantics, DESIGN §3).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from imaged import loopquota
from imaged.config import Config
from imaged.drivers import (
    Capabilities,
    Mounted,
    Probe,
    Usage,
    disk_usage,
    loop_usage,
    syncfs,
)
from imaged.errors import InternalError, QuotaUnsupportedError
from imaged.mounts import MountSpec, bind_mount, is_mounted, unmount
from imaged.unpack import WhiteoutMode

_COPY_TIMEOUT = 3600


def reflink_supported(directory: Path) -> bool:
    """Try a FICLONE between two files in ``directory``: the only reliable test."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory) as src, \
            tempfile.NamedTemporaryFile(dir=directory) as dst:
        src.write(b"x" * 4096)
        src.flush()
        proc = subprocess.run(["cp", "--reflink=always", src.name, dst.name],
                              capture_output=True, check=False, timeout=30)
        return proc.returncode == 0


def probe(config: Config) -> Probe:
    where = config.root if config.root.exists() else Path(tempfile.gettempdir())
    reflink = reflink_supported(where / "drivers" / "vfs") if config.root.exists() else False
    return Probe("vfs", True, "always available (full copies"
                 f"{', reflinked' if reflink else ''})",
                 Capabilities("snapshot", WhiteoutMode.DELETE, "loop", "total",
                              rename_lower_dirs=True, xattrs=True, reflink=reflink))


def copy_tree(source: Path, target: Path) -> None:
    """Copy a tree exactly (owners, modes, xattrs, devices, hardlinks), reflinking data."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["cp", "-a", "--reflink=auto", "--no-target-directory",
                           str(source), str(target)], capture_output=True, text=True,
                          check=False, timeout=_COPY_TIMEOUT)
    if proc.returncode != 0:
        if "No space left" in proc.stderr or "Disk quota" in proc.stderr:
            raise QuotaUnsupportedError(
                f"the image does not fit in the quota ({proc.stderr.strip().splitlines()[0]}); "
                "vfs quotas count the image too: give a larger quota")
        raise InternalError(f"copying {source} to {target} failed: {proc.stderr.strip()}")


class VfsDriver:
    name = "vfs"

    def __init__(self, config: Config, home: Path) -> None:
        self.config = config
        self.home = home
        for sub in ("layers", "containers"):
            (home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._reflink = reflink_supported(home)

    def capabilities(self) -> Capabilities:
        return Capabilities("snapshot", WhiteoutMode.DELETE, "loop", "total",
                            rename_lower_dirs=True, xattrs=True, reflink=self._reflink)

    def _layer(self, key: str) -> Path:
        return self.home / "layers" / key

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        layer = self._layer(key)
        if layer.exists():
            self.remove_layer(key)
        if parent is None:
            layer.mkdir(mode=0o755)
        else:
            copy_tree(self._layer(parent), layer)
        return layer

    def commit_layer(self, key: str) -> None:
        syncfs(self._layer(key))

    def remove_layer(self, key: str) -> None:
        shutil.rmtree(self._layer(key), ignore_errors=True)

    def list_layers(self) -> set[str]:
        return {p.name for p in (self.home / "layers").iterdir()}

    def _container(self, name: str) -> Path:
        return self.home / "containers" / name

    def _quota_fs(self, name: str) -> loopquota.LoopFS:
        home = self._container(name)
        return loopquota.LoopFS(home / "quota.img", home / "fs")

    def _rootfs(self, name: str) -> Path:
        home = self._container(name)
        return (home / "fs" if (home / "quota.img").exists() else home) / "rootfs"

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None:
        home = self._container(name)
        home.mkdir(parents=True, mode=0o700)
        (home / "merged").mkdir()
        if read_only:
            return
        if quota is not None:
            loopquota.create(home / "quota.img", home / "fs", quota)
        try:
            if layers:
                copy_tree(self._layer(layers[-1]), self._rootfs(name))
            else:
                self._rootfs(name).mkdir()
        finally:
            if quota is not None:
                loopquota.unmount(self._quota_fs(name))

    def resize_quota(self, name: str, quota: int, mounted: bool) -> None:
        if not (self._container(name) / "quota.img").exists():
            raise QuotaUnsupportedError(f"container {name} was created without a quota; "
                                        "its quota cannot be set afterwards")
        loopquota.resize(self._quota_fs(name), quota, mounted)

    def mount(self, name: str, layers: Sequence[str], read_only: bool,
              target: Path | None) -> Mounted:
        path = target or self._container(name) / "merged"
        path.mkdir(parents=True, exist_ok=True)
        if is_mounted(path):
            return Mounted(path)
        if read_only:
            source = self._layer(layers[-1])
        else:
            if (self._container(name) / "quota.img").exists():
                loopquota.mount(self._quota_fs(name))
            source = self._rootfs(name)
        bind_mount(source, path, read_only=read_only)
        return Mounted(path, (MountSpec("bind", str(source),
                                        ("bind", "ro" if read_only else "rw")),))

    def unmount(self, name: str, target: Path | None) -> None:
        unmount(target or self._container(name) / "merged")
        if (self._container(name) / "quota.img").exists():
            loopquota.unmount(self._quota_fs(name))

    def usage(self, name: str) -> Usage:
        if (self._container(name) / "quota.img").exists():
            return loop_usage(self._quota_fs(name))
        rootfs = self._rootfs(name)
        return Usage(disk_usage(rootfs) if rootfs.exists() else 0, None)

    def remove_container(self, name: str) -> None:
        home = self._container(name)
        if not home.exists():
            return
        self.unmount(name, None)
        if (home / "quota.img").exists():
            loopquota.remove(self._quota_fs(name))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(home)

    def list_containers(self) -> set[str]:
        return {p.name for p in (self.home / "containers").iterdir()}
