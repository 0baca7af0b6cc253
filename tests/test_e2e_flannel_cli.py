"""flannel's own command lines, FORWARD rules under a DROP policy, and the ip_forward diagnosis,
against real daemons, real etcd and real traffic in the namespace lab.

The command lines are quoted from flannel's repository at tag v0.20.2 (and the shared
binaries' README), each with where it comes from. Only file paths are moved into the test's
work dir (``/vxlan.env`` becomes the node's subnet file, ``/certs/*`` the test's PKI); every
flag and its form stays as written. What such a line leaves to the environment (the CNI and
control sockets, which a flannel node does not have, the subnet file and etcd's address where
the line has none) comes as ``FLANNELD_*`` variables, as a unit file's ``Environment=`` would give it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flanneld_py.lab.checks import wait_until
from flanneld_py.lab.cluster import ETCD_HOST, Cluster, Node
from flanneld_py.lab.etcd import EtcdMember

# --- command lines that must be refused (no namespace needed) -------------------------

KUBE_LINES = {
    # Documentation/kube-flannel.yml (also kube-flannel-psp.yml, minikube.yml, kube-flannel-old.yaml,
    # k8s-old-manifests/kube-flannel-legacy.yml): command /opt/bin/flanneld, args
    "Documentation/kube-flannel.yml": ["--ip-masq", "--kube-subnet-mgr"],
    # dist/functional-test-k8s.sh line 164
    "dist/functional-test-k8s.sh": ["--kube-subnet-mgr", "--ip-masq", "--kubeconfig-file",
                                    "/var/lib/kubernetes/admin.kubeconfig", "--kube-api-url", "https://192.0.2.1:6443"],
}


@pytest.mark.parametrize("source", sorted(KUBE_LINES))
def test_kube_subnet_manager_lines_exit_2_with_one_line(source, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flanneld_py", *KUBE_LINES[source]], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert proc.returncode == 2, proc
    assert proc.stderr.count("\n") == 1 and proc.stdout == "", proc.stderr
    assert "--kube-subnet-mgr" in proc.stderr and "--etcd-endpoints" in proc.stderr


# --- command lines that must start and run ----------------------------------------------

def documented_lines(node: Node, endpoint: str, pki: dict[str, str]) -> dict[str, tuple[list[str], str]]:
    """source -> (argv after the program name, etcd prefix it uses)."""
    env_file = node.subnet_file
    return {
        # Documentation/running.md, "Multiple networks"
        "running.md: multiple networks": (["-subnet-file", env_file, "-etcd-prefix=/vxlan/network"],
                                          "/vxlan/network"),
        # Documentation/running.md, "Running manually": `sudo ./flanneld-amd64`, no arguments
        "running.md: no arguments": ([], "/coreos.com/network"),
        # dist/functional-test.sh line 221 (line 222 is the same with /hostgw paths)
        "dist/functional-test.sh": (["-v", "10", "-subnet-file", env_file, "-etcd-prefix=/vxlan/network",
                                     f"--etcd-cafile={pki['ca']}", f"--etcd-certfile={pki['cert']}",
                                     f"--etcd-keyfile={pki['key']}", f"--etcd-endpoints={endpoint}"],
                                    "/vxlan/network"),
        # the shared binaries' README (../shared/flannel/README.md)
        "shared README": ([f"--etcd-endpoints={endpoint}", "--iface=eth0", f"--subnet-file={env_file}"],
                          "/coreos.com/network"),
    }


def _pki(directory: str) -> dict[str, str]:
    from test_faults_tls import make_pki

    made = make_pki(directory)
    return {"ca": f"{made['ca']}.crt", "cert": f"{made['client']}.crt", "key": f"{made['client']}.key",
            "server": made["server"]}


@pytest.mark.netns
@pytest.mark.etcd
@pytest.mark.slow
@pytest.mark.parametrize("source", ["running.md: multiple networks", "running.md: no arguments",
                                    "dist/functional-test.sh", "shared README"])
def test_documented_etcd_lines_start_and_run(source, tmp_path):
    tls = source == "dist/functional-test.sh"
    if tls and shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI (Debian: openssl) for the line's TLS files")
    pki = _pki(str(tmp_path)) if tls else {"ca": "", "cert": "", "key": ""}
    scheme = "https" if tls else "http"
    endpoint = f"{scheme}://{ETCD_HOST}:2379"
    with Cluster(nodes=2, start_etcd=False) as lab:
        ctl_tls = {"cacert": pki["ca"], "cert": pki["cert"], "key": pki["key"]} if tls else None
        tls_args = [f"--cert-file={pki['server']}.crt", f"--key-file={pki['server']}.key", "--client-cert-auth",
                    f"--trusted-ca-file={pki['ca']}"] if tls else []
        lab.etcd = EtcdMember("e0", ETCD_HOST, lab.workdir, netns=lab.switch, scheme=scheme, tls_args=tls_args)
        lab.etcd.start(wait=not tls)
        if tls:
            lab.etcd.wait_ready(tls=ctl_tls)
        prefix = documented_lines(lab.nodes[0], endpoint, pki)[source][1]
        config = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
        lab.etcd.ctl("put", f"{prefix}/config", json.dumps(config), **({"tls": ctl_tls} if tls else {}))
        for node in lab.nodes:
            # a node's usual default route: lines without --iface take its interface, as flannel does
            node.netns.ip("route", "add", "default", "via", ETCD_HOST)
            argv, _ = documented_lines(node, endpoint, pki)[source]
            # the node's files in the test's work dir (a line without -subnet-file would write /run/flannel)
            env = {"FLANNELD_CNI_SOCKET": node.cni_socket, "FLANNELD_CONTROL_SOCKET": f"{node.workdir}/control.sock",
                   "FLANNELD_SUBNET_FILE": node.subnet_file}
            if source.startswith("running.md"):
                env["FLANNELD_ETCD_ENDPOINTS"] = endpoint  # the lines rely on the default 127.0.0.1
            with open(node.log_path, "ab") as log:
                node.daemon = subprocess.Popen(node.netns.argv(sys.executable, "-m", "flanneld_py", *argv),
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                               env={**_environ(), **env})
        for node in lab.nodes:
            lab.wait_ready(node)
        a, b = lab.add_pod(lab.nodes[0]), lab.add_pod(lab.nodes[1])
        assert wait_until(lambda: a.ping(str(b.ip.ip)) and b.ping(str(a.ip.ip)), timeout=20), \
            lab.nodes[0].log_text()[-2000:]
        leases = lab.etcd.ctl("get", "--prefix", f"{prefix}/subnets/", "--keys-only",
                              **({"tls": ctl_tls} if tls else {})).stdout.split()
        assert len(leases) == 2
        if source == "dist/functional-test.sh":
            assert " DEBUG " in lab.nodes[0].log_text()  # -v 10 took its value


def _environ() -> dict[str, str]:
    """The test's environment without FLANNELD_* flag variables (the line alone decides)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_") or k.startswith("FLANNELD_PY_")}


# --- FORWARD rules under a DROP policy ----------------------------------------------------


def _http_get(node: Node, port: int, path: str) -> tuple[int, str]:
    proc = node.netns.sh("curl", "-s", "-m", "5", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}",
                         check=False, timeout=15)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def _problem_gauges(node: Node, port: int) -> dict[str, float]:
    code, text = _http_get(node, port, "/metrics")
    assert code == 200, text
    return {s.labels["problem"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "flanneld_node_problem" for s in family.samples}


def _status(node: Node) -> str:
    return subprocess.run([sys.executable, "-m", "flanneld_py", "status",
                           f"--control-socket={node.workdir}/control.sock"],
                          capture_output=True, text=True, timeout=30, check=False).stdout


PORT = 8471


@pytest.mark.netns
@pytest.mark.etcd
@pytest.mark.slow
def test_forward_rules_by_default_let_pods_talk_under_a_drop_policy():
    """Docker's DROP FORWARD policy on both nodes, no --ip-masq: flannel's accept rules (on by
    default) carry the pods' traffic; turned off, the same nodes drop it and say so."""
    with Cluster(nodes=2, backend={"Type": "vxlan"}) as lab:
        for node in lab.nodes:
            node.netns.sh("iptables", "-w", "5", "-P", "FORWARD", "DROP")
        common = ("--healthz-ip=127.0.0.1", f"--healthz-port={PORT}", "--iptables-resync=1")
        lab.start_all(*common)
        a, b = lab.add_pod(lab.nodes[0]), lab.add_pod(lab.nodes[1])
        assert wait_until(lambda: a.ping(str(b.ip.ip)) and b.ping(str(a.ip.ip)), timeout=20), \
            lab.nodes[0].netns.sh("iptables", "-S", "FORWARD").stdout
        rules = lab.nodes[0].netns.sh("iptables", "-w", "5", "-S", "FORWARD").stdout.splitlines()
        assert rules[1] == '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD', rules
        assert _problem_gauges(lab.nodes[0], PORT) == {"ip_forward_disabled": 0, "forward_policy_drop": 0,
                                                          "ipv6_forwarding_disabled": 0}
        assert "forward   on, 0 repairs" in _status(lab.nodes[0])

        # a rule deleted by hand comes back within --iptables-resync
        lab.nodes[0].netns.sh("iptables", "-w", "5", "-F", "FLANNEL-FWD")
        assert wait_until(lambda: "forward   on, 1 repairs" in _status(lab.nodes[0]), timeout=15)
        assert a.ping(str(b.ip.ip), count=3)

        # the same nodes without the rules: dead, and the node says why
        for node in lab.nodes:
            lab.stop_daemon(node)
            node.netns.sh("iptables", "-w", "5", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward",
                          "-j", "FLANNEL-FWD")
            lab.start_daemon(node, *common, "--iptables-forward-rules=false", wait=False)
        for node in lab.nodes:
            lab.wait_ready(node)
        assert not a.ping(str(b.ip.ip), count=2)
        n1 = lab.nodes[0]
        assert wait_until(lambda: _problem_gauges(n1, PORT).get("forward_policy_drop") == 1, timeout=15)
        code, body = _http_get(n1, PORT, "/healthz")
        assert code == 200 and "forward_policy_drop" in body
        text = _status(n1)
        assert "node      PROBLEM: the FORWARD chain's policy is DROP" in text and "forward   off" in text
        assert n1.log_text().count("node problem: the FORWARD chain's policy is DROP") == 1


@pytest.mark.netns
@pytest.mark.etcd
@pytest.mark.slow
def test_ip_forward_0_is_logged_once_shown_and_fails_health():
    with Cluster(nodes=1) as lab:
        (node,) = lab.nodes
        node.netns.sh("sysctl", "-qw", "net.ipv4.ip_forward=0")
        lab.start_daemon(node, "--healthz-ip=127.0.0.1", f"--healthz-port={PORT}", "--iptables-resync=1",
                         "-vmodule=*=1", env={"FLANNELD_IFACES": "eth0"})
        assert wait_until(lambda: _http_get(node, PORT, "/healthz")[0] == 503, timeout=15)
        log = node.log_text()  # what the command line said, by the way
        assert "ignoring klog flags" in log and "-vmodule=*=1" in log
        assert "ignoring environment variable FLANNELD_IFACES: there is no flag --ifaces" in log
        doc = json.loads(_http_get(node, PORT, "/healthz")[1])
        assert doc["failed"] == "node" and "sysctl -w net.ipv4.ip_forward=1" in doc["reason"]
        assert _problem_gauges(node, PORT)["ip_forward_disabled"] == 1
        assert "node      PROBLEM: net.ipv4.ip_forward is 0" in _status(node)
        time.sleep(3)  # several checks later, still one log line
        assert node.log_text().count("node problem: net.ipv4.ip_forward is 0") == 1

        node.netns.sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        assert wait_until(lambda: _http_get(node, PORT, "/healthz")[0] == 200, timeout=15)
        assert _problem_gauges(node, PORT)["ip_forward_disabled"] == 0
        assert "node problem cleared: ip_forward_disabled" in node.log_text()


@pytest.mark.netns
@pytest.mark.etcd
@pytest.mark.slow
def test_vxlan_backend_mtu_is_honoured_and_unknown_keys_are_named_once():
    config = {"Network": "10.244.0.0/16", "Netwrk": "typo", "Backend": {"Type": "VXLAN", "MTU": 1400, "Prot": 1}}
    with Cluster(nodes=1, config=config) as lab:
        (node,) = lab.nodes
        lab.start_daemon(node)
        assert node.subnet_env().mtu == 1350
        link = json.loads(node.netns.ip("-j", "link", "show", "flannel.1").stdout)[0]
        assert link["mtu"] == 1350
        warnings = [line for line in node.log_text().splitlines() if "network config: ignoring" in line]
        assert len(warnings) == 1 and "Netwrk" in warnings[0] and "Backend.Prot" in warnings[0], warnings


def _start_without_iface(lab: Cluster, node: Node, *args: str) -> None:
    """The lab's daemon on ``node`` with ``args`` instead of its --iface=eth0; waits until ready."""
    argv = [a for a in lab.default_daemon_argv(node) if a != "--iface=eth0"] + list(args)
    with open(node.log_path, "ab") as log:
        node.daemon = subprocess.Popen(node.netns.argv(*argv), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    lab.wait_ready(node)


@pytest.mark.netns
@pytest.mark.etcd
@pytest.mark.slow
def test_interface_flags_in_flannels_order():
    """A missing --iface and a regex that matches nothing are skipped (and logged); --iface-can-reach
    then takes the interface and source address of the kernel's route to etcd's address."""
    with Cluster(nodes=1) as lab:
        (node,) = lab.nodes
        node.netns.ip("link", "add", "extra7", "type", "veth", "peer", "name", "extra7p")  # a second interface
        node.netns.ip("addr", "add", "192.0.2.7/24", "dev", "extra7")
        node.netns.ip("link", "set", "extra7", "up")
        _start_without_iface(lab, node, "--iface=eth9", "-iface-regex", "^wlan", f"--iface-can-reach={ETCD_HOST}")
        text = node.log_text()
        assert "interface candidate skipped: --iface=eth9: no interface named eth9" in text
        assert "interface candidate skipped: --iface-regex=^wlan: matches no interface" in text
        assert "using interface eth0 (198.51.100.1, mtu 1500), public IP 198.51.100.1" in text
        lab.stop_daemon(node)

        # a regex matches addresses before names: 192.0.2.7 is extra7's, although eth0 comes first
        _start_without_iface(lab, node, "--iface-regex=^192\\.0\\.2\\.")
        assert "using interface extra7 (192.0.2.7, mtu 1500), public IP 192.0.2.7" in node.log_text()
        lab.stop_daemon(node)

        # --public-ip alone picks the interface that holds it
        _start_without_iface(lab, node, "-public-ip=192.0.2.7")
        assert node.log_text().count("using interface extra7 (192.0.2.7, mtu 1500), public IP 192.0.2.7") == 2
