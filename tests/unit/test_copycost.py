"""The copy-up cost model (imaged.ops.copycost): loading a model or a bench report, refusing
one of another version or a damaged one, and predicting between and beyond measured sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from imaged.ops import copycost
from imaged.ops.copycost import ModelError, interpolate

MIB = 1 << 20
CHECKOUT = Path(__file__).resolve().parents[2]


def report(series: dict[str, list[float]], notes: tuple[str, ...] = (),
           filesystem: str = "ext4") -> dict[str, Any]:
    """A bench copyup report of the committed shape, medians in milliseconds."""
    return {"title": f"Copy-up and container I/O on {filesystem}", "facts": {"imaged": "0.1.0"},
            "ratios": {}, "notes": list(notes),
            "series": {name: {"unit": "milliseconds", "median": sorted(s)[len(s) // 2],
                              "min": min(s), "max": max(s), "samples": s}
                       for name, s in series.items()}}


SMALL_REPORT = report({
    "overlay: first write 1M cold": [4.0, 5.0, 6.0],
    "overlay: first write 1M warm": [1.0, 1.0, 1.0],
    "overlay: first write 256M cold": [1000.0, 1024.0, 1100.0],
    "overlay: fsync after it 1M cold": [0.5, 0.5, 0.5],
    "fuse partial: first write 1M cold": [10.0, 10.0, 10.0],
    "fuse partial: first write 256M cold": [10.0, 10.0, 10.0],
}, notes=("fuse-overlayfs: not measured: fuse-overlayfs is not installed",))


def test_a_report_is_projected_onto_model_rows() -> None:
    model = copycost.load(SMALL_REPORT, "r.json")
    assert model.source == "measured"
    assert model.configurations() == [("overlay", "ext4"), ("fuse partial", "ext4")]
    cold = [r for r in model.rows if r.config == "overlay" and r.temperature == "cold"]
    assert [(r.size, r.median, r.low, r.high, r.runs) for r in cold] == [
        (MIB, 0.005, 0.004, 0.006, 3), (256 * MIB, 1.024, 1.0, 1.1, 3)]
    assert [(a.config, a.why) for a in model.absent] == [
        ("fuse-overlayfs", "not measured: fuse-overlayfs is not installed")]


def test_a_model_round_trips_through_its_file_format() -> None:
    model = copycost.load(SMALL_REPORT, "r.json")
    document = json.loads(json.dumps(model.to_json()))
    assert document["version"] == copycost.VERSION
    again = copycost.load(document, "m.json")
    assert again.rows == model.rows and again.absent == model.absent


def test_the_committed_report_loads() -> None:
    model = copycost.load(json.loads((CHECKOUT / "docs/bench/copyup.json").read_text()),
                          "docs/bench/copyup.json")
    assert ("overlay", "ext4") in model.configurations()
    one_gib = model.predict("overlay", "ext4", 1 << 30)
    assert one_gib is not None and one_gib.seconds > 0.1 and not one_gib.extrapolated


@pytest.mark.parametrize(("document", "message"), [
    ([1, 2], "not a JSON object"),
    ({"hello": 1}, "not a copy-up model or report"),
    ({**copycost.load(SMALL_REPORT, "r").to_json(), "version": 2},
     "version 2; this imaged reads 'imaged copyup model' version 1"),
    ({"format": copycost.FORMAT, "version": 1, "source": "measured", "rows": [{"config": "x"}]},
     "damaged copy-up model (KeyError"),
    ({**copycost.load(SMALL_REPORT, "r").to_json(), "source": "guessed"},
     "damaged copy-up model"),
    (report({"overlay: first write 1M cold": [-1.0]}), "damaged copy-up report"),
    (report({"overlay: read 1M cold": [5.0]}), "has no cold first-write rows"),
])
def test_bad_documents_are_one_line_errors(document: Any, message: str) -> None:
    with pytest.raises(ModelError) as caught:
        copycost.load(document, "x.json")
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def test_between_measured_sizes_is_log_log() -> None:
    # Cost proportional to size is a straight line on log-log: exact in between.
    points = [(MIB, 0.004), (256 * MIB, 1.024)]
    seconds, outside = interpolate(points, 16 * MIB)
    assert not outside
    assert math.isclose(seconds, 0.064)
    # Flat stays flat.
    seconds, outside = interpolate([(MIB, 0.01), (256 * MIB, 0.01)], 16 * MIB)
    assert seconds == pytest.approx(0.01) and not outside
    # At a measured point, its value.
    assert interpolate(points, MIB) == (0.004, False)


def test_beyond_measured_sizes_is_linear_and_marked() -> None:
    points = [(MIB, 0.004), (256 * MIB, 1.024)]
    seconds, outside = interpolate(points, 1024 * MIB)
    assert outside
    slope = (1.024 - 0.004) / (255 * MIB)
    assert math.isclose(seconds, 1.024 + slope * 768 * MIB)
    # Below the smallest: linear, but never below the smallest point scaled down (no zeros).
    seconds, outside = interpolate(points, MIB // 4)
    assert outside and seconds == pytest.approx(0.001)
    # A flat configuration stays flat past its largest size.
    assert interpolate([(MIB, 0.01), (256 * MIB, 0.01)], 4096 * MIB) == (0.01, True)


def test_predictions_use_the_cold_rows_and_say_so() -> None:
    model = copycost.load(SMALL_REPORT, "r.json")
    prediction = model.predict("overlay", "ext4", 16 * MIB)
    assert prediction is not None
    assert prediction.source == "measured" and not prediction.extrapolated
    assert 0.005 < prediction.seconds < 1.024
    assert model.predict("overlay", "xfs", MIB) is None
    assert model.predict("btrfs", "ext4", MIB) is None


def test_a_calibration_prices_whole_file_copy_up_only() -> None:
    model = copycost.calibrated(100e6, "ext4", {"calibration": "x"}, "0.1.0")
    assert model.source == "calibrated"
    assert {c for c, _ in model.configurations()} == set(copycost.WHOLE_FILE)
    prediction = model.predict("overlay", "ext4", 100 * MIB)
    assert prediction is not None and prediction.source == "calibrated"
    assert math.isclose(prediction.seconds, 100 * MIB / 100e6)
    assert {a.config for a in model.absent} == {"fuse partial", "volume"}
    assert all(a.why.startswith("not measured: ") for a in model.absent)


def test_a_matrix_report_names_each_rows_filesystem() -> None:
    """Since bench copyup measures ext4, xfs and btrfs, every series names its filesystem
    and the title lists them all; "not measured" notes name theirs too."""
    matrix = report({
        "overlay on ext4: first overwrite 1M cold": [4.0],
        "overlay on xfs: first overwrite 1M cold": [0.5],
        "fuse reflink on xfs: first overwrite 16M cold": [2.0],
        "overlay on xfs: first append 1M cold": [9.0],  # another operation: not the model's
    }, notes=("fuse reflink on ext4: not measured: ext4 cannot clone extents (FICLONE)",
              "xfs not measured: mkfs.xfs is not installed",
              "zfs on zfs: not measured: not run by bench copyup"),
        filesystem="ext4, xfs, btrfs")
    model = copycost.load(matrix, "r.json")
    assert model.configurations() == [("overlay", "ext4"), ("overlay", "xfs"),
                                      ("fuse reflink", "xfs")]
    assert [r.median for r in model.rows if r.config == "overlay"] == [0.004, 0.0005]
    assert {(a.config, a.filesystem) for a in model.absent} == {("fuse reflink", "ext4"),
                                                                ("zfs", "zfs")}
