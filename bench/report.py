"""Bench results: medians with min/max, ratios measured in the same run, JSON + markdown + PNG.

The machine is noisy, so a report never stands on one sample and never compares numbers taken
in different runs: every comparison is a ratio of medians from interleaved samples.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Series:
    """Samples of one measured thing (seconds, bytes, …)."""

    name: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        """The 99th percentile, nearest rank: with fewer than 100 samples, the largest."""
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    def summary(self) -> dict[str, Any]:
        return {"unit": self.unit, "median": self.median, "p99": self.p99,
                "min": min(self.samples), "max": max(self.samples), "samples": self.samples}


def machine_facts() -> dict[str, Any]:
    def read(cmd: Sequence[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  timeout=10).stdout.strip()
        except OSError:
            return ""

    checkout = Path(__file__).resolve().parent.parent
    commit = read(["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"])
    dirty = read(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"])
    return {
        "commit": (commit + (" with uncommitted changes" if dirty else "")) or "unknown",
        "kernel": read(["uname", "-r"]),
        "cpus": read(["nproc"]),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


@dataclass
class Panel:
    """A plot of medians (with min/max bars) against a measured-at value, one line per label:
    what a bench shows when its question is how a cost grows (latency against file size), not
    how tools rank on one case."""

    title: str
    xlabel: str
    ylabel: str
    lines: dict[str, list[tuple[float, Series]]]
    log: bool = True


@dataclass
class BarPanel:
    """Grouped bars: one group per label, one bar per key inside it (a value per
    configuration and filesystem, say), on a linear axis."""

    title: str
    ylabel: str
    groups: dict[str, dict[str, float]]


def write_report(out: Path, name: str, title: str, series: list[Series],
                 facts: dict[str, Any], ratios: dict[str, float], notes: list[str],
                 panels: Sequence[Panel | BarPanel] = (), summary: Sequence[str] = (),
                 data: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png``: the PNG draws ``panels`` when
    given, else medians with min/max bars; ``summary`` is markdown put before the full table;
    ``data`` adds keys of the bench's own to the JSON."""
    # matplotlib takes half a second to import: only a bench that writes a report pays it.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out / f"{name}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps({
        "title": title, "facts": facts, "ratios": ratios, "notes": notes,
        "series": {s.name: s.summary() for s in series}, **(data or {}),
    }, indent=2))

    if panels:
        _draw_panels(plt, panels, title, png_path)
    else:
        _draw_bars(plt, series, title, png_path)

    lines = [f"# {title}", "", f"![{title}]({png_path.name})", "", *summary]
    if summary:
        lines.append("")
    lines += ["| measure | median | p99 | min | max | unit | runs |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for s in series:
        lines.append(f"| {cell(s.name)} | {s.median:.3f} | {s.p99:.3f} | {min(s.samples):.3f} | "
                     f"{max(s.samples):.3f} | {s.unit} | {len(s.samples)} |")
    if ratios:
        lines += ["", "| ratio (same run, medians) | value |", "|---|---:|"]
        lines += [f"| {cell(k)} | {v:.2f} |" for k, v in ratios.items()]
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items())]
    lines += [f"- {note}" for note in notes]
    md_path.write_text("\n".join(lines) + "\n")
    return [json_path, md_path, png_path]


def cell(text: str) -> str:
    """``text`` for a markdown table cell: a measure named after a pipeline (``find | xargs
    stat``) must not end the cell."""
    return text.replace("|", "\\|")


def _draw_bars(plt: Any, series: list[Series], title: str, png_path: Path) -> None:
    # One panel per unit: milliseconds, cycles/s and megabytes on one axis would hide all but
    # the largest.
    units = list(dict.fromkeys(s.unit for s in series))
    heights = [0.45 * sum(s.unit == unit for s in series) + 0.9 for unit in units]
    fig, axes = plt.subplots(len(units) or 1, 1, figsize=(7, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights or [1]}, squeeze=False)
    for ax, unit in zip(axes[:, 0], units or [""], strict=True):
        shown = [s for s in series if s.unit == unit]
        medians = [s.median for s in shown]
        lows = [s.median - min(s.samples) for s in shown]
        highs = [max(s.samples) - s.median for s in shown]
        ax.barh([s.name for s in shown], medians, xerr=[lows, highs], capsize=4,
                color="#4c72b0")
        ax.set_xlabel(unit)
        ax.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _draw_panels(plt: Any, panels: Sequence[Panel | BarPanel], title: str,
                 png_path: Path) -> None:
    from matplotlib import ticker  # noqa: PLC0415 - with pyplot, only when a report is drawn

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.6 * rows),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    colours = _colours(plt, panels)
    for ax, panel in zip(axes.flat, panels, strict=False):
        if isinstance(panel, BarPanel):
            _draw_groups(ax, panel, colours)
            continue
        for label, points in panel.lines.items():
            ordered = sorted(points, key=lambda p: p[0])
            medians = [s.median for _, s in ordered]
            lows = [s.median - min(s.samples) for _, s in ordered]
            highs = [max(s.samples) - s.median for _, s in ordered]
            ax.errorbar([x for x, _ in ordered], medians, yerr=[lows, highs], marker="o",
                        capsize=3, label=label, color=colours[label])
        if panel.log:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            # Plain numbers (1, 16, 1024), not powers: a reader compares sizes, not exponents.
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if panel.lines:  # a filesystem where nothing could be measured has an empty panel
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _colours(plt: Any, panels: Sequence[Panel | BarPanel]) -> dict[str, Any]:
    """One colour per name across the whole figure.

    matplotlib's colour cycle restarts in every panel, so a configuration missing from
    one filesystem's panel would shift every later line to another configuration's
    colour, and a reader comparing panels would compare the wrong lines.
    """
    names: dict[str, None] = {}
    for panel in panels:
        groups = panel.groups.values() if isinstance(panel, BarPanel) else [panel.lines]
        for values in groups:
            names.update(dict.fromkeys(values))
    if len(names) <= 10:
        tab10 = plt.get_cmap("tab10")
        return {name: tab10(n) for n, name in enumerate(names)}
    # tab20 pairs a dark and a light shade; take every dark one before any light one.
    tab20 = plt.get_cmap("tab20")
    return {name: tab20((2 * n + n // 10) % 20) for n, name in enumerate(names)}


def _draw_groups(ax: Any, panel: BarPanel, colours: dict[str, Any]) -> None:
    keys = list(dict.fromkeys(k for values in panel.groups.values() for k in values))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        xs = [n + i * width for n, values in enumerate(panel.groups.values()) if key in values]
        ax.bar(xs, [values[key] for values in panel.groups.values() if key in values], width,
               label=key, color=colours[key])
    ax.set_xticks([n + width * (len(keys) - 1) / 2 for n in range(len(panel.groups))])
    ax.set_xticklabels(list(panel.groups), rotation=40, ha="right", fontsize=8)
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if keys:
        ax.legend(fontsize=8)
