"""Test-only fault points: where a test makes the server process stop dead or pause inside a save.

Off unless the environment variable ``FLIGHT_SHARE_TEST_FAULT`` is set (never in a project's deployment):
``<point>:kill`` makes the process SIGKILL itself at ``point`` (a real crash, nothing runs after it);
``<point>:hold:<path>`` makes the thread that reaches ``point`` wait until the file ``path`` exists (at most
:data:`HOLD_SECONDS`). Points of a save: ``load`` (in the write window, before dlt's load step),
``loads-record`` (dlt's data jobs done, before it writes the ``_dlt_loads`` record), ``loaded`` (dlt's load
step returned, before the save's bookkeeping). Tests hit a point deterministically, with no sleeps.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

VARIABLE = "FLIGHT_SHARE_TEST_FAULT"
HOLD_SECONDS = 120.0


def at(point: str) -> None:
    """Kill or hold the process here if the test asked for ``point``; nothing otherwise."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("hold:"):
        release, deadline = Path(action[len("hold:"):]), time.monotonic() + HOLD_SECONDS
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # a test-only pause: the test creates the file when it is done


def install() -> None:
    """Put the point inside dlt's load step (between its data jobs and its ``_dlt_loads`` record), only when
    a test asked for it."""
    if not os.environ.get(VARIABLE, "").startswith("loads-record:"):
        return
    from dlt.load.load import Load

    complete = Load.complete_package

    def complete_package(self, load_id, schema, aborted=False):  # type: ignore[no-untyped-def]
        at("loads-record")
        return complete(self, load_id, schema, aborted)

    Load.complete_package = complete_package  # type: ignore[method-assign]
