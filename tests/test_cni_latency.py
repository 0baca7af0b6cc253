"""The CNI latency tool (bench/cni_latency.py): both plugins timed like for like, nothing left behind."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from bench.cni_latency import OURS, REFERENCE, measure_cni
from bench.figures import CNI_FIGURES
from flanneld_py.lab.netns import unique_tag

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_measures_both_plugins_like_for_like_and_leaves_nothing() -> None:
    tag = unique_tag()
    steps: list[str] = []
    out = measure_cni(3, tag, steps.append)
    assert len(steps) == 3  # bench/runner.py's STEPS_CNI
    for name in (OURS, REFERENCE):
        entry = out["plugins"][name]
        assert len(entry["add_ms"]) == len(entry["del_ms"]) == len(entry["version_ms"]) == 3
        assert all(entry["figures"][fig.key] > 0 for fig in CNI_FIGURES), (name, entry["figures"])
    assert set(out["ratios"]) == {fig.key for fig in CNI_FIGURES}
    first = out["answer_first"]
    assert len(first["del_ms"]) == len(first["del_settle_ms"]) == 3
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"fp{tag}" not in namespaces
    assert not list(Path(tempfile.gettempdir()).glob(f"flanneld-lab-{tag}-*"))
