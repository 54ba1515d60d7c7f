"""The fuse server against kernel overlay: the same random sequences of file operations on both,
over the same lowers, must give the same results (issue 14, "Tests").

Kernel overlay is mounted with ``index=on`` (hard links stay links across copy-up) and
``redirect_dir=off`` (a lower directory renames with EXDEV), the semantics the fuse driver
claims. Each hypothesis example works in a subtree of its own (``t0``, ``t1``, …: the lowers
hold many identical copies), so one pair of mounts serves every example; the mounts cost more
than the examples.

Compared after every step: the operation's outcome (its value or errno) and the whole subtree
as both show it: types, modes, owners, sizes, link counts of non-directories, contents,
symlink targets, user xattrs, and which names share an inode number (equality classes, not
values: the two number inodes differently).

``scripts/test`` runs a bounded number of examples; ``pytest -m long`` runs many more.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.integration.fusebed import Mount, mount_overlay, serve, stop

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")

SUBTREES = 60  # each example takes a fresh one; then both remount on fresh uppers
NAMES = ("f", "big", "d", "d/x", "d/sub", "d/sub/y", "d/top", "h1", "h2", "s", "p", "e",
         "opq", "opq/new", "opq/old", "gone", "n1", "n2", "d/n3", "e/n4", "h1/bad")
XATTRS = ("user.a", "user.b")
_NONBLOCK = os.O_NONBLOCK  # the fifo ``p`` must not block an open (ENXIO, or an empty read)
_BIG = b"".join(b"%07d\n" % i for i in range(8750))  # more than one 64 KiB block, less than two


def _make_subtree(top: Path, base: Path) -> None:
    """Two layers of one subtree: ``top`` whites out ``gone``, makes ``opq`` opaque, hides
    ``f`` behind its own, and adds to ``d``."""
    (base / "d" / "sub").mkdir(parents=True)
    (base / "f").write_text("base f\n")
    (base / "big").write_bytes(_BIG)
    (base / "d" / "x").write_text("x\n")
    (base / "d" / "sub" / "y").write_text("y\n")
    (base / "h1").write_text("hard\n")
    os.link(base / "h1", base / "h2")
    os.symlink("f", base / "s")
    os.mkfifo(base / "p")
    (base / "e").mkdir()
    (base / "opq").mkdir()
    (base / "opq" / "old").write_text("old\n")
    (base / "gone").write_text("hidden\n")
    os.setxattr(base / "f", "user.a", b"1")
    top.mkdir()
    (top / "f").write_text("top f\n")
    os.mknod(top / "gone", stat.S_IFCHR, 0)
    (top / "d").mkdir()
    (top / "d" / "top").write_text("top\n")
    (top / "opq").mkdir()
    os.setxattr(top / "opq", "trusted.overlay.opaque", b"y")
    (top / "opq" / "new").write_text("new\n")


class Twins:
    """Kernel overlay and the fuse server, each with its own upper, over one pair of lowers;
    ``fresh`` hands out an untouched subtree of both, remounting on fresh uppers once all have
    been used (hypothesis's shrinking can ask for many)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lowers = [tmp / "l1", tmp / "l2"]
        for layer in self.lowers:
            layer.mkdir()
        for i in range(SUBTREES):
            (self.lowers[1] / f"t{i}").mkdir()
            _make_subtree(self.lowers[0] / f"t{i}", self.lowers[1] / f"t{i}")
        self.kernel = tmp / "kernel" / "mnt"
        self.fuse: Mount | None = None
        self.used = SUBTREES
        self.generation = 0

    def fresh(self) -> tuple[Path, Path]:
        if self.used == SUBTREES:
            self.close()
            self.generation += 1
            kernel = self.tmp / "kernel"
            for path in (kernel / "upper", kernel / "work"):
                subprocess.run(["rm", "-rf", str(path)], check=True)
                path.mkdir(parents=True)
            self.kernel.mkdir(parents=True, exist_ok=True)
            mount_overlay(self.lowers, kernel / "upper", kernel / "work", self.kernel,
                          "index=on,redirect_dir=off,metacopy=off")
            self.fuse = serve(self.lowers, self.tmp / f"fuse{self.generation}")
            self.used = 0
        assert self.fuse is not None
        name = f"t{self.used}"
        self.used += 1
        return self.kernel / name, self.fuse.path / name

    def remount(self) -> None:
        """Both mounts again over the uppers they left: what each kept on disk (the fuse
        server's hard-link index and origin records) must show the same tree."""
        self.close()
        kernel = self.tmp / "kernel"
        mount_overlay(self.lowers, kernel / "upper", kernel / "work", self.kernel,
                          "index=on,redirect_dir=off,metacopy=off")
        self.fuse = serve(self.lowers, self.tmp / f"fuse{self.generation}")

    def close(self) -> None:
        if self.fuse is not None:
            stop(self.fuse)
            self.fuse = None
        if os.path.ismount(self.kernel):
            subprocess.run(["umount", str(self.kernel)], check=True)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except OSError as exc:
        return "errno", errno.errorcode.get(exc.errno or 0, exc.errno)


def snapshot(root: Path) -> dict[str, object]:
    """What a user can see of the tree under ``root``, inode numbers as equality classes."""
    seen: dict[str, object] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            info = os.lstat(path)
            inodes.setdefault(info.st_ino, []).append(rel)
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    body: object = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                body = os.readlink(path)
            else:
                body = None
            xattrs = {} if stat.S_ISLNK(info.st_mode) else {
                n: os.getxattr(path, n) for n in sorted(os.listxattr(path))
                if n.startswith("user.")}
            seen[rel] = (stat.filemode(info.st_mode), info.st_uid, info.st_gid,
                         info.st_size if not stat.S_ISDIR(info.st_mode) else None,
                         info.st_nlink if not stat.S_ISDIR(info.st_mode) else None,
                         info.st_rdev, body, xattrs)
    seen["(names sharing an inode)"] = sorted(
        sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return seen


paths = st.sampled_from(NAMES)
offsets = st.sampled_from((0, 1, 4095, 4096, 65_535, 70_000, 200_000))
payloads = st.binary(min_size=0, max_size=5000)
modes = st.sampled_from((0o600, 0o644, 0o755, 0o4755, 0o000))


class Differential(RuleBasedStateMachine):
    """One example: operations on one fresh subtree of both mounts (module docstring)."""

    twins: Twins

    def __init__(self) -> None:
        super().__init__()
        self.roots = self.twins.fresh()
        self.remounted = False

    def both(self, op: Callable[[Path], Any]) -> None:
        kernel, fuse = (outcome(functools.partial(op, root)) for root in self.roots)
        assert fuse == kernel, f"kernel overlay gave {kernel}, fuse {fuse}"
        kernel_tree, fuse_tree = snapshot(self.roots[0]), snapshot(self.roots[1])
        differs = {name: (kernel_tree.get(name), fuse_tree.get(name))
                   for name in kernel_tree.keys() | fuse_tree.keys()
                   if kernel_tree.get(name) != fuse_tree.get(name)}
        assert not differs, f"(kernel overlay, fuse) differ: {differs}"

    @rule(path=paths, mode=modes, exclusive=st.booleans())
    def create(self, path: str, mode: int, exclusive: bool) -> None:
        flags = os.O_CREAT | os.O_WRONLY | _NONBLOCK | (os.O_EXCL if exclusive else 0)
        self.both(lambda root: os.close(os.open(root / path, flags, mode)))

    @rule(path=paths, offset=offsets, data=payloads, append=st.booleans())
    def write(self, path: str, offset: int, data: bytes, append: bool) -> None:
        def op(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | _NONBLOCK | (os.O_APPEND if append else 0))
            try:
                return os.write(fd, data) if append else os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=paths, offset=offsets, size=st.sampled_from((0, 1, 100, 5000, 100_000)))
    def read(self, path: str, offset: int, size: int) -> None:
        def op(root: Path) -> bytes:
            fd = os.open(root / path, os.O_RDONLY | _NONBLOCK)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=paths, size=offsets)
    def truncate(self, path: str, size: int) -> None:
        self.both(lambda root: os.truncate(root / path, size))

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        self.both(lambda root: os.rename(root / src, root / dst))

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.both(lambda root: os.link(root / src, root / dst, follow_symlinks=False))

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(lambda root: os.unlink(root / path))

    @rule(path=paths)
    def mkdir(self, path: str) -> None:
        self.both(lambda root: os.mkdir(root / path, 0o755))

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both(lambda root: os.rmdir(root / path))

    @rule(path=paths, mode=modes)
    def chmod(self, path: str, mode: int) -> None:
        self.both(lambda root: os.chmod(root / path, mode))  # Linux has no lchmod

    @rule(path=paths, name=st.sampled_from(XATTRS), value=st.binary(max_size=64))
    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.both(lambda root: os.setxattr(root / path, name, value, follow_symlinks=False))

    @rule(path=paths)
    def readdir(self, path: str) -> None:
        self.both(lambda root: sorted(os.listdir(root / path)))

    @precondition(lambda self: not self.remounted)  # a server start costs 20 other steps
    @rule()
    def remount(self) -> None:
        self.remounted = True
        self.twins.remount()
        self.both(lambda root: None)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twins]:
    pair = Twins(tmp_path_factory.mktemp("differential"))
    try:
        yield pair
    finally:
        pair.close()


def _run(twins: Twins, examples: int, steps: int) -> None:
    machine = type("Run", (Differential,), {"twins": twins})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow]))


def test_same_results_as_kernel_overlay(twins: Twins) -> None:
    _run(twins, examples=25, steps=25)


@pytest.mark.long
def test_same_results_as_kernel_overlay_long(twins: Twins) -> None:
    _run(twins, examples=400, steps=60)
