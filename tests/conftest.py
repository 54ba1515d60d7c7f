"""Shared fixtures: a real registry on loopback, image layouts, and ways to run the CLI.

Every fixture that starts something stops it by PID in its finalizer, failing test or not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imaged import cli
from imaged.bench.images import OCILayout, directory, file, push
from imaged.bench.registry import LocalRegistry, start_registry


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/unit are the ``unit`` tier unless marked otherwise."""
    for item in items:
        tiers = {"unit", "integration", "guest"}
        if not any(item.get_closest_marker(t) for t in tiers):
            item.add_marker(pytest.mark.unit if "/unit/" in str(item.path) else
                            pytest.mark.integration)


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


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """No host config, credentials or certs leak into a test: HOME, config and certs are ours."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    config = tmp_path / "imaged.toml"
    if not config.exists():
        config.write_text(f'certs_dirs = ["{tmp_path / "certs.d"}"]\n')
    for var in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "IMAGED_ROOT",
                "IMAGED_DRIVER", "IMAGED_SOCKET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("IMAGED_CONFIG", str(config))
    return {"HOME": str(home), "IMAGED_CONFIG": str(config)}


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def imaged(root: Path, isolated_env: dict[str, str],
           capsys: pytest.CaptureFixture[str]) -> Any:
    """Run the CLI in this process (fast): ``imaged("pull", ref)`` → Result."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = cli.main(["--root", str(root), *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


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
