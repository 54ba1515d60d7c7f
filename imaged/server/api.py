"""The socket API of DESIGN §5: what each path means, what each body may hold.

Every request body is checked against a closed schema before anything runs (unknown fields,
wrong types and missing fields are 400 ``invalid``, naming the field), so the service underneath
only ever sees values the CLI could also have given it. Errors leave as ``{"error": {code,
message}}`` with the status of their class; anything that is not an ``ImagedError`` is a bug,
logged with its traceback and answered 500 ``internal`` without detail a client could misuse.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import trio

from imaged.errors import ImagedError, InternalError, InvalidError, NotFoundError
from imaged.events import PullEvent
from imaged.names import check_name
from imaged.ops.service import Service
from imaged.registry_client.manifest import Platform
from imaged.registry_client.reference import parse_reference
from imaged.server.httpserver import Emit, Request, Response, StreamResponse, error_body
from imaged.sizes import check_quota

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
    values = request.query.get(name, [])
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("true", "false", "1", "0", ""):
        raise InvalidError(f"query parameter {name!r} must be true or false")
    return values[0] in ("true", "1", "")


def _quota(body: dict[str, Any]) -> int | None:
    quota = body.get("quota")
    if quota is None:
        return None
    try:
        return check_quota(quota)
    except InvalidError as exc:
        raise InvalidError(f"field 'quota': {exc.message}") from None


def _target(body: dict[str, Any]) -> Path | None:
    target = body.get("target")
    if target is None:
        return None
    if not target.startswith("/") or "\0" in target:
        raise InvalidError("field 'target' must be an absolute path")
    return Path(target)


class Api:
    def __init__(self, service: Service, confined: bool = False) -> None:
        """``confined``: the API as a non-root peer gets it, whose mount targets must lie
        beneath ``api.mount_prefixes`` (DESIGN §5)."""
        self.service = service
        self.confined = confined
        document = resources.files("imaged.server").joinpath("openapi.json")
        self.openapi = json.loads(document.read_text())
        self._routes: dict[tuple[str, str], Callable[..., Awaitable[Response | StreamResponse]]] = {
            ("GET", "info"): self._info,
            ("GET", "openapi.json"): self._openapi,
            ("POST", "images/pull"): self._pull,
            ("GET", "images"): self._images,
            ("GET", "images/*"): self._image,
            ("DELETE", "images/*"): self._rmi,
            ("POST", "containers"): self._create,
            ("GET", "containers"): self._containers,
            ("GET", "containers/*"): self._container,
            ("PATCH", "containers/*"): self._update,
            ("DELETE", "containers/*"): self._rm,
            ("POST", "containers/*/mount"): self._mount,
            ("POST", "containers/*/unmount"): self._unmount,
            ("POST", "gc"): self._gc,
        }
        self._paths = {path for _, path in self._routes}

    async def handle(self, request: Request) -> Response | StreamResponse:
        try:
            return await self._dispatch(request)
        except ImagedError as exc:
            return Response(exc.http_status, exc.to_json())
        except Exception:
            log.exception("internal error handling %s %s", request.method, request.path)
            return Response(500, InternalError(
                "internal error; the daemon's log has the details").to_json())

    async def _dispatch(self, request: Request) -> Response | StreamResponse:
        try:
            segments = request.segments
        except UnicodeDecodeError:
            raise InvalidError("path is not valid percent-encoded UTF-8") from None
        if len(segments) < 2 or segments[0] != "v1":
            raise NotFoundError(f"no such endpoint: {request.path}")
        pattern, args = segments[1:], []
        if len(pattern) >= 2 and pattern[0] in ("images", "containers") and \
                "/".join(pattern) != "images/pull":
            if not pattern[1] or len(pattern[1]) > _MAX_NAME or "\0" in pattern[1]:
                raise InvalidError(f"invalid {pattern[0][:-1]} name in path")
            if pattern[0] == "containers":
                check_name(pattern[1])  # never a path: "../x" is refused here, not resolved
            args.append(pattern[1])
            pattern = [pattern[0], "*", *pattern[2:]]
        key = "/".join(pattern)
        # HEAD is GET without the body, which the server leaves out.
        method = "GET" if request.method == "HEAD" else request.method
        handler = self._routes.get((method, key))
        if handler is None:
            if key in self._paths:
                allowed = sorted(m for m, p in self._routes if p == key)
                allowed += ["HEAD"] if "GET" in allowed else []
                return Response(405, error_body(
                    "invalid", f"{request.method} is not allowed on {request.path}; use "
                    f"{' or '.join(allowed)}"), [("Allow", ", ".join(allowed))])
            raise NotFoundError(f"no such endpoint: {request.method} {request.path}")
        unknown = set(request.query) - ({"force"} if request.method == "DELETE" else set())
        if unknown:
            raise InvalidError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
        return await handler(request, *args)

    # -- endpoints ---------------------------------------------------------------------------

    async def _info(self, request: Request) -> Response:
        parse_body(request, {})
        return Response(200, self.service.info())

    async def _openapi(self, request: Request) -> Response:
        return Response(200, self.openapi)

    async def _pull(self, request: Request) -> StreamResponse:
        body = parse_body(request, {"ref": Field(str, required=True), "platform": Field(str)})
        parse_reference(body["ref"])  # a malformed reference is a 400, before any stream
        if "platform" in body:
            Platform.parse(body["platform"])
        service = self.service

        async def produce(emit: Emit) -> None:
            send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)

            def report(event: PullEvent) -> None:
                if event.status != "done":  # the last object, with the whole result, is ours
                    send.send_nowait(event.to_json())

            async def run() -> None:
                with send:
                    try:
                        result = await service.pull(body["ref"], body.get("platform"), report)
                    except ImagedError as exc:
                        send.send_nowait({"status": "error", **exc.to_json()})
                        return
                    except Exception:
                        log.exception("internal error pulling %s", body["ref"])
                        send.send_nowait({"status": "error", **InternalError(
                            "internal error; the daemon's log has the details").to_json()})
                        return
                    send.send_nowait({"status": "done", "id": str(result.id),
                                      "config_digest": str(result.config_digest),
                                      "ref": result.ref, "layers": result.layers})

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

        return StreamResponse(200, produce)

    async def _images(self, request: Request) -> Response:
        return Response(200, self.service.images())

    async def _image(self, request: Request, text: str) -> Response:
        return Response(200, self.service.image(text))

    async def _rmi(self, request: Request, text: str) -> Response:
        return Response(200, self.service.rmi(text, flag(request, "force")))

    async def _create(self, request: Request) -> Response:
        body = parse_body(request, {"name": Field(str), "image": Field(str, required=True),
                                    "quota": Field(int), "read_only": Field(bool)})
        return Response(201, await self.service.create(body["image"], body.get("name"),
                                                       _quota(body),
                                                       body.get("read_only", False)))

    async def _containers(self, request: Request) -> Response:
        return Response(200, await self.service.ps())

    async def _container(self, request: Request, name: str) -> Response:
        return Response(200, await self.service.container(name))

    async def _update(self, request: Request, name: str) -> Response:
        body = parse_body(request, {"quota": Field(int, required=True)})
        _quota(body)
        return Response(200, await self.service.update(name, body["quota"]))

    async def _rm(self, request: Request, name: str) -> Response:
        return Response(200, await self.service.rm(name, flag(request, "force")))

    async def _mount(self, request: Request, name: str) -> Response:
        body = parse_body(request, {"target": Field(str), "image": Field(str),
                                    "quota": Field(int), "read_only": Field(bool)})
        if "image" not in body and ("quota" in body or "read_only" in body):
            raise InvalidError("fields 'quota' and 'read_only' only go with 'image' (create the "
                               "container if it does not exist)")
        return Response(200, await self.service.mount(body.get("image"), name, _quota(body),
                                                      body.get("read_only", False),
                                                      _target(body), confined=self.confined))

    async def _unmount(self, request: Request, name: str) -> Response:
        parse_body(request, {})
        return Response(200, await self.service.umount(name))

    async def _gc(self, request: Request) -> Response:
        parse_body(request, {})
        return Response(200, self.service.gc())
