"""Manifest documents, platforms and image configs: everything a registry serves is checked."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from imaged.digest import Digest
from imaged.errors import ContentError, InvalidError, NotFoundError
from imaged.registry_client.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    document_type,
    parse_image_config,
    parse_manifest_document,
    read_cpu_variant,
    select_platform,
)

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"


def dig(n: int) -> str:
    return f"sha256:{n:064x}"


def desc(media_type: str = OCI_LAYER_GZIP, n: int = 1, size: Any = 10,
         **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": dig(n), "size": size, **extra}


def manifest_doc(media_type: str | None = OCI_MANIFEST, config_type: str = OCI_CONFIG,
                 layers: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": desc(config_type, 100, 50),
        "layers": [desc(OCI_LAYER_GZIP, 1), desc(OCI_LAYER_GZIP, 2)] if layers is None else layers,
    }
    if media_type is not None:
        doc["mediaType"] = media_type
    doc.update(extra)
    return doc


def plat(os: str, arch: str, variant: str | None = None) -> dict[str, str]:
    out = {"os": os, "architecture": arch}
    if variant is not None:
        out["variant"] = variant
    return out


def index_doc(media_type: str | None = OCI_INDEX,
              manifests: list[Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "manifests": [desc(OCI_MANIFEST, 7, 500, platform=plat("linux", "amd64"))]
        if manifests is None else manifests,
    }
    if media_type is not None:
        doc["mediaType"] = media_type
    return doc


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# -- document_type ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "content_type", "kind"),
    [
        (manifest_doc(OCI_MANIFEST), OCI_MANIFEST, OCI_MANIFEST),
        (manifest_doc(OCI_MANIFEST), None, OCI_MANIFEST),
        (manifest_doc(None), OCI_MANIFEST, OCI_MANIFEST),
        (manifest_doc(None), DOCKER_MANIFEST, DOCKER_MANIFEST),
        (manifest_doc(DOCKER_MANIFEST), DOCKER_MANIFEST, DOCKER_MANIFEST),
        (manifest_doc(DOCKER_MANIFEST), f"{DOCKER_MANIFEST}; charset=utf-8", DOCKER_MANIFEST),
        (manifest_doc(OCI_MANIFEST), "application/json", OCI_MANIFEST),
        (manifest_doc(OCI_MANIFEST), "text/plain; charset=utf-8", OCI_MANIFEST),
        (manifest_doc(OCI_MANIFEST), "application/octet-stream", OCI_MANIFEST),
        (manifest_doc(OCI_MANIFEST), "", OCI_MANIFEST),
        # No mediaType and no useful header: the shape decides (OCI allows it).
        (manifest_doc(None), None, OCI_MANIFEST),
        (manifest_doc(None), "application/json", OCI_MANIFEST),
        (index_doc(None), None, OCI_INDEX),
        (index_doc(OCI_INDEX), OCI_INDEX, OCI_INDEX),
        (index_doc(DOCKER_LIST), None, DOCKER_LIST),
        (index_doc(None), DOCKER_LIST, DOCKER_LIST),
    ],
)
def test_document_type_accepts(doc: dict[str, Any], content_type: str | None,
                               kind: str) -> None:
    found, parsed = document_type(raw(doc), content_type)
    assert found == kind
    assert parsed == doc


@pytest.mark.parametrize(
    ("data", "content_type", "error", "words"),
    [
        (b"not json", OCI_MANIFEST, ContentError, ["invalid manifest", "not JSON"]),
        (b"\xff\xfe\x00garbage", None, ContentError, ["not JSON"]),
        (b"", None, ContentError, ["not JSON"]),
        (b"[1, 2]", None, ContentError, ["not a JSON object"]),
        (b'"manifest"', None, ContentError, ["not a JSON object"]),
        (raw(manifest_doc(OCI_MANIFEST)), DOCKER_MANIFEST, ContentError,
         ["disagrees with Content-Type", OCI_MANIFEST, DOCKER_MANIFEST]),
        (raw(manifest_doc(OCI_MANIFEST)), OCI_INDEX, ContentError, ["disagrees"]),
        (raw(index_doc(OCI_INDEX)), OCI_MANIFEST, ContentError, ["disagrees"]),
        (raw(index_doc(DOCKER_LIST)), OCI_INDEX, ContentError, ["disagrees"]),
        (raw({"schemaVersion": 1, "name": "x", "fsLayers": []}), None, ContentError,
         ["schema 1", "unsupported", "push it again"]),
        (raw({"schemaVersion": 1}), SCHEMA1_SIGNED, ContentError, ["schema 1"]),
        (raw(manifest_doc(None)), SCHEMA1_SIGNED, ContentError, ["schema 1"]),
        (raw(manifest_doc(None)), f"{SCHEMA1}; charset=utf-8", ContentError, ["schema 1"]),
        (raw(manifest_doc(SCHEMA1)), None, ContentError, ["schema 1"]),
        (raw(manifest_doc(SCHEMA1_SIGNED)), OCI_MANIFEST, ContentError, ["schema 1"]),
        (raw({"schemaVersion": 2}), None, ContentError, ["unsupported manifest media type None"]),
        (raw(manifest_doc("application/vnd.example+json")), None, ContentError,
         ["unsupported manifest media type 'application/vnd.example+json'"]),
        (raw(manifest_doc(None)), "application/vnd.example+json", ContentError,
         ["unsupported manifest media type"]),
        (raw(manifest_doc(OCI_MANIFEST, schemaVersion=3)), None, ContentError,
         ["schemaVersion 3, expected 2"]),
        (raw({k: v for k, v in manifest_doc(OCI_MANIFEST).items() if k != "schemaVersion"}),
         None, ContentError, ["schemaVersion None"]),
        (raw(manifest_doc(OCI_MANIFEST, schemaVersion="2")), None, ContentError,
         ["schemaVersion '2'"]),
    ],
)
def test_document_type_refuses(data: bytes, content_type: str | None, error: type[Exception],
                               words: list[str]) -> None:
    with pytest.raises(error) as info:
        document_type(data, content_type)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_schema1_message_is_clear_not_a_generic_parse_error() -> None:
    with pytest.raises(ContentError) as info:
        document_type(raw({"schemaVersion": 1, "mediaType": SCHEMA1_SIGNED}), SCHEMA1_SIGNED)
    assert "deprecated" in info.value.message
    assert "invalid manifest" not in info.value.message


# -- parse_manifest_document ---------------------------------------------------------------------


def test_parse_oci_manifest() -> None:
    doc = manifest_doc(OCI_MANIFEST, layers=[
        desc(OCI_LAYER_GZIP, 1, 11, urls=["https://example.com/l1", 5]),
        desc("application/vnd.oci.image.layer.v1.tar+zstd", 2, 22),
        desc("application/vnd.oci.image.layer.v1.tar", 3, 0),
    ])
    parsed = parse_manifest_document(raw(doc), OCI_MANIFEST)
    assert parsed == Manifest(
        OCI_MANIFEST,
        Descriptor(OCI_CONFIG, Digest.parse(dig(100)), 50),
        (
            Descriptor(OCI_LAYER_GZIP, Digest.parse(dig(1)), 11, None,
                       ("https://example.com/l1",)),
            Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", Digest.parse(dig(2)), 22),
            Descriptor("application/vnd.oci.image.layer.v1.tar", Digest.parse(dig(3)), 0),
        ),
    )
    assert parsed.config.to_json() == {"mediaType": OCI_CONFIG, "digest": dig(100), "size": 50}


def test_parse_docker_manifest() -> None:
    doc = manifest_doc(DOCKER_MANIFEST, DOCKER_CONFIG, [desc(DOCKER_LAYER, 5, 99)])
    parsed = parse_manifest_document(raw(doc), DOCKER_MANIFEST)
    assert isinstance(parsed, Manifest)
    assert parsed.media_type == DOCKER_MANIFEST
    assert parsed.config.media_type == DOCKER_CONFIG
    assert [(d.media_type, str(d.digest), d.size) for d in parsed.layers] == [
        (DOCKER_LAYER, dig(5), 99)]


def test_parse_manifest_with_no_layers() -> None:
    parsed = parse_manifest_document(raw(manifest_doc(OCI_MANIFEST, layers=[])), None)
    assert isinstance(parsed, Manifest)
    assert parsed.layers == ()


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
def test_parse_index(media_type: str) -> None:
    doc = index_doc(media_type, [
        desc(OCI_MANIFEST, 1, 100, platform=plat("linux", "amd64")),
        desc(OCI_MANIFEST, 2, 200, platform=plat("Linux", "aarch64", "v8")),
        desc(OCI_MANIFEST, 3, 300, platform=plat("linux", "arm", "V7")),
        desc(OCI_MANIFEST, 4, 400),
        desc(OCI_MANIFEST, 5, 500, platform=plat("linux", "")),
        desc(OCI_MANIFEST, 6, 600, platform={"os": "linux"}),
        desc(OCI_MANIFEST, 7, 700, platform=plat("linux", "arm", None) | {"variant": 7}),
        desc(OCI_MANIFEST, 8, 800, platform="linux/amd64"),
    ])
    parsed = parse_manifest_document(raw(doc), media_type)
    assert isinstance(parsed, Index)
    assert parsed.media_type == media_type
    assert [d.platform for d in parsed.manifests] == [
        Platform("linux", "amd64"),
        Platform("linux", "arm64"),
        Platform("linux", "arm", "v7"),
        None,
        None,
        None,
        Platform("linux", "arm", "v7"),
        None,
    ]
    assert [d.size for d in parsed.manifests] == [100, 200, 300, 400, 500, 600, 700, 800]


@pytest.mark.parametrize(
    ("doc", "error", "words"),
    [
        (index_doc(OCI_INDEX, manifests=None) | {"manifests": "x"}, ContentError,
         ["index has no manifests list"]),
        ({"schemaVersion": 2, "mediaType": OCI_INDEX}, ContentError,
         ["index has no manifests list"]),
        (index_doc(OCI_INDEX, ["x"]), ContentError, ["manifests[0] is not an object"]),
        (index_doc(OCI_INDEX, [desc(OCI_MANIFEST, 1), {"digest": dig(2), "size": 1}]),
         ContentError, ["manifests[1] has no mediaType"]),
        (index_doc(OCI_INDEX, [desc(OCI_MANIFEST, 1) | {"digest": "sha256:abc"}]), ContentError,
         ["manifests[0]", "invalid digest"]),
        (manifest_doc(OCI_MANIFEST) | {"config": None}, ContentError,
         ["invalid manifest", "config is not an object"]),
        ({k: v for k, v in manifest_doc(OCI_MANIFEST).items() if k != "config"}, ContentError,
         ["config is not an object"]),
        (manifest_doc(OCI_MANIFEST) | {"layers": None}, ContentError,
         ["manifest has no layers list"]),
        (manifest_doc(OCI_MANIFEST) | {"layers": {"0": desc()}}, ContentError,
         ["manifest has no layers list"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc(), 5]), ContentError,
         ["layers[1] is not an object"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc(size=-1)]), ContentError,
         ["layers[0] has no valid size"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc(size=True)]), ContentError,
         ["layers[0] has no valid size"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc(size=1.5)]), ContentError,
         ["has no valid size"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc(size="10")]), ContentError,
         ["has no valid size"]),
        (manifest_doc(OCI_MANIFEST, layers=[{"mediaType": OCI_LAYER_GZIP, "digest": dig(1)}]),
         ContentError, ["has no valid size"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc() | {"mediaType": 5}]), ContentError,
         ["layers[0] has no mediaType"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc() | {"digest": "sha256:" + "A" * 64}]),
         ContentError, ["layers[0]", "invalid digest"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc() | {"digest": "md5:" + "0" * 32}]),
         ContentError, ["layers[0]", "unsupported digest algorithm"]),
        (manifest_doc(OCI_MANIFEST, layers=[{"mediaType": OCI_LAYER_GZIP, "size": 1}]),
         ContentError, ["layers[0]", "invalid digest"]),
        # A digest that is not even a string is still the registry's fault, not a crash.
        (manifest_doc(OCI_MANIFEST, layers=[desc() | {"digest": 12345}]), ContentError,
         ["layers[0]"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc() | {"digest": None}]), ContentError,
         ["layers[0]"]),
        (manifest_doc(OCI_MANIFEST, "application/vnd.cncf.helm.config.v1+json"), ContentError,
         ["not a container image", "application/vnd.cncf.helm.config.v1+json"]),
        (manifest_doc(OCI_MANIFEST, "application/vnd.oci.empty.v1+json"), ContentError,
         ["not a container image"]),
        (manifest_doc(OCI_MANIFEST, layers=[desc(), desc("application/x-tar", 2)]), ContentError,
         ["unsupported layer media type 'application/x-tar' (layers[1])"]),
        (manifest_doc(DOCKER_MANIFEST, DOCKER_CONFIG,
                      [desc("application/vnd.docker.image.rootfs.diff.tar.zstd")]),
         ContentError, ["unsupported layer media type"]),
    ],
)
def test_parse_manifest_document_refuses(doc: dict[str, Any], error: type[Exception],
                                         words: list[str]) -> None:
    with pytest.raises(error) as info:
        parse_manifest_document(raw(doc), None)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_not_an_image_is_not_reported_as_malformed() -> None:
    doc = manifest_doc(OCI_MANIFEST, "application/vnd.example.artifact.config+json")
    with pytest.raises(ContentError) as info:
        parse_manifest_document(raw(doc), OCI_MANIFEST)
    assert not info.value.message.startswith("invalid manifest")


# -- Platform -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/x86-64", Platform("linux", "amd64")),
        ("Linux/AMD64", Platform("linux", "amd64")),
        ("linux/amd64/v1", Platform("linux", "amd64")),
        ("linux/amd64/v3", Platform("linux", "amd64", "v3")),
        ("linux/arm64", Platform("linux", "arm64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64")),
        ("linux/arm64/8", Platform("linux", "arm64")),
        ("linux/arm64/v9", Platform("linux", "arm64", "v9")),
        ("linux/arm/v7", Platform("linux", "arm", "v7")),
        ("linux/arm/V6", Platform("linux", "arm", "v6")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("linux/armel", Platform("linux", "arm", "v6")),
        ("linux/armhf/v6", Platform("linux", "arm", "v6")),
        ("linux/i386", Platform("linux", "386")),
        ("linux/i686", Platform("linux", "386")),
        ("linux/s390x", Platform("linux", "s390x")),
        ("windows/amd64", Platform("windows", "amd64")),
    ],
)
def test_platform_parse(text: str, expected: Platform) -> None:
    assert Platform.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["", "linux", "linux/", "/amd64", "linux//v7", "linux/arm/v7/extra", "linux/arm/"])
def test_platform_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidError, match=r"expected os/arch\[/variant\]"):
        Platform.parse(text)


@pytest.mark.parametrize(
    ("platform", "shown"),
    [
        (Platform("linux", "amd64"), "linux/amd64"),
        (Platform("linux", "arm", "v7"), "linux/arm/v7"),
        (Platform.normalized("linux", "arm", ""), "linux/arm"),
    ],
)
def test_platform_str(platform: Platform, shown: str) -> None:
    assert str(platform) == shown


@pytest.mark.parametrize(
    ("want", "other", "rank"),
    [
        ("linux/amd64", "linux/amd64", 0),
        ("linux/amd64", "linux/amd64/v2", None),
        ("linux/amd64", "linux/arm64", None),
        ("linux/amd64", "windows/amd64", None),
        ("linux/amd64/v3", "linux/amd64/v3", 0),
        ("linux/amd64/v3", "linux/amd64/v2", 1),
        ("linux/amd64/v3", "linux/amd64", 3),
        ("linux/amd64/v3", "linux/amd64/v4", None),
        ("linux/amd64/v4", "linux/amd64/v3", 1),
        ("linux/amd64/v2", "linux/amd64/v3", None),
        ("linux/arm64", "linux/arm64", 0),
        ("linux/arm64", "linux/arm64/v8", 0),
        ("linux/arm64", "linux/aarch64", 0),
        ("linux/arm64", "linux/arm/v7", None),
        ("linux/arm/v7", "linux/arm/v7", 0),
        ("linux/arm/v7", "linux/arm/v6", 1),
        ("linux/arm/v7", "linux/arm/v5", 2),
        ("linux/arm/v7", "linux/arm", 0),  # plain arm is v7 (containerd)
        ("linux/arm/v7", "linux/arm/v8", None),
        ("linux/arm/v7", "linux/arm64", None),
        ("linux/arm/v8", "linux/arm/v7", 1),
        ("linux/arm/v6", "linux/arm/v7", None),
        ("linux/arm/v6", "linux/arm/v5", 1),
        ("linux/arm", "linux/arm", 0),
        ("linux/riscv64/rva22", "linux/riscv64/rva22", 0),
        ("linux/riscv64/rva22", "linux/riscv64", 1),
        ("linux/riscv64/rva22", "linux/riscv64/rva20", None),
        ("linux/s390x", "linux/s390x", 0),
    ],
)
def test_platform_accepts(want: str, other: str, rank: int | None) -> None:
    assert Platform.parse(want).accepts(Platform.parse(other)) == rank


# -- select_platform ----------------------------------------------------------------------------

ATTESTATION = desc(OCI_MANIFEST, 90, 900, platform=plat("unknown", "unknown"),
                   annotations={"vnd.docker.reference.type": "attestation-manifest"})


def build_index(entries: Sequence[tuple[int, dict[str, str] | None]],
                media_type: str = OCI_MANIFEST) -> Index:
    manifests = []
    for n, platform in entries:
        extra = {} if platform is None else {"platform": platform}
        manifests.append(desc(media_type, n, 100 + n, **extra))
    parsed = parse_manifest_document(raw(index_doc(OCI_INDEX, manifests)), OCI_INDEX)
    assert isinstance(parsed, Index)
    return parsed


MULTI = [
    (1, plat("linux", "amd64")),
    (2, plat("linux", "arm64", "v8")),
    (3, plat("linux", "arm", "v6")),
    (4, plat("linux", "arm", "v7")),
    (5, plat("linux", "amd64", "v3")),
    (6, plat("linux", "386")),
    (7, plat("windows", "amd64")),
]


@pytest.mark.parametrize(
    ("want", "chosen"),
    [
        ("linux/amd64", 1),
        ("linux/amd64/v2", 1),
        ("linux/amd64/v3", 5),
        ("linux/amd64/v4", 5),
        ("linux/arm64", 2),
        ("linux/arm/v7", 4),
        ("linux/arm/v8", 4),
        ("linux/arm/v6", 3),
        ("linux/386", 6),
        ("windows/amd64", 7),
    ],
)
def test_select_platform(want: str, chosen: int) -> None:
    index = build_index(MULTI)
    assert select_platform(index, Platform.parse(want)).digest == Digest.parse(dig(chosen))


def test_select_platform_ties_keep_index_order() -> None:
    index = build_index([(1, plat("linux", "arm64")), (2, plat("linux", "arm64")),
                         (3, plat("linux", "arm64"))])
    assert select_platform(index, Platform.parse("linux/arm64")).digest == Digest.parse(dig(1))


def test_select_platform_skips_attestations_and_non_manifests() -> None:
    nested = desc(OCI_INDEX, 20, 120, platform=plat("linux", "amd64"))
    attestation = ATTESTATION
    plain = desc(OCI_MANIFEST, 21, 121, platform=plat("linux", "amd64"))
    no_platform = desc(OCI_MANIFEST, 22, 122)
    parsed = parse_manifest_document(raw(index_doc(OCI_INDEX, [
        no_platform, nested, attestation, plain])), OCI_INDEX)
    assert isinstance(parsed, Index)
    chosen = select_platform(parsed, Platform.parse("linux/amd64"))
    assert chosen.digest == Digest.parse(dig(21))


def test_select_platform_docker_manifest_entries() -> None:
    index = build_index([(1, plat("linux", "amd64"))], media_type=DOCKER_MANIFEST)
    assert select_platform(index, Platform.parse("linux/amd64")).media_type == DOCKER_MANIFEST


@pytest.mark.parametrize(
    ("entries", "want", "words"),
    [
        ([(1, plat("linux", "amd64")), (2, plat("linux", "s390x")), (9, None)], "linux/arm64",
         ["no manifest for platform linux/arm64", "(image has: linux/amd64, linux/s390x)"]),
        ([(1, plat("linux", "arm", "v7")), (2, plat("linux", "arm", "v6"))], "linux/arm/v5",
         ["linux/arm/v5", "image has: linux/arm/v6, linux/arm/v7)"]),
        ([(1, plat("linux", "amd64", "v3"))], "linux/amd64",
         ["image has: linux/amd64/v3)"]),
        ([], "linux/amd64", ["image has: none"]),
        ([(1, None)], "linux/amd64", ["image has: none"]),
        ([(1, plat("unknown", "unknown"))], "linux/amd64", ["image has: none"]),
    ],
)
def test_select_platform_error_lists_platforms(entries: list[tuple[int, dict[str, str] | None]],
                                               want: str, words: list[str]) -> None:
    with pytest.raises(NotFoundError) as info:
        select_platform(build_index(entries), Platform.parse(want))
    for word in words:
        assert word in info.value.message, info.value.message
    assert "unknown" not in info.value.message


def test_select_platform_error_omits_attestation_entries() -> None:
    parsed = parse_manifest_document(raw(index_doc(OCI_INDEX, [
        desc(OCI_MANIFEST, 1, 10, platform=plat("linux", "amd64")), ATTESTATION])), OCI_INDEX)
    assert isinstance(parsed, Index)
    with pytest.raises(NotFoundError) as info:
        select_platform(parsed, Platform.parse("linux/riscv64"))
    assert info.value.message.endswith("(image has: linux/amd64)")


# -- parse_image_config -------------------------------------------------------------------------


def two_layer_manifest() -> Manifest:
    parsed = parse_manifest_document(raw(manifest_doc(OCI_MANIFEST)), OCI_MANIFEST)
    assert isinstance(parsed, Manifest)
    assert len(parsed.layers) == 2
    return parsed


def config_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [dig(11), dig(12)]},
        "config": {"Cmd": ["/bin/sh"]},
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


@pytest.mark.parametrize(
    ("doc", "platform"),
    [
        (config_doc(), Platform("linux", "amd64")),
        (config_doc(architecture="x86_64"), Platform("linux", "amd64")),
        (config_doc(architecture="arm", variant="v7"), Platform("linux", "arm", "v7")),
        (config_doc(architecture="arm64", variant="v8"), Platform("linux", "arm64")),
        (config_doc(architecture="arm", variant=7), Platform("linux", "arm", "v7")),
    ],
)
def test_parse_image_config(doc: dict[str, Any], platform: Platform) -> None:
    config = parse_image_config(raw(doc), two_layer_manifest())
    assert config.platform == platform
    assert config.diff_ids == (Digest.parse(dig(11)), Digest.parse(dig(12)))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"{", ["invalid image config", "not JSON"]),
        (b"\xff", ["not JSON"]),
        (b"[]", ["not a JSON object"]),
        (raw(config_doc(rootfs=None)), ["rootfs.type must be 'layers'"]),
        (raw(config_doc(rootfs=[dig(11)])), ["rootfs.type must be 'layers'"]),
        (raw(config_doc(rootfs={"type": "tar", "diff_ids": [dig(11), dig(12)]})),
         ["rootfs.type must be 'layers'"]),
        (raw(config_doc(rootfs={"type": "layers"})), ["rootfs.diff_ids missing"]),
        (raw(config_doc(rootfs={"type": "layers", "diff_ids": dig(11)})),
         ["rootfs.diff_ids missing"]),
        (raw(config_doc(rootfs={"type": "layers", "diff_ids": [dig(11)]})),
         ["manifest has 2 layers but config lists 1 diff_ids"]),
        (raw(config_doc(rootfs={"type": "layers", "diff_ids": [dig(1), dig(2), dig(3)]})),
         ["manifest has 2 layers but config lists 3 diff_ids"]),
        (raw(config_doc(rootfs={"type": "layers", "diff_ids": []})),
         ["manifest has 2 layers but config lists 0 diff_ids"]),
        (raw(config_doc(rootfs={"type": "layers", "diff_ids": [dig(11), "sha256:zz"]})),
         ["diff_ids", "invalid digest"]),
        (raw(config_doc(rootfs={"type": "layers", "diff_ids": [dig(11), 7]})),
         ["diff_ids", "invalid digest"]),
        (raw(config_doc(os=None)), ["os and architecture are required"]),
        (raw(config_doc(architecture=None)), ["os and architecture are required"]),
        (raw(config_doc(architecture=64)), ["os and architecture are required"]),
    ],
)
def test_parse_image_config_refuses(data: bytes, words: list[str]) -> None:
    with pytest.raises(ContentError) as info:
        parse_image_config(data, two_layer_manifest())
    for word in words:
        assert word in info.value.message, info.value.message


# -- read_cpu_variant ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "variant"),
    [
        ("processor\t: 0\nCPU architecture: 7\nCPU variant\t: 0x0\n", "v7"),
        ("CPU architecture\t: 8\n", "v8"),
        ("CPU architecture: 7M\n", "v7"),
        # Old arm64 kernels print the name; containerd reads it as v8, as must we.
        ("CPU architecture: AArch64\n", "v8"),
        ("processor : 0\nflags : fpu\n", None),
        ("", None),
    ],
)
def test_read_cpu_variant(tmp_path: Path, text: str, variant: str | None) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert read_cpu_variant(cpuinfo) == variant


def test_read_cpu_variant_missing_file(tmp_path: Path) -> None:
    assert read_cpu_variant(tmp_path / "absent") is None
