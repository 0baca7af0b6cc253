"""Node problems that leave the overlay dead: the pure verdict, the doctor's logging, and how
/healthz, /metrics and `status` show them (hand-made facts and snapshots)."""

from __future__ import annotations

import logging

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flanneld_py.ops.diagnose import (
    FORWARD_POLICY_DROP,
    IP_FORWARD_DISABLED,
    IPV6_FORWARDING_DISABLED,
    NodeDoctor,
    forward_policy,
    judge_node,
)
from flanneld_py.ops.health import health_verdict
from flanneld_py.ops.metrics import build_registry
from flanneld_py.ops.snapshot import Snapshot
from flanneld_py.ops.status import render_status

NOW = 1_800_000_000.0


def codes(problems):
    return [p.code for p in problems]


def test_ip_forward_off_is_fatal_and_says_what_to_run():
    (problem,) = judge_node("0\n", "ACCEPT", True)
    assert problem.code == IP_FORWARD_DISABLED and problem.fatal
    assert "sysctl -w net.ipv4.ip_forward=1" in problem.message


def test_drop_policy_matters_only_without_our_accept_rules():
    assert codes(judge_node("1\n", "DROP", False)) == [FORWARD_POLICY_DROP]
    assert judge_node("1\n", "DROP", True) == []
    assert judge_node("1\n", "DROP", None) == []  # not known yet
    assert judge_node("1\n", "ACCEPT", False) == []
    (problem,) = judge_node("1", "DROP", False)
    assert not problem.fatal and "--iptables-forward-rules" in problem.message


def test_unknown_facts_give_no_problem():
    assert judge_node(None, None, False) == []


def test_both_at_once():
    assert codes(judge_node("0", "DROP", False)) == [IP_FORWARD_DISABLED, FORWARD_POLICY_DROP]


def test_policy_from_iptables_s():
    assert forward_policy(["-P FORWARD DROP", "-A FORWARD -j DOCKER-USER"]) == "DROP"
    assert forward_policy(["-P FORWARD ACCEPT"]) == "ACCEPT"
    assert forward_policy([]) is None


class FakeIptables:
    def __init__(self, lines):
        self.lines = lines
        self.calls = 0

    def list_rules(self, table, chain):
        self.calls += 1
        return self.lines


def test_doctor_reads_the_policy_only_when_our_rules_are_not_in_place(caplog):
    state = {"in_place": True, "sysctl": "1\n"}
    ipt = FakeIptables(["-P FORWARD DROP"])
    doctor = NodeDoctor(lambda: state["in_place"], 5, iptables=ipt, read_sysctl=lambda: state["sysctl"])
    assert doctor.check() == [] and ipt.calls == 0
    state["in_place"] = False
    assert codes(doctor.check()) == [FORWARD_POLICY_DROP] and ipt.calls == 1


def test_ipv6_forwarding_off_is_fatal_only_where_ipv6_is_enabled():
    (problem,) = judge_node("1\n", "ACCEPT", True, "0\n")
    assert problem.code == IPV6_FORWARDING_DISABLED and problem.fatal
    assert "sysctl -w net.ipv6.conf.all.forwarding=1" in problem.message
    assert judge_node("1\n", "ACCEPT", True, "1\n") == []
    assert judge_node("1\n", "ACCEPT", True, None) == []  # IPv6 off: not read


def test_doctor_reads_ipv6_forwarding_only_when_ipv6_is_enabled():
    state = {"ipv6": False, "reads": 0}

    def read_ipv6():
        state["reads"] += 1
        return "0\n"

    doctor = NodeDoctor(lambda: True, 5, iptables=FakeIptables([]), read_sysctl=lambda: "1\n",
                        ipv6_enabled=lambda: state["ipv6"], read_ipv6_sysctl=read_ipv6)
    assert doctor.check() == [] and state["reads"] == 0
    state["ipv6"] = True
    assert codes(doctor.check()) == [IPV6_FORWARDING_DISABLED] and state["reads"] == 1


def test_doctor_logs_each_problem_once_and_when_it_clears(caplog):
    state = {"sysctl": "0\n"}
    doctor = NodeDoctor(lambda: True, 5, iptables=FakeIptables([]), read_sysctl=lambda: state["sysctl"])
    with caplog.at_level(logging.INFO, logger="flanneld_py.ops.diagnose"):
        for _ in range(3):
            doctor.update(doctor.check())
        state["sysctl"] = "1\n"
        doctor.update(doctor.check())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("net.ipv4.ip_forward is 0" in m for m in messages) == 1
    assert messages[-1] == "node problem cleared: ip_forward_disabled"
    assert doctor.problems == ()


def snap(problems=()):
    return Snapshot(taken_at=NOW, phase="running", ready=True, backend="udp", network="10.244.0.0/16",
                    subnet="10.244.7.0/24", lease_expires_at=NOW + 3600, datapath_up=True, etcd_silence=1.0,
                    problems=tuple(problems), forward_rules=True)


def test_healthz_503_for_ip_forward_and_200_with_a_note_for_drop_policy():
    code, body = health_verdict(snap(judge_node("0", None, True)), 60)
    assert code == 503 and body["failed"] == "node" and "ip_forward" in body["reason"]
    assert body["node_problems"][0]["problem"] == IP_FORWARD_DISABLED
    code, body = health_verdict(snap(judge_node("1", "DROP", False)), 60)
    assert code == 200 and body["node_problems"][0]["problem"] == FORWARD_POLICY_DROP
    assert "node_problems" not in health_verdict(snap(), 60)[1]


def gauges(s):
    text = generate_latest(build_registry(lambda: s, process=False)).decode()
    return {sample.labels["problem"]: sample.value
            for family in text_string_to_metric_families(text) if family.name == "flanneld_node_problem"
            for sample in family.samples}


def test_metric_has_a_series_per_problem():
    assert gauges(snap()) == {IP_FORWARD_DISABLED: 0, FORWARD_POLICY_DROP: 0, IPV6_FORWARDING_DISABLED: 0}
    assert gauges(snap(judge_node("0", "DROP", False, "0"))) == {
        IP_FORWARD_DISABLED: 1, FORWARD_POLICY_DROP: 1, IPV6_FORWARDING_DISABLED: 1}


def test_status_shows_problems_and_forward_rules():
    s = snap(judge_node("0", None, True))
    code, body = health_verdict(s, 60)
    text = render_status({**s.to_json(), "health": {"code": code, **body}})
    assert "node      PROBLEM: net.ipv4.ip_forward is 0" in text
    assert "forward   on, 0 repairs" in text and "health    unhealthy: net.ipv4.ip_forward is 0" in text
    assert "node      ok" in render_status({**snap().to_json(), "health": {"code": 200}})
