"""Build OCI images from files, without network, and push them with skopeo.

Writing tar files with ``tarfile`` is safe (only extraction is dangerous), so layers are made
with it. Blobs are streamed to disk and hashed on the way, so a 2 GiB image costs no memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import zstandard

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_BY_COMPRESSION = {None: OCI_LAYER, "gzip": OCI_LAYER + "+gzip", "zstd": OCI_LAYER + "+zstd"}


@dataclass
class Entry:
    """One tar member to write; ``data`` for files, ``target`` for links."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    target: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    pax: dict[str, str] = field(default_factory=dict)
    size: int | None = None  # for streamed files: bytes read from ``source``
    source: IO[bytes] | None = None


def file(name: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(name, data, mode=mode)


def directory(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, type=tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, type=tarfile.SYMTYPE, mode=0o777, target=target)


class _Filler:
    """A file-like source of ``size`` bytes, random or zeros, read in chunks: multi-GiB layers
    are built without holding their files in memory."""

    def __init__(self, size: int, random: bool) -> None:
        self.left = size
        self.random = random

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n) if self.random else bytes(n)


def streamed(name: str, size: int, random: bool) -> Entry:
    """A file of ``size`` random (incompressible) or zero bytes, streamed into the tar."""
    return Entry(name, size=size, source=cast(IO[bytes], _Filler(size, random)))


def write_tar(out: IO[bytes], entries: Iterable[Entry]) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        # Streamed multi-GiB files: 16 KiB copies would dominate. The attribute exists since
        # Python 3.8; typeshed does not list it.
        tar.copybufsize = 1 << 20  # type: ignore[attr-defined]
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.uid, info.gid, info.mtime = e.type, e.mode, e.uid, e.gid, \
                e.mtime
            info.linkname = e.target
            info.pax_headers = dict(e.pax)
            if e.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = e.size if e.size is not None else len(e.data)
                tar.addfile(info, e.source if e.source is not None else io.BytesIO(e.data))
            else:
                tar.addfile(info)


def tar_bytes(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, entries)
    return buf.getvalue()


class _HashingWriter(io.RawIOBase):
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.out.write(view)
        self.hash.update(view)
        self.size += len(view)
        return len(view)


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    size: int

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Layer:
    blob: Blob
    diff_id: str


class OCILayout:
    """An OCI image layout directory that skopeo can read (``oci:DIR:NAME``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self._index: list[dict[str, Any]] = []

    def add_bytes(self, data: bytes, media_type: str) -> Blob:
        digest = hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / digest).write_bytes(data)
        return Blob(media_type, f"sha256:{digest}", len(data))

    def add_layer(self, entries: Iterable[Entry], compression: str | None = "gzip") -> Layer:
        """Stream a tar through the compressor to disk, hashing both the tar and the blob."""
        tmp = self.path / "blobs" / "tmp-layer"
        with tmp.open("wb") as raw:
            blob_hash = _HashingWriter(raw)
            comp: Any
            if compression == "gzip":
                comp = gzip.GzipFile(fileobj=blob_hash, mode="wb", mtime=0,
                                                compresslevel=1)
            elif compression == "zstd":
                comp = zstandard.ZstdCompressor(level=1).stream_writer(
                    cast(IO[bytes], blob_hash), closefd=False)
            else:
                comp = blob_hash
            tar_hash = _HashingWriter(comp)
            write_tar(cast(IO[bytes], tar_hash), entries)
            if comp is not blob_hash:
                comp.close()
        digest = blob_hash.hash.hexdigest()
        tmp.replace(self.path / "blobs" / "sha256" / digest)
        return Layer(Blob(MEDIA_BY_COMPRESSION[compression], f"sha256:{digest}", blob_hash.size),
                     f"sha256:{tar_hash.hash.hexdigest()}")

    def add_image(self, layers: list[Layer], os_name: str = "linux", arch: str = "amd64",
                  variant: str | None = None, config_extra: dict[str, Any] | None = None) -> Blob:
        platform = {"os": os_name, "architecture": arch, **({"variant": variant} if variant
                                                             else {})}
        config = {
            **platform,
            "created": "2026-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            **(config_extra or {}),
        }
        config_blob = self.add_bytes(json.dumps(config).encode(),
                                     "application/vnd.oci.image.config.v1+json")
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_blob.descriptor(),
            "layers": [layer.blob.descriptor() for layer in layers],
        }
        blob = self.add_bytes(json.dumps(manifest).encode(), manifest["mediaType"])
        return Blob(blob.media_type, blob.digest, blob.size)

    def add_index(self, manifests: list[tuple[Blob, dict[str, str]]]) -> Blob:
        index: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [blob.descriptor(platform=platform) for blob, platform in manifests],
        }
        return self.add_bytes(json.dumps(index).encode(), index["mediaType"])

    def tag(self, blob: Blob, name: str) -> None:
        self._index = [m for m in self._index
                       if m["annotations"]["org.opencontainers.image.ref.name"] != name]
        self._index.append(blob.descriptor(
            annotations={"org.opencontainers.image.ref.name": name}))
        (self.path / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "manifests": self._index}))


def push(layout: OCILayout, name: str, dest: str, docker_format: bool = False,
         tls_verify: bool = False, dest_creds: str | None = None,
         cert_dir: Path | None = None) -> None:
    """``skopeo copy oci:LAYOUT:NAME docker://DEST``; ``docker_format`` makes schema2 types."""
    cmd = ["skopeo", "copy", "--quiet", "--all", "--retry-times", "2",
           f"--dest-tls-verify={'true' if tls_verify else 'false'}"]
    if docker_format:
        cmd += ["--format", "v2s2"]
    else:
        cmd += ["--preserve-digests"]
    if dest_creds is not None:
        cmd += ["--dest-creds", dest_creds]
    if cert_dir is not None:
        cmd += ["--dest-cert-dir", str(cert_dir)]
    cmd += [f"oci:{layout.path}:{name}", f"docker://{dest}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "HOME": str(layout.path)})
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy failed ({proc.returncode}): {proc.stderr.strip()}")


def layer_from_directory(layout: OCILayout, source: Path, compression: str | None = "gzip"
                         ) -> Layer:
    """A layer holding a directory tree as it is on disk (modes kept, owner root)."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        base = Path(dirpath)
        rel = base.relative_to(source)
        if rel != Path("."):
            entries.append(directory(str(rel), base.stat().st_mode & 0o7777))
        for name in sorted(filenames):
            path = base / name
            mode = path.stat().st_mode & 0o7777
            if path.is_symlink():
                entries.append(symlink(str(rel / name), os.readlink(path)))
            else:
                entries.append(Entry(str(rel / name), path.read_bytes(), mode=mode))
    return layout.add_layer(entries, compression)


def main(argv: list[str] | None = None) -> None:
    """``python -m imaged.testing.images LAYOUT NAME DIR...``: one layer per directory."""
    import argparse  # noqa: PLC0415 - only the command-line entry needs it

    parser = argparse.ArgumentParser(prog="python -m imaged.testing.images",
                                     description="build an OCI image layout from directories")
    parser.add_argument("layout", type=Path)
    parser.add_argument("name")
    parser.add_argument("dirs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    layout = OCILayout(args.layout)
    manifest = layout.add_image([layer_from_directory(layout, d) for d in args.dirs])
    layout.tag(manifest, args.name)
    print(manifest.digest)


if __name__ == "__main__":
    main()
