"""``imaged bench copyup --quick`` end to end: the report it writes, the model it keeps in the
root for ``imaged advise``, and nothing it mounted left behind (loop ext4, overlays, FUSE
servers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imaged.host.mounts import mountinfo
from imaged.ops import copycost


def _bench_mounts() -> list[str]:
    return [m.mount_point for m in mountinfo() if "imaged-bench-" in m.mount_point]


def test_quick_copyup_report(imaged_proc: Any, tmp_path: Path, root: Path) -> None:
    before = _bench_mounts()
    assert imaged_proc("images").code == 0  # a store on the root: the model is kept there
    result = imaged_proc("bench", "copyup", "--quick", "--out", str(tmp_path / "out"))
    assert result.code == 0, result.err
    kept = root / "bench" / "copyup.json"
    assert result.out.splitlines()[-1] == str(kept)
    model = copycost.load(json.loads(kept.read_text()), str(kept))
    assert model.source == "measured" and model.imaged
    overlay = model.predict("overlay", "ext4", 4 << 20)
    assert overlay is not None and overlay.seconds > 0 and not overlay.extrapolated
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
    # What each FUSE server was asked over one untar: one create per file at least, counted
    # by imaged's --count-requests and from fuse-overlayfs's debug log alike.
    for server in ("fuse full", "fuse-overlayfs"):
        assert report["requests"][server]["create"] >= 900
        assert report["requests"][server]["lookup"] >= report["requests"][server]["create"]
    assert _bench_mounts() == before
