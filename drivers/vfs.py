"""The vfs driver: every layer and container is a full copy of its parent (reflinked where the
filesystem can), the universal reference and fallback, like containerd's native snapshotter and
Docker's vfs.

Copies are made by ``cp -a --reflink=auto``: coreutils keeps owners, modes, xattrs, devices and
hardlinks, and clones extents on xfs and btrfs so a copy costs metadata only. A container's
rootfs lives on its quota filesystem or in its project directory, so the quota counts the image
as well as the container's writes (``total`` semantics, DESIGN §3).
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from imaged import tools
from imaged.config import Config
from imaged.drivers import (
    Capabilities,
    Mounted,
    Probe,
    Usage,
)
from imaged.drivers.base import DirectoryDriver, nearest_directory, quota_mode
from imaged.errors import InternalError, QuotaUnsupportedError
from imaged.fsutil import FICLONE
from imaged.host.mounts import MountSpec, bind_mount
from imaged.layers.unpack import WhiteoutMode
from imaged.quota import loopquota

_COPY_TIMEOUT = 3600


def reflink_supported(directory: Path) -> bool | None:
    """Try a FICLONE between two files in ``directory``: the only reliable test. The ioctl
    itself, not ``cp --reflink``, so ``info`` (which probes every driver) stays cheap. The files
    are unnamed (O_TMPFILE) and empty, which xfs and btrfs clone and ext4 refuses alike: the
    probe allocates no block, so it answers on a full disk too. None when the files cannot be
    made (a filesystem turned read-only by an I/O error): unknown, which ``info`` must still
    report, not fail on."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as src, \
                tempfile.TemporaryFile(dir=directory) as dst:
            try:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            except OSError:
                return False
            return True
    except OSError:
        return None


def probe(config: Config) -> Probe:
    reflink = bool(reflink_supported(config.root / "drivers" / "vfs")) \
        if config.root.exists() else False
    mode, why = quota_mode(config, "vfs", nearest_directory(config.root))
    return Probe("vfs", True, "always available (full copies"
                 f"{', reflinked' if reflink else ''}); quota mode {mode} ({why})",
                 Capabilities("snapshot", WhiteoutMode.DELETE, mode, "total",
                              rename_lower_dirs=True, xattrs=True, reflink=reflink))


def copy_tree(source: Path, target: Path) -> None:
    """Copy a tree exactly (owners, modes, xattrs, devices, hardlinks), reflinking data."""
    target.mkdir(parents=True, exist_ok=True)
    argv = ["cp", "-a", "--reflink=auto", "--no-target-directory", str(source), str(target)]
    proc = tools.completed(argv, timeout=_COPY_TIMEOUT, provides="coreutils")
    if proc.returncode != 0:
        if "No space left" in proc.stderr or "Disk quota" in proc.stderr:
            raise QuotaUnsupportedError(
                f"the image does not fit in the quota ({proc.stderr.strip().splitlines()[0]}); "
                "vfs quotas count the image too: give a larger quota")
        raise InternalError(tools.failure(argv, proc))


class VfsDriver(DirectoryDriver):
    name = "vfs"

    def __init__(self, config: Config, home: Path) -> None:
        super().__init__(config, home)
        self._reflink: bool | None = None

    def capabilities(self) -> Capabilities:
        # Tested on first use only: every command opens the driver, and the test runs cp.
        if self._reflink is None:  # unknown (None) is tested again next time
            self._reflink = reflink_supported(self.home)
        return Capabilities("snapshot", WhiteoutMode.DELETE, self._quota_mode, "total",
                            rename_lower_dirs=True, xattrs=True, reflink=bool(self._reflink))

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        """A copy of the parent layer (its directory's owner and mode included)."""
        layer = super().prepare_layer(key, parent)
        if parent is not None:
            copy_tree(self._layer(parent), layer)
        return layer

    def _rootfs(self, name: str) -> Path:
        return self._data_dir(name) / "rootfs"

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None:
        self._new_container(name, quota)
        if read_only:
            return
        try:
            if layers:
                copy_tree(self._layer(layers[-1]), self._rootfs(name))
            else:
                self._rootfs(name).mkdir()
        finally:
            if self._has_quota(name):
                loopquota.unmount(self._quota_fs(name))

    def _mount_at(self, path: Path, name: str, layers: Sequence[str],
                  read_only: bool) -> Mounted:
        if read_only:
            source = self._layer(layers[-1])
        else:
            self._mount_quota_fs(name)
            source = self._rootfs(name)
        bind_mount(source, path, read_only=read_only)
        return Mounted(path, (MountSpec("bind", str(source),
                                        ("bind", "ro" if read_only else "rw")),))

    def usage(self, name: str) -> Usage:
        return self._data_usage(name, self._rootfs(name))
