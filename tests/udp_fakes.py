"""In-memory stand-ins for the udp loop's two edges (as wireguard-go's ``tuntest``/``bindtest``).

:class:`MemoryTun` is the real :class:`~flanneld_py.backend.udp.tun.TunQueue` (virtio-net
header parsing, checksum completion, header building) with the two raw kernel calls replaced
by queues; :class:`MemoryUdp` is a :class:`~flanneld_py.backend.udp.udpconn.UdpConn` that
records each send call and hands out queued reads. So the loop is driven and observed
without a TUN device, a socket or a namespace.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from flanneld_py.backend.udp.tun import TunQueue
from flanneld_py.backend.udp.udpconn import MAX_GSO_BYTES, MAX_GSO_SEGMENTS

__all__ = ["MemoryTun", "MemoryUdp", "Send"]


class MemoryTun(TunQueue):
    """flannel0 in memory: ``inject`` frames for the loop to read, ``frames`` it wrote."""

    def __init__(self, offload: bool = True, name: str = "flannel0") -> None:
        super().__init__(name, offload)
        self.pending: deque[bytes] = deque()
        self.frames: list[bytes] = []  # as written, virtio-net header included when offload

    def inject(self, frame: bytes) -> None:
        self.pending.append(bytes(frame))

    def fileno(self) -> int:
        return -1

    def _read_raw(self, buf: bytearray) -> int:
        if not self.pending:
            return 0
        frame = self.pending.popleft()
        buf[: len(frame)] = frame
        return len(frame)

    def _write_raw(self, parts: Sequence[bytes | memoryview]) -> None:
        self.frames.append(b"".join(bytes(part) for part in parts))


class Send:
    """One send call: the bytes, the segment size, the destination."""

    def __init__(self, data: bytes, seglen: int, addr: tuple[str, int]) -> None:
        self.data, self.seglen, self.addr = data, seglen, addr

    @property
    def datagrams(self) -> list[bytes]:
        return [self.data[i : i + self.seglen] for i in range(0, len(self.data), self.seglen)]


class MemoryUdp:
    """The overlay socket in memory: ``inject`` reads (a GRO run or one datagram), ``sends`` made."""

    def __init__(self, gso: bool = True) -> None:
        self.gso = gso
        self.sends: list[Send] = []
        self.pending: deque[tuple[bytes, int, str]] = deque()

    def inject(self, data: bytes, seglen: int, source: str) -> None:
        self.pending.append((bytes(data), seglen, source))

    def fileno(self) -> int:
        return -1

    def per_send(self, seglen: int) -> int:
        return min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // seglen) if self.gso else 1

    def send(self, data: memoryview, seglen: int, addr: tuple[str, int]) -> int:
        assert len(data) <= self.per_send(seglen) * seglen, "more datagrams than one send may carry"
        self.sends.append(Send(bytes(data), seglen, addr))
        return 0

    def recv(self, buf: memoryview) -> tuple[int, int, str] | None:
        if not self.pending:
            return None
        data, seglen, source = self.pending.popleft()
        buf[: len(data)] = data
        return len(data), min(seglen, len(data)), source

    @property
    def datagrams(self) -> list[bytes]:
        return [d for send in self.sends for d in send.datagrams]
