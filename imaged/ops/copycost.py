"""The copy-up cost model ``imaged advise`` predicts from: first-write seconds against file
size per configuration and backing filesystem. Pure: documents in, predictions out.

A model comes from one of three places, and says which (``source``):
- ``imaged bench copyup`` measures it and keeps it in ``ROOT/bench/copyup.json`` (this
  module's format, versioned, so an advisor never reads numbers it would misunderstand);
- a bench report (``docs/bench/copyup.json``, given with ``--report``), projected here onto
  the same rows: the model is what the report already holds, so the two cannot disagree;
- a calibration of this root's copy throughput when there is neither (``calibrated``), which
  can only speak for whole-file copy-up and says so for everything else.

Between measured sizes the cost is interpolated on log-log axes: whole-file copy-up is close to
a straight line there (cost roughly proportional to size), partial copy-up and a volume are
flat, and both are straight lines on log-log. Outside the measured sizes the nearest two
points are extended linearly, and the prediction is marked as extrapolated.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from imaged.errors import InvalidError

FORMAT = "imaged copyup model"
VERSION = 1
TEMPERATURE = "cold"  # a container's first write meets a file nobody has read since boot
CALIBRATION_SIZES = (1 << 20, 16 << 20, 256 << 20, 1 << 30)
# Configurations that copy the whole file on the first write, which is all a measured copy
# throughput can speak for.
WHOLE_FILE = ("overlay", "fuse full")

Source = Literal["measured", "calibrated"]

_REPORT_TITLE = re.compile(r"Copy-up and container I/O on (?P<fs>.+)$")
# A report names its rows "CONFIG on FS: first overwrite 16M cold" since it measures more
# than one filesystem, and "CONFIG: first write 16M cold" (its title naming the filesystem)
# before: both are read.
_FIRST_WRITE = re.compile(r"(?P<config>.+?)(?: on (?P<fs>[\w-]+))?: first (?:write|overwrite) "
                          r"(?P<size>\d+)(?P<unit>[MG]) (?P<temperature>cold|warm)$")
_NOT_MEASURED = re.compile(r"(?P<config>[^:]+?)(?: on (?P<fs>[\w-]+))?: "
                           r"(?P<why>not measured: .+|failed in run .+)$")


class ModelError(InvalidError):
    """A model or report that cannot be used: unreadable, of another version, or empty."""


@dataclass(frozen=True)
class Row:
    """The first-write cost of one configuration on one filesystem for one file size."""

    config: str
    filesystem: str
    size: int
    temperature: str
    median: float  # seconds
    low: float
    high: float
    runs: int


@dataclass(frozen=True)
class Absent:
    """A configuration the model has no numbers for, and why: a row that says so."""

    config: str
    filesystem: str
    why: str


@dataclass(frozen=True)
class Prediction:
    config: str
    filesystem: str
    seconds: float
    source: Source
    extrapolated: bool

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "filesystem": self.filesystem, "seconds": self.seconds,
                "source": self.source, "extrapolated": self.extrapolated}


@dataclass(frozen=True)
class Model:
    source: Source
    rows: tuple[Row, ...]
    absent: tuple[Absent, ...] = ()
    environment: Mapping[str, Any] | None = None
    imaged: str = ""

    def configurations(self) -> list[tuple[str, str]]:
        """(config, filesystem) pairs with numbers, in the order the rows name them."""
        return list(dict.fromkeys((r.config, r.filesystem) for r in self.rows))

    def predict(self, config: str, filesystem: str, size: int) -> Prediction | None:
        """The first-write cost of a file of ``size`` bytes, or None without rows for it."""
        points = sorted((r.size, r.median) for r in self.rows
                        if (r.config, r.filesystem) == (config, filesystem)
                        and r.temperature == TEMPERATURE)
        if not points:
            return None
        seconds, extrapolated = interpolate(points, size)
        return Prediction(config, filesystem, seconds, self.source, extrapolated)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "imaged": self.imaged, "source": self.source,
            "environment": dict(self.environment or {}),
            "rows": [{"config": r.config, "filesystem": r.filesystem, "size": r.size,
                      "temperature": r.temperature,
                      "first_write_seconds": {"median": r.median, "min": r.low, "max": r.high,
                                              "runs": r.runs}} for r in self.rows],
            "not_measured": [{"config": a.config, "filesystem": a.filesystem, "why": a.why}
                             for a in self.absent],
        }


def interpolate(points: Sequence[tuple[int, float]], size: int) -> tuple[float, bool]:
    """Seconds at ``size`` from (size, seconds) points sorted by size, and whether ``size``
    lies outside them. Log-log between points; linear beyond them, never below what the
    nearest point scaled down in proportion would give (a line through two noisy small
    points can reach zero, and a zero here would read as "free")."""
    measured = dict(points)
    if size in measured:  # a measured size: its median, not a round trip through logs
        return measured[size], False
    if len(points) == 1:
        (x0, y0), = points
        return y0 * size / x0, size != x0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= size <= x1 and x0 < x1:
            if y0 <= 0 or y1 <= 0:  # log of nothing: fall back to a straight line
                return y0 + (y1 - y0) * (size - x0) / (x1 - x0), False
            t = (math.log(size) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0))), False
    (x0, y0), (x1, y1) = (points[0], points[1]) if size < points[0][0] else points[-2:]
    near_x, near_y = (x0, y0) if size < points[0][0] else (x1, y1)
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
    line = near_y + slope * (size - near_x)
    return max(line, near_y * min(1.0, size / near_x)), True


def load(document: Any, where: str) -> Model:
    """A model from a model file or a ``bench copyup`` report; ``where`` names it in errors."""
    if not isinstance(document, dict):
        raise ModelError(f"{where} is not a copy-up model or report (not a JSON object)")
    if "version" in document or document.get("format") == FORMAT:
        return _from_model(document, where)
    title = document.get("title")
    if isinstance(title, str) and _REPORT_TITLE.match(title) and "series" in document:
        return from_report(document, where)
    raise ModelError(f"{where} is not a copy-up model or report (imaged bench copyup writes "
                     "them)")


def _from_model(document: dict[str, Any], where: str) -> Model:
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise ModelError(f"{where} is a model of format {document.get('format')!r} version "
                         f"{document.get('version')!r}; this imaged reads {FORMAT!r} version "
                         f"{VERSION} (run imaged bench copyup again)")
    try:
        rows = tuple(_model_row(r) for r in document["rows"])
        absent = tuple(Absent(str(a["config"]), str(a["filesystem"]), str(a["why"]))
                       for a in document.get("not_measured", []))
        source = document["source"]
        if source not in ("measured", "calibrated"):
            raise ValueError(f"source {source!r}")
        environment = document.get("environment") or {}
        if not isinstance(environment, dict):
            raise TypeError("environment is not an object")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where} is a damaged copy-up model ({type(exc).__name__}: "
                         f"{exc})") from None
    return _usable(Model(source, rows, absent, environment, str(document.get("imaged", ""))),
                   where)


def _model_row(row: Mapping[str, Any]) -> Row:
    cost = row["first_write_seconds"]
    return Row(str(row["config"]), str(row["filesystem"]), _positive_int(row["size"]),
               str(row["temperature"]), _seconds(cost["median"]), _seconds(cost["min"]),
               _seconds(cost["max"]), _positive_int(cost["runs"]))


def from_report(document: Mapping[str, Any], where: str) -> Model:
    """The model a ``bench copyup`` report holds: its cold and warm first-write medians (in
    milliseconds there) and the configurations it could not measure, with why."""
    title = _REPORT_TITLE.match(str(document.get("title", "")))
    if title is None:
        raise ModelError(f"{where} is not a copy-up report")
    filesystem = title["fs"]  # the one filesystem of a report from before the matrix
    rows = []
    try:
        for name, series in dict(document["series"]).items():
            found = _FIRST_WRITE.match(name)
            if found is None:
                continue
            scale = 1e-3 if series["unit"] == "milliseconds" else 1.0
            size = int(found["size"]) << (20 if found["unit"] == "M" else 30)
            rows.append(Row(found["config"], found["fs"] or filesystem, size,
                            found["temperature"],
                            _seconds(series["median"]) * scale, _seconds(series["min"]) * scale,
                            _seconds(series["max"]) * scale, len(series["samples"])))
        notes = [str(n) for n in document.get("notes", [])]
        facts = dict(document.get("facts", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where} is a damaged copy-up report ({type(exc).__name__}: "
                         f"{exc})") from None
    measured = {(r.config, r.filesystem) for r in rows}
    absent = {(m["config"], m["fs"] or filesystem): m["why"] for note in notes
              if (m := _NOT_MEASURED.match(note))
              and (m["config"], m["fs"] or filesystem) not in measured}
    return _usable(Model("measured", tuple(rows),
                         tuple(Absent(c, fs, why) for (c, fs), why in absent.items()),
                         facts, str(facts.get("imaged", ""))), where)


def _usable(model: Model, where: str) -> Model:
    if not any(r.temperature == TEMPERATURE for r in model.rows):
        raise ModelError(f"{where} has no {TEMPERATURE} first-write rows to predict from")
    return model


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
            or math.isinf(value):
        raise ValueError(f"{value!r} is not a duration")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{value!r} is not a positive integer")
    return value


def calibrated(throughput: float, filesystem: str, environment: Mapping[str, Any],
               imaged: str) -> Model:
    """The model a copy throughput (bytes per second on this root's filesystem) gives:
    whole-file copy-up costs size / throughput; nothing else can be read from it."""
    rows = tuple(Row(config, filesystem, size, TEMPERATURE, size / throughput,
                     size / throughput, size / throughput, 1)
                 for config in WHOLE_FILE for size in CALIBRATION_SIZES)
    why = ("not measured: a calibration times whole-file copies only; run imaged bench copyup "
           "for this")
    absent = (Absent("fuse partial", filesystem, why + " (partial copy-up does not grow with "
                     "the file)"),
              Absent("volume", filesystem, why + " (a volume's files are not copied up)"))
    return Model("calibrated", rows, absent, environment, imaged)
