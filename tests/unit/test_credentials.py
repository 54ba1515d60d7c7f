"""Where credentials come from: Docker's config.json (auths, helpers), then Podman's auth.json.

Credential helpers are real executables (small shell scripts) found on PATH, as in production.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from imaged.errors import RegistryError
from imaged.registry_client import credentials as credentials_module
from imaged.registry_client.auth import Credentials
from imaged.registry_client.credentials import lookup_credentials, run_helper

HOST = "registry.example.com:5000"
SECRET = "hunter2-do-not-print"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_json(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty HOME, so nothing from the machine running the tests is read."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def docker_dir(tmp_path: Path) -> Path:
    path = tmp_path / "docker"
    path.mkdir()
    return path


@pytest.fixture
def env(home: Path, docker_dir: Path) -> dict[str, str]:
    return {"HOME": str(home), "DOCKER_CONFIG": str(docker_dir)}


def docker_config(docker_dir: Path, doc: dict[str, Any]) -> None:
    write_json(docker_dir / "config.json", doc)


# -- helpers on PATH ----------------------------------------------------------------------------

HELPERS = {
    # Echoes what it was asked, so the test sees the server name and the verb it was given.
    "fake": """#!/bin/sh
[ "$1" = get ] || { echo "unexpected verb $1" >&2; exit 9; }
server=$(cat)
printf '{"ServerURL":"%s","Username":"user-for-%s","Secret":"secret-for-%s"}\\n' \
  "$server" "$server" "$server"
""",
    "token": """#!/bin/sh
cat >/dev/null
printf '{"ServerURL":"x","Username":"<token>","Secret":"identity-token-value"}\\n'
""",
    "notfound": """#!/bin/sh
cat >/dev/null
echo "credentials not found in native keychain"
exit 1
""",
    "notfound-stderr": """#!/bin/sh
cat >/dev/null
echo "Credentials Not Found in native keychain" >&2
exit 1
""",
    "leaky": f"""#!/bin/sh
cat >/dev/null
echo "error: token {SECRET} was rejected by the keyring"
echo "debug: password={SECRET}" >&2
exit 3
""",
    "garbage": """#!/bin/sh
cat >/dev/null
echo "this is not json"
""",
    "partial": """#!/bin/sh
cat >/dev/null
echo '{"ServerURL":"x","Username":"u"}'
""",
    "list": """#!/bin/sh
cat >/dev/null
echo '["u", "s"]'
""",
    "slow": """#!/bin/sh
exec sleep 30
""",
}


@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install every ``docker-credential-*`` script above in a directory put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in HELPERS.items():
        path = bin_dir / f"docker-credential-{name}"
        path.write_text(script)
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    return bin_dir


# -- config.json auths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("https://registry-1.docker.io/v2/", "docker.io"),
        (HOST, HOST),
        (f"https://{HOST}", HOST),
        (f"https://{HOST}/v1/", HOST),
        (f"http://{HOST}", HOST),
        ("quay.io", "quay.io"),
    ],
)
def test_auths_base64(env: dict[str, str], docker_dir: Path, key: str, host: str) -> None:
    docker_config(docker_dir, {"auths": {key: {"auth": b64("alice:pa:ss")}}})
    assert lookup_credentials(host, "org/app", env) == Credentials("alice", "pa:ss")


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("https://index.docker.io/v1/", "quay.io"),
        ("quay.io", "docker.io"),
        ("registry.example.com", HOST),  # the port is part of the name
        (HOST, "registry.example.com"),
        ("https://registry.example.com.evil/", "registry.example.com"),
    ],
)
def test_auths_other_hosts_do_not_match(env: dict[str, str], docker_dir: Path, key: str,
                                        host: str) -> None:
    docker_config(docker_dir, {"auths": {key: {"auth": b64("alice:pw")}}})
    assert lookup_credentials(host, "org/app", env) is None


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"auth": b64("alice:pw")}, Credentials("alice", "pw")),
        ({"auth": b64("alice:")}, Credentials("alice", "")),
        ({"auth": b64("alice:pw"), "identitytoken": "idt"}, Credentials("alice", "pw", "idt")),
        ({"auth": b64("alice:"), "identitytoken": "idt"}, Credentials("alice", "", "idt")),
        ({"identitytoken": "idt"}, Credentials("", "", "idt")),
        ({"auth": b64("alice:pw"), "identitytoken": ""}, Credentials("alice", "pw")),
        ({"username": "bob", "password": "pw"}, Credentials("bob", "pw")),
        ({"auth": "", "username": "bob", "password": "pw"}, Credentials("bob", "pw")),
        ({"auth": "!!!not base64!!!"}, None),
        ({"auth": base64.b64encode(b"\xff\xfe:pw").decode()}, None),
        ({"auth": 5}, None),
        ({"username": "bob"}, None),
        ({}, None),
        ("alice:pw", None),
        (None, None),
    ],
)
def test_auths_entry_forms(env: dict[str, str], docker_dir: Path, entry: Any,
                           expected: Credentials | None) -> None:
    docker_config(docker_dir, {"auths": {HOST: entry}})
    assert lookup_credentials(HOST, "org/app", env) == expected


def test_exact_key_preferred_over_url_form(env: dict[str, str], docker_dir: Path) -> None:
    docker_config(docker_dir, {"auths": {f"https://{HOST}": {"auth": b64("url:pw")},
                                         HOST: {"auth": b64("exact:pw")}}})
    assert lookup_credentials(HOST, "org/app", env) == Credentials("exact", "pw")


def test_docker_hub_keys_in_docker_s_order(env: dict[str, str], docker_dir: Path) -> None:
    docker_config(docker_dir, {"auths": {
        "docker.io": {"auth": b64("short:pw")},
        "https://index.docker.io/v1/": {"auth": b64("legacy:pw")},
    }})
    assert lookup_credentials("docker.io", "library/alpine", env) == Credentials("legacy", "pw")


def test_home_default_docker_config(home: Path) -> None:
    write_json(home / ".docker" / "config.json", {"auths": {HOST: {"auth": b64("home:pw")}}})
    assert lookup_credentials(HOST, "x", {"HOME": str(home)}) == Credentials("home", "pw")


def test_empty_docker_config_variable_means_home(home: Path) -> None:
    write_json(home / ".docker" / "config.json", {"auths": {HOST: {"auth": b64("home:pw")}}})
    env = {"HOME": str(home), "DOCKER_CONFIG": ""}
    assert lookup_credentials(HOST, "x", env) == Credentials("home", "pw")


def test_docker_config_variable_replaces_home(home: Path, docker_dir: Path) -> None:
    write_json(home / ".docker" / "config.json", {"auths": {HOST: {"auth": b64("home:pw")}}})
    docker_config(docker_dir, {"auths": {HOST: {"auth": b64("custom:pw")}}})
    env = {"HOME": str(home), "DOCKER_CONFIG": str(docker_dir)}
    assert lookup_credentials(HOST, "x", env) == Credentials("custom", "pw")


@pytest.mark.parametrize(
    "doc", [{}, {"auths": {}}, {"auths": []}, {"auths": None}, {"credHelpers": []}])
def test_no_credentials(env: dict[str, str], docker_dir: Path, doc: dict[str, Any]) -> None:
    docker_config(docker_dir, doc)
    assert lookup_credentials(HOST, "x", env) is None


def test_missing_config_file_is_fine(env: dict[str, str]) -> None:
    assert lookup_credentials(HOST, "x", env) is None


@pytest.mark.parametrize("text", ["{not json", "\xff", "[1,"])
def test_unreadable_config_is_an_error(env: dict[str, str], docker_dir: Path,
                                       text: str) -> None:
    (docker_dir / "config.json").write_text(text)
    with pytest.raises(RegistryError, match="cannot read credentials file") as info:
        lookup_credentials(HOST, "x", env)
    assert str(docker_dir / "config.json") in info.value.message


def test_config_that_is_not_an_object_is_ignored(env: dict[str, str], docker_dir: Path) -> None:
    docker_config(docker_dir, [{"auths": {HOST: {"auth": b64("a:b")}}}])  # type: ignore[arg-type]
    assert lookup_credentials(HOST, "x", env) is None


# -- credential helpers -------------------------------------------------------------------------


@pytest.mark.usefixtures("helpers")
@pytest.mark.parametrize(
    ("host", "key", "server"),
    [
        (HOST, HOST, HOST),
        ("quay.io", "quay.io", "quay.io"),
        ("docker.io", "https://index.docker.io/v1/", "https://index.docker.io/v1/"),
        ("docker.io", "docker.io", "https://index.docker.io/v1/"),
        ("docker.io", "index.docker.io", "https://index.docker.io/v1/"),
    ],
)
def test_cred_helpers(env: dict[str, str], docker_dir: Path, host: str, key: str,
                      server: str) -> None:
    docker_config(docker_dir, {"credHelpers": {key: "fake"},
                               "auths": {host: {"auth": b64("from-auths:pw")}}})
    assert lookup_credentials(host, "org/app", env) == Credentials(
        f"user-for-{server}", f"secret-for-{server}")


@pytest.mark.usefixtures("helpers")
def test_cred_helper_for_another_host_is_not_used(env: dict[str, str],
                                                  docker_dir: Path) -> None:
    docker_config(docker_dir, {"credHelpers": {"quay.io": "leaky"},
                               "auths": {HOST: {"auth": b64("from-auths:pw")}}})
    assert lookup_credentials(HOST, "x", env) == Credentials("from-auths", "pw")


@pytest.mark.usefixtures("helpers")
def test_creds_store(env: dict[str, str], docker_dir: Path) -> None:
    docker_config(docker_dir, {"credsStore": "fake"})
    assert lookup_credentials(HOST, "x", env) == Credentials(f"user-for-{HOST}",
                                                             f"secret-for-{HOST}")


@pytest.mark.usefixtures("helpers")
def test_cred_helpers_win_over_creds_store(env: dict[str, str], docker_dir: Path) -> None:
    docker_config(docker_dir, {"credHelpers": {HOST: "fake"}, "credsStore": "leaky"})
    assert lookup_credentials(HOST, "x", env) == Credentials(f"user-for-{HOST}",
                                                             f"secret-for-{HOST}")


@pytest.mark.usefixtures("helpers")
@pytest.mark.parametrize("store", ["notfound", "notfound-stderr"])
def test_creds_store_not_found_falls_back_to_auths(env: dict[str, str], docker_dir: Path,
                                                   store: str) -> None:
    docker_config(docker_dir, {"credsStore": store,
                               "auths": {HOST: {"auth": b64("from-auths:pw")}}})
    assert lookup_credentials(HOST, "x", env) == Credentials("from-auths", "pw")


@pytest.mark.usefixtures("helpers")
def test_cred_helper_not_found_means_none(env: dict[str, str], docker_dir: Path) -> None:
    # A host with its own helper is that helper's alone, as in Docker: auths are not consulted.
    docker_config(docker_dir, {"credHelpers": {HOST: "notfound"},
                               "auths": {HOST: {"auth": b64("from-auths:pw")}}})
    assert lookup_credentials(HOST, "x", env) is None


@pytest.mark.usefixtures("helpers")
def test_identity_token_from_helper(env: dict[str, str], docker_dir: Path) -> None:
    docker_config(docker_dir, {"credsStore": "token"})
    creds = lookup_credentials(HOST, "x", env)
    assert creds == Credentials("", "", "identity-token-value")


@pytest.mark.usefixtures("helpers")
@pytest.mark.parametrize("config_key", ["credHelpers", "credsStore"])
def test_failing_helper_error_does_not_echo_secrets(env: dict[str, str], docker_dir: Path,
                                                    config_key: str) -> None:
    doc: dict[str, Any] = ({"credHelpers": {HOST: "leaky"}} if config_key == "credHelpers"
                           else {"credsStore": "leaky"})
    docker_config(docker_dir, doc)
    with pytest.raises(RegistryError) as info:
        lookup_credentials(HOST, "x", env)
    message = str(info.value)
    assert "docker-credential-leaky failed (exit 3)" in message
    assert SECRET not in message
    assert "hunter2" not in message
    assert SECRET not in repr(info.value)
    # Nothing chained either: a traceback would show the helper's output otherwise.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


@pytest.mark.usefixtures("helpers")
@pytest.mark.parametrize("helper", ["garbage", "partial", "list"])
def test_helper_with_malformed_output(helper: str) -> None:
    with pytest.raises(RegistryError, match=f"docker-credential-{helper} returned malformed"):
        run_helper(helper, HOST)


@pytest.mark.usefixtures("helpers")
def test_helper_not_installed(env: dict[str, str], docker_dir: Path) -> None:
    docker_config(docker_dir, {"credHelpers": {HOST: "absent"}})
    with pytest.raises(RegistryError,
                       match="docker-credential-absent is not installed: the Docker config"):
        lookup_credentials(HOST, "x", env)


@pytest.mark.usefixtures("helpers")
def test_helper_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials_module, "HELPER_TIMEOUT", 0.5)
    with pytest.raises(RegistryError, match="docker-credential-slow get did not finish within"):
        run_helper("slow", HOST)


@pytest.mark.usefixtures("helpers")
def test_run_helper_direct() -> None:
    assert run_helper("fake", "https://index.docker.io/v1/") == Credentials(
        "user-for-https://index.docker.io/v1/", "secret-for-https://index.docker.io/v1/")
    assert run_helper("notfound", HOST) is None


# -- REGISTRY_AUTH_FILE and XDG_RUNTIME_DIR/containers/auth.json ---------------------------------

NAMESPACED = {
    "auths": {
        "registry.example.com": {"auth": b64("host:pw")},
        "registry.example.com/team": {"auth": b64("team:pw")},
        "registry.example.com/team/app": {"auth": b64("app:pw")},
        "registry.example.com/te": {"auth": b64("prefix-trap:pw")},
        "registry.example.com:5000": {"auth": b64("port:pw")},
        "docker.io/library": {"auth": b64("hub-library:pw")},
        "https://index.docker.io/v1/": {"auth": b64("hub:pw")},
        "quay.io/org/app/sub": {"auth": b64("deeper:pw")},
    }
}


@pytest.mark.parametrize(
    ("host", "repo", "user"),
    [
        ("registry.example.com", "team/app", "app"),
        ("registry.example.com", "team/app/sub", "app"),
        ("registry.example.com", "team/other", "team"),
        ("registry.example.com", "team", "team"),
        ("registry.example.com", "teamx/app", "host"),
        ("registry.example.com", "tea/app", "host"),
        ("registry.example.com", "te/app", "prefix-trap"),
        ("registry.example.com", "other", "host"),
        ("registry.example.com:5000", "team/app", "port"),
        ("docker.io", "library/alpine", "hub-library"),
        ("docker.io", "org/app", "hub"),
        ("quay.io", "org/app", None),
        ("registry.example.co", "x", None),
    ],
)
def test_auth_file_longest_namespace_wins(tmp_path: Path, home: Path, host: str, repo: str,
                                          user: str | None) -> None:
    path = write_json(tmp_path / "auth.json", NAMESPACED)
    env = {"HOME": str(home), "REGISTRY_AUTH_FILE": str(path)}
    found = lookup_credentials(host, repo, env)
    assert (found.username if found else None) == user
    if found is not None:
        assert found.password == "pw"


def test_auth_file_from_xdg_runtime_dir(tmp_path: Path, home: Path) -> None:
    runtime = tmp_path / "run-user"
    write_json(runtime / "containers" / "auth.json",
               {"auths": {HOST: {"auth": b64("podman:pw")}}})
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    assert lookup_credentials(HOST, "x", env) == Credentials("podman", "pw")


def test_registry_auth_file_wins_over_xdg(tmp_path: Path, home: Path) -> None:
    runtime = tmp_path / "run-user"
    write_json(runtime / "containers" / "auth.json",
               {"auths": {HOST: {"auth": b64("xdg:pw")}}})
    path = write_json(tmp_path / "explicit.json", {"auths": {HOST: {"auth": b64("explicit:pw")}}})
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime), "REGISTRY_AUTH_FILE": str(path)}
    assert lookup_credentials(HOST, "x", env) == Credentials("explicit", "pw")


def test_missing_registry_auth_file_is_fine(tmp_path: Path, home: Path) -> None:
    env = {"HOME": str(home), "REGISTRY_AUTH_FILE": str(tmp_path / "absent.json")}
    assert lookup_credentials(HOST, "x", env) is None


def test_no_auth_file_location_at_all(home: Path) -> None:
    assert lookup_credentials(HOST, "x", {"HOME": str(home)}) is None


def test_broken_auth_file_is_an_error(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text("{")
    env = {"HOME": str(home), "REGISTRY_AUTH_FILE": str(path)}
    with pytest.raises(RegistryError, match="cannot read credentials file"):
        lookup_credentials(HOST, "x", env)


@pytest.mark.parametrize("doc", [{}, {"auths": []}, {"auths": {HOST: "x"}}, {"other": 1}])
def test_auth_file_without_usable_entries(tmp_path: Path, home: Path,
                                          doc: dict[str, Any]) -> None:
    path = write_json(tmp_path / "auth.json", doc)
    env = {"HOME": str(home), "REGISTRY_AUTH_FILE": str(path)}
    assert lookup_credentials(HOST, "x", env) is None


def test_docker_config_wins_over_auth_file(tmp_path: Path, env: dict[str, str],
                                           docker_dir: Path) -> None:
    docker_config(docker_dir, {"auths": {HOST: {"auth": b64("docker:pw")}}})
    path = write_json(tmp_path / "auth.json", {"auths": {
        f"{HOST}/org/app": {"auth": b64("podman:pw")}}})
    assert lookup_credentials(HOST, "org/app", {**env, "REGISTRY_AUTH_FILE": str(path)}) == \
        Credentials("docker", "pw")


def test_auth_file_used_when_docker_config_has_nothing_for_host(
        tmp_path: Path, env: dict[str, str], docker_dir: Path) -> None:
    docker_config(docker_dir, {"auths": {"quay.io": {"auth": b64("docker:pw")}}})
    path = write_json(tmp_path / "auth.json", {"auths": {HOST: {"auth": b64("podman:pw")}}})
    assert lookup_credentials(HOST, "org/app", {**env, "REGISTRY_AUTH_FILE": str(path)}) == \
        Credentials("podman", "pw")


@pytest.mark.usefixtures("helpers")
def test_helper_not_found_falls_through_to_auth_file(tmp_path: Path, env: dict[str, str],
                                                     docker_dir: Path) -> None:
    docker_config(docker_dir, {"credHelpers": {HOST: "notfound"}})
    path = write_json(tmp_path / "auth.json", {"auths": {HOST: {"auth": b64("podman:pw")}}})
    assert lookup_credentials(HOST, "x", {**env, "REGISTRY_AUTH_FILE": str(path)}) == \
        Credentials("podman", "pw")


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   home: Path) -> None:
    path = write_json(tmp_path / "auth.json", {"auths": {HOST: {"auth": b64("fromenv:pw")}}})
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    assert lookup_credentials(HOST, "x") == Credentials("fromenv", "pw")
