"""The inode table: which FUSE node id stands for which file, for as long as the kernel holds it.

The kernel names every object it has looked up by a node id the server chose, and keeps using it
until FORGET brings its lookup count back to zero. The rules kept here:

- One node per *origin*: the (st_dev, st_ino) of the file where it was first seen, in a lower
  layer or in the upper. Two names of one inode (a hard link) are one node. A file copied up
  keeps its node: the origin moves with it, and its upper (st_dev, st_ino) becomes an alias
  (``copied_up``), so the next lookup finds the same node whether the shell reports the upper
  file's recorded origin or the upper inode itself.
- An id is not reused while the kernel may still send it: only after its lookups are all
  forgotten. A reused id gets a new generation, so (id, generation) never repeats within a
  mount, which is what the kernel and NFS export require of ``EntryAttributes.generation``.
- Node id 1 is the root (``pyfuse3.ROOT_INODE``) and nothing else; its lookups are not counted,
  since the kernel never forgets the root of a live mount.

``st_ino`` is not the node id: node ids are reused and die with the mount, while ``stat`` must
give a file the same number across FORGET, copy-up and remounts (fuse-overlayfs #391, #192).
``inode_number`` derives it from the origin instead, as overlay's ``xino`` does.

Pure bookkeeping, no I/O: the server calls ``lookup`` for every reply carrying
``EntryAttributes`` (lookup, create, mknod, mkdir, symlink, link, and each readdirplus entry the
kernel accepted) and ``forget`` from its ``forget`` handler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

ROOT_ID = 1  # pyfuse3.ROOT_INODE
_FIRST_ID = 2
_XINO_SHIFT = 56  # low 56 bits for the inode, high 8 for which filesystem it is on
_XINO_LIMIT = 1 << _XINO_SHIFT


class Origin(NamedTuple):
    """A file's identity on its backing filesystem."""

    dev: int
    ino: int


@dataclass(slots=True)
class Node:
    """One object the kernel knows by ``id``.

    ``upper`` is the upper inode once copied up (where data and attributes now come from, for
    every name of it: overlay with ``index=on`` serves a lower hard link's other names from the
    copy too). ``lookups`` is the kernel's reference count on the id.
    """

    id: int
    generation: int
    origin: Origin
    upper: Origin | None = None
    lookups: int = 0


class NodeTable:
    """Node ids by origin, with lookup counts and FORGET (module docstring)."""

    def __init__(self, root: Origin) -> None:
        self.root = Node(ROOT_ID, 0, root, lookups=1)
        self._by_id: dict[int, Node] = {ROOT_ID: self.root}
        self._by_origin: dict[Origin, Node] = {root: self.root}
        self._next_id = _FIRST_ID
        # Freed ids with the generation their next holder gets, oldest first: the longest time
        # between an id's uses makes a stale handle the least likely to meet its successor.
        self._free: deque[tuple[int, int]] = deque()
        self._devices: dict[int, int] = {}

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

    def _new(self, origin: Origin) -> Node:
        if self._free:
            node_id, generation = self._free.popleft()
        else:
            node_id, generation = self._next_id, 0
            self._next_id += 1
        node = Node(node_id, generation, origin)
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

    def detach(self, node_id: int) -> None:
        """The node's last name is gone (unlink, rmdir, rename over it): it stays valid for
        the kernel until forgotten, but its origin and alias are no longer looked up, since
        the filesystem may hand the same inode numbers to a new file."""
        node = self._by_id.get(node_id)
        if node is None or node is self.root:
            return
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
        self._free.append((node_id, node.generation + 1))

    def forget_many(self, forgets: Iterable[tuple[int, int]]) -> None:
        """pyfuse3's ``forget(inode_list)``: (id, count) pairs."""
        for node_id, count in forgets:
            self.forget(node_id, count)

    def inode_number(self, origin: Origin) -> int:
        """``st_ino`` for a file of this origin: its own inode number on the first filesystem
        seen (the common case of layers and upper on one filesystem), with a device index in
        the top 8 bits for the others, so two filesystems' inodes never collide.

        Stable as long as devices are met in the same order: the server registers its layers'
        and upper's devices (``device_index``) at mount, in stack order, before any lookup.
        """
        index = self.device_index(origin.dev)
        if origin.ino >= _XINO_LIMIT:
            raise ValueError(f"inode {origin.ino} does not fit {_XINO_SHIFT} bits")
        return index << _XINO_SHIFT | origin.ino

    def device_index(self, dev: int) -> int:
        index = self._devices.setdefault(dev, len(self._devices))
        if index >= 1 << (64 - _XINO_SHIFT):
            raise ValueError("more filesystems under one mount than st_ino can tell apart")
        return index
