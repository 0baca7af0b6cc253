"""``flanneld-py install-cni`` and ``flanneld-py install-systemd``: put this installation's
CNI plugin, conflist, unit and defaults file where a node's kubelet and systemd look.

Every file is written as kube-flannel's install-cni step writes its own: to a temporary name
in the target directory, then renamed over the target, so a runtime never runs a half-written
plugin. Running a step again changes nothing that is already right. The one file an operator
edits, ``/etc/default/flanneld-py``, is never overwritten: a different one is kept and the
shipped version is put next to it as ``.new``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CniInstall", "compiled_shim", "data_file", "install_cni", "install_systemd", "main_install_cni",
    "main_install_systemd", "python_shim",
]

PACKAGE = Path(__file__).resolve().parent
PLUGIN_NAME = "flannel-py"
CONFLIST_NAME = "10-flannel-py.conflist"
UNIT_NAME = "flanneld-py.service"
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_DEFAULTS_FILE = "/etc/default/flanneld-py"
UNIT_PROGRAM = "/usr/local/bin/flanneld-py"  # the unit file's ExecStart as shipped


def compiled_shim() -> Path | None:
    """The CNI shim compiled when the package was built (setup.py), or None without a compiler."""
    path = PACKAGE / "cni" / "bin" / PLUGIN_NAME
    return path if os.access(path, os.X_OK) else None


def python_shim() -> Path:
    """The stdlib-only Python build of the shim, for a node that has no compiled one."""
    return PACKAGE / "cni" / "shim.py"


def data_file(name: str) -> Path:
    """A file shipped in ``flanneld_py/data`` (the unit, the defaults file, the conflist)."""
    return PACKAGE / "data" / name


def write_atomically(path: Path, content: bytes, mode: int) -> str:
    """Make ``path`` hold ``content`` with ``mode``: "installed", "replaced" or "unchanged"."""
    try:
        if path.read_bytes() == content and (path.stat().st_mode & 0o7777) == mode:
            return "unchanged"
        outcome = "replaced"
    except FileNotFoundError:
        outcome = "installed"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            os.fchmod(handle.fileno(), mode)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return outcome


@dataclass(frozen=True)
class CniInstall:
    plugin: Path
    conflist: Path
    compiled: bool


def install_cni(bin_dir: Path, conf_dir: Path, say: Callable[[str], None] = print) -> CniInstall:
    """Install the shim as ``bin_dir/flannel-py`` (compiled if built, else the Python one) and
    the conflist as ``conf_dir/10-flannel-py.conflist``."""
    shim = compiled_shim()
    source, kind = (shim, "compiled shim") if shim else (python_shim(), "Python shim")
    if shim is None:
        say("warning: no compiled CNI shim in this installation (built without a C compiler); "
            "installing the Python shim, which needs python3 on the node and adds ~8 ms per pod")
    plugin = bin_dir / PLUGIN_NAME
    say(f"{write_atomically(plugin, source.read_bytes(), 0o755)} {plugin} ({kind})")
    conflist = conf_dir / CONFLIST_NAME
    say(f"{write_atomically(conflist, data_file(CONFLIST_NAME).read_bytes(), 0o644)} {conflist}")
    if not (bin_dir / "portmap").exists():
        say(f"note: the conflist chains the portmap plugin, which is not in {bin_dir} "
            f"(Debian: apt-get install containernetworking-plugins; ln -s /usr/lib/cni/portmap {bin_dir}/)")
    return CniInstall(plugin, conflist, shim is not None)


def install_systemd(unit_dir: Path, defaults_file: Path, program: str, say: Callable[[str], None] = print) -> None:
    """Install the unit (its ExecStart pointed at ``program``) and, unless an operator's one is
    there, the defaults file."""
    if program.startswith(("/home/", "/root/")):
        say(f"warning: {program} is under /home or /root, which the unit hides (ProtectHome=yes); "
            "install into a venv elsewhere, e.g. /opt/flanneld-py")
    unit_text = data_file(UNIT_NAME).read_text().replace(f"ExecStart={UNIT_PROGRAM}\n", f"ExecStart={program}\n")
    unit = unit_dir / UNIT_NAME
    say(f"{write_atomically(unit, unit_text.encode(), 0o644)} {unit}")
    shipped = data_file("flanneld-py.default").read_bytes()
    if defaults_file.exists() and defaults_file.read_bytes() != shipped:
        new = defaults_file.with_name(defaults_file.name + ".new")
        write_atomically(new, shipped, 0o644)
        say(f"kept {defaults_file} (it differs from the shipped one, which is now at {new}: compare them)")
    else:
        say(f"{write_atomically(defaults_file, shipped, 0o644)} {defaults_file}")
    say(f"next: edit {defaults_file} (FLANNELD_ETCD_ENDPOINTS), then "
        "systemctl daemon-reload && systemctl enable --now flanneld-py")


def this_program() -> str:
    """The flanneld-py script of this installation: beside the interpreter (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "flanneld-py"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("flanneld-py") or UNIT_PROGRAM


def main_install_cni(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="flanneld-py install-cni",
                                     description="Install the flannel-py CNI plugin and its conflist.")
    parser.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, help=f"CNI plugin directory (default {DEFAULT_BIN_DIR})")
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help=f"CNI config directory (default {DEFAULT_CONF_DIR})")
    args = parser.parse_args(argv)
    return _run(lambda: install_cni(Path(args.bin_dir), Path(args.conf_dir)))


def main_install_systemd(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="flanneld-py install-systemd",
                                     description="Install flanneld-py.service and /etc/default/flanneld-py.")
    parser.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=f"default {DEFAULT_UNIT_DIR}")
    parser.add_argument("--defaults-file", default=DEFAULT_DEFAULTS_FILE, help=f"default {DEFAULT_DEFAULTS_FILE}")
    parser.add_argument("--exec-start", metavar="PROGRAM",
                        help="the flanneld-py program the unit runs (default: this installation's)")
    args = parser.parse_args(argv)
    program = args.exec_start or this_program()
    if not os.path.isabs(program):
        parser.error(f"--exec-start {program}: systemd needs an absolute path")
    return _run(lambda: install_systemd(Path(args.unit_dir), Path(args.defaults_file), program))


def _run(step: Callable[[], object]) -> int:
    try:
        step()
    except OSError as error:
        print(f"error: {error.filename or ''}: {error.strerror or error} (run as root?)", file=sys.stderr)
        return 1
    return 0
