"""Waiting for something the loop does, with a deadline (the demo's and the chaos bench's)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float, error: Callable[[], Exception]) -> Any:
    """Poll `predicate` (sync or async) every `interval_s` until it is truthy; its value, or `error()` raised after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise error()
        await asyncio.sleep(interval_s)
