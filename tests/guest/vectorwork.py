"""Vector-heavy work whose results are known: a register-state bug in the guest shows up as a
wrong digest, not as flakiness.

A fixed layer (a tar built from a seeded generator, with fixed metadata) is compressed with isal
(deflate) and zstd, then decompressed and hashed over and over by many threads and by forked
processes at once. isal, zstd, OpenSSL's SHA-2 and blake2 all use the widest vector registers the
CPU has (AVX-512 where present), and the guest kernel switches between the workers in the middle
of that work, saving and restoring their registers each time. ``EXPECTED`` holds the host's
results; ``test_vectorwork.py`` checks that the host still computes them.

``python -m tests.guest.vectorwork`` prints the distinct results as JSON, for a guest booted by
hand (``tests/guest/test_xstate.py`` does that under the shim).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import threading
from collections.abc import Callable

import zstandard
from isal import isal_zlib

FILES = 16
FILE_BYTES = 256 << 10
WORDS = [f"w{n:x}" for n in range(4096)]
EXPECTED = {
    "diff_id": "sha256:7762474e26777b3cff74592e556eb1fdd6e82e1e30b668fad5cfa5d6bc0517ee",
    "sha512": "b740832cf1aeb98290dc9a1bad7e207b5ed5b770521a6c37b05c764f6615569ac82c1133e86c03931e"
              "77a8eb0a23363e203b71c3f9a956e2dfb60891cf096c4c",
    "blake2b": "af0a746e47d9c38a8f9176d96f80ec2deed5357b860f838a9d8d75a7d75dae593182542e2598fcf90b"
               "572e1fdc83333b667a92c743d8ae8e330845d123d6a5bf",
}


def layer() -> bytes:
    """The layer's tar: compressible text from a seeded generator, metadata fixed."""
    rng = random.Random(20261204)  # noqa: S311 - reproducible data, not a secret
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n in range(FILES):
            text = " ".join(rng.choices(WORDS, k=FILE_BYTES // 4)).encode()[:FILE_BYTES]
            info = tarfile.TarInfo(f"usr/share/data/{n:03}.txt")
            info.size, info.mtime, info.mode = len(text), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(text))
    return out.getvalue()


def digests(tar: bytes) -> dict[str, str]:
    return {"diff_id": "sha256:" + hashlib.sha256(tar).hexdigest(),
            "sha512": hashlib.sha512(tar).hexdigest(),
            "blake2b": hashlib.blake2b(tar).hexdigest()}


def work(deflated: bytes, zst: bytes) -> list[dict[str, str]]:
    """Decompress both forms and hash each result: what one worker does per round."""
    return [digests(isal_zlib.decompress(deflated)),
            digests(zstandard.ZstdDecompressor().decompress(zst))]


def in_threads(count: int, job: Callable[[], list[dict[str, str]]]) -> list[dict[str, str]]:
    results: list[dict[str, str]] = []
    lock = threading.Lock()

    def worker() -> None:
        out = job()
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def in_forks(count: int, job: Callable[[], list[dict[str, str]]]) -> list[dict[str, str]]:
    """``job`` in ``count`` forked children at once (called with no other thread running)."""
    children = []
    for _ in range(count):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read)
            code = 1
            try:
                os.write(write, json.dumps(job()).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        children.append((pid, read))
    results: list[dict[str, str]] = []
    for pid, read in children:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"forked worker {pid} ended with status {status:#x}")
        results.extend(json.loads(data))
    return results


def run(rounds: int = 2, threads: int = 6, forks: int = 3) -> list[dict[str, str]]:
    """Every worker's results, alternating rounds of threads and of forks so that new tasks
    keep starting where dead ones were."""
    tar = layer()
    deflated = isal_zlib.compress(tar, 1)
    zst = zstandard.ZstdCompressor(level=3).compress(tar)
    results = [digests(tar)]
    for _ in range(rounds):
        results += in_threads(threads, lambda: work(deflated, zst))
        results += in_forks(forks, lambda: work(deflated, zst))
    return results


if __name__ == "__main__":
    print(json.dumps(sorted({json.dumps(r, sort_keys=True) for r in run()})))
