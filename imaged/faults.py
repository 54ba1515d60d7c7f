"""Named pause points, so crash tests can kill the process exactly where they mean to.

With ``IMAGED_FAULT_PAUSE=<point>`` in its environment, a process that reaches that point stops
itself with SIGSTOP (every thread at once, mid-operation, as a crash would find it); the test
sees the stopped state in /proc and sends SIGKILL. Unset, a point costs one comparison.

The points: ``mid-download`` (a layer blob partly in ingest), ``mid-unpack`` (a layer half on
disk, its row 'creating'), ``created-not-mounted`` (a container made, not yet mounted),
``mid-removal`` (a container's row 'removing', its directory still there).
"""

from __future__ import annotations

import os
import signal

ENV = "IMAGED_FAULT_PAUSE"
_ARMED = os.environ.get(ENV)


def pause_point(name: str) -> None:
    if name == _ARMED:
        os.kill(os.getpid(), signal.SIGSTOP)
