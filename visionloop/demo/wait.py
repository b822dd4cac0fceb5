"""Waiting for something the loop does, with a deadline (the demo's and the chaos bench's)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float, error: Callable[[], Exception],
                     progress: Callable[[], Any] | None = None) -> Any:
    """Poll `predicate` (sync or async) every `interval_s` until it is truthy; its value, or `error()` raised after `timeout_s`.

    With `progress` (a value that changes while the awaited work advances, such as the epochs a
    training run has done), the deadline counts from its last change: slow work on a slow machine
    is waited for, work that stalls is not.
    """
    deadline = time.monotonic() + timeout_s
    last = progress() if progress is not None else None
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if progress is not None and (seen := progress()) != last:
            last, deadline = seen, time.monotonic() + timeout_s
        if time.monotonic() > deadline:
            raise error()
        await asyncio.sleep(interval_s)
