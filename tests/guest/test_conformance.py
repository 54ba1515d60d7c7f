"""The driver conformance battery inside the guest's 6.1 kernel, for overlay on an xfs root
mounted with ``prjquota``: the kernel has no ``lowerdir+`` (so 128 and 500 layers go through
the pre-6.8 option string of short links), and the driver picks the project-quota mode by
itself, so the battery's quota case runs on project quotas. The battery's tests are imported
here to run under this module's ``driver`` fixture; in the guest they run embedded only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.test_driver import *  # noqa: F403 - the battery itself
from tests.guest.conftest import prjquota_root

pytestmark = [pytest.mark.guest]


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[str]:
    with prjquota_root("xfs", tmp_path):
        yield "overlay"


def test_layers_go_through_the_pre_6_8_mount_path(imaged: Any) -> None:
    """The battery above proves the legacy path only if this kernel really lacks lowerdir+."""
    overlay = next(d for d in imaged("--json", "info").json()["drivers"]
                   if d["name"] == "overlay")
    assert "mount(2) with short layer names" in overlay["reason"], overlay
