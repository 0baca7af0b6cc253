"""flanneld-py.service run by a real systemd: a Debian 12 node booted by systemd-nspawn in a lab
node's network namespace, with flanneld-py installed from its wheel as README "Installing on a
node" says (nspawn_node.py). A second lab node runs the daemon directly, as a peer.

The tests share one booted node and run in file order (each leaves the unit active); the last
one boots a second node while etcd is down.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flanneld_py.lab.cluster import ETCD_HOST, Cluster, Node, Pod
from nspawn_node import BootedNode, SessionRoot, edit_defaults, unavailable_reason

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow]

REASON = unavailable_reason()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

DEFAULTS = {"FLANNELD_ETCD_ENDPOINTS": f"http://{ETCD_HOST}:2379", "FLANNELD_IFACE": "eth0",
            "FLANNELD_IP_MASQ": "true"}
# What the unit's CapabilityBoundingSet leaves: CAP_NET_ADMIN (12), CAP_NET_RAW (13), CAP_SYS_ADMIN (21).
BOUNDING_SET = (1 << 12) | (1 << 13) | (1 << 21)
WATCHDOG_SEC = 30
RESTART_SEC = 5


@pytest.fixture(scope="module")
def session_root() -> Iterator[SessionRoot]:
    root = SessionRoot(DEFAULTS)
    try:
        yield root
    finally:
        root.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(nodes=3) as lab:
        lab.start_daemon(lab.nodes[1])  # n2: the peer, run directly
        yield lab


@pytest.fixture(scope="module")
def node(session_root: SessionRoot, cluster: Cluster) -> Iterator[BootedNode]:
    """n1, booted with the unit enabled: a fresh boot (no /run/xtables.lock, no /var/lib/cni/networks)."""
    assert not (session_root.root / "var/lib/cni/networks").exists()
    booted = BootedNode(session_root.root, cluster.nodes[0].netns.path, f"fp{cluster.tag}n1",
                        f"{cluster.workdir}/nspawn-n1.log")
    try:
        booted.wait_booted()
        wait_active(booted)
        yield booted
    finally:
        booted.close()


def wait_active(node: BootedNode, timeout: float = 60) -> None:
    node.wait_until("active", lambda: node.unit("ActiveState")["ActiveState"] == "active", timeout)


def subnet(node: BootedNode) -> str:
    env = dict(line.partition("=")[::2] for line in node.read("/run/flannel/subnet.env").splitlines())
    return env["FLANNEL_SUBNET"]


def lease_of(cluster: Cluster, node: Node) -> str:
    return next(key for key, value in cluster.leases().items() if value["PublicIP"] == node.address)


def cni_config(node: BootedNode) -> dict[str, Any]:
    """The plugin config a runtime derives from the conflist install-cni put in place."""
    conflist = json.loads(node.read("/etc/cni/net.d/10-flannel-py.conflist"))
    return {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}


def add_pod(node: BootedNode, name: str) -> str:
    """A pod namespace inside the container wired by the installed /opt/cni/bin/flannel-py; its address."""
    node.run("ip", "netns", "add", name)
    proc = node.run("env", "CNI_COMMAND=ADD", f"CNI_CONTAINERID={name}", f"CNI_NETNS=/run/netns/{name}",
                    "CNI_IFNAME=eth0", "CNI_PATH=/opt/cni/bin", "/opt/cni/bin/flannel-py",
                    stdin=json.dumps(cni_config(node)))
    return json.loads(proc.stdout)["ips"][0]["address"].split("/")[0]


@pytest.fixture(scope="module")
def pods(node: BootedNode, cluster: Cluster) -> tuple[str, Pod]:
    """A pod inside the container (its address) and a pod on the peer n2."""
    return add_pod(node, "pod1"), cluster.add_pod(cluster.nodes[1])


def pods_talk(node: BootedNode, pods: tuple[str, Pod]) -> bool:
    inner, outer = pods
    there = node.run("ip", "netns", "exec", "pod1", "ping", "-c", "1", "-W", "2", str(outer.ip.ip), check=False)
    return there.returncode == 0 and outer.ping(inner)


def test_fresh_boot_starts_the_unit_once_the_subnet_file_is_written(node: BootedNode, cluster: Cluster) -> None:
    state = node.unit("ActiveState", "SubState", "Result", "NRestarts")
    assert state == {"ActiveState": "active", "SubState": "running", "Result": "success", "NRestarts": "0"}
    journal = node.journal()
    assert "226/NAMESPACE" not in journal and "Failed to set up mount namespacing" not in journal
    assert node.run("test", "-e", "/run/xtables.lock", check=False).returncode == 0  # made by ExecStartPre
    # Type=notify: systemd calls it started only after the daemon wrote the subnet file.
    lines = node.journal("-o", "cat").splitlines()
    wrote = next(i for i, line in enumerate(lines) if "wrote /run/flannel/subnet.env" in line)
    started = next(i for i, line in enumerate(lines) if "Started flanneld-py.service" in line)
    assert wrote < started
    assert lease_of(cluster, cluster.nodes[0]) == subnet(node).replace("/", "-").replace(".1-", ".0-")


def test_pods_reach_pods_on_another_node(node: BootedNode, pods: tuple[str, Pod]) -> None:
    node.wait_until("talking to n2's pod", lambda: pods_talk(node, pods), timeout=30)


def test_hardening_holds_while_the_daemon_works(node: BootedNode, cluster: Cluster, pods: tuple[str, Pod]) -> None:
    # The daemon did its work: TUN device, a route to the peer, masquerade rules, a wired pod.
    assert node.run("ip", "link", "show", "flannel0", check=False).returncode == 0
    peer_subnet = lease_of(cluster, cluster.nodes[1]).replace("-", "/")
    assert peer_subnet in node.run("ip", "route", "show").stdout or "10.244.0.0/16" in node.run("ip", "route").stdout
    assert "FLANNEL-POSTRTG" in node.run("iptables", "-t", "nat", "-S").stdout
    assert node.run("ip", "netns", "exec", "pod1", "ip", "-4", "addr", "show", "eth0").returncode == 0
    # ... under the unit's restrictions.
    pid = node.main_pid()
    status = dict(line.partition(":\t")[::2] for line in node.read(f"/proc/{pid}/status").splitlines())
    assert int(status["CapBnd"], 16) == BOUNDING_SET
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"  # SystemCallArchitectures= filter
    inside = ("nsenter", "-t", str(pid), "-m")
    assert node.run(*inside, "touch", "/etc/flanneld-py-probe", check=False).returncode != 0  # ProtectSystem=strict
    assert node.run(*inside, "touch", "/run/flannel/probe").returncode == 0  # RuntimeDirectory
    node.run("touch", "/root/probe")
    assert node.run(*inside, "test", "-e", "/root/probe", check=False).returncode != 0  # ProtectHome
    assert node.run(*inside, "touch", "/var/lib/cni/networks/probe").returncode == 0  # ReadWritePaths
    node.run("rm", "-f", "/run/flannel/probe", "/var/lib/cni/networks/probe", "/root/probe")
    journal = node.journal("-u", "flanneld-py")
    assert "Operation not permitted" not in journal and "Permission denied" not in journal
    # systemd applied the rest of the unit's sandbox to it, as written.
    applied = node.unit("DevicePolicy", "ProtectSystem", "ProtectHome", "PrivateTmp", "ProtectKernelModules",
                        "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "RestrictRealtime",
                        "RestrictSUIDSGID", "LockPersonality", "RestrictNamespaces", "RestrictAddressFamilies")
    assert applied["DevicePolicy"] == "closed" and applied["ProtectSystem"] == "strict"
    assert applied["ProtectHome"] == "yes" and applied["RestrictNamespaces"] == "net"
    assert set(applied["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert all(applied[key] == "yes" for key in ("PrivateTmp", "ProtectKernelModules", "ProtectKernelLogs",
                                                  "ProtectControlGroups", "ProtectClock", "RestrictRealtime",
                                                  "RestrictSUIDSGID", "LockPersonality")), applied
    score = node.run("systemd-analyze", "security", "--no-pager", "flanneld-py").stdout
    print(score.splitlines()[-1])  # recorded in README (Running it as a service)
    assert re.search(r"Overall exposure level for flanneld-py.service: \d", score)


def test_journal_lines_carry_priorities(node: BootedNode) -> None:
    entries = node.unit_journal_json()
    daemon = [e for e in entries if e.get("_COMM") == "flanneld-py" or "SYSLOG_IDENTIFIER" in e
              and e["SYSLOG_IDENTIFIER"] == "flanneld-py"]
    acquired = [e for e in daemon if "lease acquired" in str(e.get("MESSAGE"))]
    assert acquired and all(e["PRIORITY"] == "6" for e in acquired)
    assert not any(re.match(r"\d{4}-\d\d-\d\d ", str(e.get("MESSAGE"))) for e in daemon)  # journald stamps time
    assert not any("Traceback" in str(e.get("MESSAGE")) for e in entries)


def test_restart_keeps_the_subnet_and_pods_keep_talking(node: BootedNode, pods: tuple[str, Pod]) -> None:
    before = subnet(node)
    node.run("systemctl", "restart", "flanneld-py")
    assert node.unit("ActiveState")["ActiveState"] == "active"  # restart returns once READY=1 came
    assert subnet(node) == before
    node.wait_until("talking again", lambda: pods_talk(node, pods), timeout=30)


def test_a_killed_daemon_is_restarted_with_its_subnet(node: BootedNode) -> None:
    before, restarts, pid = subnet(node), int(node.unit("NRestarts")["NRestarts"]), node.main_pid()
    node.run("kill", "-KILL", str(pid))
    node.wait_until("restarted", lambda: node.unit("NRestarts")["NRestarts"] == str(restarts + 1)
                    and node.unit("ActiveState")["ActiveState"] == "active", timeout=RESTART_SEC + 60)
    assert node.main_pid() != pid and subnet(node) == before


def test_the_watchdog_restarts_a_frozen_daemon(node: BootedNode) -> None:
    before, pid = subnet(node), node.main_pid()
    frozen_at = time.monotonic()
    node.run("kill", "-STOP", str(pid))
    node.wait_until("restarted by the watchdog", lambda: node.main_pid() not in (0, pid)
                    and node.unit("ActiveState")["ActiveState"] == "active", timeout=WATCHDOG_SEC + RESTART_SEC + 60)
    assert "Watchdog timeout" in node.journal("-u", "flanneld-py")
    assert time.monotonic() - frozen_at > WATCHDOG_SEC / 2  # it was the watchdog, not something sooner
    assert subnet(node) == before


def entries_since(node: BootedNode, cursor: str) -> list[dict[str, str]]:
    out = node.run("journalctl", "--no-pager", "-u", "flanneld-py", "-o", "json", f"--after-cursor={cursor}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def cursor(node: BootedNode) -> str:
    out = node.run("journalctl", "--no-pager", "-u", "flanneld-py", "-n", "1", "-o", "json").stdout
    return json.loads(out.splitlines()[-1])["__CURSOR"]


def test_stop_ends_the_daemon_cleanly(node: BootedNode) -> None:
    mark = cursor(node)
    node.run("systemctl", "stop", "flanneld-py")
    state = node.unit("ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    messages = [str(e.get("MESSAGE")) for e in entries_since(node, mark)]
    assert any("Stopped flanneld-py" in m for m in messages), messages
    assert not any("Killing process" in m or "timed out" in m for m in messages), messages  # SIGTERM sufficed
    node.run("systemctl", "start", "flanneld-py")
    assert node.unit("ActiveState")["ActiveState"] == "active"


def set_defaults(node: BootedNode, values: dict[str, str]) -> None:
    text = node.read("/etc/default/flanneld-py")
    node.run("sh", "-c", "cat > /etc/default/flanneld-py", stdin=edit_defaults(text, values))


@pytest.mark.parametrize(("setting", "needle", "restarts"), [
    ({"FLANNELD_IFACE": "nope0"}, "--iface=nope0: no interface named nope0): set --iface", True),
    ({"FLANNELD_SUBNET_LEASE_TTL": "soon"}, "FLANNELD_SUBNET_LEASE_TTL='soon'", False),
])
def test_a_configuration_mistake_is_one_journal_line(node: BootedNode, setting: dict[str, str], needle: str,
                                                     restarts: bool) -> None:
    original = node.read("/etc/default/flanneld-py")
    mark = cursor(node)
    try:
        set_defaults(node, setting)
        node.run("systemctl", "restart", "flanneld-py", check=False)
        node.wait_until("failed", lambda: node.unit("Result")["Result"] == "exit-code", timeout=30)
        entries = entries_since(node, mark)
        daemon = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "flanneld-py"]
        errors = [e for e in daemon if int(e["PRIORITY"]) <= 3]
        assert any(needle in e["MESSAGE"] for e in errors), daemon
        assert not any("Traceback" in str(e.get("MESSAGE")) for e in entries)
        # exit 1 (a missing interface may appear later) restarts; exit 2 (a bad value) does not.
        expected = "activating" if restarts else "failed"
        node.wait_until(expected, lambda: node.unit("ActiveState")["ActiveState"] == expected, timeout=30)
    finally:
        node.run("sh", "-c", "cat > /etc/default/flanneld-py", stdin=original)
        node.run("systemctl", "reset-failed", "flanneld-py", check=False)
        node.run("systemctl", "restart", "flanneld-py")
    assert node.unit("ActiveState")["ActiveState"] == "active"


def test_etcd_down_at_boot_waits_in_activating(session_root: SessionRoot, cluster: Cluster, node: BootedNode) -> None:
    assert cluster.etcd is not None
    cluster.etcd.stop()
    late = None
    try:
        late = BootedNode(session_root.root, cluster.nodes[2].netns.path, f"fp{cluster.tag}n3",
                          f"{cluster.workdir}/nspawn-n3.log")
        late.wait_booted()  # still "starting": the boot waits for the unit
        late.wait_until("activating", lambda: late.unit("ActiveState")["ActiveState"] == "activating", timeout=90)
        late.wait_until("showing why", lambda: "waiting" in late.unit("StatusText")["StatusText"], timeout=30)
        assert "Status: \"waiting" in late.run("systemctl", "status", "--no-pager", "flanneld-py", check=False).stdout
        time.sleep(3)  # still waiting, not failed
        assert late.unit("ActiveState")["ActiveState"] == "activating"
        cluster.etcd.start()
        wait_active(late, timeout=90)
        assert late.unit("StatusText")["StatusText"].startswith("running: subnet")
    finally:
        if late is not None:
            late.close()
        if cluster.etcd.proc is None:
            cluster.etcd.start()
