"""cancel_and_wait ends tasks that drop a cancellation, as Python 3.11's wait_for can."""

from __future__ import annotations

import asyncio

from flanneld_py.cancellation import cancel_and_wait


async def _drops_one_cancellation(log: list[str]) -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        log.append("dropped")  # what wait_for does when the result lands with the cancellation
    await asyncio.sleep(30)


async def _fails_when_cancelled() -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        raise RuntimeError("cleanup failed") from None


def test_a_task_that_drops_a_cancellation_is_cancelled_again() -> None:
    async def scenario() -> tuple[list[str], bool]:
        log: list[str] = []
        task = asyncio.create_task(_drops_one_cancellation(log))
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait([task]), 5)
        return log, task.cancelled()

    assert asyncio.run(scenario()) == (["dropped"], True)


def test_errors_while_ending_are_retrieved_not_raised(caplog) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> bool:
        failing = asyncio.create_task(_fails_when_cancelled())
        finished = asyncio.create_task(asyncio.sleep(0))
        await asyncio.sleep(0.01)
        await cancel_and_wait([failing, finished])
        return failing.done() and finished.done()

    assert asyncio.run(scenario())
    assert "never retrieved" not in caplog.text
