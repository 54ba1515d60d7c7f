"""Configuration: defaults < config file (TOML) < environment < command-line options.

The file is strict: an unknown key or a value of the wrong type is an error naming the key and
the file, because a typo that silently falls back to a default (a quota mode, an insecure
registry) is worse than a refusal.
"""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaged.errors import ConfigError, InvalidError
from imaged.sizes import parse_size

DEFAULT_CONFIG = Path("/etc/imaged/imaged.toml")
DEFAULT_ROOT = Path("/var/lib/imaged")
DEFAULT_SOCKET = Path("/run/imaged/imaged.sock")
DEFAULT_CERTS_DIRS = (Path("/etc/docker/certs.d"), Path("/etc/containers/certs.d"))
DRIVER_NAMES = ("overlay", "aufs", "devmapper", "btrfs", "zfs", "fuse", "vfs")


@dataclass(frozen=True)
class Limits:
    concurrent_downloads: int = 3
    max_manifest_bytes: int = 4 * 1024**2
    max_layer_bytes: int = 64 * 1024**3
    max_layer_entries: int = 1_000_000


@dataclass(frozen=True)
class RegistryConfig:
    """Per-host settings; ``insecure=None`` means "the default": plain HTTP only on loopback."""

    insecure: bool | None = None
    mirrors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Address:
    """A TCP address to listen on; ``host`` is an IP literal or a name, never empty."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``HOST:PORT`` or ``[IPv6]:PORT``. An empty host is refused rather than read as "every
    interface": the node endpoint should be bound to the cluster network on purpose."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 literal without brackets: its port cannot be told apart
    if not sep or not host or any(c.isspace() or c in "/[]@" for c in host) \
            or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InvalidError(f"{text!r} is not HOST:PORT (e.g. 10.0.0.5:5050 or [fd00::5]:5050)")
    return Address(host, int(port))


@dataclass(frozen=True)
class Config:
    root: Path = DEFAULT_ROOT
    driver: str | None = None
    socket: Path = DEFAULT_SOCKET
    limits: Limits = field(default_factory=Limits)
    registries: Mapping[str, RegistryConfig] = field(default_factory=dict)
    drivers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    certs_dirs: tuple[Path, ...] = DEFAULT_CERTS_DIRS
    # Where non-root peers of the daemon may ask for a container to be mounted
    # (imaged.host.targets).
    mount_prefixes: tuple[Path, ...] = ()
    # imaged serve: where peers read this root over the OCI distribution API (off when None).
    registry_addr: Address | None = None
    source: Path | None = None

    def registry(self, host: str) -> RegistryConfig:
        return self.registries.get(host, RegistryConfig())


@dataclass(frozen=True)
class Overrides:
    """What the command line said; ``None`` means "not given"."""

    config: Path | None = None
    root: Path | None = None
    driver: str | None = None
    socket: Path | None = None
    registry_addr: Address | None = None


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidError(f"{key} must be a positive integer, not {value!r}")
    return value


def _size(key: str, value: Any) -> int:
    try:
        n = parse_size(value)
    except InvalidError as exc:
        raise InvalidError(f"{key}: {exc}") from None
    if n < 1:
        raise InvalidError(f"{key} must be positive")
    return n


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidError(f"{key} must be true or false, not {value!r}")
    return value


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidError(f"{key} must be a non-empty string, not {value!r}")
    return value


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise InvalidError(f"{key} must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    return check


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise InvalidError(f"{key} must be a number in (0, 1], not {value!r}")
    return float(value)


_LIMIT_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "concurrent_downloads": _positive_int,
    "max_manifest_bytes": _size,
    "max_layer_bytes": _size,
    "max_layer_entries": _positive_int,
}

_DRIVER_KEYS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "overlay": {"quota": _choice("auto", "project", "loop"), "metacopy": _bool, "volatile": _bool},
    "btrfs": {"quota": _choice("qgroup", "simple")},
    "zfs": {"dataset": _string},
    "devmapper": {
        "pool": _string,
        "data_size": _size,
        "metadata_size": _size,
        "basesize": _size,
        "fs": _choice("ext4", "xfs"),
        "fill_threshold": _fraction,
    },
    "aufs": {},
    "fuse": {"copy_up": _choice("auto", "full", "partial"), "partial_threshold": _size,
             "writeback": _bool},
    "vfs": {"quota": _choice("auto", "project", "loop")},
}


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidError(f"{key} must be a table")
    return value


def _unknown(prefix: str, keys: set[str]) -> None:
    if keys:
        names = ", ".join(sorted(f"{prefix}{k}" for k in keys))
        raise InvalidError(f"unknown key {names}")


def _driver_name(key: str, value: Any) -> str:
    return _choice(*DRIVER_NAMES)(key, value)


def _parse_registries(raw: dict[str, Any]) -> dict[str, RegistryConfig]:
    out: dict[str, RegistryConfig] = {}
    for host, settings in raw.items():
        prefix = f'registries."{host}".'
        table = _table(f'registries."{host}"', settings)
        _unknown(prefix, set(table) - {"insecure", "mirrors"})
        insecure = _bool(prefix + "insecure", table["insecure"]) if "insecure" in table else None
        mirrors = table.get("mirrors", [])
        if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
            raise InvalidError(f"{prefix}mirrors must be a list of URLs")
        for mirror in mirrors:
            _mirror_url(f"{prefix}mirrors", mirror)
        out[host] = RegistryConfig(insecure=insecure, mirrors=tuple(m.rstrip("/") for m in mirrors))
    return out


def _mirror_url(key: str, url: str) -> None:
    """A mirror is named by a URL with its scheme: guessing one for ``cache:5000`` would decide
    between TLS and plain HTTP behind the operator's back."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or "://" not in url:
        hint = url.split("://", 1)[-1].strip("/") or "mirror.example:5000"
        raise InvalidError(f"{key}: {url!r} is not an http(s) URL: give its scheme, e.g. "
                           f"'https://{hint}' (or 'http://{hint}' for a plain-HTTP cache)")
    if not parsed.hostname or parsed.query or parsed.fragment or parsed.username is not None:
        raise InvalidError(f"{key}: {url!r} must be scheme://host[:port][/path], without "
                           "credentials, query or fragment")


def parse_config(data: Mapping[str, Any], base: Config) -> Config:
    """Apply a parsed TOML document on top of ``base``; pure, so it is tested without files."""
    _unknown("", set(data) - {"root", "driver", "socket", "limits", "registries", "drivers",
                              "certs_dirs", "api", "serve"})
    root = Path(_string("root", data["root"])) if "root" in data else base.root
    socket = Path(_string("socket", data["socket"])) if "socket" in data else base.socket
    driver = _driver_name("driver", data["driver"]) if "driver" in data else base.driver
    limits_raw = _table("limits", data.get("limits", {}))
    _unknown("limits.", set(limits_raw) - set(_LIMIT_KEYS))
    limits = Limits(
        **{
            **base.limits.__dict__,
            **{k: _LIMIT_KEYS[k](f"limits.{k}", v) for k, v in limits_raw.items()},
        }
    )
    drivers_raw = _table("drivers", data.get("drivers", {}))
    _unknown("drivers.", set(drivers_raw) - set(_DRIVER_KEYS))
    drivers: dict[str, dict[str, Any]] = {k: dict(v) for k, v in base.drivers.items()}
    for name, opts in drivers_raw.items():
        table = _table(f"drivers.{name}", opts)
        _unknown(f"drivers.{name}.", set(table) - set(_DRIVER_KEYS[name]))
        checked = {k: _DRIVER_KEYS[name][k](f"drivers.{name}.{k}", v) for k, v in table.items()}
        drivers.setdefault(name, {}).update(checked)
    registries = {**base.registries, **_parse_registries(_table("registries", data.get(
        "registries", {})))}
    certs_dirs = base.certs_dirs
    if "certs_dirs" in data:
        raw_dirs = data["certs_dirs"]
        if not isinstance(raw_dirs, list) or not all(isinstance(d, str) for d in raw_dirs):
            raise InvalidError("certs_dirs must be a list of paths")
        certs_dirs = tuple(Path(d) for d in raw_dirs)
    api = _table("api", data.get("api", {}))
    _unknown("api.", set(api) - {"mount_prefixes"})
    prefixes = _mount_prefixes(api["mount_prefixes"]) if "mount_prefixes" in api \
        else base.mount_prefixes
    serve = _table("serve", data.get("serve", {}))
    _unknown("serve.", set(serve) - {"registry_addr"})
    registry_addr = base.registry_addr
    if "registry_addr" in serve:
        try:
            registry_addr = parse_address(_string("serve.registry_addr", serve["registry_addr"]))
        except InvalidError as exc:
            raise InvalidError(f"serve.registry_addr: {exc.message}") from None
    return Config(root=root, driver=driver, socket=socket, limits=limits, registries=registries,
                  drivers=drivers, certs_dirs=certs_dirs, mount_prefixes=prefixes,
                  registry_addr=registry_addr, source=base.source)


def _mount_prefixes(value: Any) -> tuple[Path, ...]:
    key = "api.mount_prefixes"
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise InvalidError(f"{key} must be a list of directories")
    prefixes = []
    for text in value:
        path = Path(text)
        if not path.is_absolute() or ".." in path.parts or path == Path("/"):
            raise InvalidError(f"{key}: {text!r} must be an absolute directory other than /")
        prefixes.append(path)
    return tuple(prefixes)


def load_config(overrides: Overrides, environ: Mapping[str, str] | None = None) -> Config:
    """Resolve the configuration with the precedence options > environment > file > defaults."""
    env = os.environ if environ is None else environ
    explicit = overrides.config or (Path(env["IMAGED_CONFIG"]) if env.get("IMAGED_CONFIG")
                                    else None)
    path = explicit or DEFAULT_CONFIG
    config = Config()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if explicit is not None:
            raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    else:
        try:
            config = parse_config(data, Config(source=path))
        except InvalidError as exc:
            raise ConfigError(f"{path}: {exc.message}") from None
    root = overrides.root or (Path(env["IMAGED_ROOT"]) if env.get("IMAGED_ROOT") else config.root)
    socket = overrides.socket or (
        Path(env["IMAGED_SOCKET"]) if env.get("IMAGED_SOCKET") else config.socket
    )
    driver = overrides.driver or env.get("IMAGED_DRIVER") or config.driver
    if driver is not None:
        driver = _driver_name("--driver", driver)
    return Config(root=root.absolute(), driver=driver, socket=socket, limits=config.limits,
                  registries=config.registries, drivers=config.drivers,
                  certs_dirs=config.certs_dirs, mount_prefixes=config.mount_prefixes,
                  registry_addr=overrides.registry_addr or config.registry_addr,
                  source=config.source)
