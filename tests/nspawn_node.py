"""A Debian 12 node booted by systemd-nspawn, with flanneld-py installed as the README says.

Three layers, so that a test session pays for the slow part once:

- the base root file system (mmdebstrap from this machine's apt sources: systemd, python3,
  iptables, iproute2, and a venv /opt/flanneld-py holding flanneld-py's dependencies, built
  from wheels made here with this machine's pip configuration), cached under
  ``$FLANNELD_TEST_NSPAWN_CACHE`` (default /var/tmp/flanneld-py-nspawn) by a hash of what
  goes in, rebuilt when missing;
- a session layer (an overlay mount on the base) where this checkout's wheel is installed
  and ``install-cni`` and ``install-systemd`` are run, as in README "Installing on a node";
- per booted container, nspawn's throwaway tmpfs overlay (``--volatile=overlay``).

The container boots in a lab node's network namespace (``--network-namespace-path``) and is
driven from outside with ``nsenter -t <its init> -a`` (no machined: ``--register=no``).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from flanneld_py.lab.checks import wait_until
from wheel_helpers import REPO, build_wheel

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "iptables", "iproute2",
            "iputils-ping", "procps")
CACHE = Path(os.environ.get("FLANNELD_TEST_NSPAWN_CACHE", "/var/tmp/flanneld-py-nspawn"))
VENV = "/opt/flanneld-py"
INNER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
             "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
# nspawn keeps CAP_NET_ADMIN out of the container's bounding set unless the container has a
# private network; the daemon needs it for netlink, TUN and iptables. CAP_SYS_ADMIN (setns into
# pod namespaces) and CAP_NET_RAW are in nspawn's default set already.
NSPAWN_CAPABILITIES = "CAP_NET_ADMIN"


def apt_sources() -> list[Path]:
    """This machine's apt source files that name Debian 12 (mmdebstrap pastes each into the root)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
                  *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    found = []
    for path in candidates:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        if any(SUITE in line for line in lines if not line.lstrip().startswith("#")):
            found.append(path)
    return found


def unavailable_reason() -> str | None:
    """Why this machine cannot boot the test node, or None."""
    if os.geteuid() != 0:
        return "booting a systemd-nspawn node needs root"
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container mmdebstrap)"
    if not apt_sources():
        return f"no apt source for Debian {SUITE} is configured on this machine"
    return None


def project_dependencies() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def run(argv: Sequence[str], timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_in_root(root: Path, script: str, binds: Sequence[tuple[Path, str]] = ()) -> str:
    """Run a shell script inside ``root`` (not booted), as a set-up step."""
    argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--console=pipe", "-D", str(root),
            *(f"--bind-ro={source}:{target}" for source, target in binds), "/bin/sh", "-ec", script]
    return run(argv, stdin=subprocess.DEVNULL, env={**os.environ, **INNER_ENV}).stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def base_rootfs() -> Path:
    """The cached Debian root with the dependencies' venv; built (a minute or two) when missing."""
    deps = project_dependencies()
    key = hashlib.sha256(json.dumps({"suite": SUITE, "packages": PACKAGES, "deps": deps, "layout": 1}).encode())
    final = CACHE / f"base-{key.hexdigest()[:16]}"
    with _locked(CACHE / "build.lock"):
        if (final / "root" / "etc" / "os-release").exists():
            return final / "root"
        work = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
        try:
            root, wheels = work / "root", work / "wheels"
            run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root),
                 *map(str, apt_sources())])
            run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), *deps])
            run_in_root(root, f"python3 -m venv {VENV}\n"
                              f"{VENV}/bin/pip install --quiet --no-index --find-links /wheels /wheels/*.whl",
                        binds=[(wheels, "/wheels")])
            shutil.rmtree(wheels)
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final / "root"


# What README "Installing on a node" has an operator run, from the wheel to an enabled unit.
INSTALL_SCRIPT = f"""
python3 -m venv {VENV}
{VENV}/bin/pip install --quiet --no-index --find-links /wheel flanneld-py
{VENV}/bin/flanneld-py install-cni
{VENV}/bin/flanneld-py install-systemd
"""


class SessionRoot:
    """The base root with this checkout installed on top (an overlay mount), removed on close."""

    def __init__(self, defaults: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="session-", dir=CACHE))
        self.root = self.dir / "root"
        self.mounted = False
        try:
            self._build(base_rootfs(), defaults)
        except BaseException:
            self.close()
            raise

    def _build(self, base: Path, defaults: dict[str, str]) -> None:
        for name in ("upper", "work", "root", "wheel"):
            (self.dir / name).mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={base},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}", str(self.root)])
        self.mounted = True
        build_wheel(self.dir / "wheel")
        self.install_log = run_in_root(self.root, INSTALL_SCRIPT, binds=[(self.dir / "wheel", "/wheel")])
        self.set_defaults(defaults)
        run_in_root(self.root, "systemctl enable flanneld-py")

    def set_defaults(self, values: dict[str, str]) -> None:
        """Set variables in /etc/default/flanneld-py as an operator edits it."""
        path = self.root / "etc/default/flanneld-py"
        path.write_text(edit_defaults(path.read_text(), values))

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.root)], check=False)
            self.mounted = False
        shutil.rmtree(self.dir, ignore_errors=True)


def edit_defaults(text: str, values: dict[str, str]) -> str:
    """The defaults file with each ``values`` key set (uncommented or appended)."""
    lines, done = [], set()
    for line in text.splitlines():
        key = line.lstrip("#").partition("=")[0]
        if key in values:
            if key not in done:
                lines.append(f"{key}={values[key]}")
                done.add(key)
            continue
        lines.append(line)
    lines += [f"{key}={value}" for key, value in values.items() if key not in done]
    return "\n".join(lines) + "\n"


class BootedNode:
    """A container booted from ``root`` (throwaway overlay) in the network namespace ``netns_path``."""

    def __init__(self, root: Path, netns_path: str, name: str, log_path: str) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "--console=pipe", "--quiet",
                 f"--capability={NSPAWN_CAPABILITIES}", f"--machine={name}", "-D", str(root),
                 "--volatile=overlay", f"--network-namespace-path={netns_path}", "-b"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.leader = self._find_leader()
        except BaseException:
            self.close()
            raise

    def _find_leader(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: {self.log_tail()}")
            for stat in glob.glob("/proc/[0-9]*/stat"):
                try:
                    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    return int(stat.split("/")[2])
            time.sleep(0.1)
        raise TimeoutError(f"container {self.name} did not start its init: {self.log_tail()}")

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-3000:]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (its namespaces, root directory and environment)."""
        proc = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *cmd], input=stdin, capture_output=True,
                              text=True, timeout=timeout, env=INNER_ENV, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"in {self.name}: {' '.join(cmd)} exited {proc.returncode}: {proc.stdout} {proc.stderr}")
        return proc

    def wait_until(self, what: str, predicate: Callable[[], object], timeout: float = 60) -> None:
        """Wait for ``predicate``; on time-out fail with the container's journal."""
        if not wait_until(lambda: predicate() or self.proc.poll() is not None, timeout, interval=0.25):
            raise TimeoutError(f"{self.name}: not {what} after {timeout}s\n{self.journal()[-4000:]}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"container {self.name} exited: {self.log_tail()}")

    def wait_booted(self, timeout: float = 90) -> None:
        self.wait_until("booted", lambda: self.run("systemctl", "is-system-running", check=False).stdout.strip()
                        in ("running", "degraded", "starting"), timeout)

    # --- the unit -------------------------------------------------------------

    def unit(self, *props: str, unit: str = "flanneld-py") -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-b", *args, check=False).stdout

    def unit_journal_json(self) -> list[dict[str, str]]:
        out = self.run("journalctl", "--no-pager", "-b", "-u", "flanneld-py", "-o", "json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def main_pid(self) -> int:
        return int(self.unit("MainPID")["MainPID"])

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def close(self) -> None:
        """Power the container off (SIGTERM to nspawn), killing it if that takes too long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, AttributeError):
                    os.kill(self.leader, signal.SIGKILL)  # its pid namespace goes with it
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
