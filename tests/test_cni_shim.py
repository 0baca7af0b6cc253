"""The flannel-py shim on its own: its JSON, its checks, its talk with the daemon, its imports."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flanneld_py.install import python_shim

SHIM = python_shim()


def load_shim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flannel_py_under_test", SHIM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shim = load_shim()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_json_round_trips_like_the_json_module(value: Any) -> None:
    text = shim.dumps(value)
    assert json.loads(text) == value
    assert shim.loads(text) == value
    assert shim.loads(json.dumps(value, indent=2)) == value


@pytest.mark.parametrize("text", ["", "   ", "{", '{"a" 1}', "[1,]", "NaN", "[Infinity]", '{"a": 1} x', "'a'"])
def test_bad_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        shim.loads(text)


def test_the_fallback_without_the_c_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shim, "_HAVE_C_JSON", False)
    assert shim.loads(' {"a": [1, 2.5, null]} ') == {"a": [1, 2.5, None]}
    assert json.loads(shim.dumps({"a": "é"})) == {"a": "é"}


# --- checks and answers without a daemon -----------------------------------


def run(env: dict[str, str], stdin: str | bytes) -> tuple[int, Any]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    status, output = shim.run(env, data)
    return status, json.loads(json.dumps(output))  # it must be JSON-able as it is


CONF = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel-py"}
ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0"}


@pytest.mark.parametrize(("env", "stdin", "code"), [
    (ADD_ENV, '{"cniVersion": ', 6),
    (ADD_ENV, b"\xff\xfe", 6),
    (ADD_ENV, "[]", 7),
    ({}, "[]", 7),
])
def test_a_config_it_cannot_read_is_the_shims_own_error(env: dict[str, str], stdin: str | bytes, code: int) -> None:
    """It cannot find the daemon without the config: it says why itself."""
    status, output = run(env, stdin)
    assert status == 1 and output["code"] == code and output["msg"]
    assert output["cniVersion"] == "1.1.0"


# What the daemon refuses (tests/test_cni_server.py); the shim only forwards it.
FORWARDED_UNCHECKED = [
    ({}, json.dumps(CONF)),
    ({"CNI_COMMAND": "ATTACH"}, json.dumps(CONF)),
    (ADD_ENV, json.dumps({"name": "x"})),
    (ADD_ENV, json.dumps({**CONF, "cniVersion": "0.2.0"})),
    ({**ADD_ENV, "CNI_NETNS": ""}, json.dumps(CONF)),
    ({"CNI_COMMAND": "DEL"}, json.dumps(CONF)),
]


@pytest.mark.parametrize(("env", "stdin"), FORWARDED_UNCHECKED)
def test_the_shim_checks_nothing_else_itself(env: dict[str, str], stdin: str, tmp_path: Path) -> None:
    """Without a daemon every command but VERSION is "try again later", however wrong."""
    # away from a node's real socket
    data = b'{"daemonSocket": "%s", ' % str(tmp_path / "none.sock").encode() + stdin.encode()[1:]
    status, output = run(env, data)
    assert status == 1 and output["code"] == 11 and "not running" in output["msg"]
    assert output["cniVersion"] in shim.SUPPORTED_VERSIONS


def test_version_is_answered_without_a_daemon() -> None:
    for version in shim.SUPPORTED_VERSIONS:
        assert run({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": version})) == (
            0, {"cniVersion": version, "supportedVersions": list(shim.SUPPORTED_VERSIONS)})
    assert run({"CNI_COMMAND": "VERSION"}, "")[1]["cniVersion"] == "1.1.0"


def test_no_daemon_means_try_again_later(tmp_path: Path) -> None:
    conf = {**CONF, "daemonSocket": str(tmp_path / "none.sock")}
    status, output = run(ADD_ENV, json.dumps(conf))
    assert status == 1 and output["code"] == 11 and "not running" in output["msg"]
    status, output = run({"CNI_COMMAND": "STATUS"}, json.dumps({**conf, "cniVersion": "1.1.0"}))
    assert status == 1 and output["code"] == 50  # STATUS: "not available"


# --- talking to a daemon ---------------------------------------------------


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[Callable[[bytes], list[bytes]]]:
    """A one-thread unix server answering each connection with a canned reply; yields a setter."""
    path = str(tmp_path / "cni.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    received: list[bytes] = []
    replies: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                received.append(data)
                conn.sendall(replies.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def answer_with(reply: bytes) -> list[bytes]:
        replies.append(reply)
        return received

    answer_with.path = path  # type: ignore[attr-defined]
    try:
        yield answer_with
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


def test_the_request_and_the_answer(fake_daemon: Any) -> None:
    result = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.5.2/24"}]}
    received = fake_daemon(json.dumps({"exit": 0, "output": result}).encode())
    conf = {**CONF, "daemonSocket": fake_daemon.path, "dns": {"nameservers": ["10.96.0.10"]}}
    env = {**ADD_ENV, "CNI_ARGS": "K8S_POD_NAME=web", "CNI_PATH": "/opt/cni/bin"}
    assert run(env, json.dumps(conf)) == (0, result)
    request = json.loads(received[0])
    assert request == {"command": "ADD", "env": env, "config_text": json.dumps(conf)}


def test_daemon_errors_pass_through_and_del_prints_nothing(fake_daemon: Any) -> None:
    conf = json.dumps({**CONF, "daemonSocket": fake_daemon.path})
    error = {"cniVersion": "1.0.0", "code": 101, "msg": "no free address"}
    fake_daemon(json.dumps({"exit": 1, "output": error}).encode())
    assert run(ADD_ENV, conf) == (1, error)
    fake_daemon(b'{"exit": 0, "output": null}')
    assert run({**ADD_ENV, "CNI_COMMAND": "DEL"}, conf) == (0, None)


@pytest.mark.parametrize("reply", [b"", b"garbage", b'{"output": {}}', b'{"exit": 7}'])
def test_an_unreadable_answer_is_our_code_110(fake_daemon: Any, reply: bytes) -> None:
    fake_daemon(reply)
    status, output = run(ADD_ENV, json.dumps({**CONF, "daemonSocket": fake_daemon.path}))
    assert status == 1 and output["code"] == 110


# --- as an executable ------------------------------------------------------


def test_it_runs_from_its_shebang_and_imports_nothing_heavy() -> None:
    assert os.access(SHIM, os.X_OK), "install -m 755 keeps the mode; keep it executable in git too"
    assert SHIM.read_text().splitlines()[0] == "#!/usr/bin/env -S python3 -I -S"
    proc = subprocess.run([str(SHIM)], input=b'{"cniVersion": "0.4.0"}', capture_output=True,
                          env={"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"}, check=True)
    assert json.loads(proc.stdout)["cniVersion"] == "0.4.0"
    proc = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", str(SHIM)],
                          input=json.dumps(CONF).encode(), capture_output=True,
                          env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "e"})
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines() if "|" in line}
    assert imported >= {"_json", "_socket"}
    assert not imported & {"json", "socket", "re", "enum", "os", "flanneld_py", "pyroute2"}, imported
