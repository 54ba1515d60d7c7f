"""The verb records (imaged.ops.verbs) against openapi.json, the CLI parser and the requests the
CLI sends the daemon: one description, and every surface derived from it agrees."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from typing import Any

import pytest

from imaged.cli.main import build_parser, request_for
from imaged.ops import verbs
from imaged.ops.verbs import VERBS, Verb

_KINDS = {str: "string", int: "integer", bool: "boolean"}


def _document() -> dict[str, Any]:
    return dict(json.loads(resources.files("imaged.server").joinpath("openapi.json")
                           .read_text()))


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return dict(node)


def _routed() -> dict[tuple[str, str], Verb]:
    return {(verb.route.method.lower(), f"/v1/{verb.route.path}"): verb
            for verb in VERBS if verb.route is not None}


def test_every_route_is_documented_and_every_documented_operation_routed() -> None:
    documented = {(method, path) for path, item in _document()["paths"].items()
                  for method in item if method != "parameters"}
    assert documented == set(_routed()) | {("get", "/v1/openapi.json")}


@pytest.mark.parametrize(("method", "path"), sorted(_routed()))
def test_a_routes_parameters_are_the_documented_ones(method: str, path: str) -> None:
    document = _document()
    verb = _routed()[method, path]
    item = document["paths"][path]
    operation = item[method]
    assert operation["operationId"] == verb.operation_id
    declared = [*item.get("parameters", []), *operation.get("parameters", [])]
    for where in ("path", "query"):
        ours = {p.name: _KINDS[p.kind] for p in verb.params if p.where == where and p.api}
        theirs = {d["name"]: d["schema"]["type"] for d in declared if d["in"] == where}
        assert ours == theirs, where
    body = {p.name: p for p in verb.params if p.where == "body" and p.api}
    request = operation.get("requestBody")
    if request is None:
        assert body == {}
    else:
        schema = _resolve(document, request["content"]["application/json"]["schema"])
        assert {name: _KINDS[p.kind] for name, p in body.items()} == \
            {name: prop["type"] for name, prop in schema["properties"].items()}
        assert {name for name, p in body.items() if p.required} == set(schema.get("required", []))
        assert schema.get("additionalProperties") is False
    assert str(verb.route.status if verb.route else 0) in operation["responses"]


def test_every_command_verb_is_a_cli_command_and_only_those() -> None:
    parser = build_parser()
    [commands] = [a for a in parser._actions if a.dest == "command"]
    assert commands.choices is not None
    assert set(commands.choices) == {v.name for v in VERBS if v.command} | {"serve", "bench"}


@pytest.mark.parametrize(("argv", "expected"), [
    (["rmi", "docker.io/x/y:1", "--force"],
     ("DELETE", "/v1/images/docker.io%2Fx%2Fy%3A1?force=true", None)),
    (["rm", "c1"], ("DELETE", "/v1/containers/c1", None)),
    (["update", "c1", "--quota", "1G"],
     ("PATCH", "/v1/containers/c1", {"quota": 1 << 30})),
    (["mount", "img", "--name", "c1", "--read-only"],
     ("POST", "/v1/containers/c1/mount", {"image": "img", "read_only": True})),
    (["mount", "img", "--name", "c1", "--target", "/mnt/x", "--quota", "64M"],
     ("POST", "/v1/containers/c1/mount", {"image": "img", "quota": 64 << 20,
                                           "target": "/mnt/x"})),
    (["pull", "x:1", "--platform", "linux/arm64"],
     ("POST", "/v1/images/pull", {"ref": "x:1", "platform": "linux/arm64"})),
    (["gc"], ("POST", "/v1/gc", None)),
    (["update", "c1", "--quota", "1G"], ("PATCH", "/v1/containers/c1", {"quota": 1 << 30})),
    (["update", "c1", "--materialize"],
     ("PATCH", "/v1/containers/c1", {"materialize": True})),
    (["ps"], ("GET", "/v1/containers", None)),
    (["advise", "x:1"], ("GET", "/v1/images/x%3A1/advice", None)),
    (["advise", "x:1", "--report", "/r/copy up.json"],
     ("GET", "/v1/images/x%3A1/advice?report=%2Fr%2Fcopy%20up.json", None)),
])
def test_the_cli_sends_the_routes_request(argv: list[str],
                                          expected: tuple[str, str, Any]) -> None:
    args = build_parser().parse_args(argv)
    verb = next(v for v in VERBS if v.name == args.command)
    given = {p.name: getattr(args, p.name) for p in verb.params if p.cli}
    assert request_for(verb, given) == expected


def test_mount_without_a_name_creates_the_container_first() -> None:
    sent: list[tuple[str, str, Any]] = []

    def send(verb: Verb, given: dict[str, Any]) -> Any:
        sent.append(request_for(verb, given))
        return {"name": "c-0123456789ab"} if verb is verbs.CREATE else {"path": "/p"}

    assert verbs.MOUNT.remote is not None
    verbs.MOUNT.remote(send, verbs.MOUNT.args({"image": "img", "quota": 1 << 30}))
    assert sent == [("POST", "/v1/containers", {"image": "img", "quota": 1 << 30}),
                    ("POST", "/v1/containers/c-0123456789ab/mount",
                     {"image": "img", "quota": 1 << 30})]


def test_a_cli_that_talks_to_the_daemon_loads_neither_trio_nor_requests() -> None:
    """The verb records are loaded by every CLI run; the service behind them must not be."""
    script = ("import sys, imaged.cli.main; "
              "print(sorted(m for m in ('trio', 'requests', 'imaged.ops.service') "
              "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
