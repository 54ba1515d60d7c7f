"""The xstate shim on the host (integration tier): its bookkeeping against a real ptrace'd child
(``tracee.py``'s checks, one test each), and a guest booted with it running vector-heavy threads
and forks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.guest import tracee, uml, vectorwork, xstate


@pytest.fixture
def child() -> Iterator[tracee.Tracee]:
    with tracee.Tracee() as child:
        yield child


@pytest.fixture
def shim(tmp_path: Path) -> tracee.Shim:
    copy = tmp_path / "shim.so"  # a path of its own: an empty table
    shutil.copy(xstate.build_shim(), copy)
    return tracee.Shim(copy, tmp_path / "report")


def _report(shim: tracee.Shim) -> xstate.Report:
    report = xstate.Report.read(shim.report_path)
    assert report is not None
    return report


@pytest.mark.parametrize("check", tracee.CHECKS, ids=lambda check: check.__name__)
def test_shim(check: Callable[[tracee.Tracee, tracee.Shim], None], child: tracee.Tracee,
              shim: tracee.Shim) -> None:
    check(child, shim)
    assert _report(shim).errors == 0


def test_what_uml_alone_gets_is_refused(child: tracee.Tracee) -> None:
    """The failure the shim exists for: a set shorter than the host's area."""
    with pytest.raises(OSError, match="Bad address"):
        child.set(child.get()[:tracee.PREFIX])


def test_the_report_counts_what_happened(child: tracee.Tracee, shim: tracee.Shim) -> None:
    tracee.check_new_task(child, shim)
    tracee.check_signal_return(child, shim)
    report = _report(shim)
    assert (report.mode, report.host_size, report.set_len, report.keep_mask) == (
        2, child.size, tracee.PREFIX, 0b11)
    assert (report.fresh, report.older, report.errors) == (1, 1, 0)


def test_the_self_check_passes_and_fails_on_no_shim(tmp_path: Path) -> None:
    assert xstate.self_check(xstate.build_shim()) == ""
    assert "missing.so" in xstate.self_check(tmp_path / "missing.so")


def test_the_host_size_probe_agrees_with_a_tracee(child: tracee.Tracee) -> None:
    assert xstate.host_xstate_size() == child.size > tracee.PREFIX


def test_the_hosts_digests_are_the_expected_ones() -> None:
    assert vectorwork.digests(vectorwork.layer()) == vectorwork.EXPECTED


def test_a_guest_under_the_shim_computes_the_hosts_digests(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The shim's whole path in a real guest on any host: UML's buffer is taken as the 832
    bytes older builds pass, and threads and forks of vector work must agree with the host."""
    monkeypatch.setenv(xstate.EMULATE_ENV, str(xstate.LEGACY_UML_BYTES))
    kernel = uml.fetch_kernel()
    probed = xstate.probe(kernel, tmp_path)
    assert probed.plan.mode is xstate.Mode.SHIM
    report = tmp_path / "shim.report"
    script = f"cd {uml.TREE}\nexec {uml.TREE}/.venv/bin/python -m tests.guest.vectorwork\n"
    run = uml.boot(kernel, tmp_path, script, timeout=180, memory="512M",
                   env=probed.plan.environment(report))
    assert run.status == 0, f"{run.output}\n{run.console[-3000:]}"
    assert json.loads(run.output) == [json.dumps(vectorwork.EXPECTED, sort_keys=True)]
    counts = xstate.Report.read(report)
    assert counts is not None
    assert (counts.set_len, counts.errors) == (xstate.LEGACY_UML_BYTES, 0)
    assert counts.sets > 1000 and counts.fresh > 0
