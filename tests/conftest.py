"""Shared fixtures: a real etcd on loopback, one CNI node per module, and a guard against
leftover namespaces."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cni_helpers import CniNode
from flanneld_py.lab.etcd import EtcdMember


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _fresh_etcd(*args: str) -> Iterator[EtcdMember]:
    with tempfile.TemporaryDirectory(prefix="flanneld-etcd-") as workdir:
        member = EtcdMember("t", "127.0.0.1", workdir, client_port=_free_port(), peer_port=_free_port(),
                            tls_args=list(args))
        member.start()
        try:
            yield member
        finally:
            member.stop()


@pytest.fixture
def etcd() -> Iterator[EtcdMember]:
    """A fresh single-member etcd on 127.0.0.1 (random ports), removed afterwards."""
    with _fresh_etcd() as member:
        yield member


ETCD_USER, ETCD_PASSWORD = "flannel", "flannel-pw"


@pytest.fixture
def etcd_auth() -> Iterator[EtcdMember]:
    """:func:`etcd` with authentication on: ``ETCD_USER`` may read and write flannel's prefix, and an
    auth token lapses after 2 s without a request (etcd's default is 5 min)."""
    with _fresh_etcd("--auth-token-ttl=2") as member:
        for args in (("user", "add", "root:root-pw"), ("user", "add", f"{ETCD_USER}:{ETCD_PASSWORD}"),
                     ("role", "add", "flannel"),
                     ("role", "grant-permission", "flannel", "--prefix=true", "readwrite", "/coreos.com/network/"),
                     ("user", "grant-role", ETCD_USER, "flannel"), ("auth", "enable")):
            member.ctl(*args)
        yield member


@pytest.fixture(scope="module")
def cni_node() -> Iterator[CniNode]:
    """A node namespace with a CNI server, shared by one module's tests (each makes its own network)."""
    node = CniNode.create()
    try:
        yield node
    finally:
        node.close()


def _lab_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="session", autouse=True)
def no_leftover_namespaces() -> Iterator[None]:
    """Fail the run if any test left a network namespace behind.

    Compares the machine's namespaces before and after the session, so it can
    only be trusted when nothing else makes namespaces meanwhile; set
    FLANNELD_TEST_NS_GUARD=0 to turn it off while another run is going on.
    """
    if os.environ.get("FLANNELD_TEST_NS_GUARD") == "0":
        yield
        return
    before = _lab_namespaces()
    yield
    left = _lab_namespaces() - before
    assert not left, f"tests left network namespaces behind: {sorted(left)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root for network namespaces")
        for item in items:
            if "netns" in item.keywords:
                item.add_marker(skip)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Run with sudo from a user's checkout, the caches written there (pytest's, hypothesis')
    go back to the checkout's owner, as .ci/setup does with what it makes, so the user can
    remove them without sudo."""
    owner = config.rootpath.stat()
    if os.geteuid() != 0 or owner.st_uid == 0:
        return
    for name in (".pytest_cache", ".hypothesis"):
        path = config.rootpath / name
        if path.exists():
            subprocess.run(["chown", "-R", "--from=0", f"{owner.st_uid}:{owner.st_gid}", str(path)], check=False)
