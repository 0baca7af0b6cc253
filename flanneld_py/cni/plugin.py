"""The daemon side of flannel-py: one blocking method per CNI command.

It ties the subnet file, the address store, the kernel wiring and the
masquerade together, and nothing else: parsing lives in ``models``, the
transport in ``server``. Methods block (files, netlink, iptables), so the
server calls ``handle`` from worker threads, several at a time.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_interface
from typing import Any

from ..core.subnetenv import SubnetEnv, SubnetEnvError
from ..firewall import Iptables
from ..netlink import Netlink
from .ipam import AddressStore
from .masq import PodMasquerade
from .models import Attachment, CniError, ErrorCode, IPConfig, NetConf, Request, Result, Route, version_info
from .wiring import PodLink, PodWiring, host_veth_name

__all__ = ["CniPlugin", "LeaseSource", "Unplugger"]

log = logging.getLogger(__name__)

DEFAULT_ROUTES: dict[int, IPv4Network | IPv6Network] = {4: IPv4Network("0.0.0.0/0"), 6: IPv6Network("::/0")}
CONTAINER_INTERFACE = 1  # its index in the result's interfaces (the host veth is 0)
# The daemon's view of what the subnet file should say; None while it holds no lease.
LeaseSource = Callable[[], SubnetEnv | None]


class CniPlugin:
    def __init__(self, node: Netlink, *, iptables: Iptables | None = None,
                 current_lease: LeaseSource | None = None, background_unplug: bool = True) -> None:
        """``node``: netlink for the namespace that holds the bridge (the daemon's own).

        ``current_lease`` lets STATUS tell a stale subnet file from a current one.
        ``background_unplug``: DEL answers once the pod is queued for removal (see ``Unplugger``).
        """
        self.wiring = PodWiring(node)
        self.masq = PodMasquerade(iptables or Iptables())
        self.current_lease = current_lease
        self.unplugger = Unplugger() if background_unplug else None
        self._attachments = AttachmentLocks()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the removals still queued."""
        if self.unplugger is not None:
            self.unplugger.close(timeout)

    def handle(self, request: Request) -> dict[str, Any] | None:
        """The command's stdout object (None: print nothing), or raise ``CniError``."""
        handler: Callable[[Request], dict[str, Any] | None] = {
            "ADD": self.cmd_add,
            "DEL": self.cmd_del,
            "CHECK": self.cmd_check,
            "STATUS": self.cmd_status,
            "GC": self.cmd_gc,
            "VERSION": self.cmd_version,
        }[request.command]
        return handler(request)

    def cmd_version(self, request: Request) -> dict[str, Any]:
        """The shim answers VERSION itself; this is for callers that come straight here."""
        return version_info(request.config.cni_version)

    # --- ADD ---------------------------------------------------------------

    def cmd_add(self, request: Request) -> dict[str, Any]:
        conf = request.config
        env = load_subnet_env(conf.subnet_file)
        store = AddressStore(conf.data_dir, conf.name)
        owner = request.attachment
        host = host_veth_name(owner)
        self._settle(host, request.netns)
        with self._attachments.hold(host), ExitStack() as undo:
            ips = []
            # host-local numbers its range sets in the order flannel's plugin lists them: IPv4, IPv6
            for range_index, family in enumerate(env.ranges):
                ip = store.allocate(owner, family.subnet, reserved=[family.gateway.ip], range_index=range_index)
                undo.callback(store.release_address, ip, owner)
                ips.append(ip)
            link = pod_link(request, env, ips)
            wired = self.wiring.add(link, undo)
            if masquerades(conf, env):
                for ip, family in zip(ips, env.ranges, strict=True):
                    self.masq.setup(conf.name, owner, ip, family.network)
                    undo.callback(self.masq.teardown, conf.name, owner, (ip.version,))
            undo.pop_all()
        result = Result(
            interfaces=(wired.host, wired.container),
            ips=tuple(IPConfig(address, gateway.ip, interface=CONTAINER_INTERFACE)
                      for address, gateway in zip(link.addresses, link.gateways, strict=True)),
            routes=link.routes,
            dns=conf.dns,
        )
        return result.render(conf.cni_version)

    # --- DEL ---------------------------------------------------------------

    def cmd_del(self, request: Request) -> None:
        """Undo ADD as far as anything is left; nothing left is success."""
        conf = request.config
        try:
            env = load_subnet_env(conf.subnet_file)
            masq = families(env) if masquerades(conf, env) else ()
        except CniError:  # no subnet file to tell: look for a chain in both tables
            masq = (4, 6) if conf.ip_masq is not False else ()
        host = host_veth_name(request.attachment)
        unplug = functools.partial(self._unplug, host, request.attachment, conf, masq)
        if self.unplugger is None:
            unplug()
        else:
            self.unplugger.submit(host, request.netns, unplug)
        return None

    def _unplug(self, host: str, owner: Attachment, conf: NetConf, masq: tuple[int, ...]) -> None:
        with self._attachments.hold(host):  # an ADD of this pod still at work finishes first
            self._remove(host, owner, conf, masq)

    def _remove(self, host: str, owner: Attachment, conf: NetConf, masq: tuple[int, ...]) -> None:
        """``masq``: the address families whose nat table may hold the pod's chain."""
        # The veth goes first: its address must not be handed out while the old pod still holds it.
        self.wiring.delete(host)
        try:
            if masq:
                self.masq.teardown(conf.name, owner, masq)
        finally:  # a chain left behind must not keep the address (GC sweeps the chain)
            AddressStore(conf.data_dir, conf.name).release(owner)

    def _settle(self, host: str, netns: str) -> None:
        """Wait for a queued removal that could collide with this attachment."""
        if self.unplugger is not None:
            self.unplugger.wait_for(host, netns)

    # --- CHECK -------------------------------------------------------------

    def cmd_check(self, request: Request) -> None:
        conf = request.config
        assert conf.prev_result is not None  # parse_request insists
        prev = Result.parse(conf.prev_result)
        env = load_subnet_env(conf.subnet_file)
        self._settle(host_veth_name(request.attachment), request.netns)
        held = AddressStore(conf.data_dir, conf.name).lookup(request.attachment)
        ips = []
        for family in env.ranges:
            mine = [ip for ip in held if ip in family.subnet]
            if not mine:
                raise CniError(ErrorCode.CHECK_MISMATCH, f"no address in {family.subnet} is reserved for "
                                                         f"container {request.container_id} {request.ifname}")
            ips.append(mine[0])
        link = pod_link(request, env, ips)
        reported = {ip.address.ip for ip in prev.ips}
        for ip in ips:
            if ip not in reported:
                raise CniError(ErrorCode.CHECK_MISMATCH, f"prevResult lacks the container's reserved address {ip}")
        self.wiring.check(link, prev)
        if masquerades(conf, env):
            for version in families(env):
                if not self.masq.present(conf.name, request.attachment, version):
                    raise CniError(ErrorCode.CHECK_MISMATCH,
                                   f"the IPv{version} masquerade chain of {request.container_id} is missing")
        return None

    # --- STATUS and GC -----------------------------------------------------

    def cmd_status(self, request: Request) -> None:
        """Error 50 while no ADD could succeed: no subnet file, a bad one, or one we did not write."""
        try:
            env = load_subnet_env(request.config.subnet_file)
        except CniError as exc:
            raise CniError(ErrorCode.NOT_AVAILABLE, exc.msg, exc.details) from None
        if self.current_lease is not None:
            lease = self.current_lease()
            if lease is None:
                raise CniError(ErrorCode.NOT_AVAILABLE, "flanneld-py holds no subnet lease for this node")
            if lease != env:
                raise CniError(ErrorCode.NOT_AVAILABLE,
                               f"the subnet file {request.config.subnet_file} is stale: it says "
                               f"{_subnets(env)}, the lease is {_subnets(lease)}")
        return None

    def cmd_gc(self, request: Request) -> None:
        conf = request.config
        if conf.valid_attachments is None:
            raise CniError(ErrorCode.INVALID_CONFIG, "GC needs cni.dev/valid-attachments in the config")
        if self.unplugger is not None:
            self.unplugger.wait_all()
        self.wiring.sweep(conf.bridge, {host_veth_name(owner) for owner in conf.valid_attachments})
        AddressStore(conf.data_dir, conf.name).gc(conf.valid_attachments)
        self.masq.gc(conf.name, conf.valid_attachments)
        return None


def load_subnet_env(path: str) -> SubnetEnv:
    """The subnet file, or the CNI error that says why there is none yet."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CniError(ErrorCode.TRY_AGAIN_LATER, f"the subnet file {path} does not exist yet",
                       "flanneld-py writes it once it holds a subnet lease for this node; "
                       "check that it runs here (journalctl -u flanneld-py)") from None
    except OSError as exc:
        raise CniError(ErrorCode.IO_FAILURE, f"cannot read the subnet file {path}", str(exc)) from None
    try:
        return SubnetEnv.parse(text)
    except SubnetEnvError as exc:
        raise CniError(ErrorCode.SUBNET_FILE_INVALID, f"the subnet file {path} is invalid: {exc}") from None


def pod_link(request: Request, env: SubnetEnv, ips: list[IPv4Address | IPv6Address]) -> PodLink:
    """The wiring for one attachment: ``ips`` holds one address per family of ``env.ranges``."""
    conf: NetConf = request.config
    routes = []
    for family in env.ranges:
        # flannel's delegation: each Network through the bridge, and with isDefaultGateway the
        # family's default route as well (the bridge plugin's addition)
        routes.append(Route(family.network, family.gateway.ip))
        if conf.is_default_gateway:
            routes.append(Route(DEFAULT_ROUTES[family.network.version], family.gateway.ip))
    return PodLink(
        netns=request.netns,
        ifname=request.ifname,
        host_ifname=host_veth_name(request.attachment),
        bridge=conf.bridge,
        gateways=tuple(family.gateway for family in env.ranges),
        addresses=tuple(ip_interface((ip, family.subnet.prefixlen))
                        for ip, family in zip(ips, env.ranges, strict=True)),
        routes=tuple(routes),
        mtu=env.mtu,
        hairpin=conf.hairpin_mode,
        forwarding=conf.is_default_gateway,
        clusters=tuple(family.network for family in env.ranges),
        gso_max_size=conf.gso_max_size,
    )


def families(env: SubnetEnv) -> tuple[int, ...]:
    """The IP versions the node's pods have (4, 6 or both)."""
    return tuple(family.network.version for family in env.ranges)


def _subnets(env: SubnetEnv) -> str:
    return " and ".join(str(family.subnet) for family in env.ranges)


def masquerades(conf: NetConf, env: SubnetEnv) -> bool:
    """flannel's rule: the plugin masquerades when the daemon does not (``!FLANNEL_IPMASQ``)."""
    return conf.ip_masq if conf.ip_masq is not None else not env.ipmasq


class AttachmentLocks:
    """One lock per attachment (by host veth name), so an ADD and the removal after a DEL of
    the same pod never interleave.

    That happens when a runtime gives up on an ADD (the shim was killed, or timed out)
    while the daemon still works on it, and sends DEL at once: without the lock the
    DEL could free the address and the ADD then finish wiring a pod that holds it.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


class Unplugger:
    """Removes pods after DEL has answered, one at a time, on a thread of its own.

    Deleting a veth makes the kernel wait for an RCU grace period and for
    every reference to drop: 10-20 ms in which the runtime would sit idle,
    and the runtime usually destroys the pod's namespace right after DEL,
    which takes the veth along anyway. So DEL queues the removal (veth, then
    masquerade, then address: an address is free only once no pod holds it)
    and answers. Anything that could collide with a queued removal (an ADD
    or CHECK with the same interface or namespace, a GC) waits for it first.
    If the daemon dies meanwhile, GC frees the address later.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, Callable[[], None]] | None] = queue.SimpleQueue()
        self._pending: dict[str, tuple[str, threading.Event]] = {}  # host veth -> (netns, done)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="cni-unplug", daemon=True)
        self._thread.start()

    def submit(self, host: str, netns: str, job: Callable[[], None]) -> None:
        with self._lock:
            earlier = self._pending.get(host)
            if earlier is not None:  # a repeated DEL: the queued one does it all
                return
            self._pending[host] = (netns, threading.Event())
        self._queue.put((host, job))

    def wait_for(self, host: str, netns: str, timeout: float = 30.0) -> None:
        """Wait for queued removals of ``host``, of anything in ``netns``, or of pods whose netns is unknown."""
        with self._lock:
            waits = [done for name, (ns, done) in self._pending.items() if name == host or not ns or ns == netns]
        for done in waits:
            done.wait(timeout)

    def wait_all(self, timeout: float = 30.0) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.wait_all(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            host, job = item
            try:
                job()
            except Exception:  # noqa: BLE001 - logged; GC frees what is left
                log.exception("removing %s after DEL failed; GC will free its address", host)
            with self._idle:
                _, done = self._pending.pop(host)
                done.set()
                self._idle.notify_all()
