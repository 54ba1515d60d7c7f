"""What the drivers share (DESIGN §3): a home with a directory per layer and per container,
``mount()`` around each driver's own way of mounting, and, for the directory drivers (overlay,
vfs, aufs), a container's writable data under one of two quota mechanisms.

- ``project``, where the root's filesystem enforces project quotas (xfs or ext4 mounted with
  ``prjquota`` on a kernel with quota support): the container's data lives in ``data/``, whose
  project id (inherited by everything created below it) every container gets, with or without a
  limit, so usage is the kernel's counter, read in O(1), and a quota can be set later.
- ``loop`` anywhere else: with a quota, the data lives on a per-container loop-backed
  filesystem (``quota.img`` mounted on ``fs/``) whose size is the quota; without one, in the
  container's directory itself, measured like ``du``.

Layout under a driver's home: ``layers/<chainid>``, ``containers/<name>/`` with ``merged/``
(the default mount point) and, for directory drivers, ``data/`` or ``quota.img`` + ``fs/``.
Only what the drivers put *in* a layer or a container's data directory differs.

``removed/<name>.<hex>/``: what is left of a container removed while a mount of it that a forced
umount detached still serves open files, and that cannot go before they close (a loop quota's
image, still the filesystem of that mount). Moved out of ``containers/`` so the name is free at
once; garbage collection finishes it once nothing holds it, and ``check`` reports one that
could be finished (``removals``, ``finish_removal``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence, Set
from pathlib import Path
from typing import ClassVar

from imaged.config import Config
from imaged.drivers import Finding, Mounted, QuotaMode, Usage, loop_usage
from imaged.errors import ConflictError, InvalidError, QuotaUnsupportedError
from imaged.fsutil import disk_usage, remove_tree
from imaged.host import loopdev
from imaged.host.mounts import is_mounted, unmount
from imaged.quota import loopquota, projquota
from imaged.sizes import shrink_refused


def nearest_directory(path: Path) -> Path:
    """``path`` or its nearest existing ancestor: a root not made yet is probed where it will
    be."""
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def quota_mode(config: Config, driver: str, home: Path) -> tuple[QuotaMode, str]:
    """(mode, why) for a driver that keeps container data in directories: ``project`` where the
    filesystem enforces project quotas, else ``loop``; ``unavailable`` when the configuration
    asks for project quotas (``drivers.<name>.quota``) and the filesystem cannot do them."""
    wanted = config.drivers.get(driver, {}).get("quota", "auto")
    if wanted == "loop":
        return QuotaMode.LOOP, "configured"
    missing = projquota.unavailable(home)
    if missing is None:
        return QuotaMode.PROJECT, "the root's filesystem enforces project quotas"
    if wanted == "project":
        return QuotaMode.UNAVAILABLE, missing
    return QuotaMode.LOOP, missing


class BaseDriver(ABC):
    """A driver's home and the opening every ``mount()`` shares: the default target, and
    nothing to do where something is mounted already (a container is mounted once)."""

    name: str
    partial_copy_up: bool = False

    def __init__(self, config: Config, home: Path) -> None:
        self.config = config
        self.home = home
        for sub in ("layers", "containers"):
            (home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    def _layer(self, key: str) -> Path:
        return self.home / "layers" / key

    def _container(self, name: str) -> Path:
        return self.home / "containers" / name

    def _new_container_home(self, name: str) -> Path:
        """The container's directory and its default mount point; refused if it exists."""
        home = self._container(name)
        home.mkdir(parents=True, mode=0o700)
        (home / "merged").mkdir()
        return home

    def list_layers(self) -> set[str]:
        return {p.name for p in (self.home / "layers").iterdir()}

    def _tree(self, key: str) -> Path:
        """Where ``prepare_layer`` has the layer's tar applied."""
        return self._layer(key)

    def layer_tree(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """The layer's directory itself: these drivers keep it where it was applied."""
        return contextlib.nullcontext(self._tree(key))

    def layer_dependents(self, key: str) -> list[str]:
        """None: a child layer or container is a copy or a snapshot of its own."""
        return []

    def list_containers(self) -> set[str]:
        return {p.name for p in (self.home / "containers").iterdir()}

    def layer_paths(self, key: str) -> list[Path]:
        return [self._layer(key)]

    def mount(self, name: str, layers: Sequence[str], read_only: bool,
              target: Path | None) -> Mounted:
        path = target or self._container(name) / "merged"
        path.mkdir(parents=True, exist_ok=True)
        if is_mounted(path):
            return Mounted(path)
        return self._mount_at(path, name, layers, read_only)

    @abstractmethod
    def _mount_at(self, path: Path, name: str, layers: Sequence[str],
                  read_only: bool) -> Mounted:
        """Mount the container at ``path``, an existing directory with nothing mounted on it."""

    @abstractmethod
    def usage(self, name: str) -> Usage: ...

    def usages(self, names: Sequence[str]) -> dict[str, Usage]:
        return {name: self.usage(name) for name in names}

    def unmount(self, name: str, target: Path | None, force: bool = False) -> None:
        unmount(target or self._container(name) / "merged", lazy=force)

    def broken(self, name: str) -> str | None:
        """None: the kernel serves these drivers' mounts, which cannot die on their own."""
        return None

    def serving_fd(self, name: str) -> int | None:
        return None

    def remove_container(self, name: str) -> None:
        """The container's directory, once whatever the driver keeps elsewhere is gone."""
        remove_tree(self._container(name))

    def _bury(self, name: str) -> None:
        """Move what is left of the container to ``removed/`` (module docstring): its name
        is free from now on, and ``finish_removal`` removes it once nothing holds it."""
        removed = self.home / "removed"
        removed.mkdir(exist_ok=True, mode=0o700)
        os.rename(self._container(name), removed / f"{name}.{secrets.token_hex(4)}")

    def _removed(self) -> list[Path]:
        """The entries of ``removed/``, one per removal left to finish."""
        removed = self.home / "removed"
        return sorted(removed.iterdir()) if removed.is_dir() else []

    def removals(self) -> dict[str, str | None]:
        """Containers removed while something still held part of them, by key: what holds
        it (to say so), or None where it can be finished now. Reads, changes nothing."""
        return {entry.name: self._holder(entry) for entry in self._removed()}

    def _holder(self, entry: Path) -> str | None:
        """What still holds a buried container (none here: only a loop quota is held)."""
        return None

    def finish_removal(self, key: str) -> None:
        """Remove what a removal left (``removals``); a ConflictError while it is still
        held."""
        entry = self.home / "removed" / key
        why = self._let_go(entry)
        if why is not None:
            raise ConflictError(f"removed container {key}: {why}")
        remove_tree(entry)

    def _let_go(self, entry: Path) -> str | None:
        """Release what a buried container holds outside its entry, as far as can be done
        now; why the rest must wait, or None (the entry is removed next, if still there)."""
        return self._holder(entry)

    def materialize(self, name: str, layers: Sequence[str], mounted: bool) -> None:
        """Nothing to complete: copy-up is whole-file everywhere but in fuse (``update
        --materialize`` is refused before it gets here: ``partial_copy_up``)."""
        return

    def check(self, layers: Set[str]) -> list[Finding]:
        """Nothing by default: the store checks what every driver shares (its rows against
        ``list_layers`` and ``list_containers``, mounts, loop devices, quotas); a driver adds
        what only its own bookkeeping shows."""
        return []

    def repair(self, finding: Finding) -> None:
        raise InvalidError(f"the {self.name} driver has no repair for {finding.kind}")


class DirectoryDriver(BaseDriver):
    """Layers as plain directories; container data on a loop quota filesystem or under a
    project quota (module docstring)."""

    project_quotas: ClassVar[bool] = True  # else always loop quotas

    def __init__(self, config: Config, home: Path) -> None:
        super().__init__(config, home)
        self._quota_mode = quota_mode(config, self.name, home)[0] if self.project_quotas \
            else QuotaMode.LOOP

    def prepare_layer(self, key: str, parent: str | None) -> Path:
        """An empty directory for the layer, whatever an interrupted apply left there gone."""
        layer = self._layer(key)
        if layer.exists():
            self.remove_layer(key)
        layer.mkdir(mode=0o755)
        return layer

    def commit_layer(self, key: str) -> None:
        """Nothing to seal: the layer directory is final once applied (the pull flushes)."""

    def remove_layer(self, key: str) -> None:
        remove_tree(self._layer(key))

    def _quota_fs(self, name: str) -> loopquota.LoopFS:
        home = self._container(name)
        return loopquota.LoopFS(home / "quota.img", home / "fs")

    def _has_quota(self, name: str) -> bool:
        """The container's data is on a loop quota filesystem (to mount before use)."""
        return (self._container(name) / "quota.img").exists()

    def _project_dir(self, name: str) -> Path | None:
        data = self._container(name) / "data"
        return data if data.is_dir() else None

    def _data_dir(self, name: str) -> Path:
        """Where the container's writable data lives: its quota filesystem or project
        directory, if it has one."""
        if self._has_quota(name):
            return self._container(name) / "fs"
        return self._project_dir(name) or self._container(name)

    def _new_container(self, name: str, quota: int | None) -> None:
        if quota is not None and self._quota_mode is QuotaMode.UNAVAILABLE:
            raise QuotaUnsupportedError(
                f"drivers.{self.name}.quota is \"project\" but "
                f"{projquota.unavailable(self.home)}: mount the root's filesystem with "
                "prjquota on a kernel with quota support, or set the option to \"auto\"")
        home = self._new_container_home(name)
        if self._quota_mode is QuotaMode.PROJECT:
            self._new_project(home / "data", quota)
        elif quota is not None:
            loopquota.create(home / "quota.img", home / "fs", quota)

    def _new_project(self, data: Path, quota: int | None) -> None:
        """``data`` with a project id of its own (ids persist in the directories themselves)
        and the quota as its limit; no quota clears whatever limit a former holder left."""
        taken = [projquota.project_of(other) for other in
                 (self.home / "containers").glob("*/data") if other != data]
        project = projquota.allocate(taken)
        data.mkdir(mode=0o755)
        projquota.set_project(data, project)
        projquota.set_limit(data, project, quota)

    def _mount_quota_fs(self, name: str) -> None:
        if self._has_quota(name):
            loopquota.mount(self._quota_fs(name))

    @contextlib.contextmanager
    def _quota_fs_for_mount(self, name: str) -> Iterator[None]:
        """The container's quota filesystem mounted for the mount made inside the block, and
        unmounted again if that mount fails, so a failed mount leaves nothing mounted."""
        self._mount_quota_fs(name)
        try:
            yield
        except BaseException:
            if self._has_quota(name):
                loopquota.unmount(self._quota_fs(name))
            raise

    def _data_usage(self, name: str, data: Path) -> Usage:
        if self._has_quota(name):
            return loop_usage(self._quota_fs(name))
        project = self._project_dir(name)
        if project is not None:
            return Usage(*projquota.usage(project, projquota.project_of(project)))
        return Usage(disk_usage(data), None)

    def resize_quota(self, name: str, quota: int, mounted: bool) -> None:
        project = self._project_dir(name)
        if project is not None:
            used, _, _ = projquota.usage(project, projquota.project_of(project))
            if (why := shrink_refused(used, quota)) is not None:
                raise InvalidError(f"container {name} {why}")
            projquota.set_limit(project, projquota.project_of(project), quota)
            return
        if not self._has_quota(name):
            raise QuotaUnsupportedError(f"container {name} was created without a quota; "
                                        "its quota cannot be set afterwards")
        loopquota.resize(self._quota_fs(name), quota, mounted)

    def unmount(self, name: str, target: Path | None, force: bool = False) -> None:
        super().unmount(name, target, force)
        if self._has_quota(name):
            loopquota.unmount(self._quota_fs(name), lazy=force)

    def remove_container(self, name: str) -> None:
        """Everything of the container; a loop quota's image that a forced umount's detached
        mount still has is buried with the directory instead (module docstring)."""
        if not self._container(name).exists():
            return
        self.unmount(name, None)
        project = self._project_dir(name)
        if project is not None:  # the id may be reused: it must not carry this limit along
            projquota.set_limit(project, projquota.project_of(project), None)
        if self._has_quota(name) and loopquota.remove(self._quota_fs(name)):
            self._bury(name)
            return
        super().remove_container(name)

    @staticmethod
    def _buried_fs(entry: Path) -> loopquota.LoopFS:
        return loopquota.LoopFS(entry / "quota.img", entry / "fs")

    def _holder(self, entry: Path) -> str | None:
        return _holding(loopquota.held(self._buried_fs(entry)))

    def _let_go(self, entry: Path) -> str | None:
        fs = self._buried_fs(entry)
        return _holding(loopquota.remove(fs)) if fs.image.exists() else None


def _holding(devices: Sequence[loopdev.LoopDevice]) -> str | None:
    if not devices:
        return None
    return (f"{devices[0].path} still has its quota filesystem, for files opened on it "
            "before a forced umount; it lets go when they close")
