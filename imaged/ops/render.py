"""What a verb's result looks like to a person (``--json`` prints the result itself).

Pure functions of the results' JSON, so a result shows the same whether this process computed it
or the daemon sent it.
"""

from __future__ import annotations

import time
from typing import Any

from imaged.sizes import format_size


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def nothing(result: Any) -> None:
    """Commands without output print nothing for people; ``--json`` shows their result."""


def pulled(result: dict[str, Any]) -> str:
    return str(result["id"])


def mounted(result: dict[str, Any]) -> str:
    return str(result["path"])


def images(result: list[dict[str, Any]]) -> str:
    rows = []
    for image in result:
        for ref in image["refs"] or ["<none>"]:
            rows.append([ref, image["id"].split(":", 1)[1][:12],
                         image["config_digest"].split(":", 1)[1][:12],
                         format_size(image["size"]), str(image["layers"])])
    return table(rows, ["REF", "ID", "CONFIG", "SIZE", "LAYERS"])


def info(result: dict[str, Any]) -> str:
    fs = result["backing_filesystem"]
    lines = [
        f"version:   {result['version']}",
        f"root:      {result['root']}",
        f"backing:   {fs['type']} (mounted at {fs['mount_point']})",
        f"driver:    {result['driver'] or '(none yet: chosen at first use)'}",
        f"platform:  {result['platform']} (kernel {result['kernel']})",
        f"content:   {result['content']['blobs']} blobs, "
        f"{format_size(result['content']['bytes'])}",
        f"images:    {result['images']}",
        f"drivers:   probed {max(0.0, time.time() - result['drivers_probed_at']):.1f} s ago",
    ]
    for d in result["drivers"]:
        chosen = " (in use)" if d["name"] == result["driver"] else ""
        lines.append(f"  {d['name']:<10} {'yes' if d['supported'] else 'no ':<4} "
                     f"{d['reason']}{chosen}")
    return "\n".join(lines)


def containers(result: list[dict[str, Any]]) -> str:
    rows = [[c["name"], (c["image_refs"] or [c["image"]])[0], c["driver"], _mounted_at(c),
             format_size(c["quota"]) if c["quota"] else "-", c["quota_mode"] or "-",
             _used(c), _inodes(c)] for c in result]
    return table(rows, ["NAME", "IMAGE", "DRIVER", "MOUNTED AT", "QUOTA", "QUOTA MODE", "USED",
                        "INODES"])


def _used(container: dict[str, Any]) -> str:
    """The bytes, and how many files are only partly copied up (``update --materialize``
    completes them), where there are any."""
    used = format_size(container["used_bytes"])
    partials = container["partial_files"]
    return f"{used} ({partials} partial)" if partials else used


def _mounted_at(container: dict[str, Any]) -> str:
    """The path, marked where nothing serves the mount any more (``imaged mount`` revives it)."""
    path: str | None = container["path"]
    if path is None:
        return "-"
    return path + (" (broken)" if container["state"] == "broken" else "")


def _inodes(container: dict[str, Any]) -> str:
    """"used/total" where the container has inodes of its own to run out of, "used" where
    only the count is known, "-" where the driver cannot count them."""
    used, total = container["used_inodes"], container["inodes"]
    if used is None:
        return "-"
    return f"{used}/{total}" if total is not None else str(used)


def freed(result: dict[str, Any]) -> str:
    return str(result["freed_bytes"])


def not_removed(result: dict[str, Any]) -> list[str]:
    """gc's warnings: what failed, and removed containers still held (a later gc finishes
    those)."""
    return [f"not removed: {line}" for line in result.get("failed", [])] + \
        [f"removed container still held: {line}" for line in result.get("pending", [])]


def findings(result: dict[str, Any]) -> str:
    """One line per finding (kind first, for grep), then what opening the root repaired."""
    lines = [f"{found['kind']}: {found['message']}" for found in result["findings"]]
    lines += [f"recovered at open: {line}" for line in result["recovered"]]
    return "\n".join(lines) if lines else "no findings"


def advice(result: dict[str, Any]) -> str:
    """Per file: path, size and why, each configuration's predicted first write, the advice;
    then the configurations the model cannot price, and where its numbers came from."""
    model = result["model"]
    lines = [f"image {result['image']}: driver {result['driver']} on {result['filesystem']}; "
             f"costs {model['source']} ({model['from']})"]
    if not result["files"]:
        lines.append("no large files that containers are likely to write")
    for file in result["files"]:
        lines += ["", f"{file['path']}  {format_size(file['size'])}  {file['reason']}"]
        for cost in file["costs"]:
            here = "  (this root)" if cost["config"] == file["configuration"] else ""
            mark = ", extrapolated" if cost["extrapolated"] else ""
            lines.append(f"  {cost['config']} on {cost['filesystem']}: "
                         f"{cost['seconds'] * 1000:.1f} ms ({cost['source']}{mark}){here}")
        lines.append(f"  advice: {file['advice']}")
    if result["not_measured"]:
        lines += ["", "not priced:"]
        lines += [f"  {row['config']} on {row['filesystem']}: {row['why']}"
                  for row in result["not_measured"]]
    return "\n".join(lines)
