"""The machine a run happened on, for results.json and the report's first lines."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["describe_machine", "loadavg", "parse_cpuinfo_model", "parse_meminfo_gib", "parse_os_release"]

REPO = Path(__file__).resolve().parents[1]


def parse_cpuinfo_model(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def parse_meminfo_gib(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def parse_os_release(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return ""


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def _first_line(argv: list[str], cwd: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr).strip() else ""


def _flanneld_py_version() -> str:
    from flanneld_py import __version__

    commit = _first_line(["git", "rev-parse", "--short", "HEAD"], cwd=str(REPO))
    return f"{__version__} ({commit})" if commit else __version__


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg prints them."""
    return _read("/proc/loadavg").split()[:3]


def describe_machine() -> dict[str, Any]:
    """CPU, memory, kernel, OS, tool versions and load; every value read on this machine now."""
    return {
        "cpu_model": parse_cpuinfo_model(_read("/proc/cpuinfo")),
        "cpus": os.cpu_count(),
        "memory_gib": parse_meminfo_gib(_read("/proc/meminfo")),
        "kernel": platform.release(),
        "os": parse_os_release(_read("/etc/os-release")),
        "virtualization": _first_line(["systemd-detect-virt"]),
        "python": platform.python_version(),
        "iperf3": _first_line(["iperf3", "--version"]),
        "ping": _first_line(["ping", "-V"]),
        "etcd": _first_line(["etcd", "--version"]),
        "flanneld_py": _flanneld_py_version(),
        "loadavg_at_start": loadavg(),
    }
