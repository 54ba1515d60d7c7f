"""Test bed for registries that want credentials or TLS: certificates made with the ``openssl``
CLI, htpasswd files, a token server of our own, credential files and helpers, secret scanning.

Nothing here needs a Python dependency beyond the standard library: keys, certificates and JWT
signatures come from ``openssl`` run as a subprocess.
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOKEN_LIFETIME = 300  # seconds


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def openssl(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> bytes:
    proc = subprocess.run(["openssl", *args], input=stdin, capture_output=True, cwd=cwd,
                          check=False, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def self_signed(directory: Path, name: str, common_name: str) -> CertPair:
    """An RSA-2048 key and a self-signed CA certificate for it (a root of trust)."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
            "-keyout", str(pair.key), "-out", str(pair.cert), "-subj", f"/CN={common_name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "-addext", "subjectKeyIdentifier=hash")
    return pair


def server_cert(directory: Path, ca: CertPair, ip: str = "127.0.0.1") -> CertPair:
    """A server certificate for ``ip`` (subjectAltName IP:…) signed by ``ca``."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / "server.crt", directory / "server.key")
    csr = directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName=IP:{ip}\n"
                   "basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n"
                   "subjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pair.key),
            "-out", str(csr), "-subj", f"/CN={ip}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
            "-CAcreateserial", "-CAserial", str(directory / "ca.srl"), "-sha256", "-days", "2",
            "-extfile", str(ext), "-out", str(pair.cert))
    return pair


def der_base64(cert: Path) -> str:
    """A PEM certificate as standard base64 of its DER bytes, as JWS ``x5c`` wants it."""
    der = openssl("x509", "-in", str(cert), "-outform", "DER")
    return base64.b64encode(der).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(claims: dict[str, Any], signer: CertPair, x5c: list[str]) -> str:
    """An RS256 JWS (compact form) over ``claims``, its certificate chain in the header."""
    header = {"typ": "JWT", "alg": "RS256", "x5c": x5c}
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     b64url(json.dumps(claims, separators=(",", ":")).encode()))
    signature = openssl("dgst", "-sha256", "-sign", str(signer.key),
                        stdin=signing_input.encode())
    return signing_input + "." + b64url(signature)


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, unverified (for assertions only)."""
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(
        payload) % 4)))
    return decoded


# -- basic auth -------------------------------------------------------------------------------


def htpasswd_file(path: Path, user: str, password: str) -> Path:
    """A bcrypt htpasswd file (distribution accepts only bcrypt)."""
    proc = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True,
                          check=False, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"htpasswd failed ({proc.returncode}): {proc.stderr.strip()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(proc.stdout)
    return path


# -- the token server ---------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """What one request to the token endpoint asked for; never the secret it carried."""

    service: str | None
    scopes: tuple[str, ...]
    user: str | None  # None: no Authorization header
    granted: bool
    token: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    bed: TokenServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads ``TokenServer.requests`` instead."""

    def do_GET(self) -> None:
        bed = self.server.bed
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        service = query.get("service", [None])[0]
        scopes = tuple(query.get("scope", []))
        user, password = _basic_credentials(self.headers.get("Authorization"))
        ok = url.path == "/token" and user is not None and bed.users.get(user) == password
        token = bed.issue(user or "", scopes) if ok else None
        bed.record(TokenRequest(service, scopes, user, ok, token))
        if token is None:
            self._reply(401, {"errors": [{"code": "UNAUTHORIZED",
                                          "message": "authentication required"}]},
                        {"WWW-Authenticate": 'Basic realm="imaged-test-token"'})
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._reply(200, {"token": token, "access_token": token,
                          "expires_in": TOKEN_LIFETIME, "issued_at": now}, {})

    def _reply(self, status: int, doc: dict[str, Any], headers: dict[str, str]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _basic_credentials(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None, None
    return user, password


def parse_scope(scope: str) -> dict[str, Any] | None:
    """``repository:NAME:ACTIONS`` → one ``access`` entry, or None for anything else."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind != "repository" or not name or not actions:
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


class TokenServer:
    """Distribution's token endpoint, in a background thread on 127.0.0.1.

    Checks basic credentials against ``users`` and issues an RS256 JWT whose ``x5c`` carries the
    signing certificate (the registry's ``rootcertbundle``), granting exactly the pull and push
    actions each ``scope`` parameter asks for.
    """

    def __init__(self, workdir: Path, users: dict[str, str], service: str, issuer: str) -> None:
        self.users = users
        self.service = service
        self.issuer = issuer
        self.signer = self_signed(workdir, "token-signer", "imaged test token signer")
        self._x5c = [der_base64(self.signer.cert)]
        self._requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.bed = self
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="token-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def rootcertbundle(self) -> Path:
        return self.signer.cert

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    def issue(self, user: str, scopes: Iterable[str]) -> str:
        access = [entry for entry in (parse_scope(s) for s in scopes) if entry is not None]
        for entry in access:
            entry["actions"] = [a for a in entry["actions"] if a in ("pull", "push")]
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + TOKEN_LIFETIME,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return sign_jwt(claims, self.signer, self._x5c)

    def record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()


# -- credentials for imaged -----------------------------------------------------------------


def basic_entry(user: str, password: str) -> dict[str, str]:
    """An ``auths`` entry as ``docker login`` and ``podman login`` write it."""
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def write_docker_config(directory: Path, doc: dict[str, Any]) -> Path:
    """``DIR/config.json``; returns DIR, the value for ``$DOCKER_CONFIG``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(doc, indent=1))
    return directory


def write_auth_file(path: Path, key: str, user: str, password: str) -> Path:
    """A Podman ``auth.json`` (for ``$REGISTRY_AUTH_FILE``) with one entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {key: basic_entry(user, password)}}, indent=1))
    return path


def write_credential_helper(bin_dir: Path, name: str, server: str, user: str, password: str,
                            log: Path) -> Path:
    """A ``docker-credential-NAME`` that knows one server and logs every server it is asked for.

    As the real helpers do: ``get`` reads the server on stdin, answers JSON for a known one and
    "credentials not found" with exit 1 for others.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    answer = json.dumps({"ServerURL": server, "Username": user, "Secret": password})
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || {{ echo "unsupported: $1" >&2; exit 1; }}\n'
        "IFS= read -r server\n"
        f"printf '%s\\n' \"$server\" >> {shlex.quote(str(log))}\n"
        f'if [ "$server" = {shlex.quote(server)} ]; then\n'
        f"  printf '%s\\n' {shlex.quote(answer)}\n"
        "else\n"
        '  echo "credentials not found in native keychain"\n'
        "  exit 1\n"
        "fi\n"
    )
    script.chmod(0o755)
    return script


def write_imaged_config(path: Path, certs_dir: Path, insecure: dict[str, bool]) -> None:
    """The test's config file: ``certs_dirs`` plus ``registries."HOST".insecure`` per host."""
    lines = [f'certs_dirs = ["{certs_dir}"]']
    for host, value in insecure.items():
        lines += ["", f'[registries."{host}"]', f"insecure = {'true' if value else 'false'}"]
    path.write_text("\n".join(lines) + "\n")


# -- secret scanning ------------------------------------------------------------------------


def secret_forms(user: str, password: str) -> list[bytes]:
    """The ways a password could leak: as is, and inside a basic ``auth`` value."""
    pair = f"{user}:{password}".encode()
    return [password.encode(), base64.b64encode(pair)]


def files_containing(root: Path, needles: Iterable[bytes]) -> list[Path]:
    """Every file under ``root`` whose bytes contain one of ``needles``."""
    wanted = list(needles)
    return sorted(path for path in root.rglob("*")
                  if path.is_file() and any(n in path.read_bytes() for n in wanted))
