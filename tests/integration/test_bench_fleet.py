"""``imaged bench fleet`` end to end, small: the report it writes, and the upstream counts that
are its point (a peer spares the registry the second node's bytes; direct pays for each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def test_small_fleet_report(imaged_proc: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = imaged_proc("bench", "fleet", "--nodes", "1,2", "--size", "2M", "--runs", "1",
                         "--out", str(out))
    assert result.code == 0, result.err
    report = json.loads((out / "fleet.json").read_text())
    upstream = {name: s["median"] for name, s in report["series"].items()
                if s["unit"] == "MiB"}
    image = upstream["direct, 1 nodes: upstream"]
    assert 2 <= image < 2.5  # the layers, plus a config and a manifest
    assert upstream["direct, 2 nodes: upstream"] == 2 * image
    assert upstream["peer, 2 nodes: upstream"] == image  # the seed's own pull, nothing more
    # A cache fetches each blob at most twice on its first miss, and nothing once warm.
    assert image <= upstream["warmed cache, 2 nodes: upstream"] <= 2 * image
    assert all(s["median"] > 0 for s in report["series"].values() if s["unit"] == "seconds")
    text = (out / "fleet.md").read_text()
    assert "The figure that carries over to a real fleet is upstream bytes" in text
    assert (out / "fleet.png").stat().st_size > 0
