"""No call that waits on the root's disk runs on the daemon's event loop (issue 17), whatever the
disk's speed: the daemon's stall watch counts such calls made on the loop thread
(``imaged.server.stalls``: Python's audit events for files under the root and for processes) and
logs each call site; a workload through the socket API of every kind of request that touches
the root must leave the count at zero. Unlike a latency bound, the count does not depend on the
machine's load, so this test fails for a blocking call on the loop and for nothing else."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from imaged.cli.client import DaemonClient, segment
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conftest import push_bad_diff_id, push_simple


@pytest.mark.parametrize("driver", ["vfs", "overlay", "fuse"])
def test_requests_make_no_disk_call_on_the_event_loop(
        start_daemon: Any, registry: LocalRegistry, layout: OCILayout, driver: str) -> None:
    pushed = push_simple(layout, registry, f"loopcalls/{driver}")
    daemon = start_daemon(driver)
    with contextlib.closing(DaemonClient(daemon.socket, timeout=60)) as api:
        api.call("GET", "/v1/info")
        assert list(api.stream("POST", "/v1/images/pull", {"ref": pushed.ref}))[-1][
            "status"] == "done"
        for failing in (f"{registry.host}/loopcalls/absent:v1",  # before any download
                        push_bad_diff_id(layout, registry, f"loopcalls/bad-{driver}",
                                         b"unpacked, then refused" * 1000)):  # undone after
            assert list(api.stream("POST", "/v1/images/pull", {"ref": failing}))[-1][
                "status"] == "error"
        api.call("GET", "/v1/images")
        api.call("POST", "/v1/containers", {"name": "c1", "image": pushed.ref, "quota": 64 << 20})
        path = Path(api.call("POST", "/v1/containers/c1/mount")["path"])
        (path / "written.txt").write_text("a container's write\n")
        api.call("GET", "/v1/containers")
        api.call("GET", "/v1/check")
        api.call("POST", "/v1/containers/c1/unmount")
        api.call("PATCH", "/v1/containers/c1", {"quota": 96 << 20})
        api.call("DELETE", "/v1/containers/c1")
        api.call("DELETE", f"/v1/images/{segment(pushed.ref)}")
        api.call("POST", "/v1/gc")
    assert daemon.stop() == 0, daemon.output()
    assert daemon.loop_calls() == (0, []), daemon.output()
