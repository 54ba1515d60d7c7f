"""The faults report (issue 17): what the guest's fault tests measured, as JSON and markdown.

A fault test records its figures with ``record_property("fault_report", {...})``: the fault
injected, the operations run under it, what was replayed or measured, what ``check`` found and
what opening the root repaired, and the data lost. pytest carries user properties in the test
reports the guest sends back, so on the host ``tests/guest/conftest.py`` collects them and,
with ``IMAGED_FAULT_REPORT=DIR/NAME`` in the environment, writes ``DIR/NAME.json`` and
``DIR/NAME.md`` at the end of the session:

    IMAGED_FAULT_REPORT=docs/bench/guest/faults .venv/bin/pytest -m guest \\
        tests/guest/test_powercut.py tests/guest/test_slowdisk.py tests/guest/test_ioerrors.py

Only the rendering lives here, pure, so its unit test needs no guest: a figure per row, and a
figure that is a list of records (test_ioerrors.py's phases) as a table of its own below.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

ENV = "IMAGED_FAULT_REPORT"
PROPERTY = "fault_report"


def entry(nodeid: str, outcome: str, figures: dict[str, Any]) -> dict[str, Any]:
    return {"test": nodeid, "outcome": outcome, **figures}


def trim(line: str, root: str, width: int = 160) -> str:
    """A failure's line as the report shows it: without the ``imaged: error:`` prefix, the
    root (a temporary path that differs every run) as ROOT, digests cut to their first 12 hex
    digits, so the same failure reads the same every run; and at most ``width`` characters,
    the middle left out, since a line names its subject first and the errno last."""
    line = line.removeprefix("imaged: error: ").replace(root, "ROOT")
    line = re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1...", line)
    if len(line) <= width:
        return line
    head = (width - 5) // 2
    return f"{line[:head]} ... {line[len(line) - (width - 5 - head):]}"


def counted(lines: list[str]) -> dict[str, int]:
    """Each distinct line with how often it came, the most frequent first, ties as first seen."""
    return dict(sorted(collections.Counter(lines).items(), key=lambda item: -item[1]))


def short(args: tuple[str, ...]) -> str:
    """A command as the report names it: its verb and what it acts on, a container by its
    ``--name``, else its first argument that is not an option, a reference by its last path
    component (``pull 127.0.0.1:5000/ioerr/one:v1`` is ``pull one:v1``)."""
    if "--name" in args[:-1]:
        return f"{args[0]} {args[args.index('--name') + 1]}"
    subject = [arg.rsplit("/", 1)[-1] for arg in args[1:] if not arg.startswith("-")][:1]
    return " ".join([args[0], *subject])


def cell(value: Any) -> str:
    """A value as one table cell: text as it is, a list's items and a mapping's ``key (value)``
    pairs joined by "; ", an empty one as "none"; a bar would end the cell, so it is "/"."""
    if isinstance(value, dict):
        text = "; ".join(f"{key} ({cell(item)})" for key, item in value.items()) or "none"
    elif isinstance(value, list):
        text = "; ".join(cell(item) for item in value) or "none"
    else:
        text = str(value)
    return text.replace("|", "/")


def _records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def markdown(entries: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    """One section per test, a row per figure (nested figures as compact JSON), and after the
    rows a table per figure that is a list of records, a row each, a column per key."""
    lines = ["# Faults under the store (issue 17)", "",
             "Made by `IMAGED_FAULT_REPORT=<path> .venv/bin/pytest -m guest <tests>` "
             "(tests/guest/faultreport.py); " + ", ".join(f"{key} {value}" for key, value
                                                          in facts.items()) + ".", ""]
    for item in entries:
        lines += [f"## {item['test']}", "", "| figure | value |", "|---|---|"]
        for key, value in item.items():
            if key == "test" or _records(value):
                continue
            shown = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"| {key} | {shown.replace('|', '/')} |")
        lines.append("")
        for key, value in item.items():
            if key != "test" and _records(value):
                columns = list(dict.fromkeys(column for record in value for column in record))
                lines += [f"### {key}", "", "| # | " + " | ".join(columns) + " |",
                          "|---" * (len(columns) + 1) + "|"]
                lines += [f"| {number} | " + " | ".join(cell(record.get(column, ""))
                                                        for column in columns) + " |"
                          for number, record in enumerate(value, 1)]
                lines.append("")
    return "\n".join(lines)


def write(stem: Path, entries: list[dict[str, Any]], facts: dict[str, Any]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": facts, "tests": entries}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(entries, facts))
