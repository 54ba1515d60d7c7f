"""The aufs driver: one directory per layer, stacked by aufs at mount time (DESIGN §3).

No kernel this project can reach has aufs (it never entered mainline), so the driver is built to
aufs' documented interface, aufs(5) of aufs4/5/6, and to how Docker's aufs graph driver used it;
its conformance tests run wherever ``/proc/filesystems`` lists aufs.

Layout under ``ROOT/drivers/aufs``::

    layers/<chainid>/     the layer's own files, whiteouts as aufs writes them (below)
    containers/<name>/    upper/ (or fs/upper on a quota filesystem), merged/, quota.img
    xino/<name>           where aufs creates (and at once unlinks) a mount's inode tables

Whiteouts are aufs' native form, kept from the tar as they are (``WhiteoutMode.AUFS``):
``.wh.<name>`` hides ``name`` in lower branches, ``.wh..wh..opq`` makes its directory opaque.
Other ``.wh..wh.*`` names are aufs' own bookkeeping in a writable branch (``.wh..wh.aufs``, the
file every whiteout is hardlinked to; ``.wh..wh.plnk``, pseudo-links; ``.wh..wh.orph``): they
are no file of the image and must never be exported as one.

Mount options, chosen deliberately:
- ``br:<upper>=rw:<layerN>=ro+wh:…:<layer1>=ro+wh``: the writable upper first, then the layers
  top to base. ``ro+wh``, not ``ro``: aufs never looks up whiteouts in an ``ro`` branch, and
  ours hold them. aufs forbids ``,``, ``:`` and ``=`` in branch paths, so a root holding one is
  refused with that reason rather than mounted as some other set of branches.
- mount(2) copies one page of options, and a branch costs ~110 bytes here, so about 35 layers
  fit. The rest are appended by remounts with ``append:<layer>=ro+wh`` (each within a page),
  as Docker's driver did. Appending is safe then: nothing has been written, so there are no
  pseudo-links that aufs(5) says to flush before a branch is added.
- ``xino=ROOT/drivers/aufs/xino/<name>``: aufs' inode-number tables. By default they go to the
  first writable branch, the container's quota filesystem, where they would eat the quota, or
  to /tmp without one. One name per container, since aufs refuses a mount whose xino file
  exists and unlinks it only after creating it: concurrent mounts sharing a name would race.
- ``dirperm1``: a directory's permission is checked on its topmost branch only, so a chmod in
  the container takes effect; aufs(5) lists it as the first step to speed.
- ``udba=none``: aufs never re-checks branches for changes made behind its back. There are
  none here: a layer is immutable once committed and never removed while in use, and an upper
  is written only through its one mount. aufs(5) recommends ``none`` exactly then; ``reval``
  (the default) would re-check every cached lookup for changes that cannot happen.
- No ``dirren``: without it aufs returns EXDEV for rename(2) of a directory that exists on more
  than one branch (``mv`` then copies); it needs CONFIG_AUFS_DIRREN and aufs(5) calls it slow.
  The capabilities say ``rename_lower_dirs=False``.
- Pseudo-links (``plink``, the default) keep hardlinks across a copy-up, in memory: ``auplink
  <mount> flush`` before the unmount writes them as real links, as aufs(5) asks and Docker did.
  Without aufs-tools installed, such links split at the next mount (a warning is logged).

Quotas are overlay's: the upper on a loop-backed filesystem per container (``DirectoryDriver``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from imaged import tools
from imaged.config import Config
from imaged.drivers import Capabilities, Mounted, Probe, QuotaMode, Usage
from imaged.drivers.base import DirectoryDriver
from imaged.errors import InvalidError
from imaged.host.mounts import (
    MountSpec,
    is_mounted,
    kernel_filesystems,
    mount_with_command,
    unmount,
)
from imaged.layers.unpack import WhiteoutMode

log = logging.getLogger("imaged.drivers.aufs")

FLAGS = ("dirperm1", "udba=none")
# aufs(5), Branch Syntax: "Comma, colon and the permission flags string (including '=') in the
# path are not allowed."
_FORBIDDEN = (",", ":", "=")
# What read_only adds to every mount(8) call (mounts.mount_with_command), kept free in each page.
_RO_SUFFIX = ",ro"
_CONFIG = Path("/sys/fs/aufs/config")  # the module's build options, one CONFIG_AUFS_*=y a line
_BRANCH_MAX = re.compile(r"^CONFIG_AUFS_BRANCH_MAX_(\d+)=y$", re.MULTILINE)
_DEFAULT_BRANCH_MAX = 127  # aufs' Kconfig default
_AUPLINK_TIMEOUT = 60


# -- mount options (pure) ------------------------------------------------------------------


def branch(path: Path, permission: str) -> str:
    """``<path>=<permission>``, or InvalidError if aufs would parse the path as something else."""
    text = str(path)
    bad = [c for c in _FORBIDDEN if c in text]
    if bad:
        raise InvalidError(f"aufs cannot use {text} as a branch: aufs forbids "
                           f"{' and '.join(repr(c) for c in bad)} in branch paths; "
                           "choose a root without them")
    return f"{text}={permission}"


def mount_specs(upper: Path | None, layers: Sequence[Path], xino: Path,
                page_size: int) -> list[MountSpec]:
    """The mount, then the remounts appending what did not fit in its page, in that order.

    ``layers`` are top first; ``upper`` is None for a read-only mount. Every spec's options,
    joined with commas and with ``,ro`` added, fit mount(2)'s page with its terminating NUL.
    """
    if not layers:
        raise InvalidError("an image without layers cannot be mounted")
    if "," in str(xino):
        raise InvalidError(f"aufs cannot put its xino file at {xino}: aufs forbids ',' there")
    budget = page_size - 1 - len(_RO_SUFFIX)
    branches = ([branch(upper, "rw")] if upper is not None else []) + \
        [branch(layer, "ro+wh") for layer in layers]
    flags = (f"xino={xino}", *FLAGS)
    room = budget - len(",".join(("br:", *flags)))  # the options without any branch
    first: list[str] = []
    while len(first) < len(branches) and \
            len(":".join((*first, branches[len(first)]))) <= room:
        first.append(branches[len(first)])
    if not first:
        raise InvalidError(f"aufs branch {branches[0]} is too long for one page of mount "
                           "options")
    specs = [MountSpec("aufs", "none", (f"br:{':'.join(first)}", *flags))]
    rest = [f"append:{b}" for b in branches[len(first):]]
    while rest:
        options = ["remount"]
        while rest and len(",".join((*options, rest[0]))) <= budget:
            options.append(rest.pop(0))
        if len(options) == 1:
            raise InvalidError(f"aufs option {rest[0]} is too long for one page")
        specs.append(MountSpec("aufs", "none", tuple(options)))
    return specs


# -- probe ---------------------------------------------------------------------------------


def branch_max(config_text: str | None) -> int:
    """The most branches one aufs mount takes, from ``/sys/fs/aufs/config`` (CONFIG_AUFS_
    BRANCH_MAX_{127,511,1023,32767}); aufs' default when the module does not say."""
    found = _BRANCH_MAX.search(config_text or "")
    return int(found.group(1)) if found else _DEFAULT_BRANCH_MAX


def _read_branch_max() -> int:
    try:
        return branch_max(_CONFIG.read_text())
    except OSError:
        return branch_max(None)


def capabilities(branches: int) -> Capabilities:
    # One branch is the container's upper; the layers get the rest.
    return Capabilities("stacked", WhiteoutMode.AUFS, QuotaMode.LOOP, "writable",
                        rename_lower_dirs=False, xattrs=True,
                        max_layers=min(Capabilities.max_layers, branches - 1))


def probe_with(filesystems: set[str], branches: int) -> Probe:
    """The probe's answer for a kernel with these filesystems and aufs build (pure)."""
    if "aufs" not in filesystems:
        return Probe("aufs", False, "aufs not supported by this kernel (not in /proc/filesystems)")
    caps = capabilities(branches)
    return Probe("aufs", True, f"aufs available; up to {caps.max_layers} layers per mount "
                 f"({branches} branches built in); quota mode loop", caps)


def probe(config: Config) -> Probe:
    return probe_with(kernel_filesystems(), _read_branch_max())


# -- the driver ----------------------------------------------------------------------------


class AufsDriver(DirectoryDriver):
    name = "aufs"
    # Project quotas under aufs would be untested: aufs runs in no kernel imaged is tested on.
    project_quotas = False

    def __init__(self, config: Config, home: Path) -> None:
        super().__init__(config, home)
        (home / "xino").mkdir(exist_ok=True, mode=0o700)
        self._capabilities = capabilities(_read_branch_max())

    def capabilities(self) -> Capabilities:
        return self._capabilities

    def create_container(self, name: str, layers: Sequence[str], quota: int | None,
                         read_only: bool) -> None:
        self._new_container(name, quota)
        if not read_only:
            (self._data_dir(name) / "upper").mkdir(mode=0o755)

    def mount_specs(self, name: str, layers: Sequence[str], read_only: bool) -> list[MountSpec]:
        """The mount and its remounts, as a runtime could replay them (pure given the paths)."""
        upper = None if read_only else self._data_dir(name) / "upper"
        return mount_specs(upper, [self._layer(key) for key in reversed(layers)],
                           self.home / "xino" / name, os.sysconf("SC_PAGE_SIZE"))

    def _mount_at(self, path: Path, name: str, layers: Sequence[str],
                  read_only: bool) -> Mounted:
        limit = self._capabilities.max_layers
        if len(layers) > limit:
            raise InvalidError(f"an image of {len(layers)} layers does not fit one aufs mount "
                               f"here (at most {limit}: CONFIG_AUFS_BRANCH_MAX)")
        with self._quota_fs_for_mount(name):
            specs = self.mount_specs(name, layers, read_only)
            mount_with_command(specs[0], path, read_only=read_only)
            try:
                for remount in specs[1:]:
                    mount_with_command(remount, path, read_only=read_only)
            except BaseException:
                unmount(path)
                raise
        return Mounted(path, tuple(specs))

    def unmount(self, name: str, target: Path | None, force: bool = False) -> None:
        path = target or self._container(name) / "merged"
        if is_mounted(path) and (self._data_dir(name) / "upper").is_dir():
            _flush_pseudo_links(path)  # only a writable branch holds pseudo-links
        super().unmount(name, target, force)

    def usage(self, name: str) -> Usage:
        return self._data_usage(name, self._data_dir(name) / "upper")


def _flush_pseudo_links(path: Path) -> None:
    """``auplink <path> flush``: make the hardlinks aufs kept in memory real in the upper."""
    auplink = shutil.which("auplink")
    if auplink is None:
        log.warning("auplink (aufs-tools) is not installed: hardlinks copied up in %s will be "
                    "separate files after it is unmounted", path)
        return
    argv = [auplink, str(path), "flush"]
    proc = tools.completed(argv, timeout=_AUPLINK_TIMEOUT, provides="aufs-tools")
    if proc.returncode != 0:
        log.warning("%s", tools.failure(argv, proc))
