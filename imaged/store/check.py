"""A store-wide consistency check (``imaged check``, DESIGN §4; borg's ``check``, s3ql's
``fsck``): the metadata against the content store, the driver, the mount table, the loop devices
and the quotas, one ``Finding`` per problem.

Opening a root already repairs what a crash leaves (``Store.recover``); the check is for what
recovery does not look at or cannot know: a blob file deleted, truncated or corrupted, a layer
or container directory removed by hand, a mount or loop device left under the root, a quota that
differs from its record, and whatever a running daemon's store drifts into between opens.

The work is split by what it may touch. ``Records.read`` copies the rows on the trio thread
(the one SQLite connection is shared there). ``inspect`` does every slow thing (stat, hashing,
mountinfo, the driver's listings and usages) in a worker thread from that copy, skipping what a
lease holds: a pull's blobs and layers exist before the transaction that records them.
``explained`` then drops findings that work in flight accounts for after all (a pull that
started or recorded while the inspection ran). ``repair`` fixes what needs nothing but the
store; refetching blobs and re-applying layers need the registry and the unpacker, so they are
the service's (``imaged.ops.service``). Repairs run in a worker thread, as garbage collection's
removals do and under the same lock, with the pulls held off the blob or layer being removed
(``Service._repair_store``), their rows changed through the trio thread; repair is
embedded-only (DESIGN §5), but a slow disk would otherwise stall its own progress and signals.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from pathlib import Path

from imaged.digest import Digest
from imaged.drivers import Driver, Finding
from imaged.errors import ImagedError, InvalidError
from imaged.host import loopdev
from imaged.host.mounts import MountEntry, mountinfo, unmount
from imaged.layers.compare import summary
from imaged.layers.unpack import UnpackLimits, verify_layer
from imaged.sizes import format_size
from imaged.store.content import ContentStore
from imaged.store.gc import release
from imaged.store.leases import Leases
from imaged.store.metadata import ContainerRow, ImageRow, Metadata, Target
from imaged.store.root import Store

BLOB_MISSING = "blob-missing"  # a recorded blob has no file
BLOB_SIZE = "blob-size"  # its file is not the recorded size
BLOB_DIGEST = "blob-digest"  # its bytes do not hash to its digest (with verify_data)
BLOB_UNREADABLE = "blob-unreadable"  # reading its bytes failed: bad sectors (with verify_data)
BLOB_UNRECORDED = "blob-unrecorded"  # a file in content/blobs no row records
LAYER_MISSING = "layer-missing"  # a ready or referenced layer the driver does not have
LAYER_INTERRUPTED = "layer-interrupted"  # a layer row left in state 'creating'
LAYER_UNRECORDED = "layer-unrecorded"  # a driver layer no row records
LAYER_DAMAGED = "layer-damaged"  # its tree differs from its blob (with verify_data)
CONTAINER_MISSING = "container-missing"  # a ready container the driver does not have
CONTAINER_INTERRUPTED = "container-interrupted"  # left in state 'creating' or 'removing'
CONTAINER_UNRECORDED = "container-unrecorded"  # a driver container no row records
MOUNT_STALE = "mount-stale"  # recorded as mounted, nothing mounted there
MOUNT_BROKEN = "mount-broken"  # mounted, but nothing serves it (a fuse server that died)
MOUNT_UNRECORDED = "mount-unrecorded"  # mounted under the root, nothing records it
LOOP_UNRECORDED = "loop-unrecorded"  # a loop device on a file under the root, used by nothing
QUOTA_MISMATCH = "quota-mismatch"  # a container's enforced quota differs from its record
REMOVAL_UNFINISHED = "removal-unfinished"  # what a removed container left, held by nothing now
CHECK_FAILED = "check-failed"  # a part of the check could not run

# Blobs that need the registry to be repaired (``imaged.ops.service``).
BLOB_DAMAGE = frozenset({BLOB_MISSING, BLOB_SIZE, BLOB_DIGEST, BLOB_UNREADABLE})

# Repairs go in this order: mounts before the containers they belong to, containers before the
# layers they sit on, blobs before the layers re-applied from them; any other kind (a driver's)
# last, when the store around it is whole again.
REPAIR_ORDER = (MOUNT_STALE, MOUNT_BROKEN, MOUNT_UNRECORDED, LOOP_UNRECORDED, CONTAINER_INTERRUPTED,
                CONTAINER_UNRECORDED, CONTAINER_MISSING, LAYER_INTERRUPTED, LAYER_UNRECORDED,
                BLOB_UNRECORDED, BLOB_MISSING, BLOB_SIZE, BLOB_DIGEST, BLOB_UNREADABLE,
                LAYER_MISSING, LAYER_DAMAGED, QUOTA_MISMATCH, REMOVAL_UNFINISHED)

# A loop quota's capacity lands within 2 MiB of the quota (imaged.quota.loopquota); the other
# mechanisms are exact.
QUOTA_SLACK = 2 << 20
_READ_CHUNK = 4 << 20


def container_key(name: str) -> str:
    """The lease key of a container being created or removed: its row says 'creating' or
    'removing' meanwhile, which the check must not take for an interrupted one."""
    return f"container {name}"


@dataclass(frozen=True)
class Records:
    """The rows the check compares, read at one moment on the metadata's thread."""

    driver: str | None
    blobs: dict[str, tuple[int, str]]  # digest → (size, media type)
    layers: dict[str, str]  # chain ID → state, children first
    images: tuple[ImageRow, ...]
    index_refs: tuple[tuple[str, str], ...]  # (name, index digest)
    containers: tuple[ContainerRow, ...]

    @classmethod
    def read(cls, meta: Metadata) -> Records:
        return cls(meta.get_setting("driver"), meta.blob_rows(), meta.layer_rows(),
                   tuple(meta.images()), tuple(meta.index_refs()), tuple(meta.containers()))

    def images_using_blob(self, digest: str) -> tuple[str, ...]:
        """The names of every image that needs the blob (as its manifest, config, a layer or
        the index a name resolved through)."""
        return tuple(sorted({name for row in self._blob_users(digest) for name in _names(row)}
                            | set(self._index_names(digest))))

    def refs_using_blob(self, digest: str) -> tuple[str, ...]:
        """The references a blob can be fetched again through (repositories that have it)."""
        return tuple(sorted({ref for row in self._blob_users(digest) for ref in row.refs}
                            | set(self._index_names(digest))))

    def manifests(self) -> set[str]:
        """The blobs that are manifests or indexes: registries serve them as manifests."""
        return {str(row.id) for row in self.images} | {index for _, index in self.index_refs}

    def _blob_users(self, digest: str) -> list[ImageRow]:
        return [row for row in self.images
                if digest in (str(row.id), str(row.config_digest))
                or any(str(layer.blob_digest) == digest for layer in row.layers)]

    def _index_names(self, digest: str) -> list[str]:
        return [name for name, index in self.index_refs if index == digest]

    def images_using_layer(self, chain: str) -> tuple[str, ...]:
        return tuple(sorted({name for row in self.images for name in _names(row)
                             if any(str(layer.chain_id) == chain for layer in row.layers)}))


def _names(row: ImageRow) -> tuple[str, ...]:
    """An image as a user knows it: its references, or its short ID when ``rmi --force`` left
    it none (a container still uses it)."""
    return row.refs or (f"image {row.id.short}",)


def _under(path: str, directory: Path) -> bool:
    return path == str(directory) or path.startswith(f"{directory}/")


# -- inspection (worker thread) -----------------------------------------------------------------


def inspect(records: Records, content: ContentStore, driver: Driver | None, root: Path,
            held: Callable[[str], bool], verify_data: bool,
            limits: UnpackLimits) -> list[Finding]:
    """Every finding, without changing anything. ``held`` is the service's lease table;
    ``limits`` (with ``verify_data``) are the unpacker's, for reading layer blobs again."""
    found = blob_findings(records, content, held, verify_data)
    found += loop_findings(Path(os.path.realpath(root)))
    if driver is None:  # nothing was ever pulled or created with a driver
        return found
    found += layer_findings(records, driver, held)
    found += container_findings(records, driver, held)
    found += removal_findings(driver)
    found += mount_findings(records, driver, Path(os.path.realpath(root)), held)
    # Reading an unmounted loop quota mounts it for the moment, which lets go of a device left
    # on its image: such a container's quota waits for that finding's repair.
    containers = Path(os.path.realpath(driver.home / "containers"))
    found += quota_findings(records, driver, skip={
        Path(backing).relative_to(containers).parts[0]
        for _, backing in _idle_loops(Path(os.path.realpath(root)))
        if backing.startswith(f"{containers}/")})
    ready = {chain.split(":", 1)[1] for chain, state in records.layers.items()
             if state == "ready" and not held(chain)}
    try:
        found += driver.check(ready)
    except (ImagedError, OSError) as exc:
        found.append(Finding(CHECK_FAILED, driver.name,
                             f"the {driver.name} driver's own check failed: {_why(exc)}"))
    if verify_data:
        found += tree_findings(records, content, driver, held, limits,
                               {f.subject for f in found})
    return found


def blob_findings(records: Records, content: ContentStore, held: Callable[[str], bool],
                  verify_data: bool) -> list[Finding]:
    files = {str(digest): size for digest, size in _blob_files(content)}
    found = []
    for digest, (size, _) in sorted(records.blobs.items()):
        if held(digest):
            continue
        actual = files.get(digest)
        problem = None
        if actual is None:
            problem = BLOB_MISSING, f"blob {digest} is missing from content/blobs"
        elif actual != size:
            problem = BLOB_SIZE, (f"blob {digest} is {actual} bytes in content/blobs; its "
                                  f"record says {size}")
        elif verify_data:
            path = content.path(Digest.parse(digest))
            try:
                hashed = _hash(path, Digest.parse(digest))
            except OSError as exc:  # the disk failed the read: the bytes are as good as gone
                problem = BLOB_UNREADABLE, f"blob {digest} cannot be read: reading {path}: " \
                    f"{_why(exc)}"
            else:
                if hashed is not None and hashed != digest:
                    problem = BLOB_DIGEST, f"blob {digest} is damaged: its bytes hash to {hashed}"
        if problem is not None:
            kind, message = problem
            found.append(Finding(kind, digest, message, records.images_using_blob(digest)))
    found += [Finding(BLOB_UNRECORDED, digest, f"blob file {digest} in content/blobs has no "
                      "record (it belongs in ingest, to be verified again)")
              for digest in sorted(files.keys() - records.blobs.keys()) if not held(digest)]
    return found


def _blob_files(content: ContentStore) -> Iterable[tuple[Digest, int]]:
    """The blob files, each stat'ed once; one removed while we list is simply not there."""
    for alg_dir in content.blobs.iterdir():
        for entry in os.scandir(alg_dir):
            try:
                digest = Digest.parse(f"{alg_dir.name}:{entry.name}")
                yield digest, entry.stat().st_size
            except (InvalidError, FileNotFoundError):
                continue


def _hash(path: Path, digest: Digest) -> str | None:
    """What the file's bytes hash to (in the digest's algorithm); None if it went meanwhile."""
    hasher = digest.hasher()
    try:
        with path.open("rb", buffering=0) as f:
            while chunk := f.read(_READ_CHUNK):
                hasher.update(chunk)
    except FileNotFoundError:
        return None
    return f"{digest.algorithm}:{hasher.hexdigest()}"


def layer_findings(records: Records, driver: Driver, held: Callable[[str], bool]
                   ) -> list[Finding]:
    on_disk = driver.list_layers()
    found = []
    for chain, state in records.layers.items():
        if held(chain):
            continue
        if state == "creating":
            found.append(Finding(LAYER_INTERRUPTED, chain,
                                 f"layer {chain} was left half-applied (state creating)"))
        elif chain.split(":", 1)[1] not in on_disk:
            found.append(Finding(LAYER_MISSING, chain,
                                 f"layer {chain} is recorded, but the {driver.name} driver "
                                 "has no such layer", records.images_using_layer(chain)))
    wanted = {str(layer.chain_id) for row in records.images for layer in row.layers}
    found += [Finding(LAYER_MISSING, chain, f"layer {chain} of a recorded image has no record",
                      records.images_using_layer(chain))
              for chain in sorted(wanted - records.layers.keys()) if not held(chain)]
    recorded = {chain.split(":", 1)[1] for chain in records.layers}
    found += [Finding(LAYER_UNRECORDED, f"sha256:{key}",
                      f"layer sha256:{key} of the {driver.name} driver has no record")
              for key in sorted(on_disk - recorded) if not held(f"sha256:{key}")]
    return found


def tree_findings(records: Records, content: ContentStore, driver: Driver,
                  held: Callable[[str], bool], limits: UnpackLimits,
                  found: Set[str]) -> list[Finding]:
    """Each ready layer of a recorded image whose tree differs from its blob, read again as
    the unpacker read it (``verify_layer``). A layer or blob with a finding already (``found``:
    missing, damaged, half-applied) is skipped: its own finding says more, and a blob that
    does not verify cannot say what the layer should hold."""
    whiteouts = driver.capabilities().whiteouts
    on_disk = driver.list_layers()
    layers = {str(layer.chain_id): layer for row in records.images for layer in row.layers}
    result = []
    for chain, layer in sorted(layers.items(), key=lambda item: item[1].position):
        if records.layers.get(chain) != "ready" or held(chain) or chain in found or \
                str(layer.blob_digest) in found or layer.chain_id.hex not in on_disk:
            continue
        try:
            with driver.layer_tree(layer.chain_id.hex) as tree:
                differences = verify_layer(content.path(layer.blob_digest), layer.media_type,
                                           layer.diff_id, tree, whiteouts, limits)
        except (ImagedError, OSError) as exc:
            result.append(Finding(LAYER_DAMAGED, chain, f"layer {chain} cannot be compared "
                                  f"with its blob {layer.blob_digest}: {_why(exc)}",
                                  records.images_using_layer(chain)))
            continue
        if differences:
            result.append(Finding(LAYER_DAMAGED, chain,
                                  f"layer {chain} differs from its blob {layer.blob_digest}: "
                                  f"{summary(differences)}",
                                  records.images_using_layer(chain)))
    return result


def container_findings(records: Records, driver: Driver, held: Callable[[str], bool]
                       ) -> list[Finding]:
    on_disk = driver.list_containers()
    found = []
    for row in records.containers:
        if held(container_key(row.name)):
            continue
        if row.state != "ready":
            found.append(Finding(CONTAINER_INTERRUPTED, row.name,
                                 f"container {row.name} was left half-way (state {row.state})"))
        elif row.name not in on_disk:
            found.append(Finding(CONTAINER_MISSING, row.name,
                                 f"container {row.name} is recorded, but the {driver.name} "
                                 "driver has no such container: its data is gone"))
    names = {row.name for row in records.containers}
    found += [Finding(CONTAINER_UNRECORDED, name,
                      f"container {name} of the {driver.name} driver has no record")
              for name in sorted(on_disk - names) if not held(container_key(name))]
    return found


def removal_findings(driver: Driver) -> list[Finding]:
    """What ``rm`` left for later (a mount that a forced umount detached held part of the
    container) and nothing holds any more: garbage collection would finish it. One still
    held is no finding: it goes when the files open on it close."""
    return [Finding(REMOVAL_UNFINISHED, key,
                    f"removed container {key} left {driver.home / 'removed' / key} behind, "
                    "which nothing holds any more (imaged gc removes it)")
            for key, why in driver.removals().items() if why is None]


def _own_mount_point(driver: Driver, name: str) -> Path:
    """A container's default mount point, as the mount table shows it (symlinks resolved)."""
    return Path(os.path.realpath(driver.home)) / "containers" / name / "merged"


def mount_findings(records: Records, driver: Driver, root: Path,
                   held: Callable[[str], bool]) -> list[Finding]:
    """Recorded mounts that are gone or dead, and mounts under the root nothing records.

    A container's own directory may hold mounts of the driver's (a loop quota's filesystem, a
    ZFS dataset): those are the driver's business, except the container's default mount point,
    which is mounted exactly when the record says so."""
    table = mountinfo()
    points = {entry.mount_point for entry in table}
    found = []
    expected: list[Path] = []
    for row in records.containers:
        if row.mount_path is None or held(container_key(row.name)):
            continue
        path = Path(os.path.realpath(row.mount_path))
        if str(path) not in points and row.state == "ready":
            found.append(Finding(MOUNT_STALE, row.name,
                                 f"container {row.name} is recorded as mounted at "
                                 f"{row.mount_path}, but nothing is mounted there"))
        elif row.state == "ready" and (why := driver.broken(row.name)) is not None:
            found.append(Finding(MOUNT_BROKEN, row.name,
                                 f"container {row.name} is mounted at {row.mount_path}, but "
                                 f"{why}: its files answer ENOTCONN; a repair mounts it again "
                                 "there"))
        expected.append(path)
        if row.target is Target.ATTACHED:  # a clone of the driver's own mount
            expected.append(_own_mount_point(driver, row.name))
    homes = {row.name: _own_mount_point(driver, row.name).parent for row in records.containers}
    seen = set()
    for entry in table:
        point = entry.mount_point
        if not point.startswith(f"{root}/") or point in seen or \
                any(_under(point, path) for path in expected):
            continue
        seen.add(point)
        owner = next((name for name, home in homes.items() if _under(point, home)), None)
        if owner is not None and point != str(_own_mount_point(driver, owner)):
            continue  # the driver's own mounts inside a recorded container
        if owner is None and _driver_part(point, driver, held):
            continue
        found.append(Finding(MOUNT_UNRECORDED, point, _unrecorded_mount(entry, owner)))
    return found


def _driver_part(point: str, driver: Driver, held: Callable[[str], bool]) -> bool:
    """Whether a mount lies in an unrecorded container (that finding covers it: removing the
    container unmounts it) or in a layer a pull is applying."""
    home = Path(os.path.realpath(driver.home))
    relative = Path(point).relative_to(home).parts if _under(point, home) else ()
    if len(relative) >= 2 and relative[0] == "containers":
        return relative[1] in driver.list_containers() or relative[1] in driver.removals()
    return len(relative) >= 2 and relative[0] == "layers" and held(f"sha256:{relative[1]}")


def _unrecorded_mount(entry: MountEntry, owner: str | None) -> str:
    what = f"{entry.fstype} from {entry.source}"
    if owner is not None:
        return (f"container {owner} is recorded as not mounted, but {what} is mounted at "
                f"{entry.mount_point}")
    return f"{what} is mounted at {entry.mount_point}, under the root, and nothing records it"


def loop_findings(root: Path) -> list[Finding]:
    """Loop devices on files under the root that nothing mounts or holds (a device-mapper
    pool holds its files' devices, a mount that a forced umount detached its filesystem's).
    Every device imaged binds clears itself when its mount goes, so one left bound was bound
    by hand, or by a crash mid-way."""
    return [Finding(LOOP_UNRECORDED, str(device.path),
                    f"loop device {device.path} holds {backing}, but nothing mounts or uses it")
            for device, backing in _idle_loops(root)]


def _idle_loops(root: Path) -> list[tuple[loopdev.LoopDevice, str]]:
    mounted = {(entry.major, entry.minor) for entry in mountinfo()}
    idle = []
    for device, backing in loopdev.bound_devices():
        if not backing.removesuffix(" (deleted)").startswith(f"{root}/"):
            continue
        try:
            dev = device.dev_t()
            holders = os.listdir(device.sysfs / "holders")
        except FileNotFoundError:  # unbound meanwhile
            continue
        if (os.major(dev), os.minor(dev)) not in mounted and not holders and \
                not loopdev.claimed(device):
            idle.append((device, backing))
    return idle


def quota_findings(records: Records, driver: Driver, skip: Set[str] = frozenset()
                   ) -> list[Finding]:
    """Each quota as the driver enforces it against its record (within ``QUOTA_SLACK``)."""
    on_disk = driver.list_containers() - skip
    rows = {row.name: row.quota for row in records.containers
            if row.state == "ready" and row.quota is not None and row.name in on_disk}
    found = []
    for name, quota in sorted(rows.items()):
        try:
            enforced = driver.usage(name).quota
        except (ImagedError, OSError) as exc:
            found.append(Finding(QUOTA_MISMATCH, name, f"the quota of container {name} cannot "
                                 f"be read: {_why(exc)}"))
            continue
        if enforced is None:
            found.append(Finding(QUOTA_MISMATCH, name,
                                 f"container {name} has a quota of {format_size(quota)} "
                                 "recorded, but nothing enforces one"))
        elif abs(enforced - quota) > QUOTA_SLACK:
            found.append(Finding(QUOTA_MISMATCH, name,
                                 f"container {name} has a quota of {format_size(enforced)} "
                                 f"on disk; its record says {format_size(quota)}"))
    return found


def _why(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc)


# -- after inspection (metadata's thread) -------------------------------------------------------


def explained(meta: Metadata, leases: Leases, finding: Finding) -> bool:
    """Whether work in flight accounts for a finding after all: its subject is leased now,
    or its record appeared while the inspection ran (a pull or create that finished)."""
    if leases.held(finding.subject) or leases.held(container_key(finding.subject)):
        return True
    if finding.kind == BLOB_UNRECORDED:
        return meta.has_blob(Digest.parse(finding.subject))
    if finding.kind == LAYER_UNRECORDED:
        return meta.layer_state(Digest.parse(finding.subject)) is not None
    if finding.kind == CONTAINER_UNRECORDED:
        return meta.container(finding.subject) is not None
    return False


# -- repairs that need only the store -----------------------------------------------------------


def repair(store: Store, leases: Leases, finding: Finding, driver: Driver,
           meta: Metadata) -> None:
    """Repair one finding of any kind but ``BLOB_DAMAGE``, ``LAYER_MISSING`` and
    ``LAYER_DAMAGED`` (the service's), raising an ImagedError or OSError when it cannot be
    done. ``driver`` is the root's; ``meta`` its metadata as the calling thread may use it
    (``from_thread`` in a worker, as the service runs this)."""
    kind, subject = finding.kind, finding.subject
    if kind == BLOB_UNRECORDED:
        store.content.uncommit(Digest.parse(subject))
    elif kind in (LAYER_INTERRUPTED, LAYER_UNRECORDED):
        meta.delete_layer(subject)  # row first, as recovery does
        driver.remove_layer(subject.split(":", 1)[1])
    elif kind in (CONTAINER_INTERRUPTED, CONTAINER_UNRECORDED, CONTAINER_MISSING):
        _remove_container(store, leases, driver, meta, subject)
    elif kind == MOUNT_STALE:
        row = meta.container(subject)
        if row is not None and row.target is Target.ATTACHED:  # the driver's own may be left
            driver.unmount(subject, None)
        meta.update_container(subject, mount_path=None, target=Target.OWN)
    elif kind == MOUNT_UNRECORDED:
        _unmount_unrecorded(driver, meta, Path(subject))
    elif kind == LOOP_UNRECORDED:
        _detach(Path(subject))
    elif kind == REMOVAL_UNFINISHED:
        driver.finish_removal(subject)
    elif kind == QUOTA_MISMATCH:
        row = meta.container(subject)
        if row is None or row.quota is None:
            raise InvalidError(f"container {subject} has no quota recorded any more")
        driver.resize_quota(subject, row.quota, row.mount_path is not None)
    else:
        driver.repair(finding)


def _remove_container(store: Store, leases: Leases, driver: Driver, meta: Metadata,
                      name: str) -> None:
    """What is left of a container goes with its record; its data, where any is left, was
    not recorded as a container (or was being removed), so nothing can use it."""
    row = meta.container(name)
    if row is not None and row.mount_path is not None and row.target is not Target.OWN:
        with contextlib.suppress(ImagedError):  # a given target: unmount it, if still there
            unmount(Path(row.mount_path))
    driver.remove_container(name)
    if row is not None:
        blobs = meta.delete_container(name)
        layers = meta.unused_layers()  # after: the container held its image's layers
        release(store, leases, blobs, layers, driver, meta)


def _unmount_unrecorded(driver: Driver, meta: Metadata, point: Path) -> None:
    """A container's default mount point through its driver (which also lets go of what it
    mounted beneath, a loop quota's filesystem); anything else directly."""
    name = point.parent.name
    if point == _own_mount_point(driver, name) and meta.container(name) is not None:
        driver.unmount(name, None)
    else:
        unmount(point)


def _detach(path: Path) -> None:
    device = loopdev.LoopDevice(int(path.name.removeprefix("loop")))
    backing = device.backing_file()
    loopdev.detach(device)
    if backing is not None and not loopdev.wait_unbound(device, Path(backing)):
        raise InvalidError(f"{path} is still bound: something opened it meanwhile")
