"""The ``guest`` tier: tests marked ``guest`` run inside a user-mode-linux kernel (uml.py).

On the host, once the session's tests are collected, one guest boots for every guest test
selected and runs them while the host runs its own: the guest uses one of the host's two CPUs,
and run one after the other the two tiers took most of the 20 minutes ``scripts/test`` may
take. In it, this checkout's pytest runs exactly those tests and appends each test report to a
file in the share as it is made. Guest tests come last on the host; the first waits for the
guest, and each is reported as it went in the guest (passed, failed with the guest's traceback
and captured output, skipped), through pytest's own report serialization (the one pytest-xdist
uses), so ``-x``, ``-ra``, ``--junitxml`` and ``--durations`` see ordinary results. A session
that ends before them kills the guest. A test the guest gave no result for (a hang, a crash, a
harness failure) is an error naming why, with the tail of the guest's output and console.

In the guest (IMAGED_GUEST=1, set by init.sh) guest tests are plain tests: fixtures and bodies
run there only. The plugin lives in this directory's conftest, so guest tests live here too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import pytest
from pytest import TestReport

from imaged.bench.report import machine_facts
from tests.cache import user_cache
from tests.conformance.conftest import bed, deep_images, deep_storage  # noqa: F401 - batteries
from tests.conftest import loop_filesystem
from tests.guest import faultreport, uml, xstate

IN_GUEST = os.environ.get("IMAGED_GUEST") == "1"
REPORTS_ENV = "IMAGED_GUEST_REPORTS"  # where the guest's pytest appends its reports
REPORTS = "reports.jsonl"  # that file, in the share
SHIM_REPORT = "shim.report"  # what the xstate shim did, in the share
# Booting takes about 2 s and starting pytest over hostfs a few more; a test gets a minute.
BOOT_SECONDS = 60.0
TEST_SECONDS = 60.0
MEMORY = "1G"  # the guest's tmpfs /tmp (half of it) holds the tests' sparse disk images
TAIL_LINES = 40


def pytest_configure(config: pytest.Config) -> None:
    if not IN_GUEST:
        config.pluginmanager.register(GuestRunner(config), "imaged-guest-runner")
    elif REPORTS_ENV in os.environ:
        config.pluginmanager.register(ReportWriter(config, Path(os.environ[REPORTS_ENV])),
                                      "imaged-guest-reports")


class ReportWriter:
    """In the guest: every test report, serialized, one JSON line each. hostfs writes through to
    the host file at each write, so the results of tests that finished survive a guest killed
    later."""

    def __init__(self, config: pytest.Config, path: Path) -> None:
        self.config = config
        self.file: IO[str] = path.open("a")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.file.write(json.dumps(data) + "\n")
        self.file.flush()

    def pytest_unconfigure(self) -> None:
        self.file.close()


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-TAIL_LINES:])


@dataclass(frozen=True)
class Started:
    """The session's guest, booted at collection."""

    kernel: uml.Kernel
    probed: xstate.Probe
    share: Path
    booting: uml.Booting
    timeout: float
    tests: int


class GuestRunner:
    """On the host: boots one guest for the session's guest tests once they are collected, so
    that they run alongside the host's tests, then reports their results where pytest reaches
    them (last: ``pytest_collection_modifyitems``)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.items: list[pytest.Item] = []
        self.started: Started | None = None
        self.share = contextlib.ExitStack()  # the share's temporary directory
        self.reports: dict[str, list[TestReport]] | None = None  # by node ID, once run
        self.missing = ""  # why a test has no (complete) result from the guest
        self.skip: str | None = None  # why no guest test can run on this host at all
        self.summary = ""
        self.faults: list[dict[str, Any]] = []  # the fault tests' figures (faultreport.py)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Guest tests last: they are never set up here, so a host test after them would find
        pytest's setup stack still holding the directories of the last host test before them."""
        items[:] = ([item for item in items if item.get_closest_marker("guest") is None]
                    + [item for item in items if item.get_closest_marker("guest") is not None])

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Boot the guest now, so that it runs its tests while the host runs the others."""
        self.items = [item for item in session.items if item.get_closest_marker("guest")]
        if self.items and not self.config.option.collectonly:
            self.started = self._start()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item,
                                nextitem: pytest.Item | None) -> bool | None:
        """Report a guest test from the guest's run (waiting for it at the first such test)
        instead of setting it up and calling it here."""
        if item.get_closest_marker("guest") is None:
            return None  # pytest's own protocol runs it
        if self.reports is None:
            try:
                self.reports = self._collect(self.started) if self.started else {}
            finally:
                self.started = None
                self.share.close()
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self._reports_for(item):
            item.ihook.pytest_runtest_logreport(report=report)
            self.faults += [faultreport.entry(item.nodeid, _outcome(report), dict(figures))
                            for name, figures in report.user_properties
                            if name == faultreport.PROPERTY and report.when == "call"
                            and isinstance(figures, dict)]
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def pytest_unconfigure(self) -> None:
        """A session that ended before its guest tests (``-x``, an interrupt) kills the guest."""
        try:
            if self.started is not None:
                self.started.booting.finish(abort=True)
        finally:
            self.share.close()

    def _start(self) -> Started | None:
        """Boot the guest once for every selected guest test; None (and ``missing`` says
        why) if it could not be booted."""
        try:
            kernel = uml.fetch_kernel()
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            self.missing = f"no guest kernel: {exc}"
            return None
        nodeids = [item.nodeid for item in self.items]
        share = Path(self.share.enter_context(tempfile.TemporaryDirectory(prefix="imaged-guest-")))
        try:
            probed = xstate.probe(kernel, share)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            self.missing = f"probing the host's xstate for the guest failed: {exc}"
            return None
        if any("deep_images" in getattr(item, "fixturenames", ()) for item in self.items):
            deep_storage(share / "deep")  # pushed here in seconds, not in the guest
        # Plugins are named, not autoloaded: importing schemathesis' and anyio's takes seconds
        # over hostfs. pytest-trio is needed for the project's trio_mode setting. The guest's
        # /tmp is half its RAM and dies with it: each test's tmp_path (disk images of up to a
        # few hundred MiB) goes when the test passes, or the tier's later tests find no space
        # left.
        pytest_args = [sys.executable, "-m", "pytest", "-p", "trio", "-p", "no:cacheprovider",
                       "-o", "tmp_path_retention_policy=failed", "-q", *nodeids]
        script = (f"cd {shlex.quote(str(self.config.rootpath))}\n"
                  f"export {REPORTS_ENV}={shlex.quote(str(share / REPORTS))}"
                  f" XDG_CACHE_HOME={shlex.quote(str(user_cache().parent))}"
                  f" {xstate.MODE_ENV}={probed.plan.mode.value}"
                  " PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONDONTWRITEBYTECODE=1\n"
                  f"exec {shlex.join(pytest_args)}\n")
        timeout = BOOT_SECONDS + TEST_SECONDS * len(nodeids)
        try:
            booting = uml.start_boot(kernel, share, script, timeout=timeout, memory=MEMORY,
                                     env=probed.plan.environment(share / SHIM_REPORT))
        except (OSError, ValueError, RuntimeError) as exc:
            self.missing = f"the guest did not boot: {exc}"
            return None
        return Started(kernel, probed, share, booting, timeout, len(nodeids))

    def _collect(self, started: Started) -> dict[str, list[TestReport]]:
        """Wait for the guest and read back its tests' reports."""
        if float(self.config.getini("faulthandler_timeout") or 0) > 0:
            # pytest's faulthandler_timeout is per test and this one wait covers them all: the
            # guest's own deadline ends a hung guest, so a dump waits until after it.
            left = started.booting.running.deadline - time.monotonic()
            faulthandler.dump_traceback_later(max(left, 0.0) + 60)
        began = time.monotonic()
        try:
            run = started.booting.finish()
        except (OSError, RuntimeError) as exc:
            self.missing = f"the guest did not finish cleanly: {exc}"
            return {}
        waited = time.monotonic() - began
        kernel, probed, share = started.kernel, started.probed, started.share
        reports = share / REPORTS
        lines = reports.read_text().splitlines() if reports.exists() else []
        if not lines:
            self.skip = self._skip_reason(kernel, probed, run, share)
        shim = xstate.Report.read(share / SHIM_REPORT)
        by_node: dict[str, list[TestReport]] = {}
        for line in lines:
            report = self._report_from_json(json.loads(line))
            by_node.setdefault(report.nodeid, []).append(report)
        ending = "timed out" if run.timed_out else f"pytest exit status {run.status}"
        shim_counts = (f" (shim: {shim.sets} sets, {shim.fresh} fresh, {shim.older} older, "
                       f"{shim.errors} refused)" if shim else "")
        self.summary = (f"guest: user-mode-linux {kernel.version}, {probed.plan.describe()}"
                        f"{shim_counts}, {started.tests} test(s), {run.seconds:.1f} s with boot "
                        f"(the first guest test waited {waited:.1f} s for it), {ending}"
                        + (f"; skipped: {self.skip}" if self.skip else ""))
        if run.timed_out:
            why = f"the guest timed out after {started.timeout:.0f} s"
        elif run.status is None:
            why = "the guest stopped without an exit status"
        else:
            why = f"the guest's pytest exited {run.status} without reporting this test"
        self.missing = (f"{why} ({probed.plan.describe()})\n"
                        f"--- guest output (last {TAIL_LINES} lines) ---\n"
                        f"{_tail(run.output)}\n--- guest console (last {TAIL_LINES} lines) ---\n"
                        f"{_tail(run.console)}")
        return by_node

    @staticmethod
    def _skip_reason(kernel: uml.Kernel, probed: xstate.Probe, run: uml.GuestRun,
                     scratch: Path) -> str | None:
        """Why the tier is skipped on this host, when the guest reported nothing: only where
        init dies at once both without and with the shim (``xstate.skip_reason``)."""
        main = xstate.outcome(run.console)
        if main is not xstate.Outcome.INIT_SEGV:
            return None
        shim, report = xstate.shim_outcome(kernel, probed, scratch)
        return xstate.skip_reason(probed.direct, shim, report, xstate.self_check(probed.plan.shim))

    def _report_from_json(self, data: dict[str, Any]) -> TestReport:
        # JSON has no tuples; pytest's terminal reporter insists on them for these two.
        data["location"] = tuple(data["location"])
        if isinstance(data["longrepr"], list):  # a skip: (path, line, reason)
            data["longrepr"] = tuple(data["longrepr"])
        report: TestReport = self.config.hook.pytest_report_from_serializable(
            config=self.config, data=data)
        return report

    def _reports_for(self, item: pytest.Item) -> list[TestReport]:
        """The guest's reports for ``item``, completed up to teardown with an error for the
        phase the guest never reported."""
        assert self.reports is not None
        reports = list(self.reports.get(item.nodeid, []))
        if reports and reports[-1].when == "teardown":
            return reports

        def fail() -> None:
            pytest.fail(f"no result from the guest: {self.missing}", pytrace=False)

        def ok() -> None:
            pass

        phases: list[tuple[Literal["setup", "call", "teardown"], Callable[[], None]]]
        def skip() -> None:
            assert self.skip is not None
            pytest.skip(self.skip)

        if not reports:
            phases = [("setup", skip if self.skip else fail), ("teardown", ok)]
        elif reports[-1].when == "setup" and reports[-1].passed:
            phases = [("call", fail), ("teardown", ok)]
        elif reports[-1].when == "setup":  # setup failed or skipped: nothing was called
            phases = [("teardown", ok)]
        else:
            phases = [("teardown", fail)]
        for when, func in phases:
            call = pytest.CallInfo.from_call(func, when=when)
            reports.append(item.ihook.pytest_runtest_makereport(item=item, call=call))
        return reports

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.summary:
            terminalreporter.write_line(self.summary)
        stem = os.environ.get(faultreport.ENV)
        if stem and self.faults:
            facts = {**machine_facts(), "guest": self.summary.removeprefix("guest: ")}
            faultreport.write(Path(stem), self.faults, facts)
            terminalreporter.write_line(f"faults report: {stem}.json, {stem}.md")


def _outcome(report: TestReport) -> str:
    """passed, failed, skipped, or xfailed (a known failure, pytest's ``wasxfail``)."""
    return "xfailed" if getattr(report, "wasxfail", None) is not None and report.skipped \
        else report.outcome


@pytest.fixture(scope="session")
def kernel() -> uml.Kernel:
    """On the host, for tests that boot guests of their own (the harness's, systemd's)."""
    return uml.fetch_kernel()


@pytest.fixture(scope="session")
def boot_env(kernel: uml.Kernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The UML process's environment for such a boot: the xstate shim where this host needs it,
    as the guest tier boots (xstate.py)."""
    scratch = tmp_path_factory.mktemp("xstate")
    return xstate.probe(kernel, scratch).plan.environment(scratch / "shim.report")


# Filesystems that enforce project quotas once mounted with ``prjquota`` (the guest's kernel has
# quota support; the host's has none). ext4 needs the project feature and a project quota inode.
PRJQUOTA_MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-O", "quota,project", "-E", "quotatype=prjquota"],
}


@contextlib.contextmanager
def prjquota_root(fstype: str, tmp_path: Path) -> Iterator[Path]:
    """The ``root`` fixture's directory on a fresh ``fstype`` mounted with ``prjquota``."""
    with loop_filesystem(PRJQUOTA_MKFS[fstype], tmp_path / f"{fstype}.img", tmp_path / "root",
                         "prjquota") as root:
        yield root
