"""One bench run: rounds over the modes, then CNI latency, then (with --peers) scale; then the files.

Each mode gets a fresh lab in every round and the modes alternate within a
round (the starting mode rotates from round to round), so drift on a noisy
machine hits every mode alike. A mode that fails is recorded with its error
and the run goes on; the exit status is then 1.
"""

from __future__ import annotations

import compileall
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import flanneld_py
from flanneld_py.lab.netns import Netns, run, unique_tag

from .cni_latency import measure_cni
from .datapath import Plan, figures_from_round, measure_round
from .machine import describe_machine, loadavg
from .modes import FLANNELD_PY_MODES, IPV6_MODES, open_testbed
from .progress import Progress
from .report import add_ipv6_ratios, add_ratios, summarize_mode, write_outputs
from .scale import FLANNEL_SCALE_MODES, ScaleSpec, measure_scale, scale_ratios

__all__ = ["BenchOptions", "rotate", "run_bench"]

STEPS_PER_ROUND = 5  # build, TCP 1, TCP 4, UDP, ping
STEPS_IPV6 = 2  # TCP 1 and ping over IPv6, in the modes of IPV6_MODES
STEPS_CNI = 3
STEPS_SCALE = 5


@dataclass(frozen=True, slots=True)
class BenchOptions:
    modes: tuple[str, ...]
    rounds: int
    quick: bool
    out: str
    flanneld: str | None = None
    peers: int | None = None
    flannel_cni: str | None = None  # flannel's CNI plugin, for the +flannel-cni modes
    etcd_tls: bool = False  # etcd on https with client certificates (flanneld-py's modes)
    scale_only: bool = False  # skip the datapath rounds and CNI latency
    ipv6: bool = True  # dual-stack labs for IPV6_MODES, measured over IPv6 too


def rotate(modes: Sequence[str], round_index: int) -> list[str]:
    """The order of ``modes`` in round ``round_index`` (0-based): start one further each round."""
    if not modes:
        return []
    shift = round_index % len(modes)
    return list(modes[shift:]) + list(modes[:shift])


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 2000 else text[:1000] + " ... " + text[-1000:]


def reap(tags: Sequence[str]) -> list[str]:
    """Safety net after everything was closed: remove any namespace or process of these tags.

    The labs' context managers already did this; what is found here is
    listed (and removed) so that a leak is visible.
    """
    leaked: list[str] = []
    names = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    for line in names:
        name = line.split(" ")[0].strip()
        if name and any(name.startswith(f"fp{tag}") for tag in tags):
            Netns(name).delete()
            leaked.append(f"namespace {name}")
    pattern = re.compile("|".join(re.escape(f"flanneld-lab-{tag}-") for tag in tags)) if tags else None
    if pattern is not None:
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    cmdline = handle.read().decode(errors="replace")
            except OSError:
                continue
            if pattern.search(cmdline) and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    leaked.append(f"process {pid}")
                except ProcessLookupError:
                    pass
    return leaked


class _Run:
    def __init__(self, options: BenchOptions, plan: Plan) -> None:
        self.options = options
        self.plan = plan
        self.tags: list[str] = []
        self.failures: list[dict[str, str]] = []
        scale_modes = self.scale_modes()
        rounds = 0 if options.scale_only else options.rounds * sum(self.steps_per_round(m) for m in options.modes) + STEPS_CNI
        total = (rounds
                 + (len(scale_modes) * STEPS_SCALE if options.peers else 0) + 1)
        self.progress = Progress(total)

    def steps_per_round(self, mode: str) -> int:
        return STEPS_PER_ROUND + (STEPS_IPV6 if self.options.ipv6 and mode in IPV6_MODES else 0)

    def scale_modes(self) -> list[str]:
        """flanneld-py's modes of the run, and with ``--flanneld`` flannel's for its kernel backends."""
        ours = [m for m in self.options.modes if m in FLANNELD_PY_MODES] or ["udp"]
        theirs = [m for m in FLANNEL_SCALE_MODES if m.removeprefix("flannel-") in ours] if self.options.flanneld else []
        return ours + theirs

    def tag(self) -> str:
        tag = unique_tag()
        self.tags.append(tag)
        return tag

    def fail(self, what: str, exc: BaseException) -> str:
        return self.record(what, f"{type(exc).__name__}: {_error_text(exc)}")

    def record(self, what: str, text: str) -> str:
        self.failures.append({"what": what, "error": text})
        self.progress.note(f"FAILED {what}: {text.splitlines()[0][:300]}")
        return text

    def datapath(self) -> dict[str, Any]:
        options, progress = self.options, self.progress
        records: dict[str, dict[str, list[Any]]] = {m: {"figures": [], "raw": [], "errors": []} for m in options.modes}
        for index in range(options.rounds):
            for mode in rotate(options.modes, index):
                progress.context = f"round {index + 1}/{options.rounds} · {mode}"
                target = progress.done + self.steps_per_round(mode)
                try:
                    progress.step("building the lab")
                    with open_testbed(mode, options.flanneld, self.tag(), options.flannel_cni,
                                      etcd_tls=options.etcd_tls, ipv6=options.ipv6) as bed:
                        raw = measure_round(bed, self.plan, progress.step)
                        notes = list(bed.notes)
                    records[mode]["figures"].append(figures_from_round(raw))
                    records[mode]["raw"].append({"round": index + 1, **raw, "notes": notes})
                except Exception as exc:  # noqa: BLE001 - recorded and reported, the run goes on
                    error = self.fail(f"{mode}, round {index + 1}", exc)
                    records[mode]["errors"].append({"round": index + 1, "error": error})
                progress.done = target
        modes: dict[str, dict[str, Any]] = {}
        for mode, record in records.items():
            summary = summarize_mode(record["figures"], record["errors"], options.rounds)
            summary["raw_rounds"] = record["raw"]
            modes[mode] = summary
        add_ratios(modes)
        add_ipv6_ratios(modes)
        return modes

    def cni(self) -> dict[str, Any]:
        self.progress.context = "CNI"
        target = self.progress.done + STEPS_CNI
        try:
            out = measure_cni(self.plan.cni_pods, self.tag(), self.progress.step)
        except Exception as exc:  # noqa: BLE001
            return {"status": "failed", "pods": self.plan.cni_pods, "error": self.fail("CNI latency", exc)}
        finally:
            self.progress.done = target
        out["status"] = "ok"
        return out

    def scale(self) -> dict[str, Any]:
        peers = self.options.peers
        if not peers:
            return {"status": "not run", "why": "run with --peers N"}
        repeats = 1 if self.options.quick else 3
        result: dict[str, Any] = {"status": "ok", "peers": peers, "modes": {}}
        for mode in self.scale_modes():
            self.progress.context = f"scale · {mode}"
            target = self.progress.done + STEPS_SCALE
            try:
                spec = ScaleSpec(peers, self.plan.scale_events, self.plan.seconds, repeats)
                entry = measure_scale(mode, spec, self.tag(), self.progress.step, self.options.flanneld)
                for error in entry["errors"]:
                    self.record(f"scale {mode}", error)
            except Exception as exc:  # noqa: BLE001
                entry = {"status": "failed", "errors": [self.fail(f"scale {mode}", exc)]}
            self.progress.done = target
            result["modes"][mode] = entry
        result["ratios"] = scale_ratios(result["modes"])
        statuses = {entry["status"] for entry in result["modes"].values()}
        result["status"] = "failed" if "failed" in statuses else "partial" if "partial" in statuses else "ok"
        return result


def compile_daemon() -> None:
    """Byte-compile flanneld_py once, so every daemon start reads cached bytecode as an installed
    wheel's would (a checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every
    module at each launch, and the start-up figures would measure the compiler)."""
    compileall.compile_dir(os.path.dirname(flanneld_py.__file__), quiet=1)


def run_bench(options: BenchOptions, argv: Sequence[str]) -> int:
    """Run everything, write the files; 0 if every measurement succeeded, else 1."""
    plan = Plan.quick() if options.quick else Plan()
    bench = _Run(options, plan)
    compile_daemon()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.monotonic()
    machine = describe_machine()
    try:
        if options.scale_only:
            modes: dict[str, Any] = {}
            cni: dict[str, Any] = {"status": "not run", "why": "--scale-only"}
        else:
            modes, cni = bench.datapath(), bench.cni()
        scale = bench.scale()
    finally:
        leaked = reap(bench.tags)
    if leaked:
        bench.failures.append({"what": "teardown", "error": f"left behind and removed: {', '.join(leaked)}"})
    machine["loadavg_at_end"] = loadavg()
    results: dict[str, Any] = {
        "schema": 1,
        "tool": "python3 -m bench",
        "command": list(argv),
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "options": {
            "modes": list(options.modes), "rounds": options.rounds, "quick": options.quick,
            "seconds": plan.seconds, "ping_count": plan.ping_count, "cni_pods": plan.cni_pods,
            "peers": options.peers, "scale_events": plan.scale_events if options.peers else None,
            "flanneld": options.flanneld, "ipv6": options.ipv6,
        },
        "machine": machine,
        "modes": modes,
        "cni": cni,
        "scale": scale,
        "failures": bench.failures,
        "run": {"tags": bench.tags},
    }
    bench.progress.context = ""
    bench.progress.step("writing results.json, report.md, charts")
    write_outputs(options.out, results)
    verdict = "ok" if not bench.failures else f"{len(bench.failures)} failure(s)"
    bench.progress.finish(f"bench done in {results['duration_s']:.0f}s, {verdict}: {options.out}/report.md")
    return 0 if not bench.failures else 1
