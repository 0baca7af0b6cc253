"""The measurements: iperf3 and ping between two endpoints, CPU and memory from /proc.

Parsing is kept apart from running (``parse_*`` take text or JSON and return
dataclasses; ``tests/test_bench_units.py`` feeds them recorded output), so the
figures always come from the tools' own output in the run at hand.

Tools and what is read from them:

* ``iperf3 -J`` (server ``iperf3 -s -1`` in the destination namespace, client
  in the source): TCP ``end.sum_received`` (bytes, bits/s as the receiver
  counted them); UDP ``end.sum_received`` (packets, lost_packets, seconds).
* ``ping -i 0.01 -c N``: every ``time=`` line, for p50/p99.
* ``/proc/PID/stat`` utime/stime and ``/proc/PID/task/*/schedstat`` (on-CPU
  nanoseconds of every thread, the same quantity without the 10 ms tick
  rounding) for the daemons, ``/proc/stat`` system+irq+softirq for the kernel,
  ``/proc/PID/status`` VmHWM for peak RSS.
"""

from __future__ import annotations

import glob
import json
import os
import re
import selectors
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flanneld_py.lab.netns import Netns

from .stats import percentile

__all__ = [
    "CpuSample",
    "CpuUsage",
    "DaemonCpu",
    "Endpoint",
    "MeasureError",
    "PingResult",
    "TcpResult",
    "UdpResult",
    "cpu_sample",
    "cpu_usage",
    "parse_iperf3_tcp",
    "parse_iperf3_udp",
    "parse_pid_stat",
    "parse_ping",
    "parse_proc_stat",
    "parse_schedstat",
    "parse_vmhwm_kib",
    "peak_rss_kib",
    "run_iperf3",
    "run_ping",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
IPERF3_PORT = 5201


class MeasureError(RuntimeError):
    """A tool failed or printed something that is not a measurement."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a measured path: a namespace and the address others reach it at."""

    netns: Netns
    address: str


# --- iperf3 ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcpResult:
    bytes: int
    seconds: float
    bits_per_second: float
    retransmits: int

    @property
    def gbps(self) -> float:
        return self.bits_per_second / 1e9


@dataclass(frozen=True, slots=True)
class UdpResult:
    packets: int  # as the receiver counted them, including the lost ones
    lost: int
    seconds: float
    lost_percent: float

    @property
    def delivered(self) -> int:
        return self.packets - self.lost

    @property
    def delivered_pps(self) -> float:
        return self.delivered / self.seconds


def _iperf3_error(doc: Mapping[str, Any]) -> None:
    if doc.get("error"):
        raise MeasureError(f"iperf3: {doc['error']}")


def parse_iperf3_tcp(doc: Mapping[str, Any]) -> TcpResult:
    """The receiver's view of an ``iperf3 -J`` TCP test (any number of streams).

    Raises:
        MeasureError: iperf3 reported an error, or the document has no receiver sum.
    """
    _iperf3_error(doc)
    try:
        received = doc["end"]["sum_received"]
        sent = doc["end"].get("sum_sent", {})
        result = TcpResult(int(received["bytes"]), float(received["seconds"]),
                           float(received["bits_per_second"]), int(sent.get("retransmits", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise MeasureError(f"iperf3 TCP output has no receiver sum ({exc!r})") from None
    if result.seconds <= 0:
        raise MeasureError("iperf3 TCP test lasted no time")
    return result


def parse_iperf3_udp(doc: Mapping[str, Any]) -> UdpResult:
    """The receiver's view of an ``iperf3 -u -J`` test: packets seen, lost, over how long.

    Raises:
        MeasureError: iperf3 reported an error, or the document has no receiver sum.
    """
    _iperf3_error(doc)
    try:
        received = doc["end"]["sum_received"]
        result = UdpResult(int(received["packets"]), int(received["lost_packets"]),
                           float(received["seconds"]), float(received["lost_percent"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise MeasureError(f"iperf3 UDP output has no receiver sum ({exc!r})") from None
    if result.seconds <= 0:
        raise MeasureError("iperf3 UDP test lasted no time")
    return result


def _wait_for_line(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> None:
    """Read ``proc``'s stdout (unbuffered, straight from the pipe) until it shows ``marker``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
            if marker in seen:
                return
    raise MeasureError(f"iperf3 server did not start: {seen.decode(errors='replace')[-500:]!r}")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 3.0) -> None:
    """Wait briefly for ``proc`` to end, then kill it."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_iperf3(src: Endpoint, dst: Endpoint, args: Sequence[str], duration: float,
               port: int = IPERF3_PORT) -> dict[str, Any]:
    """One iperf3 test from ``src`` to ``dst``; the client's JSON document.

    The server (``iperf3 -s -1``) runs in ``dst``'s namespace and serves this one
    test; it is killed if it is still there afterwards.

    Raises:
        MeasureError: the server did not start, or the client failed.
    """
    server = subprocess.Popen(
        dst.netns.argv("iperf3", "-s", "-1", "-p", str(port), "--forceflush"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
    )
    try:
        _wait_for_line(server, b"Server listening", timeout=10)
        argv = src.netns.argv("iperf3", "-c", dst.address, "-p", str(port), "-J", "-t", f"{duration:g}",
                              "--connect-timeout", "5000", *args)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 40)
        try:
            doc: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise MeasureError(f"iperf3 client printed no JSON (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout)[-500:]!r}") from None
        _iperf3_error(doc)
        if proc.returncode != 0:
            raise MeasureError(f"iperf3 client exited {proc.returncode}")
        return doc
    except subprocess.TimeoutExpired:
        raise MeasureError(f"iperf3 client did not finish within {duration + 40:g}s") from None
    finally:
        stop_process(server)


# --- ping ----------------------------------------------------------------------------------

_PING_TIME = re.compile(r"\btime[=<]([0-9]+(?:\.[0-9]+)?) ms")
_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


@dataclass(frozen=True, slots=True)
class PingResult:
    rtts_ms: tuple[float, ...]
    transmitted: int
    received: int

    @property
    def p50_us(self) -> float:
        return percentile(self.rtts_ms, 50) * 1000

    @property
    def p99_us(self) -> float:
        return percentile(self.rtts_ms, 99) * 1000


def parse_ping(text: str) -> PingResult:
    """Every reply's round-trip time from iputils ``ping`` output, and its summary counts.

    Raises:
        MeasureError: no reply came back.
    """
    rtts = tuple(float(m.group(1)) for m in _PING_TIME.finditer(text))
    summary = _PING_SUMMARY.search(text)
    transmitted, received = (int(summary.group(1)), int(summary.group(2))) if summary else (len(rtts), len(rtts))
    if not rtts:
        raise MeasureError(f"ping got no reply: {text.strip()[-300:]!r}")
    return PingResult(rtts, transmitted, received)


def run_ping(src: Endpoint, dst: Endpoint, count: int, interval: float = 0.01) -> PingResult:
    """``ping -i interval -c count`` from ``src`` to ``dst`` (needs root below 0.2 s)."""
    proc = src.netns.sh("ping", "-n", "-i", f"{interval:g}", "-c", str(count), "-W", "1", dst.address,
                        check=False, timeout=count * interval + 30)
    return parse_ping(proc.stdout)


# --- /proc ------------------------------------------------------------------------------


def parse_pid_stat(text: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from ``/proc/PID/stat`` (the comm may hold spaces and parens)."""
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]), int(fields[12])


def parse_schedstat(text: str) -> int:
    """Nanoseconds on CPU from ``/proc/PID/task/TID/schedstat``."""
    return int(text.split()[0])


def parse_vmhwm_kib(text: str) -> int:
    """Peak resident set size (VmHWM) in KiB from ``/proc/PID/status``.

    Raises:
        MeasureError: no VmHWM line (a kernel thread, or not a status file).
    """
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise MeasureError("no VmHWM in /proc/PID/status")


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """The aggregate ``cpu`` line of ``/proc/stat``, in clock ticks."""

    user: int
    nice: int
    system: int
    idle: int
    iowait: int
    irq: int
    softirq: int
    steal: int

    @property
    def kernel(self) -> int:
        return self.system + self.irq + self.softirq


def parse_proc_stat(text: str) -> CpuTimes:
    """The machine-wide ``cpu`` line of ``/proc/stat``.

    Raises:
        MeasureError: no aggregate cpu line.
    """
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:9]] + [0] * max(0, 8 - len(parts[1:9]))
            return CpuTimes(*values)
    raise MeasureError("no cpu line in /proc/stat")


@dataclass(frozen=True, slots=True)
class DaemonCpu:
    utime: int  # ticks
    stime: int  # ticks
    oncpu_ns: int  # sum over the live threads' schedstat


@dataclass(frozen=True, slots=True)
class CpuSample:
    machine: CpuTimes
    daemons: Mapping[int, DaemonCpu]


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """CPU spent between two samples, in seconds."""

    daemons: float  # the daemons' user + system time
    kernel: float  # machine-wide system + irq + softirq, less the daemons' system time
    daemon_stime: float

    @property
    def total(self) -> float:
        return self.daemons + self.kernel


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _daemon_cpu(pid: int) -> DaemonCpu:
    utime, stime = parse_pid_stat(_read(f"/proc/{pid}/stat"))
    oncpu = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            oncpu += parse_schedstat(_read(path))
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return DaemonCpu(utime, stime, oncpu)


def cpu_sample(pids: Iterable[int]) -> CpuSample:
    """Read /proc/stat and every daemon's CPU counters now.

    Raises:
        MeasureError: a daemon is gone.
    """
    try:
        daemons = {pid: _daemon_cpu(pid) for pid in pids}
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise MeasureError(f"a daemon exited during the measurement ({exc})") from None
    return CpuSample(parse_proc_stat(_read("/proc/stat")), daemons)


def cpu_usage(before: CpuSample, after: CpuSample, clk_tck: int = CLK_TCK) -> CpuUsage:
    """What the daemons and the kernel spent between ``before`` and ``after``.

    Daemons: on-CPU time of their threads (schedstat, nanoseconds). Kernel: the
    machine-wide system, irq and softirq ticks, minus the daemons' own system
    ticks (those are already in the daemons' share), never below zero.

    Raises:
        MeasureError: the samples cover different daemons.
    """
    if set(before.daemons) != set(after.daemons):
        raise MeasureError("CPU samples cover different daemons")
    daemons_ns = sum(after.daemons[p].oncpu_ns - before.daemons[p].oncpu_ns for p in before.daemons)
    stime = sum(after.daemons[p].stime - before.daemons[p].stime for p in before.daemons)
    kernel_ticks = after.machine.kernel - before.machine.kernel
    return CpuUsage(daemons_ns / 1e9, max(0, kernel_ticks - stime) / clk_tck, stime / clk_tck)


def peak_rss_kib(pid: int) -> int:
    """The daemon's peak resident set size so far (VmHWM)."""
    return parse_vmhwm_kib(_read(f"/proc/{pid}/status"))

