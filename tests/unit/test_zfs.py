"""The zfs driver's pure parts: reading ``zfs get -H -p`` output, what a failed command means,
dataset names, which datasets a destroy would orphan, and the children-first order in which
gc and recovery hand layers to a driver."""

from __future__ import annotations

from pathlib import Path

import pytest

from imaged.config import Config
from imaged.digest import Digest
from imaged.drivers import zfs
from imaged.errors import InvalidError
from imaged.store.metadata import Metadata
from tests.conftest import filesystem_type

GET = (
    "tank/imaged/containers\tused\t98304\n"
    "tank/imaged/containers\tquota\t0\n"
    "tank/imaged/containers/web\tused\t67141632\n"
    "tank/imaged/containers/web\tquota\t67108864\n"
    "tank/imaged/containers/db\tused\t90112\n"
    "tank/imaged/containers/db\tquota\t0\n"
)


def test_parse_get() -> None:
    props = zfs.parse_get(GET)
    assert props["tank/imaged/containers/web"] == {"used": "67141632", "quota": "67108864"}
    assert set(props) == {"tank/imaged/containers", "tank/imaged/containers/web",
                          "tank/imaged/containers/db"}
    assert zfs.parse_get("") == {}


@pytest.mark.parametrize(("value", "quota"), [("0", None), ("none", None), ("-", None),
                                              ("67108864", 67108864)])
def test_quota_value(value: str, quota: int | None) -> None:
    assert zfs.quota_value(value) == quota


@pytest.mark.parametrize(("stderr", "kind"), [
    ("cannot open 'tank/x': dataset does not exist\n", "missing"),
    ("cannot open 'nopool': no such pool\n", "no-pool"),
    ("connect: No such file or directory\nPlease make sure that the zfs-fuse daemon is "
     "running.\ninternal error: failed to initialize ZFS library\n", "daemon"),
    ("internal error: Connection reset by peer\n", "daemon"),
    ("The ZFS modules are not loaded.\nTry running '/sbin/modprobe zfs' as root to load "
     "them.\n", "daemon"),
    ("cannot create 'tank/x': dataset already exists\n", "exists"),
    ("cannot destroy 'tank/l/a': filesystem has dependent clones\nuse '-R' to destroy the "
     "following datasets:\ntank/l/b\n", "clones"),
    ("cannot destroy 'tank/l/a': dataset is busy\n", "busy"),
    ("cannot create 'tank/x': out of space\n", "other"),
])
def test_classify(stderr: str, kind: str) -> None:
    assert zfs.classify(stderr) == kind


def test_dependents_are_the_clones_of_any_snapshot() -> None:
    origins = {
        "tank/i": "-", "tank/i/layers": "-",
        "tank/i/layers/a": "-", "tank/i/layers/a@layer": "-",
        "tank/i/layers/b": "tank/i/layers/a@layer",
        "tank/i/layers/c": "tank/i/layers/a2@layer",  # "a" is a prefix of "a2", not its dataset
        "tank/i/containers/web": "tank/i/layers/a@other",
        "tank/i/containers/db": "tank/i/layers/b@layer",
    }
    assert zfs.dependents(origins, "tank/i/layers/a") == ["tank/i/containers/web",
                                                          "tank/i/layers/b"]
    assert zfs.dependents(origins, "tank/i/layers/b") == ["tank/i/containers/db"]
    assert zfs.dependents(origins, "tank/i/containers/db") == []


@pytest.mark.parametrize("name", ["tank", "tank/imaged", "pool-1/a_b/c.d:e", "t" * 115])
def test_valid_dataset_names(name: str) -> None:
    zfs.check_dataset_name(name)


@pytest.mark.parametrize(("name", "why"), [
    ("tank/with space", "may hold only"),
    ("tank/a@snap", "may hold only"),
    ("tank/a#bookmark", "may hold only"),
    ("tank/../etc", "'..' is not a name"),
    ("/tank/imaged", "empty component"),
    ("tank/imaged/", "empty component"),
    ("tank//imaged", "empty component"),
    ("1tank/imaged", "starts with a letter"),
    ("t" * 116, "leave room"),
])
def test_invalid_dataset_names_name_the_fix(name: str, why: str) -> None:
    with pytest.raises(InvalidError, match=why) as exc:
        zfs.check_dataset_name(name)
    assert "[drivers.zfs] dataset" in exc.value.message


def test_no_dataset_configured_names_the_key(tmp_path: Path) -> None:
    if filesystem_type(tmp_path) in ("zfs", "fuseblk"):
        pytest.skip("the test directory is on ZFS here")
    probe = zfs.probe(Config(root=tmp_path / "root"))
    assert not probe.supported and probe.capabilities is None
    assert 'set [drivers.zfs] dataset = "pool/imaged"' in probe.reason


def test_invalid_configured_dataset_is_unsupported_before_any_command(tmp_path: Path) -> None:
    probe = zfs.probe(Config(root=tmp_path, drivers={"zfs": {"dataset": "tank/bad name"}}))
    assert not probe.supported and "invalid ZFS dataset name 'tank/bad name'" in probe.reason


def test_layer_lists_come_children_first(tmp_path: Path) -> None:
    """gc and recovery remove layers in the order the metadata lists them: a chain's top
    first, so a zfs layer is never destroyed under the clones of its snapshot."""
    meta = Metadata(tmp_path / "metadata.db")
    try:
        chain = [Digest.of(f"layer {i}".encode()) for i in range(4)]
        for parent, layer in zip([None, *chain], chain, strict=False):
            meta.begin_layer(layer, parent, layer, "zfs")
        assert meta.layers_in_state("creating") == [str(c) for c in reversed(chain)]
        meta.finish_layers({c: (1, 1) for c in chain})
        assert meta.unused_layers() == [str(c) for c in reversed(chain)]
    finally:
        meta.close()
