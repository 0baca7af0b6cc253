"""``/run/flannel/subnet.env``: flannel's hand-off from the daemon to the CNI plugin."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

__all__ = ["SubnetEnv", "SubnetEnvError"]


class SubnetEnvError(ValueError):
    """The subnet file is missing a variable or holds a bad value."""


@dataclass(frozen=True, slots=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Network
    mtu: int
    ipmasq: bool

    @property
    def gateway(self) -> IPv4Interface:
        """The node's first host address, with the subnet's prefix: ``10.244.7.1/24``."""
        return IPv4Interface((int(self.subnet.network_address) + 1, self.subnet.prefixlen))

    def render(self) -> str:
        return (
            f"FLANNEL_NETWORK={self.network}\n"
            f"FLANNEL_SUBNET={self.gateway}\n"
            f"FLANNEL_MTU={self.mtu}\n"
            f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n"
        )

    @classmethod
    def parse(cls, text: str) -> SubnetEnv:
        values: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip().strip('"')
        try:
            network = IPv4Network(values["FLANNEL_NETWORK"])
            subnet = IPv4Interface(values["FLANNEL_SUBNET"]).network
            mtu = int(values["FLANNEL_MTU"])
            ipmasq = values.get("FLANNEL_IPMASQ", "false").lower() == "true"
        except KeyError as exc:
            raise SubnetEnvError(f"subnet file lacks {exc.args[0]}") from None
        except ValueError as exc:
            raise SubnetEnvError(f"subnet file has a bad value: {exc}") from None
        return cls(network, subnet, mtu, ipmasq)
