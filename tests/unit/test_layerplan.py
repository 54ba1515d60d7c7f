"""The layer planner's pure rules: tar headers, member names, whiteouts, opaque dirs, xattrs.

Headers are made with ``tarfile`` (writing tars is safe; only its extraction is not) and by
hand where a writer would never produce them, so every refusal is exercised without root.
"""

from __future__ import annotations

import tarfile
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imaged.layers.layerplan import (
    BLOCK_SIZE,
    DIRECTORY,
    MAX_COMPONENT_BYTES,
    MAX_NAME_BYTES,
    REGULAR,
    ZERO_BLOCK,
    Action,
    Assembler,
    Member,
    Refused,
    WhiteoutMode,
    check_symlink_target,
    check_xattr,
    classify,
    hardlink_source,
    member_path,
    opaque_purge,
    opaque_xattr,
    parse_header,
    parse_pax,
    show,
    within,
)

OVERLAY, DELETE, AUFS = WhiteoutMode.OVERLAY, WhiteoutMode.DELETE, WhiteoutMode.AUFS
Format = Literal[0, 1, 2]  # tarfile.USTAR_FORMAT, GNU_FORMAT, PAX_FORMAT


def header(name: str = "file", fmt: Format = tarfile.USTAR_FORMAT, **fields: object) -> bytes:
    """The first 512-byte block ``tarfile`` writes for one member (its only header in ustar)."""
    info = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(info, key, value)
    return info.tobuf(fmt, "utf-8", "surrogateescape")[:BLOCK_SIZE]


def with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax(records: dict[bytes, bytes]) -> bytes:
    out = b""
    for key, value in records.items():
        body = b" " + key + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:  # the length counts its own digits
            length = len(str(length)) + len(body)
        out += str(length).encode() + body
    return out


def assemble(header_block: bytes, *extensions: tuple[bytes, bytes]) -> Member:
    """Feed (type, data) extension headers and then one real header through an Assembler."""
    asm = Assembler()
    for kind, data in extensions:
        asm.extension(Member(b"ext", kind, 0, 0, 0, len(data), 0, b""), data)
    member = parse_header(header_block)
    assert member is not None
    return asm.member(member)


# -- headers ------------------------------------------------------------------------------


def test_zero_block_is_end_of_archive() -> None:
    assert parse_header(ZERO_BLOCK) is None


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_fields_match_tarfile(fmt: Format) -> None:
    block = header("dir/file.txt", fmt, size=12345, mode=0o4755, uid=1000, gid=50,
                   mtime=1_700_000_123, type=tarfile.REGTYPE)
    member = parse_header(block)
    assert member is not None
    assert (member.name, member.type, member.mode, member.uid, member.gid, member.size,
            member.mtime_ns) == (b"dir/file.txt", REGULAR, 0o4755, 1000, 50, 12345,
                                 1_700_000_123_000_000_000)


def test_device_numbers_only_for_devices() -> None:
    dev = parse_header(header("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3))
    assert dev is not None and (dev.devmajor, dev.devminor) == (1, 3)
    # Garbage in the device fields of another type is ignored, as Go's archive/tar does.
    block = bytearray(header("file"))
    block[329:345] = b"zz" * 8
    member = parse_header(with_checksum(block))
    assert member is not None and member.devmajor == 0


def test_gnu_base256_numbers() -> None:
    member = parse_header(header("big", tarfile.GNU_FORMAT, uid=10**9, gid=3 * 10**9,
                                 mtime=-5, size=10 * 1024**3))
    assert member is not None
    assert (member.uid, member.gid, member.mtime_ns, member.size) == (
        10**9, 3 * 10**9, -5_000_000_000, 10 * 1024**3)


def test_ustar_prefix_joins_the_name() -> None:
    name = "p" * 120 + "/" + "n" * 90
    member = parse_header(header(name, tarfile.USTAR_FORMAT))
    assert member is not None and member.name == name.encode()


def test_star_prefix_is_shorter() -> None:
    block = bytearray(header("name"))
    block[345:476] = b"pre".ljust(131, b"\0")
    block[476:508] = b"1" * 32  # star keeps atime/ctime here: not part of the name
    block[508:512] = b"tar\0"
    member = parse_header(with_checksum(block))
    assert member is not None and member.name == b"pre/name"


def test_gnu_magic_has_no_prefix() -> None:
    block = bytearray(header("name", tarfile.GNU_FORMAT))
    block[345:357] = b"14567123456\0"  # GNU's atime field, where ustar keeps its prefix
    member = parse_header(with_checksum(block))
    assert member is not None and member.name == b"name"


def test_signed_checksum_accepted() -> None:
    block = bytearray(header("caf\xe9"))
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in block)
    block[148:156] = b"%06o\0 " % signed
    assert parse_header(bytes(block)) is not None


@pytest.mark.parametrize(("start", "patch"), [
    (0, b"X"),  # content changed under the checksum
    (148, b"        "),  # no checksum at all
    (148, b"0o12345 "),  # not octal
])
def test_bad_checksum_refused(start: int, patch: bytes) -> None:
    block = bytearray(header("file"))
    block[start:start + len(patch)] = patch
    with pytest.raises(Refused, match="checksum"):
        parse_header(bytes(block))


@pytest.mark.parametrize("field", [b"+000644\0", b"0o00644\0", b"00_0644\0", b"0000948\0"])
def test_malformed_numbers_refused(field: bytes) -> None:
    block = bytearray(header("file"))
    block[100:108] = field
    with pytest.raises(Refused, match="malformed header"):
        parse_header(with_checksum(block))


def test_space_terminated_numbers_accepted() -> None:
    block = bytearray(header("file"))
    block[100:108] = b" 000644 "  # old writers pad with spaces
    member = parse_header(with_checksum(block))
    assert member is not None and member.mode == 0o644


@settings(database=None)  # nothing written into the checkout
@given(name=st.text(st.characters(min_codepoint=33, max_codepoint=0x7FF, exclude_characters="/"),
                    min_size=1, max_size=50),
       mode=st.integers(0, 0o7777), uid=st.integers(0, 0o7777777), gid=st.integers(0, 0o7777777),
       size=st.integers(0, 0o77777777777), mtime=st.integers(0, 0o77777777777),
       fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT]))
def test_headers_round_trip_tarfile(name: str, mode: int, uid: int, gid: int, size: int,
                                    mtime: int, fmt: Format) -> None:
    block = header(name, fmt, mode=mode, uid=uid, gid=gid, size=size, mtime=mtime)
    member = parse_header(block)
    assert member is not None
    assert member.name == name.encode("utf-8", "surrogateescape")
    assert (member.mode, member.uid, member.gid, member.size, member.mtime_ns) == (
        mode, uid, gid, size, mtime * 1_000_000_000)


# -- member types and extensions ----------------------------------------------------------


def test_old_regular_type_with_slash_is_a_directory() -> None:
    assert assemble(header("d/", type=b"\0")).type == DIRECTORY
    assert assemble(header("f", type=b"\0")).type == REGULAR
    assert assemble(header("f", type=b"7")).type == REGULAR


@pytest.mark.parametrize("kind", [b"S", b"V", b"M", b"D", b"N", b"A", b"8"])
def test_unsupported_types_refused(kind: bytes) -> None:
    with pytest.raises(Refused, match="unsupported type"):
        assemble(header("x", type=kind))


def test_pax_overrides() -> None:
    records = {b"path": "é/long".encode() + b"x" * 200, b"linkpath": b"t" * 150,
               b"size": b"123456789012", b"uid": b"4000000000", b"gid": b"7",
               b"mtime": b"1700000000.123456789123", b"SCHILY.xattr.security.capability":
               b"\x01\x00\n=\xff", b"atime": b"1", b"uname": b"nobody", b"comment": b"hi"}
    member = assemble(header("short", type=tarfile.SYMTYPE), (b"x", pax(records)))
    assert member.name == records[b"path"]
    assert member.linkname == records[b"linkpath"]
    assert (member.size, member.uid, member.gid) == (123456789012, 4000000000, 7)
    assert member.mtime_ns == 1_700_000_000_123_456_789
    assert member.xattrs == {b"security.capability": b"\x01\x00\n=\xff"}


@pytest.mark.parametrize(("value", "ns"), [
    (b"5", 5_000_000_000), (b"-1.5", -1_500_000_000), (b"0.000000001", 1), (b"7.", 7 * 10**9)])
def test_pax_times(value: bytes, ns: int) -> None:
    assert assemble(header("f"), (b"x", pax({b"mtime": value}))).mtime_ns == ns


@pytest.mark.parametrize(("records", "reason"), [
    ({b"size": b"-1"}, "invalid pax size"),
    ({b"size": b""}, "invalid pax size"),
    ({b"uid": b"4294967295"}, "invalid pax uid"),
    ({b"gid": b"x"}, "invalid pax gid"),
    ({b"mtime": b"1e9"}, "invalid pax mtime"),
    ({b"path": b"a\0b"}, "NUL byte in its name"),
    ({b"linkpath": b"a\0b"}, "NUL byte in its link target"),
    ({b"SCHILY.xattr.": b"v"}, "xattr without a name"),
    ({b"SCHILY.xattr.trusted.overlay.opaque": b"y"}, "steer overlayfs"),
    ({b"SCHILY.xattr.user.overlay.redirect": b"/x"}, "steer overlayfs"),
    ({b"GNU.sparse.major": b"1"}, "sparse"),
])
def test_pax_refusals(records: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        assemble(header("f"), (b"x", pax(records)))


def test_pax_records_binary_values_and_padding() -> None:
    data = pax({b"a": b"x=y\nz", b"SCHILY.xattr.user.b": b"\0\xff"}) + b"\0" * 30
    assert parse_pax(data) == {b"a": b"x=y\nz", b"SCHILY.xattr.user.b": b"\0\xff"}


@pytest.mark.parametrize("data", [
    b"x path=a\n", b"99 path=a\n", b"10 path=a\n\n", b"6 =ab\n", b"8 path\n", b"11 path=ab\0",
    b"3 a", b"9 pa\0h=a\n", b"garbage",
])
def test_malformed_pax_refused(data: bytes) -> None:
    with pytest.raises(Refused, match="malformed pax"):
        parse_pax(data)


def test_gnu_long_names() -> None:
    long_name, long_link = b"n" * 300, b"l" * 300
    member = assemble(header("short", type=tarfile.LNKTYPE), (b"L", long_name + b"\0"),
                      (b"K", long_link + b"\0junk"))
    assert (member.name, member.linkname) == (long_name, long_link)


@pytest.mark.parametrize(("extensions", "reason"), [
    (((b"x", pax({b"path": b"a"})), (b"L", b"b\0")), "both a pax path and a GNU long name"),
    (((b"x", pax({b"linkpath": b"a"})), (b"K", b"b\0")), "both a pax linkpath"),
    (((b"x", pax({b"uid": b"1"})), (b"x", pax({b"uid": b"2"}))), "two pax headers"),
    (((b"L", b"a\0"), (b"L", b"b\0")), "two GNU long names"),
    (((b"K", b"a\0"), (b"K", b"b\0")), "two GNU long link names"),
    (((b"g", pax({b"path": b"evil"})),), "global pax header setting 'path'"),
    (((b"g", pax({b"SCHILY.xattr.user.a": b"1"})),), "global pax header"),
])
def test_ambiguous_extensions_refused(extensions: tuple[tuple[bytes, bytes], ...],
                                      reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        assemble(header("f"), *extensions)


def test_harmless_global_header_ignored() -> None:
    # git archive writes one with a comment (the commit id).
    member = assemble(header("f", uid=3), (b"g", pax({b"comment": b"abc"})))
    assert (member.name, member.uid) == (b"f", 3)


def test_pending_extension_is_tracked() -> None:
    asm = Assembler()
    states = [asm.pending]
    asm.extension(Member(b"x", b"x", 0, 0, 0, 0, 0, b""), pax({b"uid": b"1"}))
    states.append(asm.pending)
    member = parse_header(header("f"))
    assert member is not None
    asm.member(member)
    assert [*states, asm.pending] == [False, True, False]


@pytest.mark.parametrize(("fields", "reason"), [
    ({"uid": 0xFFFFFFFF}, "invalid owner"),
    ({"mtime": 2**70}, "mtime out of range"),
    ({"devmajor": 2**40, "type": tarfile.BLKTYPE}, "invalid device"),
])
def test_out_of_range_numbers_refused(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        assemble(header("f", tarfile.GNU_FORMAT, **fields))


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "path"), [
    (b"a", b"a"), (b"a/b/c", b"a/b/c"), (b"./a/b", b"a/b"), (b"a/./b/", b"a/b"),
    (b"a//b", b"a/b"), (b".", b""), (b"./", b""), (b"a/.../b", b"a/.../b"),
    (b"..a/b..", b"..a/b.."), (b"\xff\xfe", b"\xff\xfe"), (b"c" * 255, b"c" * 255),
])
def test_member_path_normalises(name: bytes, path: bytes) -> None:
    assert member_path(name) == path


@pytest.mark.parametrize(("name", "reason"), [
    (b"", "empty name"),
    (b"/etc/passwd", "absolute name"),
    (b"//etc", "absolute name"),
    (b"..", "escapes the layer"),
    (b"../etc/passwd", "escapes the layer"),
    (b"a/../../b", "escapes the layer"),
    (b"a/..", "escapes the layer"),
    (b"./../x", "escapes the layer"),
    (b"a\0b", "NUL byte"),
    (b"d/" + b"c" * 256, "component longer than 255"),
    (b"d/" * 2047 + b"dd", "longer than 4095"),
])
def test_member_path_refusals(name: bytes, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        member_path(name)


def test_name_limits_are_the_kernels() -> None:
    assert MAX_COMPONENT_BYTES == 255 and MAX_NAME_BYTES == 4095
    assert member_path(b"d/" * 2046 + b"ddd") == b"d/" * 2046 + b"ddd"


@pytest.mark.parametrize(("link", "reason"), [
    (b"../etc/passwd", "target '../etc/passwd' escapes the layer"),
    (b"/etc/passwd", "absolute name"),
    (b"./", "layer root"),
])
def test_hardlink_source_refusals(link: bytes, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        hardlink_source(link)


def test_hardlink_source_normalises() -> None:
    assert hardlink_source(b"./usr//bin/x") == b"usr/bin/x"


@pytest.mark.parametrize("target", [b"/etc/passwd", b"../../../x", b"a", b"\xff"])
def test_any_symlink_text_allowed(target: bytes) -> None:
    check_symlink_target(target)


@pytest.mark.parametrize(("target", "reason"), [
    (b"", "empty target"), (b"a\0b", "NUL"), (b"x" * 4096, "longer than 4095")])
def test_symlink_target_refusals(target: bytes, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        check_symlink_target(target)


# -- whiteouts --------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "mode", "expected"), [
    (b"a/b", OVERLAY, (Action.CREATE, b"a/b")),
    (b"a/.wh.b", OVERLAY, (Action.WHITEOUT, b"a/b")),
    (b".wh.b", DELETE, (Action.WHITEOUT, b"b")),
    (b".wh.b", AUFS, (Action.CREATE, b".wh.b")),
    (b"a/.wh..wh..opq", OVERLAY, (Action.OPAQUE, b"a")),
    (b".wh..wh..opq", DELETE, (Action.OPAQUE, b"")),
    (b"a/.wh..wh..opq", AUFS, (Action.CREATE, b"a/.wh..wh..opq")),
    (b".wh..wh.plnk", OVERLAY, (Action.SKIP, b".wh..wh.plnk")),
    (b".wh..wh.plnk/123.4", DELETE, (Action.SKIP, b".wh..wh.plnk")),
    (b".wh..wh.plnk/123.4", AUFS, (Action.CREATE, b".wh..wh.plnk/123.4")),
    (b"a/.wh..wh.orph", AUFS, (Action.CREATE, b"a/.wh..wh.orph")),
    (b"a/x.wh.b", OVERLAY, (Action.CREATE, b"a/x.wh.b")),
    (b"a/.whb", OVERLAY, (Action.CREATE, b"a/.whb")),
    (b"a/.wh.b.wh.c", DELETE, (Action.WHITEOUT, b"a/b.wh.c")),
])
def test_classify(path: bytes, mode: WhiteoutMode, expected: tuple[Action, bytes]) -> None:
    assert classify(path, mode) == expected


@pytest.mark.parametrize("mode", list(WhiteoutMode))
@pytest.mark.parametrize(("path", "reason"), [
    (b".wh...", "whiteout for '..'"),
    (b"a/.wh..", "whiteout for '.'"),
    (b"a/.wh.", "whiteout for ''"),
    (b"a/.wh.b/c", "whiteout names cannot hold a slash"),
    (b".wh.x/.wh.y", "whiteout names cannot hold a slash"),
])
def test_bad_whiteouts_refused_in_every_mode(path: bytes, reason: str, mode: WhiteoutMode) -> None:
    with pytest.raises(Refused, match=reason):
        classify(path, mode)


def test_opaque_xattr() -> None:
    assert opaque_xattr(False) == ("trusted.overlay.opaque", b"y")
    assert opaque_xattr(True) == ("user.overlay.opaque", b"y")


def test_opaque_purge_keeps_only_this_layer() -> None:
    touched = {b"d", b"d/new", b"d/sub", b"d/sub/z", b"d/file"}
    entries = [(b"new", False), (b"old", False), (b"olddir", True), (b"sub", True),
               (b"file", False)]
    assert opaque_purge(b"d", entries, touched) == ([b"old", b"olddir"], [b"d/sub"])


def test_opaque_purge_at_root() -> None:
    assert opaque_purge(b"", [(b"a", True), (b"b", True)], {b"a"}) == ([b"b"], [b"a"])


# -- xattrs and helpers -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"security.capability", b"user.mime", b"trusted.foo",
                                  b"system.posix_acl_access", b"security.selinux",
                                  b"trusted.overlayfoo"])
def test_content_xattrs_allowed(name: bytes) -> None:
    check_xattr(name)


@pytest.mark.parametrize("name", [b"trusted.overlay.opaque", b"trusted.overlay.redirect",
                                  b"user.overlay.metacopy", b"user.overlay.origin"])
def test_steering_xattrs_refused(name: bytes) -> None:
    with pytest.raises(Refused, match="steer overlayfs"):
        check_xattr(name)


@pytest.mark.parametrize(("path", "ancestor", "inside"), [
    (b"a/b", b"a", True), (b"a", b"a", True), (b"ab", b"a", False), (b"a", b"a/b", False),
    (b"x", b"", True)])
def test_within(path: bytes, ancestor: bytes, inside: bool) -> None:
    assert within(path, ancestor) is inside


def test_show_never_raises() -> None:
    assert show(b"../etc/passwd") == "'../etc/passwd'"
    assert show(b"\xff") == "'\\\\xff'"
