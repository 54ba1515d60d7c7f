"""One root on disk: content store, metadata, lock, leases, reserve and garbage collection.

Above the drivers (a root owns one driver), below the operations and front ends.
"""
