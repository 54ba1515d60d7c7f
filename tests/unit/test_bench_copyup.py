"""Which configurations ``imaged bench copyup`` can run here, from what the fuse server says it
accepts: the partial row must light up by itself once the server has ``--copy-up``, and say why
it is missing until then, while the full row runs either way."""

from __future__ import annotations

from imaged.bench.copyup import CONFIGURATIONS, _arguments

_OLD_HELP = "usage: python -m imaged.fuse.serve [-h] --upper UPPER --work WORK [--quota QUOTA]"
_NEW_HELP = _OLD_HELP + " [--copy-up {auto,full,partial}]"
_BY_NAME = {c.name: c for c in CONFIGURATIONS}


def test_partial_is_an_honest_row_until_the_server_has_the_option() -> None:
    options, why = _arguments(_BY_NAME["fuse partial"], _OLD_HELP)
    assert options is None
    assert why == "this server has no --copy-up option"


def test_full_runs_without_the_option_on_a_server_that_only_copies_whole_files() -> None:
    options, why = _arguments(_BY_NAME["fuse full"], _OLD_HELP)
    assert options == ()
    assert "no --copy-up option" in why


def test_both_pass_their_mode_once_the_server_has_it() -> None:
    assert _arguments(_BY_NAME["fuse partial"], _NEW_HELP) == (("--copy-up", "partial"), "")
    assert _arguments(_BY_NAME["fuse full"], _NEW_HELP) == (("--copy-up", "full"), "")
