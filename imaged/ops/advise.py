"""``imaged advise``: the large files of an image a container will likely write, what their
first write costs under this root's configuration and the alternatives, and what to do.

Files come from the layer blobs in the content store, listed with the unpacker's own parser
(``imaged.layers.unpack.list_layer``) and merged with their whiteouts
(``imaged.ops.writable.image_files``): every driver keeps its image's blobs, while only
stacked drivers keep one directory per layer. Costs come from a model
(``imaged.ops.copycost``): ``--report FILE``, else ``ROOT/bench/copyup.json`` that
``imaged bench copyup`` keeps, else a calibration of this root's copy throughput, timed here
with the copy routine the fuse server's whole-file copy-up uses.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaged import __version__
from imaged.config import Config
from imaged.drivers.devmapper.driver import Options as DevmapperOptions
from imaged.drivers.zfs import ZFS_FSTYPES
from imaged.errors import ForbiddenError, NotFoundError
from imaged.fsutil import copy_data, remove_tree
from imaged.fuse.changes import (
    DEFAULT_PARTIAL_THRESHOLD,
    CopyUp,
    CopyUpPolicy,
    CopyUpSetting,
    choose_copy_up,
)
from imaged.fuse.union import FileType
from imaged.host.mounts import backing_filesystem, kernel_filesystems
from imaged.layers.unpack import LayerEntry, UnpackLimits, list_layer
from imaged.ops import copycost
from imaged.ops.copycost import Model, ModelError, Prediction
from imaged.ops.writable import Candidate, candidates, image_files
from imaged.sizes import format_size
from imaged.store.root import Store

MODEL_PATH = Path("bench") / "copyup.json"  # under the root, kept by imaged bench copyup
NOTHING_TO_DO = 0.05  # seconds: a first write this cheap is not worth changing anything for
CHEAPER = 2.0  # an alternative is advised when it is at least this many times cheaper
CALIBRATION_BYTES = 64 << 20
CALIBRATION_RUNS = 3
# What an operator could change instead, beside this root's configuration (issue 15), each on
# this root's filesystem (None) or on the one it needs.
ALTERNATIVES = (("volume", None), ("overlay volatile", None), ("fuse partial", None),
                ("fuse reflink", "xfs"))
# Priced, never advised: vfs pays its copy when the container is created, not at the first
# write its rows time; a volume only where a rule names its place (the candidate's volume),
# since it takes the file out of the image.
NOT_ADVISED = ("vfs", "volume")


@dataclass(frozen=True)
class Place:
    """This root as the model sees it: the configuration its driver runs and its filesystem."""

    driver: str
    filesystem: str
    config: Config

    def configuration(self, size: int) -> str:
        """The model's name for what this root's driver does to a file of ``size`` bytes."""
        settings = self.config.drivers.get(self.driver, {})
        if self.driver == "overlay":
            for option in ("volatile", "metacopy"):
                if settings.get(option):
                    return f"overlay {option}"
            return "overlay"
        if self.driver == "fuse":
            policy = CopyUpPolicy(CopyUpSetting(settings.get("copy_up", "auto")),
                                  settings.get("partial_threshold", DEFAULT_PARTIAL_THRESHOLD))
            mode = choose_copy_up(policy, FileType.REGULAR, size, can_reflink=False)
            return "fuse partial" if mode is CopyUp.PARTIAL else "fuse full"
        return self.driver


def model_filesystem(fstype: str, driver: str, kernel: Collection[str],
                     devmapper_fs: str = "ext4") -> str:
    """The model's name for the filesystem this root's containers write to.

    The zfs driver writes to its datasets wherever the root itself is, and the bench names
    Debian's userspace ZFS ``zfs-fuse`` (its rows measure a FUSE daemon, not kernel ZFS), so a
    zfs root on a kernel without ZFS must look up the zfs-fuse rows, never OpenZFS's. The
    devmapper driver's containers write to their own thin devices, whatever the root is on,
    with the filesystem ``drivers.devmapper.fs`` names: the bench calls that ``thin-ext4`` or
    ``thin-xfs``, apart from a plain ext4 or xfs.
    """
    if driver == "devmapper":
        return f"thin-{devmapper_fs}"
    if driver == "zfs" or fstype in ZFS_FSTYPES:
        return "zfs" if "zfs" in kernel else "zfs-fuse"
    return fstype


def load_model(path: Path) -> Model:
    """A model or bench report from a file, any failure a one-line ``ModelError``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ModelError(f"cannot read the report {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path} is not a copy-up model or report (not text)") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not a copy-up model or report (not JSON: {exc})") from None
    return copycost.load(document, str(path))


def calibrate(root: Path, filesystem: str) -> Model:
    """Time whole-file copies of a 64 MiB file on the root's filesystem, as copy-up makes
    them (the fuse server's copy routine, then fsync, as overlay syncs a copied-up file),
    the source dropped from the page cache first so the copy reads it from the disk."""
    work = root / "bench" / f"calibrate.{os.getpid()}"
    remove_tree(work)
    work.mkdir(parents=True)
    try:
        source = work / "source"
        with source.open("wb") as fh:
            for _ in range(CALIBRATION_BYTES >> 20):
                fh.write(os.urandom(1 << 20))
            fh.flush()
            os.fsync(fh.fileno())
        rates = []
        for run in range(CALIBRATION_RUNS):
            src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(src, 0, 0, os.POSIX_FADV_DONTNEED)
                dst = os.open(work / f"copy{run}", os.O_CREAT | os.O_EXCL | os.O_WRONLY
                              | os.O_CLOEXEC, 0o600)
                try:
                    start = time.perf_counter()
                    copy_data(src, dst, CALIBRATION_BYTES)
                    os.fsync(dst)
                    rates.append(CALIBRATION_BYTES / (time.perf_counter() - start))
                finally:
                    os.close(dst)
            finally:
                os.close(src)
    finally:
        remove_tree(work)
    throughput = statistics.median(rates)
    environment = {"calibration": f"{CALIBRATION_RUNS} copies of a {format_size(CALIBRATION_BYTES)}"
                   f" file on {filesystem} at {root}, median {throughput / 1e6:.0f} MB/s"}
    return copycost.calibrated(throughput, filesystem, environment, __version__)


def choose_model(root: Path, filesystem: str, report: Path | None) -> tuple[Model, str]:
    """The model to predict from and where it came from (a path, or "calibration")."""
    if report is not None:
        return load_model(report), str(report)
    kept = root / MODEL_PATH
    if kept.exists():
        return load_model(kept), str(kept)
    return calibrate(root, filesystem), "calibration"


def layer_listings(store: Store, image_text: str) -> tuple[str, list[list[LayerEntry]]]:
    """The image's ID and each layer's listing, base first, read from its blob."""
    row = store.image(image_text)
    limits = UnpackLimits(store.config.limits.max_layer_bytes,
                          store.config.limits.max_layer_entries)
    listings = []
    for layer in row.layers:
        try:
            listings.append(list_layer(store.content.path(layer.blob_digest), layer.media_type,
                                       layer.diff_id, limits))
        except FileNotFoundError:  # lost, or removed since (rmi and gc in the daemon)
            raise NotFoundError(f"layer blob {layer.blob_digest} of image {row.id.short} is "
                                "not in the content store (imaged check --repair fetches it "
                                "again)") from None
    return str(row.id), listings


def costs(model: Model, place: Place, size: int) -> list[Prediction]:
    """Every configuration the model has numbers for, this root's first, each on this
    root's filesystem where the model has it, else on the filesystem it was measured on;
    and this root's own configuration on every filesystem the model measured it on (what
    moving the root elsewhere, to xfs with reflink say, would change)."""
    predictions = []
    current = place.configuration(size)
    for config, filesystem in model.configurations():
        if filesystem != place.filesystem and config != current and \
                (config, place.filesystem) in model.configurations():
            continue
        prediction = model.predict(config, filesystem, size)
        if prediction is not None:
            predictions.append(prediction)
    return sorted(predictions, key=lambda p: (p.config, p.filesystem) !=
                  (current, place.filesystem))


def recommend(candidate: Candidate, predictions: Sequence[Prediction], current: str) -> str:
    """One line: what to do about this file's first write."""
    now = next((p for p in predictions if p.config == current), None)  # this root's: first
    if now is not None and now.seconds < NOTHING_TO_DO:
        return f"nothing to do: copy-up of this file costs ~{_ms(now.seconds)}"
    if candidate.volume is not None:
        return f"mount a volume at {candidate.volume}"
    if now is None:
        return (f"no prediction for this root's configuration ({current}): run imaged bench "
                "copyup on this root")
    changes = [change for p in predictions if p.seconds * CHEAPER <= now.seconds
               and p.config not in NOT_ADVISED
               and (change := _change(p, now.filesystem)) is not None]
    if changes:
        return min(changes)[1]  # the least disruptive change that is cheap enough
    return f"nothing cheaper measured: copy-up of this file costs ~{_ms(now.seconds)} ({current})"


def _change(better: Prediction, filesystem: str) -> tuple[int, str] | None:
    """What an operator would change to get ``better``, ranked by how much it disturbs: a
    mount option of this root's overlay, then another driver, then another filesystem."""
    if better.filesystem == filesystem and better.config == "overlay volatile":
        return 0, "mount the overlay with volatile (drivers.overlay.volatile): no fsync at copy-up"
    if better.filesystem == filesystem and better.config == "overlay metacopy":
        return 1, "mount the overlay with metacopy (drivers.overlay.metacopy)"
    if better.config == "fuse partial":
        return 2, "use the fuse driver with partial copy-up"
    if better.filesystem == "xfs" or "reflink" in better.config:
        return 3, "put the root on xfs with reflink"
    if better.config == "btrfs":
        return 4, "use the btrfs driver: a container is a snapshot sharing the image's extents"
    if better.filesystem == "btrfs":
        return 5, f"put the root on btrfs ({better.config} clones extents there)"
    return None


def not_measured(model: Model, place: Place) -> list[dict[str, str]]:
    """The alternatives and this root's configuration that the model cannot price, with why."""
    rows = [{"config": a.config, "filesystem": a.filesystem, "why": a.why}
            for a in model.absent]
    have = set(model.configurations()) | {(a.config, a.filesystem) for a in model.absent}
    measured = ", ".join(sorted({f"{c} on {fs}" for c, fs in model.configurations()}))
    wanted = [(place.configuration(1 << 30), place.filesystem),
              (place.configuration(1), place.filesystem),
              *((config, filesystem or place.filesystem) for config, filesystem in ALTERNATIVES)]
    for config, filesystem in dict.fromkeys(wanted):
        if (config, filesystem) not in have:
            rows.append({"config": config, "filesystem": filesystem,
                         "why": f"not measured: this model has no {config} rows on {filesystem}"
                                f" (it has {measured})"})
    return rows


def advise(store: Store, image_text: str, report: Path | None, confined: bool) -> dict[str, Any]:
    """The advice document of DESIGN §5; blocking (run it in a thread)."""
    if report is not None and confined:
        raise ForbiddenError("only root may name a report file: the daemon would read it with "
                             "its own rights")
    image_id, listings = layer_listings(store, image_text)
    files = candidates(image_files(listings))
    driver = store.meta.get_setting("driver") or store.capabilities()[0]
    filesystem = model_filesystem(backing_filesystem(store.root).fstype, driver,
                                  kernel_filesystems(), DevmapperOptions.of(store.config).fs)
    place = Place(driver, filesystem, store.config)
    model, source = choose_model(store.root, filesystem, report)
    out = []
    for candidate in files:
        predicted = costs(model, place, candidate.size)
        out.append({"path": candidate.path, "size": candidate.size, "reason": candidate.reason,
                    "configuration": place.configuration(candidate.size),
                    "costs": [p.to_json() for p in predicted],
                    "advice": recommend(candidate, predicted,
                                        place.configuration(candidate.size))})
    return {"image": image_id, "driver": driver, "filesystem": filesystem,
            "model": {"source": model.source, "from": source,
                      "environment": dict(model.environment or {})},
            "not_measured": not_measured(model, place), "files": out}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.001 else f"{seconds * 1000:.2f} ms"
