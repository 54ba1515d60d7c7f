"""The faults report's rendering (tests/guest/faultreport.py): what the guest's fault tests
recorded comes out as JSON and markdown that name every figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.guest import faultreport

pytestmark = pytest.mark.unit


def test_every_figure_is_in_both_files(tmp_path: Path) -> None:
    figures = {"fault": "dm-delay | 50 ms", "filesystem": "xfs",
               "info_ms": {"p50": 8.0, "max": 62.1}, "acknowledged_data_lost": {}}
    entries = [faultreport.entry("tests/guest/test_x.py::test_y[xfs]", "xfailed", figures)]
    faultreport.write(tmp_path / "out" / "faults", entries, {"commit": "abc", "cpus": "2"})
    data = json.loads((tmp_path / "out" / "faults.json").read_text())
    assert data == {"machine": {"commit": "abc", "cpus": "2"},
                    "tests": [{"test": "tests/guest/test_x.py::test_y[xfs]",
                               "outcome": "xfailed", **figures}]}
    text = (tmp_path / "out" / "faults.md").read_text()
    assert "## tests/guest/test_x.py::test_y[xfs]" in text
    assert "| outcome | xfailed |" in text
    assert "| fault | dm-delay / 50 ms |" in text  # a bar would end the table's cell
    assert '| info_ms | {"p50": 8.0, "max": 62.1} |' in text
    assert "commit abc, cpus 2" in text


def test_a_list_of_records_is_a_table_of_its_own() -> None:
    phases = [{"fault": "dm-dust", "operations": ["pull one:v1: ok", "gc: failed"],
               "check_after_heal": {"blob-unreadable": 7}, "lost": []},
              {"fault": "dm-flakey | all", "e2fsck_exit": 1, "lost": ["image one:v1"]}]
    text = faultreport.markdown(
        [faultreport.entry("t::io", "passed", {"faults": 2, "phases": phases})], {"cpus": "2"})
    assert "| faults | 2 |" in text
    assert "| phases |" not in text  # not also as one long JSON cell
    assert "### phases\n\n| # | fault | operations | check_after_heal | lost | e2fsck_exit |\n" \
        "|---|---|---|---|---|---|\n" in text
    assert "| 1 | dm-dust | pull one:v1: ok; gc: failed | blob-unreadable (7) | none |  |" in text
    assert "| 2 | dm-flakey / all |  |  | image one:v1 | 1 |" in text


def test_cell() -> None:
    assert faultreport.cell("a | b") == "a / b"
    assert faultreport.cell([]) == "none"
    assert faultreport.cell({}) == "none"
    assert faultreport.cell({"x": 2, "y": [1, "z"]}) == "x (2); y (1; z)"
    assert faultreport.cell(0) == "0"


def test_a_failure_line_reads_the_same_every_run() -> None:
    digest = "ab" * 32
    line = (f"imaged: error: the blob /tmp/pt-1/root/content/blobs/sha256/{digest}: "
            "Input/output error")
    assert faultreport.trim(line, "/tmp/pt-1/root") == \
        "the blob ROOT/content/blobs/sha256/abababababab...: Input/output error"
    long = faultreport.trim("imaged: error: cp " + "x" * 50 + ": Input/output error", "/r",
                            width=40)
    assert long == "cp xxxxxxxxxxxxxx ... Input/output error"
    assert len(long) == 40
    assert faultreport.trim("no prefix", "/r") == "no prefix"


def test_counted_puts_the_most_frequent_first_and_ties_as_seen() -> None:
    assert list(faultreport.counted(["b", "a", "c", "a", "c"]).items()) == \
        [("a", 2), ("c", 2), ("b", 1)]
    assert faultreport.counted([]) == {}


def test_short_names_a_command_by_what_it_acts_on() -> None:
    assert faultreport.short(("pull", "127.0.0.1:5000/ioerr/one:v1")) == "pull one:v1"
    assert faultreport.short(("mount", "127.0.0.1:5000/ioerr/one:v1", "--name", "kept")) == \
        "mount kept"
    assert faultreport.short(("gc",)) == "gc"
    assert faultreport.short(("rm", "--force", "c1")) == "rm c1"
