"""Pulls from a real registry (Debian's docker-registry on 127.0.0.1), through the CLI.

Covers both manifest families, every layer compression, multi-platform indexes, shared layers,
references by digest, ``images``/``rmi``/``info`` and the CLI's output contract.
"""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imaged.store.lock import RootLock
from imaged.testing.images import OCILayout, file, push
from imaged.testing.registry import LocalRegistry
from tests.conftest import push_simple


def blob_names(root: Path) -> set[str]:
    return {p.name for p in (root / "content" / "blobs" / "sha256").iterdir()}


@pytest.mark.cli_modes
def test_pull_records_image_and_prints_id(registry: LocalRegistry, layout: OCILayout,
                                          imaged: Any, root: Path) -> None:
    pushed = push_simple(layout, registry, "pull/basic")
    result = imaged("pull", pushed.ref)
    assert result.code == 0, result.err
    assert result.out.strip().splitlines()[-1] == pushed.manifest_digest
    listing = imaged("--json", "images").json()
    assert [img["id"] for img in listing] == [pushed.manifest_digest]
    assert listing[0]["refs"] == [pushed.ref]
    assert listing[0]["layers"] == 2
    assert pushed.manifest_digest.split(":")[1] in blob_names(root)
    assert not any((root / "content" / "ingest").iterdir())
    # Blobs are stored read-only: nothing may rewrite verified content in place.
    for blob in (root / "content" / "blobs" / "sha256").iterdir():
        assert blob.stat().st_mode & 0o222 == 0


@pytest.mark.cli_modes
@pytest.mark.parametrize("compression", ["gzip", "zstd", None])
def test_every_layer_compression(registry: LocalRegistry, layout: OCILayout, imaged: Any,
                                 compression: str | None) -> None:
    pushed = push_simple(layout, registry, f"pull/comp-{compression or 'plain'}",
                         compression=compression)
    result = imaged("--json", "pull", pushed.ref)
    assert result.code == 0, result.err
    assert result.json()["id"] == pushed.manifest_digest


def test_docker_schema2_manifest(registry: LocalRegistry, layout: OCILayout, imaged: Any,
                                 root: Path) -> None:
    pushed = push_simple(layout, registry, "pull/docker", docker_format=True)
    result = imaged("--json", "pull", pushed.ref)
    assert result.code == 0, result.err
    db = sqlite3.connect(root / "metadata.db")
    (media_type,) = db.execute("SELECT media_type FROM images").fetchone()
    layer_types = {r[0] for r in db.execute("SELECT media_type FROM image_layers")}
    db.close()
    assert media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert layer_types == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}


def _multi_platform(layout: OCILayout, registry: LocalRegistry, repo: str) -> dict[str, str]:
    shared = layout.add_layer([file("shared.txt", b"in every platform\n")])
    digests = {}
    entries = []
    for arch, variant in (("amd64", None), ("arm64", None), ("arm", "v7")):
        own = layout.add_layer([file("arch.txt", f"{arch}{variant or ''}\n".encode())])
        manifest = layout.add_image([shared, own], arch=arch, variant=variant)
        plat = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        entries.append((manifest, plat))
        digests["/".join(p for p in ("linux", arch, variant) if p)] = manifest.digest
    # An attestation entry as BuildKit writes them must never be chosen.
    attestation = layout.add_image([shared], os_name="unknown", arch="unknown")
    entries.append((attestation, {"os": "unknown", "architecture": "unknown"}))
    index = layout.add_index(entries)
    layout.tag(index, repo)
    push(layout, repo, f"{registry.host}/{repo}:v1")
    digests["index"] = index.digest
    return digests


@pytest.mark.cli_modes
def test_multi_platform_index(registry: LocalRegistry, layout: OCILayout, imaged: Any,
                              root: Path) -> None:
    digests = _multi_platform(layout, registry, "pull/multi")
    ref = f"{registry.host}/pull/multi:v1"
    host = imaged("--json", "pull", ref)
    assert host.code == 0, host.err
    assert host.json()["id"] == digests["linux/amd64"]
    arm = imaged("--json", "pull", ref, "--platform", "linux/arm/v7")
    assert arm.json()["id"] == digests["linux/arm/v7"]
    arm64 = imaged("--json", "pull", "--platform", "linux/aarch64", ref)
    assert arm64.json()["id"] == digests["linux/arm64"]
    missing = imaged("pull", ref, "--platform", "linux/s390x")
    assert missing.code == 1
    assert "no manifest for platform linux/s390x" in missing.err
    assert "linux/amd64" in missing.err and "unknown" not in missing.err
    # The index is kept as the reference's repo digest.
    assert digests["index"].split(":")[1] in blob_names(root)


@pytest.mark.cli_modes
def test_pull_by_digest_and_shared_layers(registry: LocalRegistry, layout: OCILayout,
                                          imaged: Any) -> None:
    first = push_simple(layout, registry, "pull/shared-a")
    second = push_simple(layout, registry, "pull/shared-b")
    assert imaged("pull", first.ref).code == 0
    by_digest = f"{registry.host}/pull/shared-b@{second.manifest_digest}"
    result = imaged("pull", by_digest)
    assert result.code == 0, result.err
    # The base layer is identical in both images: fetched once, reported as present.
    assert "already present" in result.err
    refs = {r for img in imaged("--json", "images").json() for r in img["refs"]}
    assert refs == {first.ref, by_digest}


@pytest.mark.cli_modes
def test_pull_by_wrong_digest_is_not_found(registry: LocalRegistry, layout: OCILayout,
                                           imaged: Any) -> None:
    pushed = push_simple(layout, registry, "pull/wrong-digest")
    ref = pushed.ref.rsplit(":", 1)[0] + "@sha256:" + "0" * 64
    result = imaged("--json", "pull", ref)
    assert result.code == 1
    assert result.json()["error"]["code"] == "not_found"


def test_repeated_layer_blob_is_fetched_once(registry: LocalRegistry, layout: OCILayout,
                                             imaged: Any) -> None:
    empty = layout.add_layer([], compression="gzip")
    own = layout.add_layer([file("x", b"x")])
    manifest = layout.add_image([empty, own, empty])
    layout.tag(manifest, "repeat")
    push(layout, "repeat", f"{registry.host}/pull/repeat:v1")
    result = imaged("pull", f"{registry.host}/pull/repeat:v1")
    assert result.code == 0, result.err
    assert result.err.count(f"layer {empty.blob.digest.split(':')[1][:12]}: downloading") == 1
    assert imaged("--json", "images").json()[0]["layers"] == 3


@pytest.mark.cli_modes
def test_rmi_by_name_and_id(registry: LocalRegistry, layout: OCILayout, imaged: Any,
                            root: Path) -> None:
    a = push_simple(layout, registry, "rmi/a")
    b = push_simple(layout, registry, "rmi/b")
    assert imaged("pull", a.ref).code == 0
    assert imaged("pull", b.ref).code == 0
    alias = a.ref.replace(":v1", "@" + a.manifest_digest)
    assert imaged("pull", alias).code == 0
    before = blob_names(root)

    image_id = a.manifest_digest.split(":")[1]
    refused = imaged("--json", "rmi", image_id[:12])
    assert refused.code == 1
    assert refused.json()["error"]["code"] == "conflict"
    assert "2 names" in refused.json()["error"]["message"]

    untag = imaged("--json", "rmi", alias).json()
    assert untag["untagged"] == [alias] and untag["deleted"] is False
    assert blob_names(root) == before

    gone = imaged("--json", "rmi", image_id[:16]).json()
    assert gone["deleted"] is True and gone["untagged"] == [a.ref]
    left = blob_names(root)
    # b shares the base layer with a: that blob stays, a's own blobs go.
    assert b.manifest_digest.split(":")[1] in left
    assert image_id not in left
    assert len(left) < len(before)
    assert gone["freed_bytes"] > 0
    assert imaged("rmi", a.ref).code == 1


@pytest.mark.cli_modes
def test_id_prefix_rules(registry: LocalRegistry, layout: OCILayout, imaged: Any) -> None:
    pushed = push_simple(layout, registry, "rmi/prefix")
    assert imaged("pull", pushed.ref).code == 0
    short = imaged("--json", "rmi", pushed.manifest_digest.split(":")[1][:8])
    assert short.code == 1 and short.json()["error"]["code"] == "invalid"
    assert "at least 12" in short.json()["error"]["message"]
    assert imaged("rmi", "sha256:" + pushed.manifest_digest.split(":")[1][:12]).code == 0


@pytest.mark.cli_modes
def test_info_reports_root_and_content(registry: LocalRegistry, layout: OCILayout,
                                       imaged: Any, root: Path) -> None:
    pushed = push_simple(layout, registry, "info/one")
    assert imaged("pull", pushed.ref).code == 0
    info = imaged("--json", "info").json()
    assert info["root"] == str(root)
    assert info["images"] == 1
    assert info["content"]["blobs"] == 4  # two layers, the config and the manifest
    assert info["backing_filesystem"]["type"] not in ("", "unknown")
    text = imaged("info")
    assert str(root) in text.out


@pytest.mark.cli_modes
@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("Upper/Case", "lowercase"),
        ("bad::tag", "invalid reference"),
        ("repo@sha256:123", "sha256 needs 64"),
        ("a" * 64, "image ID"),
    ],
)
def test_malformed_references(imaged: Any, root: Path, ref: str, words: str) -> None:
    result = imaged("--json", "pull", ref)
    assert result.code == 1
    assert result.json()["error"]["code"] == "invalid"
    assert words in result.json()["error"]["message"]
    assert "imaged: error: " in result.err
    assert not (root / "content" / "blobs" / "sha256").exists() or not blob_names(root)


def test_cli_process_contract(registry: LocalRegistry, layout: OCILayout,
                              imaged_proc: Any) -> None:
    pushed = push_simple(layout, registry, "cli/proc")
    result = imaged_proc("pull", pushed.ref)
    assert result.code == 0, result.err
    assert result.out.strip() == pushed.manifest_digest  # stdout holds only the ID
    assert "resolving" in result.err and f"pulled {pushed.manifest_digest}" in result.err
    usage = imaged_proc("pull")
    assert usage.code == 2
    bad = imaged_proc("pull", "Bad/Ref")
    assert bad.code == 1
    assert bad.err.startswith("imaged: error: ") and "Traceback" not in bad.err
    both = imaged_proc("images", "--json")
    assert json.loads(both.out)[0]["id"] == pushed.manifest_digest


def test_root_in_use(imaged: Any, root: Path) -> None:
    root.mkdir(parents=True)
    lock = RootLock(root / "lock", "imaged serve")
    try:
        result = imaged("--json", "images")
    finally:
        lock.release()
    assert result.code == 1
    assert result.json()["error"]["code"] == "conflict"
    assert "root is in use by imaged serve (pid" in result.err
    assert "use its socket" in result.err


def test_config_file_errors_name_the_key(imaged: Any, isolated_env: dict[str, str]) -> None:
    Path(isolated_env["IMAGED_CONFIG"]).write_text("[limits]\nconcurent_downloads = 2\n")
    result = imaged("images")
    assert result.code == 1
    assert "limits.concurent_downloads" in result.err
    assert isolated_env["IMAGED_CONFIG"] in result.err


def test_layer_over_size_limit_is_refused(registry: LocalRegistry, layout: OCILayout,
                                          imaged: Any, root: Path,
                                          isolated_env: dict[str, str]) -> None:
    big = layout.add_layer([file("big", bytes(300_000))], compression=None)
    manifest = layout.add_image([big])
    layout.tag(manifest, "big")
    push(layout, "big", f"{registry.host}/pull/big:v1")
    config = Path(isolated_env["IMAGED_CONFIG"])
    config.write_text(config.read_text() + '[limits]\nmax_layer_bytes = "100k"\n')
    result = imaged("pull", f"{registry.host}/pull/big:v1")
    assert result.code == 1
    assert "limits.max_layer_bytes" in result.err
    assert imaged("--json", "images").json() == []


def test_progress_bars_on_a_terminal(registry: LocalRegistry, layout: OCILayout, root: Path,
                                     isolated_env: dict[str, str]) -> None:
    """On a TTY stderr gets live bars (rich), stdout still only the ID."""
    pushed = push_simple(layout, registry, "cli/tty", files={"big": os.urandom(3 << 20)})
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "imaged", "--root", str(root), "pull", pushed.ref],
            stdout=subprocess.PIPE, stderr=secondary, env={**os.environ, **isolated_env,
                                                           "COLUMNS": "100"},
            timeout=120, check=False)
        os.close(secondary)
        secondary = -1
        chunks = []
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal
    assert proc.stdout.decode().strip() == pushed.manifest_digest
    assert "\x1b[" in terminal  # cursor movement and colour: a live display, not plain lines
    assert "━" in terminal or "MB" in terminal
    assert "resolving" not in terminal  # the plain-line format is for non-terminals only
