"""Loop quotas' online growth needs CAP_SYS_RESOURCE, which this host's root lacks (there the
test skips, and ``imaged update`` of a mounted loop-quota container says so); the guest's root
has it, so here it runs."""

from __future__ import annotations

import pytest

from tests.integration.test_loopquota import (  # noqa: F401 - the test and its fixtures
    _root_and_tools,
    make_fs,
    test_grow_online_then_write_more,
)

pytestmark = pytest.mark.guest
