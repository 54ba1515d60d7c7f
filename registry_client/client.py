"""The registry client: the requests shell around the pure parts of this package.

Shape of the concurrency: every HTTP exchange runs in a worker thread via
``trio.to_thread.run_sync`` under one ``CapacityLimiter``; decisions (retry or not, how long to
wait, which mirror next) are made back on the trio side, so waits are ``trio.sleep`` and cancel
cleanly. A blob download is one thread call per attempt; inside it the thread checks for
cancellation per chunk and reports progress at most ten times a second.

Every request has connect and read timeouts, because a thread cannot be cancelled while it is
blocked in the kernel.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import functools
import hashlib
import http.client
import itertools
import logging
import mmap
import queue
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import requests
import trio
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from imaged.config import Config
from imaged.digest import Digest
from imaged.errors import (
    NO_SPACE_ERRNOS,
    ContentError,
    ImagedError,
    NoSpaceError,
    NotFoundError,
    RegistryError,
    os_failure,
)
from imaged.faults import pause_point
from imaged.registry_client.auth import (
    Challenge,
    Credentials,
    Token,
    TokenCache,
    parse_challenges,
    parse_token_response,
)
from imaged.registry_client.credentials import lookup_credentials
from imaged.registry_client.manifest import ACCEPT, Descriptor
from imaged.registry_client.reference import DOCKER_HUB, Reference, is_loopback_host
from imaged.registry_client.retry import (
    RETRY_STATUSES,
    RetryPolicy,
    parse_content_range,
    parse_retry_after,
)
from imaged.registry_client.tls import ssl_context_for
from imaged.sizes import format_size
from imaged.store.content import Ingest

log = logging.getLogger("imaged.registry")

T = TypeVar("T")
# An insecure registry is the operator's explicit choice (or loopback, Docker's default), so
# urllib3's per-request warning about skipping verification is noise on stderr, not news.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
CHUNK = 1024 * 1024
TIMEOUT = (10.0, 60.0)  # connect, read: a registry silent for a minute is treated as dropped
PROGRESS_INTERVAL = 0.1
# A mirror gets one retry, and a short Retry-After, before it is passed over: the registry behind
# it is still there, so backing off for the registry's full budget only delays the pull.
MIRROR_ATTEMPTS = 2
MIRROR_RETRY_AFTER_CAP = 5.0
MAX_REDIRECTS = 5
_PIPELINE_DEPTH = 16
_INLINE_BYTES = 4 * 1024 * 1024  # below this a blob is fetched in one thread call
USER_AGENT = "imaged/0.1"
# What a dropped or broken connection raises, read through urllib3 or straight from http.client.
_TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError,
                     http.client.HTTPException, OSError)


class _Retryable(Exception):
    """An attempt failed in a way another attempt may not: 429/5xx, a dropped connection."""

    def __init__(self, message: str, retry_after: float | None = None,
                 progressed: bool = False, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.progressed = progressed
        self.offset = offset  # where a download got to: only new ground counts as progress


class _TLSAdapter(HTTPAdapter):
    """Uses the registry's certs.d context; requests' documented way to bring one's own."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(pool_maxsize=16)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert)
        if verify is not False:
            pool_kwargs["ssl_context"] = self._context
            pool_kwargs.pop("ca_certs", None)
            pool_kwargs.pop("ca_cert_dir", None)
        return host_params, pool_kwargs


@dataclass
class Endpoint:
    """One place to fetch a repository from: a mirror or the registry itself."""

    host: str  # host[:port] for messages, credentials and auth scope
    base: str  # scheme://host[:port][/prefix], no trailing slash
    may_downgrade: bool  # https failed at TLS level → try plain http (insecure and loopback)
    verify: bool
    mirror: bool
    namespace: str = ""  # for a mirror, the registry it stands in for (containerd's ``ns``)


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str | None
    digest: Digest


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and exceptions wrapped in ``args`` (requests and urllib3
    wrap that way), nearest first, each once."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is known for known in out):
            continue
        out.append(current)
        todo.extend(e for e in (current.__cause__, current.__context__, *current.args)
                    if isinstance(e, BaseException))
    return out


def _describe_connection_error(host: str, exc: BaseException) -> str:
    for seen in _chain(exc):
        if isinstance(seen, ConnectionRefusedError) or (
            isinstance(seen, OSError) and seen.errno == errno.ECONNREFUSED
        ):
            return f"cannot reach registry {host}: connection refused"
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"TLS certificate of registry {host} is not trusted ({seen.verify_message}); "
                    f"put its CA in /etc/docker/certs.d/{host}/ca.crt")
        if "Name or service not known" in str(seen) or "nodename nor servname" in str(seen):
            return f"cannot reach registry {host}: name does not resolve"
    return f"cannot reach registry {host}: {type(exc).__name__}"


def _is_definitive(exc: BaseException) -> bool:
    """Failures another attempt cannot fix: nothing listening, a name that does not resolve, TLS."""
    text = _describe_connection_error("", exc)
    return "connection refused" in text or "does not resolve" in text or "TLS" in text


class RegistryClient:
    def __init__(self, config: Config, limiter: trio.CapacityLimiter | None = None,
                 environ: Mapping[str, str] | None = None,
                 policy: RetryPolicy | None = None) -> None:
        self.config = config
        self.limiter = limiter or trio.CapacityLimiter(config.limits.concurrent_downloads + 2)
        self.environ = environ
        self.policy = policy or RetryPolicy()
        self.tokens = TokenCache()
        self._challenges: dict[str, Challenge] = {}
        self._credentials: dict[tuple[str, str], Credentials | None] = {}
        self._sessions: dict[str, requests.Session] = {}
        self._endpoints: dict[str, list[Endpoint]] = {}

    @functools.cached_property
    def _verifying_context(self) -> ssl.SSLContext:
        """The system's CAs, as certs.d's contexts start from (``tls.ssl_context_for``), and as
        containerd and Podman verify, loaded once per client. Left to itself urllib3 builds a
        context for each new connection and parses requests' CA bundle into it (about 25 ms
        here, holding the GIL, so the event loop waits too), for every connection to a
        registry, its token service and the CDN its blobs redirect to; and those were certifi's
        CAs, not the system's the docs promised (docs/registries.md)."""
        return ssl.create_default_context()

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()

    # -- endpoints and sessions ------------------------------------------------------------

    def endpoints(self, domain: str) -> list[Endpoint]:
        if domain in self._endpoints:
            return self._endpoints[domain]
        settings = self.config.registry(domain)
        insecure = settings.insecure if settings.insecure is not None else is_loopback_host(domain)
        out: list[Endpoint] = []
        for url in settings.mirrors:
            parsed = urllib.parse.urlsplit(url)
            out.append(Endpoint(parsed.netloc, url, False, not insecure, True, domain))
        host = "registry-1.docker.io" if domain == DOCKER_HUB else domain
        out.append(Endpoint(domain, f"https://{host}", insecure, not insecure, False))
        self._endpoints[domain] = out
        return out

    def _session(self, endpoint: Endpoint) -> requests.Session:
        session = self._sessions.get(endpoint.host)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            session.trust_env = False  # no proxies or .netrc credentials behind our back
            # Every https URL (a redirect's to a CDN too) gets the client's one verifying
            # context; a host with certs.d its own (requests picks the longest prefix).
            session.mount("https://", _TLSAdapter(self._verifying_context))
            context = ssl_context_for(endpoint.host, self.config.certs_dirs)
            if context is not None:
                session.mount(f"https://{endpoint.host}/", _TLSAdapter(context))
            self._sessions[endpoint.host] = session
        return session

    def _creds(self, host: str, repo: str) -> Credentials | None:
        key = (host, repo)
        if key not in self._credentials:
            self._credentials[key] = lookup_credentials(host, repo, self.environ)
        return self._credentials[key]

    # -- one HTTP exchange, with auth (runs in a worker thread) ----------------------------

    def _auth_header(self, endpoint: Endpoint, repo: str, challenge: Challenge | None,
                     session: requests.Session) -> str | None:
        if challenge is None:
            return None
        creds = self._creds(endpoint.host, repo)
        if challenge.scheme == "basic":
            if creds is None or creds.identity_token:
                raise RegistryError(
                    f"registry {endpoint.host} requires authentication for {repo} and no "
                    "credentials were found (docker login, or REGISTRY_AUTH_FILE)"
                )
            raw = f"{creds.username}:{creds.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryError(f"registry {endpoint.host} sent a Bearer challenge without realm")
        service = challenge.params.get("service", "")
        scope = f"repository:{repo}:pull"
        key = (realm, service, scope)
        token = self.tokens.get(key, time.monotonic())
        if token is None:
            token_value = self._fetch_token(endpoint, session, realm, service, scope, creds)
            self.tokens.put(key, token_value)
            token = token_value.value
        return f"Bearer {token}"

    def _fetch_token(self, endpoint: Endpoint, session: requests.Session, realm: str,
                     service: str, scope: str, creds: Credentials | None) -> Token:
        realm_host = urllib.parse.urlsplit(realm).netloc or endpoint.host
        params = {"scope": scope}
        if service:
            params["service"] = service
        try:
            if creds is not None and creds.identity_token:
                resp = session.post(realm, data={
                    "grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": "imaged", **params}, timeout=TIMEOUT)
                if resp.status_code in (404, 405):
                    resp = session.get(realm, params=params, timeout=TIMEOUT)
            else:
                auth = (creds.username, creds.password) if creds is not None else None
                resp = session.get(realm, params=params, auth=auth, timeout=TIMEOUT)
        except requests.RequestException as exc:
            raise RegistryError(
                _describe_connection_error(realm_host, exc).replace("registry", "token server")
            ) from None
        if resp.status_code in (401, 403):
            if creds is None:
                raise RegistryError(
                    f"registry {endpoint.host} requires authentication and no credentials "
                    "were found (docker login, or REGISTRY_AUTH_FILE)"
                )
            raise RegistryError(f"registry {endpoint.host} rejected the credentials "
                                f"(token server {realm_host} answered {resp.status_code})")
        if resp.status_code in RETRY_STATUSES:
            raise _Retryable(f"token server {realm_host} answered {resp.status_code}",
                             parse_retry_after(resp.headers.get("Retry-After"), datetime.now(UTC)))
        if resp.status_code != 200:
            raise RegistryError(f"token server {realm_host} answered {resp.status_code}")
        return parse_token_response(resp.content, time.monotonic(), realm_host)

    def _send(self, endpoint: Endpoint, repo: str, path: str, headers: dict[str, str],
              stream: bool) -> requests.Response:
        session = self._session(endpoint)
        for auth_round in range(2):
            challenge = self._challenges.get(endpoint.host)
            request_headers = dict(headers)
            auth = self._auth_header(endpoint, repo, challenge, session)
            if auth is not None:
                request_headers["Authorization"] = auth
            base = endpoint.base
            try:
                if endpoint.mirror:
                    resp = self._get_from_mirror(endpoint, session, path, request_headers,
                                                 stream)
                else:
                    resp = session.get(base + path, headers=request_headers, stream=stream,
                                       timeout=TIMEOUT, verify=endpoint.verify)
            except (requests.exceptions.SSLError, requests.ConnectionError) as exc:
                if endpoint.base != base:  # a concurrent request downgraded it meanwhile
                    return self._send(endpoint, repo, path, headers, stream)
                if endpoint.may_downgrade and endpoint.base.startswith("https://"):
                    # Docker's rule for insecure and loopback registries: TLS first, then plain.
                    endpoint.base = "http://" + endpoint.base[len("https://"):]
                    endpoint.may_downgrade = False
                    return self._send(endpoint, repo, path, headers, stream)
                if _is_definitive(exc):
                    raise RegistryError(_describe_connection_error(endpoint.host, exc)) from None
                raise _Retryable(_describe_connection_error(endpoint.host, exc)) from None
            except requests.RequestException as exc:
                raise _Retryable(_describe_connection_error(endpoint.host, exc)) from None
            if resp.status_code != 401:
                return resp
            resp.close()
            challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
            usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
            if not usable:
                raise RegistryError(f"registry {endpoint.host} answered 401 without a usable "
                                    "authentication challenge")
            new = next((c for c in usable if c.scheme == "bearer"), usable[0])
            if new.scheme == "bearer":
                # A cached token the registry no longer accepts (restarted, key rotated) is
                # dropped so the second round fetches a fresh one.
                self.tokens.drop((new.params.get("realm", ""), new.params.get("service", ""),
                                  f"repository:{repo}:pull"))
            if auth_round == 1:
                if self._creds(endpoint.host, repo) is None:
                    raise RegistryError(
                        f"registry {endpoint.host} requires authentication for {repo} and no "
                        "credentials were found (docker login, or REGISTRY_AUTH_FILE)")
                raise RegistryError(f"registry {endpoint.host} rejected the credentials for "
                                    f"{repo}")
            self._challenges[endpoint.host] = new
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _get_from_mirror(endpoint: Endpoint, session: requests.Session, path: str,
                         headers: dict[str, str], stream: bool) -> requests.Response:
        """GET from a mirror, naming the registry it stands in for (``ns``, as containerd does,
        so a peer holding several registries' images answers a tag for the right one), and
        following redirects only within the mirror's own host: a mirror that sends us elsewhere
        is not the mirror the operator configured, and is passed over."""
        url = endpoint.base + path + "?" + urllib.parse.urlencode({"ns": endpoint.namespace})
        own = urllib.parse.urlsplit(endpoint.base).netloc
        for _ in range(MAX_REDIRECTS + 1):
            resp = session.get(url, headers=headers, stream=stream, timeout=TIMEOUT,
                               verify=endpoint.verify, allow_redirects=False)
            if not resp.is_redirect:
                return resp
            resp.close()
            url = urllib.parse.urljoin(url, resp.headers.get("Location", ""))
            target = urllib.parse.urlsplit(url)
            if target.netloc != own or target.scheme not in ("http", "https"):
                raise RegistryError(f"mirror {endpoint.host} redirected {path} to another host "
                                    f"({target.netloc or url}); a mirror must serve it itself")
        raise RegistryError(f"mirror {endpoint.host} redirected {path} more than "
                            f"{MAX_REDIRECTS} times")

    @staticmethod
    def _check_status(resp: requests.Response, endpoint: Endpoint, what: str) -> None:
        status = resp.status_code
        if status in (200, 206):
            return
        resp.close()
        if status in RETRY_STATUSES:
            raise _Retryable(
                f"registry {endpoint.host} answered {status} for {what}",
                parse_retry_after(resp.headers.get("Retry-After"), datetime.now(UTC)),
            )
        if status == 404:
            raise NotFoundError(f"{what} not found on registry {endpoint.host}")
        if status == 403:
            raise RegistryError(f"registry {endpoint.host} denied access to {what}")
        raise RegistryError(f"registry {endpoint.host} answered {status} for {what}")

    # -- retries, mirrors (trio side) ------------------------------------------------------

    def _threaded(self, fn: Callable[[], T]) -> Callable[[], Awaitable[T]]:
        return functools.partial(trio.to_thread.run_sync, fn, limiter=self.limiter)

    async def _attempts(self, operation: Callable[[], Awaitable[T]],
                        policy: RetryPolicy | None = None) -> T:
        policy = policy or self.policy
        attempt = 1
        furthest = 0
        while True:
            try:
                return await operation()
            except _Retryable as exc:
                if exc.progressed and (exc.offset is None or exc.offset > furthest):
                    furthest = exc.offset if exc.offset is not None else furthest
                    attempt = 0  # a resumed download that moved forward starts a fresh budget
                elif attempt >= policy.attempts:
                    raise RegistryError(f"{exc.message} (gave up after {attempt} attempts)") \
                        from None
                await trio.sleep(policy.delay(max(attempt, 1), exc.retry_after))
                attempt += 1

    async def _on_endpoints(self, ref: Reference,
                            operation: Callable[[Endpoint], Callable[[], Awaitable[T]]],
                            passed_over: Callable[[], None] = lambda: None) -> T:
        """Try mirrors in order, then the registry; the registry's own error is the one shown.

        A mirror is passed over for any failure, bad content included (its bytes were never
        placed: ``ContentError`` is raised before a blob leaves ingest), with one warning that
        names it, why, and what comes next; ``passed_over`` then drops what it left behind.
        """
        endpoints = self.endpoints(ref.domain)
        mirror_policy = dataclasses.replace(
            self.policy, attempts=min(self.policy.attempts, MIRROR_ATTEMPTS),
            retry_after_cap=min(self.policy.retry_after_cap, MIRROR_RETRY_AFTER_CAP))
        for endpoint, following in itertools.pairwise(endpoints):
            try:
                return await self._attempts(operation(endpoint), mirror_policy)
            except (NotFoundError, RegistryError) as exc:
                passed_over()
                after = (f"mirror {following.host}" if following.mirror
                         else f"registry {following.host}")
                log.warning("mirror %s passed over for %s: %s; trying %s", endpoint.host, ref,
                            exc.message, after)
        return await self._attempts(operation(endpoints[-1]))

    # -- public API --------------------------------------------------------------------------

    async def fetch_manifest(self, ref: Reference, obj: str, max_bytes: int) -> Fetched:
        """GET a manifest or index by tag or digest, capped at ``max_bytes`` and digest-checked."""
        what = f"manifest {ref.name}:{obj}" if ":" not in obj else f"manifest {ref.name}@{obj}"
        expected = Digest.parse(obj) if ":" in obj else None

        def operation(endpoint: Endpoint) -> Callable[[], Awaitable[Fetched]]:
            def attempt() -> Fetched:
                resp = self._send(endpoint, ref.path, f"/v2/{ref.path}/manifests/{obj}",
                                  {"Accept": ACCEPT}, stream=True)
                with resp:
                    self._check_status(resp, endpoint, what)
                    data = _read_capped(resp, max_bytes, what, endpoint.host)
                    header_digest = resp.headers.get("Docker-Content-Digest")
                    content_type = resp.headers.get("Content-Type")
                algorithm = expected.algorithm if expected is not None else "sha256"
                digest = Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
                if expected is not None and digest != expected:
                    raise ContentError(f"{what}: registry {endpoint.host} served bytes whose "
                                       f"digest is {digest}")
                claimed = None
                if header_digest:
                    with contextlib.suppress(ImagedError):
                        claimed = Digest.parse(header_digest)
                if claimed is not None and claimed.algorithm == digest.algorithm \
                        and claimed != digest:
                    raise ContentError(f"{what}: Docker-Content-Digest {claimed} does not match "
                                       f"the served bytes ({digest})")
                return Fetched(data, content_type, digest)

            return self._threaded(attempt)

        return await self._on_endpoints(ref, operation)

    async def fetch_small_blob(self, ref: Reference, desc: Descriptor, max_bytes: int) -> bytes:
        """A blob read into memory (image configs): size-capped and verified."""
        if desc.size > max_bytes:
            raise ContentError(f"blob {desc.digest} of {desc.size} bytes exceeds the "
                               f"{max_bytes}-byte limit")
        what = f"blob {desc.digest}"

        def operation(endpoint: Endpoint) -> Callable[[], Awaitable[bytes]]:
            def attempt() -> bytes:
                resp = self._send(endpoint, ref.path, f"/v2/{ref.path}/blobs/{desc.digest}",
                                  {}, stream=True)
                with resp:
                    self._check_status(resp, endpoint, what)
                    data = _read_capped(resp, desc.size, what, endpoint.host)
                if len(data) != desc.size or Digest(desc.digest.algorithm, hashlib.new(
                        desc.digest.algorithm, data).hexdigest()) != desc.digest:
                    raise ContentError(f"{what} from registry {endpoint.host} does not match its "
                                       "digest or size")
                return data

            return self._threaded(attempt)

        return await self._on_endpoints(ref, operation)

    async def fetch_blob(self, ref: Reference, desc: Descriptor, ingest: Ingest,
                         progress: Callable[[int], None] | None = None) -> None:
        """Stream a blob into ``ingest``, resuming with Range after drops; the caller verifies."""
        what = f"blob {desc.digest}"

        def operation(endpoint: Endpoint) -> Callable[[], Awaitable[None]]:
            async def attempt() -> None:
                await _BlobDownload(self, endpoint, ref, desc, ingest, what, progress).run()
                await trio.to_thread.run_sync(ingest.verify)  # bad bytes: restart, next endpoint

            return attempt

        resumed_at = ingest.offset

        def forget() -> None:
            """Bytes a passed-over mirror wrote are no prefix to resume from elsewhere."""
            if ingest.offset != resumed_at:
                ingest.restart()

        await self._on_endpoints(ref, operation, forget)

    def _open_blob(self, endpoint: Endpoint, ref: Reference, desc: Descriptor, ingest: Ingest,
                   what: str) -> requests.Response | None:
        """Start (or resume) a blob GET; None when the ingest already holds every byte."""
        if ingest.complete:
            return None
        start = ingest.offset
        headers = {"Range": f"bytes={start}-"} if start else {}
        resp = self._send(endpoint, ref.path, f"/v2/{ref.path}/blobs/{desc.digest}", headers,
                          stream=True)
        if resp.status_code == 416 and start:
            resp.close()
            whole = (resp.headers.get("Content-Range") or "").rpartition("/")[2]  # bytes */N
            if whole.isascii() and whole.isdigit() and int(whole) < desc.size:
                raise ContentError(f"{what} on registry {endpoint.host} is truncated: {whole} "
                                   f"bytes, its descriptor says {desc.size}")
            ingest.restart()
            raise _Retryable(f"registry {endpoint.host} refused to resume {what}", 0.0)
        self._check_status(resp, endpoint, what)
        if resp.status_code == 206:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None or span[0] != start or span[2] not in (None, desc.size):
                resp.close()
                ingest.restart()
                raise _Retryable(f"registry {endpoint.host} sent a bad Content-Range for "
                                 f"{what}", 0.0)
        elif start:
            ingest.restart()  # 200 to a Range request: the whole blob is coming again
        length = resp.headers.get("Content-Length", "") if resp.status_code == 200 else ""
        if length.isascii() and length.isdigit() and int(length) != desc.size:
            resp.close()  # the registry's copy is not the blob the manifest describes
            kind = "truncated" if int(length) < desc.size else "larger than declared"
            raise ContentError(f"{what} on registry {endpoint.host} is {kind}: {length} bytes, "
                               f"its descriptor says {desc.size}")
        return resp


@dataclass(eq=False)
class _BlobDownload:
    """One attempt at a blob. Large blobs go through a two-stage pipeline: one thread receives
    into reused buffers and writes them, another hashes them. sha256 costs about a core-second per
    GiB on this class of machine, about as much as receiving and writing together, so
    overlapping the two is what keeps a pull level with curl. ``_PIPELINE_DEPTH`` buffers
    circulate, so memory stays bounded whatever the size.

    Small blobs (most layers of most images) are received, written and hashed in one thread
    call: for them the pipeline's thread hops cost more than the overlap gains.
    """

    client: RegistryClient
    endpoint: Endpoint
    ref: Reference
    desc: Descriptor
    ingest: Ingest
    what: str
    progress: Callable[[int], None] | None
    # the receiver's: bytes before it are still good
    failures: list[BaseException] = field(default_factory=list, init=False)
    write_failures: list[BaseException] = field(default_factory=list, init=False)
    last_report: float = field(default=0.0, init=False)
    # the pipeline's: buffers to receive into, and buffers received but not yet hashed (None
    # once the body has ended)
    free: queue.SimpleQueue[mmap.mmap] = field(default_factory=queue.SimpleQueue, init=False)
    written: queue.SimpleQueue[tuple[mmap.mmap, int] | None] = field(
        default_factory=queue.SimpleQueue, init=False)

    async def run(self) -> None:
        if self.desc.size - self.ingest.offset <= _INLINE_BYTES:
            start = await trio.to_thread.run_sync(self._inline, limiter=self.client.limiter)
        else:
            start = await self._pipelined()
        if start is None:  # the ingest held every byte already
            return
        self._raise_failures(start)
        if self.progress is not None:
            self.progress(self.ingest.offset)

    def _open(self) -> requests.Response | None:
        return self.client._open_blob(self.endpoint, self.ref, self.desc, self.ingest, self.what)

    def _inline(self) -> int | None:
        resp = self._open()
        if resp is None:
            return None
        begun = self.ingest.offset
        buf = _receive_buffer()
        with resp:
            self._receive(resp, lambda: buf, lambda b, n: self.ingest.absorb(memoryview(b)[:n]))
        return begun

    async def _pipelined(self) -> int | None:
        resp = await trio.to_thread.run_sync(self._open, limiter=self.client.limiter)
        if resp is None:
            return None
        start = self.ingest.offset
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(trio.to_thread.run_sync, self._produce, resp,
                                                     limiter=self.client.limiter))
                nursery.start_soon(trio.to_thread.run_sync, self._digest)
        finally:
            resp.close()
        return start

    def _produce(self, resp: requests.Response) -> None:
        for _ in range(_PIPELINE_DEPTH):
            self.free.put(_receive_buffer())
        try:
            self._receive(resp, self.free.get, lambda b, n: self.written.put((b, n)))
        finally:
            self.written.put(None)

    def _digest(self) -> None:
        while (item := self.written.get()) is not None:
            buf, n = item
            self.ingest.absorb(memoryview(buf)[:n])
            self.free.put(buf)

    def _receive(self, resp: requests.Response, buffers: Callable[[], mmap.mmap],
                 sink: Callable[[mmap.mmap, int], None]) -> None:
        readinto = _readinto_of(resp)
        try:
            while True:
                trio.from_thread.check_cancelled()
                buf = buffers()
                n = readinto(memoryview(buf))
                if not n:
                    break
                if not self._write(buf, n):
                    break
                sink(buf, n)
        except _TRANSPORT_ERRORS as exc:
            self.failures.append(exc)

    def _write(self, buf: mmap.mmap, n: int) -> bool:
        try:
            self.ingest.append(memoryview(buf)[:n])
        except BaseException as exc:  # noqa: BLE001 - handed to the trio side below
            self.write_failures.append(exc)
            return False
        pause_point("mid-download")
        if self.progress is not None and time.monotonic() - self.last_report >= PROGRESS_INTERVAL:
            self.last_report = time.monotonic()
            trio.from_thread.run_sync(self.progress, self.ingest.offset)
        return True

    def _raise_failures(self, start: int) -> None:
        ingest, host = self.ingest, self.endpoint.host
        if self.write_failures:
            raise _local_failure(self.write_failures[0], ingest, self.desc.size) from None
        if self.failures:
            exc = self.failures[0]
            if isinstance(exc, ImagedError):
                raise exc
            raise _Retryable(
                f"connection to registry {host} dropped during {self.what} at byte "
                f"{ingest.offset} ({type(exc).__name__})", progressed=ingest.offset > start,
                offset=ingest.offset,
            ) from None
        if ingest.offset < self.desc.size:  # the body ended before its declared length
            raise _Retryable(f"connection to registry {host} dropped during {self.what} at "
                             f"byte {ingest.offset} of {self.desc.size}",
                             progressed=ingest.offset > start, offset=ingest.offset)


def _local_failure(exc: BaseException, ingest: Ingest, size: int) -> BaseException:
    """What writing a blob to the content store raised, as the user's error: the registry is
    fine, so it is never retried, and a full disk says how much was needed."""
    if isinstance(exc, ImagedError) or not isinstance(exc, OSError):
        return exc
    if exc.errno in NO_SPACE_ERRNOS:
        return NoSpaceError(
            f"no space left for blob {ingest.digest} in {ingest.path.parent}: it needs "
            f"{format_size(size - ingest.offset)} more ({format_size(size)} in all); free space "
            "(imaged gc also removes partial downloads) and pull again")
    return os_failure(exc, f"writing blob {ingest.digest} to", ingest.path)


def _receive_buffer() -> mmap.mmap:
    """``CHUNK`` bytes of anonymous memory, none of it touched: the kernel faults the pages in as
    the socket fills them, in a system call that runs without the GIL. ``bytearray(CHUNK)``
    zero-fills its pages holding the GIL, and in the guest kernel, where page faults are slow,
    the event loop's thread waited for it each time it woke: ``tests/guest/test_slowdisk.py``
    at 50c35a0 had ``GET /v1/info`` at up to 309 ms during a pull and thread wake-up delays of
    40-103 ms, and with these buffers at most 86 ms and 24-30 ms (the faults report at fac7a83).
    ``bytearray`` buffers made on the loop itself had held the loop 0.25 s, 0.87 s with the disk
    slowed."""
    return mmap.mmap(-1, CHUNK)


def _readinto_of(resp: requests.Response) -> Callable[[memoryview], int]:
    """The fastest way to fill a buffer from a streamed body. urllib3's ``read`` hands out a fresh
    bytes object per call and copies twice on the way; http.client's ``readinto`` fills the
    caller's buffer straight from the socket, which on loopback is the difference between half
    of curl's throughput and all of it. urllib3 only wraps the http.client response (we never ask
    it to decode), so reading the wrapped object directly skips nothing but the copies.
    """
    fp = getattr(resp.raw, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse):
        return fp.readinto
    return cast(Callable[[memoryview], int], resp.raw.readinto)


def _read_capped(resp: requests.Response, max_bytes: int, what: str, host: str) -> bytes:
    length = resp.headers.get("Content-Length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > max_bytes:
        raise ContentError(f"{what} from registry {host} is {length} bytes, over the "
                           f"{max_bytes}-byte limit")
    buf = bytearray()
    try:
        while len(buf) <= max_bytes:
            trio.from_thread.check_cancelled()
            chunk = resp.raw.read(min(65536, max_bytes + 1 - len(buf)), decode_content=False)
            if not chunk:
                break
            buf += chunk
    except _TRANSPORT_ERRORS as exc:
        raise _Retryable(f"connection to registry {host} dropped during {what} "
                         f"({type(exc).__name__})") from None
    if len(buf) > max_bytes:
        raise ContentError(f"{what} from registry {host} exceeds the {max_bytes}-byte limit")
    return bytes(buf)
