"""The control socket: ``flanneld-py status`` asks the running daemon how it is.

Protocol: connect to the unix stream socket (default
``/run/flannel/flanneld-py.sock``), write one line ``status\\n`` (or nothing and
shut down the write side), read one JSON document until EOF. The answer is
:meth:`Snapshot.to_json` plus the health verdict.

A socket file left by a dead daemon is replaced; one that still answers
belongs to a running daemon and is left alone (we log and serve without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from ..unixsock import SocketPathBusy, claim_socket_path

__all__ = ["ControlServer", "query"]

log = logging.getLogger(__name__)

READ_TIMEOUT = 2.0
MAX_REQUEST = 256
MAX_ANSWER = 16 << 20


class ControlServer:
    def __init__(self, answer: Callable[[], dict[str, Any]]) -> None:
        self.answer = answer
        self.path: str | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: str) -> bool:
        """Listen on ``path``; False (logged) if a live daemon owns it or it is not a socket."""
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            await asyncio.to_thread(claim_socket_path, path)
        except SocketPathBusy as exc:
            log.warning("serving no control socket, so `status` will not reach this daemon: %s", exc)
            return False
        self._server = await asyncio.start_unix_server(self._handle, path)
        os.chmod(path, 0o660)
        self.path = path
        log.debug("control socket on %s", path)
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            command = request[:MAX_REQUEST].decode(errors="replace").strip() or "status"
            if command == "status":
                reply = self.answer()
            else:
                reply = {"error": f"unknown command {command!r} (try: status)"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None


def query(path: str, command: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Ask the daemon at ``path`` (blocking client side of the protocol).

    Raises:
        OSError: nothing listens there (FileNotFoundError, ConnectionRefusedError,
            PermissionError, or a timeout).
        ValueError: the answer is not a JSON object.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks, size = [], 0
        while size <= MAX_ANSWER:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    doc = json.loads(b"".join(chunks) or b"null")
    if not isinstance(doc, dict):
        raise ValueError("the daemon's answer is not a JSON object")
    return doc
