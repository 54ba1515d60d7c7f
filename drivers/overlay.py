"""The overlay driver: one directory per layer, stacked by overlayfs at mount time.

Layout under ``ROOT/drivers/overlay``::

    layers/<chainid>/diff     the layer's own files; whiteouts as 0/0 char devices and
                              trusted.overlay.opaque=y (containers/storage and Docker's form)
    layers/<chainid>/link     the layer's short name
    l/<short>                 symlink to ../layers/<chainid>/diff
    containers/<name>/        upper/ and work/ (or fs/upper, fs/work on a quota filesystem),
                              merged/ (the default mount point), quota.img

Mount options, chosen deliberately:
- ``index=off``: the inode index ties a lower layer to one upper; shared layers would make
  the second mount fail with EBUSY-like errors, and we never export overlays over NFS.
- ``redirect_dir=on``: rename(2) of a directory from a lower layer works instead of EXDEV.
  The cost (a redirect xattr in the upper layer) only matters for tools that diff upper
  directories, which imaged does not do yet.
- ``metacopy`` off unless ``drivers.overlay.metacopy``: metacopy makes chown/chmod cheap but
  makes upper layers unreadable without their lowers.
- ``volatile`` only if configured: it drops fsync and makes a crash lose the container's
  writes.

Layers are passed with ``lowerdir+`` (kernel ≥ 6.8, one ``fsconfig`` per layer, no limit on the
option string). Older kernels get mount(8) run inside ``l/`` with ``lowerdir=AAAAAA:BBBBBB:…``:
short relative names keep 500 layers within mount(2)'s one-page limit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import string
from collections.abc import Sequence, Set
from pathlib import Path

from imaged.config import Config
from imaged.drivers import (
    Capabilities,
    Finding,
    Mounted,
    Probe,
    Usage,
)
from imaged.drivers.base import DirectoryDriver, nearest_directory, quota_mode
from imaged.errors import InvalidError
from imaged.host.mounts import (
    MountSpec,
    backing_filesystem,
    bind_mount,
    kernel_filesystems,
    mount_with_command,
    mount_with_fsconfig,
    new_mount_api_has,
)
from imaged.layers.unpack import WhiteoutMode

_SHORT_ALPHABET = string.ascii_uppercase + string.digits
_SHORT_LENGTH = 6
# Filesystems overlayfs cannot use as upper (no d_type, no trusted xattrs, or overlay itself).
_BAD_UPPER = {"overlay", "nfs", "nfs4", "tmpfs-noxattr", "fuse", "vfat", "exfat"}


def probe(config: Config) -> Probe:
    if "overlay" not in kernel_filesystems():
        return Probe("overlay", False, "overlay is not in /proc/filesystems (modprobe overlay)")
    backing = backing_filesystem(config.root if config.root.exists() else config.root.parent)
    if backing.fstype in _BAD_UPPER:
        return Probe("overlay", False, f"the root is on {backing.fstype}, which overlayfs "
                     "cannot use for layers")
    mode, why = quota_mode(config, "overlay", nearest_directory(config.root))
    api = "lowerdir+ (new mount API)" if new_mount_api_has("overlay", "lowerdir+") \
        else "mount(2) with short layer names"
    return Probe("overlay", True, f"overlay available; layers passed with {api}; "
                 f"quota mode {mode} ({why})",
                 Capabilities("stacked", WhiteoutMode.OVERLAY, mode, "writable",
                              rename_lower_dirs=True, xattrs=True))


class OverlayDriver(DirectoryDriver):
    name = "overlay"

    def __init__(self, config: Config, home: Path) -> None:
        super().__init__(config, home)
        self.options = config.drivers.get("overlay", {})
        (home / "l").mkdir(exist_ok=True, mode=0o700)
        self._lowerdir_plus = new_mount_api_has("overlay", "lowerdir+")

    def capabilities(self) -> Capabilities:
        return Capabilities("stacked", WhiteoutMode.OVERLAY, self._quota_mode, "writable",
                            rename_lower_dirs=True, xattrs=True)

    # layers

    def _short(self, key: str) -> str:
        return (self._layer(key) / "link").read_text().strip()

    def _tree(self, key: str) -> Path:
        return self._layer(key) / "diff"

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        """``diff/`` in the layer's directory, and the short link the mount(2) fallback uses."""
        super().prepare_layer(key, parent)
        diff = self._tree(key)
        diff.mkdir(mode=0o755)
        while True:
            short = "".join(secrets.choice(_SHORT_ALPHABET) for _ in range(_SHORT_LENGTH))
            link = self.home / "l" / short
            try:
                os.symlink(f"../layers/{key}/diff", link)
            except FileExistsError:
                continue
            break
        (diff.parent / "link").write_text(short)
        return diff

    def layer_paths(self, key: str) -> list[Path]:
        try:
            return [self._layer(key), self.home / "l" / self._short(key)]
        except OSError:
            return [self._layer(key)]

    def remove_layer(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.home / "l" / self._short(key))
        super().remove_layer(key)

    def check(self, layers: Set[str]) -> list[Finding]:
        """Short links (``l/``) whose layer is gone: a layer directory removed by hand leaves
        its link behind, and the short links are all the mount(2) fallback knows layers by."""
        return [Finding("layer-link-dangling", str(link),
                        f"layer link {link} points to {os.readlink(link)}, which is gone")
                for link in sorted((self.home / "l").iterdir()) if not link.exists()]

    def repair(self, finding: Finding) -> None:
        if finding.kind == "layer-link-dangling":
            Path(finding.subject).unlink(missing_ok=True)
        else:
            super().repair(finding)

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None:
        self._new_container(name, quota)
        if read_only:
            return
        data = self._data_dir(name)
        (data / "upper").mkdir(mode=0o755)
        (data / "work").mkdir(mode=0o700)

    def mount_spec(self, name: str, layers: Sequence[str], read_only: bool) -> MountSpec:
        """The overlay to mount, as a runtime could replay it (pure given the layer links)."""
        # lowerdir+ takes one path per call, so full paths cost nothing; the short links are
        # only for the mount(2) fallback, whose option string must fit one page.
        layer_root = self.home / "layers"
        options = [f"lowerdir+={layer_root}/{key}/diff" for key in reversed(layers)]
        if not read_only:
            parent = self._data_dir(name)
            options += [f"upperdir={parent / 'upper'}", f"workdir={parent / 'work'}"]
        options += ["index=off", "redirect_dir=on" if not read_only else "redirect_dir=follow"]
        if self.options.get("metacopy"):
            options.append("metacopy=on")
        if self.options.get("volatile") and not read_only:
            options.append("volatile")
        return MountSpec("overlay", "overlay", tuple(options))

    def _mount_at(self, path: Path, name: str, layers: Sequence[str],
                  read_only: bool) -> Mounted:
        if not layers:
            raise InvalidError("an image without layers cannot be mounted")
        if read_only and len(layers) == 1:
            # overlay needs two lower layers when there is no upper: bind the one layer.
            source = self._layer(layers[0]) / "diff"
            bind_mount(source, path, read_only=True)
            return Mounted(path, (MountSpec("bind", str(source), ("bind", "ro")),))
        spec = self.mount_spec(name, layers, read_only)
        with self._quota_fs_for_mount(name):
            if self._lowerdir_plus:
                mount_with_fsconfig(spec, path, read_only=read_only)
            else:
                shorts = [self._short(key) for key in reversed(layers)]
                legacy = tuple(o for o in spec.options if not o.startswith("lowerdir+="))
                mount_with_command(MountSpec("overlay", "overlay",
                                             (f"lowerdir={':'.join(shorts)}", *legacy)),
                                   path, cwd=self.home / "l", read_only=read_only)
        return Mounted(path, (spec,))

    def usage(self, name: str) -> Usage:
        return self._data_usage(name, self._data_dir(name) / "upper")
