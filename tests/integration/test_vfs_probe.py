"""vfs' reflink test on a root that cannot take its test files: a filesystem the kernel turned
read-only after an I/O error (issue 17) must leave ``imaged info`` answering, with no reflink,
instead of failing on the probe. A read-only bind mount is the same answer (EROFS) from a real
kernel, without a failing disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

from imaged.config import Config
from imaged.drivers.vfs import probe, reflink_supported
from imaged.host.mounts import unmount


def test_a_read_only_root_probes_as_no_reflink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "drivers" / "vfs").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(root)], check=True)
        assert reflink_supported(root / "drivers" / "vfs") is None
        found = probe(Config(root=root))
    finally:
        unmount(root)
    assert found.supported and found.capabilities is not None
    assert found.capabilities.reflink is False
    assert "reflinked" not in found.reason
