"""The ``imaged`` command line (DESIGN §4).

The one place errors become exit statuses: an ``ImagedError`` prints ``imaged: error: …`` and
exits 1 (with ``{"error": …}`` on stdout under ``--json``); usage errors exit 2 (argparse);
anything else is a bug, shown with a traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from imaged import __version__
from imaged.cli.client import DaemonClient, daemon_for, segment
from imaged.config import DRIVER_NAMES, Config, Overrides, load_config
from imaged.errors import (
    ForbiddenError,
    ImagedError,
    InternalError,
    InvalidError,
    describe,
    error_from_json,
)
from imaged.names import check_name
from imaged.server.peercred import ADMIN_GROUP
from imaged.sizes import check_quota, format_size, parse_size
from imaged.store.lock import RootDeniedError, Waiting

LOCK_WAIT_SECONDS = 600  # for another embedded command to let go of the root
BENCHMARKS = {
    "api": "the daemon through its socket: info requests/s, container cycles/s, memory",
    "btrfs-quota": "btrfs containers under no quota, full qgroups and simple quotas",
    "fetch": "one large blob: imaged's download against curl",
    "mount": "mount latency for 1-500 layers, container cycles and the space of 10 containers, "
             "per driver",
    "pull": "pull + unpack by imaged and by the peers installed here",
}


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options valid before or after the command name.

    On subcommands they default to SUPPRESS so a value given before the command survives.
    """
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--root", type=Path, default=default(None),
                        help="store root (default /var/lib/imaged; env IMAGED_ROOT)")
    parser.add_argument("--driver", choices=DRIVER_NAMES, default=default(None),
                        help="storage driver (default: chosen from the root's filesystem)")
    parser.add_argument("--config", type=Path, default=default(None),
                        help="config file (default /etc/imaged/imaged.toml; env IMAGED_CONFIG)")
    parser.add_argument("--socket", type=Path, default=default(None),
                        help="daemon socket (default /run/imaged/imaged.sock; env IMAGED_SOCKET)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print one JSON document on stdout")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="show tracebacks of internal errors")
    parser.add_argument("--no-wait", action="store_true", default=default(False),
                        help="fail at once when another command holds the root (default: "
                        f"wait up to {LOCK_WAIT_SECONDS} s, saying who holds it)")


class UsageError(InvalidError):
    """The command line itself is wrong: exit status 2, like argparse's own."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and, with --json, as a JSON error
    document) instead of printing the usage and exiting behind main's back."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _checked(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a checker that raises InvalidError: argparse turns only
    ArgumentTypeError into a usage error; anything else would end in a traceback."""
    def convert(text: str) -> Any:
        try:
            return check(text)
        except InvalidError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    convert.__name__ = check.__name__  # argparse names the type in some messages
    return convert


_size_arg = _checked(parse_size)
_quota_arg = _checked(lambda text: check_quota(parse_size(text)))
_name_arg = _checked(check_name)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="imaged", description="Container image storage with copy-on-write drivers.")
    parser.add_argument("--version", action="version", version=f"imaged {__version__}")
    _global_options(parser, suppress=False)
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", parents=[common], help="fetch an image and record it")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to select from a multi-platform image (default: this host)")
    sub.add_parser("images", parents=[common], help="list images")
    p = sub.add_parser("rmi", parents=[common], help="remove an image reference")
    p.add_argument("image", metavar="REF|ID")
    p.add_argument("--force", action="store_true",
                   help="remove every name of an image given by ID")
    sub.add_parser("info", parents=[common], help="describe the root, host and drivers")
    p = sub.add_parser("mount", parents=[common],
                       help="create a container on an image if needed, then mount it")
    p.add_argument("image", metavar="REF|ID")
    p.add_argument("--name", type=_name_arg,
                   help="container name (default: c- and 12 hex digits)")
    p.add_argument("--quota", type=_quota_arg, metavar="SIZE",
                   help="disk quota of the writable layer (k, M, G, T: powers of 1024)")
    p.add_argument("--read-only", action="store_true", help="no writable layer")
    p.add_argument("--target", type=Path, metavar="DIR", help="mount here instead")
    p = sub.add_parser("update", parents=[common], help="grow or shrink a container's quota")
    p.add_argument("name", metavar="NAME", type=_name_arg)
    p.add_argument("--quota", type=_quota_arg, metavar="SIZE", required=True)
    p = sub.add_parser("umount", parents=[common], help="unmount a container, keep its data")
    p.add_argument("name", metavar="NAME", type=_name_arg)
    p = sub.add_parser("rm", parents=[common], help="remove a container")
    p.add_argument("name", metavar="NAME", type=_name_arg)
    p.add_argument("--force", action="store_true", help="unmount it first if mounted")
    sub.add_parser("ps", parents=[common], help="list containers")
    sub.add_parser("gc", parents=[common], help="remove blobs and layers nothing references")
    sub.add_parser("serve", parents=[common],
                   help="run the daemon: the socket API for runtimes and the CLI")
    bench = sub.add_parser("bench", parents=[common], help="run a benchmark and write its report")
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, summary in BENCHMARKS.items():
        p = kinds.add_parser(name, parents=[common], help=summary, description=summary)
        p.add_argument("--out", type=Path, required=True,
                       help="directory for JSON, markdown, PNG")
        p.add_argument("--runs", type=int, default=5, help="interleaved runs (default 5)")
        if name == "fetch":
            p.add_argument("--size", type=_size_arg, default=parse_size("1G"),
                           help="blob size (default 1G)")
        elif name == "pull":
            p.add_argument("--shapes", nargs="+", choices=["debian", "layers128", "big"],
                           default=["debian", "layers128", "big"],
                           help="images to pull (default: all three)")
        elif name == "mount":
            p.add_argument("--drivers", nargs="+", choices=DRIVER_NAMES,
                           default=list(DRIVER_NAMES),
                           help="drivers (default: every driver this kernel supports)")
    return parser


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def _print_images(images: list[dict[str, Any]]) -> None:
    rows = []
    for image in images:
        for ref in image["refs"] or ["<none>"]:
            rows.append([ref, image["id"].split(":", 1)[1][:12],
                         image["config_digest"].split(":", 1)[1][:12],
                         format_size(image["size"]), str(image["layers"])])
    print(_table(rows, ["REF", "ID", "CONFIG", "SIZE", "LAYERS"]))


def _print_info(info: dict[str, Any]) -> None:
    fs = info["backing_filesystem"]
    print(f"version:   {info['version']}")
    print(f"root:      {info['root']}")
    print(f"backing:   {fs['type']} (mounted at {fs['mount_point']})")
    print(f"driver:    {info['driver'] or '(none yet: chosen at first use)'}")
    print(f"platform:  {info['platform']} (kernel {info['kernel']})")
    print(f"content:   {info['content']['blobs']} blobs, {format_size(info['content']['bytes'])}")
    print(f"images:    {info['images']}")
    print("drivers:")
    for d in info["drivers"]:
        chosen = " (in use)" if d["name"] == info["driver"] else ""
        print(f"  {d['name']:<10} {'yes' if d['supported'] else 'no ':<4} {d['reason']}{chosen}")


def _print_ps(containers: list[dict[str, Any]]) -> None:
    rows = [[c["name"], (c["image_refs"] or [c["image"]])[0], c["driver"], c["path"] or "-",
             format_size(c["quota"]) if c["quota"] else "-", c["quota_mode"] or "-",
             format_size(c["used_bytes"]), _inodes(c)] for c in containers]
    print(_table(rows, ["NAME", "IMAGE", "DRIVER", "MOUNTED AT", "QUOTA", "QUOTA MODE", "USED",
                        "INODES"]))


def _inodes(container: dict[str, Any]) -> str:
    """"used/total" where the container has inodes of its own to run out of, "used" where
    only the count is known, "-" where the driver cannot count them."""
    used, total = container["used_inodes"], container["inodes"]
    if used is None:
        return "-"
    return f"{used}/{total}" if total is not None else str(used)


def _print_nothing(result: Any) -> None:
    """Commands without output print nothing for people; ``--json`` shows their result."""


def _print_gc(result: dict[str, Any]) -> None:
    print(result["freed_bytes"])
    for line in result.get("failed", []):
        print(f"imaged: warning: not removed: {line}", file=sys.stderr)


_SHOW: dict[str, Callable[[Any], None]] = {
    "pull": lambda r: print(r["id"]),
    "images": _print_images,
    "info": _print_info,
    "mount": lambda r: print(r["path"]),
    "ps": _print_ps,
    "gc": _print_gc,
    "bench": lambda r: print("\n".join(r["reports"])),
}


def _pull_result(done: dict[str, Any]) -> dict[str, Any]:
    return {key: done[key] for key in ("id", "config_digest", "ref", "layers")}


async def _run_embedded(args: argparse.Namespace, config: Config | None) -> Any:
    """Run one command in this process, on the store itself."""
    import trio  # noqa: PLC0415 - embedded mode only: a daemon client never pays for it

    from imaged.cli.progress import progress_for  # noqa: PLC0415
    from imaged.ops.service import Service  # noqa: PLC0415

    if args.command == "bench":
        from imaged.bench import api, btrfsquota, fetch, mount, pull  # noqa: PLC0415

        if args.benchmark == "api":
            paths = await trio.to_thread.run_sync(api.run, args.out, args.runs)
        elif args.benchmark == "btrfs-quota":
            paths = await trio.to_thread.run_sync(btrfsquota.run, args.out, args.runs)
        elif args.benchmark == "fetch":
            paths = await trio.to_thread.run_sync(fetch.run, args.out, args.size, args.runs)
        elif args.benchmark == "pull":
            paths = await trio.to_thread.run_sync(pull.run, args.out, args.runs, args.shapes)
        else:
            paths = await trio.to_thread.run_sync(mount.run, args.out, args.runs, args.drivers)
        return {"reports": [str(p) for p in paths]}
    assert config is not None  # noqa: S101 - every command but bench loads it
    waiting = None if args.no_wait else Waiting(
        LOCK_WAIT_SECONDS, lambda line: print(f"imaged: {line}", file=sys.stderr, flush=True))
    async with Service.open(config, f"imaged {args.command}", waiting) as service:
        if args.command == "pull":
            with progress_for(sys.stderr) as reporter:
                result = await service.pull(args.ref, args.platform, reporter)
            return {"id": str(result.id), "config_digest": str(result.config_digest),
                    "ref": result.ref, "layers": result.layers}
        if args.command == "images":
            return service.images()
        if args.command == "rmi":
            return service.rmi(args.image, args.force)
        if args.command == "info":
            return service.info()
        if args.command == "mount":
            return await service.mount(args.image, args.name, args.quota, args.read_only,
                                       args.target)
        if args.command == "update":
            return await service.update(args.name, args.quota)
        if args.command == "umount":
            return await service.umount(args.name)
        if args.command == "rm":
            return await service.rm(args.name, args.force)
        if args.command == "ps":
            return await service.ps()
        if args.command == "gc":
            return service.gc()
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def _run_remote(args: argparse.Namespace, client: DaemonClient) -> Any:
    """The same command through the daemon's socket: same results, same errors."""
    force = "?force=true" if getattr(args, "force", False) else ""
    if args.command == "pull":
        from imaged.cli.progress import progress_for  # noqa: PLC0415
        from imaged.events import PullEvent  # noqa: PLC0415

        body = {"ref": args.ref, **({"platform": args.platform} if args.platform else {})}
        with progress_for(sys.stderr) as reporter:
            for event in client.stream("POST", "/v1/images/pull", body):
                if event["status"] == "done":
                    reporter(PullEvent("done", id=event["id"]))  # as the embedded pull ends
                    return _pull_result(event)
                if event["status"] == "error":
                    raise error_from_json(event)
                reporter(PullEvent.from_json(event))
        raise InternalError(f"the daemon on {client.path} ended the pull without a result")
    if args.command == "images":
        return client.call("GET", "/v1/images")
    if args.command == "rmi":
        return client.call("DELETE", f"/v1/images/{segment(args.image)}{force}")
    if args.command == "info":
        return client.call("GET", "/v1/info")
    if args.command == "mount":
        options: dict[str, Any] = {"image": args.image}
        if args.quota is not None:
            options["quota"] = args.quota
        if args.read_only:
            options["read_only"] = True
        target = {"target": str(args.target.absolute())} if args.target else {}
        if args.name is None:
            created = client.call("POST", "/v1/containers", options)
            return client.call("POST", f"/v1/containers/{segment(created['name'])}/mount",
                               target)
        return client.call("POST", f"/v1/containers/{segment(args.name)}/mount",
                           {**options, **target})
    if args.command == "update":
        return client.call("PATCH", f"/v1/containers/{segment(args.name)}",
                           {"quota": args.quota})
    if args.command == "umount":
        return client.call("POST", f"/v1/containers/{segment(args.name)}/unmount")
    if args.command == "rm":
        return client.call("DELETE", f"/v1/containers/{segment(args.name)}{force}")
    if args.command == "ps":
        return client.call("GET", "/v1/containers")
    if args.command == "gc":
        return client.call("POST", "/v1/gc")
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def _serve(config: Config, debug: bool) -> None:
    import logging  # noqa: PLC0415

    import trio  # noqa: PLC0415

    from imaged.server.daemon import serve  # noqa: PLC0415

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="imaged: %(levelname)s: %(message)s")
    trio.run(serve, config)


def _run(args: argparse.Namespace) -> Any:
    if args.command == "bench":
        import trio  # noqa: PLC0415

        return trio.run(_run_embedded, args, None)
    config = load_config(Overrides(config=args.config, root=args.root, driver=args.driver,
                                   socket=args.socket))
    if args.command == "serve":
        if args.json:
            raise InvalidError("serve does not take --json: it logs to stderr")
        _serve(config, args.debug)
        return None
    client = daemon_for(config.socket, config.root)
    if client is None:
        import trio  # noqa: PLC0415

        try:
            return trio.run(_run_embedded, args, config)
        except RootDeniedError:
            if not _socket_denied(config.socket):
                raise
            raise ForbiddenError(f"permission denied on {config.socket} (root or group "
                                 f"{ADMIN_GROUP})") from None
    with contextlib.closing(client):
        return _run_remote(args, client)


def _socket_denied(path: Path) -> bool:
    """Whether a daemon's socket is there but this user may not connect to it: then that, not
    the root's files, is what to tell someone who is not root."""
    try:
        return path.is_socket() and not os.access(path, os.R_OK | os.W_OK)
    except PermissionError:  # cannot even look into its directory
        return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"imaged: error: {exc.message}", file=sys.stderr)
        if "--json" in argv:
            print(json.dumps(exc.to_json()))
        return 2
    try:
        result = _run(args)
    except ImagedError as exc:
        return _fail(args, exc)
    except KeyboardInterrupt:
        print("imaged: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug still gets one clear line
        if args.debug:
            traceback.print_exc()
        return _fail(args, InternalError(f"internal error: {describe(exc)}"
                                         + ("" if args.debug else
                                            " (run with --debug for a traceback)")))
    try:
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            _SHOW.get(args.command, _print_nothing)(result)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (imaged ps | head): not an error of ours; silence the
        # interpreter's own complaint when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _fail(args: argparse.Namespace, exc: ImagedError) -> int:
    print(f"imaged: error: {exc.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(exc.to_json()))
    return 1
