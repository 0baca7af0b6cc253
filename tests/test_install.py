"""install-cni and install-systemd, and the wheel they are installed from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from flanneld_py import install
from flanneld_py.install import data_file, install_cni, install_systemd, python_shim
from wheel_helpers import build_wheel


def test_install_cni_puts_the_compiled_shim_and_the_conflist(tmp_path: Path) -> None:
    lines: list[str] = []
    result = install_cni(tmp_path / "bin", tmp_path / "net.d", lines.append)
    assert result.compiled == (install.compiled_shim() is not None)
    assert (tmp_path / "bin" / "flannel-py").stat().st_mode & 0o777 == 0o755
    assert json.loads((tmp_path / "net.d" / "10-flannel-py.conflist").read_text())["plugins"][0]["type"] == "flannel-py"
    assert lines[0].startswith("installed ") and lines[1].startswith("installed ")
    proc = subprocess.run([str(result.plugin)], env={"CNI_COMMAND": "VERSION"}, input=b"{}", capture_output=True,
                          timeout=30, check=True)
    assert "supportedVersions" in json.loads(proc.stdout)


def test_install_cni_twice_changes_nothing_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    install_cni(tmp_path, tmp_path, lambda line: None)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    lines: list[str] = []
    install_cni(tmp_path, tmp_path, lines.append)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert lines[0].startswith("unchanged ") and lines[1].startswith("unchanged ")
    assert sorted(before) == ["10-flannel-py.conflist", "flannel-py"]


def test_install_cni_replaces_a_changed_plugin(tmp_path: Path) -> None:
    (tmp_path / "flannel-py").write_text("old")
    lines: list[str] = []
    install_cni(tmp_path, tmp_path, lines.append)
    assert lines[0].startswith("replaced ") and (tmp_path / "flannel-py").read_bytes() != b"old"


def test_without_a_compiled_shim_the_python_one_goes_in_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(install, "compiled_shim", lambda: None)
    lines: list[str] = []
    result = install_cni(tmp_path, tmp_path, lines.append)
    assert not result.compiled and lines[0].startswith("warning: no compiled CNI shim")
    assert (tmp_path / "flannel-py").read_bytes() == python_shim().read_bytes()
    proc = subprocess.run([str(tmp_path / "flannel-py")], env={"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]},
                          input=b"{}", capture_output=True, timeout=30, check=True)
    assert "supportedVersions" in json.loads(proc.stdout)


def test_install_systemd_points_the_unit_at_this_program(tmp_path: Path) -> None:
    install_systemd(tmp_path / "system", tmp_path / "default" / "flanneld-py", "/opt/fp/bin/flanneld-py",
                    lambda line: None)
    unit = (tmp_path / "system" / "flanneld-py.service").read_text()
    assert "ExecStart=/opt/fp/bin/flanneld-py\n" in unit and "/usr/local/bin" not in unit
    assert (tmp_path / "default" / "flanneld-py").read_bytes() == data_file("flanneld-py.default").read_bytes()


def test_install_systemd_keeps_an_edited_defaults_file(tmp_path: Path) -> None:
    defaults = tmp_path / "flanneld-py"
    defaults.write_text("FLANNELD_ETCD_ENDPOINTS=http://10.0.0.5:2379\n")
    lines: list[str] = []
    install_systemd(tmp_path, defaults, "/opt/fp/bin/flanneld-py", lines.append)
    assert defaults.read_text() == "FLANNELD_ETCD_ENDPOINTS=http://10.0.0.5:2379\n"
    assert (tmp_path / "flanneld-py.new").read_bytes() == data_file("flanneld-py.default").read_bytes()
    assert any(line.startswith(f"kept {defaults}") for line in lines)


def test_a_program_under_home_is_warned_about(tmp_path: Path) -> None:
    lines: list[str] = []
    install_systemd(tmp_path, tmp_path / "d", "/root/venv/bin/flanneld-py", lines.append)
    assert lines[0].startswith("warning:") and "ProtectHome" in lines[0]


def test_an_unwritable_target_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "flanneld_py", "install-cni", f"--bin-dir={blocker}/bin",
                           f"--conf-dir={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:"), proc.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_compiled_parts_and_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        modes = {info.filename: info.external_attr >> 16 for info in archive.infolist()}
    assert modes["flanneld_py/cni/bin/flannel-py"] & 0o111
    assert any(name.startswith("flanneld_py/backend/udp/_offload.") for name in modes)
    assert {"flanneld_py/data/flanneld-py.service", "flanneld_py/data/flanneld-py.default",
            "flanneld_py/data/10-flannel-py.conflist", "flanneld_py/cni/shim.py"} <= set(modes)
    assert not any(name.split("/")[0] in ("flannel_py.py", "cni", "systemd", "bench", "tests") for name in modes)
    # Installed without its dependencies (the test venv has them): the install steps need none.
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    subprocess.run([str(target / "bin" / "pip"), "install", "--quiet", "--no-deps", str(wheel)], check=True, timeout=600)
    proc = subprocess.run([str(target / "bin" / "flanneld-py"), "install-cni", f"--bin-dir={tmp_path}/bin",
                           f"--conf-dir={tmp_path}/net.d"], capture_output=True, text=True, timeout=60, check=True)
    assert "(compiled shim)" in proc.stdout
    assert (tmp_path / "bin" / "flannel-py").read_bytes() == (
        next((target / "lib").glob("python3*/site-packages/flanneld_py/cni/bin/flannel-py")).read_bytes())
