"""Mounting: the new mount API (fsopen/fsconfig/fsmount/move_mount) with a mount(8) fallback.

Why the new API first: overlay's ``lowerdir+`` (kernel ≥ 6.8) takes one layer per
``fsconfig`` call, so a 500-layer stack mounts with no limit on the option string, where
mount(2) must fit every layer into one 4096-byte page. The fallback runs ``mount`` in the
directory holding the short layer links, so relative names keep 128 layers within a page.

What is mounted is described by ``MountSpec`` (DESIGN §3), the same description a runtime
could replay; the functions here turn one into a mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaged import tools
from imaged.errors import ConflictError, ImagedError, InternalError
from imaged.fsutil import syscall

_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432  # x86_64
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOUNT_ATTR_RDONLY = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100
MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8
_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_COMMAND_TIMEOUT = 60


class MountError(ImagedError):
    code = "internal"


@dataclass(frozen=True)
class MountSpec:
    """``{type, source, options}``: options in order, ``lowerdir+`` repeated per layer."""

    type: str
    source: str
    options: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "source": self.source, "options": list(self.options)}


def _context_log(fs_fd: int) -> str:
    """The messages the kernel attached to a filesystem context (why fsconfig refused)."""
    lines = []
    while True:
        try:
            chunk = os.read(fs_fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        lines.append(chunk.decode(errors="replace").strip())
    return "; ".join(lines)


def _fsconfig_accepts(fstype: str, key: str) -> bool:
    try:
        fs_fd = syscall(_SYS_FSOPEN, fstype.encode(), _FSOPEN_CLOEXEC)
    except OSError:
        return False
    try:
        syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, key.encode(), b"/", 0)
    except OSError as exc:
        # EINVAL: unknown key. Any other error (the path is not usable) means the key exists.
        return exc.errno != errno.EINVAL
    finally:
        os.close(fs_fd)
    return True


def new_mount_api_has(fstype: str, key: str) -> bool:
    """Whether this kernel's ``fstype`` accepts the string parameter ``key`` (e.g. lowerdir+).

    A filesystem not yet converted to the new mount API (overlay before 6.5) goes through the
    kernel's legacy adapter, which accepts any key and fails only when the mount is created:
    so a key counts only if a made-up one is refused."""
    return _fsconfig_accepts(fstype, key) and not _fsconfig_accepts(fstype, "imaged-no-such-key")


def kernel_filesystems() -> set[str]:
    """The filesystem types this kernel can mount (``/proc/filesystems``); empty if unreadable."""
    try:
        lines = Path("/proc/filesystems").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[-1] for line in lines if line.strip()}


def _split_option(option: str) -> tuple[str, str | None]:
    key, sep, value = option.partition("=")
    return key, (value if sep else None)


def mount_with_fsconfig(spec: MountSpec, target: Path, read_only: bool = False) -> None:
    """Mount ``spec`` at ``target`` through fsopen/fsconfig/fsmount/move_mount."""
    try:
        fs_fd = syscall(_SYS_FSOPEN, spec.type.encode(), _FSOPEN_CLOEXEC)
    except OSError as exc:
        raise MountError(f"cannot open a {spec.type} filesystem context: {exc}") from None
    try:
        syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, b"source", spec.source.encode(), 0)
        for option in spec.options:
            key, value = _split_option(option)
            if value is None:
                syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_FLAG, key.encode(), None, 0)
            else:
                syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, key.encode(),
                         value.encode(), 0)
        syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_CMD_CREATE, None, None, 0)
        attrs = _MOUNT_ATTR_RDONLY if read_only else 0
        mnt_fd = syscall(_SYS_FSMOUNT, fs_fd, _FSMOUNT_CLOEXEC, attrs)
    except OSError as exc:
        raise MountError(f"mounting {spec.type} at {target} failed: {exc.strerror}"
                         f" ({_context_log(fs_fd) or 'no kernel message'})") from None
    finally:
        os.close(fs_fd)
    try:
        syscall(_SYS_MOVE_MOUNT, mnt_fd, b"", _AT_FDCWD, str(target).encode(),
                 _MOVE_MOUNT_F_EMPTY_PATH)
    except OSError as exc:
        raise MountError(f"attaching the {spec.type} mount at {target} failed: "
                         f"{exc.strerror}") from None
    finally:
        os.close(mnt_fd)


def mount_with_command(spec: MountSpec, target: Path, cwd: Path | None = None,
                       read_only: bool = False) -> None:
    """mount(8), run in ``cwd`` so options may name short relative paths (the fallback)."""
    options = ",".join(spec.options + (("ro",) if read_only else ()))
    if len(options) > 4095:
        raise MountError(f"mount options for {target} are {len(options)} bytes, over the "
                         "kernel's one-page limit of mount(2); this kernel lacks lowerdir+")
    _mount8(["-t", spec.type, "-o", options, spec.source, str(target)], cwd)


def bind_mount(source: Path, target: Path, read_only: bool = False) -> None:
    _mount8(["--bind", str(source), str(target)])
    if read_only:
        try:
            _mount8(["-o", "remount,bind,ro", str(target)])
        except BaseException:
            unmount(target)
            raise


def _mount8(args: list[str], cwd: Path | None = None) -> None:
    tools.run(["mount", *args], timeout=_COMMAND_TIMEOUT, cwd=cwd, error=MountError,
              provides="util-linux's mount (apt-get install mount)")


def unmount(target: Path, lazy: bool = False, follow: bool = True,
            shown_as: Path | None = None) -> None:
    """umount2; EINVAL (not a mount point) counts as done, EBUSY is a conflict to report.
    ``follow=False`` does not follow a symlink in the last component; ``shown_as`` names the
    target in messages (when ``target`` is a /proc/self/fd link to it)."""
    flags = (MNT_DETACH if lazy else 0) | (0 if follow else _UMOUNT_NOFOLLOW)
    if _libc.umount2(str(target).encode(), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return
    name = shown_as or target
    if err == errno.EBUSY:
        raise ConflictError(f"{name} is busy: a process still uses it")
    raise InternalError(f"umount {name}: {os.strerror(err)}")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    major: int
    minor: int
    mount_point: str
    fstype: str
    source: str
    super_options: tuple[str, ...] = ()  # the filesystem's own, e.g. prjquota


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """/proc/self/mountinfo: ``id parent major:minor root point options [tags] - type src sb``."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        super_options = tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else ()
        entries.append(MountEntry(int(fields[0]), int(major), int(minor), _unescape(fields[4]),
                                  fields[sep + 1], _unescape(fields[sep + 2]), super_options))
    return entries


def mountinfo() -> list[MountEntry]:
    """This namespace's mounts in mount order."""
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(m.mount_point == target for m in mountinfo())


def backing_filesystem(path: Path) -> MountEntry:
    """The mount holding ``path``: the longest mount point that contains it, last one wins."""
    target = os.path.realpath(path)
    best = MountEntry(0, 0, 0, "/", "unknown", "")
    for mount in mountinfo():
        point = mount.mount_point
        if (target == point or target.startswith(point.rstrip("/") + "/")) and \
                len(point) >= len(best.mount_point):
            best = mount
    return best


def users(path: Path) -> list[int]:
    """The processes with a file, directory, root or mapping on the filesystem ``path`` is on
    (what ``fuser -m`` finds), by PID: the holders of a mount a forced umount detached, which
    no mount table shows. A process that ends while it is looked at is skipped."""
    dev = os.stat(path).st_dev
    return sorted(int(entry.name) for entry in os.scandir("/proc")
                  if entry.name.isdigit() and _uses(Path(entry.path), dev))


def _uses(proc: Path, dev: int) -> bool:
    links = [proc / "cwd", proc / "root"]
    with contextlib.suppress(OSError):
        links += [proc / "fd" / fd for fd in os.listdir(proc / "fd")]
    for link in links:
        with contextlib.suppress(OSError):  # gone, or a file of a dead FUSE server
            if os.stat(link).st_dev == dev:
                return True
    try:
        maps = (proc / "maps").read_text()
    except OSError:
        return False
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3] != "00:00":
            major, minor = fields[3].split(":")
            if os.makedev(int(major, 16), int(minor, 16)) == dev:
                return True
    return False
