"""The aufs driver's pure parts: branch options and their split across remounts, whiteout names,
the probe; and the unpacker's AUFS mode on a real tar. No aufs is needed (no kernel here has
it): what reaches mount(2) is checked as text, against aufs(5)'s syntax and mount(2)'s page.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imaged.config import Config
from imaged.digest import Digest
from imaged.drivers import registry
from imaged.drivers.aufs import (
    FLAGS,
    AufsDriver,
    branch_max,
    capabilities,
    mount_specs,
    probe,
    probe_with,
)
from imaged.errors import InvalidError
from imaged.host.mounts import MountSpec, kernel_filesystems
from imaged.layers.layerplan import Action, classify
from imaged.layers.unpack import UnpackLimits, WhiteoutMode, unpack_layer

PAGE = 4096
XINO = Path("/x/xino/c")


def layer_paths(count: int, root: str = "/var/lib/imaged") -> list[Path]:
    """``count`` layer directories as the driver names them (64-hex chain IDs), top first."""
    return [Path(f"{root}/drivers/aufs/layers/{hashlib.sha256(b'%d' % i).hexdigest()}")
            for i in range(count)]


def branches_of(specs: list[MountSpec]) -> list[str]:
    """Every branch the mount and its remounts name, in the order aufs stacks them."""
    first, *remounts = specs
    assert first.options[0].startswith("br:")
    out = first.options[0].removeprefix("br:").split(":")
    for spec in remounts:
        assert spec.options[0] == "remount"
        assert all(o.startswith("append:") for o in spec.options[1:])
        out += [o.removeprefix("append:") for o in spec.options[1:]]
    return out


def page_bytes(spec: MountSpec) -> int:
    """What mount(2) receives for ``spec`` with read_only (mount_with_command adds ``ro``),
    with its NUL: the longest it can be."""
    return len(",".join((*spec.options, "ro")).encode()) + 1


# -- branch options ------------------------------------------------------------------------


def test_upper_first_then_layers_top_to_base_with_flags() -> None:
    specs = mount_specs(Path("/c/upper"), [Path("/l/top"), Path("/l/mid"), Path("/l/base")],
                        XINO, PAGE)
    assert specs == [MountSpec("aufs", "none", (
        "br:/c/upper=rw:/l/top=ro+wh:/l/mid=ro+wh:/l/base=ro+wh",
        "xino=/x/xino/c", "dirperm1", "udba=none"))]
    assert FLAGS == ("dirperm1", "udba=none")


def test_read_only_mount_has_no_writable_branch() -> None:
    (spec,) = mount_specs(None, [Path("/l/top"), Path("/l/base")], XINO, PAGE)
    assert spec.options[0] == "br:/l/top=ro+wh:/l/base=ro+wh"
    assert "=rw" not in ",".join(spec.options)


def test_no_layers_is_refused() -> None:
    with pytest.raises(InvalidError, match="without layers"):
        mount_specs(Path("/c/upper"), [], XINO, PAGE)


def test_500_layers_split_into_mount_and_append_remounts() -> None:
    layers = layer_paths(500)
    upper = Path("/var/lib/imaged/drivers/aufs/containers/web/fs/upper")
    specs = mount_specs(upper, layers, Path("/var/lib/imaged/drivers/aufs/xino/web"), PAGE)
    assert len(specs) > 1
    assert all(page_bytes(spec) <= PAGE for spec in specs)
    assert branches_of(specs) == [f"{upper}=rw"] + [f"{layer}=ro+wh" for layer in layers]
    # Packed greedily: the next branch would not have fitted in any page but the last.
    for spec, following in itertools.pairwise(specs):
        extra = following.options[1].removeprefix("append:")
        grown = (f"{spec.options[0]}:{extra}", *spec.options[1:]) if spec is specs[0] \
            else (*spec.options, following.options[1])
        assert page_bytes(MountSpec("aufs", "none", grown)) > PAGE
    # 106 bytes a layer branch: the upper and 37 layers in the mount, 35 in each remount.
    assert [len(spec.options) - 1 for spec in specs[1:]] == [35] * 13 + [8]


@given(count=st.integers(1, 600), page=st.integers(600, 8192),
       depth=st.integers(0, 40), read_only=st.booleans())
def test_split_keeps_every_branch_once_in_order_within_the_page(
        count: int, page: int, depth: int, read_only: bool) -> None:
    layers = layer_paths(count, "/r" + "/d" * depth)
    upper = None if read_only else Path("/r/containers/c/upper")
    specs = mount_specs(upper, layers, XINO, page)
    expected = ([] if upper is None else [f"{upper}=rw"]) + [f"{p}=ro+wh" for p in layers]
    assert branches_of(specs) == expected
    assert all(page_bytes(spec) <= page for spec in specs)
    assert specs[0].options[1:] == (f"xino={XINO}", *FLAGS)


def test_a_branch_longer_than_a_page_is_refused() -> None:
    with pytest.raises(InvalidError, match="too long for one page"):
        mount_specs(None, [Path("/" + "x" * 5000)], XINO, PAGE)


@pytest.mark.parametrize("bad", [",", ":", "="])
@pytest.mark.parametrize("where", ["upper", "layer"])
def test_branch_paths_aufs_would_misparse_are_refused(bad: str, where: str) -> None:
    odd = Path(f"/srv/im{bad}aged/x")
    upper, layers = (odd, [Path("/l/a")]) if where == "upper" else (Path("/u"), [Path("/l/a"), odd])
    with pytest.raises(InvalidError, match=f"aufs forbids {bad!r} in branch paths") as caught:
        mount_specs(upper, layers, XINO, PAGE)
    assert str(odd) in str(caught.value)


def test_xino_path_with_a_comma_is_refused() -> None:
    with pytest.raises(InvalidError, match="xino"):
        mount_specs(None, [Path("/l/a")], Path("/x,y/xino"), PAGE)


# -- whiteouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["passwd", ".profile", "dir with space"])
def test_whiteouts_kept_for_aufs_are_what_other_modes_delete(name: str) -> None:
    entry = f"etc/.wh.{name}".encode()
    assert classify(entry, WhiteoutMode.AUFS) == (Action.CREATE, entry)
    assert classify(entry, WhiteoutMode.DELETE) == (Action.WHITEOUT, f"etc/{name}".encode())


def tar_of(entries: list[tuple[str, bytes | None]]) -> bytes:
    """An uncompressed tar of files (bytes) and directories (None), owned by this process."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.uid, info.gid, info.mtime = os.getuid(), os.getgid(), 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_unpacker_keeps_aufs_whiteouts_as_files(tmp_path: Path) -> None:
    tar = tar_of([
        ("etc", None), ("etc/hostname", b"box\n"), ("etc/.wh.passwd", b""),
        ("var", None), ("var/.wh..wh..opq", b""), ("var/new", b"n"),
        (".wh..wh.plnk", None), (".wh..wh.plnk/12.34", b"pseudo-link"),
    ])
    blob = tmp_path / "layer.tar"
    blob.write_bytes(tar)
    target = tmp_path / "layer"
    target.mkdir()
    stats = unpack_layer(blob, "application/vnd.oci.image.layer.v1.tar", Digest.of(tar),
                         target, WhiteoutMode.AUFS, UnpackLimits(1 << 20, 100))
    assert stats.entries == 8
    found = {str(p.relative_to(target)) for p in target.rglob("*")}
    assert found == {"etc", "etc/hostname", "etc/.wh.passwd", "var", "var/.wh..wh..opq",
                     "var/new", ".wh..wh.plnk", ".wh..wh.plnk/12.34"}
    assert (target / "etc/.wh.passwd").is_file()
    assert (target / "var/.wh..wh..opq").is_file()
    assert (target / ".wh..wh.plnk/12.34").read_bytes() == b"pseudo-link"


# -- probe and driver ----------------------------------------------------------------------


def test_probe_here_says_the_kernel_has_no_aufs(tmp_path: Path) -> None:
    if "aufs" in kernel_filesystems():
        pytest.skip("this kernel has aufs: the conformance battery covers it")
    result = probe(Config(root=tmp_path / "root"))
    assert not result.supported
    assert result.reason == "aufs not supported by this kernel (not in /proc/filesystems)"
    assert result.capabilities is None


@pytest.mark.parametrize(("config", "branches"), [
    (None, 127),
    ("CONFIG_AUFS_FS=m\nCONFIG_AUFS_BRANCH_MAX_127=y\n", 127),
    ("CONFIG_AUFS_FS=m\nCONFIG_AUFS_BRANCH_MAX_1023=y\nCONFIG_AUFS_SBILIST=y\n", 1023),
    ("CONFIG_AUFS_BRANCH_MAX_32767=y\n", 32767),
])
def test_branch_max_from_the_module_config(config: str | None, branches: int) -> None:
    assert branch_max(config) == branches


def test_probe_where_aufs_exists() -> None:
    result = probe_with({"ext4", "aufs", "overlay"}, 127)
    assert result.supported
    caps = result.capabilities
    assert caps is not None
    assert (caps.family, caps.whiteouts, caps.quota_mode, caps.rename_lower_dirs) == \
        ("stacked", WhiteoutMode.AUFS, "loop", False)
    assert caps.max_layers == 126  # one of 127 branches is the upper
    assert "126 layers" in result.reason
    big = probe_with({"aufs"}, 32767).capabilities
    assert big is not None and big.max_layers == 500
    assert not probe_with({"ext4", "overlay"}, 127).supported


def test_registered_with_its_probe_and_driver() -> None:
    assert registry()["aufs"] == (probe, AufsDriver)


def test_driver_mount_specs_and_layer_limit(tmp_path: Path) -> None:
    home = tmp_path / "drivers" / "aufs"
    driver = AufsDriver(Config(root=tmp_path), home)
    driver.create_container("web", ["a", "b", "c"], None, read_only=False)
    (spec,) = driver.mount_specs("web", ["a", "b", "c"], read_only=False)
    layers = home / "layers"
    assert spec.options == (
        f"br:{home}/containers/web/upper=rw:{layers}/c=ro+wh:{layers}/b=ro+wh:{layers}/a=ro+wh",
        f"xino={home}/xino/web", *FLAGS)
    limit = driver.capabilities().max_layers
    with pytest.raises(InvalidError, match=f"at most {limit}"):
        driver.mount("web", [f"l{i}" for i in range(limit + 1)], False, None)


def test_an_image_deeper_than_aufs_stacks_is_refused_before_any_fetch() -> None:
    """aufs runs nowhere here, so its limit is checked as the pull checks it: on the
    capabilities, with the manifest's layer count, before a blob is fetched."""
    caps = capabilities(127)  # the usual CONFIG_AUFS_BRANCH_MAX_127
    assert caps.max_layers == 126
    caps.check_depth(126, "aufs")
    with pytest.raises(InvalidError, match="the image has 128 layers; the aufs driver stacks at "
                                           "most 126 here"):
        caps.check_depth(128, "aufs")
