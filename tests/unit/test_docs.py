"""The README and docs/ link only to files of this repository, and every link resolves: a moved
module or report must take its links along (issue 13 moved most of imaged/)."""

from __future__ import annotations

import re
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
_LINK = re.compile(r"\]\(([^)\s#]*)(#[^)\s]*)?\)")


def _pages() -> list[Path]:
    return [CHECKOUT / "README.md", *sorted((CHECKOUT / "docs").rglob("*.md"))]


def test_every_link_resolves_inside_the_repository() -> None:
    bad = []
    for page in _pages():
        for match in _LINK.finditer(page.read_text()):
            link = match.group(1)
            if not link or link.startswith(("https://", "http://")):
                continue
            target = (page.parent / link).resolve()
            if not target.is_relative_to(CHECKOUT) or not target.exists():
                bad.append(f"{page.relative_to(CHECKOUT)}: {link}")
    assert bad == []


def test_code_paths_named_in_backquotes_exist() -> None:
    """`imaged/…/x.py`, `drivers/x.py` and the like, as the docs name modules (not the root's
    own `drivers/<name>/…` directories, which the docs also name)."""
    named = re.compile(r"`((?:imaged|drivers|registry_client|bench|tests)/[\w/.-]+\.(?:py|json)"
                       r"|scripts/[\w-]+)`")
    paths = [(page, path) for page in _pages() for path in named.findall(page.read_text())]
    assert len(paths) > 20  # the pattern still finds what the docs name
    missing = [f"{page.relative_to(CHECKOUT)}: {path}" for page, path in paths
               if not (CHECKOUT / path).exists()]
    assert missing == []
