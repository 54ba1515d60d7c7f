"""``imaged bench copyup --quick`` end to end: the report it writes, and nothing it mounted
left behind (loop ext4, overlays, FUSE servers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imaged.host.mounts import mountinfo


def _bench_mounts() -> list[str]:
    return [m.mount_point for m in mountinfo() if "imaged-bench-" in m.mount_point]


def test_quick_copyup_report(imaged_proc: Any, tmp_path: Path) -> None:
    before = _bench_mounts()
    result = imaged_proc("bench", "copyup", "--quick", "--out", str(tmp_path / "out"))
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "out" / "copyup.json").read_text())
    series = report["series"]
    for config in ("overlay", "fuse full"):
        assert series[f"{config}: first write 1M cold"]["median"] > 0
        # A whole-file copy-up: the upper grew by the whole 16 MiB, counted allocated.
        assert series[f"{config}: upper growth 16M warm"]["median"] >= 16 * 1024
        assert series[f"{config}: read 16M cold"]["median"] > 0
    # Measured once the server has --copy-up, a "not measured: why" row until then.
    assert "| fuse partial |" in (tmp_path / "out" / "copyup.md").read_text()
    assert (tmp_path / "out" / "copyup.png").stat().st_size > 0
    assert _bench_mounts() == before
