"""The guest harness's xstate decisions (tests/guest/xstate.py), without a guest or ptrace: when
the shim is needed, what the UML process's environment gains, and when a guest that stopped is
a host to skip rather than an error."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.guest import xstate
from tests.guest.xstate import Mode, Outcome, Plan, Report

SHIM = Path("/cache/xstate-shim.so")


def report(**fields: int) -> Report:
    values = dict.fromkeys(Report.__dataclass_fields__, 0)
    values.update(magic=Report.MAGIC, mode=2, **fields)
    return Report(**values)


@pytest.mark.parametrize(("host", "lengths", "mode"), [
    (832, {832}, Mode.DIRECT),  # an AVX host and an old UML: the case with nothing to do
    (2432, {2696}, Mode.DIRECT),  # this host's UML: a longer buffer is cut to the host's size
    (2432, {832}, Mode.SHIM),  # AVX-512 and an old UML
    (11008, {832}, Mode.SHIM),  # AMX
    (2432, {2432, 832}, Mode.SHIM),  # any short call needs it
    (576, {832}, Mode.DIRECT),
])
def test_the_shim_is_needed_exactly_where_umls_buffer_is_shorter(
        host: int, lengths: set[int], mode: Mode) -> None:
    assert xstate.decide(host, lengths) is mode


@pytest.mark.parametrize(("host", "lengths"), [(0, {832}), (2432, set())])
def test_no_decision_without_both_sizes(host: int, lengths: set[int]) -> None:
    with pytest.raises(ValueError, match="cannot decide"):
        xstate.decide(host, lengths)


def test_the_shim_goes_only_into_the_uml_process_and_only_in_shim_mode() -> None:
    direct = Plan(Mode.DIRECT, 2432, 2696, emulated=False, shim=SHIM)
    assert direct.environment(Path("/r")) == {}
    assert direct.describe() == "xstate direct (UML 2696 B, host 2432 B)"
    shim = Plan(Mode.SHIM, 2432, 832, emulated=False, shim=SHIM)
    assert shim.environment(Path("/r")) == {
        "LD_PRELOAD": str(SHIM), "IMAGED_XSTATE_SHIM": "on", "IMAGED_XSTATE_REPORT": "/r"}
    assert shim.describe() == "xstate shim (host 2432 B, UML's 832 B)"
    emulated = Plan(Mode.SHIM, 2432, 832, emulated=True, shim=SHIM)
    assert emulated.environment(Path("/r"))["IMAGED_XSTATE_EMULATE"] == "832"
    assert "emulated 832 B" in emulated.describe()


@pytest.mark.parametrize(("console", "outcome"), [
    ("Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n",
     Outcome.INIT_SEGV),
    ("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000\n", Outcome.RAN),
    ("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\n", Outcome.OTHER),
    ("", Outcome.OTHER),
])
def test_outcome_reads_the_console(console: str, outcome: Outcome) -> None:
    assert xstate.outcome(console) is outcome


SEGV = Outcome.INIT_SEGV


@pytest.mark.parametrize(("direct", "shim", "shim_report", "faults", "skips"), [
    (SEGV, SEGV, report(), "", True),  # the known signature both ways, the shim known good
    (Outcome.RAN, SEGV, report(), "", False),  # it runs without the shim: the shim broke it
    (SEGV, Outcome.RAN, report(), "", False),  # it runs with the shim: the tier failed
    (SEGV, Outcome.OTHER, report(), "", False),
    (SEGV, SEGV, None, "", False),  # the shim never ran
    (SEGV, SEGV, report(errors=3), "", False),  # the host refused what the shim shaped
    (SEGV, SEGV, report(), "check_new_task: ...", False),  # the shim fails its own checks
])
def test_only_the_known_signature_with_a_good_shim_skips(
        direct: Outcome, shim: Outcome, shim_report: Report | None, faults: str,
        skips: bool) -> None:
    reason = xstate.skip_reason(direct, shim, shim_report, faults)
    assert (reason is not None) is skips
    if reason:
        assert "cannot run user space" in reason and "without and with the xstate shim" in reason


def test_a_report_is_read_only_in_its_own_format(tmp_path: Path) -> None:
    path = tmp_path / "report"
    assert Report.read(path) is None
    fields = [Report.MAGIC, 2, 2432, 832, 832, 7, 10, 11, 1, 2, 0, 0, 0]
    path.write_bytes(struct.pack(Report.FORMAT, *fields))
    read = Report.read(path)
    assert read is not None
    assert (read.host_size, read.uml_lengths, read.fresh, read.older) == (2432, {832}, 1, 2)
    path.write_bytes(struct.pack(Report.FORMAT, 0, *fields[1:]))
    assert Report.read(path) is None
    path.write_bytes(b"short")
    assert Report.read(path) is None


def test_the_emulated_length_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(xstate.EMULATE_ENV, raising=False)
    assert xstate.emulated_length() is None
    monkeypatch.setenv(xstate.EMULATE_ENV, "832")
    assert xstate.emulated_length() == 832
    monkeypatch.setenv(xstate.EMULATE_ENV, "100")
    with pytest.raises(ValueError, match="below 576"):
        xstate.emulated_length()
