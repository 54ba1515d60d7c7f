"""The userspace copy-on-write filesystem behind the ``fuse`` driver (DESIGN §1: folder ``fuse/``,
package ``imaged.fuse``), on overlay's on-disk form so a container's upper can be mounted by
kernel overlay too. Below the drivers, which wrap it; never imports the store or anything above.
"""
