"""The package as shipped: every module sits in its layer, and the wheel holds all of them.

The layers are the import graph written down. A module may import its own package and any package
of a lower layer, never one above: kernel plumbing must not reach up into the store, nor the store
into the server. The fuse filesystem (``imaged.fuse``) sits just below the drivers, which wrap it.
``imaged.registry_client.client`` is the one module placed apart from its package: it downloads
into the content store's ingest, so it sits above the store, while references and manifests are
parsed far below it.

An editable install finds any module in the source tree, so only a built wheel shows a package
missing from pyproject's explicit list.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]

# Low to high. Top-level modules of ``imaged`` (errors, sizes, digest, fsutil, config, events,
# faults, names, tools) are the base, layer 0.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("imaged",),
    ("imaged.host", "imaged.registry_client"),
    ("imaged.quota", "imaged.layers"),
    ("imaged.fuse",),
    ("imaged.drivers",),
    ("imaged.store",),
    ("imaged.registry_client.client",),
    ("imaged.ops",),
    ("imaged.server",),
    ("imaged.testing",),
    ("imaged.bench",),
    ("imaged.cli",),
    ("imaged.__main__",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def source_roots() -> dict[str, Path]:
    """Package name → its folder, from pyproject's package-dir mapping (the card's folders)."""
    setuptools = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: CHECKOUT / folder for name, folder in setuptools["package-dir"].items()}


def source_modules() -> Iterator[tuple[str, Path]]:
    """Every module of the source tree with its dotted name."""
    for package, folder in source_roots().items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def unit_of(module: str) -> str:
    """The layer table's entry a module belongs to: the longest that names it or a parent."""
    candidates = [unit for unit in RANK if module == unit or module.startswith(unit + ".")]
    return max(candidates, key=len)


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every ``imaged`` import, function-local ones included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("imaged"):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("imaged"):
                continue
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield node.lineno, submodule if submodule in known else node.module


def test_every_module_has_a_layer() -> None:
    modules = dict(source_modules())
    assert "imaged.store.root" in modules
    assert "imaged.drivers.devmapper.pool" in modules
    unplaced = [name for name in modules
                if unit_of(name) == "imaged" and name.count(".") > 1]
    assert unplaced == [], "packages missing from LAYERS"


def test_imports_go_down_the_layers() -> None:
    modules = dict(source_modules())
    wrong = []
    for module, path in modules.items():
        unit = unit_of(module)
        for line, target in imports_of(module, path, set(modules)):
            if target == "imaged":  # ``from imaged import __version__``
                continue
            other = unit_of(target)
            if other != unit and RANK[other] >= RANK[unit]:
                wrong.append(f"{path.relative_to(CHECKOUT)}:{line}: {module} ({unit}) imports "
                             f"{target} ({other})")
    assert wrong == []


def test_the_layer_check_sees_a_wrong_import(tmp_path: Path) -> None:
    """The check itself, on a module that reaches up from kernel plumbing into the store."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from imaged.store import gc\n    import imaged.server.api\n")
    found = [target for _, target in imports_of("imaged.host.bad", bad, {"imaged.store.gc"})]
    assert found == ["imaged.store.gc", "imaged.server.api"]
    assert all(RANK[unit_of(t)] > RANK[unit_of("imaged.host.bad")] for t in found)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel, offline, with the setuptools the test extras install.

    Built from a copy of the sources, since setuptools keeps ``build/lib`` between builds and
    would ship a module from an old build that the package list no longer names."""
    out = tmp_path_factory.mktemp("wheel")
    sources = out / "sources"
    for folder in {path.relative_to(CHECKOUT).parts[0] for path in source_roots().values()}:
        shutil.copytree(CHECKOUT / folder, sources / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, sources / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(out), str(sources)],
                   check=True, timeout=300, capture_output=True)
    [built] = out.glob("imaged-*.whl")
    unpacked = out / "unpacked"
    with zipfile.ZipFile(built) as archive:
        archive.extractall(unpacked)
    return unpacked


def test_the_wheel_imports_every_module(wheel: Path) -> None:
    """Each module imported from the unpacked wheel alone: ``-S`` skips site, so the editable
    install's finder (a .pth hook) is never loaded, and the dependencies come from site-packages
    on PYTHONPATH."""
    names = [name for name, _ in source_modules() if not name.endswith(".__main__")]
    script = (
        "import importlib, importlib.resources, sys\n"
        "for name in sys.argv[2:]:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(sys.argv[1]), (name, module.__file__)\n"
        "importlib.resources.files('imaged.server').joinpath('openapi.json').read_text()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(wheel), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])}
    result = subprocess.run([sys.executable, "-S", "-c", script, str(wheel), *names], env=env,
                            capture_output=True, text=True, timeout=120, check=False, cwd=wheel)
    assert result.returncode == 0, result.stderr
