"""The devmapper driver: layers and containers are thin devices in one device-mapper thin pool,
each a snapshot of its parent's device, so a layer or a container costs pool metadata only and
a quota is simply the size of the container's device (``total`` semantics, DESIGN §3).

The kernel's byte layout (``ioctl``), the pool's text and arithmetic (``pool``) and the records
(``records``) are modules of their own so that each is tested without root; ``driver`` is where
they meet the kernel, and what the driver registry takes from here.
"""

from imaged.drivers.devmapper.driver import DevmapperDriver, probe

__all__ = ["DevmapperDriver", "probe"]
