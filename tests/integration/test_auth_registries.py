"""Pulls from real registries that want credentials or TLS (DESIGN §4), through the CLI.

Covered, each against its own docker-registry (distribution 2.8) on 127.0.0.1:

* Basic auth (htpasswd, bcrypt): ``imaged pull`` finds credentials in ``$DOCKER_CONFIG/config.json``
  ``auths``, in ``$REGISTRY_AUTH_FILE`` (Podman's format, host and namespace keys) and through a
  ``credHelpers`` entry running a ``docker-credential-*`` program from PATH. Without credentials
  the error names the registry and says authentication is required; with a wrong password it says
  the credentials were rejected, and the password appears neither in the output nor in the root.
* Token auth: the registry delegates to the test's own token server (RS256 JWTs signed with the
  ``openssl`` CLI, ``x5c`` chaining to ``rootcertbundle``). A pull asks for ``service`` and
  ``scope=repository:REPO:pull`` with the user's credentials, fetches one token and reuses it for
  the manifest, the config and every layer; wrong or missing credentials fail with a message
  naming the registry and without the secret.
* HTTPS: a registry serving a certificate from the test's CA. With ``insecure = false`` the pull
  succeeds when the CA is in ``certs.d/HOST/ca.crt`` and fails, naming the registry, certs.d and an
  untrusted certificate, when it is missing or is another CA; with the loopback default (insecure)
  the same registry is pulled from without any CA.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imaged.testing.images import OCILayout, directory, file, push
from imaged.testing.registry import TLS, LocalRegistry, TokenAuth, start_registry
from tests.conftest import Result, need_tools
from tests.integration.authbed import (
    CertPair,
    TokenServer,
    basic_entry,
    files_containing,
    htpasswd_file,
    secret_forms,
    self_signed,
    server_cert,
    write_auth_file,
    write_credential_helper,
    write_docker_config,
    write_imaged_config,
)

USER = "imaged-tester"
PASSWORD = "Corr3ct-h0rse-b4ttery-staple"
WRONG = "wr0ng-Pa55w0rd-5e1f9c3a"
SERVICE = "imaged-test-registry"
ISSUER = "imaged-test-token-issuer"

Imaged = Callable[..., Result]


@dataclass(frozen=True)
class Bed:
    """A running registry holding one two-layer image at ``ref``."""

    registry: LocalRegistry
    repo: str
    ref: str
    digest: str

    @property
    def host(self) -> str:
        return self.registry.host


@dataclass(frozen=True)
class TokenBed(Bed):
    tokens: TokenServer


@dataclass(frozen=True)
class TLSBed(Bed):
    ca: CertPair
    other_ca: CertPair


def _push_image(workdir: Path, registry: LocalRegistry, repo: str, creds: str | None = None,
                cert_dir: Path | None = None) -> tuple[str, str]:
    """Build a two-layer image and push it with skopeo; returns (ref, manifest digest)."""
    layout = OCILayout(workdir / "layout")
    base = layout.add_layer([directory("etc"), file("etc/os-release", b"ID=imaged-auth-test\n")])
    top = layout.add_layer([file("hello.txt", f"hello from {repo}\n".encode())])
    manifest = layout.add_image([base, top])
    name = repo.replace("/", "-")
    layout.tag(manifest, name)
    ref = f"{registry.host}/{repo}:v1"
    push(layout, name, ref, dest_creds=creds, tls_verify=cert_dir is not None, cert_dir=cert_dir)
    return ref, manifest.digest


# -- fixtures: one registry of each kind per module, always stopped ------------------------


@pytest.fixture(scope="module")
def basic_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    need_tools("docker-registry", "skopeo", "htpasswd")
    workdir = tmp_path_factory.mktemp("basic-registry")
    htpasswd = htpasswd_file(workdir / "htpasswd", USER, PASSWORD)
    registry = start_registry(workdir / "registry", htpasswd=htpasswd)
    try:
        repo = "auth/basic"
        ref, digest = _push_image(workdir, registry, repo, creds=f"{USER}:{PASSWORD}")
        yield Bed(registry, repo, ref, digest)
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def token_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenBed]:
    need_tools("docker-registry", "skopeo", "openssl")
    workdir = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(workdir / "token-server", {USER: PASSWORD}, SERVICE, ISSUER)
    tokens.start()
    try:
        auth = TokenAuth(realm=tokens.realm, service=SERVICE, issuer=ISSUER,
                         rootcertbundle=tokens.rootcertbundle)
        registry = start_registry(workdir / "registry", token=auth)
        try:
            repo = "auth/token"
            try:
                ref, digest = _push_image(workdir, registry, repo, creds=f"{USER}:{PASSWORD}")
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\nregistry log:\n{registry.log()}") from None
            yield TokenBed(registry, repo, ref, digest, tokens)
        finally:
            registry.stop()
    finally:
        tokens.stop()


@pytest.fixture(scope="module")
def tls_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSBed]:
    need_tools("docker-registry", "skopeo", "openssl")
    workdir = tmp_path_factory.mktemp("tls-registry")
    ca = self_signed(workdir / "ca", "ca", "imaged test CA")
    other_ca = self_signed(workdir / "other-ca", "ca", "imaged test CA")  # same name, other key
    served = server_cert(workdir / "server", ca)
    registry = start_registry(workdir / "registry", tls=TLS(served.cert, served.key))
    try:
        skopeo_certs = workdir / "skopeo-certs"
        skopeo_certs.mkdir()
        (skopeo_certs / "ca.crt").write_bytes(ca.cert.read_bytes())
        repo = "auth/tls"
        ref, digest = _push_image(workdir, registry, repo, cert_dir=skopeo_certs)
        yield TLSBed(registry, repo, ref, digest, ca, other_ca)
    finally:
        registry.stop()


# -- helpers ----------------------------------------------------------------------------------


def _assert_pulled(result: Result, bed: Bed, imaged: Imaged) -> None:
    assert result.code == 0, result.err
    assert result.out.strip().splitlines()[-1] == bed.digest
    listing = imaged("--json", "images").json()
    assert [image["id"] for image in listing] == [bed.digest]
    assert listing[0]["refs"] == [bed.ref]


def _error_line(result: Result) -> str:
    """The one ``imaged: error:`` line, which must end stderr; exit status 1."""
    assert result.code == 1, (result.out, result.err)
    errors = [line for line in result.err.splitlines() if line.startswith("imaged: error:")]
    assert len(errors) == 1, result.err
    assert result.err.strip().splitlines()[-1] == errors[0]
    return errors[0]


def _assert_nothing_recorded(imaged: Imaged) -> None:
    assert imaged("--json", "images").json() == []


def _assert_secret_absent(result: Result, root: Path, user: str, password: str) -> None:
    """Neither the password nor a basic ``auth`` value made of it leaks anywhere we can see."""
    forms = secret_forms(user, password)
    for form in forms:
        assert form.decode() not in result.out
        assert form.decode() not in result.err
    db = root / "metadata.db"
    assert db.is_file(), "the store was never opened: nothing was tested"
    for path in (db, db.with_name("metadata.db-wal")):
        if path.exists():
            data = path.read_bytes()
            assert not any(form in data for form in forms), f"secret in {path}"
    assert files_containing(root, forms) == []


def _docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc: dict[str, Any]) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(write_docker_config(tmp_path / "docker", doc)))


def _auths(host: str, user: str, password: str) -> dict[str, Any]:
    return {"auths": {host: basic_entry(user, password)}}


# -- basic auth -------------------------------------------------------------------------------


def test_basic_pull_with_docker_config_auths(basic_bed: Bed, imaged: Imaged, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _docker_config(tmp_path, monkeypatch, _auths(basic_bed.host, USER, PASSWORD))
    _assert_pulled(imaged("pull", basic_bed.ref), basic_bed, imaged)


@pytest.mark.parametrize("key", ["{host}", "{host}/auth", "https://{host}"])
def test_basic_pull_with_registry_auth_file(basic_bed: Bed, imaged: Imaged, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """Podman's auth.json: keyed by host, by a repository namespace, or by a URL."""
    auth_file = write_auth_file(tmp_path / "containers" / "auth.json",
                                key.format(host=basic_bed.host), USER, PASSWORD)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    _assert_pulled(imaged("pull", basic_bed.ref), basic_bed, imaged)


def test_basic_pull_with_credential_helper(basic_bed: Bed, imaged: Imaged, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    asked = tmp_path / "helper-asked.log"
    write_credential_helper(bin_dir, "imagedtest", basic_bed.host, USER, PASSWORD, asked)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    _docker_config(tmp_path, monkeypatch, {"credHelpers": {basic_bed.host: "imagedtest"}})
    _assert_pulled(imaged("pull", basic_bed.ref), basic_bed, imaged)
    assert asked.read_text().splitlines()[0] == basic_bed.host


def test_basic_pull_without_credentials_fails(basic_bed: Bed, imaged: Imaged) -> None:
    result = imaged("pull", basic_bed.ref)
    line = _error_line(result)
    assert basic_bed.host in line
    assert "requires authentication" in line or "authentication is required" in line
    assert "rejected" not in line
    _assert_nothing_recorded(imaged)


def test_basic_pull_with_wrong_password_is_rejected_without_leaking(
        basic_bed: Bed, imaged_proc: Imaged, imaged: Imaged, root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real process, with ``--json``, so both the error line and the JSON error are checked."""
    _docker_config(tmp_path, monkeypatch, _auths(basic_bed.host, USER, WRONG))
    result = imaged_proc("--json", "pull", basic_bed.ref)
    line = _error_line(result)
    assert basic_bed.host in line
    assert "rejected the credentials" in line
    error = result.json()["error"]
    assert error["code"] == "registry"
    assert "rejected the credentials" in error["message"]
    _assert_secret_absent(result, root, USER, WRONG)
    _assert_nothing_recorded(imaged)


# -- token auth -------------------------------------------------------------------------------


def _registry_gets(registry: LocalRegistry, repo: str, since: int) -> list[str]:
    """Access-log lines of GETs on the repository answered 200, written after byte ``since``."""
    with registry.log_path.open("rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    return [line for line in text.splitlines()
            if f'"GET /v2/{repo}/' in line and '" 200 ' in line]


def test_token_pull_asks_for_pull_scope_with_credentials(
        token_bed: TokenBed, imaged: Imaged, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _docker_config(tmp_path, monkeypatch, _auths(token_bed.host, USER, PASSWORD))
    token_bed.tokens.clear()
    result = imaged("pull", token_bed.ref)
    if result.code != 0:
        pytest.fail(f"{result.err}\nregistry log:\n{token_bed.registry.log()[-4000:]}")
    _assert_pulled(result, token_bed, imaged)
    requests = token_bed.tokens.requests
    assert requests, "the token server was never asked"
    for request in requests:
        assert request.service == SERVICE
        assert request.scopes == (f"repository:{token_bed.repo}:pull",)
        assert request.user == USER
        assert request.granted


def test_token_is_fetched_once_and_reused_for_every_request(
        token_bed: TokenBed, imaged: Imaged, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _docker_config(tmp_path, monkeypatch, _auths(token_bed.host, USER, PASSWORD))
    token_bed.tokens.clear()
    since = token_bed.registry.log_path.stat().st_size
    result = imaged("pull", token_bed.ref)
    _assert_pulled(result, token_bed, imaged)
    assert len(token_bed.tokens.requests) == 1
    # Manifest, config and two layers were each served with that one token.
    deadline = time.monotonic() + 5
    gets = _registry_gets(token_bed.registry, token_bed.repo, since)
    while len(gets) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
        gets = _registry_gets(token_bed.registry, token_bed.repo, since)
    assert len(gets) >= 4, gets
    assert sum("/blobs/" in line for line in gets) >= 3, gets


def test_token_pull_with_wrong_password_is_rejected_without_leaking(
        token_bed: TokenBed, imaged: Imaged, root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _docker_config(tmp_path, monkeypatch, _auths(token_bed.host, USER, WRONG))
    token_bed.tokens.clear()
    result = imaged("pull", token_bed.ref)
    line = _error_line(result)
    assert token_bed.host in line
    assert "rejected the credentials" in line
    _assert_secret_absent(result, root, USER, WRONG)
    _assert_nothing_recorded(imaged)
    requests = token_bed.tokens.requests
    assert requests
    assert all(r.user == USER and not r.granted for r in requests)


def test_token_pull_without_credentials_fails(token_bed: TokenBed, imaged: Imaged) -> None:
    token_bed.tokens.clear()
    line = _error_line(imaged("pull", token_bed.ref))
    assert token_bed.host in line
    assert "requires authentication" in line or "authentication is required" in line
    assert all(r.user is None for r in token_bed.tokens.requests)
    _assert_nothing_recorded(imaged)


# -- HTTPS with certs.d -----------------------------------------------------------------------


@pytest.fixture
def verified_tls(tls_bed: TLSBed, isolated_env: dict[str, str], tmp_path: Path) -> Path:
    """Turn verification on for the TLS registry; returns its certs.d directory (not created)."""
    certs_dir = tmp_path / "certs.d"
    write_imaged_config(Path(isolated_env["IMAGED_CONFIG"]), certs_dir, {tls_bed.host: False})
    return certs_dir / tls_bed.host


def test_tls_pull_with_ca_in_certs_d(tls_bed: TLSBed, verified_tls: Path,
                                     imaged: Imaged) -> None:
    verified_tls.mkdir(parents=True)
    (verified_tls / "ca.crt").write_bytes(tls_bed.ca.cert.read_bytes())
    _assert_pulled(imaged("pull", tls_bed.ref), tls_bed, imaged)


def test_tls_pull_with_ca_in_the_systems_store(tls_bed: TLSBed, verified_tls: Path,
                                               imaged_proc: Imaged, imaged: Imaged) -> None:
    """A CA the system trusts needs no certs.d, as with containerd and Podman: OpenSSL's
    ``SSL_CERT_FILE`` stands in for ``/etc/ssl/certs`` (requests' own bundle, certifi, ignores
    it)."""
    result = imaged_proc("pull", tls_bed.ref, env={"SSL_CERT_FILE": str(tls_bed.ca.cert)})
    _assert_pulled(result, tls_bed, imaged)


@pytest.mark.parametrize("ca", ["none", "other"])
def test_tls_pull_with_untrusted_certificate_fails(tls_bed: TLSBed, verified_tls: Path,
                                                   imaged: Imaged, ca: str) -> None:
    """No CA for the host, or another CA: verification fails, no plain-HTTP fallback."""
    if ca == "other":
        verified_tls.mkdir(parents=True)
        (verified_tls / "ca.crt").write_bytes(tls_bed.other_ca.cert.read_bytes())
    line = _error_line(imaged("pull", tls_bed.ref))
    assert tls_bed.host in line
    assert "not trusted" in line
    assert "certs.d" in line
    _assert_nothing_recorded(imaged)


def test_tls_loopback_default_is_insecure_and_quiet(tls_bed: TLSBed, imaged_proc: Imaged,
                                                    imaged: Imaged) -> None:
    """Without ``insecure = false`` a loopback registry is not verified (Docker's default), and
    that deliberate choice prints no Python warnings between the progress lines."""
    result = imaged_proc("pull", tls_bed.ref)
    _assert_pulled(result, tls_bed, imaged)
    assert "Warning" not in result.err, result.err
