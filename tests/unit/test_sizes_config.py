"""Human sizes both ways, and configuration: strict TOML, then environment, then options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imaged import config as config_module
from imaged.config import (
    DEFAULT_CERTS_DIRS,
    DEFAULT_ROOT,
    DEFAULT_SOCKET,
    Config,
    Limits,
    Overrides,
    RegistryConfig,
    load_config,
    parse_config,
)
from imaged.errors import ConfigError, InvalidError
from imaged.sizes import format_size, parse_size

K, M, G, T = 1024, 1024**2, 1024**3, 1024**4

# -- parse_size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("100B", 100),
        ("100b", 100),
        ("1k", K),
        ("1K", K),
        ("1kb", K),
        ("1KB", K),
        ("1KiB", K),
        ("1kib", K),
        ("1Ki", None),
        ("512k", 512 * K),
        ("10M", 10 * M),
        ("10m", 10 * M),
        ("10MiB", 10 * M),
        ("10MB", 10 * M),
        ("10G", 10 * G),
        ("10g", 10 * G),
        ("10GiB", 10 * G),
        ("2T", 2 * T),
        ("2tib", 2 * T),
        ("1.5G", 3 * G // 2),
        ("1.5MiB", 3 * M // 2),
        ("0.5k", 512),
        ("0.25K", 256),
        ("2.0", 2),
        ("1.00000G", G),
        (" 10M ", 10 * M),
        ("10 M", 10 * M),
        ("10 MiB", 10 * M),
        ("007k", 7 * K),
        (0, 0),
        (123, 123),
        (10 * G, 10 * G),
    ],
)
def test_parse_size(text: str | int, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(InvalidError):
            parse_size(text)
    else:
        assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ["invalid size ''", "k, M, G or T"]),
        ("   ", ["invalid size"]),
        ("abc", ["invalid size 'abc'"]),
        ("-1", ["invalid size"]),
        ("-1G", ["invalid size"]),
        ("1P", ["invalid size '1P'"]),
        ("1E", ["invalid size"]),
        ("1KK", ["invalid size"]),
        ("1e3", ["invalid size"]),
        ("1,5G", ["invalid size"]),
        ("1.G", ["invalid size"]),
        (".5G", ["invalid size"]),
        ("1.5.5G", ["invalid size"]),
        ("G", ["invalid size"]),
        ("1 G B", ["invalid size"]),
        ("1Gb/s", ["invalid size"]),
        ("1iB", ["'iB' needs a unit before it"]),
        ("1ib", ["'iB' needs a unit"]),
        ("1.5", ["not a whole number of bytes"]),
        ("0.3k", ["not a whole number of bytes"]),
        ("1.0000001G", ["not a whole number of bytes"]),
        ("0.5B", ["not a whole number"]),
        ("\uff11\uff10G", ["invalid size"]),  # full-width digits
        ("\u0661G", ["invalid size"]),
        (-1, ["must not be negative: -1"]),
        (True, ["string or an integer, not bool"]),
        (False, ["not bool"]),
        (1.5, ["not float"]),
        (None, ["not NoneType"]),
        ([1], ["not list"]),
    ],
)
def test_parse_size_refuses(text: Any, words: list[str]) -> None:
    with pytest.raises(InvalidError) as info:
        parse_size(text)
    for word in words:
        assert word in info.value.message, info.value.message


# -- format_size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (10 * K, "10 KiB"),
        (int(12.34 * K), "12.3 KiB"),
        (99 * K, "99 KiB"),
        (100 * K, "100 KiB"),
        (512 * K, "512 KiB"),
        (1023 * K, "1023 KiB"),
        (M, "1 MiB"),
        (int(2.5 * M), "2.5 MiB"),
        (700 * M, "700 MiB"),
        (G, "1 GiB"),
        (3 * G // 2, "1.5 GiB"),
        (250 * G, "250 GiB"),
        (T, "1 TiB"),
        (int(1.25 * T), "1.25 TiB"),
        (200 * T, "200 TiB"),
        # Beyond 1000 TiB the same readable form as the smaller units, not 1.02e+03.
        (1024 * T, "1024 TiB"),
        (4000 * T, "4000 TiB"),
    ],
)
def test_format_size(n: int, shown: str) -> None:
    assert format_size(n) == shown


@pytest.mark.parametrize("n", [K, 1536, 10 * M, 3 * G // 2, 2 * T, 7 * K + 512])
def test_format_then_parse_round_trips_simple_sizes(n: int) -> None:
    number, unit = format_size(n).split(" ")
    assert parse_size(number + unit) == n


# -- parse_config -------------------------------------------------------------------------------


def test_empty_document_keeps_the_base() -> None:
    base = Config(root=Path("/srv/imaged"), driver="vfs", source=Path("/etc/x.toml"))
    assert parse_config({}, base) == base


def test_full_document() -> None:
    doc = {
        "root": "/srv/imaged",
        "socket": "/run/x.sock",
        "driver": "overlay",
        "certs_dirs": ["/etc/a", "/etc/b"],
        "limits": {"concurrent_downloads": 8, "max_manifest_bytes": "1M",
                   "max_layer_bytes": "2G", "max_layer_entries": 10},
        "registries": {
            "docker.io": {"mirrors": ["https://mirror.example.com/", "http://10.0.0.1:5000"]},
            "registry.local:5000": {"insecure": True},
            "secure.local": {"insecure": False, "mirrors": []},
        },
        "drivers": {
            "overlay": {"quota": "project", "metacopy": True, "volatile": False},
            "btrfs": {"quota": "simple"},
            "zfs": {"dataset": "tank/imaged"},
            "devmapper": {"pool": "imaged-pool", "data_size": "100G", "metadata_size": "2G",
                          "basesize": "10G", "fs": "xfs", "fill_threshold": 0.9},
            "aufs": {},
            "fuse": {"copy_up": "partial", "partial_threshold": "32M", "writeback": True},
            "vfs": {},
        },
    }
    config = parse_config(doc, Config(source=Path("/etc/imaged/imaged.toml")))
    assert config.root == Path("/srv/imaged")
    assert config.socket == Path("/run/x.sock")
    assert config.driver == "overlay"
    assert config.certs_dirs == (Path("/etc/a"), Path("/etc/b"))
    assert config.limits == Limits(8, M, 2 * G, 10)
    assert config.registries == {
        "docker.io": RegistryConfig(None, ("https://mirror.example.com",
                                           "http://10.0.0.1:5000")),
        "registry.local:5000": RegistryConfig(True, ()),
        "secure.local": RegistryConfig(False, ()),
    }
    assert config.registry("docker.io").mirrors == ("https://mirror.example.com",
                                                    "http://10.0.0.1:5000")
    assert config.registry("unknown.example.com") == RegistryConfig()
    assert config.drivers["overlay"] == {"quota": "project", "metacopy": True, "volatile": False}
    assert config.drivers["devmapper"] == {
        "pool": "imaged-pool", "data_size": 100 * G, "metadata_size": 2 * G,
        "basesize": 10 * G, "fs": "xfs", "fill_threshold": 0.9}
    assert config.drivers["zfs"] == {"dataset": "tank/imaged"}
    assert config.drivers["vfs"] == {}
    assert config.drivers["fuse"] == {"copy_up": "partial", "partial_threshold": 32 * M,
                                      "writeback": True}
    assert config.source == Path("/etc/imaged/imaged.toml")


def test_limits_merge_with_the_base() -> None:
    base = Config(limits=Limits(max_layer_entries=7))
    config = parse_config({"limits": {"concurrent_downloads": 5, "max_layer_bytes": 4096}}, base)
    assert config.limits == Limits(concurrent_downloads=5, max_layer_bytes=4096,
                                   max_layer_entries=7)


def test_drivers_and_registries_merge_with_the_base() -> None:
    base = Config(drivers={"overlay": {"quota": "auto"}, "zfs": {"dataset": "a/b"}},
                  registries={"a.example": RegistryConfig(True)})
    config = parse_config({"drivers": {"overlay": {"metacopy": True}},
                           "registries": {"b.example": {"insecure": False}}}, base)
    assert config.drivers == {"overlay": {"quota": "auto", "metacopy": True},
                              "zfs": {"dataset": "a/b"}}
    assert config.registries == {"a.example": RegistryConfig(True),
                                 "b.example": RegistryConfig(False)}
    assert base.drivers["overlay"] == {"quota": "auto"}  # the base is not modified


def test_defaults() -> None:
    config = Config()
    assert config.root == DEFAULT_ROOT
    assert config.socket == DEFAULT_SOCKET
    assert config.certs_dirs == DEFAULT_CERTS_DIRS
    assert config.driver is None
    assert config.limits == Limits(3, 4 * M, 64 * G, 1_000_000)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"rooot": "/x"}, ["unknown key rooot"]),
        ({"zeta": 1, "alpha": 2}, ["unknown key alpha, zeta"]),
        ({"limits": {"concurrent_download": 3}}, ["unknown key limits.concurrent_download"]),
        ({"drivers": {"ext4": {}}}, ["unknown key drivers.ext4"]),
        ({"drivers": {"overlay": {"quotas": "auto"}}}, ["unknown key drivers.overlay.quotas"]),
        ({"drivers": {"fuse": {"quota": "auto"}}}, ["unknown key drivers.fuse.quota"]),
        ({"drivers": {"btrfs": {"dataset": "x"}}}, ["unknown key drivers.btrfs.dataset"]),
        ({"registries": {"r.example": {"mirror": []}}},
         ['unknown key registries."r.example".mirror']),
        ({"root": 5}, ["root must be a non-empty string, not 5"]),
        ({"root": ""}, ["root must be a non-empty string"]),
        ({"socket": ["/x"]}, ["socket must be a non-empty string"]),
        ({"driver": "ext4"}, ["driver must be one of overlay, aufs, devmapper, btrfs, zfs, "
                              "fuse, vfs, not 'ext4'"]),
        ({"driver": 1}, ["driver must be one of"]),
        ({"limits": 5}, ["limits must be a table"]),
        ({"limits": {"concurrent_downloads": 0}}, ["limits.concurrent_downloads must be a "
                                                   "positive integer, not 0"]),
        ({"limits": {"concurrent_downloads": "3"}}, ["positive integer, not '3'"]),
        ({"limits": {"concurrent_downloads": True}}, ["positive integer, not True"]),
        ({"limits": {"concurrent_downloads": 2.0}}, ["positive integer"]),
        ({"limits": {"max_layer_entries": -5}}, ["limits.max_layer_entries must be a positive"]),
        ({"limits": {"max_manifest_bytes": "abc"}}, ["limits.max_manifest_bytes:",
                                                     "invalid size 'abc'"]),
        ({"limits": {"max_manifest_bytes": 0}}, ["limits.max_manifest_bytes must be positive"]),
        ({"limits": {"max_layer_bytes": "0G"}}, ["limits.max_layer_bytes must be positive"]),
        ({"limits": {"max_layer_bytes": 1.5}}, ["limits.max_layer_bytes:", "not float"]),
        ({"drivers": 1}, ["drivers must be a table"]),
        ({"drivers": {"overlay": "project"}}, ["drivers.overlay must be a table"]),
        ({"drivers": {"overlay": {"quota": "nope"}}},
         ["drivers.overlay.quota must be one of auto, project, loop, not 'nope'"]),
        ({"drivers": {"overlay": {"metacopy": "yes"}}},
         ["drivers.overlay.metacopy must be true or false, not 'yes'"]),
        ({"drivers": {"overlay": {"volatile": 1}}}, ["drivers.overlay.volatile must be true"]),
        ({"drivers": {"btrfs": {"quota": "project"}}}, ["drivers.btrfs.quota must be one of "
                                                        "qgroup, simple"]),
        ({"drivers": {"zfs": {"dataset": ""}}}, ["drivers.zfs.dataset must be a non-empty"]),
        ({"drivers": {"devmapper": {"fs": "btrfs"}}}, ["drivers.devmapper.fs must be one of "
                                                       "ext4, xfs"]),
        ({"drivers": {"devmapper": {"data_size": "lots"}}}, ["drivers.devmapper.data_size:"]),
        ({"drivers": {"devmapper": {"basesize": 0}}}, ["drivers.devmapper.basesize must be "
                                                       "positive"]),
        ({"drivers": {"devmapper": {"fill_threshold": 1.5}}},
         ["drivers.devmapper.fill_threshold must be a number in (0, 1], not 1.5"]),
        ({"drivers": {"devmapper": {"fill_threshold": 0}}}, ["fill_threshold must be a number"]),
        ({"drivers": {"devmapper": {"fill_threshold": True}}}, ["fill_threshold must be"]),
        ({"drivers": {"devmapper": {"fill_threshold": "0.5"}}}, ["fill_threshold must be"]),
        ({"drivers": {"fuse": {"copy_up": "lazy"}}},
         ["drivers.fuse.copy_up must be one of auto, full, partial, not 'lazy'"]),
        ({"drivers": {"fuse": {"partial_threshold": "big"}}},
         ["drivers.fuse.partial_threshold:", "invalid size 'big'"]),
        ({"drivers": {"fuse": {"partial_threshold": 0}}},
         ["drivers.fuse.partial_threshold must be positive"]),
        ({"drivers": {"fuse": {"writeback": "on"}}},
         ["drivers.fuse.writeback must be true or false, not 'on'"]),
        ({"registries": []}, ["registries must be a table"]),
        ({"registries": {"r.example": True}}, ['registries."r.example" must be a table']),
        ({"registries": {"r.example": {"insecure": "yes"}}},
         ['registries."r.example".insecure must be true or false']),
        ({"registries": {"r.example": {"mirrors": "https://m"}}},
         ['registries."r.example".mirrors must be a list of URLs']),
        ({"registries": {"r.example": {"mirrors": [1]}}}, ["mirrors must be a list of URLs"]),
        ({"registries": {"r.example": {"mirrors": ["ftp://m.example"]}}},
         ["mirrors: 'ftp://m.example' is not an http(s) URL"]),
        ({"registries": {"r.example": {"mirrors": ["m.example:5000"]}}},
         ["is not an http(s) URL"]),
        ({"certs_dirs": "/etc/docker/certs.d"}, ["certs_dirs must be a list of paths"]),
        ({"certs_dirs": [1]}, ["certs_dirs must be a list of paths"]),
    ],
)
def test_parse_config_refuses(doc: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(InvalidError) as info:
        parse_config(doc, Config())
    for word in words:
        assert word in info.value.message, info.value.message


# -- load_config --------------------------------------------------------------------------------


@pytest.fixture
def no_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default config path somewhere empty, so the host's /etc is never read."""
    path = tmp_path / "etc" / "imaged.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", path)
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "imaged.toml"
    path.write_text('root = "/file/root"\nsocket = "/file/sock"\ndriver = "btrfs"\n'
                    '[limits]\nconcurrent_downloads = 9\n')
    return path


@pytest.mark.usefixtures("no_default_file")
def test_missing_default_file_gives_defaults() -> None:
    config = load_config(Overrides(), {})
    assert config == Config(root=DEFAULT_ROOT, socket=DEFAULT_SOCKET)
    assert config.source is None


def test_default_file_is_read(no_default_file: Path) -> None:
    no_default_file.parent.mkdir()
    no_default_file.write_text('driver = "zfs"\n')
    config = load_config(Overrides(), {})
    assert config.driver == "zfs"
    assert config.source == no_default_file


@pytest.mark.usefixtures("no_default_file")
def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    absent = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=f"config file {absent} does not exist"):
        load_config(Overrides(config=absent), {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Overrides(), {"IMAGED_CONFIG": str(absent)})


@pytest.mark.usefixtures("no_default_file")
def test_option_config_wins_over_env_config(tmp_path: Path, config_file: Path) -> None:
    config = load_config(Overrides(config=config_file),
                         {"IMAGED_CONFIG": str(tmp_path / "absent.toml")})
    assert config.source == config_file
    assert config.driver == "btrfs"


@pytest.mark.usefixtures("no_default_file")
def test_empty_env_config_means_default(config_file: Path) -> None:
    assert load_config(Overrides(), {"IMAGED_CONFIG": ""}).source is None


@pytest.mark.usefixtures("no_default_file")
@pytest.mark.parametrize(
    ("option", "env", "use_file", "expected"),
    [
        ("/opt/root", "/env/root", True, "/opt/root"),
        (None, "/env/root", True, "/env/root"),
        (None, "", True, "/file/root"),
        (None, None, True, "/file/root"),
        (None, None, False, str(DEFAULT_ROOT)),
        ("/opt/root", None, False, "/opt/root"),
        (None, "/env/root", False, "/env/root"),
    ],
)
def test_root_precedence(config_file: Path, option: str | None, env: str | None,
                         use_file: bool, expected: str) -> None:
    environ = {} if env is None else {"IMAGED_ROOT": env}
    overrides = Overrides(config=config_file if use_file else None,
                          root=Path(option) if option else None)
    assert load_config(overrides, environ).root == Path(expected)


@pytest.mark.usefixtures("no_default_file")
@pytest.mark.parametrize(
    ("option", "env", "use_file", "expected"),
    [
        ("/opt/sock", "/env/sock", True, "/opt/sock"),
        (None, "/env/sock", True, "/env/sock"),
        (None, None, True, "/file/sock"),
        (None, None, False, str(DEFAULT_SOCKET)),
    ],
)
def test_socket_precedence(config_file: Path, option: str | None, env: str | None,
                           use_file: bool, expected: str) -> None:
    environ = {} if env is None else {"IMAGED_SOCKET": env}
    overrides = Overrides(config=config_file if use_file else None,
                          socket=Path(option) if option else None)
    assert load_config(overrides, environ).socket == Path(expected)


@pytest.mark.usefixtures("no_default_file")
@pytest.mark.parametrize(
    ("option", "env", "use_file", "expected"),
    [
        ("overlay", "zfs", True, "overlay"),
        (None, "zfs", True, "zfs"),
        (None, "", True, "btrfs"),
        (None, None, True, "btrfs"),
        (None, None, False, None),
        (None, "vfs", False, "vfs"),
    ],
)
def test_driver_precedence(config_file: Path, option: str | None, env: str | None,
                           use_file: bool, expected: str | None) -> None:
    environ = {} if env is None else {"IMAGED_DRIVER": env}
    overrides = Overrides(config=config_file if use_file else None, driver=option)
    assert load_config(overrides, environ).driver == expected


@pytest.mark.usefixtures("no_default_file")
def test_file_settings_survive_env_and_options(config_file: Path) -> None:
    config = load_config(Overrides(config=config_file, root=Path("/opt/root")),
                         {"IMAGED_ROOT": "/env/root", "IMAGED_DRIVER": "vfs"})
    assert config.limits.concurrent_downloads == 9
    assert config.source == config_file
    assert (config.root, config.driver, config.socket) == (Path("/opt/root"), "vfs",
                                                           Path("/file/sock"))


@pytest.mark.usefixtures("no_default_file")
@pytest.mark.parametrize(
    ("overrides", "environ"),
    [
        (Overrides(driver="ext4"), {}),
        (Overrides(), {"IMAGED_DRIVER": "ext4"}),
    ],
)
def test_bad_driver_from_option_or_env(overrides: Overrides, environ: dict[str, str]) -> None:
    with pytest.raises(InvalidError, match=r"must be one of overlay, .*not 'ext4'"):
        load_config(overrides, environ)


@pytest.mark.usefixtures("no_default_file")
def test_relative_root_is_made_absolute(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(Overrides(root=Path("rel/root")), {}).root == tmp_path / "rel" / "root"
    assert load_config(Overrides(), {"IMAGED_ROOT": "envrel"}).root == tmp_path / "envrel"


@pytest.mark.usefixtures("no_default_file")
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('bogus = 1\n', ["unknown key bogus"]),
        ('[limits]\nmax_layer_bytes = "huge"\n', ["limits.max_layer_bytes", "invalid size"]),
        ('[registries."r.example"]\ninsecure = "yes"\n',
         ['registries."r.example".insecure must be true or false']),
        ('[drivers.overlay]\nquota = "xfs"\n', ["drivers.overlay.quota must be one of"]),
    ],
)
def test_file_errors_name_the_file_and_key(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(Overrides(config=path), {})
    assert info.value.message.startswith(f"{path}: ")
    for word in words:
        assert word in info.value.message


@pytest.mark.usefixtures("no_default_file")
@pytest.mark.parametrize("text", ["root = \n", "[limits\n", "a = 1\na = 2\n", "\x00"])
def test_unparsable_toml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"cannot read config file {path}"):
        load_config(Overrides(config=path), {})


@pytest.mark.usefixtures("no_default_file")
def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Overrides(config=tmp_path), {})


@pytest.mark.usefixtures("no_default_file")
def test_registries_from_file(tmp_path: Path) -> None:
    path = tmp_path / "imaged.toml"
    path.write_text(f'certs_dirs = ["{tmp_path}"]\n'
                    '[registries."docker.io"]\nmirrors = ["https://m.example/v2/"]\n'
                    '[registries."localhost:5000"]\ninsecure = false\n'
                    '[drivers.overlay]\nquota = "loop"\n')
    config = load_config(Overrides(config=path), {})
    assert config.certs_dirs == (tmp_path,)
    assert config.registry("docker.io") == RegistryConfig(None, ("https://m.example/v2",))
    assert config.registry("localhost:5000") == RegistryConfig(False, ())
    assert config.drivers == {"overlay": {"quota": "loop"}}
