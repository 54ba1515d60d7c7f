"""Schemathesis against the OpenAPI document, over the real socket of a real daemon.

Positive and negative cases (wrong types, unknown fields, odd names and paths) for every
operation, a bounded number each; the daemon must never answer 5xx, and every answer must be
one the document declares. The store is empty on purpose: no generated request can find an image
to create a container on, so no fuzzed ``target`` is ever mounted over. Pull is left out: a
generated valid reference would send the daemon to arbitrary hosts on the network; its bad
input is covered by name in test_daemon.py.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import urllib3.connection
import urllib3.connectionpool
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter

from tests.conftest import Daemon

SCHEMA = schemathesis.openapi.from_dict(
    json.loads(resources.files("imaged.server").joinpath("openapi.json").read_text()))


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__("imaged", **kwargs)
        self.unix_path = path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.unix_path)
        return sock


class _UnixPool(urllib3.connectionpool.HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("imaged")
        self.unix_path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.unix_path)


class _UnixAdapter(HTTPAdapter):
    """requests over AF_UNIX: every URL goes to one socket, as curl --unix-socket does."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.pool = _UnixPool(str(path))

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> _UnixPool:
        return self.pool

    def close(self) -> None:
        self.pool.close()
        super().close()


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[requests.Session]:
    home = tmp_path_factory.mktemp("fuzz")
    (home / "imaged.toml").write_text("")
    daemon = Daemon(home / "root", {"IMAGED_CONFIG": str(home / "imaged.toml"),
                                    "HOME": str(home)})
    with requests.Session() as http:
        http.mount("http://", _UnixAdapter(daemon.socket))
        yield http
        assert daemon.proc.poll() is None, f"the daemon died: {daemon.output()}"
        assert "Traceback" not in daemon.output(), daemon.output()
    daemon.close()


@SCHEMA.exclude(path="/v1/images/pull").parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_api_never_fails_and_answers_as_documented(case: schemathesis.Case[Any],
                                                   session: requests.Session) -> None:
    # positive_data_acceptance is left out: a reference's grammar (and an ID prefix's minimum
    # of 12 hex digits) is more than a JSON schema says, so a schema-valid "0" is rightly a 400.
    case.call_and_validate(session=session, base_url="http://imaged",
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])
