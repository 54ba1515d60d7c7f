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
