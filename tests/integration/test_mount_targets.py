"""Mount targets through the daemon: a member of group ``imaged`` may mount a container only
beneath ``api.mount_prefixes`` (the group must not grant root's power to mount anywhere), never
through a symlink, and root is not confined (DESIGN §5)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imaged.cli.client import DaemonClient
from imaged.host.mounts import is_mounted, mountinfo
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conftest import Daemon, add_config, push_simple, unmount_below
from tests.integration.test_daemon import _admin_group, _as_nobody


@pytest.fixture
def bed(tmp_path: Path, isolated_env: dict[str, str], start_daemon: Any,
        registry: LocalRegistry, layout: OCILayout) -> Iterator[tuple[Daemon, Path, str, int]]:
    """A daemon whose config allows ``prefix``, an image pulled, and the admin group's gid."""
    prefix = tmp_path / "run-containers"
    prefix.mkdir()
    add_config(tmp_path, f'[api]\nmount_prefixes = ["{prefix}"]\n')
    pushed = push_simple(layout, registry, "targets/app")
    with _admin_group() as gid:
        daemon: Daemon = start_daemon()
        try:
            with contextlib.closing(DaemonClient(daemon.socket, timeout=60)) as api:
                assert list(api.stream("POST", "/v1/images/pull", {"ref": pushed.ref}))[-1][
                    "status"] == "done"
            yield daemon, prefix, pushed.ref, gid
        finally:
            daemon.stop()
            unmount_below(tmp_path)  # targets lie outside the root the daemon fixture cleans


def _member_mount(daemon: Daemon, gid: int, name: str, body: dict[str, Any]) -> tuple[int, Any]:
    return _as_nobody(daemon, "-X", "POST", "-d", json.dumps(body),
                      f"http://x/v1/containers/{name}/mount", groups=str(gid))


def _container_mounts(root: Path) -> list[str]:
    return [m.mount_point for m in mountinfo() if m.mount_point.startswith(str(root) + "/")]


def test_a_member_mounts_beneath_a_prefix_and_unmounts(
        bed: tuple[Daemon, Path, str, int], root: Path) -> None:
    daemon, prefix, ref, gid = bed
    target = prefix / "c1" / "rootfs"  # missing: made beneath the prefix
    code, body = _member_mount(daemon, gid, "c1", {"image": ref, "target": str(target)})
    assert code == 200, body
    assert body["path"] == str(target)
    assert (target / "hello.txt").read_text() == "hello from targets/app\n"
    (target / "written").write_text("by the container\n")
    code, body = _as_nobody(daemon, "-X", "POST", "http://x/v1/containers/c1/unmount",
                            groups=str(gid))
    assert code == 200, body
    assert not is_mounted(target)
    assert _container_mounts(root) == []  # the driver's own mount went too
    code, body = _member_mount(daemon, gid, "c1", {"target": str(target)})
    assert code == 200, body
    assert (target / "written").read_text() == "by the container\n"


@pytest.mark.parametrize("where", ["/etc/imaged-test-evil", "prefix-itself", "sibling"])
def test_a_member_may_not_mount_elsewhere(bed: tuple[Daemon, Path, str, int], root: Path,
                                          where: str) -> None:
    daemon, prefix, ref, gid = bed
    target = {"/etc/imaged-test-evil": Path(where), "prefix-itself": prefix,
              "sibling": prefix.with_name(prefix.name + "-evil") / "x"}[where]
    code, body = _member_mount(daemon, gid, "c2", {"image": ref, "target": str(target)})
    assert code == 403, body
    assert "not beneath api.mount_prefixes" in body["error"]["message"]
    assert not target.exists() or not is_mounted(target)
    assert not Path("/etc/imaged-test-evil").exists()
    code, containers = _as_nobody(daemon, "http://x/v1/containers", groups=str(gid))
    assert (code, containers) == (200, [])  # refused before anything was created


@pytest.mark.parametrize("level", ["first", "last"])
def test_a_symlink_beneath_the_prefix_is_refused(bed: tuple[Daemon, Path, str, int],
                                                 tmp_path: Path, root: Path, level: str) -> None:
    daemon, prefix, ref, gid = bed
    outside = tmp_path / "outside"
    outside.mkdir()
    if level == "first":
        (prefix / "link").symlink_to(outside)
        target = prefix / "link" / "rootfs"
    else:
        (prefix / "c3").mkdir()
        (prefix / "c3" / "rootfs").symlink_to(outside)
        target = prefix / "c3" / "rootfs"
    code, body = _member_mount(daemon, gid, "c3", {"image": ref, "target": str(target)})
    assert code == 403, body
    assert "symlink" in body["error"]["message"]
    assert os.listdir(outside) == []
    assert not is_mounted(outside)
    assert _container_mounts(root) == []  # the driver's own mount was undone


def test_root_is_not_confined(bed: tuple[Daemon, Path, str, int], tmp_path: Path) -> None:
    daemon, _, ref, _ = bed
    target = tmp_path / "anywhere"
    with contextlib.closing(DaemonClient(daemon.socket, timeout=60)) as api:
        body = api.call("POST", "/v1/containers/c4/mount", {"image": ref, "target": str(target)})
        assert body["path"] == str(target)
        assert (target / "hello.txt").exists()
        api.call("POST", "/v1/containers/c4/unmount", {})
    assert not is_mounted(target)
