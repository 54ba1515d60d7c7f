"""The inode table: which FUSE node id stands for which file, for as long as the kernel holds it.

The kernel names every object it has looked up by a node id the server chose, and keeps using it
until FORGET brings its lookup count back to zero. The rules kept here:

- One node per *origin*: the (st_dev, st_ino) of the file where it was first seen, in a lower
  layer or in the upper. Two names of one inode (a hard link) are one node. A file copied up
  keeps its node: the origin moves with it, and its upper (st_dev, st_ino) becomes an alias
  (``copied_up``), so the next lookup finds the same node whether the shell reports the upper
  file's recorded origin or the upper inode itself.
- The node id *is* ``st_ino``: pyfuse3 replies one number for both (``fuse_entry_param.ino``),
  so the id is derived from the origin as overlay's ``xino`` derives st_ino: the inode number
  on the first filesystem, with a device index in the high bits for the others. ``stat`` then
  gives a file the same number across FORGET, copy-up and remounts (fuse-overlayfs #391, #192
  are what reused ids do to ``find`` and ``tar``).
- Two live nodes never share an id: when the derived id is still held by the kernel (an
  unlinked file kept open, whose inode number the filesystem gave to a new file), the new node
  takes a *spare* id from a range no filesystem index reaches. Only that file's number is then
  unstable, and only until the old node is forgotten.
- Every node gets a fresh generation, so (id, generation) never repeats within a mount, which
  is what the kernel checks on a lookup that names a live id (``fuse_stale_inode``).
- Node id 1 is the root (``pyfuse3.ROOT_INODE``) and nothing else; its lookups are not counted,
  since the kernel never forgets the root of a live mount.
- A node keeps every (parent, name) it was seen under, most recent last: a hard link's node
  is still reachable through its other names after one is removed.

Pure bookkeeping, no I/O: the server calls ``lookup`` for every reply carrying
``EntryAttributes`` (lookup, create, mknod, mkdir, symlink, link, and each readdirplus entry the
kernel accepted) and ``forget`` from its ``forget`` handler.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

ROOT_ID = 1  # pyfuse3.ROOT_INODE
_XINO_SHIFT = 56  # low 56 bits for the inode, high 8 for which filesystem it is on
_XINO_LIMIT = 1 << _XINO_SHIFT
_SPARE_INDEX = 0xFF  # the device index no filesystem gets: ids for collisions
_GENERATIONS = 1 << 32  # the kernel keeps a generation in 32 bits (inode.i_generation)

Name = tuple[int, bytes]  # (parent node id, name)


class Origin(NamedTuple):
    """A file's identity on its backing filesystem."""

    dev: int
    ino: int


@dataclass(slots=True)
class Node:
    """One object the kernel knows by ``id``.

    ``upper`` is the upper inode once the object is known to be in the upper, made there or
    copied up (where data and attributes now come from, for every name of it: overlay with
    ``index=on`` serves a lower hard link's other names from the copy too). The server trusts
    an upper entry with this inode as the node's place without walking the layers.
    ``lookups`` is the kernel's reference count on the id. ``names`` are the places it was
    seen, as an ordered set, most recent last.
    """

    id: int
    generation: int
    origin: Origin
    upper: Origin | None = None
    lookups: int = 0
    names: dict[Name, None] = field(default_factory=dict)


class NodeTable:
    """Node ids by origin, with lookup counts and FORGET (module docstring)."""

    def __init__(self, root: Origin, devices: Sequence[int] = ()) -> None:
        """``devices``: the st_dev of the upper and the lowers in stack order, so that their
        device indexes, and with them every id, are the same at every mount of the stack."""
        self.root = Node(ROOT_ID, 0, root, lookups=1)
        self._by_id: dict[int, Node] = {ROOT_ID: self.root}
        self._by_origin: dict[Origin, Node] = {root: self.root}
        self._devices: dict[int, int] = {}
        for dev in devices:
            self.device_index(dev)
        self._generation = 0
        self._spare = _SPARE_INDEX << _XINO_SHIFT

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def get(self, node_id: int) -> Node:
        """The node behind an id the kernel sent; KeyError for one it cannot hold (a bug)."""
        return self._by_id[node_id]

    def find(self, origin: Origin) -> Node | None:
        """The node for an origin (or an upper alias), without counting a lookup."""
        return self._by_origin.get(origin)

    def lookup(self, origin: Origin, upper: Origin | None = None) -> Node:
        """The node to reply with for a file of this origin, its lookup count raised by one.

        ``upper`` is the file's upper inode when the shell found it in the upper with a
        recorded origin (a copy from an earlier mount): it becomes the node's alias.
        """
        node = self._by_origin.get(origin)
        if node is None and upper is not None:
            node = self._by_origin.get(upper)
        if node is None:
            node = self._new(origin)
        if upper is not None and node.upper is None:
            self.copied_up(node.id, upper)
        if node.id != ROOT_ID:
            node.lookups += 1
        return node

    def counted(self, node: Node) -> None:
        """One more lookup of a node already found (``find``), as ``lookup`` counts it."""
        if node.id != ROOT_ID:
            node.lookups += 1

    def _new(self, origin: Origin) -> Node:
        try:
            node_id = self.inode_number(origin)
        except ValueError:
            node_id = ROOT_ID
        if node_id == ROOT_ID or node_id in self._by_id:
            self._spare += 1
            node_id = self._spare
        self._generation = self._generation % (_GENERATIONS - 1) + 1
        node = Node(node_id, self._generation, origin)
        self._by_id[node_id] = node
        self._by_origin[origin] = node
        return node

    def copied_up(self, node_id: int, upper: Origin) -> None:
        """The node's file now lives in the upper as ``upper``: the same node from now on,
        whichever of the two identities the next lookup reports."""
        node = self._by_id[node_id]
        if node.upper is not None and node.upper != upper:
            self._by_origin.pop(node.upper, None)
        node.upper = upper
        # An inode number the upper reused after a deletion the server missed: the live file
        # wins, the stale node keeps its id until forgotten but is no longer found by it.
        self._by_origin[upper] = node

    def named(self, node: Node, parent: int, name: bytes) -> None:
        """The node was seen as ``name`` in directory node ``parent``."""
        node.names.pop((parent, name), None)
        node.names[parent, name] = None

    def unnamed(self, node_id: int, parent: int, name: bytes) -> None:
        """``name`` in ``parent`` no longer names the node (removed, renamed or replaced)."""
        node = self._by_id.get(node_id)
        if node is not None:
            node.names.pop((parent, name), None)

    def where(self, node_id: int) -> Name | None:
        """The place the node was last seen under that still names it; None once none does."""
        node = self._by_id.get(node_id)
        if node is None or not node.names:
            return None
        return next(reversed(node.names))

    def detach(self, node_id: int) -> None:
        """The node's last name is gone (unlink, rmdir, rename over it): it stays valid for
        the kernel until forgotten, but its origin and alias are no longer looked up, since
        the filesystem may hand the same inode numbers to a new file."""
        node = self._by_id.get(node_id)
        if node is None or node is self.root:
            return
        node.names.clear()
        for key in (node.origin, node.upper):
            if key is not None and self._by_origin.get(key) is node:
                del self._by_origin[key]

    def forget(self, node_id: int, count: int) -> None:
        """FORGET: the kernel dropped ``count`` lookups. At zero the id is free for reuse.

        Never raises: pyfuse3's forget handler must not fail, and the kernel cannot be told.
        An unknown id or an over-count (which a correct kernel never sends) drops what there is.
        """
        node = self._by_id.get(node_id)
        if node is None or node is self.root:
            return
        node.lookups -= count
        if node.lookups > 0:
            return
        del self._by_id[node_id]
        for key in (node.origin, node.upper):
            if key is not None and self._by_origin.get(key) is node:
                del self._by_origin[key]

    def forget_many(self, forgets: Iterable[tuple[int, int]]) -> None:
        """pyfuse3's ``forget(inode_list)``: (id, count) pairs."""
        for node_id, count in forgets:
            self.forget(node_id, count)

    def inode_number(self, origin: Origin) -> int:
        """``st_ino`` for a file of this origin: its own inode number on the first filesystem
        registered (the common case of layers and upper on one filesystem), with a device
        index in the top 8 bits for the others, so two filesystems' inodes never collide."""
        index = self.device_index(origin.dev)
        if origin.ino >= _XINO_LIMIT:
            raise ValueError(f"inode {origin.ino} does not fit {_XINO_SHIFT} bits")
        return index << _XINO_SHIFT | origin.ino

    def device_index(self, dev: int) -> int:
        index = self._devices.setdefault(dev, len(self._devices))
        if index >= _SPARE_INDEX:
            raise ValueError("more filesystems under one mount than st_ino can tell apart")
        return index
