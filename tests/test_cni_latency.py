"""The latency comparison bench/ relies on: it runs, reports both plugins, and cleans up."""

from __future__ import annotations

import subprocess

import pytest

from flanneld_py.cni.latency import PluginTiming, compare, percentile

pytestmark = pytest.mark.netns


def test_percentiles() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0] * 9 + [100.0], 90) == 100.0
    timing = PluginTiming([1.0, 2.0], [3.0], [0.5]).summary()
    assert timing["add_p50"] == 2.0 and timing["del_p50"] == 3.0 and timing["version_p50"] == 0.5


def test_compare_reports_both_plugins_and_leaves_nothing() -> None:
    report = compare(pods=3)
    assert report["pods"] == 3 and report["sync_del"] is False
    for name in ("flannel-py", "bridge+host-local"):
        assert set(report[name]) == {"add_p50", "add_p90", "del_p50", "del_p90", "version_p50"}
        assert all(value > 0 for value in report[name].values())
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cnilat-" not in after
