"""Logging that reads well in a terminal and under journald.

One line per event. In a terminal: ``time LEVEL logger: message``. When
stderr *is* the journal stream (``$JOURNAL_STREAM`` names stderr's device and
inode, as systemd sets it), journald adds its own time stamp, so the line
starts with a ``<N>`` syslog priority prefix instead (``journalctl -p
warning`` then works and errors are highlighted). Logger names drop the
package prefix: ``backend.udp.backend`` rather than ``flanneld_py.backend.udp.backend``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

__all__ = ["JournalFormatter", "TerminalFormatter", "journal_attached", "setup_logging"]

_PACKAGE = "flanneld_py"

# logging level -> syslog priority (sd-daemon.h SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def _short_name(name: str) -> str:
    if name == _PACKAGE:
        return "flanneld"
    if name.startswith(_PACKAGE + "."):
        return name[len(_PACKAGE) + 1:]
    return name


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


class TerminalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(shortname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.shortname = _short_name(record.name)
        return super().format(record)


class JournalFormatter(logging.Formatter):
    """No time stamp (journald has one); a ``<N>`` priority prefix on every line."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(shortname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.shortname = _short_name(record.name)
        prefix = f"<{syslog_priority(record.levelno)}>"
        # A traceback spans several lines: keep each one at the record's priority.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def journal_attached(environ: Mapping[str, str], stream: TextIO) -> bool:
    """True if ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM=dev:inode``).

    Only the variable is not enough: a child whose stderr was redirected
    elsewhere still inherits it.
    """
    value = environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def setup_logging(verbosity: int, environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> None:
    """INFO by default, DEBUG with ``-v``, library debug output too with ``-v=2``."""
    environ = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if journal_attached(environ, stream) else TerminalFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    # gRPC is chatty at DEBUG; keep it at WARNING unless -v=2 or more.
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)
