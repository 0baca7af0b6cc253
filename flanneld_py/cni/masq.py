"""Per-pod masquerade, like the bridge plugin's ``ipMasq``.

flannel's plugin delegates to ``bridge`` with ``ipMasq = !FLANNEL_IPMASQ``:
when the daemon does not masquerade for the whole node (``--ip-masq``), each
pod gets its own nat chain. Ours accepts traffic to the cluster network and
masquerades everything else but multicast. The chain is named after the
attachment, so DEL and GC find it without knowing the pod's address.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from ..firewall import Iptables, IptablesError
from .models import Attachment, CniError, ErrorCode

__all__ = ["PodMasquerade", "chain_name"]

TABLE = "nat"
CHAIN_PREFIX = "FLP-"
MULTICAST = "224.0.0.0/4"


def chain_name(network: str, owner: Attachment) -> str:
    """``FLP-`` and 24 hex digits: 28 characters, iptables' limit."""
    digest = hashlib.sha256(f"{network}/{owner.container_id}/{owner.ifname}".encode()).hexdigest()
    return CHAIN_PREFIX + digest[:24]


def _comment(network: str, owner: Attachment) -> str:
    return f"name: {network} id: {owner.container_id}"


class PodMasquerade:
    def __init__(self, iptables: Iptables) -> None:
        self.iptables = iptables

    def setup(self, network: str, owner: Attachment, ip: IPv4Address, cluster: IPv4Network) -> None:
        """One atomic ``iptables-restore``: the pod's chain and the jump to it."""
        chain = chain_name(network, owner)
        comment = f'-m comment --comment "{_comment(network, owner)}"'
        try:
            self.iptables.restore(TABLE, [
                f":{chain} - [0:0]",
                f"-A {chain} -d {cluster} {comment} -j ACCEPT",
                f"-A {chain} ! -d {MULTICAST} {comment} -j MASQUERADE",
                f"-A POSTROUTING -s {ip}/32 {comment} -j {chain}",
            ])
        except IptablesError as exc:
            raise CniError(ErrorCode.FIREWALL_FAILED, f"cannot set up masquerading for {ip}", str(exc)) from exc

    def present(self, network: str, owner: Attachment) -> bool:
        try:
            return self.iptables.chain_exists(TABLE, chain_name(network, owner))
        except IptablesError as exc:
            raise CniError(ErrorCode.FIREWALL_FAILED, "cannot read the nat table", str(exc)) from exc

    def teardown(self, network: str, owner: Attachment) -> bool:
        """Remove the pod's chain and every jump to it; False if there was none."""
        try:
            rules = self.iptables.list_rules(TABLE)
        except IptablesError as exc:
            raise CniError(ErrorCode.FIREWALL_FAILED, "cannot list the nat table", str(exc)) from exc
        return bool(self._remove([chain_name(network, owner)], rules))

    def gc(self, network: str, valid: Iterable[Attachment]) -> list[str]:
        """Remove this network's pod chains whose attachment is not in ``valid``."""
        keep = {chain_name(network, owner) for owner in valid}
        try:
            rules = self.iptables.list_rules(TABLE)
        except IptablesError:  # no iptables here: no chains of ours either
            return []
        return self._remove(sorted(_chains_of(network, rules) - keep), rules)

    def _remove(self, chains: list[str], rules: list[str]) -> list[str]:
        present = [c for c in chains if f"-N {c}" in rules]
        lines = [f"-D {line[3:]}" for line in rules
                 if line.startswith("-A POSTROUTING ") and line.rsplit(" ", 1)[-1] in chains]
        for chain in present:
            lines += [f":{chain} - [0:0]", f"-X {chain}"]
        if lines:
            try:
                self.iptables.restore(TABLE, lines)
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
