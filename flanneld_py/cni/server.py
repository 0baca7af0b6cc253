"""The unix socket the ``flannel-py`` shim talks to, inside the daemon.

One connection carries one request: the shim writes a JSON object
``{"command", "env", "config_text"}`` (stdin as it came; tests may send the parsed
``"config"``) and shuts down its write side. Every check of the request is made here
(``models.parse_request``): the shims only frame and forward it. We answer
``{"exit": 0|1, "output": <stdout object or null>}`` and close. The command
itself blocks (netlink, files, iptables), so it runs in a thread of the
server's own pool; the event loop only moves bytes, and many requests can
be in flight at once (the address store and the netlink layer lock what
they share).

Standalone, before the daemon exists and for tests::

    python3 -m flanneld_py.cni.server --socket /run/flannel/cni.sock
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..netlink import Netlink
from ..unixsock import claim_socket_path
from .models import CniError, ConfigDefaults, ErrorCode, Request, answer_version, parse_request

if TYPE_CHECKING:
    from ..firewall import Iptables
    from .plugin import CniPlugin, LeaseSource

__all__ = ["DEFAULT_SOCKET", "CniServer"]

DEFAULT_SOCKET = "/run/flannel/cni.sock"
MAX_REQUEST_BYTES = 1 << 20
log = logging.getLogger(__name__)


class CniServer:
    """Serves CNI requests on a unix socket for as long as the daemon runs."""

    def __init__(self, defaults: ConfigDefaults = ConfigDefaults(), *,
                 current_lease: LeaseSource | None = None,
                 node: Netlink | None = None,
                 iptables: Iptables | None = None,
                 background_unplug: bool = True,
                 plugin: CniPlugin | None = None,
                 workers: int = 8,
                 request_timeout: float = 120.0) -> None:
        """``defaults``: the subnet file, data dir and bridge used when a config leaves them out.

        ``current_lease``: the daemon's lease as a ``SubnetEnv`` (None while it
        has none), so STATUS reports a stale subnet file. ``node``: netlink for
        the bridge's namespace; by default one is opened (in a thread) by ``start``.
        ``background_unplug``: DEL answers before the kernel has finished removing
        the veth (see ``plugin.Unplugger``); False makes DEL wait for it.
        ``plugin``: serve this one instead of building one from the above.
        ``workers``: threads of our own for the blocking work, so a burst of
        pods never takes the daemon's default executor from its backends.
        """
        self.defaults = defaults
        self.request_timeout = request_timeout
        self._current_lease = current_lease
        self._node = node
        self._own_node = node is None
        self._iptables = iptables
        self._background_unplug = background_unplug
        self._plugin: CniPlugin | None = plugin
        self._server: asyncio.AbstractServer | None = None
        self._path: str | None = None
        self._inode: int | None = None
        self._active: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cni")

    async def start(self, path: str = DEFAULT_SOCKET) -> None:
        """Listen on ``path`` (mode 0600); a stale socket file is replaced, a live one is an error."""
        if self._plugin is None:
            from .plugin import CniPlugin  # here: a daemon that serves no CNI socket never loads the wiring

            if self._node is None:
                self._node = await asyncio.to_thread(Netlink)
            self._plugin = CniPlugin(self._node, iptables=self._iptables, current_lease=self._current_lease,
                                     background_unplug=self._background_unplug)
        await asyncio.to_thread(claim_socket_path, path)
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=path)
        os.chmod(path, 0o600)  # root only: a request makes the daemon read and write paths it names
        self._path = path
        self._inode = os.stat(path).st_ino
        log.info("CNI requests served on %s", path)

    async def close(self, grace: float = 30.0) -> None:
        """Stop listening, let requests in flight finish, remove our socket file, close what we opened."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._active:
            await asyncio.wait(set(self._active), timeout=grace)
        if self._path is not None:
            with contextlib.suppress(OSError):
                if os.stat(self._path).st_ino == self._inode:
                    os.unlink(self._path)
            self._path = None
        if self._plugin is not None:
            await asyncio.to_thread(self._plugin.close)
            self._plugin = None
        self._executor.shutdown(wait=False)
        if self._own_node and self._node is not None:
            await asyncio.to_thread(self._node.close)
            self._node = None

    async def __aenter__(self) -> CniServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- one connection ----------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        try:
            try:
                raw = await asyncio.wait_for(_read_all(reader), timeout=self.request_timeout)
            except CniError as exc:
                reply, request = {"exit": 1, "output": exc.render(answer_version(None))}, None
            else:
                reply, request = await self._answer(raw)
            try:
                writer.write(json.dumps(reply, separators=(",", ":")).encode())
                await writer.drain()
            except ConnectionError:
                if request is not None and request.command == "ADD" and reply["exit"] == 0:
                    await self._undo_add(request)
                raise
        except (TimeoutError, ConnectionError) as exc:
            log.warning("CNI client went away: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._active.discard(task)

    async def answer(self, raw: bytes) -> dict[str, Any]:
        """The reply for one raw request (never raises)."""
        return (await self._answer(raw))[0]

    async def _undo_add(self, request: Request) -> None:
        """An ADD whose result never reached the runtime (the plugin was killed or gave up)
        failed as far as the runtime knows: remove the pod again, as its DEL would, so that
        nothing stays wired if that DEL came before this ADD was done."""
        log.warning("the runtime went away before ADD of %s %s was answered; removing the pod again",
                    request.container_id, request.ifname)
        try:
            assert self._plugin is not None
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._plugin.handle, dataclasses.replace(request, command="DEL"))
        except Exception:  # noqa: BLE001 - the runtime's DEL or a GC finishes the job
            log.exception("removing the pod of an unanswered ADD failed")

    async def _answer(self, raw: bytes) -> tuple[dict[str, Any], Request | None]:
        """The reply for one raw request and the request it held (None if unreadable)."""
        version: object = None
        request: Request | None = None
        try:
            wire = _decode(raw)
            config = wire.get("config")
            version = config.get("cniVersion") if isinstance(config, dict) else None
            request = parse_request(wire, self.defaults)
            assert self._plugin is not None, "CniServer.start() was not awaited"
            output = await asyncio.get_running_loop().run_in_executor(self._executor, self._plugin.handle, request)
        except CniError as exc:
            return {"exit": 1, "output": exc.render(answer_version(version))}, request
        except Exception as exc:  # noqa: BLE001 - the runtime must get an answer, whatever broke
            log.exception("CNI request failed")
            error = CniError(ErrorCode.INTERNAL, f"flanneld-py failed: {exc!r}",
                             "see the flanneld-py log on this node")
            return {"exit": 1, "output": error.render(answer_version(version))}, request
        return {"exit": 0, "output": output}, request


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    chunks, size = [], 0
    while chunk := await reader.read(65536):
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise CniError(ErrorCode.DECODE_FAILURE, f"request larger than {MAX_REQUEST_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        # The shims frame stdin and the CNI_* variables as they came: bytes that are not UTF-8
        # arrive raw (compiled shim) or as surrogate escapes (Python shim); both decode alike.
        wire = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, "cannot decode the request from the flannel-py plugin",
                       str(exc)) from None
    if not isinstance(wire, dict):
        raise CniError(ErrorCode.DECODE_FAILURE, "the request from the flannel-py plugin is not an object")
    if isinstance(wire.get("config_text"), str):  # the shims send stdin as it came
        wire["config"] = _config_from_stdin(wire.pop("config_text"))
    return wire


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _config_from_stdin(text: str) -> dict[str, Any]:
    """The network config as the runtime wrote it: UTF-8 JSON holding an object."""
    try:
        text.encode("utf-8")  # refuses the surrogate escapes of bytes that were not UTF-8
        config = json.loads(text, parse_constant=_not_json)
    except ValueError as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, "cannot decode the network config on stdin", str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(ErrorCode.INVALID_CONFIG, "the network config on stdin must be a JSON object")
    return config


# --- standalone entry ------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse  # here: argparse and gettext are ~1.3 MB the daemon's CNI server never needs

    parser = argparse.ArgumentParser(prog="python3 -m flanneld_py.cni.server",
                                     description="Serve flannel-py CNI requests without the rest of the daemon.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="unix socket path (default %(default)s)")
    parser.add_argument("--subnet-file", default=ConfigDefaults().subnet_file,
                        help="subnet file when the config has no subnetFile (default %(default)s)")
    parser.add_argument("--data-dir", default=ConfigDefaults().data_dir,
                        help="address store when the config has no dataDir (default %(default)s)")
    parser.add_argument("--sync-del", action="store_true",
                        help="answer DEL only once the veth is gone (default: remove it after answering)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    defaults = ConfigDefaults(subnet_file=args.subnet_file, data_dir=args.data_dir)
    try:
        server = CniServer(defaults, background_unplug=not args.sync_del)
        asyncio.run(_serve_until_signalled(server, args.socket))
    except (OSError, RuntimeError) as exc:
        print(f"flanneld_py.cni.server: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signalled(server: CniServer, path: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start(path)
    print(f"listening on {path}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


if __name__ == "__main__":
    sys.exit(main())
