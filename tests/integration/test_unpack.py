"""The shared layer unpacker against real extraction, as root, into temporary directories.

Every hostile layer is checked twice: the error names the member, and nothing appeared outside
the target (a sentinel directory beside it stays empty). Layers are built with
``imaged.testing.images`` where its ``Entry`` can say it, with ``tarfile`` where it cannot
(device numbers, hand-made headers).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import subprocess
import tarfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from imaged.digest import Digest
from imaged.layers.unpack import (
    LayerError,
    UnpackLimits,
    UnpackStats,
    WhiteoutMode,
    unpack_layer,
    verify_layer,
)
from imaged.testing.images import (
    MEDIA_BY_COMPRESSION,
    Entry,
    OCILayout,
    directory,
    file,
    symlink,
    tar_bytes,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking owners and devices "
                                "needs root")

OVERLAY, DELETE, AUFS = WhiteoutMode.OVERLAY, WhiteoutMode.DELETE, WhiteoutMode.AUFS
LIMITS = UnpackLimits(max_bytes=1 << 30, max_entries=100_000)
T1, T2, T3 = 1_600_000_000, 1_650_000_000, 1_700_000_000
# A VFS_CAP_REVISION_2 capability set with cap_net_raw (13) permitted and effective.
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
COMPRESSIONS = ["gzip", "zstd", None]


@dataclass(frozen=True)
class Blob:
    path: Path
    media_type: str
    diff_id: Digest


@dataclass(frozen=True)
class Place:
    target: Path
    sentinel: Path  # beside target: nothing may ever appear in it


@pytest.fixture
def place(tmp_path: Path) -> Place:
    target, sentinel = tmp_path / "target", tmp_path / "sentinel"
    target.mkdir()
    sentinel.mkdir()
    return Place(target, sentinel)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every unpack, failed or not, closes its fds and ends its feed thread.

    Only what appeared during the test counts: other tests' idle trio worker threads and
    descriptors may come and go meanwhile.
    """
    fds = set(os.listdir("/proc/self/fd"))
    yield
    leaked = []
    for fd in set(os.listdir("/proc/self/fd")) - fds:
        try:
            what = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile (by another test's thread)
            continue
        if what.startswith("/"):  # files and directories are what an unpack could leak
            leaked.append(what)
    assert not leaked
    assert not [t for t in threading.enumerate() if t.name == "imaged-unpack-feed"]


def layer(layout: OCILayout, entries: list[Entry], compression: str | None = None) -> Blob:
    built = layout.add_layer(entries, compression)
    return Blob(layout.path / "blobs" / "sha256" / built.blob.digest.split(":")[1],
                built.blob.media_type, Digest.parse(built.diff_id))


def raw_layer(tmp_path: Path, tar: bytes, compression: str | None = None,
              diff_id: Digest | None = None) -> Blob:
    """A blob from tar bytes as given (hand-made headers, padding, truncation)."""
    if compression == "gzip":
        data = gzip.compress(tar, compresslevel=1)
    elif compression == "zstd":
        data = zstandard.ZstdCompressor().compress(tar)
    else:
        data = tar
    path = tmp_path / f"blob-{uuid.uuid4().hex}"
    path.write_bytes(data)
    return Blob(path, MEDIA_BY_COMPRESSION[compression], diff_id or Digest.of(tar))


def unpack(blob: Blob, target: Path, mode: WhiteoutMode = OVERLAY,
           limits: UnpackLimits = LIMITS, userxattr: bool = False) -> UnpackStats:
    """Unpack, then require ``check --verify-data``'s comparison to find the fresh tree the
    same as the blob: every layer this file unpacks is a case against false damage."""
    stats = unpack_layer(blob.path, blob.media_type, blob.diff_id, target, mode, limits,
                         userxattr)
    assert verify_layer(blob.path, blob.media_type, blob.diff_id, target, mode, limits,
                        userxattr) == {}
    return stats


def refused(blob: Blob, place: Place, message: str, mode: WhiteoutMode = OVERLAY,
            limits: UnpackLimits = LIMITS) -> LayerError:
    with pytest.raises(LayerError) as info:
        unpack(blob, place.target, mode, limits)
    assert message in str(info.value)
    assert str(info.value).startswith(f"layer {blob.diff_id.algorithm}:{blob.diff_id.hex[:12]}")
    assert list(place.sentinel.iterdir()) == []
    return info.value


def names(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def tarinfo(name: str, kind: bytes, **fields: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = T1
    for key, value in fields.items():
        setattr(info, key, value)
    return info


# -- entry types and metadata -------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_entry_types_and_metadata(layout: OCILayout, place: Place,
                                  compression: str | None) -> None:
    big = os.urandom(9 * 1024 * 1024 + 123)  # spans the feed's chunks
    long_name = "deep/" + "n" * 120 + "/" + "é" * 60
    entries = [
        Entry("d", type=tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1001, mtime=T1),
        Entry("d/f", b"hello\n", mode=0o640, uid=1000, gid=1001, mtime=T2),
        Entry("big", big, mtime=T2),
        Entry("empty", b"", mode=0o600),
        Entry("suid", b"#!", mode=0o4755),
        Entry("sgid", b"#!", mode=0o2755, gid=50),
        Entry("owned-suid", b"#!", mode=0o6750, uid=1000, gid=1000),
        Entry("sticky", type=tarfile.DIRTYPE, mode=0o1777, mtime=T3),
        Entry("ln", type=tarfile.SYMTYPE, target="d/f", uid=1000, gid=1002, mtime=T3),
        Entry("dangling", type=tarfile.SYMTYPE, target="/does/not/exist"),
        Entry("hl", type=tarfile.LNKTYPE, target="d/f"),
        Entry("ping", b"\x7fELF", mode=0o755, uid=1000,
              pax={"SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8",
                                                                          "surrogateescape")}),
        Entry("ux", b"x", pax={"SCHILY.xattr.user.comment": "hi=there"}),
        Entry("xd", type=tarfile.DIRTYPE, mode=0o700, pax={"SCHILY.xattr.user.d": "1"}),
        Entry("p", type=tarfile.FIFOTYPE, mode=0o620, uid=7, mtime=T1,
              pax={"SCHILY.xattr.trusted.fifo": "f"}),
        Entry("ln-x", type=tarfile.SYMTYPE, target="d/f", pax={"SCHILY.xattr.trusted.sym": "s"}),
        Entry(long_name, b"long", mode=0o444),
        Entry("implicit/a/b", b"no parent entries"),
        Entry("late", type=tarfile.DIRTYPE, mode=0o555, mtime=T1),
        Entry("late/inner/deeper", b"written after its directory's entry", mtime=T2),
    ]
    blob = layer(layout, entries, compression)
    stats = unpack(blob, place.target)
    assert (stats.entries, stats.diff_id, stats.xattrs_skipped) == (len(entries), blob.diff_id, 0)
    assert stats.bytes % 512 == 0 and stats.bytes > len(big)

    t = place.target
    d = os.lstat(t / "d")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid, d.st_mtime_ns) == (
        0o750, 1000, 1001, T1 * 10**9)
    f = os.lstat(t / "d/f")
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid, f.st_mtime_ns) == (
        0o640, 1000, 1001, T2 * 10**9)
    assert (t / "d/f").read_bytes() == b"hello\n"
    assert hashlib.sha256((t / "big").read_bytes()).digest() == hashlib.sha256(big).digest()
    assert (t / "empty").stat().st_size == 0
    assert stat.S_IMODE((t / "suid").stat().st_mode) == 0o4755
    sgid = (t / "sgid").stat()
    assert (stat.S_IMODE(sgid.st_mode), sgid.st_gid) == (0o2755, 50)
    owned = (t / "owned-suid").stat()
    assert (stat.S_IMODE(owned.st_mode), owned.st_uid) == (0o6750, 1000)
    sticky = (t / "sticky").stat()
    assert (stat.S_IMODE(sticky.st_mode), sticky.st_mtime_ns) == (0o1777, T3 * 10**9)
    ln = os.lstat(t / "ln")
    assert stat.S_ISLNK(ln.st_mode) and os.readlink(t / "ln") == "d/f"
    assert (ln.st_uid, ln.st_gid, ln.st_mtime_ns) == (1000, 1002, T3 * 10**9)
    assert os.readlink(t / "dangling") == "/does/not/exist"
    assert os.lstat(t / "hl").st_ino == f.st_ino and f.st_nlink == 2
    ping = os.lstat(t / "ping")
    assert ping.st_uid == 1000
    assert os.getxattr(t / "ping", "security.capability") == CAPABILITY  # survived the chown
    assert os.getxattr(t / "ux", "user.comment") == b"hi=there"
    assert os.getxattr(t / "xd", "user.d") == b"1"
    assert stat.S_IMODE((t / "xd").stat().st_mode) == 0o700
    p = os.lstat(t / "p")
    assert stat.S_ISFIFO(p.st_mode) and stat.S_IMODE(p.st_mode) == 0o620 and p.st_uid == 7
    assert os.getxattr(t / "p", "trusted.fifo") == b"f"
    # An xattr on a symlink lands on the link, never on what it points at.
    assert os.getxattr(t / "ln-x", "trusted.sym", follow_symlinks=False) == b"s"
    assert "trusted.sym" not in os.listxattr(t / "d/f")
    assert (t / long_name).read_bytes() == b"long"
    for implicit in ("implicit", "implicit/a", "deep"):
        st = (t / implicit).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)
    late = (t / "late").stat()
    assert (stat.S_IMODE(late.st_mode), late.st_mtime_ns) == (0o555, T1 * 10**9)
    assert (t / "late/inner/deeper").stat().st_mtime_ns == T2 * 10**9


def test_devices(tmp_path: Path, place: Place) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarinfo("null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666))
        tar.addfile(tarinfo("loop9", tarfile.BLKTYPE, devmajor=7, devminor=9, mode=0o660,
                            gid=6))
        tar.addfile(tarinfo("dev/big", tarfile.CHRTYPE, devmajor=4095, devminor=1 << 19,
                            mode=0o4600))
    stats = unpack(raw_layer(tmp_path, buf.getvalue()), place.target)
    assert stats.entries == 3
    null = os.lstat(place.target / "null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
    assert os.minor(null.st_rdev) == 3 and stat.S_IMODE(null.st_mode) == 0o666
    assert null.st_mtime_ns == T1 * 10**9
    loop = os.lstat(place.target / "loop9")
    assert stat.S_ISBLK(loop.st_mode) and os.minor(loop.st_rdev) == 9 and loop.st_gid == 6
    big = os.lstat(place.target / "dev/big")
    assert (os.major(big.st_rdev), os.minor(big.st_rdev)) == (4095, 1 << 19)
    assert stat.S_IMODE(big.st_mode) == 0o4600


def test_gnu_format_long_names_and_links(tmp_path: Path, place: Place) -> None:
    name = "g/" + "x" * 150
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(tarinfo(name, tarfile.REGTYPE, size=3), io.BytesIO(b"abc"))
        link = tarinfo("h/" + "y" * 150, tarfile.LNKTYPE)
        link.linkname = name
        tar.addfile(link)
    unpack(raw_layer(tmp_path, buf.getvalue()), place.target)
    assert (place.target / ("h/" + "y" * 150)).read_bytes() == b"abc"
    assert (place.target / name).stat().st_nlink == 2


# A default ACL of u::rwx,g::---,o::--- (version 2 header, then tag/perm/id entries).
DEFAULT_ACL = struct.pack("<I" + "HHI" * 3, 2, 0x01, 7, 0xFFFFFFFF, 0x04, 0, 0xFFFFFFFF,
                          0x20, 0, 0xFFFFFFFF)


def test_owner_and_mode_exact_whatever_the_creation_context(layout: OCILayout,
                                                            place: Place) -> None:
    """A new file's owner and mode can come from the umask, a setgid parent or a default ACL:
    the unpacker sets them whenever it cannot be sure the kernel already did."""
    acl = DEFAULT_ACL.decode("utf-8", "surrogateescape")
    entries = [file("plain", b"p", 0o644), Entry("acl", type=tarfile.DIRTYPE, mode=0o755,
                                                 pax={"SCHILY.xattr.system.posix_acl_default":
                                                      acl}),
               file("acl/f", b"f", 0o644), file("later", b"l", 0o664)]
    blob = layer(layout, entries)
    unpack(blob, place.target)
    assert os.getxattr(place.target / "acl", "system.posix_acl_default") == DEFAULT_ACL
    for name, mode in (("plain", 0o644), ("acl/f", 0o644), ("later", 0o664)):
        assert stat.S_IMODE((place.target / name).stat().st_mode) == mode, name

    setgid = place.target.parent / "setgid"
    setgid.mkdir()
    os.chown(setgid, 0, 1234)
    setgid.chmod(0o2755)
    unpack(blob, setgid)
    assert (setgid / "plain").stat().st_gid == 0

    masked = place.target.parent / "masked"
    masked.mkdir()
    old = os.umask(0o077)
    try:
        unpack(blob, masked)
    finally:
        os.umask(old)
    assert stat.S_IMODE((masked / "later").stat().st_mode) == 0o664


def test_root_entry_is_left_to_the_driver(layout: OCILayout, place: Place) -> None:
    place.target.chmod(0o711)
    unpack(layer(layout, [directory("./", 0o700), file("./a", b"1")]), place.target)
    assert stat.S_IMODE(place.target.stat().st_mode) == 0o711
    assert (place.target / "a").read_bytes() == b"1"


def test_later_duplicates_win(layout: OCILayout, place: Place) -> None:
    entries = [
        file("f", b"1"), file("f", b"2"),
        directory("x"), file("x/inner", b"i"), file("x", b"now a file"),
        file("y", b"was a file"), directory("y"), file("y/z", b"z"),
        symlink("s", str(place.sentinel)), file("s", b"a file, not through the link"),
        Entry("m", type=tarfile.DIRTYPE, mode=0o700), Entry("m", type=tarfile.DIRTYPE, mode=0o751),
        file("m/child", b"kept"),
        directory("keepme"), file("keepme/a", b"a"), directory("keepme"),
    ]
    unpack(layer(layout, entries), place.target)
    t = place.target
    assert (t / "f").read_bytes() == b"2"
    assert (t / "x").read_bytes() == b"now a file"
    assert (t / "y/z").read_bytes() == b"z"
    assert not (t / "s").is_symlink() and (t / "s").read_bytes() == b"a file, not through the link"
    assert stat.S_IMODE((t / "m").stat().st_mode) == 0o751
    assert (t / "m/child").exists() and (t / "keepme/a").exists()
    assert list(place.sentinel.iterdir()) == []


def test_many_directories_and_deep_paths(layout: OCILayout, place: Place) -> None:
    """More directories than the fd cache holds, revisited out of order, and a deep path."""
    entries = [file(f"d{i}/f", b"x") for i in range(300)]
    entries += [file(f"d{i}/g", b"y") for i in range(0, 300, 7)]
    deep = "/".join(["z"] * 400)
    entries += [file(deep + "/leaf", b"deep"), file("d0/h", b"z")]
    unpack(layer(layout, entries), place.target)
    assert (place.target / deep / "leaf").read_bytes() == b"deep"
    assert len(list(place.target.glob("d*/f"))) == 300
    assert len(list(place.target.glob("d*/g"))) == 43


# -- compression, media types and the DiffID ---------------------------------------------------


@pytest.mark.parametrize(("compression", "media_type", "message"), [
    (None, MEDIA_BY_COMPRESSION["gzip"], "says gzip, but the blob is not compressed"),
    ("gzip", MEDIA_BY_COMPRESSION[None], "says uncompressed, but the blob is gzip"),
    ("zstd", MEDIA_BY_COMPRESSION["gzip"], "says gzip, but the blob is zstd"),
    ("gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip", None),
    (None, "application/vnd.oci.image.layer.v1.tar+bzip2", "unsupported media type"),
])
def test_media_type_and_magic_must_agree(tmp_path: Path, place: Place, compression: str | None,
                                         media_type: str, message: str | None) -> None:
    blob = raw_layer(tmp_path, tar_bytes([file("a", b"1")]), compression)
    blob = Blob(blob.path, media_type, blob.diff_id)
    if message is None:
        unpack(blob, place.target)
        assert (place.target / "a").exists()
    else:
        with pytest.raises(LayerError, match=message):
            unpack(blob, place.target)
        assert list(place.target.iterdir()) == []


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_diff_id_mismatch(tmp_path: Path, place: Place, compression: str | None) -> None:
    wrong = Digest.of(b"something else")
    blob = raw_layer(tmp_path, tar_bytes([file("a", b"1")]), compression, wrong)
    with pytest.raises(LayerError, match=r"hashes to sha256:[0-9a-f]{64}, not to the DiffID"):
        unpack(blob, place.target)


def test_diff_id_covers_padding_after_the_archive(tmp_path: Path, place: Place) -> None:
    tar = tar_bytes([file("a", b"1")]) + bytes(4096) + b"trailing junk"
    stats = unpack(raw_layer(tmp_path, tar, "gzip"), place.target)
    assert stats.bytes == len(tar)
    stripped = raw_layer(tmp_path, tar, "gzip", Digest.of(tar[:1536]))
    target = place.target.parent / "second"
    target.mkdir()
    with pytest.raises(LayerError, match="not to the DiffID"):
        unpack(stripped, target)


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path: Path, place: Place) -> None:
    tar = tar_bytes([file("a", os.urandom(3000)), file("b", b"2")])
    half = len(tar) // 2
    for index, data in enumerate([
        gzip.compress(tar[:half]) + gzip.compress(tar[half:]),
        zstandard.ZstdCompressor().compress(tar[:half]) +
        zstandard.ZstdCompressor().compress(tar[half:]),
    ]):
        path = tmp_path / f"multi{index}"
        path.write_bytes(data)
        target = place.target / str(index)
        target.mkdir()
        media = MEDIA_BY_COMPRESSION["gzip" if index == 0 else "zstd"]
        unpack(Blob(path, media, Digest.of(tar)), target)
        assert (target / "b").read_bytes() == b"2"


def test_corrupt_gzip(tmp_path: Path, place: Place) -> None:
    data = bytearray(gzip.compress(tar_bytes([file("a", os.urandom(50_000))])))
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    path = tmp_path / "corrupt"
    path.write_bytes(bytes(data))
    blob = Blob(path, MEDIA_BY_COMPRESSION["gzip"], Digest.of(b"unknown"))
    with pytest.raises(LayerError, match="cannot be decompressed"):
        unpack(blob, place.target)


def test_truncated_stream(tmp_path: Path, place: Place) -> None:
    tar = tar_bytes([file("a", b"1"), file("cut", os.urandom(5000))])[:2048]
    refused(raw_layer(tmp_path, tar, "zstd"), place, "member 'cut' is truncated")


def test_stream_without_end_blocks_is_accepted(tmp_path: Path, place: Place) -> None:
    """Go's archive/tar (Docker, containerd) ends at a header boundary too."""
    tar = tar_bytes([file("a", b"1")])[:1024]
    unpack(raw_layer(tmp_path, tar), place.target)
    assert (place.target / "a").read_bytes() == b"1"


def test_lone_zero_block_is_corrupt(tmp_path: Path, place: Place) -> None:
    first = tar_bytes([file("a", b"1")])[:1024]
    second = tar_bytes([file("b", b"2")])
    refused(raw_layer(tmp_path, first + bytes(512) + second), place, "lone zero block")


# -- hostile layers ------------------------------------------------------------------------------


ETC_NAME = f"imaged-unpack-test-{uuid.uuid4().hex}"


@pytest.mark.parametrize(("entries", "member", "message"), [
    ([file("../escape", b"x")], "'../escape'", "escapes the layer"),
    ([file("../sentinel/x", b"x")], "'../sentinel/x'", "escapes the layer"),
    ([file("a/../../sentinel/x", b"x")], "'a/../../sentinel/x'", "escapes the layer"),
    ([file("/etc/" + ETC_NAME, b"x")], f"'/etc/{ETC_NAME}'", "has an absolute name"),
    ([symlink("lnk", "../sentinel"), file("lnk/x", b"x")], "'lnk/x'",
     "escapes the layer through symlink 'lnk'"),
    ([directory("a"), symlink("a/b", "/"), file("a/b/tmp/x", b"x")], "'a/b/tmp/x'",
     "through symlink 'a/b'"),
    ([symlink("dir", "/etc"), file("dir/" + ETC_NAME, b"x")], f"'dir/{ETC_NAME}'",
     "through symlink 'dir'"),
    ([symlink("dir", "/etc"), directory("dir/" + ETC_NAME)], f"'dir/{ETC_NAME}/'",
     "through symlink 'dir'"),
    ([file("f", b"x"), file("f/x", b"x")], "'f/x'", "has a parent 'f' that is not a directory"),
    ([Entry("hl", type=tarfile.LNKTYPE, target="../sentinel/secret")], "'hl'",
     "escapes the layer"),
    ([Entry("hl", type=tarfile.LNKTYPE, target="/etc/passwd")], "'hl'", "absolute name"),
    ([Entry("hl", type=tarfile.LNKTYPE, target="later"), file("later", b"x")], "'hl'",
     "not a regular file unpacked earlier from this layer"),
    ([directory("d"), Entry("hl", type=tarfile.LNKTYPE, target="d")], "'hl'",
     "not a regular file unpacked earlier"),
    ([file("t", b"x"), symlink("t", "/etc/passwd"), Entry("hl", type=tarfile.LNKTYPE,
                                                          target="t")], "'hl'",
     "not a regular file unpacked earlier"),
    ([Entry("x", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})], "'x'", "steer overlayfs"),
    ([Entry("x", type=tarfile.DIRTYPE, pax={"SCHILY.xattr.user.overlay.redirect": "/a"})],
     "'x/'", "steer overlayfs"),
    ([file(".wh...", b"")], "'.wh...'", "is a whiteout for '..'"),
    ([file("a/.wh.b/c", b"")], "'a/.wh.b/c'", "whiteout names cannot hold a slash"),
    ([file("c" * 256, b"")], repr("c" * 256), "component longer than 255 bytes"),
    ([Entry("a", pax={"path": "a\x00b"})], "'a'", "NUL byte in its name"),
    ([symlink(".", "/")], "'.'", "would replace the layer root"),
])
def test_hostile_members_refused(layout: OCILayout, place: Place, entries: list[Entry],
                                 member: str, message: str) -> None:
    error = refused(layer(layout, entries), place, message)
    assert f"member {member} " in str(error) and error.member == member
    assert not Path("/etc", ETC_NAME).exists()
    assert not (place.target.parent / "escape").exists()


def test_hardlink_through_a_symlinked_parent(layout: OCILayout, place: Place) -> None:
    (place.target.parent / "outside").mkdir()
    (place.target.parent / "outside/secret").write_text("secret")
    entries = [symlink("lnk", "../outside"), Entry("hl", type=tarfile.LNKTYPE,
                                                   target="lnk/secret")]
    refused(layer(layout, entries), place, "member 'hl' is a hardlink to 'lnk/secret'")
    assert not (place.target / "hl").exists()
    assert (place.target.parent / "outside/secret").stat().st_nlink == 1


def test_replaced_directory_is_not_written_through(layout: OCILayout, place: Place) -> None:
    """A cached fd of a directory a later member replaced by a symlink is never used."""
    entries = [directory("d"), file("d/f", b"1"), symlink("d", str(place.sentinel)),
               file("d/g", b"2")]
    refused(layer(layout, entries), place, "member 'd/g' escapes the layer through symlink 'd'")


def test_symlink_planted_by_an_earlier_layer(layout: OCILayout, place: Place) -> None:
    unpack(layer(layout, [symlink("dir", str(place.sentinel)), symlink("rel", "../sentinel")]),
           place.target, DELETE)
    for name in ("dir/x", "rel/x", "dir/sub/x"):
        refused(layer(layout, [file(name, b"x")]), place,
                f"member '{name}' escapes the layer through symlink", DELETE)
    refused(layer(layout, [directory("rel/d")]), place, "through symlink 'rel'", DELETE)


def test_hardlink_to_an_earlier_layer_refused(layout: OCILayout, place: Place) -> None:
    unpack(layer(layout, [file("base", b"lower")]), place.target, DELETE)
    refused(layer(layout, [Entry("hl", type=tarfile.LNKTYPE, target="base")]), place,
            "member 'hl' is a hardlink to 'base', which is not a regular file unpacked earlier "
            "from this layer", DELETE)
    assert (place.target / "base").stat().st_nlink == 1


def test_whiteout_through_an_earlier_symlink(layout: OCILayout, place: Place) -> None:
    outside = place.target.parent / "outside"
    outside.mkdir()
    (outside / "victim").write_text("v")
    unpack(layer(layout, [symlink("lnk", str(outside))]), place.target, DELETE)
    refused(layer(layout, [file("lnk/.wh.victim", b"")]), place,
            "member 'lnk/.wh.victim' escapes the layer through symlink 'lnk'", DELETE)
    assert (outside / "victim").exists()


def test_too_many_entries(layout: OCILayout, place: Place) -> None:
    blob = layer(layout, [file(f"f{i}", b"") for i in range(11)])
    refused(blob, place, "member 'f10' is one more than the limit of 10 entries",
            limits=UnpackLimits(max_bytes=1 << 20, max_entries=10))
    unpack(blob, place.target, limits=UnpackLimits(max_bytes=1 << 20, max_entries=11))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_too_many_bytes(layout: OCILayout, place: Place, compression: str | None) -> None:
    blob = layer(layout, [file("small", b"s"), file("bomb", bytes(8 << 20))], compression)
    refused(blob, place, "member 'bomb' takes the layer past the limit of 1048576",
            limits=UnpackLimits(max_bytes=1 << 20, max_entries=100))
    assert not (place.target / "bomb").exists()  # refused before a byte was written


def test_gzip_bomb_stops_early(tmp_path: Path, place: Place) -> None:
    """8 GiB of zeros after the archive in 8 MB of gzip: decompression stops at the limit."""
    tar = tar_bytes([file("a", b"1")])
    path = tmp_path / "bomb"
    path.write_bytes(gzip.compress(tar) + gzip.compress(bytes(64 << 20), 9) * 128)
    blob = Blob(path, MEDIA_BY_COMPRESSION["gzip"], Digest.of(b"never computed"))
    refused(blob, place, "member 'a' takes the layer past the limit of 4194304",
            limits=UnpackLimits(max_bytes=4 << 20, max_entries=100))


# -- whiteouts -------------------------------------------------------------------------------


def whiteout_layer() -> list[Entry]:
    return [
        directory("d"), file("d/keep", b"k"),
        file(".wh.gone", b""),
        file("d/.wh..wh..opq", b""),
        file("d/.wh.old", b""),
        file("nodir/.wh.x", b""),
        directory(".wh..wh.plnk"), file(".wh..wh.plnk/1234.5", b"aufs hardlink store"),
    ]


def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@pytest.mark.parametrize("userxattr", [False, True])
def test_overlay_whiteouts(layout: OCILayout, place: Place, userxattr: bool) -> None:
    unpack(layer(layout, whiteout_layer()), place.target, OVERLAY, userxattr=userxattr)
    t = place.target
    assert names(t) == {"d", "d/keep", "gone", "d/old", "nodir", "nodir/x"}
    assert is_whiteout(t / "gone") and is_whiteout(t / "d/old") and is_whiteout(t / "nodir/x")
    key = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
    assert os.getxattr(t / "d", key) == b"y"
    assert [k for k in os.listxattr(t / "nodir") if "overlay" in k] == []


def test_overlay_layer_works_under_overlayfs(layout: OCILayout, tmp_path: Path) -> None:
    """The whiteouts we write are the ones the kernel reads."""
    lower, upper, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    for d in (lower, upper, merged):
        d.mkdir()
    unpack(layer(layout, [directory("d"), file("d/old", b"o"), file("d/other", b"o"),
                          file("gone", b"g"), file("stays", b"s")]), lower)
    unpack(layer(layout, [directory("d"), file("d/.wh..wh..opq", b""), file("d/new", b"n"),
                          file(".wh.gone", b"")]), upper)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={upper}:{lower}", str(merged)], check=True)
    try:
        assert names(merged) == {"d", "d/new", "stays"}
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_aufs_keeps_whiteouts_as_files(layout: OCILayout, place: Place) -> None:
    unpack(layer(layout, whiteout_layer()), place.target, AUFS)
    t = place.target
    assert names(t) == {"d", "d/keep", ".wh.gone", "d/.wh..wh..opq", "d/.wh.old", "nodir",
                        "nodir/.wh.x", ".wh..wh.plnk", ".wh..wh.plnk/1234.5"}
    assert stat.S_ISREG(os.lstat(t / ".wh.gone").st_mode)
    assert not [k for k in os.listxattr(t / "d") if "overlay" in k]


def test_delete_mode_applies_layers_in_sequence(layout: OCILayout, place: Place) -> None:
    lower = [
        directory("a"), file("a/x", b"x"),
        directory("d"), file("d/x", b"x"), directory("d/old"), file("d/old/f", b"f"),
        directory("d/sub"), file("d/sub/y", b"y"),
        file("keep", b"k"), symlink("lnk", "keep"), directory("full"), file("full/f", b"f"),
    ]
    upper = [
        file(".wh.a", b""),
        file("d/sub/z", b"z"),  # written before the opaque marker: stays
        file("d/.wh..wh..opq", b""),
        file("d/new", b"n"),
        file(".wh.lnk", b""),
        file(".wh.missing", b""),
        file("nothere/.wh.x", b""),  # nothing to delete: the parent is not made either
        Entry("full", type=tarfile.DIRTYPE, mode=0o700),
        file("full/.wh.f", b""),
    ]
    unpack(layer(layout, lower), place.target, DELETE)
    stats = unpack(layer(layout, upper), place.target, DELETE)
    assert stats.entries == len(upper)
    assert names(place.target) == {"d", "d/sub", "d/sub/z", "d/new", "keep", "full"}
    assert stat.S_IMODE((place.target / "full").stat().st_mode) == 0o700


def test_delete_mode_opaque_root_and_replaced_types(layout: OCILayout, place: Place) -> None:
    unpack(layer(layout, [directory("dir"), file("dir/a", b"a"), file("file", b"f"),
                          file("other", b"o")]), place.target, DELETE)
    unpack(layer(layout, [file("dir", b"now a file"), directory("file"), file("file/in", b"i"),
                          file(".wh..wh..opq", b"")]), place.target, DELETE)
    assert names(place.target) == {"dir", "file", "file/in"}
    assert (place.target / "dir").read_bytes() == b"now a file"


# -- the target filesystem ---------------------------------------------------------------------


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A filesystem without xattr support (EOPNOTSUPP), like zfs-fuse."""
    mount = tmp_path / "ramfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_unsupported_xattrs_are_counted(layout: OCILayout, ramfs: Path) -> None:
    cap = CAPABILITY.decode("utf-8", "surrogateescape")
    blob = layer(layout, [Entry("ping", b"x", pax={"SCHILY.xattr.security.capability": cap,
                                                   "SCHILY.xattr.user.a": "1"})])
    stats = unpack(blob, ramfs)
    assert stats.xattrs_skipped == 2
    assert (ramfs / "ping").read_bytes() == b"x"


def test_target_must_exist(layout: OCILayout, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        unpack(layer(layout, [file("a", b"1")]), tmp_path / "missing")


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_progress_follows_the_blob_to_its_end(tmp_path: Path, place: Place,
                                              compression: str | None) -> None:
    """What a pull's progress bar shows while a layer unpacks: how far into the blob it is."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for n in range(8):
            data = os.urandom(3 << 20)
            info = tarfile.TarInfo(f"f{n}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = raw_layer(tmp_path, out.getvalue(), compression)
    seen: list[int] = []
    unpack_layer(blob.path, blob.media_type, blob.diff_id, place.target, OVERLAY, LIMITS,
                 progress=seen.append)
    assert len(seen) > 4
    assert seen == sorted(seen)
    assert seen[-1] == blob.path.stat().st_size
