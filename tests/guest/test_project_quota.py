"""Project quotas (DESIGN §3) where a kernel has them: overlay and vfs on xfs and ext4 roots
mounted with ``prjquota`` choose the project mode by themselves, say so in ``imaged info``, and
pass the conformance battery's quota case (limit, refusal, space freed, usage within 5%, grow
while mounted, shrink below usage refused). overlay on xfs runs in test_conformance.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imaged.quota import projquota
from imaged.testing.images import file
from tests.conformance.conftest import Bed
from tests.conformance.test_driver import test_quota_refuses_past_limit_and_frees_on_delete
from tests.conftest import add_config
from tests.guest.conftest import prjquota_root

pytestmark = pytest.mark.guest

__all__ = ["test_quota_refuses_past_limit_and_frees_on_delete"]


@pytest.fixture(params=[("overlay", "ext4"), ("vfs", "xfs"), ("vfs", "ext4")],
                ids="-".join)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    name, fstype = request.param
    with prjquota_root(fstype, tmp_path):
        yield name


@pytest.mark.parametrize("fstype", ["xfs", "ext4"])
def test_info_reports_project_mode(fstype: str, tmp_path: Path, imaged: Any) -> None:
    with prjquota_root(fstype, tmp_path):
        info = imaged("--json", "info").json()
    by_name = {d["name"]: d for d in info["drivers"]}
    for name in ("overlay", "vfs"):
        assert by_name[name]["capabilities"]["quota_mode"] == "project", by_name[name]
        assert "project quotas" in by_name[name]["reason"]


def test_containers_get_ids_of_their_own_and_usage_without_a_walk(bed: Bed) -> None:
    ref = bed.image([file("f", b"x")])
    one = bed.mount(ref, "--name", "one", "--quota", "16M")
    two = bed.mount(ref, "--name", "two")  # no quota: still a project, for O(1) usage
    (one / "data").write_bytes(os.urandom(3 << 20))
    (two / "data").write_bytes(os.urandom(5 << 20))
    os.sync()
    home = bed.root / "drivers" / bed.driver / "containers"
    ids = {projquota.project_of(home / n / "data") for n in ("one", "two")}
    assert len(ids) == 2 and all(projquota.FIRST_ID <= i <= projquota.LAST_ID for i in ids)
    used = {c["name"]: c["used_bytes"] for c in bed.ok("--json", "ps").json()}
    assert abs(used["one"] - (3 << 20)) < (256 << 10)
    assert abs(used["two"] - (5 << 20)) < (256 << 10)
    bed.ok("update", "two", "--quota", "32M")  # a quota can be set afterwards
    assert next(c for c in bed.ok("--json", "ps").json() if c["name"] == "two")["quota"] \
        == 32 << 20


def test_loop_mode_when_configured(bed: Bed, tmp_path: Path) -> None:
    """``quota = "loop"`` keeps per-container loop filesystems even where project quotas work."""
    add_config(tmp_path, f'[drivers.{bed.driver}]\nquota = "loop"\n')
    ref = bed.image([file("f", b"x")])
    bed.mount(ref, "--name", "looped", "--quota", "16M")
    container = next(c for c in bed.ok("--json", "ps").json() if c["name"] == "looped")
    assert container["quota_mode"].startswith("loop"), container
    assert (bed.root / "drivers" / bed.driver / "containers" / "looped" / "quota.img").exists()
