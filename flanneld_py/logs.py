"""Logging that reads well in a terminal and under journald."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]


def setup_logging(verbosity: int) -> None:
    """INFO by default, DEBUG with ``-v``; no timestamp when journald adds its own."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    # gRPC and pyroute2 are chatty at DEBUG; keep them at WARNING unless -v=2 or more.
    for noisy in ("grpc", "pyroute2", "aetcd", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)
