"""The socket API of DESIGN §5: what each path means, what each body may hold.

Every request body is checked against a closed schema before anything runs (unknown fields,
wrong types and missing fields are 400 ``invalid``, naming the field), so the service underneath
only ever sees values the CLI could also have given it. Errors leave as ``{"error": {code,
message}}`` with the status of their class; an ``OSError`` is a file or disk that failed (500,
its path and errno, ``os_failure``); anything else is a bug, logged with its traceback and
answered 500 ``internal`` without detail a client could misuse.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import trio

from imaged.errors import ImagedError, InternalError, InvalidError, NotFoundError, os_failure
from imaged.events import PullEvent
from imaged.ops.service import Service
from imaged.ops.verbs import VERBS, Args, Context, Param, Verb, invoke
from imaged.server.httpserver import Emit, Request, Response, StreamResponse, error_body

log = logging.getLogger("imaged.server.api")

_MAX_NAME = 512  # a reference or ID in a path; Docker allows 255 for a repository name


@dataclass(frozen=True)
class Field:
    kind: type
    required: bool = False


def parse_body(request: Request, fields: dict[str, Field]) -> dict[str, Any]:
    """A JSON object with exactly the known fields, each of the right type (null = absent)."""
    if not request.body.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(request.body, object_pairs_hook=_object_without_duplicates)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidError("request body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidError(f"unknown field(s) in request body: {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for name, spec in fields.items():
        value = data.get(name)
        if value is None:
            if spec.required:
                raise InvalidError(f"field {name!r} is required")
            continue
        # bool is an int to Python, not to JSON: true is no quota, and 1 is no boolean.
        if not isinstance(value, spec.kind) or (spec.kind is int and isinstance(value, bool)):
            raise InvalidError(f"field {name!r} must be {_KIND_NAMES[spec.kind]}")
        out[name] = value
    return out


_KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean"}


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON allows a key twice and Python keeps the last; which one a client meant is a guess,
    so the body is refused."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidError(f"key {key!r} appears twice in the request body")
        out[key] = value
    return out


def flag(request: Request, name: str) -> bool:
    """A boolean query parameter, spelt as openapi.json says booleans are: ``true`` or
    ``false``, once (anything else could be read two ways, and the fuzzer rightly says so)."""
    values = request.query.get(name, [])
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("true", "false"):
        raise InvalidError(f"query parameter {name!r} must be true or false")
    return values[0] == "true"


def text(request: Request, name: str) -> str | None:
    """A string query parameter, given at most once."""
    values = request.query.get(name, [])
    if len(values) > 1:
        raise InvalidError(f"query parameter {name!r} is given more than once")
    return values[0] if values else None


@dataclass(frozen=True)
class _Endpoint:
    verb: Verb
    segments: tuple[str, ...]  # "*" where a path parameter goes


def _endpoints() -> dict[tuple[str, str], _Endpoint]:
    """(method, pattern) → endpoint, for every verb with a route (``imaged.ops.verbs``)."""
    out = {}
    for verb in VERBS:
        if verb.route is not None:
            segments = tuple("*" if part.startswith("{") else part
                             for part in verb.route.path.split("/"))
            out[verb.route.method, "/".join(segments)] = _Endpoint(verb, segments)
    return out


class Api:
    def __init__(self, service: Service, confined: bool = False) -> None:
        """``confined``: the API as a non-root peer gets it, whose mount targets must lie
        beneath ``api.mount_prefixes`` (DESIGN §5)."""
        self.service = service
        self.confined = confined
        document = resources.files("imaged.server").joinpath("openapi.json")
        self.openapi = json.loads(document.read_text())
        self._endpoints = _endpoints()
        self._patterns = {pattern for _, pattern in self._endpoints} | {"openapi.json"}

    async def handle(self, request: Request) -> Response | StreamResponse:
        try:
            return await self._dispatch(request)
        except ImagedError as exc:
            return Response(exc.http_status, exc.to_json())
        except OSError as exc:  # a file or disk failed us where no caller named the operation
            failure = os_failure(exc)
            log.warning("%s %s: %s", request.method, request.path, failure.message)
            return Response(failure.http_status, failure.to_json())
        except Exception:
            log.exception("internal error handling %s %s", request.method, request.path)
            return Response(500, InternalError(
                "internal error; the daemon's log has the details").to_json())

    def _pattern(self, parts: list[str]) -> str | None:
        """The most literal pattern the path fits: ``images/pull`` before ``images/*``."""
        fits = [pattern for pattern in self._patterns
                if len(segments := pattern.split("/")) == len(parts)
                and all(s in ("*", p) for s, p in zip(segments, parts, strict=True))]
        return max(fits, key=lambda pattern: -pattern.count("*"), default=None)

    async def _dispatch(self, request: Request) -> Response | StreamResponse:
        try:
            segments = request.segments
        except UnicodeDecodeError:
            raise InvalidError("path is not valid percent-encoded UTF-8") from None
        if len(segments) < 2 or segments[0] != "v1":
            raise NotFoundError(f"no such endpoint: {request.path}")
        parts = segments[1:]
        for each in self._endpoints.values():
            _path_args(each, parts)  # a bad name is named before any routing
        pattern = self._pattern(parts)
        if pattern is None:
            raise NotFoundError(f"no such endpoint: {request.method} {request.path}")
        # HEAD is GET without the body, which the server leaves out.
        method = "GET" if request.method == "HEAD" else request.method
        if pattern == "openapi.json" and method == "GET":
            return Response(200, self.openapi)
        endpoint = self._endpoints.get((method, pattern))
        if endpoint is None:
            allowed = sorted(m for m, p in self._endpoints if p == pattern)
            allowed = allowed or ["GET"]  # openapi.json
            allowed += ["HEAD"] if "GET" in allowed else []
            return Response(405, error_body(
                "invalid", f"{request.method} is not allowed on {request.path}; use "
                f"{' or '.join(allowed)}"), [("Allow", ", ".join(allowed))])
        args = self._args(endpoint, parts, request)
        return await self._run(endpoint.verb, args)

    def _args(self, endpoint: _Endpoint, parts: list[str], request: Request) -> Args:
        """A verb's arguments from the path, the query and the body, each checked as the CLI
        checks its own."""
        verb = endpoint.verb
        args = _path_args(endpoint, parts)
        query = {p.name: p for p in verb.params if p.where == "query" and p.api}
        unknown = set(request.query) - set(query)
        if unknown:
            raise InvalidError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
        for name, param in query.items():
            if param.kind is bool:
                args[name] = flag(request, name)
            elif (value := text(request, name)) is not None:
                args[name] = _checked(param, value)
        body = parse_body(request, {p.name: Field(p.kind, p.required) for p in verb.params
                                    if p.where == "body" and p.api})
        for param in verb.params:
            if param.name in body:
                args[param.name] = _checked(param, body[param.name])
        return args

    async def _run(self, verb: Verb, args: Args) -> Response | StreamResponse:
        assert verb.route is not None  # noqa: S101 - only routed verbs reach here
        if verb.streams:
            if verb.precheck is not None:
                verb.precheck(args)  # a 400 before any stream
            return StreamResponse(200, self._stream(verb, args))
        result = await invoke(verb, self.service, args, Context(confined=self.confined))
        return Response(verb.route.status, result)

    def _stream(self, verb: Verb, args: Args) -> Callable[[Emit], Awaitable[None]]:
        """NDJSON: the verb's progress events, then ``done`` with its result or ``error``."""
        service = self.service

        async def produce(emit: Emit) -> None:
            send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)

            def report(event: PullEvent) -> None:
                if event.status != "done":  # the last object, with the whole result, is ours
                    send.send_nowait(event.to_json())

            async def run() -> None:
                with send:
                    try:
                        result = await invoke(verb, service, args, Context(report=report))
                    except ImagedError as exc:
                        send.send_nowait({"status": "error", **exc.to_json()})
                        return
                    except OSError as exc:  # as in ``handle``
                        failure = os_failure(exc)
                        log.warning("%s: %s", verb.name, failure.message)
                        send.send_nowait({"status": "error", **failure.to_json()})
                        return
                    except Exception:
                        log.exception("internal error in %s %s", verb.name, args)
                        send.send_nowait({"status": "error", **InternalError(
                            "internal error; the daemon's log has the details").to_json()})
                        return
                    send.send_nowait({"status": "done", **result})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                async with receive:
                    async for obj in receive:
                        batch = [obj]  # and whatever else is queued: one write for them all
                        while True:
                            try:
                                batch.append(receive.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        await emit(*batch)

        return produce


def _path_args(endpoint: _Endpoint, parts: list[str]) -> Args:
    """The path parameters where ``parts`` follows the endpoint's pattern, each checked (a
    container name is checked, never resolved: "../x" is refused, not routed elsewhere)."""
    placed = iter([p for p in endpoint.verb.params if p.where == "path"])
    args: Args = {}
    for segment, part in zip(endpoint.segments, parts, strict=False):
        if segment != "*":
            if segment != part:
                break
            continue
        if not part or len(part) > _MAX_NAME or "\0" in part:
            raise InvalidError(f"invalid {parts[0][:-1]} name in path")
        param = next(placed)
        args[param.name] = param.check(part) if param.check else part
    return args


def _checked(param: Param, value: Any) -> Any:
    if param.check is None:
        return value
    try:
        return param.check(value)
    except InvalidError as exc:
        raise InvalidError(f"field {param.name!r}: {exc.message}") from None
