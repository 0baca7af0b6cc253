"""flannel's iptables rules, kept in place: masquerade (``--ip-masq``) and
FORWARD accept (``--iptables-forward-rules``, on by default), each set on its own.

The rule lists are pure functions of the Network and our subnet, identical
to flannel's (pkg/trafficmngr/iptables), comments included, so a node moving
between flannel and flanneld-py finds its own rules. The jumps into our
chains are inserted at the top of POSTROUTING and FORWARD (flannel's ``-I``),
so a host's own DROP or REJECT rules there (Docker's, firewalld's) come after::

    nat    POSTROUTING     -j FLANNEL-POSTRTG
    nat    FLANNEL-POSTRTG marked by kube-proxy (0x4000)        RETURN
                           -s <subnet>  -d <network>            RETURN
                           -s <network> -d <subnet>             RETURN
                           ! -s <network> -d <subnet>           RETURN
                           -s <network> ! -d 224.0.0.0/4        MASQUERADE [--random-fully]
                           ! -s <network> -d <network>          MASQUERADE [--random-fully]
    filter FORWARD         -j FLANNEL-FWD
    filter FLANNEL-FWD     -s <network> ACCEPT; -d <network> ACCEPT

With IPv6 enabled the same chains, comments and FORWARD rules go into
ip6tables for the IPv6 Network; flannel's IPv6 masquerade set
(``MasqIP6Rules``) is shorter and ordered differently::

    nat    FLANNEL-POSTRTG marked by kube-proxy (0x4000)        RETURN
                           -s <network6> -d <network6>          RETURN
                           -s <network6> ! -d ff00::/8          MASQUERADE [--random-fully]
                           ! -s <network6> -d <subnet6>         RETURN
                           ! -s <network6> -d <network6>        MASQUERADE [--random-fully]

A :class:`RuleApplier` per set checks every rule with ``iptables -C`` every
``--iptables-resync`` seconds (default 5); if any is missing it re-installs
the whole set in order in one ``iptables-restore`` transaction (existing
copies deleted first), as flannel does, since the order of the RETURN and
MASQUERADE rules matters.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from ..firewall import IptablesError

__all__ = [
    "IptablesRunner",
    "Rule",
    "RuleApplier",
    "forward_rules",
    "masq_ip6_rules",
    "masq_rules",
    "restore_lines",
    "supports_random_fully",
]

log = logging.getLogger(__name__)

POSTRTG = "FLANNEL-POSTRTG"
FWD = "FLANNEL-FWD"
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = "224.0.0.0/4"
MULTICAST6 = "ff00::/8"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
RESYNC_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: ``iptables -t <table> -A <chain> <spec...>`` (``-I``, at the top, with ``insert``)."""

    table: str
    chain: str
    spec: tuple[str, ...]
    insert: bool = False


def _masq(spec: list[str], random_fully: bool) -> tuple[str, ...]:
    tail = ["-m", "comment", "--comment", MASQ_COMMENT, "-j", "MASQUERADE"]
    return tuple(spec + tail + (["--random-fully"] if random_fully else []))


def _ret(spec: list[str]) -> tuple[str, ...]:
    return (*spec, "-m", "comment", "--comment", MASQ_COMMENT, "-j", "RETURN")


def _masq_head() -> list[Rule]:
    return [
        # Jump to our chain, so our rules run before later POSTROUTING rules.
        Rule("nat", "POSTROUTING", ("-m", "comment", "--comment", MASQ_COMMENT, "-j", POSTRTG), insert=True),
        # kube-proxy marks what it will masquerade itself: no double NAT.
        Rule("nat", POSTRTG, _ret(["-m", "mark", "--mark", KUBE_PROXY_MARK])),
    ]


def masq_rules(network: IPv4Network, subnet: IPv4Network, random_fully: bool) -> list[Rule]:
    """flannel's nat rules for ``network`` seen from the node leasing ``subnet``."""
    net, pod = str(network), str(subnet)
    return [
        *_masq_head(),
        # Traffic inside the overlay keeps pod addresses.
        Rule("nat", POSTRTG, _ret(["-s", pod, "-d", net])),
        Rule("nat", POSTRTG, _ret(["-s", net, "-d", pod])),
        # Outside traffic to our own pods (e.g. via a NodePort) keeps its source.
        Rule("nat", POSTRTG, _ret(["!", "-s", net, "-d", pod])),
        # Pods talking to the outside world leave with the node's address; never multicast.
        Rule("nat", POSTRTG, _masq(["-s", net, "!", "-d", MULTICAST], random_fully)),
        # Outside traffic into the overlay (host to remote pods) gets the node's address.
        Rule("nat", POSTRTG, _masq(["!", "-s", net, "-d", net], random_fully)),
    ]


def masq_ip6_rules(network: IPv6Network, subnet: IPv6Network, random_fully: bool) -> list[Rule]:
    """flannel's ip6tables nat rules (``MasqIP6Rules``) for ``network`` seen from the node leasing ``subnet``."""
    net, pod = str(network), str(subnet)
    return [
        *_masq_head(),
        # Traffic inside the overlay keeps pod addresses.
        Rule("nat", POSTRTG, _ret(["-s", net, "-d", net])),
        # Pods talking to the outside world leave with the node's address; never multicast.
        Rule("nat", POSTRTG, _masq(["-s", net, "!", "-d", MULTICAST6], random_fully)),
        # Outside traffic to our own pods keeps its source.
        Rule("nat", POSTRTG, _ret(["!", "-s", net, "-d", pod])),
        # Outside traffic into the overlay (host to remote pods) gets the node's address.
        Rule("nat", POSTRTG, _masq(["!", "-s", net, "-d", net], random_fully)),
    ]


def forward_rules(network: IPv4Network | IPv6Network) -> list[Rule]:
    """Accept forwarding to and from the overlay even under a DROP policy (iptables or ip6tables alike)."""
    net = str(network)
    comment = ("-m", "comment", "--comment", FWD_COMMENT)
    return [
        Rule("filter", "FORWARD", (*comment, "-j", FWD), insert=True),
        Rule("filter", FWD, ("-s", net, *comment, "-j", "ACCEPT")),
        Rule("filter", FWD, ("-d", net, *comment, "-j", "ACCEPT")),
    ]


_VERSION_RE = re.compile(r"v(\d+)\.(\d+)\.(\d+)")


def supports_random_fully(version_text: str) -> bool:
    """``--random-fully`` came with iptables 1.6.2 (``iptables --version`` output)."""
    match = _VERSION_RE.search(version_text)
    return match is not None and tuple(int(x) for x in match.groups()) >= (1, 6, 2)


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(ch.isspace() for ch in arg) or not arg else arg


def restore_lines(rules: Sequence[Rule], present: Sequence[bool]) -> dict[str, list[str]]:
    """Per table, the ``iptables-restore --noflush`` lines that put ``rules`` in order:
    delete each copy that is ``present``, then append every rule."""
    out: dict[str, list[str]] = {}
    for rule, here in zip(rules, present, strict=True):
        spec = " ".join(_quote(arg) for arg in rule.spec)
        lines = out.setdefault(rule.table, [])
        if here:
            lines.append(f"-D {rule.chain} {spec}")
        lines.append(f"{'-I' if rule.insert else '-A'} {rule.chain} {spec}")
    return out


class IptablesRunner(Protocol):
    """What the applier needs of :class:`flanneld_py.firewall.Iptables`."""

    @property
    def binary(self) -> str: ...

    def ensure_chain(self, table: str, chain: str) -> None: ...

    def rule_exists(self, table: str, chain: str, rule: Sequence[str]) -> bool: ...

    def delete_rule(self, table: str, chain: str, rule: Sequence[str]) -> bool: ...

    def delete_chain(self, table: str, chain: str) -> bool: ...

    def restore(self, table: str, lines: Sequence[str]) -> None: ...


Desired = Callable[[bool], "list[Rule] | None"]


class RuleApplier:
    """Installs the rules ``desired(random_fully)`` returns (None: not yet known)
    and re-checks them every ``interval`` seconds; ``label`` names the set in logs.

    ``desired`` is read on every pass, so a new subnet replaces the old rules.
    ``random_fully`` None means: ask the iptables binary on the first pass.
    The blocking iptables calls run in a worker thread, never on the event loop.
    ``in_place`` is None until the first pass, then whether the last pass left
    every rule installed.
    """

    def __init__(self, iptables: IptablesRunner, desired: Desired, interval: float = RESYNC_SECONDS,
                 random_fully: bool | None = None, label: str = "ip-masq") -> None:
        self.iptables = iptables
        self.desired = desired
        self.interval = interval
        self.random_fully = random_fully
        self.label = label
        self.installed: list[Rule] = []
        self.repairs = 0
        self.in_place: bool | None = None
        self._task: asyncio.Task[None] | None = None

    def ensure(self) -> bool:
        """One pass (blocking); True if rules had to be (re)installed."""
        if self.random_fully is None:
            self.random_fully = probe_random_fully(self.iptables.binary)
        rules = self.desired(self.random_fully)
        if rules is None:
            return False
        if self.installed and rules != self.installed:
            stale = [rule for rule in self.installed if rule not in rules]
            self._delete(stale)
            log.info("%s: lease changed, replaced %d rules", self.label, len(stale))
        present = [self.iptables.rule_exists(r.table, r.chain, r.spec) for r in rules]
        if all(present):
            self.installed = rules
            return False
        for table, chain in _own_chains(rules):
            self.iptables.ensure_chain(table, chain)
        for table, lines in restore_lines(rules, present).items():
            self.iptables.restore(table, lines)
        if self.installed:
            self.repairs += 1
            log.warning("%s: %d of %d rules were missing; restored them", self.label, present.count(False), len(rules))
        else:
            log.info("%s: installed %d rules", self.label, len(rules))
        self.installed = rules
        return True

    async def run(self) -> None:
        failing: str | None = None  # log a failure once, not every pass
        while True:
            try:
                await asyncio.to_thread(self.ensure)
            except IptablesError as exc:
                self.in_place = False
                if str(exc) != failing:
                    log.error("%s: %s (retrying every %.0fs)", self.label, exc, self.interval)
                    failing = str(exc)
            else:
                self.in_place = bool(self.installed)
                if failing is not None:
                    log.info("%s: rules in place again", self.label)
                    failing = None
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=self.label)

    def _delete(self, rules: Sequence[Rule]) -> None:
        for rule in reversed(rules):
            self.iptables.delete_rule(rule.table, rule.chain, rule.spec)

    def remove_all(self) -> None:
        """Delete our rules and chains (blocking); for ``--cleanup-on-exit``."""
        chains = _own_chains(self.installed)
        self._delete(self.installed)
        for table, chain in chains:
            self.iptables.delete_chain(table, chain)
        self.installed = []

    async def close(self, cleanup: bool = False) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if cleanup:
            try:
                await asyncio.to_thread(self.remove_all)
            except IptablesError as exc:
                log.warning("%s: cleanup failed: %s", self.label, exc)


def _own_chains(rules: Sequence[Rule]) -> list[tuple[str, str]]:
    """Our chains among ``rules``' chains, each once, in order."""
    return list(dict.fromkeys((r.table, r.chain) for r in rules if r.chain in (POSTRTG, FWD)))


def probe_random_fully(binary: str = "iptables") -> bool:
    """Ask the iptables binary for its version (blocking)."""
    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return supports_random_fully(proc.stdout)
