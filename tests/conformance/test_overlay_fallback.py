"""overlay's mount(2) path, for kernels before 6.8 without ``lowerdir+``.

This kernel has lowerdir+, so the test takes it away from the driver (as an older kernel
would) and checks that 128 and 500 layers still mount through mount(8) run inside the short
link directory, and read correctly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imaged.drivers import overlay
from tests.conformance.conftest import Bed


@pytest.mark.parametrize("driver", ["overlay"], indirect=True)
@pytest.mark.parametrize("count", [128, 500])
def test_legacy_mount_path(bed: Bed, deep_images: dict[int, str], count: int,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlay, "new_mount_api_has", lambda fstype, key: False)
    ref = bed.pull(deep_images[count])
    merged = bed.mount(ref, "--name", f"legacy{count}")
    assert (merged / "top").read_text() == f"{count - 1}\n"
    assert (merged / "layer-000").read_text() == "0\n"
    options = next(line.split()[3] for line in Path("/proc/self/mounts").read_text()
                   .splitlines() if line.split()[1] == str(merged))
    assert "lowerdir=" in options  # mount(2) style: one colon-separated list
    (merged / "written").write_text("upper works")
    bed.ok("umount", f"legacy{count}")
    again = bed.mount(ref, "--name", f"legacy{count}")
    assert (again / "written").read_text() == "upper works"
