"""Traffic checks run across the lab: ping matrices and checksummed TCP transfers."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .cluster import Pod

__all__ = ["TransferResult", "dns_check", "ping_matrix", "tcp_transfer", "time_until", "wait_until"]


def time_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until ``predicate()`` held, or None if it did not within ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """True once ``predicate()`` holds, False if it did not within ``timeout``."""
    return time_until(predicate, timeout, interval) is not None


def pod_address(pod: Pod, ipv6: bool = False) -> str:
    """The pod's IPv4 address, or with ``ipv6`` its IPv6 one (which it must have)."""
    if not ipv6:
        assert pod.ip is not None, f"pod {pod.name} has no IPv4 address"
        return str(pod.ip.ip)
    assert pod.ip6 is not None, f"pod {pod.name} has no IPv6 address"
    return str(pod.ip6.ip)


def ping_matrix(pods: list[Pod], count: int = 1, timeout: float = 2,
                ipv6: bool = False) -> dict[tuple[str, str], bool]:
    """Ping every pod from every other pod (in parallel), at their IPv6 addresses with ``ipv6``;
    (from, to) -> reached."""
    pairs = [(a, b) for a in pods for b in pods if a is not b]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = pool.map(lambda pair: pair[0].ping(pod_address(pair[1], ipv6), count=count, timeout=timeout), pairs)
        return {(a.name, b.name): ok for (a, b), ok in zip(pairs, results)}


@dataclass(frozen=True)
class TransferResult:
    sent: str
    received: str
    seconds: float

    @property
    def intact(self) -> bool:
        return self.sent == self.received and self.sent != ""


def tcp_transfer(src: Pod, dst: Pod, nbytes: int, port: int = 5001, timeout: float = 180,
                 ipv6: bool = False) -> TransferResult:
    """Send ``nbytes`` from ``src`` to ``dst`` over TCP (to its IPv6 address with ``ipv6``); both
    ends' sha256 and the duration."""
    server = subprocess.Popen(
        dst.netns.argv(sys.executable, "-m", "flanneld_py.lab.tcpcheck", "serve", str(port)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "listening":
            raise RuntimeError(f"tcpcheck server failed: {server.stderr.read() if server.stderr else ''}")
        start = time.monotonic()
        sent = src.sh(sys.executable, "-m", "flanneld_py.lab.tcpcheck", "send", pod_address(dst, ipv6), str(port),
                      str(nbytes), timeout=timeout).stdout.strip()
        received, _ = server.communicate(timeout=timeout)
        return TransferResult(sent, received.strip(), time.monotonic() - start)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def dns_check(server: Pod, client: Pod, name: str = "demo.cluster.local", answer: str = "10.96.0.10",
              ipv6: bool = False) -> str:
    """Run a DNS server (dnsmasq) in ``server`` and resolve ``name`` from ``client`` with dig.

    With ``ipv6`` the server listens on its IPv6 address, ``answer`` is an IPv6 address (a
    static AAAA record) and the client asks for AAAA over IPv6. Returns what dig printed (the
    answer address when DNS works across the overlay).
    """
    listen = pod_address(server, ipv6)
    proc = subprocess.Popen(
        server.netns.argv(
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
            "--pid-file=", "--user=root", "--bind-interfaces", f"--listen-address={listen}",
            f"--address=/{name}/{answer}",
        ),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 10
        out = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"dnsmasq failed: {proc.stderr.read() if proc.stderr else ''}")
            out = client.sh("dig", f"@{listen}", *(("AAAA",) if ipv6 else ()), name, "+short", "+time=1", "+tries=1",
                            check=False).stdout.strip()
            if out and not out.startswith(";;"):  # ";; communications error": dnsmasq not listening yet
                return out
            time.sleep(0.3)
        return out
    finally:
        proc.kill()
        proc.wait()
