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

import errno
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conftest import CLI, Result, push_simple
from tests.guest.faultdisk import (
    FaultDisk,
    drop_caches,
    fault_disk,
    mounted,
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
    findings: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def report(self, name: str, started: float) -> str:
        lines = [f"{name}: {len(self.faults)} faults ({', '.join(self.faults)}), "
                 f"{len(self.operations)} operations under them, {len(self.failures)} failed, "
                 f"check found {len(self.findings)}, repaired {len(self.repaired)}, "
                 f"lost {len(self.lost)}; {time.monotonic() - started:.1f} s"]
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
        result = self.imaged("--driver", "vfs", *args)
        self.tally.operations.append(f"{' '.join(args[:2])} ({disk.mode}): "
                                     + ("ok" if result.code == 0 else "failed"))
        if result.code != 0:
            self.tally.failures.append(clean_failure(result, self.root, f"{args} {disk.mode}"))
        return result

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


def heal(disk: FaultDisk, root: Path) -> str:
    """What an operator does: unmount, the disk healthy, ``e2fsck -fy``, mount again (the
    caller's ``mounted`` unmounts at the end). Returns e2fsck's summary."""
    subprocess.run(["umount", "-l", str(root)], check=True, timeout=60)
    disk.healthy()
    fsck = subprocess.run(["e2fsck", "-fy", str(disk.path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert fsck.returncode in (0, 1), fsck  # clean, or errors corrected
    run("mount", str(disk.path), str(root))
    return fsck.stdout.strip().splitlines()[-1] if fsck.stdout.strip() else ""


def mkfs(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    run("mkfs.ext4", "-q", "-b", "4096", str(image))
    return image


def test_failing_writes_then_reads(tmp_path: Path, root: Path, registry: LocalRegistry,
                                    layout: OCILayout, imaged: CLI) -> None:
    started = time.monotonic()
    tally = Tally()
    first = push_simple(layout, registry, "ioerr/one", files={"one.txt": b"one\n" * 1000})
    second = push_simple(layout, registry, "ioerr/two",
                         files={f"two{i}": bytes([i]) * MiB for i in range(4)})
    root.mkdir()
    with fault_disk(mkfs(tmp_path), f"imaged-ioerr-{os.getpid()}") as disk, \
            mounted(disk.path, root):
        work = Workload(imaged, root, tally)
        work.ok("pull", first.ref)
        kept = Path(work.ok("mount", first.ref, "--name", "kept").strip().splitlines()[-1])
        write_synced(kept, "acked", ACKED)
        work.ok("umount", "kept")
        acked = {"kept": ACKED}

        for fault in (disk.fail_writes, disk.fail_all):
            fault()
            drop_caches()
            tally.faults.append(disk.mode)
            work.attempt(disk, "pull", second.ref)
            name = f"fresh{len(tally.faults)}"
            made = work.attempt(disk, "mount", first.ref, "--name", name)
            if made.code == 0:
                path = Path(made.out.strip().splitlines()[-1])
                try:
                    write_synced(path, "acked", ACKED)
                    acked[name] = ACKED
                except OSError as exc:
                    tally.operations.append(f"write+fsync in {name}: {exc.strerror}")
                work.attempt(disk, "umount", name)
                work.attempt(disk, "rm", "--force", name)
            work.attempt(disk, "gc")

        tally.faults.append(f"e2fsck: {heal(disk, root)}")
        found = imaged("--driver", "vfs", "check", "--verify-data", "--json")
        tally.findings += [f"{f['kind']} {f['subject']}: {f['message']}"
                           for f in json.loads(found.out)["findings"]]
        repaired = imaged("--driver", "vfs", "check", "--repair", "--json")
        tally.repaired += [f"{f['kind']} {f['subject']}" + ("" if f.get("repaired") else
                                                             f" NOT: {f.get('error')}")
                           for f in json.loads(repaired.out)["findings"]]
        after = imaged("--driver", "vfs", "check", "--verify-data")
        assert after.code == 0, (after, tally.report("io errors", started))

        containers = work.containers()
        for name, data in acked.items():
            if name not in containers:
                tally.lost.append(f"container {name}")
                continue
            path = Path(work.ok("mount", first.ref, "--name", name).strip().splitlines()[-1])
            if (path / "acked").read_bytes() != data:
                tally.lost.append(f"container {name}'s acked file")
            work.ok("umount", name)
        work.ok("pull", second.ref)
        path = Path(work.ok("mount", second.ref, "--name", "after").strip().splitlines()[-1])
        for i in range(4):
            assert (path / f"two{i}").read_bytes() == bytes([i]) * MiB
        assert (path / "etc/os-release").read_bytes() == b"ID=imaged-test\n"
        work.ok("rm", "--force", "after")
    print(tally.report("io errors", started))
    assert not tally.lost, tally.report("io errors", started)
