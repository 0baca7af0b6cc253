"""systemd's notify protocol (``sd_notify``): one datagram to ``$NOTIFY_SOCKET``.

A message is ``KEY=VALUE`` lines in one ``AF_UNIX``/``SOCK_DGRAM`` datagram.
The address is a path, or an abstract socket written with a leading ``@``.
Without ``NOTIFY_SOCKET`` (not started by systemd) every call is a no-op.

The watchdog pings from the event loop itself, so a loop that stops turning
stops the pings and systemd restarts us after ``WatchdogSec=``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "format_notify", "watchdog_interval", "watchdog_loop"]

log = logging.getLogger(__name__)


def format_notify(fields: Mapping[str, str]) -> bytes:
    """``{"READY": "1", "STATUS": "x"}`` -> ``b"READY=1\\nSTATUS=x\\n"``.

    A value is one line: newlines become spaces, since systemd splits on them.

    Raises:
        ValueError: a key is empty or holds ``=`` or whitespace.
    """
    lines = []
    for key, value in fields.items():
        if not key or "=" in key or any(ch.isspace() for ch in key):
            raise ValueError(f"invalid notify key {key!r}")
        lines.append(f"{key}={' '.join(str(value).splitlines())}\n")
    return "".join(lines).encode()


def socket_address(value: str) -> str:
    """``@name`` is the abstract socket ``\\0name``; anything else is a path."""
    return "\0" + value[1:] if value.startswith("@") else value


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, or None if off.

    ``WATCHDOG_PID``, when set, must name this process (systemd sets it for
    the main process; a child that inherited the environment must not ping).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Notifier:
    """Sends notify messages; never raises, never blocks."""

    def __init__(self, address: str | None) -> None:
        self.address = socket_address(address) if address else None
        self._sock: socket.socket | None = None
        self._warned = False
        self.ready_sent = False
        self.last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """Send one message; False (logged once) if systemd did not take it."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(format_notify(fields), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
                self._warned = True
            return False
        return True

    def status(self, text: str) -> None:
        """``STATUS=``, sent only when the text changes."""
        if text != self.last_status:
            self.last_status = text
            self.send(STATUS=text)

    def ready(self, text: str) -> None:
        """``READY=1`` with a status line, at most once per process."""
        if not self.ready_sent:
            self.ready_sent = True
            self.last_status = text
            self.send(READY="1", STATUS=text)

    def stopping(self, text: str = "stopping") -> None:
        self.last_status = text
        self.send(STOPPING="1", STATUS=text)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """Ping every ``interval`` seconds, from the event loop, until cancelled."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)

