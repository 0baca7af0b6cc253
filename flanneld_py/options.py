"""Daemon flags with flanneld's names, each also readable as ``FLANNELD_<FLAG>``.

Parsing turns argv + environment into one frozen :class:`DaemonOptions`; bad
usage exits 2 with a one-line reason (argparse's convention).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import __version__
from .logs import journal_attached

__all__ = ["DEFAULT_CONTROL_SOCKET", "DaemonOptions", "build_parser", "parse_duration", "parse_options"]

DEFAULT_CONTROL_SOCKET = "/run/flannel/flanneld-py.sock"

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_duration(text: str) -> float:
    """Go-style durations: ``24h``, ``5s``, ``1h30m``, ``500ms``; a bare number is seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * scale[match.group(2)]
        pos = match.end()
    if pos != len(text) or total <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 24h, 90m, 5s)")
    return total


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (use true or false)")


def _verbosity(text: str) -> int:
    try:
        return int(text.lstrip("="))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid verbosity {text!r}") from None


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    etcd_endpoints: str
    etcd_prefix: str
    etcd_keyfile: str | None
    etcd_certfile: str | None
    etcd_cafile: str | None
    etcd_username: str | None
    etcd_password: str | None
    iface: str | None
    public_ip: str | None
    subnet_file: str
    subnet_lease_renew_margin: int
    subnet_lease_ttl: float
    ip_masq: bool
    healthz_ip: str
    healthz_port: int
    cni_socket: str
    cleanup_on_exit: bool
    offload: bool
    verbosity: int
    control_socket: str = DEFAULT_CONTROL_SOCKET


# (flag, type, default, help); the env var is FLANNELD_ + flag upper-cased with - as _.
_FLAGS: list[tuple[str, object, object, str]] = [
    ("etcd-endpoints", str, "http://127.0.0.1:4001,http://127.0.0.1:2379", "comma-separated etcd endpoints"),
    ("etcd-prefix", str, "/coreos.com/network", "etcd prefix of the network config and leases"),
    ("etcd-keyfile", str, None, "TLS client key for etcd"),
    ("etcd-certfile", str, None, "TLS client certificate for etcd"),
    ("etcd-cafile", str, None, "CA bundle that signed the etcd server certificates"),
    ("etcd-username", str, None, "etcd user name (with --etcd-password)"),
    ("etcd-password", str, None, "etcd password"),
    ("iface", str, None, "underlay interface, by name or address (default: the default route's)"),
    ("public-ip", str, None, "IP address other nodes send to (default: the interface's)"),
    ("subnet-file", str, "/run/flannel/subnet.env", "where to write the subnet file"),
    ("subnet-lease-renew-margin", int, 60, "renew the lease this many minutes before it expires"),
    ("subnet-lease-ttl", parse_duration, 24 * 3600.0, "lifetime of the subnet lease in etcd (e.g. 24h, 5s)"),
    ("ip-masq", _bool, False, "masquerade traffic that leaves the overlay network"),
    ("healthz-ip", str, "0.0.0.0", "address of the health and metrics endpoint"),
    ("healthz-port", int, 0, "port of the health and metrics endpoint (0: off)"),
    ("cni-socket", str, "/run/flannel/cni.sock", "unix socket the flannel-py CNI plugin talks to"),
    ("control-socket", str, DEFAULT_CONTROL_SOCKET, "unix socket `flanneld-py status` reads (empty: off)"),
    ("cleanup-on-exit", _bool, False, "remove devices and routes on a clean shutdown"),
    ("offload", _bool, True, "use TUN and UDP segmentation offloads in the udp backend"),
]


class _Parser(argparse.ArgumentParser):
    """Bad usage: one line naming the problem, exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        priority = "<3>" if journal_attached(os.environ, sys.stderr) else ""  # an error under journald too
        self.exit(2, f"{priority}{self.prog}: {message} (see --help)\n")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flanneld-py",
        description="flannel-compatible overlay network daemon. Subcommands: status, trace (see FLAG --help).",
    )
    for flag, kind, default, text in _FLAGS:
        env = "FLANNELD_" + flag.upper().replace("-", "_")
        value = environ.get(env)
        if value is not None:
            try:
                default = kind(value)  # type: ignore[operator]
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env}={value!r}: {exc}")
        if kind is _bool:
            parser.add_argument(f"--{flag}", type=_bool, nargs="?", const=True, default=default,
                                metavar="BOOL", help=f"{text} [{env}]")
        else:
            parser.add_argument(f"--{flag}", type=kind, default=default, help=f"{text} [{env}]")  # type: ignore[arg-type]
    verbosity = int(environ.get("FLANNELD_V", "0") or 0)
    parser.add_argument("-v", "--v", dest="verbosity", type=_verbosity, nargs="?", const=1, default=verbosity,
                        help="more log detail (-v, or -v=N)")
    parser.add_argument("--version", action="version", version=f"flanneld-py {__version__}")
    return parser


def parse_options(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> DaemonOptions:
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    ns = parser.parse_args(list(argv))
    if ns.subnet_lease_renew_margin < 0:
        parser.error("--subnet-lease-renew-margin must not be negative")
    if not 0 <= ns.healthz_port <= 65535:
        parser.error("--healthz-port must be 0-65535")
    if bool(ns.etcd_username) != bool(ns.etcd_password):
        parser.error("--etcd-username and --etcd-password go together")
    return DaemonOptions(**{name: getattr(ns, name) for name in DaemonOptions.__slots__})  # type: ignore[arg-type]
