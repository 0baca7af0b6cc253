"""Pod addresses on disk, laid out like host-local's store.

``<data_dir>/<network>/<ip>`` holds ``<containerid>\\n<ifname>`` (IPv4 and IPv6
alike, the file named by the address in its short form); a reservation
*is* the file, created with ``O_EXCL`` so two allocators can never both win
an address. Every operation holds an ``fcntl.flock`` on ``<dir>/lock`` for
its whole run, so concurrent ADDs (threads of the daemon, or another
process using the same directory) see each other's reservations, and
``last_reserved_ip.<n>`` (one per range, numbered as host-local numbers its
range sets: IPv4 first) makes allocation round-robin across restarts, so a
freed address is not handed to the next pod right away.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from .models import Attachment, CniError, ErrorCode

__all__ = ["AddressStore", "PoolExhausted"]

LAST_RESERVED = "last_reserved_ip."
LOCK_FILE = "lock"

Address = IPv4Address | IPv6Address
Subnet = IPv4Network | IPv6Network


class PoolExhausted(CniError):
    def __init__(self, subnet: Subnet, network: str) -> None:
        super().__init__(ErrorCode.ADDRESSES_EXHAUSTED,
                         f"no free address left in {subnet} for network {network!r}",
                         "every pod address of this node's subnet is taken: delete pods, "
                         "or give the node a larger subnet (SubnetLen in the flannel network config)")


class AddressStore:
    """The address reservations of one CNI network on this node."""

    def __init__(self, data_dir: str, network: str) -> None:
        self.dir = os.path.join(data_dir, network)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        fd = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def allocate(self, owner: Attachment, subnet: Subnet,
                 reserved: Iterable[Address] = (), range_index: int = 0) -> Address:
        """Reserve the next free host address of ``subnet`` for ``owner``.

        ``range_index`` is host-local's range-set number, which names the
        ``last_reserved_ip.<n>`` file: 0 for the first family the node has, 1 for the second.
        """
        skip = set(reserved)
        with self._locked():
            for candidate in self._candidates(subnet, range_index):
                if candidate in skip:
                    continue
                if self._create(candidate, owner):
                    self._write_last_reserved(candidate, range_index)
                    return candidate
        raise PoolExhausted(subnet, os.path.basename(self.dir))

    def _candidates(self, subnet: Subnet, range_index: int) -> Iterator[Address]:
        """Host addresses, starting after the last one handed out, wrapping around once.

        As host-local: from the subnet's address + 1 to its last address, less the
        broadcast address for IPv4 (IPv6 has none).
        """
        first = int(subnet.network_address) + 1
        last = int(subnet.broadcast_address) - (1 if subnet.version == 4 else 0)
        if last < first:
            return
        previous = self._read_last_reserved(range_index)
        start = first
        if previous is not None and previous.version == subnet.version and first <= int(previous) < last:
            start = int(previous) + 1
        make = IPv4Address if subnet.version == 4 else IPv6Address
        for value in range(start, last + 1):
            yield make(value)
        for value in range(first, start):
            yield make(value)

    def _create(self, ip: Address, owner: Attachment) -> bool:
        try:
            fd = os.open(os.path.join(self.dir, str(ip)), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{owner.container_id}\n{owner.ifname}".encode())
        except OSError:
            os.close(fd)
            os.unlink(os.path.join(self.dir, str(ip)))
            raise
        os.close(fd)
        return True

    def _read_last_reserved(self, range_index: int) -> Address | None:
        try:
            with open(os.path.join(self.dir, f"{LAST_RESERVED}{range_index}"), encoding="ascii") as f:
                return ip_address(f.read().strip())
        except (OSError, ValueError):
            return None

    def _write_last_reserved(self, ip: Address, range_index: int) -> None:
        with open(os.path.join(self.dir, f"{LAST_RESERVED}{range_index}"), "w", encoding="ascii") as f:
            f.write(str(ip))

    # --- reading and releasing ---------------------------------------------

    def reservations(self) -> dict[Address, Attachment]:
        """Every reserved address and its owner (files that are not addresses are skipped)."""
        if not os.path.isdir(self.dir):
            return {}
        with self._locked():
            return dict(self._scan())

    def _scan(self) -> Iterator[tuple[Address, Attachment]]:
        for name in os.listdir(self.dir):
            try:
                ip = ip_address(name)
            except ValueError:
                continue
            owner = self._owner(ip)
            if owner is not None:
                yield ip, owner

    def _owner(self, ip: Address) -> Attachment | None:
        try:
            with open(os.path.join(self.dir, str(ip)), encoding="utf-8", newline="") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        container_id, _, ifname = text.partition("\n")
        # host-local writes "\r\n" between the two; accept both.
        return Attachment(container_id.strip(), ifname.strip())

    def lookup(self, owner: Attachment) -> list[Address]:
        """The addresses ``owner`` holds, IPv4 first."""
        return sorted((ip for ip, who in self.reservations().items() if who == owner),
                      key=lambda ip: (ip.version, int(ip)))

    def release(self, owner: Attachment) -> list[Address]:
        """Free every address ``owner`` holds; none held is fine (DEL is idempotent)."""
        if not os.path.isdir(self.dir):
            return []
        with self._locked():
            freed = [ip for ip, who in self._scan() if who == owner]
            for ip in freed:
                self._unlink(ip)
        return freed

    def release_address(self, ip: Address, owner: Attachment) -> bool:
        """Free one address, only if ``owner`` still holds it (used to roll back an ADD)."""
        with self._locked():
            if self._owner(ip) != owner:
                return False
            self._unlink(ip)
            return True

    def gc(self, valid: Iterable[Attachment]) -> list[Address]:
        """Free every address whose owner is not in ``valid``."""
        keep = set(valid)
        if not os.path.isdir(self.dir):
            return []
        with self._locked():
            stale = [ip for ip, who in self._scan() if who not in keep]
            for ip in stale:
                self._unlink(ip)
        return stale

    def _unlink(self, ip: Address) -> None:
        try:
            os.unlink(os.path.join(self.dir, str(ip)))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
