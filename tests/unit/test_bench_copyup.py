"""Which configurations ``imaged bench copyup`` can run here, from what the fuse server says it
accepts: the partial row must light up by itself once the server has ``--copy-up``, and say why
it is missing until then, while the full row runs either way."""

from __future__ import annotations

from pathlib import Path

import pytest

from imaged.bench.copyup import (
    CONFIGURATIONS,
    OPERATIONS,
    _arguments,
    _io_table,
    _selected,
    _Table,
    _unfit,
    overlay_refusal,
    plan,
    report_name,
)
from imaged.errors import InvalidError

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


MIB = 1 << 20


def test_the_matrix_runs_every_operation_at_the_ends_and_the_overwrite_at_every_size() -> None:
    full = plan([MIB, 16 * MIB, 256 * MIB, 1024 * MIB], quick=False, metadata=False)
    assert full.operations == {MIB: OPERATIONS, 16 * MIB: ("overwrite",),
                               256 * MIB: ("overwrite",), 1024 * MIB: OPERATIONS}
    assert full.temperatures == ("cold", "warm") and full.io and full.first_writes
    quick = plan([MIB, 16 * MIB], quick=True, metadata=False)
    assert not quick.io and quick.operations == {MIB: OPERATIONS, 16 * MIB: OPERATIONS}
    metadata = plan([], quick=False, metadata=True)
    assert metadata.io and not metadata.first_writes and not metadata.operations


def test_a_configuration_that_cannot_run_on_a_filesystem_says_why(tmp_path: Path) -> None:
    assert _unfit(_BY_NAME["btrfs"], "xfs", tmp_path) == "btrfs runs on btrfs only"
    assert _unfit(_BY_NAME["btrfs"], "btrfs", tmp_path) == ""
    assert _unfit(_BY_NAME["overlay"], "ext4", tmp_path) == ""
    assert _unfit(_BY_NAME["zfs"], "btrfs", tmp_path) == "zfs runs on zfs-fuse only"
    assert _unfit(_BY_NAME["zfs"], "zfs-fuse", tmp_path) == ""


def test_why_overlay_refused_an_upper_is_what_the_kernel_said_without_its_fallbacks() -> None:
    """The lines dmesg printed when kernel overlay refused a zfs-fuse upper (Linux 6.18),
    among a line of another subsystem."""
    lines = ["[22265.846200] loop1: detected capacity change from 0 to 4194304",
             "[22265.846221] overlayfs: upper fs does not support RENAME_WHITEOUT.",
             "[22265.846237] overlayfs: failed to set xattr on upper",
             "[22265.846239] overlayfs: ...falling back to redirect_dir=nofollow.",
             "[22265.846242] overlayfs: upper fs missing required features."]
    assert overlay_refusal(lines) == ("upper fs does not support RENAME_WHITEOUT.; failed to "
                                      "set xattr on upper; upper fs missing required features.")
    assert overlay_refusal(lines[:1]) == ""


def test_a_run_on_zfs_fuse_alone_is_a_report_of_its_own() -> None:
    assert report_name(["zfs-fuse"]) == "copyup-zfs"
    assert report_name(["ext4", "zfs-fuse"]) == "copyup"
    assert report_name(["ext4", "xfs", "btrfs"]) == "copyup"


def test_a_run_on_a_thin_pool_is_a_report_of_its_own() -> None:
    """Device-mapper runs in the guest kernel here: its numbers never replace the host's."""
    assert report_name(["thin-ext4"]) == "copyup-devmapper"
    assert report_name(["thin-ext4", "thin-xfs"]) == "copyup-devmapper"
    assert report_name(["ext4", "thin-ext4"]) == "copyup-devmapper"


def test_an_unknown_configuration_is_one_line() -> None:
    assert [c.name for c in _selected(["volume", "fuse partial"])] == ["volume", "fuse partial"]
    with pytest.raises(InvalidError, match="no configuration 'aufs' \\(there are overlay, "):
        _selected(["aufs"])


def test_the_container_io_table_names_each_row_and_its_multiple_of_the_peer() -> None:
    """The read, untar and find rows: a pipe in a measure's name must not split the cell,
    imaged's rows carry their multiple of fuse-overlayfs's median, and a configuration that
    did not run keeps its row with why."""
    table = _Table()
    for config, seconds in (("fuse full", 3.0), ("fuse-overlayfs", 1.0)):
        for measure in ("untar 10 files + syncfs", "find | xargs stat cold",
                        "find | xargs stat warm"):
            table.add(config, "ext4", measure, "seconds", seconds)
    lines = _io_table(table, "ext4", [_BY_NAME["fuse full"], _BY_NAME["fuse-overlayfs"]],
                      [("btrfs", "not measured: btrfs runs on btrfs only")], [], 10)
    assert "| configuration | untar 10 files + syncfs | find \\| xargs stat cold | " \
        "find \\| xargs stat warm |" in lines
    assert "| fuse full | 3.00 (3.0x) | 3.00 (3.0x) | 3.00 (3.0x) |" in lines
    assert "| fuse-overlayfs | 1.00 | 1.00 | 1.00 |" in lines
    assert "| btrfs | not measured: btrfs runs on btrfs only | | |" in lines
