"""imaged: container image storage with pluggable copy-on-write drivers and per-container quotas."""

__version__ = "0.1.0"
