"""What ``imaged advise`` recommends from predicted costs, which configuration a root's driver
runs, what it cannot price, and report files that cannot be read (imaged.ops.advise)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest

from imaged.config import Config
from imaged.errors import ForbiddenError
from imaged.ops import copycost
from imaged.ops.advise import (
    Place,
    advise,
    costs,
    load_model,
    model_filesystem,
    not_measured,
    recommend,
)
from imaged.ops.copycost import ModelError, Prediction
from imaged.ops.writable import Candidate
from imaged.store.root import Store

MIB = 1 << 20
DB = Candidate("/var/lib/mysql/ibdata1", 512 * MIB, "MySQL data", "/var/lib/mysql")
STATUS = Candidate("/var/lib/dpkg/status", 64 * MIB, "the dpkg package database", None)


def cost(config: str, seconds: float, filesystem: str = "ext4") -> Prediction:
    return Prediction(config, filesystem, seconds, "measured", False)


@pytest.mark.parametrize(("candidate", "predictions", "current", "advice"), [
    (DB, [cost("overlay", 0.01)], "overlay", "nothing to do: copy-up of this file costs ~10 ms"),
    (DB, [cost("overlay", 2.0), cost("fuse partial", 0.01)], "overlay",
     "mount a volume at /var/lib/mysql"),
    (STATUS, [cost("overlay", 0.5), cost("fuse partial", 0.01)], "overlay",
     "use the fuse driver with partial copy-up"),
    (STATUS, [cost("overlay", 0.5), cost("fuse reflink", 0.001, "xfs")], "overlay",
     "put the root on xfs with reflink"),
    (STATUS, [cost("overlay", 0.5), cost("overlay", 0.01, "xfs")], "overlay",
     "put the root on xfs with reflink"),
    (STATUS, [cost("overlay", 0.5), cost("overlay volatile", 0.1)], "overlay",
     "mount the overlay with volatile (drivers.overlay.volatile): no fsync at copy-up"),
    # Cheaper, but not by enough to be worth a change.
    (STATUS, [cost("overlay", 0.5), cost("fuse partial", 0.3)], "overlay",
     "nothing cheaper measured: copy-up of this file costs ~500 ms (overlay)"),
    (STATUS, [cost("overlay", 0.5)], "btrfs",
     "no prediction for this root's configuration (btrfs): run imaged bench copyup on this "
     "root"),
])
def test_recommendations(candidate: Candidate, predictions: list[Prediction], current: str,
                         advice: str) -> None:
    assert recommend(candidate, predictions, current) == advice


def test_the_configuration_a_root_runs() -> None:
    def place(driver: str, **settings: object) -> Place:
        return Place(driver, "ext4", Config(drivers={driver: settings}))

    assert place("overlay").configuration(MIB) == "overlay"
    assert place("overlay", volatile=True).configuration(MIB) == "overlay volatile"
    assert place("fuse").configuration(MIB) == "fuse full"  # auto: whole below 16 MiB
    assert place("fuse").configuration(64 * MIB) == "fuse partial"  # by range above
    assert place("fuse", copy_up="full").configuration(64 * MIB) == "fuse full"
    assert place("fuse", partial_threshold=128 * MIB).configuration(64 * MIB) == "fuse full"
    assert place("btrfs").configuration(MIB) == "btrfs"


def test_costs_put_this_roots_configuration_first_and_prefer_its_filesystem() -> None:
    model = copycost.calibrated(100e6, "ext4", {}, "0")
    place = Place("fuse", "ext4", Config(drivers={"fuse": {"copy_up": "full"}}))
    assert [p.config for p in costs(model, place, MIB)] == ["fuse full", "overlay"]


def test_what_a_model_cannot_price_is_named_with_why() -> None:
    model = copycost.calibrated(100e6, "ext4", {}, "0")
    rows = not_measured(model, Place("btrfs", "btrfs", Config()))
    by_config = {(r["config"], r["filesystem"]): r["why"] for r in rows}
    assert by_config[("btrfs", "btrfs")].startswith("not measured: this model has no btrfs rows "
                                                    "on btrfs (it has fuse full on ext4")
    assert ("fuse reflink", "xfs") in by_config
    assert by_config[("fuse partial", "ext4")].startswith("not measured: a calibration")


def test_report_files_that_cannot_be_used(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    for path, words in ((tmp_path / "missing", "cannot read the report"),
                        (binary, "not text"), (empty, "not JSON"), (tmp_path, "cannot read")):
        with pytest.raises(ModelError, match=words):
            load_model(path)
    good = tmp_path / "model.json"
    good.write_text(json.dumps(copycost.calibrated(1e8, "ext4", {}, "0").to_json()))
    assert load_model(good).source == "calibrated"


def test_a_confined_peer_may_not_name_a_report() -> None:
    """The daemon would read the path with its own rights: refused before anything is read."""
    with pytest.raises(ForbiddenError, match="only root may name a report file"):
        advise(cast(Store, None), "img", Path("/etc/shadow"), confined=True)


@pytest.mark.parametrize(("predictions", "advice"), [
    # vfs pays its copy at container create, and a volume is advised only where a rule
    # names its place: neither is advised on its first-write numbers.
    ([cost("overlay", 0.5), cost("vfs", 0.0001), cost("volume", 0.0001)],
     "nothing cheaper measured: copy-up of this file costs ~500 ms (overlay)"),
    ([cost("overlay", 0.5), cost("btrfs", 0.001, "btrfs")],
     "use the btrfs driver: a container is a snapshot sharing the image's extents"),
    ([cost("overlay", 0.5), cost("overlay", 0.001, "btrfs")],
     "put the root on btrfs (overlay clones extents there)"),
    ([cost("overlay", 0.5), cost("overlay metacopy", 0.1)],
     "mount the overlay with metacopy (drivers.overlay.metacopy)"),
    # Several cheap enough: the least disruptive change, not the cheapest.
    ([cost("overlay", 0.5), cost("btrfs", 0.0001, "btrfs"), cost("overlay", 0.001, "xfs"),
      cost("fuse partial", 0.01)], "use the fuse driver with partial copy-up"),
    ([cost("overlay", 0.5), cost("fuse partial", 0.01), cost("overlay volatile", 0.2)],
     "mount the overlay with volatile (drivers.overlay.volatile): no fsync at copy-up"),
])
def test_recommendations_from_the_matrix(predictions: list[Prediction], advice: str) -> None:
    assert recommend(STATUS, predictions, "overlay") == advice


def test_costs_price_this_roots_configuration_on_every_filesystem_measured() -> None:
    """Moving the root is an alternative: overlay on xfs clones where ext4 copies."""
    rows = tuple(copycost.Row(config, fs, MIB, "cold", seconds, seconds, seconds, 1)
                 for config, fs, seconds in (("overlay", "ext4", 0.5), ("overlay", "xfs", 0.01),
                                             ("fuse partial", "ext4", 0.02),
                                             ("fuse partial", "xfs", 0.03)))
    model = copycost.Model("measured", rows)
    place = Place("overlay", "ext4", Config())
    assert [(p.config, p.filesystem) for p in costs(model, place, MIB)] == [
        ("overlay", "ext4"), ("overlay", "xfs"), ("fuse partial", "ext4")]


@pytest.mark.parametrize(("fstype", "driver", "kernel", "expected"), [
    ("ext4", "overlay", {"ext4", "overlay"}, "ext4"),
    ("ext4", "zfs", {"ext4"}, "zfs-fuse"),        # datasets elsewhere; no ZFS in this kernel
    ("fuse.zfs", "fuse", {"ext4", "fuse"}, "zfs-fuse"),  # a fuse root on a zfs-fuse dataset
    ("zfs", "zfs", {"zfs"}, "zfs"),              # OpenZFS: its own rows, never zfs-fuse's
])
def test_a_zfs_root_reads_the_rows_of_the_zfs_it_runs_on(fstype: str, driver: str,
                                                          kernel: set[str], expected: str) -> None:
    assert model_filesystem(fstype, driver, kernel) == expected


@pytest.mark.parametrize(("fstype", "devmapper_fs", "expected"), [
    ("ext4", "ext4", "thin-ext4"),   # the root's own filesystem is not where containers write
    ("xfs", "ext4", "thin-ext4"),
    ("ext4", "xfs", "thin-xfs"),     # drivers.devmapper.fs = "xfs"
])
def test_a_devmapper_root_reads_the_rows_of_its_thin_devices(fstype: str, devmapper_fs: str,
                                                              expected: str) -> None:
    assert model_filesystem(fstype, "devmapper", {"ext4", "xfs"}, devmapper_fs) == expected


def test_a_devmapper_root_is_priced_from_a_guest_report() -> None:
    """The rows ``bench copyup --filesystems devmapper`` writes (in the guest) price a
    devmapper root's own configuration first, with the in-guest alternatives after it."""
    series = {f"{config} on thin-ext4: first overwrite {size} cold":
              {"unit": "milliseconds", "median": ms, "min": ms, "max": ms, "samples": [ms]}
              for config, size, ms in (("devmapper", "1M", 0.9), ("devmapper", "256M", 1.1),
                                       ("overlay", "1M", 2.0), ("overlay", "256M", 400.0),
                                       ("volume", "1M", 0.1), ("volume", "256M", 0.3))}
    model = copycost.from_report({"title": "Copy-up and container I/O on thin-ext4",
                                  "series": series, "notes": [], "facts": {}}, "guest report")
    config = Config(drivers={"devmapper": {"fs": "ext4"}})
    place = Place("devmapper", model_filesystem("ext4", "devmapper", {"ext4"}), config)
    assert place.configuration(64 * MIB) == "devmapper"
    predicted = costs(model, place, 64 * MIB)
    assert [(p.config, p.filesystem) for p in predicted] == [
        ("devmapper", "thin-ext4"), ("overlay", "thin-ext4"), ("volume", "thin-ext4")]
    assert 0.0009 < predicted[0].seconds < 0.0011
    assert recommend(STATUS, predicted, "devmapper").startswith("nothing to do")
