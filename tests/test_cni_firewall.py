"""The iptables runner, the per-pod masquerade and flannel's IPv6 rule sets, inside a namespace of our own."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from flanneld_py.cni.masq import PodMasquerade, chain_name
from flanneld_py.cni.models import Attachment, CniError
from flanneld_py.firewall import Iptables, IptablesError
from flanneld_py.lab.netns import Netns, unique_tag
from flanneld_py.ops.ipmasq import RuleApplier, forward_rules, masq_ip6_rules

pytestmark = pytest.mark.netns


@pytest.fixture
def ns() -> Iterator[Netns]:
    namespace = Netns.create(f"cnit-{unique_tag()}-fw")
    try:
        yield namespace
    finally:
        namespace.delete()


@pytest.fixture
def ipt(ns: Netns) -> Iptables:
    return Iptables(prefix=tuple(ns.argv()))


RULE = ["-s", "10.244.5.0/24", "-m", "comment", "--comment", "flanneld-py test", "-j", "RETURN"]


def test_chains_and_rules_are_idempotent(ipt: Iptables) -> None:
    assert not ipt.chain_exists("nat", "FLP-TEST")
    ipt.ensure_chain("nat", "FLP-TEST")
    ipt.ensure_chain("nat", "FLP-TEST")
    assert ipt.chain_exists("nat", "FLP-TEST")
    assert ipt.ensure_rule("nat", "FLP-TEST", RULE) is True
    assert ipt.ensure_rule("nat", "FLP-TEST", RULE) is False
    assert ipt.list_rules("nat", "FLP-TEST") == [
        '-N FLP-TEST', '-A FLP-TEST -s 10.244.5.0/24 -m comment --comment "flanneld-py test" -j RETURN']
    assert ipt.delete_rule("nat", "FLP-TEST", RULE) is True
    assert ipt.delete_rule("nat", "FLP-TEST", RULE) is False
    ipt.ensure_rule("nat", "FLP-TEST", RULE)
    assert ipt.delete_chain("nat", "FLP-TEST") is True  # flushes first
    assert ipt.delete_chain("nat", "FLP-TEST") is False
    assert ipt.list_rules("nat", "FLP-TEST") == []


def test_restore_is_atomic(ipt: Iptables) -> None:
    with pytest.raises(IptablesError):
        ipt.restore("nat", [":FLP-A - [0:0]", "-A FLP-A -j RETURN", "-A NO-SUCH-CHAIN -j RETURN"])
    assert not ipt.chain_exists("nat", "FLP-A")
    ipt.restore("nat", [":FLP-A - [0:0]", "-A FLP-A -j RETURN"])
    assert ipt.list_rules("nat", "FLP-A") == ["-N FLP-A", "-A FLP-A -j RETURN"]


def test_a_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(IptablesError, match="no-such-iptables"):
        Iptables(binary="no-such-iptables").chain_exists("nat", "X")


def test_pod_masquerade_set_up_and_torn_down(ipt: Iptables) -> None:
    masq = PodMasquerade(ipt)
    pod, other = Attachment("ctr-a", "eth0"), Attachment("ctr-b", "eth0")
    masq.setup("cbr0", pod, IPv4Address("10.244.5.2"), IPv4Network("10.244.0.0/16"))
    masq.setup("cbr0", other, IPv4Address("10.244.5.3"), IPv4Network("10.244.0.0/16"))
    chain = chain_name("cbr0", pod)
    rules = ipt.list_rules("nat")
    assert f'-A POSTROUTING -s 10.244.5.2/32 -m comment --comment "name: cbr0 id: ctr-a" -j {chain}' in rules
    assert f'-A {chain} -d 10.244.0.0/16 -m comment --comment "name: cbr0 id: ctr-a" -j ACCEPT' in rules
    assert f'-A {chain} ! -d 224.0.0.0/4 -m comment --comment "name: cbr0 id: ctr-a" -j MASQUERADE' in rules
    assert masq.present("cbr0", pod)
    assert masq.teardown("cbr0", pod) is True
    assert masq.teardown("cbr0", pod) is False
    rules = ipt.list_rules("nat")
    assert not any(chain in line or "10.244.5.2" in line for line in rules)
    assert masq.present("cbr0", other)
    assert masq.gc("other-net", []) == []  # other networks' chains are not ours to sweep
    assert masq.gc("cbr0", [other]) == []
    assert masq.gc("cbr0", []) == [chain_name("cbr0", other)]
    assert not any("FLP-" in line for line in ipt.list_rules("nat"))


def test_masquerade_failures_are_cni_errors(ns: Netns) -> None:
    broken = PodMasquerade(Iptables(binary="no-such-iptables", prefix=tuple(ns.argv())))
    with pytest.raises(CniError) as caught:
        broken.setup("cbr0", Attachment("c", "eth0"), IPv4Address("10.244.5.2"), IPv4Network("10.244.0.0/16"))
    assert caught.value.code == 104
    assert broken.gc("cbr0", []) == []  # no iptables, no chains to sweep


def test_gc_finds_a_chain_whose_jump_is_already_gone(ipt: Iptables) -> None:
    masq = PodMasquerade(ipt)
    pod = Attachment("ctr-half", "eth0")
    masq.setup("cbr0", pod, IPv4Address("10.244.5.9"), IPv4Network("10.244.0.0/16"))
    chain = chain_name("cbr0", pod)
    (jump,) = [line for line in ipt.list_rules("nat", "POSTROUTING") if chain in line]
    ipt.restore("nat", [f"-D {jump[3:]}"])
    assert masq.gc("cbr0", []) == [chain]
    assert not ipt.chain_exists("nat", chain)


def test_flannels_ipv6_rules_in_ip6tables_heal(ns: Netns) -> None:
    """--ip-masq and the FORWARD accept rules for an IPv6 Network, in a real ip6tables."""
    ip6t = Iptables(prefix=tuple(ns.argv())).for_ipv6()
    network, subnet = IPv6Network("fd00:10:244::/56"), IPv6Network("fd00:10:244:7::/64")
    app = RuleApplier(ip6t, lambda rf: masq_ip6_rules(network, subnet, rf) + forward_rules(network),
                      random_fully=False, label="ipv6 ip-masq")
    assert app.ensure() is True
    nat = ns.sh("ip6tables", "-t", "nat", "-S").stdout
    assert '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG' in nat
    assert ('-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment "flanneld masq" '
            "-j MASQUERADE") in nat
    assert ('-A FLANNEL-FWD -d fd00:10:244::/56 -m comment --comment "flanneld forward" -j ACCEPT'
            in ns.sh("ip6tables", "-S").stdout)
    assert "FLANNEL" not in ns.sh("iptables", "-t", "nat", "-S").stdout, "IPv4 tables are left alone"
    before = ip6t.list_rules("nat", "FLANNEL-POSTRTG")
    ns.sh("ip6tables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3")
    assert app.ensure() is True and app.repairs == 1
    assert ip6t.list_rules("nat", "FLANNEL-POSTRTG") == before
    app.remove_all()
    assert "FLANNEL" not in ns.sh("ip6tables", "-t", "nat", "-S").stdout + ns.sh("ip6tables", "-S").stdout
