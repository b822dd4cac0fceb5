"""The demo's waits: a deadline that counts from the last progress of the awaited work (a slow
machine's training is waited for; a stalled one is not)."""

from __future__ import annotations

import time

import pytest

from visionloop.demo.wait import wait_until


class Stalled(Exception):
    pass


async def test_work_that_keeps_progressing_is_waited_for_past_the_timeout() -> None:
    started = time.monotonic()
    ticks = iter(range(1_000))
    # Done after 0.5 s, five times the timeout, while its progress moves at every poll.
    value = await wait_until(lambda: time.monotonic() - started > 0.5 and "done", 0.1, 0.02, Stalled, progress=lambda: next(ticks))
    assert value == "done"


async def test_work_that_stops_progressing_fails_one_timeout_after_its_last_progress() -> None:
    started = time.monotonic()
    # Progress moves for 0.3 s, then stops; the timeout is 0.2 s.
    with pytest.raises(Stalled):
        await wait_until(lambda: False, 0.2, 0.02, Stalled, progress=lambda: min(time.monotonic() - started, 0.3))
    assert 0.5 <= time.monotonic() - started < 1.5


async def test_without_progress_the_timeout_counts_from_the_start() -> None:
    started = time.monotonic()
    with pytest.raises(Stalled):
        await wait_until(lambda: False, 0.2, 0.02, Stalled)
    assert 0.2 <= time.monotonic() - started < 1.0
