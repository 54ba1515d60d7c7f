"""The driver conformance battery (issue 3): what every driver must do, run per driver."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imaged.config import Overrides, load_config
from imaged.drivers import registry as driver_registry
from imaged.host.mounts import is_mounted
from imaged.testing.images import Entry, directory, file, push, symlink
from tests.conformance.conftest import Bed

# The battery is also the CLI's suite: every case runs embedded and through a daemon.
pytestmark = [pytest.mark.cli_modes]


def test_layers_stack_with_whiteouts_and_opaque_dirs(bed: Bed) -> None:
    ref = bed.image(
        [directory("etc"), file("etc/keep", b"base\n"), file("etc/gone", b"x"),
         directory("opaque"), file("opaque/lower", b"hidden"), directory("data"),
         file("data/a", b"a")],
        [file("etc/new", b"top\n"), file("etc/.wh.gone", b""), directory("opaque"),
         file("opaque/.wh..wh..opq", b""), file("opaque/upper", b"shown"),
         file("data/a", b"changed")],
    )
    merged = bed.mount(ref, "--name", "stack")
    assert (merged / "etc/keep").read_bytes() == b"base\n"
    assert (merged / "etc/new").read_bytes() == b"top\n"
    assert not (merged / "etc/gone").exists()
    assert sorted(os.listdir(merged / "opaque")) == ["upper"]
    assert (merged / "data/a").read_bytes() == b"changed"
    assert not any(name.startswith(".wh.") for _, _, names in os.walk(merged) for name in names)


def test_rename_of_lower_directory_keeps_contents(bed: Bed) -> None:
    ref = bed.image([directory("dir"), directory("dir/sub"), file("dir/sub/f", b"payload")])
    merged = bed.mount(ref, "--name", "rename")
    if _probe(bed)["capabilities"]["rename_lower_dirs"]:
        os.rename(merged / "dir", merged / "moved")
        assert (merged / "moved/sub/f").read_bytes() == b"payload"
        assert not (merged / "dir").exists()
    else:
        with pytest.raises(OSError) as exc:
            os.rename(merged / "dir", merged / "moved")
        assert exc.value.errno == errno.EXDEV


def _probe(bed: Bed) -> dict[str, Any]:
    """The driver's line of ``imaged info``: supported, reason and capabilities."""
    probes = bed.ok("--json", "info").json()["drivers"]
    found: dict[str, Any] = next(d for d in probes if d["name"] == bed.driver)
    return found


# What each driver must claim on the bed this suite gives it (quota modes and reflink, which
# the host decides, aside). A driver that starts claiming less fails here instead of skipping
# the battery's cases: zfs runs on zfs-fuse, which stores no xattrs.
EXPECTED_CAPABILITIES: dict[str, dict[str, Any]] = {
    "overlay": {"family": "stacked", "whiteouts": "overlay", "quota_semantics": "writable",
                "rename_lower_dirs": True, "xattrs": True, "max_layers": 500},
    "aufs": {"family": "stacked", "whiteouts": "aufs", "quota_semantics": "writable",
             "rename_lower_dirs": False, "xattrs": True},
    "vfs": {"family": "snapshot", "whiteouts": "delete", "quota_semantics": "total",
            "rename_lower_dirs": True, "xattrs": True, "max_layers": 500},
    "btrfs": {"family": "snapshot", "whiteouts": "delete", "quota_semantics": "writable",
              "rename_lower_dirs": True, "xattrs": True, "reflink": True, "max_layers": 500},
    "zfs": {"family": "snapshot", "whiteouts": "delete", "quota_mode": "quota",
            "quota_semantics": "writable", "rename_lower_dirs": True, "xattrs": False,
            "max_layers": 500},
    "devmapper": {"family": "snapshot", "whiteouts": "delete", "quota_mode": "device size",
                  "quota_semantics": "total", "rename_lower_dirs": True, "xattrs": True,
                  "max_layers": 500},
    "fuse": {"family": "stacked", "whiteouts": "overlay", "quota_mode": "fuse",
             "quota_semantics": "writable", "rename_lower_dirs": False, "xattrs": True},
}


def test_capabilities_are_what_the_driver_promises(bed: Bed) -> None:
    caps = _probe(bed)["capabilities"]
    expected = EXPECTED_CAPABILITIES[bed.driver]
    assert {key: caps[key] for key in expected} == expected


def test_hardlinks_ownership_modes(bed: Bed) -> None:
    ref = bed.image([
        Entry("bin", type=tarfile.DIRTYPE, mode=0o755),
        Entry("bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0),
        Entry("bin/alias", type=tarfile.LNKTYPE, target="bin/tool"),
        Entry("home", type=tarfile.DIRTYPE, mode=0o1777),
        Entry("home/owned", b"mine", mode=0o640, uid=1234, gid=5678),
        symlink("home/link", "../bin/tool"),
    ])
    merged = bed.mount(ref, "--name", "meta")
    tool, alias = (merged / "bin/tool").stat(), (merged / "bin/alias").stat()
    assert tool.st_ino == alias.st_ino and tool.st_nlink == 2
    assert tool.st_mode & 0o7777 == 0o4755
    assert (merged / "home").stat().st_mode & 0o7777 == 0o1777
    owned = (merged / "home/owned").stat()
    assert (owned.st_uid, owned.st_gid, owned.st_mode & 0o777) == (1234, 5678, 0o640)
    assert os.readlink(merged / "home/link") == "../bin/tool"


def test_xattrs(bed: Bed) -> None:
    """Kept where the driver stores xattrs; where it says it cannot (zfs-fuse), the layer still
    pulls, its xattrs dropped and counted, and the case skips with the probe's reason."""
    name = f"xattrs-{bed.driver}"
    layer = bed.layout.add_layer([Entry("tagged", b"x",
                                        pax={"SCHILY.xattr.user.origin": "conformance"})])
    bed.layout.tag(bed.layout.add_image([layer]), name)
    ref = f"{bed.registry.host}/conformance/{name}:v1"
    push(bed.layout, name, ref)
    pulled = bed.ok("pull", ref)
    merged = bed.mount(ref, "--name", "xattrs")
    probe = _probe(bed)
    if not probe["capabilities"]["xattrs"]:
        assert (merged / "tagged").read_bytes() == b"x"
        assert "warning: ignored 1 xattr:" in pulled.err
        pytest.skip(f"{bed.driver} stores no xattrs here: {probe['reason']}")
    assert "ignored" not in pulled.err
    assert os.getxattr(merged / "tagged", "user.origin") == b"conformance"


def test_read_only_mount_refuses_writes(bed: Bed) -> None:
    ref = bed.image([file("a", b"1")], [file("b", b"2")])
    merged = bed.mount(ref, "--name", "ro", "--read-only")
    assert (merged / "b").read_bytes() == b"2"
    with pytest.raises(OSError) as exc:
        (merged / "c").write_bytes(b"no")
    assert exc.value.errno == errno.EROFS


def test_single_layer_read_only(bed: Bed) -> None:
    ref = bed.image([file("only", b"1")])
    merged = bed.mount(ref, "--name", "ro1", "--read-only")
    assert (merged / "only").read_bytes() == b"1"
    with pytest.raises(OSError) as exc:
        (merged / "x").write_bytes(b"no")
    assert exc.value.errno == errno.EROFS


def test_containers_are_isolated_and_persist(bed: Bed) -> None:
    """Also the busy unmount: refused while a file is open, detached with ``--force`` (the
    open file still writes through), and the data there at the next mount."""
    ref = bed.image([file("shared", b"image")])
    one = bed.mount(ref, "--name", "one")
    two = bed.mount(ref, "--name", "two")
    (one / "shared").write_bytes(b"one's")
    (one / "new").write_bytes(b"only in one")
    assert (two / "shared").read_bytes() == b"image"
    assert not (two / "new").exists()
    with (one / "held").open("w") as held:
        held.write("before")
        held.flush()
        busy = bed("--json", "umount", "one")
        assert busy.code == 1 and busy.json()["error"]["code"] == "conflict"
        assert "busy" in busy.json()["error"]["message"]
        assert is_mounted(one) and (one / "new").exists()
        bed.ok("umount", "--force", "one")
        assert not is_mounted(one) and not (one / "new").exists()
        states = {c["name"]: c["state"] for c in bed.ok("--json", "ps").json()}
        assert states == {"one": "unmounted", "two": "mounted"}
        held.write(" after")
    assert not (one / "new").exists()
    again = bed.mount(ref, "--name", "one")
    assert (again / "new").read_bytes() == b"only in one"
    assert (again / "shared").read_bytes() == b"one's"
    assert (again / "held").read_text() == "before after"
    # Mounting a mounted container prints the same path again.
    assert bed.mount(ref, "--name", "one") == again


def test_image_in_use_cannot_be_removed(bed: Bed) -> None:
    ref = bed.image([file("f", b"x")])
    bed.mount(ref, "--name", "user")
    refused = bed("--json", "rmi", ref)
    assert refused.code == 1 and refused.json()["error"]["code"] == "conflict"
    busy = bed("--json", "rm", "user")
    assert busy.code == 1 and busy.json()["error"]["code"] == "conflict"
    bed.ok("rm", "--force", "user")
    bed.ok("rmi", ref)
    layers = bed.root / "drivers" / bed.driver / "layers"
    assert not any(layers.iterdir())
    assert bed.ok("--json", "ps").json() == []


def test_mount_again_while_a_forced_umount_leaves_files_open(bed: Bed) -> None:
    """With a quota too (a loop quota's filesystem, on this host, is still the detached
    mount's): the next mount works at once and shows what was written, rather than waiting
    for the open files to close."""
    ref = bed.image([file("f", b"image")])
    merged = bed.mount(ref, "--name", "q", "--quota", "64M")
    held = os.open(merged / "held", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(held, b"before")
        os.fsync(held)
        bed.ok("umount", "--force", "q")
        again = bed.mount(ref, "--name", "q")
        assert (again / "held").read_bytes() == b"before"
        assert next(c for c in bed.ok("--json", "ps").json())["state"] == "mounted"
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the new mount stopped a fuse server
            os.close(held)


def test_rm_force_of_a_busy_container(bed: Bed) -> None:
    """``rm --force`` removes a container whose mount has a file open, as ``podman rm -f``
    removes a running one: the mount detached, the container gone from ``ps`` with its
    writable layer, the name free for a fresh container (or, where the driver must keep
    what the open file holds under that name, refused naming the holder). The open file goes
    on where the kernel serves the mount and answers ENOTCONN where a fuse server served it;
    once it closes, ``gc`` finishes what was left and nothing stays behind (the bed's store
    check: no mount, loop device or directory)."""
    ref = bed.image([file("f", b"image")])
    merged = bed.mount(ref, "--name", "busy", "--quota", "64M")
    (merged / "kept").write_bytes(b"the container's own")
    held = os.open(merged / "held", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(held, b"before")
        busy = bed("--json", "rm", "busy")
        assert busy.code == 1 and busy.json()["error"]["code"] == "conflict"
        assert bed.ok("--json", "rm", "--force", "busy").json()["ok"] is True
        assert not is_mounted(merged) and not (merged / "kept").exists()
        assert bed.ok("--json", "ps").json() == []
        try:
            os.write(held, b" after")
        except OSError as exc:  # a fuse server stops with its container
            assert exc.errno == errno.ENOTCONN, exc
        again = bed("--json", "mount", ref, "--name", "busy")
        if again.code == 0:
            assert not (Path(again.json()["path"]) / "kept").exists()
            bed.ok("rm", "--force", "busy")
        else:
            error = again.json()["error"]
            assert error["code"] == "conflict" and "forced umount" in error["message"], error
        bed.ok("check")  # what the open file holds is explained, not a finding
        pending = bed.ok("--json", "gc").json()["pending"]
        warned = bed.ok("gc").err
        assert all(f"removed container still held: {line}" in warned for line in pending)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN from a stopped fuse server's file
            os.close(held)
    finished = bed.ok("--json", "gc").json()
    assert finished["pending"] == [] and finished["removed"]["containers"] == len(pending)
    fresh = bed.mount(ref, "--name", "busy")
    assert sorted(os.listdir(fresh)) == ["f"]
    bed.ok("rm", "--force", "busy")
    assert bed.ok("--json", "ps").json() == []
    removed = bed.root / "drivers" / bed.driver / "removed"
    assert not removed.exists() or not any(removed.iterdir())


def test_name_conflicts(bed: Bed) -> None:
    first = bed.image([file("a", b"1")])
    second = bed.image([file("b", b"2")])
    bed.mount(first, "--name", "taken")
    other = bed("--json", "mount", second, "--name", "taken")
    assert other.code == 1 and other.json()["error"]["code"] == "conflict"
    bad = bed("--json", "mount", first, "--name", "../escape")
    assert bad.code == 2 and bad.json()["error"]["code"] == "invalid"  # a usage error
    generated = bed.ok("--json", "mount", first).json()["name"]
    assert generated.startswith("c-") and len(generated) == 14


@pytest.mark.parametrize("count", [128, 500])
def test_many_layers(bed: Bed, deep_images: dict[int, str], count: int) -> None:
    limit = _probe(bed)["capabilities"]["max_layers"]
    if count > limit:  # aufs: refused at pull time, before a blob is fetched
        refused = bed("pull", deep_images[count])
        assert refused.code == 1
        assert f"the image has {count} layers; the {bed.driver} driver stacks at most " \
               f"{limit}" in refused.err
        assert len(list((bed.root / "content" / "blobs" / "sha256").iterdir())) <= 2  # no layer
        return
    ref = bed.pull(deep_images[count])
    merged = bed.mount(ref, "--name", f"deep{count}")
    assert (merged / "top").read_text() == f"{count - 1}\n"
    assert (merged / "layer-000").read_text() == "0\n"
    assert len([n for n in os.listdir(merged) if n.startswith("layer-")]) == count
    ro = bed.mount(ref, "--name", f"deep{count}-ro", "--read-only")
    assert (ro / f"layer-{count - 1:03d}").exists()


def _fill(path: Path) -> int:
    """Write until the filesystem refuses; returns bytes written.

    Written as a container's process writes: without CAP_SYS_RESOURCE, which runtimes drop by
    default and which lets its holder past ext4's project (and reserved-block) limits."""
    proc = subprocess.run(["setpriv", "--bounding-set=-sys_resource", "--inh-caps=-sys_resource",
                           "dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=8192",
                           "iflag=fullblock"], capture_output=True, text=True, check=False)
    assert proc.returncode != 0, "quota never refused a write"
    assert "No space left on device" in proc.stderr or "Disk quota exceeded" in proc.stderr, \
        proc.stderr
    return path.stat().st_size


def test_quota_refuses_past_limit_and_frees_on_delete(bed: Bed) -> None:
    ref = bed.image([file("small", b"s" * 1000)])
    quota = 64 << 20
    merged = bed.mount(ref, "--name", "q", "--quota", "64M")
    info = next(c for c in bed.ok("--json", "ps").json() if c["name"] == "q")
    assert info["quota"] == quota
    image_part = info["used_bytes"]  # 'total' drivers count the image: it is in there already
    written = _fill(merged / "big")
    assert quota - image_part - (2 << 20) <= written <= quota - image_part + (2 << 20)
    used = next(c for c in bed.ok("--json", "ps").json() if c["name"] == "q")["used_bytes"]
    assert abs(used - (written + image_part)) <= 0.05 * quota
    (merged / "big").unlink()
    os.sync()
    assert _fill(merged / "again") >= written - (2 << 20)
    (merged / "again").unlink()
    # ext4 grows online only with CAP_SYS_RESOURCE, which this sandbox's root lacks: there a
    # loop quota's refusal must say so, and growing the unmounted container must work.
    if info["quota_mode"].startswith("loop/") and not _has_cap_sys_resource():
        refused = bed("update", "q", "--quota", "128M")
        assert refused.code == 1 and "CAP_SYS_RESOURCE" in refused.err
        bed.ok("umount", "q")
    bed.ok("update", "q", "--quota", "128M")
    merged = bed.mount(ref, "--name", "q")
    assert _fill(merged / "grown") >= written + (60 << 20)
    shrink = bed("update", "q", "--quota", "8M")
    assert shrink.code == 1


# What ``ps`` says about inodes, by quota mode: (counts those in use, knows the total). Loop
# and devmapper containers have a filesystem of their own; a project quota counts inodes
# without limiting them; qgroups, ZFS quotas and the fuse server count bytes only.
INODE_REPORTING = {"loop": (True, True), "device size": (True, True), "project": (True, False),
                   "qgroup": (False, False), "simple": (False, False), "quota": (False, False),
                   "fuse": (False, False)}


def test_ps_shows_inode_use_where_the_driver_counts_it(bed: Bed) -> None:
    ref = bed.image([file("f", b"x")])
    merged = bed.mount(ref, "--name", "n", "--quota", "64M")

    def listed() -> dict[str, Any]:
        return next(c for c in bed.ok("--json", "ps").json() if c["name"] == "n")

    before = listed()
    counts, knows_total = INODE_REPORTING[before["quota_mode"].split("/")[0]]
    for i in range(100):
        (merged / f"empty-{i}").touch()
    os.sync()
    after = listed()
    row = next(line for line in bed.ok("ps").out.splitlines() if line.startswith("n "))
    if not counts:
        assert after["used_inodes"] is None and after["inodes"] is None, after
        assert row.rstrip().endswith(" -"), row
        return
    assert after["used_inodes"] - before["used_inodes"] == 100, (before, after)
    if knows_total:
        assert after["used_inodes"] < after["inodes"], after
        assert row.rstrip().endswith(f" {after['used_inodes']}/{after['inodes']}"), row
    else:
        assert after["inodes"] is None, after
        assert row.rstrip().endswith(f" {after['used_inodes']}"), row


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def test_malicious_layer_is_refused_and_store_unchanged(bed: Bed, tmp_path: Path) -> None:
    good = bed.image([file("ok", b"fine")])
    before = sorted(p.name for p in (bed.root / "drivers" / bed.driver / "layers").iterdir())
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = [symlink("link", str(outside)), file("link/planted", b"pwned"),
            file("../escaped", b"pwned")]
    name = f"evil-{bed.driver}"
    built = bed.layout.add_layer(evil)
    manifest = bed.layout.add_image([built])
    bed.layout.tag(manifest, name)
    ref = f"{bed.registry.host}/conformance/{name}:v1"
    push(bed.layout, name, ref)
    result = bed("--json", "pull", ref)
    assert result.code == 1 and result.json()["error"]["code"] == "invalid"
    assert "link/planted" in result.json()["error"]["message"]
    assert not any(outside.iterdir())
    assert not (bed.root / "drivers" / bed.driver / "escaped").exists()
    after = sorted(p.name for p in (bed.root / "drivers" / bed.driver / "layers").iterdir())
    assert after == before
    assert [i["refs"] for i in bed.ok("--json", "images").json()] == [[good]]


@contextlib.contextmanager
def _writable_layer(bed: Bed) -> Iterator[tuple[str, Path]]:
    """The image's one layer where the driver keeps it (``Driver.layer_tree``), writable for
    the block: a btrfs layer is a read-only subvolume and devmapper mounts its layer's device
    read-only, so those are made writable for the moment and read-only again after."""
    config = load_config(Overrides(root=bed.root, driver=bed.driver))
    driver = driver_registry()[bed.driver][1](config, bed.root / "drivers" / bed.driver)
    [key] = driver.list_layers()
    with driver.layer_tree(key) as tree:
        read_only_mount = bool(os.statvfs(tree).f_flag & os.ST_RDONLY)
        subvolume = bed.driver == "btrfs"
        if read_only_mount:
            subprocess.run(["mount", "-o", "remount,rw", str(tree)], check=True, timeout=60)
        elif subvolume:
            subprocess.run(["btrfs", "property", "set", str(tree), "ro", "false"], check=True,
                           timeout=60)
        try:
            yield key, tree
        finally:
            if read_only_mount:
                subprocess.run(["mount", "-o", "remount,ro", str(tree)], check=True, timeout=60)
            elif subvolume:
                subprocess.run(["btrfs", "property", "set", str(tree), "ro", "true"],
                               check=True, timeout=60)


def test_a_damaged_layer_is_found_and_applied_again(bed: Bed) -> None:
    """``check --verify-data`` compares the layer's tree, where this driver keeps it, with its
    blob, and ``--repair`` applies it again from the blob (docs/store.md, "Damaged layers"):
    a one-layer image, so nothing is built on the layer (ZFS would keep it for its clones)."""
    tool = bytes(range(256)) * 64
    ref = bed.image([directory("etc"), file("etc/tool", tool, 0o755)])
    with _writable_layer(bed) as (key, tree), (tree / "etc/tool").open("r+b") as f:
        f.seek(5000)
        f.write(b"\xff" * 8)
    found = bed("check", "--verify-data")
    assert found.code == 1
    assert found.out.startswith(f"layer-damaged: layer sha256:{key} differs from its blob ")
    assert found.out.endswith(f": etc/tool: contents differ; images: {ref}\n"), found.out
    if bed.run_cli.daemon is not None:  # repair is the embedded CLI's: the daemon goes
        bed.run_cli.daemon.stop()
    repaired = bed("check", "--verify-data", "--repair")
    assert repaired.code == 1 and repaired.out.endswith(" (repaired)\n"), repaired.out
    assert bed("check", "--verify-data").out == "no findings\n"
    merged = bed.mount(ref, "--name", "after")
    assert (merged / "etc/tool").read_bytes() == tool
