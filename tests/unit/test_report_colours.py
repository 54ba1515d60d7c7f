"""A bench figure gives each configuration one colour in every panel."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from imaged.bench.report import BarPanel, Panel, Series, _colours

pytestmark = pytest.mark.unit


def _panel(title: str, labels: list[str]) -> Panel:
    return Panel(title, "size", "ms", {label: [(1.0, Series(label, "ms", [1.0]))]
                                      for label in labels})


def test_a_configuration_missing_from_one_panel_keeps_its_colour_in_the_others() -> None:
    panels: list[Panel | BarPanel] = [
        _panel("ext4", ["overlay", "fuse partial"]),
        _panel("btrfs", ["overlay", "btrfs", "fuse partial"]),
        BarPanel("bytes", "MiB", {"ext4": {"fuse partial": 1.0, "btrfs": 2.0}}),
    ]
    colours = _colours(plt, panels)
    assert set(colours) == {"overlay", "fuse partial", "btrfs"}
    assert len(set(colours.values())) == 3


def test_more_configurations_than_tab10_still_get_distinct_colours() -> None:
    labels = [f"config {n}" for n in range(20)]
    colours = _colours(plt, [_panel("ext4", labels)])
    assert len(set(colours.values())) == 20
