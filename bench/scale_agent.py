"""The part of ``--peers`` that runs inside a node's namespace (where etcd is reachable).

``python3 -m bench.scale_agent HOST:PORT PREFIX COMMAND FILE [--observe ...]``

* ``fill FILE``: put every ``[name, value]`` of FILE under ``PREFIX/subnets/``
  (transactions of 100 puts).
* ``clear FILE``: delete every name of FILE.
* ``events FILE --observe routes|log:PATH``: for each ``[name, value]``, one at a
  time, note the time, put the lease, and wait until the node has it in its
  datapath: a kernel route to the subnet (``routes``: an RTM_NEWROUTE seen
  on a netlink socket bound before the put), or the daemon's own log line
  ``peer added: <subnet>`` (``log:PATH``: the line's timestamp, millisecond
  resolution). Prints ``{"latencies_ms": [...]}``.

The clock starts when the put is sent, so the figure includes etcd's commit
and the watch delivery: what an operator sees from "lease written" to
"route in place".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["log_peer_added_times", "main"]

BATCH = 100
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*peer added: (\S+)")


def log_peer_added_times(text: str) -> dict[str, float]:
    """subnet -> wall-clock time of its first ``peer added`` log line (the daemon's default format)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match and match.group(2) not in out:
            out[match.group(2)] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return out


async def _client(endpoint: str) -> Any:
    import aetcd

    host, _, port = endpoint.rpartition(":")
    client = aetcd.Client(host=host, port=int(port), timeout=10)
    await client.connect()
    return client


async def fill(endpoint: str, prefix: str, leases: list[list[str]]) -> None:
    client = await _client(endpoint)
    try:
        for start in range(0, len(leases), BATCH):
            puts = [client.transactions.put(f"{prefix}/subnets/{name}".encode(), value.encode())
                    for name, value in leases[start:start + BATCH]]
            await client.transaction(compare=[], success=puts, failure=[])
    finally:
        await client.close()


async def clear(endpoint: str, prefix: str, names: list[str]) -> None:
    client = await _client(endpoint)
    try:
        for start in range(0, len(names), BATCH):
            deletes = [client.transactions.delete(f"{prefix}/subnets/{name}".encode())
                       for name in names[start:start + BATCH]]
            await client.transaction(compare=[], success=deletes, failure=[])
    finally:
        await client.close()


class _RouteWatch:
    """Kernel routes as they appear: (dst/len, time seen) from a bound netlink socket."""

    def __init__(self) -> None:
        self.seen: queue.Queue[tuple[str, float]] = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout=15):
            raise TimeoutError("netlink route monitor did not start")
        if self._error is not None:
            raise self._error

    def _pump(self) -> None:
        # pyroute2's synchronous IPRoute runs its own event loop: build and use it on this thread only.
        try:
            from pyroute2 import IPRoute
            from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE

            ipr = IPRoute()
            ipr.bind(groups=RTMGRP_IPV4_ROUTE)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            for msg in ipr.get():
                if msg.get("event") == "RTM_NEWROUTE" and msg.get_attr("RTA_DST"):
                    self.seen.put((f"{msg.get_attr('RTA_DST')}/{msg['dst_len']}", time.time()))

    def wait(self, subnet: str, deadline: float) -> float:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no route to {subnet}")
            try:
                dst, at = self.seen.get(timeout=left)
            except queue.Empty:
                continue
            if dst == subnet:
                return at


class _LogWatch:
    """The daemon's ``peer added`` lines, read as the file grows."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = os.path.getsize(path)

    def wait(self, subnet: str, deadline: float) -> float:
        buffered = ""
        while time.monotonic() < deadline:
            with open(self.path, errors="replace") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
            buffered += chunk
            self._offset += len(chunk.encode(errors="replace"))
            times = log_peer_added_times(buffered)
            if subnet in times:
                return times[subnet]
            time.sleep(0.005)
        raise TimeoutError(f"no 'peer added: {subnet}' in {self.path}")


async def events(endpoint: str, prefix: str, leases: list[list[str]], observe: str,
                 timeout: float) -> list[float]:
    watch: _RouteWatch | _LogWatch
    if observe == "routes":
        watch = await asyncio.to_thread(_RouteWatch)
    else:
        watch = _LogWatch(observe.removeprefix("log:"))
    client = await _client(endpoint)
    latencies: list[float] = []
    try:
        for name, value in leases:
            subnet = name.replace("-", "/")
            sent = time.time()
            await client.put(f"{prefix}/subnets/{name}".encode(), value.encode())
            seen = await asyncio.to_thread(watch.wait, subnet, time.monotonic() + timeout)
            latencies.append((seen - sent) * 1000)
            await asyncio.sleep(0.05)
    finally:
        await client.close()
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.scale_agent")
    parser.add_argument("endpoint", help="etcd HOST:PORT")
    parser.add_argument("prefix")
    parser.add_argument("command", choices=("fill", "clear", "events"))
    parser.add_argument("file")
    parser.add_argument("--observe", default="routes", help="routes | log:PATH")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    data = json.loads(Path(args.file).read_text())
    if args.command == "fill":
        asyncio.run(fill(args.endpoint, args.prefix, data))
    elif args.command == "clear":
        asyncio.run(clear(args.endpoint, args.prefix, data))
    else:
        latencies = asyncio.run(events(args.endpoint, args.prefix, data, args.observe, args.timeout))
        print(json.dumps({"latencies_ms": latencies}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
