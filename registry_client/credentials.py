"""Where credentials come from, in the order Docker and Podman users expect (DESIGN §4).

1. ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``): ``credHelpers[host]``,
   else ``credsStore``, then ``auths`` (base64 ``user:pass`` or an ``identitytoken``).
2. ``$REGISTRY_AUTH_FILE``, else Podman's ``$XDG_RUNTIME_DIR/containers/auth.json``; its keys may
   name a repository namespace (``host/org``): the longest matching key wins, as in Podman.

Secrets live only in the returned ``Credentials`` object, whose repr hides them.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imaged import tools
from imaged.errors import RegistryError
from imaged.registry_client.auth import Credentials

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                   "registry-1.docker.io")
HELPER_TIMEOUT = 30.0


def _strip_key(key: str) -> str:
    """``https://host:5000/v1/`` → ``host:5000`` (Docker's convertToHostname)."""
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            return key[len(scheme):].split("/", 1)[0]
    return key


def _decode_auths_entry(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, _, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return Credentials(user, password, token if isinstance(token, str) and token else None)
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(secret, str):
        return Credentials(username, secret)
    if isinstance(token, str) and token:
        return Credentials("", "", token)
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read credentials file {path}: {exc}") from None
    return data if isinstance(data, dict) else None


def run_helper(helper: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-<helper> get``; "not found" is None, other failures are errors."""
    program = f"docker-credential-{helper}"
    proc = tools.completed([program, "get"], input_text=server, timeout=HELPER_TIMEOUT,
                           error=RegistryError,
                           provides="the Docker config names it (credHelpers or credsStore)")
    if proc.returncode != 0:
        if "credentials not found" in (proc.stdout + proc.stderr).lower():
            return None
        # The helper's output is not echoed: helpers have been seen to print secrets on error.
        raise RegistryError(f"credential helper {program} failed (exit {proc.returncode})")
    try:
        doc = json.loads(proc.stdout)
        user, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"credential helper {program} returned malformed output") from None
    if user == "<token>":
        return Credentials("", "", secret)
    return Credentials(str(user), str(secret))


def _docker_config_lookup(host: str, env: Mapping[str, str]) -> Credentials | None:
    config_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else (
        Path(env.get("HOME", str(Path.home()))) / ".docker")
    doc = _read_json(config_dir / "config.json")
    if doc is None:
        return None
    keys = DOCKER_HUB_KEYS if host == "docker.io" else (host,)
    server = DOCKER_HUB_KEYS[0] if host == "docker.io" else host
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key in keys:
            helper = helpers.get(key)
            if isinstance(helper, str) and helper:
                return run_helper(helper, server)
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        found = run_helper(store, server)
        if found is not None:
            return found
    auths = doc.get("auths")
    if isinstance(auths, dict):
        stripped = {_strip_key(k): v for k, v in auths.items()}
        for key in keys:
            creds = _decode_auths_entry(auths.get(key)) or _decode_auths_entry(stripped.get(key))
            if creds is not None:
                return creds
    return None


def _auth_file_lookup(host: str, repo: str, env: Mapping[str, str]) -> Credentials | None:
    if env.get("REGISTRY_AUTH_FILE"):
        path = Path(env["REGISTRY_AUTH_FILE"])
    elif env.get("XDG_RUNTIME_DIR"):
        path = Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
    else:
        return None
    doc = _read_json(path)
    auths = doc.get("auths") if doc else None
    if not isinstance(auths, dict):
        return None
    full = f"{host}/{repo}"
    best: tuple[int, Credentials] | None = None
    for key, entry in auths.items():
        name = _strip_key(key) if key.startswith(("http://", "https://")) else key
        if name in DOCKER_HUB_KEYS:
            name = "docker.io"
        if full == name or full.startswith(name + "/"):
            creds = _decode_auths_entry(entry)
            if creds is not None and (best is None or len(name) > best[0]):
                best = (len(name), creds)
    return None if best is None else best[1]


def lookup_credentials(host: str, repo: str,
                       environ: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for ``host`` (normalized, e.g. ``docker.io``) and repository path, or None."""
    env = os.environ if environ is None else environ
    return _docker_config_lookup(host, env) or _auth_file_lookup(host, repo, env)
