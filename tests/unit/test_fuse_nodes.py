"""The fuse driver's inode table (``imaged.fuse.nodes``) without a kernel.

The rules are FUSE's contract (a node id stays valid until FORGET brings its lookup count to
zero; (id, generation) never repeats) and the issue's: a hard link is one node, a node survives
copy-up, ``st_ino`` is stable across FORGET, as kernel overlay's is (overlayfs.rst "Inode
properties": st_ino stays constant across copy-up with ``index=on``/``xino``).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imaged.fuse.nodes import ROOT_ID, NodeTable, Origin

ROOT = Origin(1, 2)
A, B, C = Origin(1, 10), Origin(1, 11), Origin(1, 12)
UP = Origin(9, 500)  # an upper file on another filesystem (a loop quota filesystem)


def test_root_is_one_and_only_the_root() -> None:
    table = NodeTable(ROOT)
    assert table.root.id == ROOT_ID == 1
    assert table.lookup(ROOT) is table.root
    ids = {table.lookup(Origin(1, ino)).id for ino in range(100, 200)}
    assert ROOT_ID not in ids and len(ids) == 100


def test_root_is_never_forgotten() -> None:
    table = NodeTable(ROOT)
    table.forget(ROOT_ID, 10)
    assert table.get(ROOT_ID) is table.root


def test_a_hard_link_is_one_node() -> None:
    """Two names of one lower inode look up the same origin, so one node: FUSE then keeps one
    page cache for both (fuse-overlayfs #108 was the stale data of two)."""
    table = NodeTable(ROOT)
    first, second = table.lookup(A), table.lookup(A)
    assert first is second and first.lookups == 2


def test_lookup_counts_and_forget() -> None:
    """A node lives until its lookups are all forgotten, and not a FORGET longer."""
    table = NodeTable(ROOT)
    node = table.lookup(A)
    table.lookup(A)
    table.forget(node.id, 1)
    assert table.get(node.id) is node and table.find(A) is node
    table.forget(node.id, 1)
    assert node.id not in table and table.find(A) is None
    with pytest.raises(KeyError):
        table.get(node.id)


def test_ids_are_the_inode_numbers_across_forget_with_a_new_generation() -> None:
    """The id is st_ino (pyfuse3 sends one number for both), so it comes from the origin: a
    file forgotten and looked up again has the same number, and (id, generation) is new."""
    table = NodeTable(ROOT)
    a = table.lookup(A)
    assert a.id == table.inode_number(A) == 10
    table.forget(a.id, 1)
    again = table.lookup(A)
    assert again is not a and again.id == a.id and again.generation != a.generation


def test_a_held_id_is_never_given_to_another_file() -> None:
    """An unlinked file still open keeps its id; a new file the filesystem gave the same
    inode number gets a spare id, beyond every device index, until the old one is forgotten."""
    table = NodeTable(ROOT, devices=[1, 9])
    old = table.lookup(A)
    table.detach(old.id)
    new = table.lookup(A)
    assert new.id != old.id and new.id >= 0xFF << 56 and table.get(old.id) is old
    assert table.lookup(Origin(1, ROOT_ID)).id not in (ROOT_ID, new.id)  # never the root's id
    table.forget(old.id, 1)
    table.forget(new.id, 1)
    assert table.lookup(A).id == 10


def test_devices_are_indexed_in_stack_order() -> None:
    """The upper's and lowers' devices are registered at mount in stack order, so a file on
    the second filesystem has the same number at every mount, whichever is met first."""
    first, second = NodeTable(ROOT, devices=[1, 9]), NodeTable(ROOT, devices=[1, 9])
    first.lookup(A)
    assert second.lookup(UP).id == first.lookup(UP).id == 1 << 56 | 500


def test_a_node_keeps_every_name_it_was_seen_under() -> None:
    """A hard link's node stays reachable by its other names after one is removed; the most
    recent name is the one used."""
    table = NodeTable(ROOT)
    node = table.lookup(A)
    table.named(node, ROOT_ID, b"h1")
    table.named(node, ROOT_ID, b"h2")
    table.named(node, ROOT_ID, b"h1")
    assert table.where(node.id) == (ROOT_ID, b"h1")
    table.unnamed(node.id, ROOT_ID, b"h1")
    assert table.where(node.id) == (ROOT_ID, b"h2")
    table.detach(node.id)
    assert table.where(node.id) is None and table.where(12345) is None


def test_forget_tolerates_what_a_kernel_never_sends() -> None:
    """pyfuse3's forget handler must not raise: unknown ids and over-counts are dropped."""
    table = NodeTable(ROOT)
    node = table.lookup(A)
    table.forget(12345, 1)
    table.forget_many([(node.id, 5), (node.id, 1)])
    assert node.id not in table and len(table) == 1


def test_a_node_survives_copy_up() -> None:
    """overlayfs.rst "Non-directories": after copy-up the object is served from the upper; its
    node, and st_ino from its origin, stay the same whichever identity the next lookup reports."""
    table = NodeTable(ROOT)
    node = table.lookup(A)
    number = table.inode_number(A)
    table.copied_up(node.id, UP)
    assert node.upper == UP
    assert table.lookup(A) is node  # another name of the inode, still in the lower
    assert table.lookup(UP) is node  # the upper file, its origin record not read
    assert table.lookup(A, upper=UP) is node  # the upper file with its origin record
    assert table.inode_number(node.origin) == number


def test_a_copy_from_an_earlier_mount_keeps_its_origin() -> None:
    """After a remount the shell finds the upper file with its recorded origin: the lower's
    other names, looked up later, join the same node."""
    table = NodeTable(ROOT)
    node = table.lookup(A, upper=UP)
    assert node.origin == A and node.upper == UP
    assert table.lookup(A) is node and table.lookup(UP) is node


def test_detach_lets_a_reused_inode_number_be_a_new_file() -> None:
    """An unlinked file keeps its id until forgotten, but the filesystem may give its inode
    number to a new file, which must not inherit the old node."""
    table = NodeTable(ROOT)
    old = table.lookup(A)
    table.detach(old.id)
    new = table.lookup(A)
    assert new is not old and old.id in table
    table.detach(ROOT_ID)
    assert table.find(ROOT) is table.root


def test_a_reused_upper_number_moves_the_alias() -> None:
    table = NodeTable(ROOT)
    stale, live = table.lookup(A), table.lookup(B)
    table.copied_up(stale.id, UP)
    table.copied_up(live.id, UP)
    assert table.find(UP) is live
    table.copied_up(live.id, Origin(9, 501))
    assert table.find(UP) is None and table.find(Origin(9, 501)) is live


def test_inode_numbers() -> None:
    """Like overlay's xino: the first filesystem's inode numbers as they are, the others'
    tagged with a device index in the high bits, so they cannot collide."""
    table = NodeTable(ROOT)
    table.device_index(1)
    assert table.inode_number(A) == 10
    assert table.inode_number(UP) == 1 << 56 | 500
    assert table.inode_number(Origin(9, 10)) != table.inode_number(A)
    with pytest.raises(ValueError):
        table.inode_number(Origin(1, 1 << 56))


OPS = st.lists(st.tuples(st.sampled_from(["lookup", "forget"]), st.integers(0, 5),
                         st.integers(1, 3)), max_size=60)


@given(OPS)
def test_ids_against_a_model(ops: list[tuple[str, int, int]]) -> None:
    """Random lookups and forgets against a model of the kernel's references: a live id always
    means the same origin, ids of live nodes are distinct, (id, generation) never repeats, and
    node 1 is only the root."""
    table = NodeTable(ROOT)
    held: dict[Origin, int] = {}  # origin -> lookups the kernel holds
    ids: dict[Origin, int] = {}
    issued: set[tuple[int, int]] = set()
    for op, ino, count in ops:
        origin = Origin(1, 100 + ino)
        if op == "lookup":
            node = table.lookup(origin)
            if origin in ids:
                assert node.id == ids[origin]
            else:
                assert (node.id, node.generation) not in issued
                issued.add((node.id, node.generation))
            assert node.id == table.inode_number(origin) != ROOT_ID
            ids[origin] = node.id
            held[origin] = held.get(origin, 0) + 1
        elif origin in held:
            dropped = min(count, held[origin])
            table.forget(ids[origin], dropped)
            held[origin] -= dropped
            if not held[origin]:
                del held[origin], ids[origin]
        live = {origin: table.get(node_id) for origin, node_id in ids.items()}
        assert all(node.origin == origin and node.lookups == held[origin]
                   for origin, node in live.items())
        assert len({node.id for node in live.values()}) == len(live)
        assert len(table) == len(live) + 1
