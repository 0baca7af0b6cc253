"""Per-pod masquerade, like the bridge plugin's ``ipMasq``.

flannel's plugin delegates to ``bridge`` with ``ipMasq = !FLANNEL_IPMASQ``:
when the daemon does not masquerade for the whole node (``--ip-masq``), each
pod gets its own nat chain. Ours accepts traffic to the cluster network and
masquerades everything else but multicast. The chain is named after the
attachment, so DEL and GC find it without knowing the pod's address. An
IPv6 address gets the same chain in ip6tables' nat table, as the bridge
plugin does it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from ..firewall import Iptables, IptablesError
from .models import Attachment, CniError, ErrorCode

__all__ = ["PodMasquerade", "chain_name"]

TABLE = "nat"
CHAIN_PREFIX = "FLP-"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
HOST_PREFIX = {4: 32, 6: 128}
BOTH = (4, 6)


def chain_name(network: str, owner: Attachment) -> str:
    """``FLP-`` and 24 hex digits: 28 characters, iptables' limit."""
    digest = hashlib.sha256(f"{network}/{owner.container_id}/{owner.ifname}".encode()).hexdigest()
    return CHAIN_PREFIX + digest[:24]


def _comment(network: str, owner: Attachment) -> str:
    return f"name: {network} id: {owner.container_id}"


class PodMasquerade:
    def __init__(self, iptables: Iptables) -> None:
        """``iptables`` for IPv4; its ``for_ipv6()`` twin serves IPv6 addresses."""
        self.tables = {4: iptables, 6: iptables.for_ipv6()}

    def setup(self, network: str, owner: Attachment, ip: IPv4Address | IPv6Address,
              cluster: IPv4Network | IPv6Network) -> None:
        """One atomic ``ip(6)tables-restore`` for ``ip``'s family: the pod's chain and the jump to it."""
        chain = chain_name(network, owner)
        comment = f'-m comment --comment "{_comment(network, owner)}"'
        try:
            self.tables[ip.version].restore(TABLE, [
                f":{chain} - [0:0]",
                f"-A {chain} -d {cluster} {comment} -j ACCEPT",
                f"-A {chain} ! -d {MULTICAST[ip.version]} {comment} -j MASQUERADE",
                f"-A POSTROUTING -s {ip}/{HOST_PREFIX[ip.version]} {comment} -j {chain}",
            ])
        except IptablesError as exc:
            raise CniError(ErrorCode.FIREWALL_FAILED, f"cannot set up masquerading for {ip}", str(exc)) from exc

    def present(self, network: str, owner: Attachment, version: int = 4) -> bool:
        try:
            return self.tables[version].chain_exists(TABLE, chain_name(network, owner))
        except IptablesError as exc:
            raise CniError(ErrorCode.FIREWALL_FAILED, "cannot read the nat table", str(exc)) from exc

    def teardown(self, network: str, owner: Attachment, versions: Sequence[int] = (4,)) -> bool:
        """Remove the pod's chain and every jump to it in each family's table; False if there was none."""
        removed = False
        for version in versions:
            try:
                rules = self.tables[version].list_rules(TABLE)
            except IptablesError as exc:
                raise CniError(ErrorCode.FIREWALL_FAILED, "cannot list the nat table", str(exc)) from exc
            removed |= bool(self._remove(version, [chain_name(network, owner)], rules))
        return removed

    def gc(self, network: str, valid: Iterable[Attachment]) -> list[str]:
        """Remove this network's pod chains whose attachment is not in ``valid`` (both families)."""
        keep = {chain_name(network, owner) for owner in valid}
        removed: list[str] = []
        for version in BOTH:
            try:
                rules = self.tables[version].list_rules(TABLE)
            except IptablesError:  # no ip(6)tables here: no chains of ours either
                continue
            removed += self._remove(version, sorted(_chains_of(network, rules) - keep), rules)
        return removed

    def _remove(self, version: int, chains: list[str], rules: list[str]) -> list[str]:
        present = [c for c in chains if f"-N {c}" in rules]
        lines = [f"-D {line[3:]}" for line in rules
                 if line.startswith("-A POSTROUTING ") and line.rsplit(" ", 1)[-1] in chains]
        for chain in present:
            lines += [f":{chain} - [0:0]", f"-X {chain}"]
        if lines:
            try:
                self.tables[version].restore(TABLE, lines)
            except IptablesError as exc:
                raise CniError(ErrorCode.FIREWALL_FAILED, "cannot remove pod masquerading", str(exc)) from exc
        return present


def _chains_of(network: str, rules: list[str]) -> set[str]:
    """Our chains whose rules or jumps carry ``network``'s comment (``iptables -S`` lines)."""
    marker = f'"name: {network} id: '
    chains = set()
    for line in rules:
        if marker not in line:
            continue
        if line.startswith(f"-A {CHAIN_PREFIX}"):
            chains.add(line.split(" ", 2)[1])
        elif line.startswith("-A POSTROUTING ") and f"-j {CHAIN_PREFIX}" in line:
            chains.add(line.rsplit(" ", 1)[-1])
    return chains
