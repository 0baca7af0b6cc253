"""The unit passes ``systemd-analyze verify``; the example environment file parses as options."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from flanneld_py.install import data_file
from flanneld_py.options import FLAGS, parse_options

UNIT = data_file("flanneld-py.service")
INSTALLED_PATH = "/usr/local/bin/flanneld-py"


def installed_binary() -> str | None:
    """The flanneld-py script next to this interpreter (a venv), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "flanneld-py")
    return beside if os.access(beside, os.X_OK) else shutil.which("flanneld-py")


def unit_lines() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path):
    binary = installed_binary()
    assert binary, "flanneld-py is not installed (pip install -e .)"
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_PATH}\n" in text
    # verify wants ExecStart to exist: check a copy pointing at this installation.
    copy = tmp_path / "flanneld-py.service"
    copy.write_text(text.replace(INSTALLED_PATH, binary))
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "flanneld-py.service" not in proc.stderr, proc.stderr  # no warnings about our unit


def test_unit_essentials():
    unit = unit_lines()
    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["WatchdogSec"] and unit["EnvironmentFile"] == ["-/etc/default/flanneld-py"]
    assert "network-online.target" in unit["After"][0] and "network-online.target" in unit["Wants"][0]
    caps = unit["CapabilityBoundingSet"][0].split()
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW"} <= set(caps)
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["DeviceAllow"] == ["/dev/net/tun rw"]
    assert unit["RuntimeDirectory"] == ["flannel"] and unit["RuntimeDirectoryPreserve"] == ["yes"]


def test_example_environment_file_parses():
    known = {flag.env for flag in FLAGS}
    environ, mentioned = {}, set()
    for line in data_file("flanneld-py.default").read_text().splitlines():
        assignment = line.lstrip("#")
        if assignment.startswith("FLANNELD_"):
            key, _, value = assignment.partition("=")
            mentioned.add(key)
            if not line.startswith("#"):
                environ[key] = value
    assert mentioned == known, (mentioned - known, known - mentioned)  # every flag, nothing else
    options = parse_options([], environ)
    assert options.ip_masq is True and options.healthz_port == 8471
    assert options.control_socket == "/run/flannel/flanneld-py.sock"
