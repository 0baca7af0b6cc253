"""Node settings that leave the overlay dead although the daemon is fine.

flannel leaves both to the host, and so does flanneld-py; what it adds is saying so:

* ``net.ipv4.ip_forward=0``: the kernel forwards nothing, so no pod traffic leaves
  or enters the node. Fatal for the overlay: ``/healthz`` answers 503. With IPv6
  enabled in the network config, ``net.ipv6.conf.all.forwarding=0`` likewise.
* the filter table's FORWARD policy is DROP (Docker sets it) and flanneld-py's
  FORWARD accept rules are not in place (``--iptables-forward-rules=false``, or
  iptables failed): pod traffic between nodes is dropped unless the host's own
  rules accept it, which the daemon cannot judge, so ``/healthz`` stays 200 and
  says so in its body.

:func:`judge_node` is the pure verdict; :class:`NodeDoctor` reads the facts every
``interval`` seconds (the first time at start-up), logs each problem once when it
appears and once when it clears, and keeps the current list for status, metrics
and health.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..firewall import Iptables, IptablesError

__all__ = ["FORWARD_POLICY_DROP", "IPV6_FORWARDING_DISABLED", "IP_FORWARD_DISABLED", "PROBLEMS", "NodeDoctor",
           "NodeProblem", "forward_policy", "judge_node"]

log = logging.getLogger(__name__)

IP_FORWARD_DISABLED = "ip_forward_disabled"
FORWARD_POLICY_DROP = "forward_policy_drop"
IPV6_FORWARDING_DISABLED = "ipv6_forwarding_disabled"
# every code, for metrics that are 0 when fine
PROBLEMS = (IP_FORWARD_DISABLED, FORWARD_POLICY_DROP, IPV6_FORWARDING_DISABLED)
IP_FORWARD_PATH = "/proc/sys/net/ipv4/ip_forward"
IPV6_FORWARDING_PATH = "/proc/sys/net/ipv6/conf/all/forwarding"


@dataclass(frozen=True, slots=True)
class NodeProblem:
    """``code`` for metrics, ``message`` says what to do; ``fatal``: the overlay cannot work."""

    code: str
    message: str
    fatal: bool


def judge_node(ip_forward: str | None, policy: str | None, forward_rules_in_place: bool | None,
               ipv6_forwarding: str | None = None) -> list[NodeProblem]:
    """Problems from the facts: the ``ip_forward`` sysctl's text, the FORWARD policy
    (``ACCEPT``/``DROP``; None: unknown), whether our accept rules are in place
    (None: not known yet) and, on a node with IPv6 pods, the
    ``net.ipv6.conf.all.forwarding`` sysctl's text (None: IPv6 off, or unknown).
    Unknown facts give no problem."""
    problems = [problem for problem in (
        _forwarding_off(IP_FORWARD_DISABLED, "net.ipv4.ip_forward", ip_forward, "pod traffic"),
        _forwarding_off(IPV6_FORWARDING_DISABLED, "net.ipv6.conf.all.forwarding", ipv6_forwarding,
                        "IPv6 pod traffic"),
    ) if problem is not None]
    if policy == "DROP" and forward_rules_in_place is False:
        problems.append(NodeProblem(
            FORWARD_POLICY_DROP,
            "the FORWARD chain's policy is DROP and flanneld-py's FORWARD accept rules are not in place, so "
            "pod traffic between nodes is dropped unless the host's own rules accept the Network; run with "
            "--iptables-forward-rules (the default) or accept the Network in FORWARD",
            fatal=False))
    return problems


def _forwarding_off(code: str, sysctl: str, value: str | None, what: str) -> NodeProblem | None:
    """A fatal problem when a forwarding sysctl reads 0."""
    if value is None or value.strip() != "0":
        return None
    return NodeProblem(code, f"{sysctl} is 0, so this node forwards no {what}; run "
                             f"`sysctl -w {sysctl}=1` and keep it in /etc/sysctl.d/", fatal=True)


def forward_policy(rules: list[str]) -> str | None:
    """The policy from ``iptables -S FORWARD`` lines (``-P FORWARD DROP``)."""
    for line in rules:
        parts = line.split()
        if parts[:2] == ["-P", "FORWARD"] and len(parts) == 3:
            return parts[2]
    return None


def read_ip_forward(path: str = IP_FORWARD_PATH) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


class NodeDoctor:
    """Checks the node every ``interval`` seconds; ``problems`` is the last verdict.

    ``forward_rules_in_place`` says whether our FORWARD accept rules are installed
    (None until known; then the policy is only read when they are not).
    ``ipv6_enabled`` says whether the node has IPv6 pods (then IPv6 forwarding is checked too).
    """

    def __init__(self, forward_rules_in_place: Callable[[], bool | None], interval: float,
                 iptables: Iptables | None = None, read_sysctl: Callable[[], str | None] = read_ip_forward,
                 ipv6_enabled: Callable[[], bool] = lambda: False,
                 read_ipv6_sysctl: Callable[[], str | None] = lambda: read_ip_forward(IPV6_FORWARDING_PATH)) -> None:
        self.forward_rules_in_place = forward_rules_in_place
        self.interval = interval
        self.iptables = iptables or Iptables()
        self.read_sysctl = read_sysctl
        self.ipv6_enabled = ipv6_enabled
        self.read_ipv6_sysctl = read_ipv6_sysctl
        self.problems: tuple[NodeProblem, ...] = ()

    def check(self) -> list[NodeProblem]:
        """One look at the node (blocking: reads /proc, may run iptables)."""
        in_place = self.forward_rules_in_place()
        policy = None
        if in_place is False:
            try:
                policy = forward_policy(self.iptables.list_rules("filter", "FORWARD"))
            except IptablesError:
                policy = None
        ipv6_forwarding = self.read_ipv6_sysctl() if self.ipv6_enabled() else None
        return judge_node(self.read_sysctl(), policy, in_place, ipv6_forwarding)

    def update(self, found: list[NodeProblem]) -> None:
        """Log what appeared and what cleared since the last check."""
        before = {p.code for p in self.problems}
        now = {p.code for p in found}
        for problem in found:
            if problem.code not in before:
                log.warning("node problem: %s", problem.message)
        for problem in self.problems:
            if problem.code not in now:
                log.info("node problem cleared: %s", problem.code)
        self.problems = tuple(found)

    async def run(self) -> None:
        while True:
            self.update(await asyncio.to_thread(self.check))
            await asyncio.sleep(self.interval)
