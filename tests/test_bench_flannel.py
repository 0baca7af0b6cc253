"""End to end: the bench's comparisons with flannel's own pieces, one quick round.

``python3 -m bench --quick --modes udp --rounds 1 --flanneld FLANNELD --cni-plugin flannel`` runs
udp, udp with pods wired by flannel's CNI plugin and flannel's own UDP backend side by side; the
report has each figure and the side-by-side ratios. Skips without flannel's binaries
(``../shared/flannel`` or ``$FLANNELD_BIN`` / ``$FLANNEL_CNI_BIN``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flanneld_py.lab.flannel import FLANNEL_CNI_ENV, FlannelMissing, flannel_cni_binary, flanneld_binary

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.netns
@pytest.mark.slow
def test_quick_bench_with_flanneld_and_flannels_cni_plugin(tmp_path: Path) -> None:
    try:
        flanneld = flanneld_binary(str(tmp_path / "bin"))
        flannel_cni = flannel_cni_binary(str(tmp_path / "bin"))
    except FlannelMissing as exc:
        pytest.skip(str(exc))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--modes", "udp", "--rounds", "1", "--flanneld", flanneld,
         "--cni-plugin", "flannel", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400, env={**os.environ, FLANNEL_CNI_ENV: flannel_cni},
    )
    assert proc.returncode == 0, f"bench exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads((out / "results.json").read_text())
    assert results["failures"] == []
    assert list(results["modes"]) == ["udp", "flannel-udp", "udp+flannel-cni"]
    for mode, summary in results["modes"].items():
        assert summary["status"] == "ok", (mode, summary["errors"])
        assert summary["figures"]["tcp_1_gbps"]["median"] > 0, mode
    report = (out / "report.md").read_text()
    for needle in ("| **flannel-udp** |", "| **udp+flannel-cni** |", "## Side by side",
                   "| udp+flannel-cni | udp |", "| udp | flannel-udp |"):
        assert needle in report, needle
