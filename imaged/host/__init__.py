"""Kernel plumbing shared by drivers and store: mounts, loop devices, confined mount targets.

Imports only the base modules (``imaged.errors``, ``imaged.fsutil``, ...): never the store, the
operations or the front ends (``tests/unit/test_layering.py`` holds every package to its layer).
"""
