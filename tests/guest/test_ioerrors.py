"""I/O errors under the store (issue 17): the root on ext4 over a disk that fails on demand
(``faultdisk``: dm-flakey failing every write, then every read and write; dm-dust failing reads
of chosen blocks), with pulls, container create/write/remove and gc run through the CLI while it
fails.

Every failure must be one line ``imaged: error: …`` naming a path under the root and the errno's
text, exit status 1, never "internal error" and never a traceback. Once the disk is healthy again
and the filesystem was checked (``e2fsck -fy``) and remounted, as an operator would,
``check --verify-data`` names what was hurt, ``check --repair`` mends it, and then every
recorded image verifies, every container acknowledged before or during the faults is there with
its acknowledged (fsynced) bytes, and a container made afterwards reads exactly the image's
files: nothing unverified is served.

Each test prints its tally (faults, operations, failures and their lines, findings, repairs,
data lost) for docs/testing.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conftest import CLI, Result, push_simple, unmount_below
from tests.guest.faultdisk import (
    FaultDisk,
    drop_caches,
    fault_disk,
    mounted,
    physical_blocks,
    run,
)

pytestmark = pytest.mark.guest

MiB = 1 << 20
DISK_SIZE = 128 * MiB
ACKED = b"acknowledged by fsync\n" * 200
# What a failing disk may answer, as the kernel passes it on: the I/O error itself, and, once
# ext4 has aborted its journal over one, a read-only filesystem; SQLite passes no errno on and
# says "disk I/O error" for any failed read, write or sync of its files.
DISK_ERRORS = (os.strerror(errno.EIO), os.strerror(errno.EROFS), "disk I/O error")


@dataclass
class Tally:
    """What a test did under faults, printed at its end."""

    faults: list[str] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # when: how many findings
    findings: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def report(self, name: str, started: float) -> str:
        lines = [f"{name}: {len(self.faults)} faults ({', '.join(self.faults)}), "
                 f"{len(self.operations)} operations under them, {len(self.failures)} failed, "
                 f"check found {len(self.findings)} ({'; '.join(self.checks)}), "
                 f"repaired {len(self.repaired)}, "
                 f"lost {len(self.lost)}; {time.monotonic() - started:.1f} s"]
        lines += [f"  operation: {line}" for line in self.operations]
        lines += [f"  failure: {line}" for line in self.failures]
        lines += [f"  finding: {line}" for line in self.findings]
        lines += [f"  repaired: {line}" for line in self.repaired]
        lines += [f"  lost: {line}" for line in self.lost]
        return "\n".join(lines)


def clean_failure(result: Result, root: Path, context: str) -> str:
    """The one error line of a failed command, checked: exit 1, ``imaged: error:`` last on
    stderr and nowhere else, a path under the root, an errno's text, no bug report."""
    lines = result.err.strip().splitlines()
    assert result.code == 1, (context, result)
    assert lines and lines[-1].startswith("imaged: error: "), (context, result.err)
    assert sum(line.startswith("imaged: error") for line in lines) == 1, (context, result.err)
    line = lines[-1]
    assert "Traceback" not in result.err and "internal error" not in line, (context, line)
    assert str(root) in line, (context, line)
    assert any(text in line for text in DISK_ERRORS), (context, line)
    return line


class Workload:
    """The CLI on the faulty root, each command tallied: a success is acknowledged (and must
    survive), a failure must be clean."""

    def __init__(self, imaged: CLI, root: Path, tally: Tally) -> None:
        self.imaged, self.root, self.tally = imaged, root, tally

    def ok(self, *args: str) -> str:
        result = self.imaged("--driver", "vfs", *args)
        assert result.code == 0, (args, result)
        return result.out

    def attempt(self, disk: FaultDisk, *args: str) -> Result:
        return self.tallied(disk, args, self.imaged("--driver", "vfs", *args))

    def tallied(self, disk: FaultDisk, args: tuple[str, ...], result: Result) -> Result:
        self.tally.operations.append(f"{' '.join(args[:2])} ({disk.mode}): "
                                     + ("ok" if result.code == 0 else "failed"))
        if result.code != 0:
            self.tally.failures.append(clean_failure(result, self.root, f"{args} {disk.mode}"))
        return result

    def attempt_while(self, disk: FaultDisk, fault: Callable[[], None],
                      under_way: Callable[[], bool] | str, *args: str) -> Result:
        """The command as a real process, with ``fault`` injected once it is under way: once
        ``under_way`` holds, or once a line of its progress on stderr has that text."""
        proc = subprocess.Popen([sys.executable, "-m", "imaged", "--root", str(self.root),
                                 "--driver", "vfs", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        seen = ""
        try:
            deadline = time.monotonic() + 30
            if isinstance(under_way, str):
                assert proc.stderr is not None
                while under_way not in seen and (line := proc.stderr.readline()):
                    seen += line
            else:
                while proc.poll() is None and not under_way() and time.monotonic() < deadline:
                    time.sleep(0.005)
            when = "while it ran" if proc.poll() is None else "after it ended"
            fault()
            self.tally.faults.append(f"{disk.mode}, from the middle of {args[0]} ({when})")
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return self.tallied(disk, args, Result(proc.returncode, out, seen + err))

    def cycle(self, disk: FaultDisk, ref: str, name: str,
              acked: dict[str, dict[str, bytes]]) -> None:
        """Create and mount a container, write a file with fsync, unmount and remove it, as far
        as the disk lets it; what succeeded is acknowledged (until its removal succeeds)."""
        made = self.attempt(disk, "mount", ref, "--name", name)
        if made.code != 0:
            return
        self.write(disk, Path(made.out.strip().splitlines()[-1]), name, "acked", acked)
        self.attempt(disk, "umount", name)
        if self.attempt(disk, "rm", "--force", name).code == 0:
            acked.pop(name, None)

    def check(self, when: str) -> list[dict[str, Any]]:
        """``check --verify-data``'s findings, tallied; exit status 1 exactly when any."""
        result = self.imaged("--driver", "vfs", "check", "--verify-data", "--json")
        findings: list[dict[str, Any]] = json.loads(result.out)["findings"]
        assert result.code == (1 if findings else 0), result
        self.tally.checks.append(f"{when}: {len(findings)}")
        self.tally.findings += [f"{f['kind']}: {f['message']}" for f in findings]
        return findings

    def write(self, disk: FaultDisk, path: Path, name: str, file: str,
              acked: dict[str, dict[str, bytes]]) -> None:
        """An application's write with fsync into a mounted container, tallied, and recorded
        in ``acked`` when it was acknowledged (a failure is the kernel's error to the
        application, not imaged's)."""
        try:
            write_synced(path, file, ACKED)
        except OSError as exc:
            self.tally.operations.append(f"write+fsync in {name} ({disk.mode}): {exc.strerror}")
            return
        self.tally.operations.append(f"write+fsync in {name} ({disk.mode}): ok")
        acked.setdefault(name, {})[file] = ACKED

    def repair(self) -> None:
        result = self.imaged("--driver", "vfs", "check", "--verify-data", "--repair", "--json")
        for f in json.loads(result.out)["findings"]:
            self.tally.repaired.append(f"{f['kind']} {f['subject']}" + (
                "" if f.get("repaired") else f" NOT REPAIRED: {f.get('error')}"))

    def containers(self) -> dict[str, Any]:
        return {row["name"]: row for row in json.loads(self.ok("ps", "--json"))}


def write_synced(directory: Path, name: str, data: bytes) -> None:
    """Write ``name`` and fsync it and its directory: what an application does to be sure."""
    with (directory / name).open("wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def heal(disk: FaultDisk, root: Path, tally: Tally) -> None:
    """What an operator does: unmount, the disk healthy, ``e2fsck -fy``, mount again (the
    caller's ``mounted`` unmounts at the end)."""
    unmount_below(root)  # a container left mounted: its record goes stale, for check to find
    subprocess.run(["umount", str(root)], check=True, timeout=60)  # busy: imaged leaked a file
    disk.healthy()
    fsck = subprocess.run(["e2fsck", "-fy", str(disk.path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert fsck.returncode in (0, 1), fsck  # clean, or errors corrected
    tally.faults.append(f"healed (e2fsck exit {fsck.returncode})")
    run("mount", str(disk.path), str(root))


def mkfs(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    run("mkfs.ext4", "-q", "-b", "4096", str(image))
    return image


def first_blocks_under(*directories: Path) -> list[int]:
    """The first block of every regular file below ``directories`` that has one: enough for
    each to fail its read, and one ``dmsetup message`` each, not one per block."""
    return sorted({blocks[0] for directory in directories for path in directory.rglob("*")
                   if path.is_file() and not path.is_symlink()
                   and (blocks := physical_blocks(path))})


def image_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """What a container of a ``push_simple`` image holds."""
    return {"etc/os-release": b"ID=imaged-test\n", **files}


def test_io_errors_leave_clean_failures_and_a_repairable_store(
        tmp_path: Path, root: Path, registry: LocalRegistry, layout: OCILayout,
        imaged: CLI) -> None:
    started = time.monotonic()
    tally = Tally()
    contents = {"one": {"one.txt": b"one\n" * 1000},
                "two": {f"two{i}": bytes([i]) * 2 * MiB for i in range(4)},
                "three": {f"three{i}": bytes([0x30 + i]) * 4 * MiB for i in range(2)}}
    refs = {name: push_simple(layout, registry, f"ioerr/{name}", files=files).ref
            for name, files in contents.items()}
    root.mkdir()
    image = mkfs(tmp_path)
    with contextlib.ExitStack() as cleanup:
        # The guest's /tmp is RAM that the tests after this one need: the disk goes at the end.
        cleanup.callback(image.unlink)
        disk = cleanup.enter_context(fault_disk(image, f"imaged-ioerr-{os.getpid()}"))
        cleanup.enter_context(mounted(disk.path, root))
        work = Workload(imaged, root, tally)
        work.ok("pull", refs["one"])
        work.ok("pull", refs["two"])
        kept = Path(work.ok("mount", refs["one"], "--name", "kept").strip().splitlines()[-1])
        write_synced(kept, "acked", ACKED)
        work.ok("umount", "kept")
        acked: dict[str, dict[str, bytes]] = {"kept": {"acked": ACKED}}

        acked_images = {refs["one"], refs["two"]}

        def recover(when: str) -> None:
            """Heal as an operator would, then check, repair, and check again: clean, with
            every image whose pull returned still there (its blobs verified by the check)."""
            heal(disk, root, tally)
            work.check(f"after {when}")
            work.repair()
            after = imaged("--driver", "vfs", "check", "--verify-data")
            assert after.code == 0, (when, after, tally.report("io errors", started))
            listed = {ref for image in json.loads(work.ok("images", "--json"))
                      for ref in image["refs"]}
            tally.lost += [f"image {ref} (after {when})" for ref in sorted(acked_images - listed)]

        # Bad sectors under every blob and every unpacked layer's files: their reads fail.
        disk.bad_blocks(first_blocks_under(root / "content" / "blobs",
                                     root / "drivers" / "vfs" / "layers"))
        drop_caches()
        tally.faults.append(disk.mode)
        assert {f["kind"] for f in work.check("on bad sectors")} == {"blob-unreadable"}
        work.cycle(disk, refs["one"], "fresh-bad-sectors", acked)
        if work.attempt(disk, "pull", refs["three"]).code == 0:
            acked_images.add(refs["three"])
        work.attempt(disk, "gc")
        work.repair()
        recover("bad sectors")

        # Writes fail from the middle of a pull on (it has its manifest, not its layers), while
        # a container is mounted and its application writes.
        kept = Path(work.ok("mount", refs["one"], "--name", "kept").strip().splitlines()[-1])
        pulled = work.attempt_while(disk, disk.fail_writes, " 2 layers, ", "pull", refs["three"])
        if pulled.code == 0:
            acked_images.add(refs["three"])
        work.write(disk, kept, "kept", "during", acked)
        work.attempt(disk, "umount", "kept")
        work.cycle(disk, refs["one"], "fresh-failing-writes", acked)
        if work.attempt(disk, "rmi", refs["two"]).code == 0:
            acked_images.discard(refs["two"])
        work.attempt(disk, "gc")
        recover("writes failing from the middle of a pull")

        # Writes fail from the middle of a container's creation (vfs copies the image).
        containers = root / "drivers" / "vfs" / "containers"
        made = work.attempt_while(disk, disk.fail_writes,
                                  (containers / "fresh-mid-create").exists,
                                  "mount", refs["two"], "--name", "fresh-mid-create")
        if made.code == 0:
            acked["fresh-mid-create"] = {}
        recover("writes failing from the middle of a container's creation")

        # Every read and write fails.
        disk.fail_all()
        drop_caches()
        tally.faults.append(disk.mode)
        if work.attempt(disk, "pull", refs["three"]).code == 0:
            acked_images.add(refs["three"])
        work.cycle(disk, refs["one"], "fresh-dead-disk", acked)
        work.attempt(disk, "images")
        work.attempt(disk, "gc")
        recover("a dead disk")

        containers_now = work.containers()
        for name, files in acked.items():
            if name not in containers_now:
                tally.lost.append(f"container {name}")
                continue
            path = Path(work.ok("mount", containers_now[name]["image"], "--name", name)
                        .strip().splitlines()[-1])
            tally.lost += [f"container {name}'s {file}" for file, data in files.items()
                           if not (path / file).is_file() or (path / file).read_bytes() != data]
            work.ok("umount", name)
        # Served after the faults: every image as pushed, in a new container.
        for name, ref in refs.items():
            work.ok("pull", ref)
            path = Path(work.ok("mount", ref, "--name", f"after-{name}").strip().splitlines()[-1])
            for file, data in image_files(contents[name]).items():
                assert (path / file).read_bytes() == data, (name, file)
            work.ok("rm", "--force", f"after-{name}")
    print(tally.report("io errors", started))
    assert not tally.lost, tally.report("io errors", started)
