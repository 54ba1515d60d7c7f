"""What a change to the union does in the upper, sans I/O: unlink, rmdir, create, link,
rename, and when and how an object is copied up.

Each planner takes the ``Resolution`` of the names involved (resolved with ``complete=True``, so
whether a lower still shows the name is known) and, for a directory that goes away, its merged
``Listing``; it raises ``Refused`` with the errno the request fails with, or returns the steps
for the server to perform with ``*at`` calls, in the order each plan's docstring gives. The
rules are kernel overlay's without ``redirect_dir`` (Documentation/filesystems/overlayfs.rst and
fs/overlayfs/dir.c), so a differential test against kernel overlay can require equal results.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from imaged.fuse.union import FileType, Listing, Refused, Resolution

# renameat2(2) flags (linux/fs.h); the os module does not define them.
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2


def _parent_needs_copy_up(parent: Resolution) -> bool:
    if not parent.is_dir:
        raise Refused(errno.ENOTDIR, "the parent is not a directory")
    return not parent.in_upper


def _lower_positive(child: Resolution) -> bool:
    if child.lower_positive is None:
        raise ValueError("the child was resolved without complete=True: whether a lower "
                         "shows it is unknown")
    return child.lower_positive


class Removal(enum.Enum):
    """How the name goes away in the upper."""

    REMOVE = "remove"  # only the upper holds it: unlinkat/rmdir there
    WHITEOUT = "whiteout"  # only lowers show it: create a whiteout in the upper
    REPLACE_WITH_WHITEOUT = "replace-with-whiteout"  # both: swap the upper entry for a whiteout


@dataclass(frozen=True, slots=True)
class RemovePlan:
    """What unlink or rmdir does, in order: copy up the parent's chain, delete ``clear`` (the
    whiteouts left in the upper directory being removed), then ``action``."""

    action: Removal
    copy_up_parent: bool = False
    clear: tuple[bytes, ...] = ()


def _removal(child: Resolution) -> Removal:
    lower = _lower_positive(child)
    if not child.in_upper:
        return Removal.WHITEOUT
    return Removal.REPLACE_WITH_WHITEOUT if lower else Removal.REMOVE


def plan_unlink(parent: Resolution, child: Resolution) -> RemovePlan:
    """unlink(2) through the union (overlayfs.rst "whiteouts"): removing a name a lower layer
    still shows leaves a whiteout in the upper; a name only the upper holds is just removed."""
    if not child.exists:
        raise Refused(errno.ENOENT, "no such name")
    if child.is_dir:
        raise Refused(errno.EISDIR, "unlink of a directory")
    copy_up = _parent_needs_copy_up(parent)
    return RemovePlan(_removal(child), copy_up)


def plan_rmdir(parent: Resolution, child: Resolution, listing: Listing) -> RemovePlan:
    """rmdir(2) through the union: the directory must be empty *in the union* (overlay's
    ovl_check_empty_dir), so a merged directory whose upper part is empty but whose lower part
    shows names is ENOTEMPTY. Whiteouts alone do not count, but they must go first."""
    if not child.exists:
        raise Refused(errno.ENOENT, "no such name")
    if not child.is_dir:
        raise Refused(errno.ENOTDIR, "rmdir of a non-directory")
    if not listing.empty:
        raise Refused(errno.ENOTEMPTY, "the directory shows names from some layer")
    copy_up = _parent_needs_copy_up(parent)
    clear = listing.upper_whiteouts if child.in_upper else ()
    return RemovePlan(_removal(child), copy_up, clear)


@dataclass(frozen=True, slots=True)
class CreatePlan:
    """What creating a name (create, mknod, mkdir, symlink, link) does in the upper.

    ``over_whiteout``: the upper holds a whiteout under the name; the new object replaces it
    (made aside, then renamed over it, so the name never shows the lower object meanwhile).
    ``opaque``: a new directory made over a whiteout is marked opaque (overlay's
    ovl_create_over_whiteout), or the lower directory the whiteout hid would merge into it.
    ``copy_up_source``: link(2) of a lower-only file copies it up first (overlayfs.rst: "creating
    a hard-link also requires copy_up").
    """

    copy_up_parent: bool = False
    over_whiteout: bool = False
    opaque: bool = False
    copy_up_source: bool = False


def plan_create(parent: Resolution, child: Resolution, kind: FileType) -> CreatePlan:
    if kind is FileType.WHITEOUT:
        raise ValueError("a whiteout is not something a user creates")
    if child.exists:
        raise Refused(errno.EEXIST, "the name exists")
    copy_up = _parent_needs_copy_up(parent)
    return CreatePlan(copy_up, child.upper_whiteout,
                      kind is FileType.DIRECTORY and child.upper_whiteout)


def plan_link(source: Resolution, parent: Resolution, child: Resolution) -> CreatePlan:
    """link(2): the source copied up first (its upper inode is what gets the new name)."""
    if not source.exists:
        raise Refused(errno.ENOENT, "no such source")
    if source.is_dir:
        raise Refused(errno.EPERM, "hard link to a directory")
    plan = plan_create(parent, child, source.entry.type)
    return CreatePlan(plan.copy_up_parent, plan.over_whiteout, False, not source.in_upper)


@dataclass(frozen=True, slots=True)
class RenamePlan:
    """What rename(2) does, in order:

    1. copy up the chains of ``copy_up_parents`` ("old", "new") and, if set, the source
       (``copy_up_old``) and, for an exchange, the target (``copy_up_new``);
    2. delete ``clear`` (whiteouts left in the upper part of a directory being replaced);
    3. mark a moved directory opaque where ``opaque_old``/``opaque_new`` say;
    4. ``renameat2`` in the upper with ``flags``;
    5. if ``remove_whiteout_after``, unlink the whiteout the exchange left at the old name.

    ``replaces``: a visible target is overwritten (the server drops one link of its node).
    """

    flags: int
    copy_up_parents: tuple[str, ...] = ()
    copy_up_old: bool = False
    copy_up_new: bool = False
    clear: tuple[bytes, ...] = ()
    opaque_old: bool = False
    opaque_new: bool = False
    remove_whiteout_after: bool = False
    replaces: bool = False


def plan_rename(old_parent: Resolution, old: Resolution, new_parent: Resolution,
                new: Resolution, flags: int = 0, new_listing: Listing | None = None) -> RenamePlan:
    """rename(2)/renameat2(2) through the union, as overlay does it without ``redirect_dir``.

    - A directory that any lower layer contributes to cannot move: EXDEV (overlayfs.rst
      "Renaming directories", option 1), so ``mv`` falls back to copy and delete. A pure upper
      directory (also an opaque one, whose lowers are cut off) moves.
    - A source a lower layer still shows leaves a whiteout behind (RENAME_WHITEOUT), or, when
      the target is an upper whiteout, swaps with it (RENAME_EXCHANGE) so the whiteout moves.
    - A directory moved into a directory with lower parts is marked opaque, so that whatever a
      lower holds under its new name cannot merge into it (overlay's ovl_rename).
    - Replacing a directory needs it empty in the union (ENOTEMPTY), as rmdir does.
    - RENAME_NOREPLACE and RENAME_EXCHANGE are honoured; RENAME_WHITEOUT from a user, or a
      combination, is EINVAL (overlay refuses any other flag).
    ``new_listing`` is the target's merged listing, needed when the target is a directory.
    Renaming a name onto itself never arrives: the VFS answers it before FUSE.
    """
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or \
            (flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
        raise Refused(errno.EINVAL, f"unsupported rename flags {flags:#x}")
    exchange = bool(flags & RENAME_EXCHANGE)
    if not old.exists:
        raise Refused(errno.ENOENT, "no such source")
    if exchange and not new.exists:
        raise Refused(errno.ENOENT, "no such target to exchange with")
    if flags & RENAME_NOREPLACE and new.exists:
        raise Refused(errno.EEXIST, "the target exists")
    if not exchange and new.exists:
        if old.is_dir and not new.is_dir:
            raise Refused(errno.ENOTDIR, "a directory cannot replace a non-directory")
        if not old.is_dir and new.is_dir:
            raise Refused(errno.EISDIR, "a non-directory cannot replace a directory")
    for what, moving in (("source", old), ("target", new)):
        if moving.is_dir and moving.has_lower and (moving is old or exchange):
            raise Refused(errno.EXDEV, f"the {what} is a directory with lower layers "
                          "(no redirect_dir): copy it instead")
    clear: tuple[bytes, ...] = ()
    if not exchange and new.is_dir:
        if new_listing is None:
            raise ValueError("replacing a directory needs its merged listing")
        if not new_listing.empty:
            raise Refused(errno.ENOTEMPTY, "the target directory shows names from some layer")
        if new.in_upper:
            clear = new_listing.upper_whiteouts
    parents = tuple(name for name, parent in (("old", old_parent), ("new", new_parent))
                    if _parent_needs_copy_up(parent))
    opaque_old = old.is_dir and not old.entry.opaque and _merged_after_copy_up(new_parent)
    opaque_new = exchange and new.is_dir and not new.entry.opaque \
        and _merged_after_copy_up(old_parent)
    remove_after = False
    if exchange:
        upper_flags = RENAME_EXCHANGE
    elif _lower_positive(old):
        # The old name must stay hidden. Onto an upper whiteout, swapping moves that
        # whiteout to the old name; else the rename leaves a fresh one there.
        upper_flags = RENAME_EXCHANGE if new.upper_whiteout else RENAME_WHITEOUT
    elif old.is_dir and new.upper_whiteout:
        # A directory cannot be renamed over a character device: swap, then drop it.
        upper_flags, remove_after = RENAME_EXCHANGE, True
    else:
        upper_flags = flags & RENAME_NOREPLACE if not new.upper_whiteout else 0
    return RenamePlan(upper_flags, parents, not old.in_upper,
                      exchange and not new.in_upper, clear, opaque_old, opaque_new,
                      remove_after, not exchange and new.exists)


def _merged_after_copy_up(parent: Resolution) -> bool:
    """The parent has (or, once copied up, will have) lower parts: overlay's "merge" type."""
    return parent.has_lower


# copy-up


class Access(enum.Enum):
    """What a request does to an existing object, as far as copy-up cares."""

    READ = "read"  # open O_RDONLY, read, getattr, getxattr, listxattr, readlink, readdir
    WRITE = "write"  # open for writing or with O_TRUNC
    SETATTR = "setattr"  # chmod, chown, utimens, truncate
    SETXATTR = "setxattr"  # setxattr, removexattr
    LINK = "link"  # the source of link(2)


def open_access(flags: int) -> Access:
    """Overlay copies up at open for write (or truncate), not at the first write: an
    O_RDONLY-then-O_RDWR pair must see one file (overlayfs.rst "Non-directories")."""
    if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
        return Access.WRITE
    return Access.READ


def needs_copy_up(access: Access, child: Resolution) -> bool:
    """Anything but a read of an object the upper does not hold copies it up first."""
    if not child.exists:
        raise Refused(errno.ENOENT, "no such name")
    return access is not Access.READ and not child.in_upper


def copy_up_chain(in_upper: Sequence[bool]) -> range:
    """Which of a node's ancestors (root first, the node's parent last) to copy up, top-down.

    overlayfs.rst: copy-up "first makes sure that the containing directory exists in the upper
    filesystem - creating it and any parents as necessary". An upper directory's parent is
    always in the upper (it is a tree), so the ones missing are a tail of the chain.
    """
    missing = len(in_upper)
    while missing and not in_upper[missing - 1]:
        missing -= 1
    if not all(in_upper[:missing]):
        raise ValueError("a directory is in the upper while one of its ancestors is not")
    return range(missing, len(in_upper))


def open_flags(flags: int, *, writeback: bool) -> int:
    """The flags to open the backing file with for a FUSE open.

    Under the writeback cache the kernel reads pages of files opened write-only and writes
    with its own offsets, so the backing file is opened read-write and without O_APPEND (as
    fuse-overlayfs does). O_DIRECT is always dropped: pyfuse3's buffers are not aligned for it
    (fuse-overlayfs #167). O_CREAT/O_EXCL/O_TRUNC are the kernel's and the copy-up's business.
    """
    flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | getattr(os, "O_DIRECT", 0))
    if writeback:
        flags &= ~os.O_APPEND
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = flags & ~os.O_ACCMODE | os.O_RDWR
    return flags | os.O_CLOEXEC | os.O_NOFOLLOW


class CopyUpSetting(enum.Enum):
    """``drivers.fuse.copy_up``."""

    AUTO = "auto"
    FULL = "full"
    PARTIAL = "partial"


class CopyUp(enum.Enum):
    """How one object is copied up."""

    METADATA = "metadata"  # directories, symlinks, devices, fifos, sockets, or data not needed
    LINK = "link"  # a hard link of it is in the upper already: link that inode (index=on)
    REFLINK = "reflink"  # FICLONE: the upper shares the lower's extents
    FULL = "full"  # copy_file_range keeping holes, into a temporary file renamed in
    PARTIAL = "partial"  # a sparse upper and a range record (imaged.fuse.ranges)


# From imaged bench copyup (docs/drivers.md quotes the run): partial's first write costs about
# the same whatever the size (no sync since writes and copy-up stopped syncing), full grows
# with it, and they meet between 1 and 4 MiB; a file below it is better whole: no record, no
# split reads, nothing to materialise.
DEFAULT_PARTIAL_THRESHOLD = 4 << 20


@dataclass(frozen=True, slots=True)
class CopyUpPolicy:
    setting: CopyUpSetting = CopyUpSetting.AUTO
    partial_threshold: int = DEFAULT_PARTIAL_THRESHOLD


def choose_copy_up(policy: CopyUpPolicy, kind: FileType, size: int, *, can_reflink: bool,
                   upper_alias: bool = False, truncate_to: int | None = None) -> CopyUp:
    """The copy-up mode for one object (issue 14, "Copy-up, chosen per file").

    - ``upper_alias``: another name of the same lower inode was copied up already (the node
      table knows): link to it, so hard links stay links, as overlay does with ``index=on``.
    - Only regular files have data; the rest copy their metadata only.
    - An empty file, or ``truncate_to`` 0 (open with O_TRUNC, truncate(2) to 0), has no data
      to copy: an empty upper file with the metadata shows the same result.
    - ``full``: reflink where upper and lower share a filesystem that can, else a full copy.
    - ``partial``: always partial (the explicit choice the benchmark compares), empty files
      aside.
    - ``auto``: reflink where possible, else partial from ``partial_threshold`` bytes up, else
      a full copy.
    """
    if upper_alias:
        return CopyUp.LINK
    if kind is not FileType.REGULAR or size == 0 or truncate_to == 0:
        return CopyUp.METADATA
    if policy.setting is CopyUpSetting.PARTIAL:
        return CopyUp.PARTIAL
    if can_reflink:
        return CopyUp.REFLINK
    if policy.setting is CopyUpSetting.AUTO and size >= policy.partial_threshold:
        return CopyUp.PARTIAL
    return CopyUp.FULL
