"""Mount targets a non-root peer names through the API: confined beneath ``api.mount_prefixes``
and resolved without races.

The daemon runs as root and a member of group ``imaged`` is not root: were a target any path,
the group could have root mount over ``/etc``. Checking a path string and then mounting on it
leaves a window in which a component can be swapped for a symlink. So the target is opened
component by component from the prefix with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``
(missing directories made with ``mkdirat`` on the descriptor just opened), and the container's
mount, made by its driver in the driver's own directory, is attached with ``open_tree`` +
``move_mount`` onto that descriptor: no path is walked twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from imaged.errors import ConflictError, ForbiddenError, InvalidError
from imaged.fsutil import syscall
from imaged.host.mounts import unmount

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_OPENAT2 = 428, 429, 437  # x86_64
_OPEN_TREE_CLONE = 1
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))


def beneath(target: Path, prefixes: Sequence[Path]) -> tuple[Path, PurePosixPath]:
    """The prefix ``target`` lies under and the path below it; refused (ForbiddenError) when it
    lies under none. Pure: the path is judged as written, and ``..`` is refused outright."""
    if not target.is_absolute():
        raise InvalidError(f"mount target {target} is not an absolute path")
    parts = PurePosixPath(target).parts
    if ".." in parts:
        raise InvalidError(f"mount target {target} contains '..'")
    for prefix in prefixes:
        below = PurePosixPath(*parts)
        with contextlib.suppress(ValueError):
            relative = below.relative_to(prefix)
            if relative.parts:
                return prefix, relative
    allowed = ", ".join(str(p) for p in prefixes) or "none configured"
    raise ForbiddenError(f"mount target {target} is not beneath api.mount_prefixes ({allowed}); "
                         "only root may mount elsewhere")


def _openat2(dir_fd: int, name: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=0, resolve=resolve)
    return syscall(_SYS_OPENAT2, dir_fd, name.encode(), ctypes.byref(how), ctypes.sizeof(how))


@contextlib.contextmanager
def open_target(target: Path, prefixes: Sequence[Path]) -> Iterator[int]:
    """An ``O_PATH`` descriptor of the directory ``target``, beneath its prefix, made where it
    is missing. A symlink or an escape anywhere below the prefix is refused."""
    with _open_parent(target, prefixes, create=True) as (parent, name):
        fd = _step(parent, name, target, create=True)
        try:
            yield fd
        finally:
            os.close(fd)


@contextlib.contextmanager
def _open_parent(target: Path, prefixes: Sequence[Path],
                 create: bool) -> Iterator[tuple[int, str]]:
    """A descriptor of ``target``'s parent, opened beneath its prefix, and the last name."""
    prefix, relative = beneath(target, prefixes)
    try:
        fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidError(f"mount prefix {prefix}: {exc.strerror}") from None
    try:
        for part in relative.parts[:-1]:
            parent, fd = fd, -1
            try:
                fd = _step(parent, part, target, create)
            finally:
                os.close(parent)
        yield fd, relative.parts[-1]
    finally:
        if fd >= 0:
            os.close(fd)


def _step(dir_fd: int, name: str, target: Path, create: bool) -> int:
    """Open ``name`` in ``dir_fd`` as a directory, making it if missing (with ``create``)."""
    resolve = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        try:
            return _openat2(dir_fd, name, flags, resolve)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):  # made meanwhile: opened below
                os.mkdir(name, mode=0o755, dir_fd=dir_fd)
            return _openat2(dir_fd, name, flags, resolve)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
            raise ForbiddenError(f"mount target {target}: {name!r} is a symlink, not a "
                                 "directory, or leaves the prefix") from None
        raise InvalidError(f"mount target {target}: {exc.strerror}") from None


def attach(source: Path, target_fd: int, target: Path) -> None:
    """Bind the mount at ``source`` (with what is mounted below it) onto ``target_fd``."""
    try:
        tree = syscall(_SYS_OPEN_TREE, _AT_FDCWD, str(source).encode(),
                       _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE)
    except OSError as exc:
        raise ConflictError(f"cannot clone the mount at {source}: {exc.strerror}") from None
    try:
        syscall(_SYS_MOVE_MOUNT, tree, b"", target_fd, b"",
                _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH)
    except OSError as exc:
        raise ConflictError(f"cannot attach the container at {target}: {exc.strerror}") from None
    finally:
        os.close(tree)


def detach(target: Path, prefixes: Sequence[Path], lazy: bool = False) -> None:
    """Unmount what ``attach`` put at ``target``: its parent is found again beneath the prefix
    (the path is not trusted to lead where it did then) and the last name is not followed. A
    descriptor of the target itself would keep its mount busy. A target no longer beneath any
    prefix (the configuration changed) is unmounted by path, the last name not followed.
    ``lazy`` detaches it even while in use (a dead fuse mount: nothing left to protect)."""
    try:
        with _open_parent(target, prefixes, create=False) as (parent, name):
            unmount(Path(f"/proc/self/fd/{parent}") / name, lazy=lazy, follow=False,
                    shown_as=target)
    except ForbiddenError:
        unmount(target, lazy=lazy, follow=False)
    except InvalidError:  # a directory above it is gone: nothing is mounted there any more
        return
