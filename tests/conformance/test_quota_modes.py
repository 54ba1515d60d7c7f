"""The quota mode a directory driver uses is chosen from the root's filesystem, and a configured
mode the filesystem cannot give is refused, not silently replaced: this host's kernel has no
quota support, so ``quota = "project"`` here must fail a quota'd container cleanly, naming the
fix. (Where project quotas exist, tests/guest/test_project_quota.py shows the other cases.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from imaged.testing.images import file
from tests.conformance.conftest import Bed
from tests.conftest import add_config


@pytest.mark.parametrize("driver", ["overlay", "vfs"], indirect=True)
def test_project_quotas_asked_where_the_filesystem_has_none(bed: Bed, tmp_path: Path) -> None:
    add_config(tmp_path, f'[drivers.{bed.driver}]\nquota = "project"\n')
    ref = bed.image([file("f", b"x")])
    info = next(d for d in bed.ok("--json", "info").json()["drivers"] if d["name"] == bed.driver)
    assert info["capabilities"]["quota_mode"] == "unavailable", info
    refused = bed("mount", ref, "--name", "q", "--quota", "16M")
    assert refused.code == 1
    assert f'drivers.{bed.driver}.quota is "project"' in refused.err
    assert "prjquota" in refused.err
    assert bed.ok("--json", "ps").json() == []
    assert not any((bed.root / "drivers" / bed.driver / "containers").iterdir())
    bed.mount(ref, "--name", "unlimited")  # without a quota the mode does not matter
