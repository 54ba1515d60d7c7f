"""devmapper on a kernel without device-mapper (this host's, DESIGN §8): ``imaged info`` says
it is unsupported and why, and asking for it fails cleanly, with one line and exit status 1,
having made nothing under the root. Where device-mapper exists these tests do not apply: the
guest tier (tests/guest/test_devmapper.py) covers the driver itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imaged.drivers.devmapper import ioctl
from imaged.testing.images import OCILayout
from imaged.testing.registry import LocalRegistry
from tests.conftest import push_simple

pytestmark = pytest.mark.skipif(ioctl.kernel_support() is None,
                                reason="this kernel has device-mapper with thin pools")


def test_info_reports_devmapper_unsupported_with_the_reason(imaged_proc: Any) -> None:
    result = imaged_proc("--json", "info")
    assert result.code == 0, result.err
    (entry,) = [d for d in result.json()["drivers"] if d["name"] == "devmapper"]
    assert entry["supported"] is False
    assert entry["reason"].startswith("device-mapper not in this kernel (")
    assert entry["capabilities"] is None
    table = imaged_proc("info")
    assert any(line.split()[:3] == ["devmapper", "no", "device-mapper"]
               for line in table.out.splitlines())


def test_using_devmapper_fails_cleanly(imaged_proc: Any, root: Path, registry: LocalRegistry,
                                       layout: OCILayout) -> None:
    image = push_simple(layout, registry, "devmapper-host")
    pull = imaged_proc("--driver", "devmapper", "pull", image.ref)
    assert (pull.code, pull.out) == (1, ""), pull
    assert pull.err.splitlines() == [pull.err.strip()]
    assert pull.err.startswith("imaged: error: driver devmapper cannot be used here: "
                               "device-mapper not in this kernel ("), pull.err
    # Nothing to mount either: the same one-line error, whatever it names first.
    mount = imaged_proc("--driver", "devmapper", "mount", image.ref, "--name", "c")
    assert (mount.code, mount.out, len(mount.err.splitlines())) == (1, "", 1), mount
    assert not (root / "drivers").exists()
    info = imaged_proc("--json", "info").json()
    assert (info["driver"], info["images"], info["content"]["blobs"]) == (None, 0, 0)
