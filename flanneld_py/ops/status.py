"""``flanneld-py status``: what the running daemon says about itself.

Reads the control socket (``--control-socket``, ``$FLANNELD_CONTROL_SOCKET``,
default ``/run/flannel/flanneld-py.sock``) and prints the lease, backend,
etcd, health, peers with their last traffic, and counters. ``--json`` prints
the daemon's answer as is. Exit 1 with a one-line reason when no daemon answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..options import DEFAULT_CONTROL_SOCKET
from .control import query

__all__ = ["main", "render_status"]


def _duration(seconds: float | None) -> str:
    """``42s``, ``5m07s``, ``3h05m``, ``2d04h``; ``never`` for None."""
    if seconds is None:
        return "never"
    total = int(max(0, seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{_duration(seconds)} ago"


def _table(header: Sequence[object], rows: Sequence[Sequence[object]], right: set[int]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_status(doc: dict[str, Any]) -> str:
    """The human-readable report for one control-socket answer."""
    lines = [f"flanneld-py {doc.get('version', '?')} (pid {doc.get('pid', '?')}): {doc.get('phase')}, "
             f"up {_duration(doc.get('uptime_seconds'))}"]
    health = doc.get("health") or {}
    verdict = "ok" if health.get("code") == 200 else f"unhealthy: {health.get('reason', '?')}"
    lines.append(f"health    {verdict}")
    lease = doc.get("lease")
    if lease:
        subnets = lease["subnet"] if not lease.get("subnet6") else f"{lease['subnet']} and {lease['subnet6']}"
        lines.append(f"lease     {subnets} (etcd lease {lease.get('etcd_lease_id')}), "
                     f"expires in {_duration(lease.get('expires_in_seconds'))}")
    else:
        lines.append("lease     none yet")
    lines.append(f"network   {doc.get('network') or '?'}, backend {doc.get('backend') or '?'}, "
                 f"mtu {doc.get('mtu') or '?'}, public IP {doc.get('public_ip') or '?'}, "
                 f"datapath {'up' if doc.get('datapath_up') else 'down'}")
    if doc.get("ipv6_network"):
        lines.append(f"ipv6      {doc['ipv6_network']}, public IPv6 {doc.get('public_ipv6') or '?'}")
    etcd = doc.get("etcd") or {}
    lines.append(f"etcd      {etcd.get('endpoint')}: last answer {_ago(etcd.get('last_answer_seconds_ago'))}, "
                 f"{etcd.get('errors', 0)} errors, {etcd.get('reconnects', 0)} reconnects")
    for label, key in (("ip-masq", "ip_masq"), ("forward", "forward_rules")):
        rules = doc.get(key) or {}
        lines.append(f"{label:<9} {'on' if rules.get('enabled') else 'off'}"
                     + (f", {rules.get('repairs', 0)} repairs" if rules.get("enabled") else ""))
    problems = doc.get("problems") or []
    if problems:
        lines.extend(f"node      PROBLEM: {p.get('message')}" for p in problems)
    else:
        lines.append("node      ok")
    peers = doc.get("peers") or []
    lines.append("")
    if peers:
        rows = [
            (p.get("subnets") or p["subnet"], p.get("addresses") or p["public_ip"],
             p["tx_packets"], p["tx_bytes"], p["rx_packets"], p["rx_bytes"],
             _ago(p.get("last_tx_seconds_ago")), _ago(p.get("last_rx_seconds_ago")))
            for p in sorted(peers, key=lambda p: (p["subnet"], p.get("subnet6") or ""))
        ]
        header = ("PEER SUBNET", "PUBLIC IP", "TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES", "LAST TX", "LAST RX")
        lines.extend(_table(header, rows, right={2, 3, 4, 5}))
    else:
        lines.append("no peers")
    drops = {reason: count for reason, count in (doc.get("drops") or {}).items() if count}
    lines.append("")
    lines.append("drops     " + (", ".join(f"{r} {c}" for r, c in sorted(drops.items())) or "none"))
    batches = doc.get("batches") or {}
    if batches:
        lines.append("wakeups   " + ", ".join(f"{name} {b['wakeups']}" for name, b in sorted(batches.items())))
    return "\n".join(lines)


def main(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="flanneld-py status", description="Show what the running daemon is doing.")
    parser.add_argument("--control-socket", default=os.environ.get("FLANNELD_CONTROL_SOCKET") or DEFAULT_CONTROL_SOCKET,
                        help="the daemon's control socket (default %(default)s) [FLANNELD_CONTROL_SOCKET]")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    ns = parser.parse_args(list(args))
    path = ns.control_socket
    try:
        doc = query(path, timeout=ns.timeout)
    except FileNotFoundError:
        return _fail(f"flanneld-py is not running here: no control socket at {path}")
    except ConnectionRefusedError:
        return _fail(f"flanneld-py is not running here: nothing listens on {path} (left by a stopped daemon)")
    except PermissionError:
        return _fail(f"permission denied on {path}: run as root")
    except (OSError, ValueError) as exc:
        return _fail(f"no answer from flanneld-py on {path}: {exc}")
    if "error" in doc:
        return _fail(f"flanneld-py on {path} refused: {doc['error']}")
    print(json.dumps(doc, indent=2, sort_keys=True) if ns.json else render_status(doc))
    return 0


def _fail(message: str) -> int:
    print(f"flanneld-py status: {message}", file=sys.stderr)
    return 1
