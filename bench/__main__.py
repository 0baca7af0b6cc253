"""``python3 -m bench``: the command line. Everything else is in :mod:`bench.runner`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import tempfile
from types import FrameType

# What a run needs beyond the standard library, and how to get it. Checked before the bench's
# own modules import any of it, so a missing one is one line, not a traceback after the run.
REQUIREMENTS = (
    ("flanneld_py", "flanneld-py is not installed: pip install -e . (from this checkout)"),
    ("matplotlib", "matplotlib is missing: install the bench extra, pip install -e '.[bench]'"),
)


def missing_requirement() -> str | None:
    """The first requirement that cannot be imported, as a one-line instruction, or None."""
    return next((hint for module, hint in REQUIREMENTS if importlib.util.find_spec(module) is None), None)


if __name__ == "__main__" and (problem := missing_requirement()):
    sys.exit(f"bench: {problem}")

from flanneld_py.lab.flannel import FlannelMissing, flannel_cni_binary  # noqa: E402 - after the requirement check

from .modes import ALL_MODES, CNI_PLUGINS, DEFAULT_MODES, FLANNELD_PY_MODES, plugin_mode  # noqa: E402
from .runner import BenchOptions, run_bench  # noqa: E402

DEFAULT_OUT = os.path.join("bench", "out")


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(ALL_MODES)}")
    return modes


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench",
        description="Measure flanneld-py's datapaths side by side in network namespaces (needs root).",
    )
    parser.add_argument("--modes", type=parse_modes, default=DEFAULT_MODES,
                        help=f"comma-separated, any of {', '.join(DEFAULT_MODES)} (default: these) or c-relay "
                             "(the smallest C relay, a reference); flannel-udp comes with --flanneld")
    parser.add_argument("--rounds", type=positive, default=3,
                        help="rounds; the modes alternate within each round (default: 3)")
    parser.add_argument("--quick", action="store_true", help="short tests: a run that takes about a minute per two modes")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"where results.json, report.md and charts go (default: {DEFAULT_OUT})")
    parser.add_argument("--flanneld", metavar="PATH",
                        help="flannel's own flanneld binary: adds mode flannel-udp (its UDP backend), and with "
                             "--peers flannel-vxlan and flannel-host-gw beside ours in the scale part")
    parser.add_argument("--cni-plugin", choices=CNI_PLUGINS, metavar="{" + ",".join(CNI_PLUGINS) + "}",
                        help="also wire the pods of each selected flanneld-py mode with this plugin (flannel: flannel's "
                             "own, from $FLANNEL_CNI_BIN or ../shared/flannel; bridge: bridge + host-local) and report "
                             "them next to pods wired by flannel-py, with the ratio")
    parser.add_argument("--peers", type=positive, metavar="N",
                        help="also measure with N peer leases in etcd: start-up, idle CPU, lease event to traffic "
                             "(quiet and under churn), bulk delete and add, throughput")
    parser.add_argument("--etcd-tls", action="store_true",
                        help="run etcd on https with client certificates (a throwaway PKI) for flanneld-py's modes, "
                             "so the daemon's figures (peak RSS) are those of a TLS client")
    parser.add_argument("--scale-only", action="store_true",
                        help="with --peers: only the scale part (no datapath rounds, no CNI latency)")
    parser.add_argument("--no-ipv6", action="store_true",
                        help="IPv4-only labs: leave out TCP 1 stream and ping over IPv6 (by default bare, host-gw, "
                             "vxlan and udp run dual stack and report both families, with the ratio)")
    return parser


class _Interrupts:
    """The first SIGINT/SIGTERM/SIGHUP raises KeyboardInterrupt; later ones must not cut the teardown short."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count == 1:
            raise KeyboardInterrupt
        print("\nbench: still tearing down, please wait", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = args.modes
    if args.flanneld:
        if not (os.path.isfile(args.flanneld) and os.access(args.flanneld, os.X_OK)):
            parser.error(f"--flanneld {args.flanneld}: not an executable file")
        args.flanneld = os.path.abspath(args.flanneld)
        if "flannel-udp" not in modes:
            modes = (*modes, "flannel-udp")
    elif "flannel-udp" in modes:
        parser.error("mode flannel-udp needs --flanneld PATH")
    if args.cni_plugin:
        bases = [m for m in modes if m in FLANNELD_PY_MODES]
        if not bases:
            parser.error(f"--cni-plugin needs one of the modes {', '.join(FLANNELD_PY_MODES)}")
        modes = (*modes, *(plugin_mode(m, args.cni_plugin) for m in bases))
    if args.scale_only and not args.peers:
        parser.error("--scale-only needs --peers N")
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    with tempfile.TemporaryDirectory(prefix="bench-flannel-cni-") as binaries:
        flannel_cni = None
        if args.cni_plugin == "flannel":
            try:
                flannel_cni = flannel_cni_binary(binaries)
            except FlannelMissing as exc:
                parser.error(f"--cni-plugin flannel: {exc}")
        handler = _Interrupts()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, handler)
        options = BenchOptions(modes=modes, rounds=args.rounds, quick=args.quick, out=os.path.abspath(args.out),
                               flanneld=args.flanneld, peers=args.peers, flannel_cni=flannel_cni,
                               etcd_tls=args.etcd_tls, scale_only=args.scale_only, ipv6=not args.no_ipv6)
        try:
            return run_bench(options, ["python3", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
        except KeyboardInterrupt:
            print("\nbench: interrupted; every namespace and process it made was removed", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
