"""Manifests, indexes and image configs: parsing, validation and platform selection.

Pure: bytes and a Content-Type in, frozen dataclasses or an error out. Everything here came from
a registry, so every field is checked before anything downstream sees it.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaged.digest import Digest
from imaged.errors import ContentError, InvalidError, NotFoundError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# Sent on every manifest request; schema1 is left out so a registry that can convert does.
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)
# Layer media type → compression of its bytes (None: a plain tar).
LAYER_TYPES: dict[str, str | None] = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
    "i686": "386",
}
# Variants a CPU of the key's variant can also run, best first (containerd's platform matcher).
_COMPATIBLE_VARIANTS = {
    ("arm", "v8"): ("v8", "v7", "v6", "v5"),
    ("arm", "v7"): ("v7", "v6", "v5"),
    ("arm", "v6"): ("v6", "v5"),
    ("amd64", "v4"): ("v4", "v3", "v2", "v1"),
    ("amd64", "v3"): ("v3", "v2", "v1"),
    ("amd64", "v2"): ("v2", "v1"),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/arm64``, ``linux/arm/v7``; aliases (``x86_64``, ``aarch64``) normalized."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls.normalized(*parts)

    @classmethod
    def normalized(cls, os: str, arch: str, variant: str | None = None) -> Platform:
        os, arch = os.lower(), arch.lower()
        if arch in ("armhf",) and variant is None:
            variant = "v7"
        if arch in ("armel",) and variant is None:
            variant = "v6"
        arch = _ARCH_ALIASES.get(arch, arch)
        if variant is not None:
            variant = variant.lower()
        if arch == "arm64" and variant in ("v8", "8"):
            variant = None
        if arch == "amd64" and variant == "v1":
            variant = None
        if arch == "arm" and variant is None:
            variant = "v7"  # containerd's default: plain "arm" means ARMv7
        return cls(os, arch, variant or None)

    @classmethod
    def host(cls) -> Platform:
        arch = _platform.machine()
        variant = None
        if arch.startswith("arm") and arch != "arm64":
            variant, arch = read_cpu_variant(), "arm"
        return cls.normalized("linux", arch, variant)

    def accepts(self, other: Platform) -> int | None:
        """Rank ``other`` for this platform: 0 is the best match, None means it cannot run here."""
        if (other.os, other.architecture) != (self.os, self.architecture):
            return None
        if self.variant is None:
            return 0 if other.variant is None else (
                1 if self.architecture not in ("arm", "amd64") else None
            )
        compatible = _COMPATIBLE_VARIANTS.get((self.architecture, self.variant), (self.variant,))
        if other.variant is None:
            return len(compatible)
        return compatible.index(other.variant) if other.variant in compatible else None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    platform: Platform
    diff_ids: tuple[Digest, ...]


def _bad(what: str) -> ContentError:
    return ContentError(f"invalid manifest: {what}")


def _descriptor(raw: Any, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise _bad(f"{where} is not an object")
    media_type, size = raw.get("mediaType"), raw.get("size")
    if not isinstance(media_type, str):
        raise _bad(f"{where} has no mediaType")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _bad(f"{where} has no valid size")
    raw_digest = raw.get("digest", "")
    try:
        digest = Digest.parse(raw_digest if isinstance(raw_digest, str) else repr(raw_digest))
    except InvalidError as exc:
        raise _bad(f"{where}: {exc.message}") from None
    plat = None
    raw_platform = raw.get("platform")
    if isinstance(raw_platform, dict):
        os, arch = raw_platform.get("os"), raw_platform.get("architecture")
        variant = raw_platform.get("variant")
        if isinstance(os, str) and isinstance(arch, str) and os and arch:
            plat = Platform.normalized(os, arch, variant if isinstance(variant, str) else None)
    urls = raw.get("urls", [])
    return Descriptor(media_type, digest, size, plat, tuple(u for u in urls if isinstance(u, str))
                      if isinstance(urls, list) else ())


def document_type(data: bytes, content_type: str | None) -> tuple[str, dict[str, Any]]:
    """Decide what a manifest document is from its body and the Content-Type header.

    Both must agree when both speak: a registry that labels an index as a manifest (or the other
    way round) is serving something we cannot interpret safely.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _bad("not a JSON object")
    declared = doc.get("mediaType")
    header = (content_type or "").split(";")[0].strip() or None
    if header in ("application/json", "text/plain", "application/octet-stream"):
        header = None
    if doc.get("schemaVersion") == 1 or declared in SCHEMA1 or header in SCHEMA1:
        raise ContentError(
            "image uses Docker schema 1 manifests, which are deprecated and unsupported; "
            "push it again with a current client"
        )
    if declared is not None and header is not None and declared != header:
        raise _bad(f"mediaType {declared!r} disagrees with Content-Type {header!r}")
    kind = declared or header
    if kind is None:
        # OCI allows an absent mediaType; the shape is then the only evidence.
        kind = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "layers" in doc else None
    if kind not in (*INDEX_TYPES, *MANIFEST_TYPES):
        raise ContentError(f"unsupported manifest media type {kind!r}")
    if doc.get("schemaVersion") != 2:
        raise _bad(f"schemaVersion {doc.get('schemaVersion')!r}, expected 2")
    return kind, doc


def parse_manifest_document(data: bytes, content_type: str | None) -> Index | Manifest:
    kind, doc = document_type(data, content_type)
    if kind in INDEX_TYPES:
        raw_manifests = doc.get("manifests")
        if not isinstance(raw_manifests, list):
            raise _bad("index has no manifests list")
        return Index(kind, tuple(_descriptor(m, f"manifests[{i}]")
                                 for i, m in enumerate(raw_manifests)))
    config = _descriptor(doc.get("config"), "config")
    if config.media_type not in CONFIG_TYPES:
        raise ContentError(
            f"not a container image: config media type {config.media_type!r}"
        )
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise _bad("manifest has no layers list")
    layers = tuple(_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(raw_layers))
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise ContentError(f"unsupported layer media type {layer.media_type!r} (layers[{i}])")
    return Manifest(kind, config, layers)


def select_platform(index: Index, want: Platform) -> Descriptor:
    """Pick the manifest for ``want``; ties keep the index's order, as registries intend."""
    best: tuple[int, int, Descriptor] | None = None
    for position, desc in enumerate(index.manifests):
        if desc.platform is None or desc.media_type not in MANIFEST_TYPES:
            continue
        rank = want.accepts(desc.platform)
        if rank is not None and (best is None or (rank, position) < best[:2]):
            best = (rank, position, desc)
    if best is None:
        available = sorted({str(d.platform) for d in index.manifests if d.platform is not None
                            and d.platform.os != "unknown"})
        raise NotFoundError(
            f"no manifest for platform {want} (image has: {', '.join(available) or 'none'})"
        )
    return best[2]


def parse_image_config(data: bytes, manifest: Manifest) -> ImageConfig:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContentError(f"invalid image config: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ContentError("invalid image config: not a JSON object")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ContentError("invalid image config: rootfs.type must be 'layers'")
    raw_ids = rootfs.get("diff_ids")
    if not isinstance(raw_ids, list):
        raise ContentError("invalid image config: rootfs.diff_ids missing")
    try:
        diff_ids = tuple(Digest.parse(d if isinstance(d, str) else repr(d)) for d in raw_ids)
    except InvalidError as exc:
        raise ContentError(f"invalid image config: diff_ids: {exc.message}") from None
    if len(diff_ids) != len(manifest.layers):
        raise ContentError(
            f"invalid image: manifest has {len(manifest.layers)} layers but config lists "
            f"{len(diff_ids)} diff_ids"
        )
    os, arch = doc.get("os"), doc.get("architecture")
    if not isinstance(os, str) or not isinstance(arch, str):
        raise ContentError("invalid image config: os and architecture are required")
    variant = doc.get("variant")
    return ImageConfig(Platform.normalized(os, arch, variant if isinstance(variant, str) else None),
                       diff_ids)


def read_cpu_variant(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The ARM variant from /proc/cpuinfo (``CPU architecture: 7`` → ``v7``), None elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "CPU architecture":
            if value.strip().lower() == "aarch64":  # old arm64 kernels print this
                return "v8"
            digits = "".join(c for c in value if c.isdigit())
            return f"v{digits}" if digits else None
    return None
