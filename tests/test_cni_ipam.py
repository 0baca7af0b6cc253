"""The on-disk address store: host-local's layout, exclusive, round-robin, persistent."""

from __future__ import annotations

import multiprocessing
import os
import threading
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from flanneld_py.cni.ipam import AddressStore, PoolExhausted
from flanneld_py.cni.models import Attachment, ErrorCode

SUBNET = IPv4Network("10.244.5.0/24")
GATEWAY = IPv4Address("10.244.5.1")


def owner(i: int) -> Attachment:
    return Attachment(f"ctr-{i}", "eth0")


def test_files_look_like_host_locals(tmp_path: Path) -> None:
    store = AddressStore(str(tmp_path), "cbr0")
    ip = store.allocate(owner(1), SUBNET, reserved=[GATEWAY])
    assert ip == IPv4Address("10.244.5.2")
    net_dir = tmp_path / "cbr0"
    assert (net_dir / "10.244.5.2").read_text() == "ctr-1\neth0"
    assert (net_dir / "last_reserved_ip.0").read_text() == "10.244.5.2"
    assert (net_dir / "lock").exists()


def test_allocation_skips_reserved_network_and_broadcast(tmp_path: Path) -> None:
    store = AddressStore(str(tmp_path), "n")
    tiny = IPv4Network("10.244.5.0/29")
    got = [store.allocate(owner(i), tiny, reserved=[GATEWAY]) for i in range(5)]
    assert [str(ip) for ip in got] == [f"10.244.5.{i}" for i in range(2, 7)]
    with pytest.raises(PoolExhausted) as caught:
        store.allocate(owner(9), tiny, reserved=[GATEWAY])
    assert caught.value.code == ErrorCode.ADDRESSES_EXHAUSTED and "10.244.5.0/29" in caught.value.msg


def test_round_robin_survives_a_restart(tmp_path: Path) -> None:
    first = AddressStore(str(tmp_path), "n")
    a = first.allocate(owner(1), SUBNET, reserved=[GATEWAY])
    b = first.allocate(owner(2), SUBNET, reserved=[GATEWAY])
    assert first.release(owner(1)) == [a]
    again = AddressStore(str(tmp_path), "n")  # a new daemon
    c = again.allocate(owner(3), SUBNET, reserved=[GATEWAY])
    assert c == b + 1, "a freed address is not handed out again right away"
    assert again.reservations() == {b: owner(2), c: owner(3)}


def test_allocation_wraps_around_to_freed_addresses(tmp_path: Path) -> None:
    store = AddressStore(str(tmp_path), "n")
    tiny = IPv4Network("10.244.5.0/29")
    got = [store.allocate(owner(i), tiny, reserved=[GATEWAY]) for i in range(5)]
    store.release(owner(1))
    assert store.allocate(owner(7), tiny, reserved=[GATEWAY]) == got[1]


def test_release_is_by_owner_and_idempotent(tmp_path: Path) -> None:
    store = AddressStore(str(tmp_path), "n")
    assert store.release(owner(1)) == []  # nothing there yet, not even the directory
    a = store.allocate(owner(1), SUBNET)
    b = store.allocate(Attachment("ctr-1", "net1"), SUBNET)
    assert store.lookup(owner(1)) == [a]
    assert store.release(owner(1)) == [a]
    assert store.release(owner(1)) == []
    assert store.reservations() == {b: Attachment("ctr-1", "net1")}


def test_rollback_frees_only_its_own_address(tmp_path: Path) -> None:
    store = AddressStore(str(tmp_path), "n")
    a = store.allocate(owner(1), SUBNET)
    assert not store.release_address(a, owner(2))
    assert store.release_address(a, owner(1))
    assert store.reservations() == {}


def test_gc_keeps_only_valid_attachments(tmp_path: Path) -> None:
    store = AddressStore(str(tmp_path), "n")
    ips = [store.allocate(owner(i), SUBNET) for i in range(4)]
    assert sorted(store.gc([owner(1), owner(3)])) == [ips[0], ips[2]]
    assert set(store.reservations()) == {ips[1], ips[3]}
    assert AddressStore(str(tmp_path), "empty").gc([]) == []


def test_host_locals_crlf_files_are_understood(tmp_path: Path) -> None:
    net_dir = tmp_path / "n"
    net_dir.mkdir()
    (net_dir / "10.244.5.9").write_text("ctr-old\r\neth0")
    (net_dir / "not-an-address").write_text("ignored")
    store = AddressStore(str(tmp_path), "n")
    assert store.reservations() == {IPv4Address("10.244.5.9"): Attachment("ctr-old", "eth0")}
    assert store.release(Attachment("ctr-old", "eth0")) == [IPv4Address("10.244.5.9")]


def test_threads_never_share_an_address(tmp_path: Path) -> None:
    store = AddressStore(str(tmp_path), "n")
    got: list[IPv4Address] = []
    lock = threading.Lock()

    def take(i: int) -> None:
        ip = AddressStore(str(tmp_path), "n").allocate(owner(i), SUBNET, reserved=[GATEWAY])
        with lock:
            got.append(ip)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 40 and len(store.reservations()) == 40


def _allocate_in_child(data_dir: str, i: int, out: "multiprocessing.Queue[str]") -> None:
    ip = AddressStore(data_dir, "n").allocate(owner(i), SUBNET, reserved=[GATEWAY])
    out.put(str(ip))


def test_processes_never_share_an_address(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_allocate_in_child, args=(str(tmp_path), i, out)) for i in range(12)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    got = [out.get(timeout=5) for _ in procs]
    assert len(set(got)) == 12
    assert sorted(os.listdir(tmp_path / "n")) == sorted(got + ["last_reserved_ip.0", "lock"])


SUBNET6 = IPv6Network("fd00:10:244:5::/64")
GATEWAY6 = IPv6Address("fd00:10:244:5::1")


def test_ipv6_files_and_ranges_look_like_host_locals(tmp_path: Path) -> None:
    # flannel's plugin hands host-local IPv4 as range set 0 and IPv6 as range set 1
    store = AddressStore(str(tmp_path), "cbr0")
    v4 = store.allocate(owner(1), SUBNET, reserved=[GATEWAY], range_index=0)
    v6 = store.allocate(owner(1), SUBNET6, reserved=[GATEWAY6], range_index=1)
    assert (v4, v6) == (IPv4Address("10.244.5.2"), IPv6Address("fd00:10:244:5::2"))
    net_dir = tmp_path / "cbr0"
    assert (net_dir / "fd00:10:244:5::2").read_text() == "ctr-1\neth0"
    assert (net_dir / "last_reserved_ip.0").read_text() == "10.244.5.2"
    assert (net_dir / "last_reserved_ip.1").read_text() == "fd00:10:244:5::2"
    assert store.lookup(owner(1)) == [v4, v6]


def test_ipv6_round_robin_and_release_cover_both_families(tmp_path: Path) -> None:
    store = AddressStore(str(tmp_path), "n")
    a = store.allocate(owner(1), SUBNET6, reserved=[GATEWAY6], range_index=1)
    store.allocate(owner(1), SUBNET, reserved=[GATEWAY], range_index=0)
    assert sorted(map(str, store.release(owner(1)))) == ["10.244.5.2", str(a)]
    again = AddressStore(str(tmp_path), "n")
    assert again.allocate(owner(2), SUBNET6, reserved=[GATEWAY6], range_index=1) == a + 1
    assert again.allocate(owner(3), SUBNET, reserved=[GATEWAY], range_index=0) == IPv4Address("10.244.5.3")


def test_ipv6_has_no_broadcast_and_gc_frees_it(tmp_path: Path) -> None:
    store = AddressStore(str(tmp_path), "n")
    tiny = IPv6Network("fd00:10:244:5::/126")  # ::1 gateway, ::2 and ::3 (no broadcast in IPv6)
    got = [store.allocate(owner(i), tiny, reserved=[GATEWAY6]) for i in range(2)]
    assert [str(ip) for ip in got] == ["fd00:10:244:5::2", "fd00:10:244:5::3"]
    with pytest.raises(PoolExhausted):
        store.allocate(owner(9), tiny, reserved=[GATEWAY6])
    assert store.gc([owner(1)]) == [got[0]]
    assert store.reservations() == {got[1]: owner(1)}


def test_host_local_ipv6_entries_are_read(tmp_path: Path) -> None:
    """host-local writes "<id>\\r\\n<ifname>"; an IPv6 file of its must count as a reservation."""
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "fd00:10:244:5::7").write_text("ctr-1\r\neth0")
    store = AddressStore(str(tmp_path), "n")
    assert store.lookup(owner(1)) == [IPv6Address("fd00:10:244:5::7")]
