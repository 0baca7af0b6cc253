"""Cancelling tasks so that they really end.

Python 3.11's ``asyncio.wait_for`` (and libraries built on it, such as etcd clients'
watch set-up) drops a cancellation that arrives in the same loop iteration as
the awaited result (CPython gh-86296, fixed in 3.12). The task then goes on,
say into a watch that never sees an event, and a shutdown awaiting it hangs.
A stop therefore cancels again until each task is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)

RECANCEL_EVERY = 0.2  # seconds between cancellations of a task that has not ended


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until all have ended, cancelling again those that go on.

    Their errors are retrieved (not raised): the caller is tearing down and
    has already dealt with the outcome it cares about.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY)
        for task in pending:
            log.debug("task %s went on after a cancellation; cancelling it again", task.get_name())
    for task in tasks:
        if not task.cancelled():
            task.exception()
