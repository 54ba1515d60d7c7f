"""The faults report (issue 17): what the guest's fault tests measured, as JSON and markdown.

A fault test records its figures with ``record_property("fault_report", {...})``: the fault
injected, the operations run under it, what was replayed or measured, what ``check`` found and
what opening the root repaired, and the data lost. pytest carries user properties in the test
reports the guest sends back, so on the host ``tests/guest/conftest.py`` collects them and,
with ``IMAGED_FAULT_REPORT=DIR/NAME`` in the environment, writes ``DIR/NAME.json`` and
``DIR/NAME.md`` at the end of the session:

    IMAGED_FAULT_REPORT=docs/bench/guest/faults .venv/bin/pytest -m guest \\
        tests/guest/test_powercut.py tests/guest/test_slowdisk.py

Only the rendering lives here, pure, so its unit test needs no guest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ENV = "IMAGED_FAULT_REPORT"
PROPERTY = "fault_report"


def entry(nodeid: str, outcome: str, figures: dict[str, Any]) -> dict[str, Any]:
    return {"test": nodeid, "outcome": outcome, **figures}


def markdown(entries: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    """One section per test, a row per figure; nested figures as compact JSON."""
    lines = ["# Faults under the store (issue 17)", "",
             "Made by `IMAGED_FAULT_REPORT=<path> .venv/bin/pytest -m guest <tests>` "
             "(tests/guest/faultreport.py); " + ", ".join(f"{key} {value}" for key, value
                                                          in facts.items()) + ".", ""]
    for item in entries:
        lines += [f"## {item['test']}", "", "| figure | value |", "|---|---|"]
        for key, value in item.items():
            if key == "test":
                continue
            shown = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"| {key} | {shown.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def write(stem: Path, entries: list[dict[str, Any]], facts: dict[str, Any]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": facts, "tests": entries}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(entries, facts))
