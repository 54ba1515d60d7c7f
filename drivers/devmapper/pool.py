"""The thin pool as arithmetic and text, its tables and status lines, sizes, thin ids and device
names: pure, so that every rule is tested without a kernel (``driver`` does the I/O).

Refusal when full. A thin pool that runs out of data or metadata space fails every device on it
at once, so nothing new is created while the pool's data or metadata is above
``fill_threshold`` (0.9) or the pool reports itself read-only, out of space or needing a check;
``imaged info`` shows the pool's usage. The pool is made with ``error_if_no_space``, so a pool
that fills anyway fails writes at once instead of queueing them for a minute.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from imaged.drivers.devmapper.ioctl import MAX_NAME, Target
from imaged.errors import ConflictError, InternalError
from imaged.sizes import format_size

SECTOR = 512
POOL_BLOCK_SECTORS = 128  # 64 KiB data blocks, as Docker's driver: small snapshots stay small
METADATA_BLOCK = 4096  # thin-pool metadata blocks are always 4 KiB
MAX_THIN_ID = (1 << 24) - 1  # thin device ids are 24 bits


def pool_target(data_sectors: int, metadata_dev: str, data_dev: str,
                block_sectors: int = POOL_BLOCK_SECTORS) -> Target:
    """The thin-pool table: no low-water mark (nothing listens for its event) and
    ``error_if_no_space``: a full pool fails writes now rather than queueing them 60 s."""
    return Target(0, data_sectors, "thin-pool",
                  f"{metadata_dev} {data_dev} {block_sectors} 0 1 error_if_no_space")


def thin_target(sectors: int, pool_dev: str, thin_id: int) -> Target:
    return Target(0, sectors, "thin", f"{pool_dev} {thin_id}")


def dev_string(dev: int) -> str:
    """``major:minor`` as tables name devices."""
    return f"{os.major(dev)}:{os.minor(dev)}"


@dataclass(frozen=True)
class PoolStatus:
    """A thin-pool's status line (Documentation/admin-guide/device-mapper/thin-provisioning)."""

    transaction_id: int
    metadata_used: int  # 4 KiB blocks
    metadata_total: int
    data_used: int  # pool blocks
    data_total: int
    mode: str  # rw, ro, out_of_data_space; "fail" when the pool has failed
    needs_check: bool = False

    @property
    def data_fraction(self) -> float:
        return self.data_used / self.data_total if self.data_total else 1.0

    @property
    def metadata_fraction(self) -> float:
        return self.metadata_used / self.metadata_total if self.metadata_total else 1.0


def parse_pool_status(params: str) -> PoolStatus:
    """``<transaction> <used>/<total> metadata <used>/<total> data <held root> rw|ro|
    out_of_data_space [no_]discard_passdown error|queue_if_no_space needs_check|- [lowater]``;
    a failed pool says only ``Fail`` (or ``Error``)."""
    fields = params.split()
    if not fields or fields[0] in ("Fail", "Error"):
        return PoolStatus(0, 0, 0, 0, 0, "fail")
    if len(fields) < 4 or "/" not in fields[1] or "/" not in fields[2]:
        raise InternalError(f"unexpected thin-pool status: {params!r}")
    meta_used, meta_total = (int(n) for n in fields[1].split("/"))
    data_used, data_total = (int(n) for n in fields[2].split("/"))
    return PoolStatus(int(fields[0]), meta_used, meta_total, data_used, data_total, fields[4]
                      if len(fields) > 4 else "rw", needs_check="needs_check" in fields[5:])


def parse_pool_table(params: str) -> tuple[str, str, int]:
    """(metadata dev, data dev, block size in sectors) from a thin-pool table's parameters."""
    fields = params.split()
    if len(fields) < 4:
        raise InternalError(f"unexpected thin-pool table: {params!r}")
    return fields[0], fields[1], int(fields[2])


def pool_usage_text(status: PoolStatus, block_sectors: int) -> str:
    if status.mode == "fail":
        return "the thin pool has failed (see dmesg)"
    data_block = block_sectors * SECTOR
    text = (f"data {format_size(status.data_used * data_block)} of "
            f"{format_size(status.data_total * data_block)} ({status.data_fraction:.0%}), "
            f"metadata {format_size(status.metadata_used * METADATA_BLOCK)} of "
            f"{format_size(status.metadata_total * METADATA_BLOCK)} "
            f"({status.metadata_fraction:.0%})")
    if status.mode != "rw" or status.needs_check:
        text += f", {status.mode}{', needs_check' if status.needs_check else ''}"
    return text


def fill_refusal(pool: str, status: PoolStatus, block_sectors: int,
                 threshold: float) -> str | None:
    """Why nothing more may be created in the pool now, or None. Above the threshold a burst of
    writes could fill it, and a full pool fails every device on it, not just the new one."""
    fix = ("remove containers or images (imaged rm, imaged rmi, imaged gc) or grow the pool "
           "(drivers.devmapper.data_size, .metadata_size)")
    usage = pool_usage_text(status, block_sectors)
    if status.mode == "fail":
        return f"the thin pool {pool} has failed: nothing can be created (see dmesg)"
    if status.needs_check or status.mode in ("ro", "out_of_data_space"):
        return (f"the thin pool {pool} is {status.mode}"
                f"{' and needs thin_check' if status.needs_check else ''} ({usage}): {fix}, "
                "then repair it (thin_check, thin_repair) with every device deactivated")
    if status.data_fraction >= threshold or status.metadata_fraction >= threshold:
        return (f"the thin pool {pool} is above its fill threshold of {threshold:.0%} ({usage}); "
                f"a full pool fails every container on it, so nothing more is created: {fix}, "
                "or raise drivers.devmapper.fill_threshold")
    return None


def round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def device_sectors(size: int) -> int:
    """A device size in sectors, rounded up to whole pool blocks."""
    return round_up(size, POOL_BLOCK_SECTORS * SECTOR) // SECTOR


def allocate_id(next_id: int, used: set[int]) -> int:
    """The first thin id from ``next_id`` on (wrapping past 2**24 - 1) that no record holds.
    Ids only move forward, so an id deleted from the pool is not handed out again soon."""
    candidate = next_id if 0 <= next_id <= MAX_THIN_ID else 0
    for _ in range(MAX_THIN_ID + 1):
        if candidate not in used:
            return candidate
        candidate = candidate + 1 if candidate < MAX_THIN_ID else 0
    raise ConflictError("every thin device id of the pool is in use")


def root_tag(home: Path) -> str:
    return hashlib.sha256(os.path.realpath(home).encode()).hexdigest()[:12]


def device_name(tag: str, key: str) -> str:
    """The dm name of a record key (``base``, ``l/<chainid>``, ``c/<name>``, ``dead/<id>``)."""
    kind, _, rest = key.partition("/")
    name = f"imaged-{tag}-{kind}-{rest}" if rest else f"imaged-{tag}-{kind}"
    if len(name) > MAX_NAME:  # only long container names: ch- cannot be a name's prefix
        name = f"imaged-{tag}-{kind}h-{hashlib.sha256(rest.encode()).hexdigest()[:40]}"
    return name


def layer_key(key: str) -> str:
    return f"l/{key}"


def container_key(name: str) -> str:
    return f"c/{name}"


def parse_thin_ls(text: str) -> set[int]:
    """Thin ids from ``thin_ls --no-headers -o DEV``: one number per line."""
    return {int(line.split()[0]) for line in text.splitlines()
            if line.strip() and line.split()[0].isdigit()}
