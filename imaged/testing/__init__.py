"""Real parts for tests and benches (as ``trio.testing``): OCI layouts to push, a local registry,
a zfs-fuse pool. Shipped in the wheel so the benches, which are part of the CLI, can use them.
"""
