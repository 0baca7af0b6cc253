"""The real daemon speaks systemd's notify protocol on a real NOTIFY_SOCKET.

The network config is withheld at first, so the daemon sits in "waiting for
network config": it must ping the watchdog and report STATUS, but never say
READY=1 before its subnet file exists.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass, field

import pytest

from flanneld_py.lab.checks import wait_until
from flanneld_py.lab.cluster import PREFIX, Cluster, Node

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow]


@dataclass
class Inbox:
    """Receives notify datagrams on a thread, noting whether the subnet file existed at each."""

    sock: socket.socket
    node: Node
    messages: list[tuple[str, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((data.decode(), os.path.exists(self.node.subnet_file)))

    def stop(self) -> None:
        self._stop.set()

    def fields(self, key: str) -> list[str]:
        return [line.split("=", 1)[1] for text, _ in self.messages for line in text.splitlines()
                if line.startswith(key + "=")]

    def wait_for(self, line: str, timeout: float) -> bool:
        return wait_until(lambda: any(line in text.splitlines() for text, _ in self.messages), timeout, 0.05)

    def wait_count(self, key: str, count: int, timeout: float = 30) -> bool:
        """Until ``count`` messages carried ``key`` (a count, not a rate: no window to miss on a slow machine)."""
        return wait_until(lambda: len(self.fields(key)) >= count, timeout, 0.05)


def test_ready_status_watchdog_and_stopping(tmp_path):
    path = str(tmp_path / "notify.sock")
    with Cluster(nodes=1) as cluster, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        node = cluster.nodes[0]
        assert cluster.etcd is not None
        cluster.etcd.ctl("del", f"{PREFIX}/config")
        inbox = Inbox(sock, node)
        thread = threading.Thread(target=inbox.run, daemon=True)
        thread.start()
        try:
            cluster.start_daemon(node, f"--control-socket={node.workdir}/control.sock", wait=False,
                                 env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
            assert inbox.wait_for("STATUS=waiting for network config", timeout=15), node.log_text()
            # the loop pings while the daemon waits for its config (it cannot be ready without one)
            assert inbox.wait_count("WATCHDOG", 5), inbox.messages
            assert not os.path.exists(node.subnet_file)
            assert inbox.fields("READY") == []

            cluster.put_config(cluster.config)
            assert inbox.wait_for("READY=1", timeout=20), node.log_text()
            ready = [(text, exists) for text, exists in inbox.messages if "READY=1" in text.splitlines()]
            assert len(ready) == 1
            text, subnet_file_existed = ready[0]
            assert subnet_file_existed, "READY=1 arrived before the subnet file existed"
            subnet = node.subnet_env().subnet
            assert f"STATUS=running: subnet {subnet}, backend udp, 0 peers" in text.splitlines()
            statuses = inbox.fields("STATUS")
            order = ["waiting for network config", "acquiring lease", "starting datapath"]
            assert [s for s in statuses if s in order] == order

            pings = len(inbox.fields("WATCHDOG"))
            assert inbox.wait_count("WATCHDOG", pings + 3), inbox.messages[-5:]  # still pinging once running

            assert cluster.stop_daemon(node, signal.SIGTERM) == 0, node.log_text()[-2000:]
            assert inbox.wait_for("STOPPING=1", timeout=30)
            assert "cannot notify systemd" not in node.log_text()
        finally:
            inbox.stop()
            thread.join(5)
