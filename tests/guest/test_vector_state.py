"""In the guest: vector registers survive the guest kernel's task switches, in whichever xstate
mode the harness booted it (``IMAGED_GUEST_XSTATE``), for threads and for forked processes."""

from __future__ import annotations

import os

import pytest

from tests.guest import vectorwork, xstate

pytestmark = pytest.mark.guest


def test_threads_and_forks_compute_the_hosts_digests() -> None:
    results = vectorwork.run()
    wrong = [r for r in results if r != vectorwork.EXPECTED]
    mode = os.environ.get(xstate.MODE_ENV, "?")
    assert not wrong, f"{len(wrong)} of {len(results)} results differ from the host's ({mode})"
