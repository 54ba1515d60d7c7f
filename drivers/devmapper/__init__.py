"""The devmapper driver: layers and containers are thin devices in one device-mapper thin pool,
each a snapshot of its parent's device, so a layer or a container costs pool metadata only and
a quota is simply the size of the container's device (``total`` semantics, DESIGN §3).

The kernel's byte layout (``ioctl``), the pool's text and arithmetic (``pool``) and the records
(``records``) are modules of their own so that each is tested without root; ``driver`` is where
they meet the kernel. The names below are what the driver registry, the benches and the tests
use.
"""

from imaged.drivers.devmapper.driver import (
    DevmapperDriver,
    Options,
    config_problem,
    deactivate_all,
    mkfs_command,
    mount_options,
    probe,
)
from imaged.drivers.devmapper.ioctl import (
    DM_ACTIVE_PRESENT_FLAG,
    DM_DEV_CREATE_CMD,
    DM_IOCTL,
    DM_SUSPEND_FLAG,
    DM_TABLE_LOAD_CMD,
    DM_TARGET_MSG_CMD,
    DM_TARGET_SPEC,
    DM_VERSION_CMD,
    MAX_NAME,
    Target,
    dm_message,
    dm_request,
    dm_status,
    kernel_support,
    node_path,
    pack_dm_ioctl,
    pack_targets,
    unpack_dm_ioctl,
    unpack_name_list,
    unpack_targets,
    unpack_versions,
)
from imaged.drivers.devmapper.pool import (
    MAX_THIN_ID,
    PoolStatus,
    allocate_id,
    container_key,
    dev_string,
    device_name,
    device_sectors,
    fill_refusal,
    layer_key,
    parse_pool_status,
    parse_pool_table,
    parse_thin_ls,
    pool_target,
    pool_usage_text,
    root_tag,
    thin_target,
)
from imaged.drivers.devmapper.records import Record, Records, reconcile

__all__ = [
    "DM_ACTIVE_PRESENT_FLAG", "DM_DEV_CREATE_CMD", "DM_IOCTL", "DM_SUSPEND_FLAG",
    "DM_TABLE_LOAD_CMD", "DM_TARGET_MSG_CMD", "DM_TARGET_SPEC", "DM_VERSION_CMD", "MAX_NAME",
    "MAX_THIN_ID", "DevmapperDriver", "Options", "PoolStatus", "Record", "Records", "Target",
    "allocate_id", "config_problem", "container_key", "deactivate_all", "dev_string",
    "device_name", "device_sectors", "dm_message", "dm_request", "dm_status", "fill_refusal",
    "kernel_support", "layer_key", "mkfs_command", "mount_options", "node_path",
    "pack_dm_ioctl", "pack_targets", "parse_pool_status", "parse_pool_table", "parse_thin_ls",
    "pool_target", "pool_usage_text", "probe", "reconcile", "root_tag", "thin_target",
    "unpack_dm_ioctl", "unpack_name_list", "unpack_targets", "unpack_versions",
]
