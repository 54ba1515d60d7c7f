"""Every verb described once: its parameters, its HTTP route, its service call and its view.

The CLI (``imaged.cli.main``) builds its parser from these records and runs a verb either here,
embedded, or by sending the route's request to the daemon; the API (``imaged.server.api``) builds
its routes from the same records. So a new verb is one record here plus its entry in
``openapi.json``, and ``tests/unit/test_verbs.py`` checks that the routes and that document agree
both ways. Where a verb is not one request (``mount`` without a name creates the container first;
``pull`` streams its progress), the record says so in a small adapter.

This module is loaded by a CLI that talks to the daemon, which must start as fast as ``ctr``: the
service (and with it trio and requests) is imported for type checking only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imaged.errors import InvalidError
from imaged.events import Reporter
from imaged.names import check_name
from imaged.ops import render
from imaged.registry_client.manifest import Platform
from imaged.registry_client.reference import parse_reference
from imaged.sizes import check_quota, parse_size

if TYPE_CHECKING:
    from imaged.ops.service import Service

Args = dict[str, Any]


@dataclass(frozen=True)
class Param:
    """One input of a verb, under one name: the body field, path placeholder or query flag, and
    the CLI's argument (an option where ``option`` is set, else a positional)."""

    name: str
    kind: type
    where: Literal["path", "query", "body"]
    help: str
    required: bool = False  # in a request body; a CLI positional is always required
    option: str | None = None
    metavar: str | None = None
    # Validates a value from either front end (raising InvalidError), returning it normalised.
    check: Callable[[Any], Any] | None = None
    parse: Callable[[str], Any] | None = None  # the CLI's text to a value, before ``check``
    cli: bool = True
    api: bool = True

    @property
    def default(self) -> Any:
        return False if self.kind is bool else None


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # under /v1/, with a {placeholder} per path parameter
    status: int = 200


@dataclass(frozen=True)
class Context:
    """What a call gets besides its arguments, from the front end that runs it."""

    report: Reporter | None = None
    confined: bool = False  # a non-root peer of the daemon (imaged.host.targets)


Call = Callable[["Service", Args, Context], Awaitable[Any]]
Send = Callable[["Verb", Args], Any]


def _no_warnings(result: Any) -> list[str]:
    return []


def _never_failed(result: Any) -> bool:
    return False


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str
    call: Call
    params: tuple[Param, ...] = ()
    route: Route | None = None
    command: bool = True  # the CLI has it (API-only verbs describe single objects)
    show: Callable[[Any], str | None] = render.nothing
    warnings: Callable[[Any], list[str]] = _no_warnings
    failed: Callable[[Any], bool] = _never_failed  # exit 1 with a result (check's findings)
    streams: bool = False  # the route answers NDJSON progress events, then ``done`` + result
    # Checks that must fail before a stream starts; the call would make them again, too late.
    precheck: Callable[[Args], None] | None = None
    # The CLI through the daemon where the verb is not the one request of its route.
    remote: Callable[[Send, Args], Any] | None = None
    operation_id: str = ""  # openapi.json's name where it is not the CLI's (rm is remove)

    def __post_init__(self) -> None:
        if not self.operation_id:
            object.__setattr__(self, "operation_id", self.name)

    def args(self, given: Args) -> Args:
        """Every parameter present, absent ones at their defaults."""
        return {p.name: given.get(p.name, p.default) for p in self.params}


async def invoke(verb: Verb, service: Service, args: Args, context: Context) -> Any:
    if verb.precheck is not None:
        verb.precheck(args)
    return await verb.call(service, verb.args(args), context)


def _absolute(text: str) -> str:
    if not text.startswith("/") or "\0" in text:
        raise InvalidError("must be an absolute path")
    return text


def _reference_and_platform(args: Args) -> None:
    parse_reference(args["ref"])
    if args.get("platform"):
        Platform.parse(args["platform"])


def _quota(option: str | None = "--quota", required: bool = False) -> Param:
    return Param("quota", int, "body", "disk quota of the writable layer (k, M, G, T: powers "
                 "of 1024)", required=required, option=option, metavar="SIZE", check=check_quota,
                 parse=parse_size)


_IMAGE_REF = Param("ref", str, "path", "image reference or ID", metavar="REF|ID")
_CONTAINER = Param("name", str, "path", "container name", metavar="NAME", check=check_name)


async def _pull(service: Service, a: Args, context: Context) -> Any:
    assert context.report is not None  # noqa: S101 - streamed verbs always get a reporter
    result = await service.pull(a["ref"], a["platform"], context.report)
    return {"id": str(result.id), "config_digest": str(result.config_digest),
            "ref": result.ref, "layers": result.layers}


async def _mount(service: Service, a: Args, context: Context) -> Any:
    if a["image"] is None and (a["quota"] is not None or a["read_only"]):
        raise InvalidError("fields 'quota' and 'read_only' only go with 'image' (create the "
                           "container if it does not exist)")
    target = Path(a["target"]) if a["target"] is not None else None
    return await service.mount(a["image"], a["name"], a["quota"], a["read_only"], target,
                               confined=context.confined)


def _mount_remote(send: Send, a: Args) -> Any:
    """Through the daemon a mount names its container: without a name, create one first."""
    if a["name"] is None:
        a = {**a, "name": send(CREATE, a)["name"]}
    return send(MOUNT, a)


async def _sync(value: Any) -> Any:
    return value


PULL = Verb(
    "pull", "fetch an image and record it",
    _pull,
    (Param("ref", str, "body", "image reference", required=True, metavar="REF"),
     Param("platform", str, "body", "platform to select from a multi-platform image "
           "(default: this host)", option="--platform", metavar="OS/ARCH[/VARIANT]")),
    Route("POST", "images/pull"), show=render.pulled, streams=True,
    precheck=_reference_and_platform)
IMAGES = Verb("images", "list images", lambda s, a, c: _sync(s.images()),
              route=Route("GET", "images"), show=render.images)
IMAGE = Verb("image", "describe one image", lambda s, a, c: _sync(s.image(a["ref"])),
             (_IMAGE_REF,), Route("GET", "images/{ref}"), command=False)
RMI = Verb("rmi", "remove an image reference",
           lambda s, a, c: s.rmi(a["ref"], a["force"]),
           (_IMAGE_REF, Param("force", bool, "query", "remove every name of an image given by ID",
                              option="--force")),
           Route("DELETE", "images/{ref}"))
INFO = Verb("info", "describe the root, host and drivers", lambda s, a, c: s.info(),
            route=Route("GET", "info"), show=render.info)
CREATE = Verb(
    "create", "create a container on an image",
    lambda s, a, c: s.create(a["image"], a["name"], a["quota"], a["read_only"]),
    (Param("name", str, "body", "container name", check=check_name),
     Param("image", str, "body", "image reference or ID", required=True),
     _quota(None),
     Param("read_only", bool, "body", "no writable layer")),
    Route("POST", "containers", 201), command=False)
MOUNT = Verb(
    "mount", "create a container on an image if needed, then mount it",
    _mount,
    (Param("image", str, "body", "image reference or ID", metavar="REF|ID"),
     Param("name", str, "path", "container name (default: c- and 12 hex digits)",
           option="--name", check=check_name),
     _quota(),
     Param("read_only", bool, "body", "no writable layer", option="--read-only"),
     Param("target", str, "body", "mount here instead", option="--target", metavar="DIR",
           check=_absolute, parse=lambda text: str(Path(text).absolute()))),
    Route("POST", "containers/{name}/mount"), show=render.mounted, remote=_mount_remote)
UPDATE = Verb("update", "grow or shrink a container's quota, or complete its partial files",
              lambda s, a, c: s.update(a["name"], a["quota"], a["materialize"]),
              (_CONTAINER, _quota(),
               Param("materialize", bool, "body", "complete the files a fuse container copied "
                     "up only in part (charged to its quota)", option="--materialize")),
              Route("PATCH", "containers/{name}"))
UMOUNT = Verb("umount", "unmount a container, keep its data",
              lambda s, a, c: s.umount(a["name"], a["force"]),
              (_CONTAINER, Param("force", bool, "query", "detach it even while files are open "
                                 "on it (MNT_DETACH): gone for new opens, kept for those files "
                                 "until they close", option="--force")),
              Route("POST", "containers/{name}/unmount"),
              operation_id="unmount")
RM = Verb("rm", "remove a container", lambda s, a, c: s.rm(a["name"], a["force"]),
          (_CONTAINER, Param("force", bool, "query", "unmount it first if mounted, detached "
                             "even while files are open on it (as umount --force)",
                             option="--force")),
          Route("DELETE", "containers/{name}"), operation_id="remove")
PS = Verb("ps", "list containers", lambda s, a, c: s.ps(), route=Route("GET", "containers"),
          show=render.containers, operation_id="containers")
CONTAINER = Verb("container", "describe one container", lambda s, a, c: s.container(a["name"]),
                 (_CONTAINER,), Route("GET", "containers/{name}"), command=False)
GC = Verb("gc", "remove blobs and layers nothing references", lambda s, a, c: s.gc(),
          route=Route("POST", "gc"), show=render.freed, warnings=render.not_removed)
CHECK = Verb(
    "check", "check the store's consistency: metadata, blobs, driver, mounts, quotas",
    lambda s, a, c: s.check(a["verify_data"], a["repair"]),
    (Param("verify_data", bool, "query", "re-hash every blob and compare every layer with it",
           option="--verify-data"),
     # Repair wants the root to itself, so it is the embedded CLI's alone (DESIGN §5).
     Param("repair", bool, "query", "repair what can be repaired (refetch damaged blobs, "
           "re-apply lost and damaged layers, drop dead records); not through the daemon",
           option="--repair", api=False)),
    Route("GET", "check"), show=render.findings, failed=lambda result: not result["ok"])
ADVISE = Verb(
    "advise", "large files of an image that containers will likely write: their first-write "
    "(copy-up) cost here and under the alternatives, and what to do",
    lambda s, a, c: s.advise(a["ref"], a["report"], c.confined),
    (_IMAGE_REF,
     Param("report", str, "query", "predict from this imaged bench copyup report or model "
           "(default: ROOT/bench/copyup.json, else a calibration of this root's copy "
           "throughput); read by the daemon, so root only", option="--report", metavar="FILE",
           check=_absolute, parse=lambda text: str(Path(text).absolute()))),
    Route("GET", "images/{ref}/advice"), show=render.advice)

# In the order ``imaged --help`` lists them.
VERBS: tuple[Verb, ...] = (PULL, IMAGES, IMAGE, RMI, INFO, CREATE, MOUNT, UPDATE, UMOUNT, RM, PS,
                           CONTAINER, GC, CHECK, ADVISE)
