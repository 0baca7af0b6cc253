"""flanneld's command line, read the way flanneld v0.20.2 reads it (Go's ``flag`` package).

Every flag works as ``-flag``, ``--flag``, ``-flag=value`` and ``--flag value``; a bool
flag takes a value only after ``=`` (``-ip-masq`` is true, ``-ip-masq=false`` false, and
in ``-ip-masq false`` the ``false`` is a stray argument). A value flag takes the next
argument whatever it looks like, as Go does. After the command line, each flag not given
there is read from ``FLANNELD_<FLAG>`` (upper case, ``-`` as ``_``) when that is non-empty
(coreos/pkg flagutil's rule). Repeatable flags (``--iface``, ``--iface-regex``) collect
every command-line use, in order; their variable gives one value.

Three kinds of flags besides the ones we implement: flannel's flags for what flanneld-py
does not do (the Kubernetes subnet manager, a config file) end the parse with a :class:`UsageError`
that says what to use instead; klog's logging flags are accepted and ignored with a
notice; unknown ``FLANNELD_*`` variables get a warning naming them. The parse is pure:
:func:`read_command_line` returns the options and the notices to log, and raises
:class:`UsageError` (exit 2) or :class:`HelpRequested`/:class:`VersionRequested`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from . import __version__
from .logs import journal_attached

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "KLOG_FLAGS",
    "UNSUPPORTED_FLAGS",
    "DaemonOptions",
    "Flag",
    "HelpRequested",
    "Notice",
    "UsageError",
    "VersionRequested",
    "go_bool",
    "go_int",
    "parse_command_line",
    "parse_duration",
    "parse_options",
    "read_command_line",
    "usage_text",
]

DEFAULT_CONTROL_SOCKET = "/run/flannel/flanneld-py.sock"
ENV_PREFIX = "FLANNELD_"
# FLANNELD_* variables of the project itself, not flags (FLANNELD_PY_OFFLOAD_IMPL, test switches)
_PROJECT_ENV_PREFIXES = ("FLANNELD_PY_", "FLANNELD_TEST_")


class UsageError(ValueError):
    """Bad usage: the message is the one line to print before exiting 2."""


class HelpRequested(Exception):
    """``-h``, ``-help``, ``--help``."""


class VersionRequested(Exception):
    """``-version`` (true)."""


@dataclass(frozen=True, slots=True)
class Notice:
    """A line to log once logging is set up (``level`` is a :mod:`logging` level)."""

    level: int
    message: str


# --- value parsers (Go's semantics) ------------------------------------------------

_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def go_bool(text: str) -> bool:
    """``strconv.ParseBool`` (plus yes/no/on/off, which older flanneld-py versions took)."""
    if text in _GO_TRUE or text.lower() in ("yes", "on"):
        return True
    if text in _GO_FALSE or text.lower() in ("no", "off"):
        return False
    raise ValueError(f"invalid boolean {text!r} (use true or false)")


def go_int(text: str) -> int:
    """``strconv.ParseInt(text, 0, 64)``: decimal, ``0x``/``0o``/``0b`` prefixes, a leading 0 is octal."""
    if re.fullmatch(r"[+-]?0[0-7]+", text):
        return int(text, 8)
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"invalid integer {text!r}") from None


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
        raise ValueError(f"invalid duration {text!r} (use e.g. 24h, 90m, 5s)")
    return total


def _string(text: str) -> str:
    return text


def _verbosity(text: str) -> int:
    try:
        return int(text.lstrip("="))
    except ValueError:
        raise ValueError(f"invalid verbosity {text!r} (use a number, e.g. -v=2)") from None


# --- the flags -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flag:
    """One flag we implement; ``dest`` is its :class:`DaemonOptions` field."""

    name: str
    parse: Callable[[str], object]
    default: object
    help: str
    boolean: bool = False
    repeated: bool = False
    flannel: bool = True  # False: a flanneld-py extension

    @property
    def dest(self) -> str:
        return "verbosity" if self.name == "v" else self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return env_name(self.name)


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def _f(name: str, parse: Callable[[str], object], default: object, text: str, **kw: bool) -> Flag:
    return Flag(name, parse, default, text, boolean=parse is go_bool, **kw)


FLAGS: tuple[Flag, ...] = (
    _f("etcd-endpoints", _string, "http://127.0.0.1:4001,http://127.0.0.1:2379", "comma-separated etcd endpoints"),
    _f("etcd-prefix", _string, "/coreos.com/network", "etcd prefix of the network config and leases"),
    _f("etcd-keyfile", _string, None, "TLS client key for etcd"),
    _f("etcd-certfile", _string, None, "TLS client certificate for etcd"),
    _f("etcd-cafile", _string, None, "CA bundle that signed the etcd server certificates"),
    _f("etcd-username", _string, None, "etcd user name (with --etcd-password)"),
    _f("etcd-password", _string, None, "etcd password"),
    _f("iface", _string, (), "underlay interface, by name or IPv4 address; repeat to try each in order",
       repeated=True),
    _f("iface-regex", _string, (), "regex matched against interface addresses, then names; repeatable, "
       "tried after --iface", repeated=True),
    _f("iface-can-reach", _string, None, "use the interface the kernel routes this address through "
       "(ip route get), tried after --iface and --iface-regex"),
    _f("public-ip", _string, None, "IPv4 address other nodes send to (default: the interface's); alone, "
       "it also picks the interface that holds it"),
    _f("public-ipv6", _string, None, "IPv6 address other nodes send to with EnableIPv6 (default: the "
       "interface's first global IPv6 address)"),
    _f("subnet-file", _string, "/run/flannel/subnet.env", "where to write the subnet file"),
    _f("subnet-lease-renew-margin", go_int, 60, "renew the lease this many minutes before it expires (1-1439)"),
    _f("ip-masq", go_bool, False, "masquerade traffic that leaves the overlay network"),
    _f("ip-masq-fully-random-disable", go_bool, False, "masquerade without --random-fully (a flanneld v0.22+ flag)"),
    _f("iptables-forward-rules", go_bool, True, "accept forwarding to and from the Network in the FORWARD chain"),
    _f("iptables-resync", go_int, 5, "seconds between checks of the iptables rules"),
    _f("healthz-ip", _string, "0.0.0.0", "address of the health and metrics endpoint"),
    _f("healthz-port", go_int, 0, "port of the health and metrics endpoint (0: off)"),
    _f("subnet-lease-ttl", parse_duration, 24 * 3600.0, "lifetime of the subnet lease in etcd (e.g. 24h, 5s)",
       flannel=False),
    _f("cni-socket", _string, "/run/flannel/cni.sock", "unix socket the flannel-py CNI plugin talks to (empty: off)",
       flannel=False),
    _f("control-socket", _string, DEFAULT_CONTROL_SOCKET, "unix socket `flanneld-py status` reads (empty: off)",
       flannel=False),
    _f("cleanup-on-exit", go_bool, False, "remove devices, routes and iptables rules on a clean shutdown",
       flannel=False),
    _f("offload", go_bool, True, "use TUN and UDP segmentation offloads in the udp backend", flannel=False),
    _f("v", _verbosity, 0, "log detail: -v or -v=1 debug, -v=2 library debug too"),
)
_BY_NAME = {flag.name: flag for flag in FLAGS}

_ETCD_ONLY = ("flanneld-py keeps subnet leases in etcd only; give --etcd-endpoints and put the network "
              "config at <prefix>/config")
# flannel's flags for what flanneld-py does not do: name -> (is a bool flag, why and what instead)
UNSUPPORTED_FLAGS: dict[str, tuple[bool, str]] = {
    "kube-subnet-mgr": (True, f"the Kubernetes subnet manager is not supported; {_ETCD_ONLY}"),
    "kube-api-url": (False, f"belongs to --kube-subnet-mgr, which is not supported; {_ETCD_ONLY}"),
    "kubeconfig-file": (False, f"belongs to --kube-subnet-mgr, which is not supported; {_ETCD_ONLY}"),
    "kube-annotation-prefix": (False, f"belongs to --kube-subnet-mgr, which is not supported; {_ETCD_ONLY}"),
    "set-node-network-unavailable": (True, f"belongs to --kube-subnet-mgr, which is not supported; {_ETCD_ONLY}"),
    "net-config-path": (False, ("a network config file is not supported; flanneld-py reads the config from "
                                "etcd: etcdctl put /coreos.com/network/config \"$(cat FILE)\"")),
    "ip-blackhole-route": (True, ("a blackhole route for the node's subnet (a flanneld v0.24+ flag) is not "
                                  "supported yet: remove the flag")),
}
# klog's flags (k8s.io/klog v1 InitFlags): name -> is a bool flag. flanneld itself lists only
# -v, -vmodule and -log_backtrace_at; the rest are accepted too, as unit files copied from
# other Kubernetes daemons carry them.
KLOG_FLAGS: dict[str, bool] = {
    "vmodule": False, "log_backtrace_at": False, "logtostderr": True, "alsologtostderr": True,
    "log_dir": False, "log_file": False, "log_file_max_size": False, "stderrthreshold": False,
    "add_dir_header": True, "skip_headers": True, "skip_log_headers": True, "one_output": True,
}
_HELP = ("h", "help")


def _is_boolean(name: str) -> bool | None:
    """True/False for a known bool/value flag, None for an unknown name."""
    if name in _BY_NAME:
        return _BY_NAME[name].boolean
    if name in UNSUPPORTED_FLAGS:
        return UNSUPPORTED_FLAGS[name][0]
    if name in KLOG_FLAGS:
        return KLOG_FLAGS[name]
    if name == "version":
        return True
    return None


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    """The daemon's settings, from flanneld's flags and ``FLANNELD_*`` variables."""

    etcd_endpoints: str = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    etcd_prefix: str = "/coreos.com/network"
    etcd_keyfile: str | None = None
    etcd_certfile: str | None = None
    etcd_cafile: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    iface: tuple[str, ...] = ()
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str | None = None
    public_ip: str | None = None
    public_ipv6: str | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    subnet_lease_renew_margin: int = 60
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False
    iptables_forward_rules: bool = True
    iptables_resync: int = 5
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    subnet_lease_ttl: float = 24 * 3600.0
    cni_socket: str = "/run/flannel/cni.sock"
    control_socket: str = DEFAULT_CONTROL_SOCKET
    cleanup_on_exit: bool = False
    offload: bool = True
    verbosity: int = 0


# --- parsing -------------------------------------------------------------------------


@dataclass
class _Reading:
    """What parsing the command line has found so far."""

    values: dict[str, object] = field(default_factory=dict)
    from_cli: set[str] = field(default_factory=set)
    ignored_klog: list[str] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    version: bool = False

    def set(self, name: str, value: str, origin: str) -> None:
        """Apply one ``name=value`` given as ``origin`` (``-iface`` or ``FLANNELD_IFACE``)."""
        if name in UNSUPPORTED_FLAGS:
            boolean, why = UNSUPPORTED_FLAGS[name]
            if _is_noop(boolean, value):
                return
            raise UsageError(f"{origin}: {why}")
        if name in KLOG_FLAGS:
            self.ignored_klog.append(f"{origin}={value}" if not KLOG_FLAGS[name] or value != "true" else origin)
            return
        if name == "version":
            self.version = bool(_parsed(go_bool, value, origin))
            return
        flag = _BY_NAME[name]
        parsed = _parsed(flag.parse, value, origin)
        if flag.repeated:
            previous = self.values.get(flag.dest, ())
            assert isinstance(previous, tuple)
            self.values[flag.dest] = (*previous, parsed)
        else:
            self.values[flag.dest] = parsed


def _is_noop(boolean: bool, value: str) -> bool:
    """An unsupported flag set to what flanneld-py does anyway (``-kube-subnet-mgr=false``)."""
    if boolean:
        try:
            return not go_bool(value)
        except ValueError:
            return False
    return value == ""


def _parsed(parse: Callable[[str], object], value: str, origin: str) -> object:
    try:
        return parse(value)
    except ValueError as exc:
        raise UsageError(f"{origin}={value!r}: {exc}") from None


def _split_args(args: Sequence[str]) -> list[tuple[str, str, str]]:
    """Go's ``FlagSet.Parse``: ``(name, value, as written)`` per flag, in order."""
    out: list[tuple[str, str, str]] = []
    i = 0
    last_bool: str | None = None
    while i < len(args):
        arg = args[i]
        if arg == "--":
            if i + 1 < len(args):
                raise UsageError(f"unexpected argument {args[i + 1]!r} after '--'")
            break
        if len(arg) < 2 or arg[0] != "-":
            raise UsageError(_stray(arg, last_bool))
        dashes = 2 if arg[1] == "-" else 1
        body = arg[dashes:]
        if not body or body[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}")
        name, eq, value = body.partition("=")
        i += 1
        if name in _HELP:
            raise HelpRequested()
        boolean = _is_boolean(name)
        if boolean is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        if boolean:
            value = value if eq else "true"
        elif not eq:
            if name == "v" and (i >= len(args) or not re.fullmatch(r"\d+", args[i])):
                value = "1"  # a bare -v: one step more detail (flanneld-py's own shorthand)
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise UsageError(f"flag needs an argument: -{name}")
        last_bool = arg if boolean and not eq else None
        out.append((name, value, "-" * dashes + name))
    return out


def _stray(arg: str, last_bool: str | None) -> str:
    if last_bool is not None:
        return (f"unexpected argument {arg!r} after {last_bool}: a bool flag takes its value after '=', "
                f"e.g. {last_bool}={arg}")
    return f"unexpected argument {arg!r}: flags start with '-' (subcommands: status, trace)"


def read_command_line(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[DaemonOptions, list[Notice]]:
    """Options and notices from ``argv`` and ``environ``, without side effects.

    Raises:
        UsageError: bad usage, or a flag for something flanneld-py does not do.
        HelpRequested, VersionRequested: print and exit 0.
    """
    reading = _Reading()
    for name, value, origin in _split_args(argv):
        reading.set(name, value, origin)
        reading.from_cli.add(name)
    if reading.version:
        raise VersionRequested()
    _read_environment(reading, environ)
    options = DaemonOptions(**{flag.dest: reading.values.get(flag.dest, flag.default) for flag in FLAGS})  # type: ignore[arg-type]
    _validate(options)
    if reading.ignored_klog:
        reading.notices.append(Notice(logging.INFO, "ignoring klog flags (flanneld-py logs to stderr, or to "
                                      f"journald under systemd; -v=N sets the detail): {' '.join(reading.ignored_klog)}"))
    return options, reading.notices


def _read_environment(reading: _Reading, environ: Mapping[str, str]) -> None:
    known = {env_name(name) for name in (*_BY_NAME, *UNSUPPORTED_FLAGS, *KLOG_FLAGS, "version")}
    for name in (*_BY_NAME, *UNSUPPORTED_FLAGS, *KLOG_FLAGS):
        value = environ.get(env_name(name), "")
        if value and name not in reading.from_cli:
            reading.set(name, value, env_name(name))
    unknown = sorted(key for key in environ if key.startswith(ENV_PREFIX) and key not in known
                     and not key.startswith(_PROJECT_ENV_PREFIXES))
    for key in unknown:
        flag = "--" + key[len(ENV_PREFIX):].lower().replace("_", "-")
        reading.notices.append(Notice(logging.WARNING, f"ignoring environment variable {key}: there is no flag {flag}"))


def _validate(options: DaemonOptions) -> None:
    if not 1 <= options.subnet_lease_renew_margin <= 1439:
        raise UsageError(f"--subnet-lease-renew-margin={options.subnet_lease_renew_margin}: "
                         "must be 1-1439 minutes (less than a day, as in flannel)")
    if not 0 <= options.healthz_port <= 65535:
        raise UsageError(f"--healthz-port={options.healthz_port}: must be 0-65535")
    if options.iptables_resync < 1:
        raise UsageError(f"--iptables-resync={options.iptables_resync}: must be at least 1 second")
    if bool(options.etcd_username) != bool(options.etcd_password):
        raise UsageError("--etcd-username and --etcd-password go together")
    if options.public_ip is not None:
        _require_ipv4("--public-ip", options.public_ip)
    if options.iface_can_reach is not None:  # either family, as flannel (an IPv6 underlay's peer, say)
        try:
            ipaddress.ip_address(options.iface_can_reach)
        except ValueError:
            raise UsageError(f"--iface-can-reach={options.iface_can_reach!r}: not an IP address") from None
    if options.public_ipv6:
        _require_ipv6("--public-ipv6", options.public_ipv6)
    for pattern in options.iface_regex:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--iface-regex={pattern!r}: not a regular expression ({exc})") from None


def _require_ipv4(flag: str, text: str) -> None:
    _require_ip(flag, text, 4, "give an IPv4 address here (an IPv6 one goes in --public-ipv6)")


def _require_ipv6(flag: str, text: str) -> None:
    _require_ip(flag, text, 6, "not an IPv6 address (the IPv4 one goes in --public-ip)")


def _require_ip(flag: str, text: str, version: int, wrong_family: str) -> None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"{flag}={text!r}: not an IP address") from None
    if address.version != version:
        raise UsageError(f"{flag}={text}: {wrong_family}")


def usage_text() -> str:
    """``--help``: every flag with its variable and default, then what is not supported."""
    lines = ["Usage: flanneld-py [FLAG]...    (or: flanneld-py status|trace --help)",
             "Flags take one or two dashes: -flag=value, --flag value; bool flags: -flag or -flag=false.",
             "Each flag can also be set as FLANNELD_<FLAG> (upper case, - as _); the command line wins.", ""]
    for flag in FLAGS:
        kind = "" if flag.boolean else " value"
        default = "" if flag.default in (None, (), "", False, 0) else f" (default {_shown(flag.default)})"
        extra = "" if flag.flannel else " [flanneld-py]"
        lines.append(f"  -{flag.name}{kind}\n        {flag.help}{default}{extra} [{flag.env}]")
    lines.append("  -version\n        print the version and exit")
    lines.append("")
    lines.append("flanneld flags flanneld-py refuses (exit 2): "
                 + ", ".join(f"-{name}" for name in UNSUPPORTED_FLAGS))
    lines.append("klog flags accepted and ignored: " + ", ".join(f"-{name}" for name in KLOG_FLAGS))
    return "\n".join(lines) + "\n"


def _shown(value: object) -> str:
    """A default as Go's --help shows it: ``true``, ``24h``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value / 3600:g}h" if value % 3600 == 0 else f"{value:g}s"
    return str(value)


def parse_command_line(argv: Sequence[str], environ: Mapping[str, str] | None = None
                       ) -> tuple[DaemonOptions, list[Notice]]:
    """:func:`read_command_line` for the program: usage errors exit 2 with one line on stderr,
    ``--help`` and ``--version`` print and exit 0."""
    try:
        return read_command_line(argv, os.environ if environ is None else environ)
    except UsageError as exc:
        priority = "<3>" if journal_attached(os.environ, sys.stderr) else ""  # an error under journald too
        _exit(2, f"{priority}flanneld-py: {exc}\n", sys.stderr)
    except HelpRequested:
        _exit(0, usage_text(), sys.stdout)
    except VersionRequested:
        _exit(0, f"flanneld-py {__version__}\n", sys.stdout)


def _exit(code: int, text: str, stream: object) -> NoReturn:
    print(text, end="", file=stream)  # type: ignore[call-overload]
    raise SystemExit(code)


def parse_options(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> DaemonOptions:
    """The options alone (notices dropped); exits like :func:`parse_command_line`."""
    return parse_command_line(argv, environ)[0]
