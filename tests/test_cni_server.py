"""The daemon's unix socket: one request per connection, many at once, never without an answer."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cni_helpers import CniNetwork, CniNode
from flanneld_py.cni.models import CniError, Request
from flanneld_py.cni.server import CniServer
from flanneld_py.unixsock import SocketPathBusy

CONF = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel-py"}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0"}


class FakePlugin:
    """Answers ADD (after meeting the other requests at ``meet``); fails in the ways a real plugin can."""

    def __init__(self, meet: threading.Barrier | None = None) -> None:
        self.meet = meet
        self.closed = False
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def handle(self, request: Request) -> dict[str, Any] | None:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.meet is not None:
                self.meet.wait()
            if request.container_id == "cni-error":
                raise CniError(101, "no free address")
            if request.container_id == "bug":
                raise KeyError("surprise")
            return {"cniVersion": request.config.cni_version, "container": request.container_id}
        finally:
            with self._lock:
                self.in_flight -= 1

    def close(self) -> None:
        self.closed = True


async def ask(path: str, payload: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return json.loads(data)  # type: ignore[no-any-return]


def request(container: str = "c1", **config: Any) -> bytes:
    return json.dumps({"command": "ADD", "env": {**ENV, "CNI_CONTAINERID": container},
                       "config": {**CONF, **config}}).encode()


def serve(tmp_path: Path, plugin: FakePlugin, scenario: Any, **options: Any) -> Any:
    async def main() -> Any:
        server = CniServer(plugin=plugin, **options)  # type: ignore[arg-type]
        path = str(tmp_path / "run" / "cni.sock")
        await server.start(path)
        try:
            return await scenario(path)
        finally:
            await server.close()
            assert not os.path.exists(path)
            assert plugin.closed
    return asyncio.run(main())


def test_answers_and_errors(tmp_path: Path) -> None:
    async def scenario(path: str) -> None:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert await ask(path, request()) == {"exit": 0, "output": {"cniVersion": "1.0.0", "container": "c1"}}
        error = await ask(path, request("cni-error", cniVersion="0.4.0"))
        assert error == {"exit": 1, "output": {"cniVersion": "0.4.0", "code": 101, "msg": "no free address"}}
        bug = await ask(path, request("bug"))
        assert bug["exit"] == 1 and bug["output"]["code"] == 110 and "surprise" in bug["output"]["msg"]
        assert (await ask(path, b"{not json"))["output"]["code"] == 6
        assert (await ask(path, b"[]"))["output"]["code"] == 6
        assert (await ask(path, request(cniVersion="9.0.0")))["output"]["code"] == 1
        assert (await ask(path, b" " * (1 << 20) + b"{}"))["output"]["code"] == 6  # too large

    serve(tmp_path, FakePlugin(), scenario)


def framed(env: dict[str, str], stdin: bytes, compiled: bool) -> bytes:
    """A request as each shim frames it: stdin verbatim, bytes that are not UTF-8 raw (compiled)
    or as surrogate escapes (Python)."""
    wire = {"command": env.get("CNI_COMMAND", ""), "env": env, "config_text": stdin.decode("utf-8", "surrogateescape")}
    if compiled:
        return json.dumps(wire, ensure_ascii=False).encode("utf-8", "surrogateescape")
    return json.dumps(wire).encode()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(("env", "stdin", "code"), [
    ({}, json.dumps(CONF).encode(), 4),
    ({"CNI_COMMAND": "ATTACH"}, json.dumps(CONF).encode(), 4),
    (ENV, b'{"cniVersion": ', 6),
    (ENV, b"\xff\xfe", 6),
    (ENV, b'{"cniVersion": "1.0.0", "name": "\xc0\xaf"}', 6),
    (ENV, b"[]", 7),
    (ENV, json.dumps({"name": "x"}).encode(), 7),
    (ENV, json.dumps({**CONF, "cniVersion": "0.2.0"}).encode(), 1),
    ({**ENV, "CNI_NETNS": ""}, json.dumps(CONF).encode(), 4),
    ({"CNI_COMMAND": "DEL"}, json.dumps(CONF).encode(), 4),
])
def test_the_daemon_judges_what_the_shims_forward(tmp_path: Path, env: dict[str, str], stdin: bytes, code: int,
                                                   compiled: bool) -> None:
    async def scenario(path: str) -> None:
        answer = await ask(path, framed(env, stdin, compiled))
        assert answer["exit"] == 1 and answer["output"]["code"] == code and answer["output"]["msg"]

    serve(tmp_path, FakePlugin(), scenario)


def test_requests_run_concurrently(tmp_path: Path) -> None:
    # each request waits in the plugin until all five are in it at once: served one at a time,
    # the barrier breaks after its (generous) deadline and the answers are errors
    together = threading.Barrier(5, timeout=30)
    plugin = FakePlugin(meet=together)

    async def scenario(path: str) -> None:
        answers = await asyncio.gather(*(ask(path, request(f"c{i}")) for i in range(5)))
        assert sorted(a["output"].get("container") for a in answers) == [f"c{i}" for i in range(5)], answers

    serve(tmp_path, plugin, scenario, workers=5)
    assert plugin.most_in_flight == 5


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "cni.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crash leaves

    async def main() -> None:
        first = CniServer(plugin=FakePlugin())  # type: ignore[arg-type]
        await first.start(str(path))
        second = CniServer(plugin=FakePlugin())  # type: ignore[arg-type]
        with pytest.raises(SocketPathBusy, match="already serves"):
            await second.start(str(path))
        await second.close()
        assert path.exists(), "the loser must not remove the winner's socket"
        await first.close()
        path.write_text("not a socket")
        third = CniServer(plugin=FakePlugin())  # type: ignore[arg-type]
        with pytest.raises(SocketPathBusy, match="not a socket"):
            await third.start(str(path))
        await third.close()

    asyncio.run(main())


@pytest.mark.netns
def test_sync_del_answers_once_everything_is_gone() -> None:
    lab = CniNode.create("--sync-del")
    net = CniNetwork(lab, 1, IPv4Network("10.244.1.0/24"))
    try:
        net.write_subnet_file()
        pod = net.pod("a")
        net.add(pod, "ctr-a")
        assert net.invoke("DEL", net.conf(), container="ctr-a", netns=pod).ok() is None
        assert net.reservations() == {} and net.host_veths() == []  # no waiting
    finally:
        net.close()
        lab.close()
