"""What ``imaged check --verify-data`` costs per layer, beside what pulling it costs: one
synthetic gzip layer (many small files and a few large ones, as base images are) unpacked onto
a fresh loop ext4, then the blob pass (SHA-256 of the compressed blob, as ``check`` re-hashes
every blob) and the layer pass (``verify_layer``: decompress, parse, compare every entry and
every byte with the tree), each timed after dropping the page cache, so both read from disk.

Run as root: ``.venv/bin/python -m imaged.bench.verify [--runs N]``; prints one line per
phase with the median and range over the runs (docs/store.md quotes it).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from imaged.bench.scratch import scratch_fs
from imaged.digest import Digest
from imaged.fsutil import remove_tree, syncfs
from imaged.layers.unpack import UnpackLimits, WhiteoutMode, unpack_layer, verify_layer
from imaged.testing.images import Entry, directory, file, write_tar

_MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"
_LIMITS = UnpackLimits(1 << 40, 10_000_000)


def entries() -> list[Entry]:
    """About 5,000 small files (1-16 KiB) in 100 directories, and 4 files of 16 MiB: 104 MiB,
    half of it in small files; half of each file random, half text-like, so the blob
    compresses about as a base image does."""
    rng = random.Random(17)  # noqa: S311 - test data, the same every run

    def data(size: int) -> bytes:
        return rng.randbytes(size // 2) + b"line of text\n" * (size // 26)

    layer = []
    for d in range(100):
        layer.append(directory(f"d{d}"))
        layer += [file(f"d{d}/f{i}", data(1024 << (i % 5)), 0o644) for i in range(50)]
    layer += [file(f"big{i}", data(16 << 20)) for i in range(4)]
    return layer


def _drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _timed(run: Callable[[], object]) -> float:
    _drop_caches()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _hash(blob: Path) -> None:
    with blob.open("rb") as f:
        hashlib.file_digest(f, "sha256")


def _unpack(blob: Path, diff_id: Digest, tree: Path) -> None:
    """As a pull does: the layer unpacked, then the filesystem flushed once."""
    unpack_layer(blob, _MEDIA, diff_id, tree, WhiteoutMode.OVERLAY, _LIMITS)
    syncfs(tree)


def one_run(blob: Path, diff_id: Digest, where: Path) -> dict[str, float]:
    """Unpack, blob pass, layer pass, each from a cold cache; the tree goes after."""
    tree = where / "tree"
    tree.mkdir()
    try:
        found: dict[bytes, list[str]] = {}
        times = {
            "unpack": _timed(lambda: _unpack(blob, diff_id, tree)),
            "blob pass": _timed(lambda: _hash(blob)),
            "layer pass": _timed(lambda: found.update(verify_layer(
                blob, _MEDIA, diff_id, tree, WhiteoutMode.OVERLAY, _LIMITS))),
        }
        if found:
            raise RuntimeError(f"a fresh layer differs from its blob: {found}")
        return times
    finally:
        remove_tree(tree)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    layer = entries()
    raw = io.BytesIO()
    write_tar(raw, layer)
    tar = raw.getvalue()
    diff_id = Digest.parse(f"sha256:{hashlib.sha256(tar).hexdigest()}")
    with scratch_fs(2 << 30) as (where, description):
        blob = where / "blob"
        blob.write_bytes(gzip.compress(tar, 6))
        runs = [one_run(blob, diff_id, where) for _ in range(args.runs)]
        print(f"{len(tar) >> 20} MiB tar, {blob.stat().st_size >> 20} MiB gzip blob, "
              f"{len(layer)} entries, on {description}, {args.runs} runs:")
        for phase in runs[0]:
            seconds = [run[phase] for run in runs]
            print(f"  {phase}: median {statistics.median(seconds):.2f} s "
                  f"(min {min(seconds):.2f}, max {max(seconds):.2f})")


if __name__ == "__main__":
    main()
