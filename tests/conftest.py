"""Shared fixtures: a real registry on loopback, image layouts, and ways to run the CLI.

Every fixture that starts something stops it by PID in its finalizer, failing test or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from imaged.cli import main as cli
from imaged.config import Config, Overrides, load_config
from imaged.drivers import registry as driver_registry
from imaged.errors import ConflictError
from imaged.host import loopdev
from imaged.host.mounts import mountinfo, unmount
from imaged.ops.service import Service
from imaged.testing import zfsfuse
from imaged.testing.images import OCILayout, directory, file, push
from imaged.testing.registry import LocalRegistry, start_registry
from tests.integration.faulty import FaultyRegistry, serve


def pytest_sessionstart(session: pytest.Session) -> None:
    """SIGTERM and SIGHUP stop the run after the test under way, and the session then ends as
    usual, so every finalizer runs: the session's registries and zfs-fuse daemon are stopped by
    PID, mounts and loop devices go, a guest kernel is killed with its processes. Their default
    action would leave all of that behind (a CI runner or a closed terminal ends pytest with one
    of them). Not turned into KeyboardInterrupt: the in-process CLI and trio catch that inside
    a test, which then fails and the run goes on."""
    def stop(signum: int, frame: object) -> None:
        session.shouldstop = f"stopped by {signal.Signals(signum).name}"

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``cli_modes`` run twice: CLI in-process, and CLI through a daemon."""
    if "cli_mode" in metafunc.fixturenames:
        modes = ["embedded", "daemon"] if metafunc.definition.get_closest_marker("cli_modes") \
            else ["embedded"]
        metafunc.parametrize("cli_mode", modes)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/unit are the ``unit`` tier unless marked otherwise. ``long`` runs
    are deselected (not skipped: nothing is missing) unless ``-m`` names them."""
    if "long" not in (config.option.markexpr or ""):
        long_runs = [item for item in items if item.get_closest_marker("long")]
        if long_runs:
            config.hook.pytest_deselected(items=long_runs)
            items[:] = [item for item in items if not item.get_closest_marker("long")]
    for item in items:
        tiers = {"unit", "integration", "guest"}
        if not any(item.get_closest_marker(t) for t in tiers):
            item.add_marker(pytest.mark.unit if "/unit/" in str(item.path) else
                            pytest.mark.integration)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path``, as statfs(2) names it (``stat -f``): a fact
    independent of imaged's own mount-table reading, for tests to decide skips by."""
    out = subprocess.run(["stat", "-f", "--format=%T", str(path)], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return out.strip()


def hog(path: Path) -> None:
    """Take every free block of the filesystem holding ``path``, down to the last byte."""
    with path.open("wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while out.write(b"\0" * size):
                    pass
        with contextlib.suppress(OSError):
            os.fsync(out.fileno())


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (run scripts/setup)")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """One plain-HTTP registry for the whole session; tests use distinct repository names."""
    need_tools("docker-registry", "skopeo")
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        reg.stop()


DRIVERS = list(driver_registry())
# Drivers whose root must be on a filesystem of their own: the mkfs that makes it.
ROOT_MKFS = {"btrfs": ["mkfs.btrfs", "--quiet"]}
ROOT_FS_SIZE = 4 << 30  # sparse: the host pays only for what a test writes


def unmount_below(path: Path) -> None:
    """Lazily unmount whatever is mounted under ``path`` (not ``path`` itself), deepest first."""
    for mount in reversed(mountinfo()):
        if mount.mount_point.startswith(str(path) + "/"):
            unmount(Path(mount.mount_point), lazy=True)


@contextlib.contextmanager
def loop_filesystem(mkfs: list[str], image: Path, mount_point: Path,
                    options: str = "", size: int = 0) -> Iterator[Path]:
    """A fresh filesystem in a sparse file of ``size`` (default ``ROOT_FS_SIZE``), mounted at
    ``mount_point`` through an autoclear loop device (imaged.host.loopdev): unmounting releases the
    device, so the finalizer's unmount leaves no device bound, failing test or not."""
    need_tools(mkfs[0])
    with image.open("wb") as f:
        f.truncate(size or ROOT_FS_SIZE)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True, timeout=120)
    mount_point.mkdir(parents=True, exist_ok=True)
    with loopdev.attach(image) as attachment:  # held open until the mount holds the device
        subprocess.run(["mount", *(["-o", options] if options else []),
                        str(attachment.device.path), str(mount_point)], check=True,
                       capture_output=True, timeout=60)
    try:
        yield mount_point
    finally:
        unmount_below(mount_point)
        try:
            unmount(mount_point)
        except ConflictError:  # a process still has a file open: detach, freed when it exits
            unmount(mount_point, lazy=True)
        image.unlink()
        assert loopdev.wait_unbound(attachment.device, image), \
            f"{attachment.device.path} still bound to {image}"


@pytest.fixture(scope="session")
def xfs_filesystem(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One xfs filesystem for the session: a test that needs xfs takes a directory of it (the
    conformance battery's ``fuse-xfs`` beds bind one as their root), which costs a mkdir where
    an mkfs per test would cost a second or more. Private, so that mounts made under a bind of
    it stay there (no propagation to the filesystem or other binds)."""
    base = tmp_path_factory.mktemp("xfs")
    with loop_filesystem(["mkfs.xfs", "-q"], base / "xfs.img", base / "mnt") as mounted:
        subprocess.run(["mount", "--make-private", str(mounted)], check=True,
                       capture_output=True, timeout=60)
        yield mounted


@pytest.fixture(scope="session")
def zfs_daemon() -> Iterator[zfsfuse.Daemon]:
    """One zfs-fuse daemon for the session (each test gets a pool of its own in it)."""
    need_tools("zfs-fuse", "zfs", "zpool")
    with zfsfuse.running() as daemon:
        yield daemon


def add_config(tmp_path: Path, text: str) -> None:
    """Append a table to the test's config file (``isolated_env`` puts its keys first)."""
    with (tmp_path / "imaged.toml").open("a") as config:
        config.write(text)


def zfs_dataset(request: pytest.FixtureRequest, tmp_path: Path,
                stack: contextlib.ExitStack) -> dict[str, dict[str, str]]:
    """A fresh pool for the test, its dataset configured for the CLI and daemons it runs; the
    root's mounts go before the pool does."""
    request.getfixturevalue("zfs_daemon")
    pool = stack.enter_context(zfsfuse.pool(tmp_path / "zfs"))
    stack.callback(unmount_below, tmp_path / "root")
    add_config(tmp_path, f'[drivers.zfs]\ndataset = "{pool.dataset}"\n')
    return {"zfs": {"dataset": pool.dataset}}


@contextlib.contextmanager
def driver_bed(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> Iterator[str]:
    """The driver ``name`` ready on the ``root`` fixture's directory: for a driver that needs its
    own filesystem (ROOT_MKFS), a fresh one mounted there for the test and gone after it; zfs
    gets a pool of its own, configured in the test's config file."""
    if os.geteuid() != 0:
        pytest.skip("drivers mount filesystems: needs root")
    with contextlib.ExitStack() as stack:
        if name in ROOT_MKFS:
            stack.enter_context(loop_filesystem(ROOT_MKFS[name], tmp_path / f"{name}.img",
                                                tmp_path / "root"))
        options = zfs_dataset(request, tmp_path, stack) if name == "zfs" else {}
        probe, _ = driver_registry()[name]
        result = probe(Config(root=tmp_path / "root", drivers=options))
        if not result.supported:
            pytest.skip(f"{name} not supported here: {result.reason}")
        yield name


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each built driver in turn (see ``driver_bed``)."""
    with driver_bed(request, tmp_path, request.param) as name:
        yield name


@pytest.fixture
def layout(tmp_path: Path) -> OCILayout:
    return OCILayout(tmp_path / "layout")


@dataclass
class Pushed:
    ref: str  # what to pull: host/repo:tag
    manifest_digest: str
    layout: OCILayout


def push_simple(layout: OCILayout, registry: LocalRegistry, repo: str, tag: str = "v1",
                compression: str | None = "gzip", files: dict[str, bytes] | None = None,
                docker_format: bool = False) -> Pushed:
    """A two-layer image with a few files; enough for most pull tests."""
    base = layout.add_layer([directory("etc"), file("etc/os-release", b"ID=imaged-test\n")],
                            compression)
    top = layout.add_layer([file(name, data) for name, data in
                            (files or {"hello.txt": f"hello from {repo}\n".encode()}).items()],
                           compression)
    manifest = layout.add_image([base, top])
    layout.tag(manifest, f"{repo.replace('/', '-')}-{tag}")
    ref = f"{registry.host}/{repo}:{tag}"
    push(layout, f"{repo.replace('/', '-')}-{tag}", ref, docker_format=docker_format)
    return Pushed(ref, manifest.digest, layout)


def push_bad_diff_id(layout: OCILayout, registry: LocalRegistry, repo: str,
                     data: bytes) -> str:
    """An image whose one layer downloads and verifies but whose config names another DiffID:
    its pull fails at unpacking and leaves the layer's bytes in ingest."""
    layer = layout.add_layer([file("big.bin", data)])
    manifest = layout.add_image([layer], config_extra={
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}})
    name = repo.replace("/", "-")
    layout.tag(manifest, name)
    ref = f"{registry.host}/{repo}:v1"
    push(layout, name, ref)
    return ref


def upstream_gets(registry: LocalRegistry, repo: str) -> list[str]:
    """The registry's access-log lines for GETs under ``repo``: what pulls really fetched."""
    return [line for line in registry.log().splitlines() if f'"GET /v2/{repo}/' in line]


@pytest.fixture
def faulty() -> Iterator[FaultyRegistry]:
    """A registry that misbehaves on demand (tests/integration/faulty.py), stopped at teardown."""
    with serve() as registry:
        yield registry


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The store's root; with the ``driver`` fixture, a filesystem that driver needs (btrfs)."""
    return tmp_path / "root"


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """No host config, credentials or certs leak into a test: HOME, config and certs are ours."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    config = tmp_path / "imaged.toml"
    tables = config.read_text() if config.exists() else ""  # the driver fixture's, if any
    if "certs_dirs" not in tables:
        config.write_text(f'certs_dirs = ["{tmp_path / "certs.d"}"]\n{tables}')
    for var in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "IMAGED_ROOT",
                "IMAGED_DRIVER", "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS"):
        monkeypatch.delenv(var, raising=False)
    # Never a host daemon's socket: a test talks to the daemon it started, or to none.
    monkeypatch.setenv("IMAGED_SOCKET", str(tmp_path / "no-daemon.sock"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("IMAGED_CONFIG", str(config))
    return {"HOME": str(home), "IMAGED_CONFIG": str(config),
            "IMAGED_SOCKET": str(tmp_path / "no-daemon.sock")}


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Daemon:
    """``imaged serve`` as a real process on a short socket path (AF_UNIX allows 107 bytes)."""

    def __init__(self, root: Path, env: dict[str, str], driver: str | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.dir = Path(tempfile.mkdtemp(prefix="imd-", dir="/tmp"))
        self.socket = self.dir / "imaged.sock"
        self.log = self.dir / "daemon.log"
        self.env = {**os.environ, **env, "IMAGED_SOCKET": str(self.socket), **(extra_env or {})}
        args = ["--driver", driver] if driver else []
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imaged", "--root", str(root), *args, "serve"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.output()}")
            if self.socket.is_socket():
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(str(self.socket))
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def loop_calls(self) -> tuple[int, list[str]]:
        """Once stopped: how many calls that wait on the root's disk its event loop made (the
        count it logs at the end, ``imaged.server.stalls``), and the call sites it logged."""
        log = self.output()
        (count,) = re.findall(r"calls on the event loop that waited on the root's disk: (\d+)",
                              log)
        return int(count), [line for line in log.splitlines()
                            if "on the event loop by task" in line]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def start_daemon(root: Path, isolated_env: dict[str, str]) -> Iterator[Any]:
    """Start daemons on ``root`` (or another); every one is stopped, by PID, at teardown."""
    started: list[Daemon] = []

    def start(driver: str | None = None, on: Path | None = None,
              env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(on or root, isolated_env, driver, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()
    # Mounts outlive a daemon (by design): whatever one left under its root goes now.
    for daemon in started:
        unmount_below(daemon.root)


@pytest.fixture
def daemon(start_daemon: Any) -> Daemon:
    started: Daemon = start_daemon()
    return started


@pytest.fixture
def cli_mode() -> str:
    return "embedded"  # parametrized by pytest_generate_tests for tests marked cli_modes


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each test's outcome on its item: the store check after a stateful test runs only
    when the test itself passed (a failure has told its story already)."""
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


CALL_FAILED = pytest.StashKey[bool]()


def check_store(root: Path) -> None:
    """``imaged check`` in this process on a root nobody holds: nothing found, and nothing
    that opening the root had to repair first."""
    async def run() -> dict[str, Any]:
        async with Service.open(load_config(Overrides(root=root)), "test store check") as svc:
            return await svc.check()

    report = trio.run(run)
    assert report["findings"] == [] and report["recovered"] == [], report


class CLI:
    """The CLI in this process: ``imaged("pull", ref)`` → Result. In daemon mode a daemon is
    started on the root at the first command (with that command's ``--driver``), and every
    command goes through its socket.

    ``finish`` ends a stateful test (conformance, ``cli_modes``) by proving its store
    consistent: the daemon, which holds the root's lock, is stopped first, and the check runs
    before anything unmounts what the test left mounted (that would make records stale)."""

    def __init__(self, request: pytest.FixtureRequest, root: Path, cli_mode: str,
                 start_daemon: Any, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:
        self.request = request
        self.root = root
        self.cli_mode = cli_mode
        self.start_daemon = start_daemon
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        self.daemon: Daemon | None = None
        self.finished = False

    def __call__(self, *args: str) -> Result:
        if self.cli_mode == "daemon" and self.daemon is None:
            driver = args[args.index("--driver") + 1] if "--driver" in args else None
            self.daemon = self.start_daemon(driver)
            self.monkeypatch.setenv("IMAGED_SOCKET", str(self.daemon.socket))
        self.capsys.readouterr()
        code = cli.main(["--root", str(self.root), *args])
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        item = self.request.node
        stateful = item.get_closest_marker("cli_modes") is not None or \
            "/conformance/" in str(item.path)
        if self.daemon is not None:
            self.daemon.stop()
        if stateful and not item.stash.get(CALL_FAILED, True) and \
                (self.root / "metadata.db").exists():
            check_store(self.root)


@pytest.fixture
def imaged(request: pytest.FixtureRequest, root: Path, isolated_env: dict[str, str],
           capsys: pytest.CaptureFixture[str], cli_mode: str, start_daemon: Any,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[CLI]:
    """Run the CLI in this process (fast); see ``CLI``."""
    run = CLI(request, root, cli_mode, start_daemon, monkeypatch, capsys)
    yield run
    run.finish()


@pytest.fixture
def imaged_proc(root: Path, isolated_env: dict[str, str]) -> Any:
    """Run the CLI as a real process, for exit codes and stream separation end to end."""

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        full_env = {**os.environ, **isolated_env, **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "imaged", "--root", str(root), *args],
                              capture_output=True, text=True, env=full_env, timeout=300,
                              check=False)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run
