"""A real etcd server (one member or a cluster member) for tests, bench and the demo."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from .netns import Netns, run

__all__ = ["EtcdMember", "etcdctl_argv"]

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def etcdctl_argv(endpoints: str, *args: str, tls: dict[str, str] | None = None) -> list[str]:
    argv = [ETCDCTL, f"--endpoints={endpoints}", "--command-timeout=5s"]
    for flag, path in (tls or {}).items():
        argv.append(f"--{flag}={path}")
    return argv + list(args)


@dataclass
class EtcdMember:
    """One etcd process listening on ``host`` (in ``netns`` if given), data under ``workdir``."""

    name: str
    host: str
    workdir: str
    client_port: int = 2379
    peer_port: int = 2380
    netns: Netns | None = None
    initial_cluster: str | None = None
    tls_args: list[str] = field(default_factory=list)
    scheme: str = "http"
    client_tls: dict[str, str] | None = None  # etcdctl's TLS flags when a call gives none
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"etcd-{self.name}.log")

    def start(self, wait: bool = True) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        argv = [
            ETCD,
            f"--name={self.name}",
            f"--data-dir={os.path.join(self.workdir, 'etcd-' + self.name)}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            *self.tls_args,
        ]
        if self.netns is not None:
            argv = self.netns.argv(*argv)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready()

    def ctl(self, *args: str, check: bool = True, tls: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = etcdctl_argv(self.client_url, *args, tls=tls or self.client_tls)
        if self.netns is not None:
            argv = self.netns.argv(*argv)
        return run(argv, check=check, env={**os.environ, "ETCDCTL_API": "3"})

    def wait_ready(self, timeout: float = 20.0, tls: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited ({self.proc.returncode}); see {self.log_path}")
            if self.ctl("endpoint", "health", check=False, tls=tls).returncode == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"etcd {self.name} not healthy after {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        """Stop the process (data is kept, so ``start()`` brings the member back)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
