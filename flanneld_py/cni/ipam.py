"""Pod addresses on disk, laid out like host-local's store.

``<data_dir>/<network>/<ip>`` holds ``<containerid>\\n<ifname>``; a reservation
*is* the file, created with ``O_EXCL`` so two allocators can never both win
an address. Every operation holds an ``fcntl.flock`` on ``<dir>/lock`` for
its whole run, so concurrent ADDs (threads of the daemon, or another
process using the same directory) see each other's reservations, and
``last_reserved_ip.0`` makes allocation round-robin across restarts, so a
freed address is not handed to the next pod right away.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network

from .models import Attachment, CniError, ErrorCode

__all__ = ["AddressStore", "PoolExhausted"]

LAST_RESERVED = "last_reserved_ip.0"
LOCK_FILE = "lock"


class PoolExhausted(CniError):
    def __init__(self, subnet: IPv4Network, network: str) -> None:
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

    def allocate(self, owner: Attachment, subnet: IPv4Network,
                 reserved: Iterable[IPv4Address] = ()) -> IPv4Address:
        """Reserve the next free host address of ``subnet`` for ``owner``."""
        skip = set(reserved)
        with self._locked():
            for candidate in self._candidates(subnet):
                if candidate in skip:
                    continue
                if self._create(candidate, owner):
                    self._write_last_reserved(candidate)
                    return candidate
        raise PoolExhausted(subnet, os.path.basename(self.dir))

    def _candidates(self, subnet: IPv4Network) -> Iterator[IPv4Address]:
        """Host addresses, starting after the last one handed out, wrapping around once."""
        first = int(subnet.network_address) + 1
        last = int(subnet.broadcast_address) - 1
        if last < first:
            return
        previous = self._read_last_reserved()
        start = int(previous) + 1 if previous is not None and first <= int(previous) < last else first
        for value in range(start, last + 1):
            yield IPv4Address(value)
        for value in range(first, start):
            yield IPv4Address(value)

    def _create(self, ip: IPv4Address, owner: Attachment) -> bool:
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

    def _read_last_reserved(self) -> IPv4Address | None:
        try:
            with open(os.path.join(self.dir, LAST_RESERVED), encoding="ascii") as f:
                return IPv4Address(f.read().strip())
        except (OSError, ValueError):
            return None

    def _write_last_reserved(self, ip: IPv4Address) -> None:
        with open(os.path.join(self.dir, LAST_RESERVED), "w", encoding="ascii") as f:
            f.write(str(ip))

    # --- reading and releasing ---------------------------------------------

    def reservations(self) -> dict[IPv4Address, Attachment]:
        """Every reserved address and its owner (files that are not addresses are skipped)."""
        if not os.path.isdir(self.dir):
            return {}
        with self._locked():
            return dict(self._scan())

    def _scan(self) -> Iterator[tuple[IPv4Address, Attachment]]:
        for name in os.listdir(self.dir):
            try:
                ip = IPv4Address(name)
            except ValueError:
                continue
            owner = self._owner(ip)
            if owner is not None:
                yield ip, owner

    def _owner(self, ip: IPv4Address) -> Attachment | None:
        try:
            with open(os.path.join(self.dir, str(ip)), encoding="utf-8", newline="") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        container_id, _, ifname = text.partition("\n")
        # host-local writes "\r\n" between the two; accept both.
        return Attachment(container_id.strip(), ifname.strip())

    def lookup(self, owner: Attachment) -> list[IPv4Address]:
        return sorted(ip for ip, who in self.reservations().items() if who == owner)

    def release(self, owner: Attachment) -> list[IPv4Address]:
        """Free every address ``owner`` holds; none held is fine (DEL is idempotent)."""
        if not os.path.isdir(self.dir):
            return []
        with self._locked():
            freed = [ip for ip, who in self._scan() if who == owner]
            for ip in freed:
                self._unlink(ip)
        return freed

    def release_address(self, ip: IPv4Address, owner: Attachment) -> bool:
        """Free one address, only if ``owner`` still holds it (used to roll back an ADD)."""
        with self._locked():
            if self._owner(ip) != owner:
                return False
            self._unlink(ip)
            return True

    def gc(self, valid: Iterable[Attachment]) -> list[IPv4Address]:
        """Free every address whose owner is not in ``valid``."""
        keep = set(valid)
        if not os.path.isdir(self.dir):
            return []
        with self._locked():
            stale = [ip for ip, who in self._scan() if who not in keep]
            for ip in stale:
                self._unlink(ip)
        return stale

    def _unlink(self, ip: IPv4Address) -> None:
        try:
            os.unlink(os.path.join(self.dir, str(ip)))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
