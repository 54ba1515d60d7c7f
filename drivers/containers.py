"""What the built drivers share: a directory per layer and per container, and a container's
writable data on its own loop-backed quota filesystem when it has a quota.

Layout under a driver's home: ``layers/<chainid>``, ``containers/<name>/`` with ``merged/``
(the default mount point), ``quota.img`` and ``fs/`` (the quota filesystem) when there is a
quota. Only what the drivers put *in* a layer or *on* the quota filesystem differs.
"""

from __future__ import annotations

import contextlib
import shutil
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

from imaged import loopquota
from imaged.drivers import Usage, disk_usage, loop_usage
from imaged.errors import QuotaUnsupportedError
from imaged.mounts import unmount


class DriverHome:
    home: Path

    def _make_dirs(self) -> None:
        for sub in ("layers", "containers"):
            (self.home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    def _layer(self, key: str) -> Path:
        return self.home / "layers" / key

    def list_layers(self) -> set[str]:
        return {p.name for p in (self.home / "layers").iterdir()}

    def layer_paths(self, key: str) -> list[Path]:
        return [self._layer(key)]

    def _container(self, name: str) -> Path:
        return self.home / "containers" / name

    def _quota_fs(self, name: str) -> loopquota.LoopFS:
        home = self._container(name)
        return loopquota.LoopFS(home / "quota.img", home / "fs")

    def _has_quota(self, name: str) -> bool:
        return (self._container(name) / "quota.img").exists()

    def _data_dir(self, name: str) -> Path:
        """Where the container's writable data lives: its quota filesystem, if it has one."""
        return self._container(name) / "fs" if self._has_quota(name) else self._container(name)

    def _new_container(self, name: str, quota: int | None) -> None:
        home = self._container(name)
        home.mkdir(parents=True, mode=0o700)
        (home / "merged").mkdir()
        if quota is not None:
            loopquota.create(home / "quota.img", home / "fs", quota)

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
        return Usage(disk_usage(data) if data.exists() else 0, None)

    @abstractmethod
    def usage(self, name: str) -> Usage: ...

    def usages(self, names: Sequence[str]) -> dict[str, Usage]:
        return {name: self.usage(name) for name in names}

    def resize_quota(self, name: str, quota: int, mounted: bool) -> None:
        if not self._has_quota(name):
            raise QuotaUnsupportedError(f"container {name} was created without a quota; "
                                        "its quota cannot be set afterwards")
        loopquota.resize(self._quota_fs(name), quota, mounted)

    def unmount(self, name: str, target: Path | None) -> None:
        unmount(target or self._container(name) / "merged")
        if self._has_quota(name):
            loopquota.unmount(self._quota_fs(name))

    def remove_container(self, name: str) -> None:
        home = self._container(name)
        if not home.exists():
            return
        self.unmount(name, None)
        if self._has_quota(name):
            loopquota.remove(self._quota_fs(name))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(home)

    def list_containers(self) -> set[str]:
        return {p.name for p in (self.home / "containers").iterdir()}
