"""``imaged advise`` end to end: an image with a database under /var/lib, pushed to the real
local registry and pulled into a real store; advice from a committed-format report, from the
model ``bench copyup`` keeps in the root, and from a calibration; bad input as one line; and
``GET /v1/images/{ref}/advice`` on the daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imaged.bench.copyup import keep_model
from imaged.cli.client import DaemonClient, segment
from imaged.errors import NotFoundError
from imaged.testing.images import OCILayout, directory, file, push, streamed
from imaged.testing.registry import LocalRegistry
from tests.conftest import Daemon

MIB = 1 << 20
DB = "var/lib/postgresql/15/main/base/16384/2619"


def _report(directory_: Path) -> Path:
    """A small bench copyup report of the committed shape: overlay's first write grows with
    the file, fuse partial's stays flat (milliseconds, as the bench writes them)."""
    series = {}
    for config, costs in (("overlay", {1: 5.0, 16: 40.0, 256: 600.0}),
                          ("fuse partial", {1: 9.0, 16: 9.0, 256: 9.0})):
        for size, ms in costs.items():
            series[f"{config}: first write {size}M cold"] = {
                "unit": "milliseconds", "median": ms, "min": ms, "max": ms, "samples": [ms]}
    path = directory_ / "copyup.json"
    path.write_text(json.dumps({
        "title": "Copy-up and container I/O on ext4", "facts": {"kernel": "test"}, "ratios": {},
        "notes": ["fuse-overlayfs: not measured: fuse-overlayfs is not installed"],
        "series": series}))
    return path


def _pushed(layout: OCILayout, registry: LocalRegistry, repo: str) -> str:
    """Three layers: a base with a large file a later layer whites out, a database and the
    dpkg status file, and a layer that deletes the base's file and adds a small one."""
    base = layout.add_layer([directory("srv"), streamed("srv/old.db", 20 * MIB, False),
                             directory("usr"), streamed("usr/big.so", 40 * MIB, False)])
    data = layout.add_layer([
        directory("var"), directory("var/lib"), directory("var/lib/postgresql"),
        directory("var/lib/postgresql/15"), directory("var/lib/postgresql/15/main"),
        directory("var/lib/postgresql/15/main/base"),
        directory("var/lib/postgresql/15/main/base/16384"),
        streamed(DB, 64 * MIB, False),
        directory("var/lib/dpkg"), streamed("var/lib/dpkg/status", 2 * MIB, False)])
    top = layout.add_layer([file("srv/.wh.old.db", b""), file("etc-motd", b"hello\n")])
    manifest = layout.add_image([base, data, top])
    tag = repo.replace("/", "-")
    layout.tag(manifest, tag)
    ref = f"{registry.host}/{repo}:v1"
    push(layout, tag, ref)
    return ref


@pytest.fixture
def pulled(registry: LocalRegistry, layout: OCILayout, imaged: Any, request: Any) -> str:
    test = request.node.originalname.removeprefix("test_").replace("_", "-")
    ref = _pushed(layout, registry, f"advise/{test}")
    result = imaged("pull", ref)
    assert result.code == 0, result.err
    return ref


@pytest.mark.cli_modes
def test_advice_from_a_report(pulled: str, imaged: Any, tmp_path: Path) -> None:
    report = _report(tmp_path)
    result = imaged("--json", "advise", pulled, "--report", str(report))
    assert result.code == 0, result.err
    advice = result.json()
    assert advice["model"] == {"source": "measured", "from": str(report),
                               "environment": {"kernel": "test"}}
    files = {f["path"]: f for f in advice["files"]}
    # The whited-out file is gone; the library nobody writes is not listed.
    assert list(files) == [f"/{DB}", "/var/lib/dpkg/status"]
    db = files[f"/{DB}"]
    assert db["size"] == 64 * MIB and db["reason"] == "PostgreSQL data"
    costs = {c["config"]: c for c in db["costs"]}
    assert set(costs) == {"overlay", "fuse partial"}
    assert costs["overlay"]["source"] == "measured" and not costs["overlay"]["extrapolated"]
    assert 0.040 < costs["overlay"]["seconds"] < 0.600  # between 16M and 256M, log-log
    assert costs["fuse partial"]["seconds"] == pytest.approx(0.009)
    assert db["advice"] == "mount a volume at /var/lib/postgresql"
    # 2 MiB of package database: a few milliseconds, nothing to do.
    assert files["/var/lib/dpkg/status"]["advice"].startswith("nothing to do: copy-up of this "
                                                              "file costs ~")
    not_measured = {(r["config"], r["why"]) for r in advice["not_measured"]}
    assert ("fuse-overlayfs", "not measured: fuse-overlayfs is not installed") in not_measured
    assert any(config == "volume" and why.startswith("not measured: ")
               for config, why in not_measured)
    table = imaged("advise", pulled, "--report", str(report))
    assert table.code == 0, table.err
    assert f"/{DB}  64 MiB  PostgreSQL data" in table.out
    assert "  advice: mount a volume at /var/lib/postgresql" in table.out


@pytest.mark.cli_modes
def test_advice_from_a_calibration(pulled: str, imaged: Any, root: Path) -> None:
    result = imaged("--json", "advise", pulled)
    assert result.code == 0, result.err
    advice = result.json()
    assert advice["model"]["source"] == "calibrated"
    assert advice["model"]["from"] == "calibration"
    db = next(f for f in advice["files"] if f["path"] == f"/{DB}")
    assert {c["config"] for c in db["costs"]} == {"overlay", "fuse full"}
    assert all(c["source"] == "calibrated" and c["seconds"] > 0 for c in db["costs"])
    assert all(c["filesystem"] == advice["filesystem"] for c in db["costs"])
    partial = next(r for r in advice["not_measured"] if r["config"] == "fuse partial")
    assert partial["why"].startswith("not measured: a calibration times whole-file copies")
    assert not (root / "bench").exists() or not any((root / "bench").iterdir())


def test_advice_from_the_model_bench_copyup_keeps(pulled: str, imaged: Any, root: Path,
                                                  tmp_path: Path) -> None:
    kept = keep_model(_report(tmp_path), root)
    assert kept == root / "bench" / "copyup.json"
    assert json.loads(kept.read_text())["version"] == 1
    advice = imaged("--json", "advise", pulled).json()
    assert advice["model"]["from"] == str(kept)
    assert advice["model"]["source"] == "measured"


def test_no_model_is_kept_without_a_store(tmp_path: Path) -> None:
    assert keep_model(_report(tmp_path), tmp_path / "nothing") is None


@pytest.mark.cli_modes
def test_bad_input_is_one_line(pulled: str, imaged: Any, tmp_path: Path,
                               registry: LocalRegistry) -> None:
    missing = imaged("advise", f"{registry.host}/advise/never-pulled:v1")
    assert missing.code == 1
    assert missing.err.strip() == (f"imaged: error: no image {registry.host}/advise/"
                                   "never-pulled:v1 in this store (pull it first)")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"title": "Copy-up and container I/O on ext4", "series": {')
    broken = imaged("advise", pulled, "--report", str(corrupt))
    assert broken.code == 1
    assert broken.err.startswith(f"imaged: error: {corrupt} is not a copy-up model or report "
                                 "(not JSON")
    assert len(broken.err.strip().splitlines()) == 1
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"format": "imaged copyup model", "version": 99, "rows": []}))
    other = imaged("--json", "advise", pulled, "--report", str(future))
    assert other.code == 1
    assert "version 99; this imaged reads 'imaged copyup model' version 1" in other.err
    assert other.json()["error"]["code"] == "invalid"
    gone = imaged("advise", pulled, "--report", str(tmp_path / "nowhere.json"))
    assert gone.code == 1
    assert "cannot read the report" in gone.err and "No such file" in gone.err


def test_the_api_route(registry: LocalRegistry, layout: OCILayout, daemon: Daemon,
                       tmp_path: Path) -> None:
    ref = _pushed(layout, registry, "advise/api")
    client = DaemonClient(daemon.socket, timeout=120)
    try:
        events = list(client.stream("POST", "/v1/images/pull", {"ref": ref}))
        assert events[-1]["status"] == "done", events[-1]
        report = _report(tmp_path)
        advice = client.call("GET", f"/v1/images/{segment(ref)}/advice?report="
                             f"{segment(str(report))}")
        assert [f["path"] for f in advice["files"]] == [f"/{DB}", "/var/lib/dpkg/status"]
        # The answer has exactly the fields the OpenAPI document declares, at every level.
        schemas = client.call("GET", "/v1/openapi.json")["components"]["schemas"]
        assert set(advice) == set(schemas["Advice"]["properties"])
        assert set(advice["files"][0]) == set(schemas["AdviceFile"]["properties"])
        assert set(advice["files"][0]["costs"][0]) == set(schemas["Cost"]["properties"])
        with pytest.raises(NotFoundError, match="pull it first"):
            client.call("GET", f"/v1/images/{segment(registry.host + '/no/such:v1')}/advice")
    finally:
        client.close()


def test_a_lost_layer_blob_is_one_line(pulled: str, imaged: Any, root: Path) -> None:
    images = imaged("--json", "images").json()
    layers = sorted((root / "content" / "blobs" / "sha256").iterdir(),
                    key=lambda p: p.stat().st_size)
    layers[-1].unlink()  # the largest blob: the database's layer
    result = imaged("advise", pulled)
    assert result.code == 1
    assert result.err.startswith(f"imaged: error: layer blob sha256:{layers[-1].name} of image "
                                 f"{images[0]['id'][7:19]}")
    assert result.err.strip().endswith("is not in the content store (imaged check --repair "
                                       "fetches it again)")
