"""``imaged bench pull``: pull + unpack of the same images from one loopback registry by imaged
and by the peers installed on the machine (podman, containerd's ctr, skopeo + umoci),
interleaved in one run.

Every tool gets a fresh store of its own on the same dedicated loop-mounted ext4, removed after
each sample, so each sample is a cold pull (registry blobs in the page cache, the store empty).
containerd runs as a daemon: the bench starts one per sample on a temporary config and store
(start-up is not timed) and stops it by PID. imaged is measured both ways: embedded (the CLI
process does the pull) and ``imaged-daemon`` (an ``imaged serve`` started per sample the same
way, the CLI a thin client of its socket), which is the like-for-like comparison with ctr.

Three image shapes: ``debian`` (a debootstrap minbase split into five gzip layers, the last two
with whiteouts, an opaque directory and new content), ``layers128`` (128 small layers) and
``big`` (2 GiB of big files, half random, half zeros, in two gzip layers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from imaged.bench.daemon import imaged_daemon
from imaged.bench.report import Series, machine_facts, write_report
from imaged.bench.scratch import scratch_fs, settle
from imaged.bench.stores import DriverStore, driver_store, unmount_under
from imaged.config import Config
from imaged.drivers import registry
from imaged.testing.images import Entry, Layer, OCILayout, directory, file, push, streamed
from imaged.testing.registry import local_registry

SHAPES = ("debian", "layers128", "big")
TOOLS = ("imaged", "imaged-daemon", "podman", "containerd", "skopeo+umoci")
CACHE = Path("/var/cache/imaged-bench")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BIG_FILE = 512 << 20
CHUNK = 1 << 20
CONTAINERD_READY_TIMEOUT = 20.0
COMMAND_TIMEOUT = 900.0


# ----------------------------------------------------------------------------- image building

def _debian_base(notes: list[str]) -> Path:
    """A debootstrap minbase of bookworm, cached under /var/cache/imaged-bench."""
    base = CACHE / "bookworm-minbase"
    if (base / "usr" / "bin").is_dir():
        notes.append(f"debian: debootstrap --variant=minbase bookworm (cached in {base})")
        return base
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / "bookworm-minbase.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print("debootstrap --variant=minbase bookworm (a few minutes, cached afterwards)",
          file=sys.stderr)
    proc = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(tmp),
                           DEBIAN_MIRROR], capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        tmp.replace(base)
        notes.append("debian: debootstrap --variant=minbase bookworm")
        return base
    shutil.rmtree(tmp, ignore_errors=True)
    fallback = CACHE / "host-tree"
    if not (fallback / "usr" / "share").is_dir():
        print("debootstrap failed; copying /usr/share and /usr/lib/python3 instead",
              file=sys.stderr)
        shutil.rmtree(fallback, ignore_errors=True)
        shutil.copytree("/usr/share", fallback / "usr" / "share", symlinks=True)
        shutil.copytree("/usr/lib/python3", fallback / "usr" / "lib" / "python3",
                        symlinks=True)
        for name in ("bin", "etc"):
            (fallback / name).mkdir(exist_ok=True)
    notes.append(f"debian: debootstrap failed ({proc.stderr.strip()[-200:]!r}); the tree is "
                 "this machine's /usr/share and /usr/lib/python3 instead")
    return fallback


def _parents(rel: Path) -> list[Entry]:
    return [directory(str(p)) for p in reversed(rel.parents) if p != Path(".")]


def _unique(entries: Iterable[Entry]) -> Iterator[Entry]:
    """Drop repeated names (podman refuses a layer that names a path twice)."""
    seen: set[str] = set()
    for entry in entries:
        if entry.name not in seen:
            seen.add(entry.name)
            yield entry


def _tree(root: Path, top: Path, skip: set[Path]) -> Iterator[Entry]:
    """Entries for ``root/top`` (relative names), hard links kept, special files left out.

    A generator: files are read one at a time, so a layer never sits in memory.
    """
    seen: dict[tuple[int, int], str] = {}
    yield from _parents(top)
    for dirpath, dirnames, filenames in os.walk(root / top):
        base = Path(dirpath)
        rel = base.relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if rel / d not in skip)
        st = base.lstat()
        if rel != Path("."):
            yield Entry(str(rel), type=tarfile.DIRTYPE, mode=st.st_mode & 0o7777,
                        uid=st.st_uid, gid=st.st_gid)
        for name in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
            path = base / name
            st = path.lstat()
            mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
            if path.is_symlink():
                yield Entry(str(rel / name), type=tarfile.SYMTYPE, target=os.readlink(path),
                            mode=mode, uid=uid, gid=gid)
            elif path.is_file():
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen:
                    yield Entry(str(rel / name), type=tarfile.LNKTYPE, target=seen[key],
                                mode=mode, uid=uid, gid=gid)
                    continue
                seen[key] = str(rel / name)
                yield Entry(str(rel / name), path.read_bytes(), mode=mode, uid=uid, gid=gid)
        # os.walk lists symlinks to directories in dirnames; they were written above as links.
        dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]


def _build_debian(layout: OCILayout, notes: list[str]) -> list[Layer]:
    base = _debian_base(notes)
    lib, share = Path("usr/lib"), Path("usr/share")
    layers = [layout.add_layer(_unique(_tree(base, lib, set()))),
              layout.add_layer(_unique(_tree(base, share, set()))),
              layout.add_layer(_unique(_tree(base, Path("."), {lib, share})))]
    # Layer 4: whiteouts of files and directories, an opaque directory with new content.
    entries: list[Entry] = [*_parents(Path("usr/share/doc/x")), *_parents(Path("usr/bin/x"))]
    docs = sorted(p.name for p in (base / "usr/share/doc").iterdir())[:40] \
        if (base / "usr/share/doc").is_dir() else []
    entries += [file(f"usr/share/doc/.wh.{name}", b"") for name in docs]
    bins = sorted(p.name for p in (base / "usr/bin").iterdir() if p.is_file())[:20] \
        if (base / "usr/bin").is_dir() else []
    entries += [file(f"usr/bin/.wh.{name}", b"") for name in bins]
    opaque = "usr/share/locale" if (base / "usr/share/locale").is_dir() else "usr/share/doc"
    entries += [directory(opaque), file(f"{opaque}/.wh..wh..opq", b"")]
    entries += [file(f"{opaque}/new-{i:03d}.txt", b"replaced content\n" * (i + 1))
                for i in range(50)]
    layers.append(layout.add_layer(_unique(entries)))
    # Layer 5: an application of many small files, and files replacing lower ones.
    app = [directory("opt"), directory("opt/app")]
    for d in range(40):
        app.append(directory(f"opt/app/pkg{d:02d}"))
        app += [file(f"opt/app/pkg{d:02d}/mod{f:02d}.py",
                     (f"# module {d}.{f}\n" + "x = 1\n" * 2000).encode())
                for f in range(50)]
    app += [directory("etc"), file("etc/os-release", b"PRETTY_NAME=\"imaged bench\"\n")]
    layers.append(layout.add_layer(_unique(app)))
    return layers


def _build_layers128(layout: OCILayout) -> list[Layer]:
    return [layout.add_layer([directory(f"l{i:03d}")] +
                             [file(f"l{i:03d}/f{j}", os.urandom(512) * (j + 1))
                              for j in range(4)])
            for i in range(128)]


def _build_big(layout: OCILayout) -> list[Layer]:
    layers = []
    for half in range(2):
        entries = [streamed(f"big/{kind}-{half}.bin", BIG_FILE, kind == "random")
                   for kind in ("random", "zeros")]
        layers.append(layout.add_layer([directory("big"), *entries]))
    return layers


def _build(shape: str, layout: OCILayout, notes: list[str]) -> list[Layer]:
    if shape == "debian":
        return _build_debian(layout, notes)
    if shape == "layers128":
        return _build_layers128(layout)
    return _build_big(layout)


# ----------------------------------------------------------------------------- the tools

def _remove(path: Path) -> None:
    if path.exists():
        unmount_under(path)
        shutil.rmtree(path)


def _timed(cmds: list[list[str]], env: dict[str, str] | None = None) -> float:
    """Wall time of commands run one after the other, process start included."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        for cmd in cmds:
            try:
                code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                      stdin=subprocess.DEVNULL, check=False,
                                      timeout=COMMAND_TIMEOUT).returncode
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"{' '.join(cmd)} took over {COMMAND_TIMEOUT} s") from e
            if code != 0:
                err.seek(0)
                raise RuntimeError(f"{' '.join(cmd)} failed ({code}): "
                                   f"{err.read().decode(errors='replace')[-2000:]}")
        return time.perf_counter() - start


@contextlib.contextmanager
def _containerd(work: Path) -> Iterator[str]:
    """A containerd on a temporary config, root and socket; stopped by PID, always."""
    work.mkdir(parents=True)
    sock = work / "c.sock"
    config = work / "config.toml"
    config.write_text(f"""version = 2
root = "{work / 'root'}"
state = "{work / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
    log = (work.parent / "containerd.log").open("ab")
    process = subprocess.Popen(["containerd", "--config", str(config)], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        deadline = time.monotonic() + CONTAINERD_READY_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"containerd exited with {process.returncode}: see "
                                   f"{work.parent / 'containerd.log'}")
            with contextlib.suppress(OSError), \
                    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock))
                break
            if time.monotonic() > deadline:
                raise RuntimeError("containerd did not listen within "
                                   f"{CONTAINERD_READY_TIMEOUT} s")
            time.sleep(0.05)
        yield str(sock)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        unmount_under(work)


def _pull_once(tool: str, ref: str, scratch: Path, stores: dict[str, DriverStore]) -> float:
    """One cold pull + unpack by ``tool`` into a fresh store; the store is removed after."""
    work = scratch / f"store-{tool.replace('+', '-')}"
    _remove(work)
    work.mkdir()
    env = {**os.environ, "HOME": str(work)}
    try:
        settle()
        if tool.startswith("imaged"):
            return _imaged_pull(tool, ref, work, env, stores)
        if tool == "podman":
            return _timed([["podman", "--root", str(work / "root"), "--runroot",
                            str(work / "run"), "--storage-driver", "overlay",
                            "--tmpdir", str(work / "tmp"), "--events-backend", "file",
                            "--cgroup-manager", "cgroupfs",
                            "pull", "--quiet", "--tls-verify=false", ref]], env)
        if tool == "containerd":
            with _containerd(work / "containerd") as sock:
                return _timed([["ctr", "--address", sock, "--namespace", "bench", "image",
                                "pull", "--plain-http", "--snapshotter", "overlayfs", ref]],
                              env)
        oci = work / "oci"
        return _timed([["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{ref}", f"oci:{oci}:bench"],
                       ["umoci", "unpack", "--image", f"{oci}:bench", str(work / "bundle")]],
                      env)
    finally:
        _remove(work)


def _imaged_pull(tool: str, ref: str, work: Path, env: dict[str, str],
                 stores: dict[str, DriverStore]) -> float:
    """``imaged``/``imaged-daemon`` pull with the auto-chosen driver into ``work``;
    ``imaged-<driver>`` embedded into a root on that driver's own store, wiped after."""
    (work / "imaged.toml").write_text("")
    env["IMAGED_CONFIG"] = str(work / "imaged.toml")
    root = work / "root"
    driver: list[str] = []
    store = stores.get(tool.removeprefix("imaged-"))
    if store is not None:
        root = store.base / "bench-root"
        (work / "imaged.toml").write_text(store.config_toml())
        # Named: on fuse's ext4, auto-selection would pick overlay.
        driver = ["--driver", store.driver]
    command = [sys.executable, "-m", "imaged", "--root", str(root), *driver, "pull", ref]
    try:
        if tool != "imaged-daemon":
            return _timed([command], env)
        with imaged_daemon(root, env) as daemon:  # like containerd: up beforehand
            return _timed([[*command[:3], "--socket", str(daemon.socket), *command[3:]]], env)
    finally:
        if store is not None:
            store.wipe(root)


def _available(notes: list[str]) -> list[str]:
    need = {"podman": ["podman"], "containerd": ["containerd", "ctr"],
            "skopeo+umoci": ["skopeo", "umoci"]}
    tools = ["imaged", "imaged-daemon"]
    for tool, binaries in need.items():
        missing = [b for b in binaries if shutil.which(b) is None]
        if missing:
            notes.append(f"{tool}: not measured ({', '.join(missing)} not installed: "
                         "run scripts/setup)")
        else:
            tools.append(tool)
    return tools


def _other_drivers(notes: list[str]) -> list[str]:
    """The drivers measured beside the auto-chosen one (overlay), each on a store of its own:
    the snapshot drivers, and fuse, whose layers unpack as overlay's do but which a host
    without overlay would pull into."""
    need = {"btrfs": "mkfs.btrfs", "zfs": "zfs-fuse"}
    missing = [d for d, tool in need.items() if shutil.which(tool) is None]
    notes += [f"imaged-{d}: not measured ({need[d]} not installed: run scripts/setup)"
              for d in missing]
    drivers = [d for d in need if d not in missing]
    fuse = registry()["fuse"][0](Config())
    if fuse.supported:
        drivers.append("fuse")
    else:
        notes.append(f"imaged-fuse: not measured ({fuse.reason})")
    return drivers


def _versions(tools: list[str]) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
        return (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 \
            else "?"

    commands: dict[str, Callable[[], str]] = {
        "podman": lambda: first_line(["podman", "--version"]),
        "containerd": lambda: first_line(["containerd", "--version"]),
        "skopeo+umoci": lambda: first_line(["skopeo", "--version"]) + "; " +
        first_line(["umoci", "--version"]),
    }
    return {tool: commands[tool]() for tool in tools if tool in commands}


# Which peers each imaged mode is fairly compared with: a command that starts a process that
# does all the work, or one answered by a daemon that was already running.
LIKE_FOR_LIKE = {"imaged": ("podman", "skopeo+umoci"), "imaged-daemon": ("containerd",)}


def run(out: Path, runs: int, shapes: list[str]) -> list[Path]:
    if shutil.which("skopeo") is None or shutil.which("docker-registry") is None:
        raise RuntimeError("skopeo and docker-registry are needed: run scripts/setup")
    notes: list[str] = []
    tools = _available(notes)
    series: list[Series] = []
    ratios: dict[str, float] = {}
    with scratch_fs(24 << 30) as (scratch, where), \
            local_registry(scratch / "registry") as reg, contextlib.ExitStack() as stack:
        stores = {driver: stack.enter_context(driver_store(driver, scratch, where))
                  for driver in _other_drivers(notes)}
        tools += [f"imaged-{driver}" for driver in stores]
        refs = {}
        for shape in shapes:
            print(f"building and pushing the {shape} image", file=sys.stderr)
            layout = OCILayout(scratch / f"layout-{shape}")
            layers = _build(shape, layout, notes)
            layout.tag(layout.add_image(layers), shape)
            refs[shape] = f"{reg.host}/bench/{shape}:v1"
            push(layout, shape, refs[shape])
            size = sum(layer.blob.size for layer in layers)
            notes.append(f"{shape}: {len(layers)} gzip layers, {size / 1e6:.1f} MB compressed")
            shutil.rmtree(layout.path)
        by_key: dict[tuple[str, str], Series] = {}
        failed: set[tuple[str, str]] = set()
        for shape in shapes:
            for tool in tools:
                by_key[shape, tool] = Series(f"{shape}: {tool}", "seconds")
        for i in range(runs):
            for shape in shapes:
                order = tools[i % len(tools):] + tools[:i % len(tools)]
                print(f"run {i + 1}/{runs}, {shape}: {', '.join(order)}", file=sys.stderr)
                for tool in order:
                    if (shape, tool) in failed:
                        continue
                    try:
                        by_key[shape, tool].samples.append(
                            _pull_once(tool, refs[shape], scratch, stores))
                    except RuntimeError as e:
                        # One tool failing on one shape should not cost the whole report.
                        failed.add((shape, tool))
                        notes.append(f"{shape}: {tool} failed, not reported: {e}"[:600])
        series = [s for key, s in by_key.items() if key not in failed]
        for shape in shapes:
            for mine, peers in LIKE_FOR_LIKE.items():
                measured = [by_key[shape, t] for t in peers
                            if (shape, t) in by_key and (shape, t) not in failed]
                if (shape, mine) not in by_key or (shape, mine) in failed or not measured:
                    continue
                fastest = min(measured, key=lambda s: s.median)
                ratios[f"{shape}: {mine} / {fastest.name.split(': ')[1]}"] = \
                    by_key[shape, mine].median / fastest.median
        facts = {**machine_facts(), **_versions(tools)}
    notes += [
        f"{runs} runs; in each run the order of the tools rotates; every sample is a cold pull "
        f"into a fresh store of the tool's own on {where}, removed after the sample",
        "times are wall time around the whole command, process start included (imaged: "
        "python -m imaged pull, embedded; imaged-daemon: the same command answered by an imaged "
        "serve already running, as ctr's containerd is; podman pull; ctr image pull; "
        "skopeo copy to an OCI layout then umoci unpack, the two one after the other)",
        "containerd and imaged serve are started per sample on a temporary root (start-up not "
        "timed) and stopped by PID after it; its snapshotter is overlayfs; podman uses the "
        "overlay driver, imaged and imaged-daemon their auto-chosen driver (overlay); "
        "imaged-btrfs and imaged-zfs are embedded pulls into a root on a loop-mounted btrfs "
        "and on a zfs-fuse pool (a sparse file on the same ext4), imaged-fuse into a root of "
        "the fuse driver on the same ext4, each wiped after each sample",
        "ratios are like for like: embedded imaged (no daemon) against the faster of the "
        "daemonless peers, podman and skopeo+umoci; imaged-daemon against containerd; below 1, "
        "imaged is faster",
        "the registry's blobs are in the page cache; sync runs twice before every sample "
        "(loop fs, then its backing file); "
        "the tools do not all fsync alike",
    ]
    return write_report(out, "pull", "Pull + unpack from a loopback registry, imaged and peers",
                        series, facts, ratios, notes)
