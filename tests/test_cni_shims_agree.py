"""The compiled shim (flanneld_py/cni/shim.c) answers exactly as the Python shim does.

Both are run as a runtime runs them, on the same inputs: VERSION, every kind of
malformed input, JSON corner cases (escapes, duplicate keys, nesting, numbers,
NaN, a byte-order mark, bad UTF-8), no daemon, and requests the daemon judges
(all but VERSION: the shims only frame and forward, and read the config only for
the daemon's socket and the version of their own answers).
Outputs must be equal but for ``details``, which quotes each side's own error text.
"""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Interface
from typing import Any

import pytest

from cni_helpers import CniNode, cni_network, pod_state, run_plugin, with_prev_result
from flanneld_py.install import compiled_shim
from flanneld_py.lab.cluster import cni_plugin_argv

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(compiled_shim() is None, reason="the compiled CNI shim is not built (no C compiler at install)")]

ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "agree-1", "CNI_NETNS": "/var/run/netns/nowhere",
           "CNI_IFNAME": "eth0"}


def both(node: CniNode, env: dict[str, str], stdin: bytes) -> tuple[tuple[int, Any], tuple[int, Any]]:
    """(exit code, output without details) of the Python shim and of the compiled one."""
    answers = []
    for kind in ("python", "compiled"):
        run = run_plugin(node.node, cni_plugin_argv(kind), env, stdin)
        output = run.output
        if isinstance(output, dict):
            output.pop("details", None)
        answers.append((run.code, output))
    return answers[0], answers[1]


def config(**extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "agree", "type": "flannel-py", **extra}


# stdin cases judged by the shims alone (the socket named, if any, does not exist)
ALONE = {
    "valid, no daemon": json.dumps(config(daemonSocket="/nonexistent/cni.sock")).encode(),
    "default socket absent": json.dumps(config(daemonSocket="")).encode(),
    "socket path too long": json.dumps(config(daemonSocket="/nonexistent/" + "x" * 200)).encode(),
    "escaped socket path": b'{"cniVersion":"1.0.0","name":"a","daemonSocket":"\\/nonexistent\\/x\\u00e9.sock"}',
    "bad json": b'{"cniVersion": "1.0.0",',
    "trailing garbage": b'{"cniVersion": "1.0.0"} x',
    "empty stdin": b"",
    "only whitespace": b" \n\t ",
    "not an object": b'["cniVersion", "1.0.0"]',
    "a bare string": b'"1.0.0"',
    "no cniVersion": b'{"name": "a"}',
    "empty cniVersion": b'{"cniVersion": ""}',
    "cniVersion not a string": b'{"cniVersion": 1.0}',
    "unknown version": b'{"cniVersion": "9.9.9"}',
    "duplicate keys: the last wins": b'{"cniVersion": "9.9.9", "cniVersion": "0.4.0", "daemonSocket": "/nonexistent/a"}',
    "nested daemonSocket is not the config's": b'{"cniVersion": "1.0.0", "args": {"daemonSocket": "/tmp"}, '
                                               b'"daemonSocket": "/nonexistent/b"}',
    "numbers of every form": b'{"cniVersion": "1.0.0", "n": [0, -1, 1.5, 2e10, -3.25E-7, 1e+2], '
                             b'"daemonSocket": "/nonexistent/c"}',
    "bad number": b'{"cniVersion": "1.0.0", "n": 01}',
    **{f"bad number {text}": b'{"cniVersion": "1.0.0", "n": ' + text.encode() + b'}'
       for text in ("+1", "--1", "1.", ".5", "1e", "1e+", "-", "0x1", "1_0", "Infinity", "-Infinity")},
    **{f"bad literal {text}": b'{"cniVersion": "1.0.0", "t": ' + text.encode() + b'}'
       for text in ("True", "nul", "nulll", "falsey", "undefined")},
    "NaN": b'{"cniVersion": "1.0.0", "n": NaN}',
    "bad literal": b'{"cniVersion": "1.0.0", "t": tru}',
    "byte-order mark": b'\xef\xbb\xbf{"cniVersion": "1.0.0"}',
    "bad UTF-8": b'{"cniVersion": "1.0.0", "name": "\xff"}',
    "overlong UTF-8": b'{"cniVersion": "1.0.0", "name": "\xc0\xaf"}',
    "control character in a string": b'{"cniVersion": "1.0.0", "name": "a\tb"}',
    "deep nesting": b'{"cniVersion": "1.0.0", "x": ' + b"[" * 300 + b"]" * 300 + b', "daemonSocket": "/nonexistent/d"}',
    "unicode in values": '{"cniVersion": "1.0.0", "name": "réseau-网络", "daemonSocket": "/nonexistent/e"}'.encode(),
}


@pytest.mark.parametrize("case", list(ALONE))
@pytest.mark.parametrize("command", ["ADD", "DEL", "STATUS", "VERSION"])
def test_same_answer_without_the_daemon(cni_node: CniNode, case: str, command: str) -> None:
    env = {**ADD_ENV, "CNI_COMMAND": command}
    python, compiled = both(cni_node, env, ALONE[case])
    assert compiled == python


@pytest.mark.parametrize("case", sorted(ALONE))
def test_same_answer_from_the_daemon_for_the_same_input(cni_node: CniNode, case: str) -> None:
    """The inputs above, sent to a daemon where the shims can tell where it is: both forward
    them unchecked, so the daemon's verdict (or "not running") comes back through either."""
    data = ALONE[case]
    if data.startswith(b"{"):
        data = b'{"daemonSocket": "%s", ' % cni_node.server.socket_path.encode() + data[1:]
    python, compiled = both(cni_node, ADD_ENV, data)
    assert compiled == python


@pytest.mark.parametrize(("case", "env"), [
    ("no CNI_COMMAND", {k: v for k, v in ADD_ENV.items() if k != "CNI_COMMAND"}),
    ("empty CNI_COMMAND", {**ADD_ENV, "CNI_COMMAND": ""}),
    ("unknown CNI_COMMAND", {**ADD_ENV, "CNI_COMMAND": "RESET"}),
    ("ADD without CNI_NETNS", {k: v for k, v in ADD_ENV.items() if k != "CNI_NETNS"}),
    ("ADD without any", {"CNI_COMMAND": "ADD"}),
    ("DEL without CNI_IFNAME", {**{k: v for k, v in ADD_ENV.items() if k != "CNI_IFNAME"}, "CNI_COMMAND": "DEL"}),
    ("CHECK without CNI_CONTAINERID", {**{k: v for k, v in ADD_ENV.items() if k != "CNI_CONTAINERID"},
                                       "CNI_COMMAND": "CHECK"}),
])
def test_same_answer_for_a_bad_environment(cni_node: CniNode, case: str, env: dict[str, str]) -> None:
    python, compiled = both(cni_node, env, json.dumps(config(daemonSocket="/nonexistent/f")).encode())
    assert compiled == python


@pytest.mark.parametrize(("case", "command", "conf"), [
    ("bad network name", "ADD", config(name="bad name!")),
    ("bad key type", "ADD", config(isDefaultGateway="yes")),
    ("CHECK without prevResult", "CHECK", config()),
    ("GC before 1.1.0", "GC", config()),
    ("DEL of nothing", "DEL", config()),
    ("absent namespace", "ADD", config()),
    ("missing subnet file", "ADD", config(subnetFile="/nonexistent/subnet.env")),
    ("STATUS without a subnet file", "STATUS", {**config(subnetFile="/nonexistent/subnet.env"), "cniVersion": "1.1.0"}),
])
def test_same_answer_from_the_daemon(cni_node: CniNode, case: str, command: str, conf: dict[str, Any]) -> None:
    conf = {**conf, "daemonSocket": cni_node.server.socket_path, "dataDir": str(cni_node.workdir / "agree")}
    env = {**ADD_ENV, "CNI_COMMAND": command, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=a"}
    python, compiled = both(cni_node, env, json.dumps(conf).encode())
    assert compiled == python
    assert python[0] in (0, 1) and (python[1] is None or isinstance(python[1], dict))


@pytest.mark.parametrize("kind", ["python", "compiled"])
def test_a_pod_wired_through_either_shim(cni_node: CniNode, kind: str) -> None:
    """ADD, CHECK and DEL of a real pod through each build (the other tests run the compiled one)."""
    with cni_network(cni_node, 97 if kind == "python" else 98) as net:
        pod = net.pod(kind[0])
        conf = net.conf("1.0.0")
        env = {"CNI_CONTAINERID": f"agree-{kind}", "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0"}
        added = run_plugin(cni_node.node, cni_plugin_argv(kind), {**env, "CNI_COMMAND": "ADD"}, json.dumps(conf))
        result = added.ok()
        address = result["ips"][0]["address"]
        assert IPv4Interface(address).network == net.subnet
        assert address in pod_state(pod)["addresses"]
        checked = run_plugin(cni_node.node, cni_plugin_argv(kind), {**env, "CNI_COMMAND": "CHECK"},
                             json.dumps(with_prev_result(conf, result)))
        assert checked.ok() is None
        deleted = run_plugin(cni_node.node, cni_plugin_argv(kind), {**env, "CNI_COMMAND": "DEL"}, json.dumps(conf))
        assert deleted.ok() is None
        net.wait_removed(f"agree-{kind}")


def test_same_answer_for_mutated_configs(cni_node: CniNode) -> None:
    """A seeded differential run: 150 random byte-level mutations of a config (JSON syntax
    characters, digits, escapes, bytes that break UTF-8), judged by both builds alone."""
    rng = random.Random(20261126)
    base = json.dumps({"cniVersion": "1.0.0", "name": "a", "type": "flannel-py", "daemonSocket": "/nonexistent/g",
                       "args": {"x": [1, 2.5, -3e2, True, None, "é\\\""]}}).encode()
    alphabet = b'{}[]",:\\ 0123456789eE.-+tfnulr\xff\xc3\xa9'
    differences = []
    for _ in range(150):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data))
            roll = rng.random()
            if roll < 0.4:
                del data[position]
            elif roll < 0.8:
                data[position:position] = bytes([rng.choice(alphabet)])
            else:
                data[position] = rng.randrange(256)
        python, compiled = both(cni_node, ADD_ENV, bytes(data))
        if python != compiled:
            differences.append((bytes(data), python, compiled))
    assert not differences, differences[:3]
