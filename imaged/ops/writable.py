"""Which files of an image a container is likely to write, and that are large enough for the
first write to cost something: the rules as data, in one place, and the merge of layer
listings that decides which files an image shows at all. Pure.

A rule names files by a glob on the path inside the image (no leading slash), gives the
reason a person reads, the smallest size worth mentioning, and where a volume would go when
the data belongs outside the image (a database, a log), or None when it belongs to the image
and a volume would hide it (a package database, a cache the image ships). The first rule that
matches a file decides; a file no rule names is not listed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from imaged.layers.layerplan import Action
from imaged.layers.unpack import LayerEntry

MIB = 1 << 20
SMALL = 1 * MIB  # a file a rule recognises is worth listing from here
LARGE = 16 * MIB  # any file under a writable-looking directory, from here


@dataclass(frozen=True)
class Rule:
    pattern: str  # fnmatch glob on the path without its leading slash; ``*`` crosses ``/``
    reason: str
    min_size: int
    volume: str | None  # glob-free directory prefix depth: see ``volume_for``


# Directories whose next component names one program's data (``var/lib/postgresql``): a volume
# goes there. Directories that are data as a whole (``var/log``): a volume goes on them.
_PER_PROGRAM = ("var/lib", "var/cache", "var/spool", "home", "srv", "opt")
_WHOLE = ("var/log", "tmp", "var/tmp", "data", "root", "var/mail")

RULES: tuple[Rule, ...] = (
    Rule("var/lib/dpkg/*", "the dpkg package database (every apt install rewrites it)", SMALL,
         None),
    Rule("var/lib/rpm/*", "the rpm package database (every dnf or yum install rewrites it)",
         SMALL, None),
    Rule("lib/apk/db/*", "the apk package database (every apk add rewrites it)", SMALL, None),
    Rule("var/lib/apt/lists/*", "apt's package lists (apt update rewrites them)", SMALL, None),
    Rule("var/lib/postgresql/*", "PostgreSQL data", SMALL, "program"),
    Rule("var/lib/pgsql/*", "PostgreSQL data", SMALL, "program"),
    Rule("var/lib/mysql/*", "MySQL data", SMALL, "program"),
    Rule("var/lib/mongodb/*", "MongoDB data", SMALL, "program"),
    Rule("var/lib/redis/*", "Redis data", SMALL, "program"),
    Rule("*.ibd", "an InnoDB table", SMALL, "parent"),
    Rule("*/ibdata*", "the InnoDB system tablespace", SMALL, "parent"),
    Rule("*/ib_logfile*", "an InnoDB redo log", SMALL, "parent"),
    Rule("*.sqlite", "an SQLite database", SMALL, "parent"),
    Rule("*.sqlite3", "an SQLite database", SMALL, "parent"),
    Rule("*.db", "a database file", SMALL, "parent"),
    Rule("*.rdb", "a Redis snapshot", SMALL, "parent"),
    Rule("*.aof", "a Redis append-only file", SMALL, "parent"),
    Rule("var/log/*", "a log (appended to while the container runs)", SMALL, "whole"),
    Rule("*.log", "a log (appended to while the container runs)", SMALL, "parent"),
    Rule("var/cache/*", "a cache (rewritten as the program runs)", LARGE, None),
    *(Rule(f"{d}/*", f"a large file under /{d}, where programs keep data they write", LARGE,
           "program") for d in ("var/lib", "var/spool", "srv", "home", "opt")),
    *(Rule(f"{d}/*", f"a large file under /{d}, where programs keep data they write", LARGE,
           "whole") for d in ("tmp", "var/tmp", "data", "root", "var/mail")),
)


@dataclass(frozen=True)
class Candidate:
    path: str  # absolute, as a container sees it
    size: int
    reason: str
    volume: str | None  # where a volume would take the writes, or None: the file is the image's


def match(path: str, size: int, rules: Sequence[Rule] = RULES) -> Candidate | None:
    """The file as a candidate under the first rule that names it, or None."""
    for rule in rules:
        if fnmatch.fnmatchcase(path, rule.pattern):
            if size < rule.min_size:
                return None
            volume = None if rule.volume is None else volume_for(path, rule.volume)
            return Candidate("/" + path, size, rule.reason, volume)
    return None


def volume_for(path: str, how: str) -> str:
    """Where a volume holding ``path`` would be mounted: the program's directory under a
    per-program parent (/var/lib/postgresql), a whole data directory (/var/log), or else the
    file's own directory."""
    parts = path.split("/")
    if how in ("program", "whole"):
        for prefixes, extra in ((_PER_PROGRAM, 1), (_WHOLE, 0)):
            for prefix in prefixes:
                depth = prefix.count("/") + 1
                if "/".join(parts[:depth]) == prefix and len(parts) > depth + extra:
                    return "/" + "/".join(parts[:depth + extra])
    return "/" + "/".join(parts[:-1])


def image_files(layers: Iterable[Sequence[LayerEntry]]) -> dict[str, int]:
    """The regular files an image shows (path without a leading slash → size), from its
    layers' listings base first: a later layer's whiteout hides the path and everything under
    it, an opaque marker hides what lower layers had under its directory, and a later entry of
    another type replaces a file."""
    files: dict[str, int] = {}
    for listing in layers:
        hidden = {_text(e.path) for e in listing if e.action is Action.WHITEOUT}
        emptied = {_text(e.path) for e in listing if e.action is Action.OPAQUE}
        if hidden or emptied:
            files = {path: size for path, size in files.items()
                     if not _under(path, hidden, emptied)}
        for entry in listing:
            if entry.action is not Action.CREATE:
                continue
            path = _text(entry.path)
            if entry.regular:
                files[path] = entry.size
            else:
                files.pop(path, None)
    return files


def _under(path: str, hidden: set[str], emptied: set[str]) -> bool:
    if path in hidden:
        return True
    parts = path.split("/")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = "/".join(parts[:depth])
        if ancestor in hidden or ancestor in emptied:
            return True
    return False


def _text(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def candidates(files: Mapping[str, int], rules: Sequence[Rule] = RULES) -> list[Candidate]:
    """The files worth advising on, largest first."""
    found = [c for path, size in files.items() if (c := match(path, size, rules)) is not None]
    return sorted(found, key=lambda c: (-c.size, c.path))
