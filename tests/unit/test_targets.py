"""Which mount targets a non-root peer may name (imaged.host.targets.beneath) and
the config key that sets them, without a kernel."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from imaged.config import Config, parse_config
from imaged.errors import ForbiddenError, InvalidError
from imaged.host.targets import beneath

PREFIXES = (Path("/run/containers"), Path("/var/lib/ctr/rootfs"))


@pytest.mark.parametrize(("target", "prefix", "relative"), [
    ("/run/containers/c1/rootfs", "/run/containers", "c1/rootfs"),
    ("/var/lib/ctr/rootfs/x", "/var/lib/ctr/rootfs", "x"),
    ("/run/containers//c1/./rootfs/", "/run/containers", "c1/rootfs"),
])
def test_a_target_beneath_a_prefix_is_split_there(target: str, prefix: str,
                                                  relative: str) -> None:
    assert beneath(Path(target), PREFIXES) == (Path(prefix), PurePosixPath(relative))


@pytest.mark.parametrize("target", [
    "/etc", "/run/containers", "/run/containers-evil/x", "/var/lib/ctr", "/", "/run"])
def test_a_target_elsewhere_or_the_prefix_itself_is_forbidden(target: str) -> None:
    with pytest.raises(ForbiddenError, match=r"not beneath api\.mount_prefixes"):
        beneath(Path(target), PREFIXES)


def test_with_no_prefixes_every_target_is_forbidden() -> None:
    with pytest.raises(ForbiddenError, match="none configured"):
        beneath(Path("/run/containers/c1"), ())


@pytest.mark.parametrize(("target", "words"), [
    ("/run/containers/../../etc", "'..'"), ("run/containers/c1", "not an absolute")])
def test_dot_dot_and_relative_targets_are_invalid(target: str, words: str) -> None:
    with pytest.raises(InvalidError, match=words):
        beneath(Path(target), PREFIXES)


def test_mount_prefixes_config() -> None:
    config = parse_config({"api": {"mount_prefixes": ["/run/containers"]}}, Config())
    assert config.mount_prefixes == (Path("/run/containers"),)
    assert parse_config({}, Config()).mount_prefixes == ()


@pytest.mark.parametrize(("api", "words"), [
    ({"mount_prefixes": "/run"}, "list of directories"),
    ({"mount_prefixes": ["run/containers"]}, "absolute directory"),
    ({"mount_prefixes": ["/"]}, "other than /"),
    ({"mount_prefixes": ["/run/../etc"]}, "absolute directory"),
    ({"mount_prefix": ["/run"]}, "unknown key api.mount_prefix"),
])
def test_bad_mount_prefixes_are_refused(api: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidError, match=words):
        parse_config({"api": api}, Config())
