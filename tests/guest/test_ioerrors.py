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

The test records, phase by phase, the fault (which target, injected when), the operations under
it, the failures (their lines trimmed: ``faultreport.trim``), what ``check`` found under the
fault, after the heal and after the repair, what the repair did and the data lost, into the
faults report (tests/guest/faultreport.py, docs/testing.md "The faults report"), a failed run's
as far as it came.

A second test runs the daemon on such a root (``imaged serve``, vfs): while every write fails,
a pull, a container's creation and a gc through the socket API each succeed or fail with one
line naming the path and the errno's text (the API's error code, DESIGN §5: a storage failure
is ``internal``, its message the operation, the file and the errno, never the generic internal
error whose details only the log has), the daemon logs no traceback, stays up and answers
``GET /v1/info``; then, stopped and healed as above, ``check --repair`` restores the store and the
container acknowledged before the fault keeps its fsynced bytes.
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

from imaged.cli.client import DaemonClient
from imaged.errors import ImagedError, error_from_json
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conftest import CLI, Daemon, Result, push_simple, unmount_below
from tests.guest import faultreport
from tests.guest.faultdisk import (  # noqa: F401 - images: an autouse fixture
    BLOCK,
    FaultDisk,
    MiB,
    drop_caches,
    fault_disk,
    images,
    make_fs,
    mounted,
    physical_blocks,
    run,
    write_synced,
)

pytestmark = pytest.mark.guest

DISK_SIZE = 128 * MiB
ACKED = b"acknowledged by fsync\n" * 200
# What a failing disk may answer, as the kernel passes it on: the I/O error itself, and, once
# ext4 has aborted its journal over one, a read-only filesystem; SQLite passes no errno on and
# says "disk I/O error" for any failed read, write or sync of its files.
DISK_ERRORS = (os.strerror(errno.EIO), os.strerror(errno.EROFS), "disk I/O error")
API_CODES = ("invalid", "forbidden", "not_found", "conflict", "quota_unsupported", "registry",
             "internal")  # DESIGN §5


@dataclass
class Phase:
    """One fault, from its injection to the check after its heal: the faults report's row."""

    fault: str
    injected: str = "before the operations"
    operations: list[str] = field(default_factory=list)
    # imaged's failed commands' lines, trimmed (faultreport.trim); an application's failed
    # write is the kernel's answer, in its operation only
    failures: list[str] = field(default_factory=list)
    check_under_fault: dict[str, int] | None = None  # None: not run
    repaired_under_fault: list[str] | None = None
    e2fsck_exit: int | None = None
    check_after_heal: dict[str, int] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)
    check_after_repair: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        """Check findings (by kind) and repairs by when, the ones not run left out; the
        failures' lines counted."""
        under = {} if self.check_under_fault is None else \
            {"under fault": self.check_under_fault}
        repaired_under = {} if self.repaired_under_fault is None else \
            {"under fault": self.repaired_under_fault}
        return {"fault": self.fault, "injected": self.injected, "operations": self.operations,
                "failed": len(self.failures), "failures": faultreport.counted(self.failures),
                "check": {**under, "after heal": self.check_after_heal,
                          "after repair": self.check_after_repair},
                "e2fsck_exit": self.e2fsck_exit,
                "repaired": {**repaired_under, "after heal": self.repaired},
                "lost": self.lost}


@dataclass
class Tally:
    """What a test did under faults, phase by phase, for the faults report (faultreport.py)."""

    phases: list[Phase] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # found after the last heal

    @property
    def phase(self) -> Phase:
        return self.phases[-1]

    def figures(self, started: float) -> dict[str, Any]:
        phases = [phase.figures() for phase in self.phases]
        return {
            "fault": "I/O errors: dm-dust bad blocks, dm-flakey failing writes (from before "
                     "and from the middle of commands), dm-flakey failing reads and writes",
            "filesystem": f"ext4, {BLOCK // 1024} KiB blocks, {DISK_SIZE // MiB} MiB",
            "faults": len(phases),
            "operations_under_faults": sum(len(p["operations"]) for p in phases),
            "operations_failed": sum(p["failed"] for p in phases),
            "failure_lines": faultreport.counted([line for phase in self.phases
                                                  for line in phase.failures]),
            "check_findings": {when: sum(sum(p["check"].get(when, {}).values()) for p in phases)
                               for when in ("under fault", "after heal", "after repair")},
            "repaired": sum(len(done) for p in phases for done in p["repaired"].values()),
            "acknowledged_data_lost": [f"{what} (after {p['fault']})" for p in phases
                                       for what in p["lost"]] + self.lost,
            "seconds": round(time.monotonic() - started, 1),
            "phases": phases,
        }


def kinds(findings: list[dict[str, Any]]) -> dict[str, int]:
    """``check``'s findings counted by kind."""
    return faultreport.counted([finding["kind"] for finding in findings])


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


def clean_api_failure(error: ImagedError, root: Path, context: str) -> str:
    """A request's error through the socket API, checked as ``clean_failure`` checks the CLI's:
    a documented code, one line naming a path under the root and an errno's text, not the
    generic internal error (a bug's, whose traceback went to the log); ``code: message``."""
    line = f"{error.code}: {error.message}"
    assert error.code in API_CODES, (context, line)
    assert "\n" not in error.message and "Traceback" not in error.message, (context, line)
    assert "the daemon's log has the details" not in error.message, (context, line)
    assert str(root) in error.message, (context, line)
    assert any(text in error.message for text in DISK_ERRORS), (context, line)
    return line


class Workload:
    """The CLI on the faulty root, each command tallied in the current phase: a success is
    acknowledged (and must survive), a failure must be clean."""

    def __init__(self, imaged: CLI, root: Path, tally: Tally) -> None:
        self.imaged, self.root, self.tally = imaged, root, tally

    def ok(self, *args: str) -> str:
        result = self.imaged("--driver", "vfs", *args)
        assert result.code == 0, (args, result)
        return result.out

    def attempt(self, *args: str) -> Result:
        return self.tallied(args, self.imaged("--driver", "vfs", *args))

    def tallied(self, args: tuple[str, ...], result: Result) -> Result:
        phase = self.tally.phase
        phase.operations.append(f"{faultreport.short(args)}: "
                                + ("ok" if result.code == 0 else "failed"))
        if result.code != 0:
            line = clean_failure(result, self.root, f"{args} under {phase.fault}")
            phase.failures.append(faultreport.trim(line, str(self.root)))
        return result

    def request(self, api: DaemonClient, label: str,
                call: Callable[[DaemonClient], dict[str, Any]]) -> dict[str, Any] | None:
        """A request through the daemon's socket API, tallied as ``attempt`` tallies a command
        (its error checked by ``clean_api_failure``); its answer, None when it failed. A pull's
        stream that ends in an error object is a failure too."""
        phase = self.tally.phase
        try:
            answer = call(api)
            if answer.get("status") == "error":
                raise error_from_json(answer)
        except ImagedError as exc:
            line = clean_api_failure(exc, self.root, f"{label} under {phase.fault}")
            phase.operations.append(f"API {label}: failed")
            phase.failures.append(faultreport.trim(line, str(self.root)))
            return None
        phase.operations.append(f"API {label}: ok")
        return answer

    def attempt_while(self, fault: Callable[[], None], name: str,
                      under_way: Callable[[], bool] | str, *args: str) -> Result:
        """The command as a real process, with ``fault`` (a phase called ``name``) injected
        once it is under way: once ``under_way`` holds, or once a line of its progress on
        stderr has that text."""
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
            self.tally.phases.append(Phase(name, f"from the middle of {args[0]} ({when})"))
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return self.tallied(args, Result(proc.returncode, out, seen + err))

    def cycle(self, ref: str, name: str, acked: dict[str, dict[str, bytes]]) -> None:
        """Create and mount a container, write a file with fsync, unmount and remove it, as far
        as the disk lets it; what succeeded is acknowledged (until its removal succeeds)."""
        made = self.attempt("mount", ref, "--name", name)
        if made.code != 0:
            return
        self.write(Path(made.out.strip().splitlines()[-1]), name, "acked", acked)
        self.attempt("umount", name)
        if self.attempt("rm", "--force", name).code == 0:
            acked.pop(name, None)

    def check(self) -> dict[str, int]:
        """``check --verify-data``'s findings by kind; exit status 1 exactly when any."""
        result = self.imaged("--driver", "vfs", "check", "--verify-data", "--json")
        findings: list[dict[str, Any]] = json.loads(result.out)["findings"]
        assert result.code == (1 if findings else 0), result
        return kinds(findings)

    def write(self, path: Path, name: str, file: str,
              acked: dict[str, dict[str, bytes]]) -> None:
        """An application's write with fsync into a mounted container, tallied, and recorded
        in ``acked`` when it was acknowledged (a failure is the kernel's error to the
        application, not imaged's)."""
        try:
            write_synced(path, file, ACKED)
        except OSError as exc:
            self.tally.phase.operations.append(f"write+fsync in {name}: {exc.strerror}")
            return
        self.tally.phase.operations.append(f"write+fsync in {name}: ok")
        acked.setdefault(name, {})[file] = ACKED

    def repair(self) -> list[str]:
        """What ``check --verify-data --repair`` did, a line per finding."""
        result = self.imaged("--driver", "vfs", "check", "--verify-data", "--repair", "--json")
        done = [f"{f['kind']} {f['subject']}"
                + ("" if f.get("repaired") else f" NOT REPAIRED: {f.get('error')}")
                for f in json.loads(result.out)["findings"]]
        return [faultreport.trim(line, str(self.root)) for line in done]

    def containers(self) -> dict[str, Any]:
        return {row["name"]: row for row in json.loads(self.ok("ps", "--json"))}


def heal(disk: FaultDisk, root: Path, phase: Phase) -> None:
    """What an operator does: unmount, the disk healthy, ``e2fsck -fy``, mount again (the
    caller's ``mounted`` unmounts at the end)."""
    unmount_below(root)  # a container left mounted: its record goes stale, for check to find
    subprocess.run(["umount", str(root)], check=True, timeout=60)  # busy: imaged leaked a file
    disk.healthy()
    fsck = subprocess.run(["e2fsck", "-fy", str(disk.path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert fsck.returncode in (0, 1), fsck  # clean, or errors corrected
    phase.e2fsck_exit = fsck.returncode
    run("mount", str(disk.path), str(root))


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
        imaged: CLI, record_property: Callable[[str, object], None]) -> None:
    started = time.monotonic()
    tally = Tally()
    contents = {"one": {"one.txt": b"one\n" * 1000},
                "two": {f"two{i}": bytes([i]) * 2 * MiB for i in range(4)},
                "three": {f"three{i}": bytes([0x30 + i]) * 4 * MiB for i in range(2)}}
    refs = {name: push_simple(layout, registry, f"ioerr/{name}", files=files).ref
            for name, files in contents.items()}
    root.mkdir()
    # The disk image goes at teardown (faultdisk.images): the guest's /tmp is RAM that the
    # tests after this one need.
    image = make_fs(tmp_path / "disk.img", DISK_SIZE, ["mkfs.ext4", "-q", "-b", str(BLOCK)])
    try:
        with fault_disk(image, f"imaged-ioerr-{os.getpid()}") as disk, mounted(disk.path, root):
            work = Workload(imaged, root, tally)
            run_faults(work, disk, refs, contents)
    finally:
        figures = tally.figures(started)
        record_property("fault_report", figures)  # a failed run's too, as far as it came
        print(json.dumps(figures, indent=1))
    assert not figures["acknowledged_data_lost"], figures


def run_faults(work: Workload, disk: FaultDisk, refs: dict[str, str],
               contents: dict[str, dict[str, bytes]]) -> None:
    """The five faults in turn, each healed, checked and repaired, then every acknowledged
    container and every image read back."""
    root, tally = work.root, work.tally
    work.ok("pull", refs["one"])
    work.ok("pull", refs["two"])
    kept = Path(work.ok("mount", refs["one"], "--name", "kept").strip().splitlines()[-1])
    write_synced(kept, "acked", ACKED)
    work.ok("umount", "kept")
    acked: dict[str, dict[str, bytes]] = {"kept": {"acked": ACKED}}

    acked_images = {refs["one"], refs["two"]}

    def recover() -> None:
        """Heal as an operator would, then check, repair, and check again: clean, with every
        image whose pull returned still there (its blobs verified by the check)."""
        phase = tally.phase
        heal(disk, root, phase)
        phase.check_after_heal = work.check()
        phase.repaired = work.repair()
        phase.check_after_repair = work.check()
        assert not phase.check_after_repair, (phase.fault, phase)
        listed = {ref for image in json.loads(work.ok("images", "--json"))
                  for ref in image["refs"]}
        phase.lost += [f"image {ref.rsplit('/', 1)[-1]}" for ref in sorted(acked_images - listed)]

    def bad_sectors(what: str, *directories: Path) -> dict[str, int]:
        """A new phase: reads of the first block of every file under ``directories`` fail,
        with the page cache dropped so they reach the disk; what check finds under it."""
        blocks = first_blocks_under(*directories)
        disk.bad_blocks(blocks)
        drop_caches()
        tally.phases.append(Phase(f"dm-dust: reads of {len(blocks)} blocks fail (the first of "
                                  f"{what})", "before the operations, page cache dropped"))
        tally.phase.check_under_fault = work.check()
        return tally.phase.check_under_fault

    # Bad sectors under every blob and every unpacked layer's files: their reads fail.
    layers = root / "drivers" / "vfs" / "layers"
    found = bad_sectors("every blob and unpacked layer file", root / "content" / "blobs", layers)
    assert set(found) == {"blob-unreadable"}, tally.phase
    work.cycle(refs["one"], "fresh-bad-sectors", acked)
    if work.attempt("pull", refs["three"]).code == 0:
        acked_images.add(refs["three"])
    work.attempt("gc")
    tally.phase.repaired_under_fault = work.repair()
    recover()

    # Bad sectors under the unpacked layers' files only: the blobs verify, so check compares
    # each layer with its blob and names every layer whose files cannot be read, and the repair
    # applies them again from their blobs under the fault (writing a dust block heals it).
    assert set(bad_sectors("every unpacked layer file only", layers)) == {"layer-damaged"}, \
        tally.phase
    tally.phase.repaired_under_fault = work.repair()
    assert not any("NOT REPAIRED" in line for line in tally.phase.repaired_under_fault), \
        tally.phase
    assert not work.check(), tally.phase
    recover()

    # Writes fail from the middle of a pull on (it has its manifest, not its layers), while
    # a container is mounted and its application writes.
    kept = Path(work.ok("mount", refs["one"], "--name", "kept").strip().splitlines()[-1])
    pulled = work.attempt_while(disk.fail_writes, "dm-flakey error_writes: every write fails",
                                " 2 layers, ", "pull", refs["three"])
    if pulled.code == 0:
        acked_images.add(refs["three"])
    work.write(kept, "kept", "during", acked)
    work.attempt("umount", "kept")
    work.cycle(refs["one"], "fresh-failing-writes", acked)
    if work.attempt("rmi", refs["two"]).code == 0:
        acked_images.discard(refs["two"])
    work.attempt("gc")
    recover()

    # Writes fail from the middle of a container's creation (vfs copies the image).
    containers = root / "drivers" / "vfs" / "containers"
    made = work.attempt_while(disk.fail_writes, "dm-flakey error_writes: every write fails",
                              (containers / "fresh-mid-create").exists,
                              "mount", refs["two"], "--name", "fresh-mid-create")
    if made.code == 0:
        acked["fresh-mid-create"] = {}
    recover()

    # Every read and write fails.
    disk.fail_all()
    drop_caches()
    tally.phases.append(Phase("dm-flakey: every read and write fails",
                              "before the operations, page cache dropped"))
    if work.attempt("pull", refs["three"]).code == 0:
        acked_images.add(refs["three"])
    work.cycle(refs["one"], "fresh-dead-disk", acked)
    work.attempt("images")
    work.attempt("gc")
    recover()

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


def test_the_daemon_under_failing_writes_fails_cleanly_and_stays_up(
        tmp_path: Path, root: Path, registry: LocalRegistry, layout: OCILayout, imaged: CLI,
        start_daemon: Any, record_property: Callable[[str, object], None]) -> None:
    started = time.monotonic()
    tally = Tally()
    refs = {name: push_simple(layout, registry, f"ioerr-daemon/{name}", files=files).ref
            for name, files in (("one", {"one.txt": b"one\n" * 1000}),
                                ("two", {f"two{i}": bytes([i]) * 2 * MiB for i in range(4)}))}
    root.mkdir()
    image = make_fs(tmp_path / "disk.img", DISK_SIZE, ["mkfs.ext4", "-q", "-b", str(BLOCK)])
    try:
        with fault_disk(image, f"imaged-ioerr-daemon-{os.getpid()}") as disk, \
                mounted(disk.path, root):
            work = Workload(imaged, root, tally)
            daemon = start_daemon("vfs")
            acked: dict[str, dict[str, bytes]] = {}
            try:
                serve_under_failing_writes(work, daemon, disk, refs, acked)
            finally:
                daemon.stop()  # mounts stay, as after any stop: heal unmounts them
            log = daemon.output()
            assert "Traceback" not in log and "internal error" not in log, log
            phase = tally.phase
            heal(disk, root, phase)
            phase.check_after_heal = work.check()
            phase.repaired = work.repair()
            phase.check_after_repair = work.check()
            assert not phase.check_after_repair, phase
            path = Path(work.ok("mount", refs["one"], "--name", "kept").strip().splitlines()[-1])
            tally.lost += [f"container kept's {file}" for file, data in acked["kept"].items()
                           if not (path / file).is_file() or (path / file).read_bytes() != data]
            work.ok("rm", "--force", "kept")
    finally:
        figures = tally.figures(started)
        figures["fault"] = "I/O errors under the daemon: dm-flakey failing writes"
        record_property("fault_report", figures)
        print(json.dumps(figures, indent=1))
    assert not figures["acknowledged_data_lost"], figures


def serve_under_failing_writes(work: Workload, daemon: Daemon, disk: FaultDisk,
                               refs: dict[str, str], acked: dict[str, dict[str, bytes]]) -> None:
    """Through the socket: an image pulled and container ``kept`` written with fsync while the
    disk is healthy, then every write failing while a pull, a creation, the container's
    application and a gc run; the daemon must answer ``GET /v1/info`` after each. ``acked``
    gets what the application's fsync acknowledged."""
    with contextlib.closing(DaemonClient(daemon.socket, timeout=120)) as api:
        assert list(api.stream("POST", "/v1/images/pull", {"ref": refs["one"]}))[-1][
            "status"] == "done"
        api.call("POST", "/v1/containers", {"name": "kept", "image": refs["one"]})
        path = Path(api.call("POST", "/v1/containers/kept/mount")["path"])
        write_synced(path, "acked", ACKED)
        acked["kept"] = {"acked": ACKED}
        disk.fail_writes()
        work.tally.phases.append(Phase("dm-flakey error_writes: every write fails (daemon)"))
        operations: list[tuple[str, Callable[[DaemonClient], dict[str, Any]]]] = [
            ("pull two", lambda api: list(api.stream("POST", "/v1/images/pull",
                                                     {"ref": refs["two"]}))[-1]),
            ("create fresh", lambda api: api.call("POST", "/v1/containers",
                                                  {"name": "fresh", "image": refs["one"]})),
            ("gc", lambda api: api.call("POST", "/v1/gc")),
        ]
        for label, call in operations:
            work.request(api, label, call)
            work.write(path, "kept", f"after-{label.replace(' ', '-')}", acked)
            assert work.request(api, "info", lambda api: api.call("GET", "/v1/info")), \
                work.tally.phase
        assert work.tally.phase.failures, work.tally.phase  # the fault reached the daemon
