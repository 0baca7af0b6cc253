"""Named network namespaces and commands inside them, via iproute2."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Netns", "run", "unique_tag"]


def unique_tag() -> str:
    """A short tag that makes namespace and device names unique per run."""
    return secrets.token_hex(3)


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text, raise with stderr on failure."""
    proc: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@dataclass
class Netns:
    """A named network namespace (``/var/run/netns/<name>``) that removes itself."""

    name: str

    @classmethod
    def create(cls, name: str) -> Netns:
        run(["ip", "netns", "add", name])
        ns = cls(name)
        ns.ip("link", "set", "lo", "up")
        return ns

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*cmd), check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.name, *args], check=check)

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(*cmd), **kwargs)  # type: ignore[call-overload]
        return proc

    def kill_processes(self) -> None:
        """Kill whatever still runs in the namespace (``ip netns pids``)."""
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass

    def delete(self) -> None:
        if self.exists():
            self.kill_processes()
            run(["ip", "netns", "del", self.name], check=False)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()
