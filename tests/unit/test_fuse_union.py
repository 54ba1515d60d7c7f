"""The fuse driver's union rules without a kernel: lookup resolution, readdir merging, xattr
hiding (``imaged.fuse.union``) and the plans for changes and copy-up (``imaged.fuse.changes``).

Each rule cites the kernel overlay behaviour it mirrors, from Documentation/filesystems/
overlayfs.rst or fs/overlayfs/*.c, since the differential test of slice 3 will hold the driver
to exactly that behaviour. Stacks are written top first: index 0 is the upper.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imaged.fuse.changes import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    Access,
    CopyUp,
    CopyUpPolicy,
    CopyUpSetting,
    Removal,
    choose_copy_up,
    copy_up_chain,
    needs_copy_up,
    open_access,
    open_flags,
    plan_create,
    plan_link,
    plan_rename,
    plan_rmdir,
    plan_unlink,
)
from imaged.fuse.nodes import Origin
from imaged.fuse.union import (
    UPPER,
    Entry,
    FileType,
    Listing,
    Refused,
    Resolution,
    check_xattr_name,
    file_type,
    is_opaque,
    is_private_xattr,
    merge,
    resolve,
    root,
    visible_xattrs,
)

F = Entry(FileType.REGULAR)
D = Entry(FileType.DIRECTORY)
O = Entry(FileType.DIRECTORY, opaque=True)  # noqa: E741  # reads as "opaque" in the tables
W = Entry(FileType.WHITEOUT)
L = Entry(FileType.SYMLINK)
N = None  # the layer holds nothing under the name

Stack = Sequence[Entry | None]


def stack(entries: Stack, first: int = 0) -> list[tuple[int, Entry | None]]:
    return [(first + i, e) for i, e in enumerate(entries)]


def res(entries: Stack, first: int = 0) -> Resolution:
    return resolve(stack(entries, first), complete=True)


MERGED = res([D, D])  # a parent directory in the upper with a lower part
UPPER_ONLY = res([D])  # a pure upper parent
LOWER_ONLY = res([N, D])  # a parent the upper does not hold yet
ABSENT = res([N, N])


# lookup

# (stack, visible layers, upper holds a whiteout, a lower would still show the name)
RESOLVE_CASES: list[tuple[Stack, tuple[int, ...], bool, bool]] = [
    ([N, F], (1,), False, True),
    ([F, F], (0,), False, True),
    ([F], (0,), False, False),
    ([W, F], (), True, False),
    ([N, W, F], (), False, False),
    ([D, D, D], (0, 1, 2), False, True),
    ([D, O, D], (0, 1), False, True),
    ([O, D], (0,), False, True),
    ([D, F, D], (0,), False, True),
    ([F, D], (0,), False, True),
    ([D, W, D], (0,), False, False),
    ([N, N], (), False, False),
    ([F, W, F], (0,), False, False),
    ([D], (0,), False, False),
    ([N, D, N, D], (1, 3), False, True),
    ([L, N], (0,), False, False),
    ([N, D, F], (1,), False, True),
    ([D, N, N, O, D], (0, 3), False, True),
]


@pytest.mark.parametrize(("entries", "layers", "upper_whiteout", "lower_positive"),
                         RESOLVE_CASES)
def test_resolve(entries: Stack, layers: tuple[int, ...], upper_whiteout: bool,
                 lower_positive: bool) -> None:
    """overlayfs.rst "Directories" and "whiteouts and opaque directories": the first layer
    holding a name decides; a whiteout hides what is below; a directory merges with those below
    until an opaque one, and a non-directory above a directory hides it. ``lower_positive`` is
    fs/overlayfs/dir.c ovl_lower_positive: the first lower entry decides."""
    found = res(entries)
    assert found.layers == layers
    assert [entries[i] for i in layers] == list(found.entries)
    assert found.upper_whiteout == upper_whiteout
    assert found.lower_positive == lower_positive


def test_resolve_is_lazy() -> None:
    """A lookup stops reading layers once the answer is known: an upper file needs no lower
    fstatat, a lower file none below it."""
    asked: list[int] = []

    def walk(entries: Stack) -> Iterator[tuple[int, Entry | None]]:
        for layer, entry in stack(entries):
            asked.append(layer)
            yield layer, entry

    found = resolve(walk([F, F, F]))
    assert (found.layers, found.lower_positive, asked) == ((0,), None, [0])
    asked.clear()
    assert resolve(walk([N, F, F])).layers == (1,)
    assert asked == [0, 1]
    asked.clear()
    assert resolve(walk([F, N, W, F]), complete=True).lower_positive is False
    assert asked == [0, 1, 2]


def test_resolve_refuses_layers_out_of_order() -> None:
    with pytest.raises(ValueError, match="top first"):
        resolve([(1, None), (0, F)])


def test_resolution_of_nothing() -> None:
    with pytest.raises(Refused) as info:
        assert ABSENT.top
    assert info.value.errno == errno.ENOENT
    assert not ABSENT.exists and not ABSENT.is_dir


def test_root_merges_every_layer() -> None:
    """The mount's root is every layer's root; overlay does not read an opaque mark there."""
    assert root(3).layers == (0, 1, 2, 3)
    assert root(2, upper=False).layers == (1, 2)
    assert root(1).is_dir and root(1).pure_upper is False
    with pytest.raises(ValueError):
        root(0)


@pytest.mark.parametrize(("mode", "rdev", "kind"), [
    (stat.S_IFREG | 0o644, 0, FileType.REGULAR),
    (stat.S_IFDIR | 0o755, 0, FileType.DIRECTORY),
    (stat.S_IFLNK | 0o777, 0, FileType.SYMLINK),
    (stat.S_IFCHR, 0, FileType.WHITEOUT),
    (stat.S_IFCHR | 0o666, os.makedev(1, 3), FileType.CHARDEV),
    (stat.S_IFBLK | 0o660, 0, FileType.BLOCKDEV),
    (stat.S_IFIFO | 0o600, 0, FileType.FIFO),
    (stat.S_IFSOCK | 0o600, 0, FileType.SOCKET),
])
def test_file_type(mode: int, rdev: int, kind: FileType) -> None:
    """overlayfs.rst: "A whiteout is created as a character device with 0/0 device number"."""
    assert file_type(mode, rdev) is kind


def test_file_type_refuses_unknown_modes() -> None:
    with pytest.raises(ValueError):
        file_type(0o170000 & ~stat.S_IFMT(0o170000))


@pytest.mark.parametrize(("value", "opaque"), [
    (b"y", True), (b"n", False), (b"yes", False), (b"", False), (None, False)])
def test_opaque_value(value: bytes | None, opaque: bool) -> None:
    """overlayfs.rst: "A directory is made opaque by setting the xattr trusted.overlay.opaque
    to 'y'"; ovl_is_opaquedir reads exactly that value."""
    assert is_opaque(value) is opaque


# readdir


def listing(*layers: dict[str, Entry], first: int = 0) -> Listing:
    return merge((first + i, [(n.encode(), e) for n, e in layer.items()])
                 for i, layer in enumerate(layers))


def shown(found: Listing) -> list[tuple[str, int]]:
    return [(item.name.decode(), item.layer) for item in found.names]


def test_merge_upper_first_then_lowers_deduplicated() -> None:
    """overlayfs.rst "readdir": "upper is read first, then lower - entries that already exist
    are not re-added"; whiteouts hide the name below and never show themselves."""
    found = listing({"b": F, "a": D, "gone": W},
                    {"a": D, "gone": F, "c": F, "z": L},
                    {"c": D, "d": F})
    assert shown(found) == [("a", 0), ("b", 0), ("c", 1), ("z", 1), ("d", 2)]
    assert found.upper_whiteouts == (b"gone",)
    assert not found.empty and len(found) == 5


def test_merge_a_non_directory_hides_a_directory_below() -> None:
    found = listing({"x": F}, {"x": D})
    assert shown(found) == [("x", 0)] and found.names[0].entry is F


def test_merge_lower_whiteouts_are_not_upper_whiteouts() -> None:
    """Whiteouts in image layers hide names but are never the container's to clear."""
    found = listing({}, {"x": W}, {"x": F, "y": F})
    assert shown(found) == [("y", 2)]
    assert found.upper_whiteouts == ()


def test_merge_of_only_whiteouts_is_empty() -> None:
    """ovl_check_empty_dir: a directory holding only whiteouts is empty in the union."""
    found = listing({"x": W}, {"x": F})
    assert found.empty and found.upper_whiteouts == (b"x",)


def test_merge_skips_dot_names_and_checks_order() -> None:
    assert listing({".": D, "..": D}).empty
    with pytest.raises(ValueError, match="top first"):
        merge([(1, []), (0, [])])


def test_resume() -> None:
    """pyfuse3 readdir(start_id): each entry carries the offset to resume after it."""
    found = listing({"a": F, "b": F, "c": F})
    assert [(off, e.name) for off, e in found.resume(0)] == [(1, b"a"), (2, b"b"), (3, b"c")]
    assert [e.name for N, e in found.resume(2)] == [b"c"]
    assert list(found.resume(3)) == [] and list(found.resume(-1)) == []


KINDS = st.sampled_from([F, D, O, W, L])
LAYER = st.dictionaries(st.sampled_from("abcdefg"), KINDS, max_size=7)


@given(st.lists(LAYER, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_merge_properties(layers: list[dict[str, Entry]], rng: object) -> None:
    """No name twice, no whiteout, each name shown from the layer a lookup resolves it to, and
    a listing rebuilt from the layers in another getdents order resumes at any offset without
    repeating or skipping a name."""
    import random

    assert isinstance(rng, random.Random)
    found = listing(*layers)
    names = [item.name for item in found.names]
    assert len(names) == len(set(names))
    assert all(item.entry.type is not FileType.WHITEOUT for item in found.names)
    every = {n for layer in layers for n in layer}
    for name in every:
        looked = resolve(stack([layer.get(name) for layer in layers]))
        match = [item for item in found.names if item.name.decode() == name]
        expected = [(looked.top, looked.entry)] if looked.exists else []
        assert [(m.layer, m.entry) for m in match] == expected
    shuffled = []
    for layer in layers:
        items = list(layer.items())
        rng.shuffle(items)
        shuffled.append(dict(items))
    again = listing(*shuffled)
    for offset in range(len(found) + 1):
        page = [item.name for N, item in found.resume(0)][:offset]
        rest = [item.name for N, item in again.resume(offset)]
        assert page + rest == names


# xattrs


@pytest.mark.parametrize(("name", "private"), [
    (b"trusted.overlay.opaque", True), (b"user.overlay.redirect", True),
    (b"trusted.overlay.", True), (b"trusted.overlayx", False), (b"user.mime_type", False),
    (b"security.capability", False), (b"trusted.other", False)])
def test_private_xattrs(name: bytes, private: bool) -> None:
    """fs/overlayfs: overlay's own xattrs are hidden from listxattr and its handler answers
    EOPNOTSUPP to get and set (ovl_own_xattr_get/set)."""
    assert is_private_xattr(name) is private
    if private:
        with pytest.raises(Refused) as info:
            check_xattr_name(name)
        assert info.value.errno == errno.EOPNOTSUPP
    else:
        check_xattr_name(name)


def test_visible_xattrs() -> None:
    """ovl_can_list: private names never listed, other trusted.* only to CAP_SYS_ADMIN."""
    names = [b"user.a", b"trusted.overlay.opaque", b"trusted.b", b"user.overlay.origin",
             b"security.selinux"]
    assert visible_xattrs(names, privileged=True) == [b"user.a", b"trusted.b",
                                                      b"security.selinux"]
    assert visible_xattrs(names, privileged=False) == [b"user.a", b"security.selinux"]


# unlink and rmdir


def refused(code: int) -> pytest.RaisesExc[Refused]:
    return pytest.raises(Refused, check=lambda exc: exc.errno == code)


@pytest.mark.parametrize(("parent", "child", "action", "copy_up"), [
    (UPPER_ONLY, res([F]), Removal.REMOVE, False),
    (MERGED, res([F, N]), Removal.REMOVE, False),
    (MERGED, res([F, F]), Removal.REPLACE_WITH_WHITEOUT, False),
    (MERGED, res([F, W, F]), Removal.REMOVE, False),
    (MERGED, res([N, F]), Removal.WHITEOUT, False),
    (LOWER_ONLY, res([N, L]), Removal.WHITEOUT, True),
    (MERGED, res([L, D]), Removal.REPLACE_WITH_WHITEOUT, False),
])
def test_plan_unlink(parent: Resolution, child: Resolution, action: Removal,
                     copy_up: bool) -> None:
    """overlayfs.rst "whiteouts": removing a name a lower still shows leaves a whiteout (made
    in one step over the upper entry, ovl_remove_and_whiteout); a name only the upper holds is
    removed (ovl_remove_upper); the parent is copied up first."""
    plan = plan_unlink(parent, child)
    assert (plan.action, plan.copy_up_parent, plan.clear) == (action, copy_up, ())


def test_plan_unlink_refusals() -> None:
    with refused(errno.ENOENT):
        plan_unlink(MERGED, res([W, F]))
    with refused(errno.EISDIR):
        plan_unlink(MERGED, res([D]))
    with refused(errno.ENOTDIR):
        plan_unlink(res([F]), res([F]))
    with pytest.raises(ValueError, match="complete"):
        plan_unlink(MERGED, resolve(stack([F, F])))


@given(st.lists(st.sampled_from([F, D, O, W, L, None]), min_size=1, max_size=5))
def test_removal_hides_the_name_with_as_few_whiteouts_as_possible(entries: Stack) -> None:
    """After the planned removal the name shows nothing, and a whiteout is left only where a
    lower would otherwise show it (so a pure upper name leaves no trace, as in overlay)."""
    child = res(entries)
    if not child.exists or child.is_dir:
        return
    plan = plan_unlink(MERGED, child)
    upper: Entry | None = W if plan.action is not Removal.REMOVE else None
    after = res([upper, *entries[1:]])
    assert not after.exists
    assert (upper is not None) == bool(res([None, *entries[1:]]).exists)


def test_plan_rmdir_needs_the_union_empty() -> None:
    """ovl_check_empty_dir: a merged directory whose upper part is empty but whose lower part
    shows names is ENOTEMPTY."""
    with refused(errno.ENOTEMPTY):
        plan_rmdir(MERGED, res([D, D]), listing({}, {"x": F}, first=0))
    with refused(errno.ENOTDIR):
        plan_rmdir(MERGED, res([F]), listing())
    with refused(errno.ENOENT):
        plan_rmdir(MERGED, ABSENT, listing())


@pytest.mark.parametrize(("child", "contents", "action", "clear"), [
    (res([D]), listing({"w": W}), Removal.REMOVE, (b"w",)),
    (res([D, D]), listing({"w": W}, {"w": F}), Removal.REPLACE_WITH_WHITEOUT, (b"w",)),
    (res([O, D]), listing({}), Removal.REPLACE_WITH_WHITEOUT, ()),
    (res([N, D]), listing({}, {"w": W}, first=0), Removal.WHITEOUT, ()),
])
def test_plan_rmdir(child: Resolution, contents: Listing, action: Removal,
                    clear: tuple[bytes, ...]) -> None:
    """Whiteouts in the upper directory go before it does (ovl_clear_empty); a lower still
    showing the name leaves a whiteout."""
    plan = plan_rmdir(MERGED, child, contents)
    assert (plan.action, plan.clear) == (action, clear)


# create and link


@pytest.mark.parametrize(("parent", "child", "kind", "copy_up", "over", "opaque"), [
    (UPPER_ONLY, res([N]), FileType.REGULAR, False, False, False),
    (MERGED, res([W, F]), FileType.REGULAR, False, True, False),
    (MERGED, res([W, D]), FileType.DIRECTORY, False, True, True),
    (MERGED, res([N, W, D]), FileType.DIRECTORY, False, False, False),
    (LOWER_ONLY, res([N, N]), FileType.SYMLINK, True, False, False),
])
def test_plan_create(parent: Resolution, child: Resolution, kind: FileType, copy_up: bool,
                     over: bool, opaque: bool) -> None:
    """ovl_create_or_link: over an upper whiteout the new object replaces it, and a new
    directory there is made opaque so the directory the whiteout hid cannot merge into it; a
    whiteout in an image layer needs nothing (it still stops the merge below)."""
    plan = plan_create(parent, child, kind)
    assert (plan.copy_up_parent, plan.over_whiteout, plan.opaque) == (copy_up, over, opaque)


def test_plan_create_refusals() -> None:
    with refused(errno.EEXIST):
        plan_create(MERGED, res([N, F]), FileType.REGULAR)
    with pytest.raises(ValueError):
        plan_create(MERGED, ABSENT, FileType.WHITEOUT)


def test_plan_link() -> None:
    """overlayfs.rst "Non-directories": "creating a hard-link also requires copy_up"."""
    plan = plan_link(res([N, F]), MERGED, res([W, F]))
    assert (plan.copy_up_source, plan.over_whiteout, plan.opaque) == (True, True, False)
    assert not plan_link(res([F]), MERGED, ABSENT).copy_up_source
    with refused(errno.EPERM):
        plan_link(res([D]), MERGED, ABSENT)
    with refused(errno.EEXIST):
        plan_link(res([F]), MERGED, res([F]))
    with refused(errno.ENOENT):
        plan_link(ABSENT, MERGED, ABSENT)


# rename


@pytest.mark.parametrize(("old", "new", "flags", "code"), [
    (res([N, D]), ABSENT, 0, errno.EXDEV),
    (res([D, D]), ABSENT, 0, errno.EXDEV),
    (res([F]), res([N, D]), RENAME_EXCHANGE, errno.EXDEV),
    (ABSENT, ABSENT, 0, errno.ENOENT),
    (res([F]), ABSENT, RENAME_EXCHANGE, errno.ENOENT),
    (res([F]), res([W, F]), RENAME_EXCHANGE, errno.ENOENT),
    (res([F]), res([N, F]), RENAME_NOREPLACE, errno.EEXIST),
    (res([F]), ABSENT, RENAME_WHITEOUT, errno.EINVAL),
    (res([F]), res([F]), RENAME_EXCHANGE | RENAME_NOREPLACE, errno.EINVAL),
    (res([D]), res([F]), 0, errno.ENOTDIR),
    (res([F]), res([D]), 0, errno.EISDIR),
])
def test_plan_rename_refusals(old: Resolution, new: Resolution, flags: int, code: int) -> None:
    """overlayfs.rst "Renaming directories": without redirect_dir a directory with lower parts
    gives EXDEV (ovl_can_move); ovl_rename accepts only RENAME_NOREPLACE and RENAME_EXCHANGE;
    the rest is rename(2)'s own contract."""
    with refused(code):
        plan_rename(MERGED, old, MERGED, new, flags, listing())


@pytest.mark.parametrize(("old_parent", "old", "new_parent", "new", "flags", "expect"), [
    # an upper-only file: a plain rename
    (UPPER_ONLY, res([F]), UPPER_ONLY, ABSENT, 0, dict(flags=0)),
    # a lower file: copied up, then renamed leaving a whiteout
    (MERGED, res([N, F]), MERGED, ABSENT, 0,
     dict(flags=RENAME_WHITEOUT, copy_up_old=True)),
    # copied up and still shown below: whiteout; over a visible target: replaces it
    (MERGED, res([F, F]), MERGED, res([N, F]), 0, dict(flags=RENAME_WHITEOUT, replaces=True)),
    # the target is an upper whiteout: swap, the whiteout moves to the old name
    (MERGED, res([F, F]), MERGED, res([W, F]), 0, dict(flags=RENAME_EXCHANGE)),
    # nothing below the source, target an upper whiteout: a file just replaces it
    (MERGED, res([F]), MERGED, res([W, F]), 0, dict(flags=0)),
    # a directory cannot replace a whiteout (a char device): swap, then drop it; and it moves
    # into a merged parent, so it becomes opaque
    (MERGED, res([D]), MERGED, res([W, D]), 0,
     dict(flags=RENAME_EXCHANGE, remove_whiteout_after=True, opaque_old=True)),
    # a pure upper directory into a pure upper parent: nothing below can merge in
    (UPPER_ONLY, res([D]), UPPER_ONLY, ABSENT, 0, dict(flags=0)),
    # an opaque upper directory over a lower one moves (its lowers are cut off), leaving a
    # whiteout; already opaque, it needs no mark
    (MERGED, res([O, D]), MERGED, ABSENT, 0, dict(flags=RENAME_WHITEOUT)),
    # parents the upper lacks are copied up first
    (LOWER_ONLY, res([N, F]), LOWER_ONLY, ABSENT, 0,
     dict(flags=RENAME_WHITEOUT, copy_up_parents=("old", "new"), copy_up_old=True)),
    # NOREPLACE passes through to the upper where it holds nothing
    (UPPER_ONLY, res([F]), UPPER_ONLY, ABSENT, RENAME_NOREPLACE, dict(flags=RENAME_NOREPLACE)),
    # an exchange of two files, the lower one copied up first
    (MERGED, res([F]), MERGED, res([N, F]), RENAME_EXCHANGE,
     dict(flags=RENAME_EXCHANGE, copy_up_new=True)),
    # an exchange of two pure upper directories across merged parents: both become opaque
    (MERGED, res([D]), MERGED, res([D]), RENAME_EXCHANGE,
     dict(flags=RENAME_EXCHANGE, opaque_old=True, opaque_new=True)),
])
def test_plan_rename(old_parent: Resolution, old: Resolution, new_parent: Resolution,
                     new: Resolution, flags: int, expect: dict[str, object]) -> None:
    """fs/overlayfs/dir.c ovl_rename: the source is copied up; a source a lower still shows
    gets RENAME_WHITEOUT, or RENAME_EXCHANGE onto an upper whiteout; a directory moved into a
    merged directory is marked opaque."""
    plan = plan_rename(old_parent, old, new_parent, new, flags, listing())
    for field, value in expect.items():
        assert getattr(plan, field) == value, field
    for field in {"copy_up_old", "copy_up_new", "opaque_old", "opaque_new",
                  "remove_whiteout_after", "replaces"} - set(expect):
        assert getattr(plan, field) is False, field


def test_plan_rename_over_a_directory() -> None:
    """Replacing a directory needs it empty in the union, and its upper whiteouts cleared."""
    with refused(errno.ENOTEMPTY):
        plan_rename(UPPER_ONLY, res([D]), MERGED, res([D, D]), 0, listing({}, {"x": F}))
    plan = plan_rename(UPPER_ONLY, res([D]), MERGED, res([D, D]), 0,
                       listing({"x": W}, {"x": F}))
    assert (plan.clear, plan.replaces, plan.opaque_old) == ((b"x",), True, True)
    with pytest.raises(ValueError, match="listing"):
        plan_rename(UPPER_ONLY, res([D]), MERGED, res([D]))


# copy-up


@pytest.mark.parametrize(("flags", "access"), [
    (os.O_RDONLY, Access.READ), (os.O_WRONLY, Access.WRITE), (os.O_RDWR, Access.WRITE),
    (os.O_RDONLY | os.O_TRUNC, Access.WRITE), (os.O_RDONLY | os.O_NOATIME, Access.READ)])
def test_open_access(flags: int, access: Access) -> None:
    """overlayfs.rst "Non-directories": a file is copied up when "opening for write access"."""
    assert open_access(flags) is access


@pytest.mark.parametrize(("access", "child", "needed"), [
    (Access.READ, res([N, F]), False),
    (Access.WRITE, res([N, F]), True),
    (Access.SETATTR, res([N, D]), True),
    (Access.SETXATTR, res([N, L]), True),
    (Access.LINK, res([N, F]), True),
    (Access.WRITE, res([F, F]), False),
])
def test_needs_copy_up(access: Access, child: Resolution, needed: bool) -> None:
    """overlayfs.rst: write access, "changing some metadata" and hard links copy up; reads
    never do."""
    assert needs_copy_up(access, child) is needed


def test_copy_up_chain() -> None:
    """overlayfs.rst: copy-up "first makes sure that the containing directory exists in the
    upper filesystem - creating it and any parents as necessary", top-down."""
    assert list(copy_up_chain([True, True, False, False])) == [2, 3]
    assert list(copy_up_chain([True, True])) == []
    with pytest.raises(ValueError):
        copy_up_chain([True, False, True])


def test_open_flags() -> None:
    """fuse-overlayfs' fixes under the writeback cache: O_WRONLY becomes O_RDWR, O_APPEND goes;
    O_DIRECT always goes (its #167)."""
    base = os.O_CLOEXEC | os.O_NOFOLLOW
    assert open_flags(os.O_WRONLY | os.O_APPEND, writeback=True) == os.O_RDWR | base
    assert open_flags(os.O_WRONLY | os.O_APPEND, writeback=False) == \
        os.O_WRONLY | os.O_APPEND | base
    assert open_flags(os.O_RDONLY | os.O_DIRECT | os.O_TRUNC, writeback=False) == base


AUTO, FULL, PARTIAL = (CopyUpPolicy(setting, 1 << 20) for setting in CopyUpSetting)
BIG, SMALL = 1 << 30, 4096


@pytest.mark.parametrize(("policy", "kind", "size", "reflink", "alias", "truncate", "mode"), [
    (AUTO, FileType.REGULAR, BIG, True, False, None, CopyUp.REFLINK),
    (AUTO, FileType.REGULAR, BIG, False, False, None, CopyUp.PARTIAL),
    (AUTO, FileType.REGULAR, SMALL, False, False, None, CopyUp.FULL),
    (AUTO, FileType.REGULAR, 1 << 20, False, False, None, CopyUp.PARTIAL),
    (FULL, FileType.REGULAR, BIG, False, False, None, CopyUp.FULL),
    (FULL, FileType.REGULAR, BIG, True, False, None, CopyUp.REFLINK),
    (PARTIAL, FileType.REGULAR, SMALL, True, False, None, CopyUp.PARTIAL),
    (PARTIAL, FileType.REGULAR, 0, False, False, None, CopyUp.METADATA),
    (AUTO, FileType.REGULAR, BIG, False, False, 0, CopyUp.METADATA),
    (AUTO, FileType.REGULAR, BIG, False, False, 10, CopyUp.PARTIAL),
    (AUTO, FileType.REGULAR, BIG, True, True, None, CopyUp.LINK),
    (AUTO, FileType.DIRECTORY, 4096, True, False, None, CopyUp.METADATA),
    (FULL, FileType.SYMLINK, 12, False, False, None, CopyUp.METADATA),
    (PARTIAL, FileType.FIFO, 0, False, False, None, CopyUp.METADATA),
])
def test_choose_copy_up(policy: CopyUpPolicy, kind: FileType, size: int, reflink: bool,
                        alias: bool, truncate: int | None, mode: CopyUp) -> None:
    """Issue 14 "Copy-up": full is reflink else a copy; auto is reflink, else partial above the
    threshold, else full. A lower hard link whose other name is up already is linked, as
    overlay's index=on does."""
    assert choose_copy_up(policy, kind, size, can_reflink=reflink, upper_alias=alias,
                          truncate_to=truncate) is mode


def test_origin_rides_along() -> None:
    """The union carries the shell's identity for the node table untouched."""
    entry = Entry(FileType.REGULAR, origin=Origin(8, 42))
    assert res([N, entry]).entry.origin == Origin(8, 42)
    assert UPPER == 0
