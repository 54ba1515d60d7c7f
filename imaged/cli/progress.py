"""Progress of long work on stderr: live bars on a TTY, one plain line per step otherwise.

Plain lines are for logs and CI, so they are emitted only when a step changes (a layer starts,
is verified, the pull is done), never for byte counts.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO

from imaged.events import PullEvent
from imaged.sizes import format_size


def _short(digest: str | None) -> str:
    return (digest or "").split(":", 1)[-1][:12]


def ignored_xattrs(event: PullEvent) -> str:
    """The warning for xattrs the driver's filesystem could not store (Docker's "ignored
    xattrs in archive"): the layer is applied without them."""
    skipped = int(event.extra.get("xattrs_skipped", 0))
    if not skipped:
        return ""
    return (f"; warning: ignored {skipped} xattr{'s' if skipped > 1 else ''}: the storage "
            "driver's filesystem does not support them")


class PlainProgress:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._started: set[str] = set()

    def __call__(self, event: PullEvent) -> None:
        line = None
        if event.status == "resolving":
            line = f"resolving {event.extra.get('ref')}"
        elif event.status == "resolved":
            line = (f"image {_short(event.id)}: {event.extra.get('layers')} layers, "
                    f"config {_short(event.extra.get('config_digest'))}")
        elif event.status == "exists":
            line = f"layer {_short(event.layer)}: already present"
        elif event.status == "downloading" and event.layer not in self._started:
            self._started.add(event.layer or "")
            resumed = f", resuming at {format_size(event.current)}" if event.current else ""
            line = f"layer {_short(event.layer)}: downloading {format_size(event.total or 0)}" \
                   f"{resumed}"
        elif event.status == "waiting":
            line = f"layer {_short(event.layer)}: shared with another pull in progress"
        elif event.status == "verified":
            line = f"layer {_short(event.layer)}: verified"
        elif event.status == "unpacked":
            line = (f"layer {_short(event.layer)}: unpacked {event.extra.get('entries')} "
                    f"entries, {format_size(int(event.extra.get('bytes', 0)))}"
                    f"{ignored_xattrs(event)}")
        elif event.status == "done":
            line = f"pulled {event.id}"
        if line is not None:
            print(line, file=self.stream, flush=True)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class BarProgress:
    """rich bars, refreshed by our events only (no refresh thread of rich's own).

    rich is imported here, not at module level: it costs a tenth of a second at start-up and
    only a terminal needs it.
    """

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console  # noqa: PLC0415 - see the class docstring
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), console=Console(file=stream), auto_refresh=False,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __call__(self, event: PullEvent) -> None:
        if event.layer is not None:
            task = self._tasks.get(event.layer)
            if task is None:
                task = self.progress.add_task(_short(event.layer), total=event.total)
                self._tasks[event.layer] = task
            self.progress.update(task, completed=event.current or 0,
                                 description=f"{_short(event.layer)} {event.status}")
        if event.status == "unpacked" and ignored_xattrs(event):
            self.progress.console.print(f"layer {_short(event.layer)}{ignored_xattrs(event)}")
        elif event.status == "done":
            self.progress.console.print(f"pulled {event.id}")
        self.progress.refresh()

    def __enter__(self) -> BarProgress:
        self.progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.stop()


def progress_for(stream: TextIO = sys.stderr) -> PlainProgress | BarProgress:
    return BarProgress(stream) if stream.isatty() else PlainProgress(stream)
