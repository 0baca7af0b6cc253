"""The entry point's own behaviour: the cyclic collector around start-up."""

import asyncio
import gc

import pytest

from flanneld_py import cli


def test_the_collector_is_off_through_start_up_and_back_on_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "START_WITHOUT_GC", 0.05)
    seen: list[bool] = []

    async def daemon() -> int:
        seen.append(gc.isenabled())
        await asyncio.sleep(0.3)
        seen.append(gc.isenabled())
        return 7

    gc.disable()
    try:
        assert asyncio.run(cli._collect_after_start(daemon())) == 7
    finally:
        gc.enable()
    assert seen == [False, True]


def test_a_usage_error_leaves_the_collector_on() -> None:
    """main() may run in a caller's process (tests, tools): it must not leave the collector off."""
    with pytest.raises(SystemExit):
        cli.main(["--no-such-flag"])
    assert gc.isenabled()
