"""The ``imaged`` command line (DESIGN §4).

The one place errors become exit statuses: an ``ImagedError`` prints ``imaged: error: …`` and
exits 1 (with ``{"error": …}`` on stdout under ``--json``); usage errors exit 2 (argparse); an
``OSError`` is a file or disk that failed us, shown as its path and errno (``os_failure``);
anything else is a bug, shown with a traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from imaged import __version__
from imaged.cli.client import DaemonClient, daemon_for, segment
from imaged.config import DRIVER_NAMES, Config, Overrides, load_config, parse_address
from imaged.errors import (
    ForbiddenError,
    ImagedError,
    InternalError,
    InvalidError,
    describe,
    error_from_json,
    os_failure,
)
from imaged.ops.verbs import VERBS, Args, Context, Param, Verb, invoke
from imaged.server.peercred import ADMIN_GROUP
from imaged.sizes import parse_size
from imaged.store.lock import RootDeniedError, Waiting

LOCK_WAIT_SECONDS = 600  # for another embedded command to let go of the root
BENCHMARKS = {
    "api": "the daemon through its socket: info requests/s, container cycles/s, memory",
    "btrfs-quota": "btrfs containers under no quota, full qgroups and simple quotas",
    "copyup": "copy-on-write cost against file size on ext4, xfs and btrfs: kernel overlay, "
              "vfs, btrfs snapshots, imaged's fuse server, fuse-overlayfs and a volume on the "
              "same layers; open, overwrite, append, truncate, chmod, rename; "
              "keeps the model imaged advise reads in ROOT/bench/copyup.json",
    "fetch": "one large blob: imaged's download against curl",
    "fleet": "N nodes pulling one image at once: directly, through a pull-through cache, from "
             "a peer node; wall time and the bytes that reached the registry",
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
_sizes_arg = _checked(lambda text: [parse_size(part) for part in text.split(",")])


def _counts(text: str) -> list[int]:
    parts = text.split(",")
    if not all(p.isascii() and p.isdigit() and 0 < int(p) <= 64 for p in parts):
        raise InvalidError(f"{text!r} is not a list of node counts from 1 to 64 (e.g. 1,4,8)")
    return [int(p) for p in parts]


_counts_arg = _checked(_counts)
_VERBS = {verb.name: verb for verb in VERBS if verb.command}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="imaged", description="Container image storage with copy-on-write drivers.")
    parser.add_argument("--version", action="version", version=f"imaged {__version__}")
    _global_options(parser, suppress=False)
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        if verb.command:
            _add_verb(sub.add_parser(verb.name, parents=[common], help=verb.summary), verb)
    serve = sub.add_parser("serve", parents=[common],
                           help="run the daemon: the socket API for runtimes and the CLI")
    serve.add_argument("--registry-addr", metavar="HOST:PORT", type=_checked(parse_address),
                       default=None,
                       help="also serve this root's images read-only to peers over the OCI "
                       "distribution API on HOST:PORT (config serve.registry_addr; default off)")
    bench = sub.add_parser("bench", parents=[common], help="run a benchmark and write its report")
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, summary in BENCHMARKS.items():
        p = kinds.add_parser(name, parents=[common], help=summary, description=summary)
        p.add_argument("--out", type=Path, required=True,
                       help="directory for JSON, markdown, PNG")
        runs = 3 if name == "copyup" else 5  # copyup's full matrix: 3 runs fit its hour
        p.add_argument("--runs", type=int, default=runs, help=f"interleaved runs (default {runs})")
        if name == "fetch":
            p.add_argument("--size", type=_size_arg, default=parse_size("1G"),
                           help="blob size (default 1G)")
        elif name == "fleet":
            p.add_argument("--nodes", type=_counts_arg, default=[1, 4, 8],
                           help="node counts, comma-separated (default 1,4,8)")
            p.add_argument("--size", type=_size_arg, default=parse_size("64M"),
                           help="image size (default 64M)")
        elif name == "pull":
            p.add_argument("--shapes", nargs="+", choices=["debian", "layers128", "big"],
                           default=["debian", "layers128", "big"],
                           help="images to pull (default: all three)")
        elif name == "copyup":
            p.add_argument("--sizes", type=_sizes_arg, default=None,
                           help="lower file sizes, comma-separated (default 1M,16M,256M,1G)")
            p.add_argument("--quick", action="store_true",
                           help="one run of 1M and 16M files, no read, untar or stat rows "
                                "(about 2 minutes)")
            p.add_argument("--filesystems", nargs="+", default=None, metavar="FS",
                           help="backing filesystems (default ext4 xfs btrfs); also "
                                "zfs-fuse (or zfs): a pool of the userspace zfs-fuse, whose "
                                "report alone is named copyup-zfs; thin-ext4 (or devmapper) "
                                "and thin-xfs: a device-mapper thin pool, the devmapper "
                                "driver's, reported as copyup-devmapper (where the kernel "
                                "has device-mapper: scripts/bench-guest runs it in the guest)")
            p.add_argument("--configs", "--drivers", nargs="+", default=None, metavar="CONFIG",
                           help="configurations, e.g. overlay 'fuse partial' volume "
                                "(default: all)")
            p.add_argument("--metadata", action="store_true",
                           help="only untar and find | xargs stat, as metadata.{json,md,png}; "
                                "keeps no model")
        elif name == "mount":
            p.add_argument("--drivers", nargs="+", choices=DRIVER_NAMES,
                           default=list(DRIVER_NAMES),
                           help="drivers (default: every driver this kernel supports)")
    return parser


def _add_verb(parser: argparse.ArgumentParser, verb: Verb) -> None:
    """A verb's CLI arguments, from the parameters it shares with the API."""
    for param in verb.params:
        if not param.cli:
            continue
        if param.kind is bool:
            parser.add_argument(param.option or param.name, dest=param.name, action="store_true",
                                help=param.help)
        elif param.option is None:
            parser.add_argument(param.name, metavar=param.metavar or param.name.upper(),
                                type=_argument_type(param), help=param.help)
        else:
            parser.add_argument(param.option, dest=param.name, metavar=param.metavar,
                                type=_argument_type(param), required=param.required,
                                help=param.help)


def _argument_type(param: Param) -> Callable[[str], Any]:
    """The parameter's own parse and check, so a bad value is a usage error (exit 2)."""
    parse, check = param.parse or str, param.check or _same
    convert = _checked(lambda text: check(parse(text)))
    convert.__name__ = param.name
    return convert


def _same(value: Any) -> Any:
    return value


def _args(verb: Verb, namespace: argparse.Namespace) -> Args:
    return verb.args({p.name: getattr(namespace, p.name) for p in verb.params if p.cli})


async def _run_embedded(args: argparse.Namespace, config: Config | None) -> Any:
    """Run one command in this process, on the store itself."""
    import trio  # noqa: PLC0415 - embedded mode only: a daemon client never pays for it

    from imaged.cli.progress import progress_for  # noqa: PLC0415
    from imaged.ops.service import Service  # noqa: PLC0415

    if args.command == "bench":
        from imaged.bench import (  # noqa: PLC0415
            api,
            btrfsquota,
            copyup,
            fetch,
            fleet,
            mount,
            pull,
        )

        if args.benchmark == "api":
            paths = await trio.to_thread.run_sync(api.run, args.out, args.runs)
        elif args.benchmark == "btrfs-quota":
            paths = await trio.to_thread.run_sync(btrfsquota.run, args.out, args.runs)
        elif args.benchmark == "copyup":
            paths = await trio.to_thread.run_sync(
                functools.partial(copyup.run, args.out, args.runs, args.sizes, args.quick,
                                  args.filesystems, args.configs, metadata=args.metadata))
            assert config is not None  # noqa: S101 - loaded for copyup: it keeps a model
            if not args.metadata:  # a metadata-only report has no first writes to model
                kept = await trio.to_thread.run_sync(copyup.keep_model, paths[0], config.root)
                if kept is None:
                    print(f"imaged: no store at {config.root}: the model for imaged advise is "
                          "not kept (give --root)", file=sys.stderr)
                else:
                    paths.append(kept)
        elif args.benchmark == "fetch":
            paths = await trio.to_thread.run_sync(fetch.run, args.out, args.size, args.runs)
        elif args.benchmark == "fleet":
            paths = await trio.to_thread.run_sync(fleet.run, args.out, args.runs, args.nodes,
                                                  args.size)
        elif args.benchmark == "pull":
            paths = await trio.to_thread.run_sync(pull.run, args.out, args.runs, args.shapes)
        else:
            paths = await trio.to_thread.run_sync(mount.run, args.out, args.runs, args.drivers)
        return {"reports": [str(p) for p in paths]}
    assert config is not None  # noqa: S101 - every command but bench (copyup aside) loads it
    verb = _VERBS[args.command]
    waiting = None if args.no_wait else Waiting(
        LOCK_WAIT_SECONDS, lambda line: print(f"imaged: {line}", file=sys.stderr, flush=True))
    async with Service.open(config, f"imaged {args.command}", waiting) as service:
        if not verb.streams:
            return await invoke(verb, service, _args(verb, args), Context())
        with progress_for(sys.stderr) as reporter:
            return await invoke(verb, service, _args(verb, args), Context(report=reporter))


def _run_remote(args: argparse.Namespace, client: DaemonClient) -> Any:
    """The same command through the daemon's socket: same results, same errors."""
    verb = _VERBS[args.command]
    local = [p.option or p.name for p in verb.params
             if not p.api and getattr(args, p.name) != p.default]
    if local:
        raise InvalidError(f"{', '.join(local)} works only without a daemon: stop the one on "
                           f"{client.path} (imaged serve) first")

    def send(verb: Verb, given: Args) -> Any:
        method, target, body = request_for(verb, given)
        if verb.streams:
            return _streamed(client, method, target, body)
        return client.call(method, target, body)

    given = _args(verb, args)
    return verb.remote(send, given) if verb.remote is not None else send(verb, given)


def request_for(verb: Verb, given: Args) -> tuple[str, str, Args | None]:
    """The request of a verb's route for these arguments: path parameters in the path, true
    flags and given strings in the query, the rest in the body (values left at their defaults
    omitted)."""
    if verb.route is None:
        raise InternalError(f"{verb.name} has no route for the daemon")
    args = verb.args(given)
    path = verb.route.path.format_map({p.name: segment(args[p.name]) for p in verb.params
                                       if p.where == "path"})
    flags = [f"{p.name}=true" if p.kind is bool else f"{p.name}={segment(args[p.name])}"
             for p in verb.params if p.where == "query" and p.api and args[p.name]]
    fields = [p for p in verb.params if p.where == "body" and p.api]
    body = {p.name: args[p.name] for p in fields if args[p.name] != p.default}
    target = f"/v1/{path}" + (f"?{'&'.join(flags)}" if flags else "")
    return verb.route.method, target, body if fields else None


def _streamed(client: DaemonClient, method: str, target: str, body: Any) -> Any:
    """A streamed verb (pull): its progress drawn as the daemon sends it, then its result."""
    from imaged.cli.progress import progress_for  # noqa: PLC0415
    from imaged.events import PullEvent  # noqa: PLC0415

    with progress_for(sys.stderr) as reporter:
        for event in client.stream(method, target, body):
            if event["status"] == "done":
                reporter(PullEvent("done", id=event.get("id")))  # as the embedded pull ends
                return {k: v for k, v in event.items() if k != "status"}
            if event["status"] == "error":
                raise error_from_json(event)
            reporter(PullEvent.from_json(event))
    raise InternalError(f"the daemon on {client.path} ended {target} without a result")


def _show(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    if args.command == "bench":
        print("\n".join(result["reports"]))
        return
    verb = _VERBS.get(args.command)
    if verb is None:
        return
    text = verb.show(result)
    if text is not None:
        print(text)
    for line in verb.warnings(result):
        print(f"imaged: warning: {line}", file=sys.stderr)


def _serve(config: Config, debug: bool) -> None:
    import logging  # noqa: PLC0415

    import trio  # noqa: PLC0415

    from imaged.server.daemon import serve  # noqa: PLC0415

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="imaged: %(levelname)s: %(message)s")
    trio.run(serve, config)


def _run(args: argparse.Namespace) -> Any:
    if args.command == "bench" and args.benchmark != "copyup":
        import trio  # noqa: PLC0415

        return trio.run(_run_embedded, args, None)
    config = load_config(Overrides(config=args.config, root=args.root, driver=args.driver,
                                   socket=args.socket,
                                   registry_addr=getattr(args, "registry_addr", None)))
    if args.command == "bench":  # copyup keeps its model in the root
        import trio  # noqa: PLC0415

        return trio.run(_run_embedded, args, config)
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
    except OSError as exc:  # a file failed us where no caller said what it was doing
        if args.debug:
            traceback.print_exc()
        return _fail(args, os_failure(exc))
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug still gets one clear line
        if args.debug:
            traceback.print_exc()
        return _fail(args, InternalError(f"internal error: {describe(exc)}"
                                         + ("" if args.debug else
                                            " (run with --debug for a traceback)")))
    try:
        _show(args, result)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (imaged ps | head): not an error of ours; silence the
        # interpreter's own complaint when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    verb = _VERBS.get(args.command)
    return 1 if verb is not None and verb.failed(result) else 0


def _fail(args: argparse.Namespace, exc: ImagedError) -> int:
    print(f"imaged: error: {exc.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(exc.to_json()))
    return 1
