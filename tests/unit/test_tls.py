"""certs.d handling: extra CAs (*.crt) and client certificates (*.cert + *.key) per registry.

Certificates are made with the openssl CLI; the contexts are then proven with a real TLS
handshake over memory BIOs (no sockets), the server requiring a client certificate.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imaged.config import Config
from imaged.errors import RegistryError
from imaged.registry_client.client import Endpoint, RegistryClient, _TLSAdapter
from imaged.registry_client.tls import ssl_context_for

HOST = "registry.example.com:5000"
SERVER_NAME = "registry.example.com"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class PKI:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_key: Path


def _leaf(directory: Path, name: str, subject: str, extensions: str) -> None:
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
            "-out", f"{name}.crt", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:  # pragma: no cover - Debian images have it
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-sha256",
            "-subj", "/CN=imaged test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    common = ("basicConstraints=critical,CA:FALSE\n"
              "keyUsage=critical,digitalSignature\n"
              "subjectKeyIdentifier=hash\n"
              "authorityKeyIdentifier=keyid,issuer\n")
    _leaf(d, "server", f"/CN={SERVER_NAME}",
          common + f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{SERVER_NAME}\n")
    _leaf(d, "client", "/CN=imaged test client", common + "extendedKeyUsage=clientAuth\n")
    openssl("genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-out", "other.key", cwd=d)
    return PKI(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
               d / "client.key", d / "other.key")


def host_dir(certs: Path, host: str = HOST) -> Path:
    path = certs / host
    path.mkdir(parents=True)
    return path


def handshake(client: ssl.SSLContext, pki: PKI, require_client_cert: bool) -> str | None:
    """Run a full TLS handshake in memory; returns the client subject CN the server saw."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_verify_locations(cafile=pki.ca_cert)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=SERVER_NAME)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", c), ("server", s)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client certificate after the client thinks it is
            # done; a round of application data makes any refusal surface.
            c.write(b"ping")
            s_in.write(c_out.read())
            assert s.read(4) == b"ping"
            break
    else:  # pragma: no cover
        raise AssertionError("handshake did not finish")
    peer = s.getpeercert()
    if not peer:
        return None
    names = common_names(peer)
    assert len(names) == 1
    return names.pop()


def common_names(cert: Any) -> set[str]:
    names = set()
    for rdn in cert["subject"]:
        for key, value in rdn:
            if key == "commonName":
                names.add(str(value))
    return names


def ca_names(ctx: ssl.SSLContext) -> set[str]:
    names: set[str] = set()
    for cert in ctx.get_ca_certs():
        names |= common_names(cert)
    return names


def test_no_certs_dirs_means_none(tmp_path: Path) -> None:
    assert ssl_context_for(HOST, []) is None
    assert ssl_context_for(HOST, [tmp_path / "absent"]) is None


def test_no_dir_for_this_host_means_none(tmp_path: Path, pki: PKI) -> None:
    certs = tmp_path / "certs.d"
    shutil.copy(pki.ca_cert, host_dir(certs, "other.example.com:5000") / "ca.crt")
    host_dir(certs, SERVER_NAME)  # same name without the port is another registry
    (certs / "file-not-dir").write_text("")
    assert ssl_context_for(HOST, [certs]) is None
    assert ssl_context_for("file-not-dir", [certs]) is None


def test_empty_host_dir_gives_a_default_context(tmp_path: Path, pki: PKI) -> None:
    certs = tmp_path / "certs.d"
    host_dir(certs)
    ctx = ssl_context_for(HOST, [certs])
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert "imaged test CA" not in ca_names(ctx)
    # Without our CA the server's certificate is not trusted.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ctx, pki, require_client_cert=False)


def test_crt_files_are_trusted_cas(tmp_path: Path, pki: PKI) -> None:
    certs = tmp_path / "certs.d"
    shutil.copy(pki.ca_cert, host_dir(certs) / "ca.crt")
    ctx = ssl_context_for(HOST, [certs])
    assert ctx is not None
    assert "imaged test CA" in ca_names(ctx)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert handshake(ctx, pki, require_client_cert=False) is None


def test_cert_and_key_pair_is_the_client_certificate(tmp_path: Path, pki: PKI) -> None:
    certs = tmp_path / "certs.d"
    directory = host_dir(certs)
    shutil.copy(pki.ca_cert, directory / "ca.crt")
    shutil.copy(pki.client_cert, directory / "client.cert")
    shutil.copy(pki.client_key, directory / "client.key")
    ctx = ssl_context_for(HOST, [certs])
    assert ctx is not None
    assert handshake(ctx, pki, require_client_cert=True) == "imaged test client"


def test_without_client_cert_a_server_requiring_one_refuses(tmp_path: Path, pki: PKI) -> None:
    certs = tmp_path / "certs.d"
    shutil.copy(pki.ca_cert, host_dir(certs) / "ca.crt")
    ctx = ssl_context_for(HOST, [certs])
    assert ctx is not None
    with pytest.raises(ssl.SSLError):
        handshake(ctx, pki, require_client_cert=True)


def test_several_certs_dirs_are_combined(tmp_path: Path, pki: PKI) -> None:
    docker, containers = tmp_path / "docker-certs.d", tmp_path / "containers-certs.d"
    shutil.copy(pki.ca_cert, host_dir(docker) / "ca.crt")
    client_dir = host_dir(containers)
    shutil.copy(pki.client_cert, client_dir / "me.cert")
    shutil.copy(pki.client_key, client_dir / "me.key")
    ctx = ssl_context_for(HOST, [docker, tmp_path / "absent", containers])
    assert ctx is not None
    assert handshake(ctx, pki, require_client_cert=True) == "imaged test client"


def test_other_files_are_ignored(tmp_path: Path, pki: PKI) -> None:
    certs = tmp_path / "certs.d"
    directory = host_dir(certs)
    shutil.copy(pki.ca_cert, directory / "ca.crt")
    (directory / "README").write_text("not a certificate")
    (directory / "ca.pem").write_text("not loaded: only .crt is a CA")
    shutil.copy(pki.other_key, directory / "lonely.key")  # a key without a .cert is ignored
    ctx = ssl_context_for(HOST, [certs])
    assert ctx is not None
    assert "imaged test CA" in ca_names(ctx)


def test_cert_without_key_is_an_error(tmp_path: Path, pki: PKI) -> None:
    certs = tmp_path / "certs.d"
    directory = host_dir(certs)
    shutil.copy(pki.client_cert, directory / "client.cert")
    shutil.copy(pki.client_key, directory / "client.pem")
    with pytest.raises(RegistryError) as info:
        ssl_context_for(HOST, [certs])
    assert info.value.message == (f"client certificate {directory / 'client.cert'} has no key "
                                  "client.key")


def test_cert_with_the_wrong_key_is_an_error(tmp_path: Path, pki: PKI) -> None:
    certs = tmp_path / "certs.d"
    directory = host_dir(certs)
    shutil.copy(pki.client_cert, directory / "client.cert")
    shutil.copy(pki.other_key, directory / "client.key")
    with pytest.raises(RegistryError) as info:
        ssl_context_for(HOST, [certs])
    assert info.value.message.startswith(
        f"cannot load {directory / 'client.cert'} for registry {HOST}: ")


@pytest.mark.parametrize("content", ["garbage", "-----BEGIN CERTIFICATE-----\nAAAA\n"
                                                 "-----END CERTIFICATE-----\n", ""])
def test_bad_ca_file_is_an_error(tmp_path: Path, content: str) -> None:
    certs = tmp_path / "certs.d"
    directory = host_dir(certs)
    (directory / "ca.crt").write_text(content)
    with pytest.raises(RegistryError) as info:
        ssl_context_for(HOST, [certs])
    assert info.value.message.startswith(f"cannot load {directory / 'ca.crt'} for registry {HOST}")


def test_unreadable_crt_directory_entry_is_an_error(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    directory = host_dir(certs)
    (directory / "ca.crt").mkdir()  # a directory where a file should be
    with pytest.raises(RegistryError, match="cannot load"):
        ssl_context_for(HOST, [certs])


def test_a_client_verifies_every_host_with_one_context_loaded_once(tmp_path: Path,
                                                                   pki: PKI) -> None:
    """urllib3 would build a context and parse the CA bundle for each new connection (about
    25 ms holding the GIL); the client's sessions share one, for their own host and for any
    host a redirect leads to, and a host with certs.d keeps its own."""
    (tmp_path / HOST).mkdir()
    shutil.copy(pki.ca_cert, tmp_path / HOST / "ca.crt")
    client = RegistryClient(Config(certs_dirs=(tmp_path,)), environ={})
    try:
        def context(host: str, url: str) -> ssl.SSLContext:
            session = client._session(Endpoint(host, f"https://{host}", False, True, False))
            adapter = session.get_adapter(url)
            assert isinstance(adapter, _TLSAdapter), adapter
            return adapter._context

        shared = context("registry-1.docker.io", "https://registry-1.docker.io/v2/")
        assert context("registry-1.docker.io", "https://cdn.example/blob") is shared
        assert context("quay.io", "https://quay.io/v2/") is shared
        assert shared.verify_mode is ssl.CERT_REQUIRED and shared.check_hostname
        own = context(HOST, f"https://{HOST}/v2/")
        assert own is not shared
        assert context(HOST, "https://cdn.example/blob") is shared
    finally:
        client.close()
