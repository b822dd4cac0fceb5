"""A log that says a repeated failure once per window, not thousands of times.

While the broker is down every Kafka client of every service retries its connection many times a
second, and each retry logs an error: 21,864 "Unable connect to node" lines in three minutes were
seen. `RepeatFilter` sits on the handlers of the root logger (`install`): a warning or error
repeated within `window_s` is counted instead of written, and the next line of its kind says how
many were left out. Kinds:

- a Kafka client's connection trouble (any line of the `aiokafka` loggers about connecting,
  nodes, metadata, coordinators or heartbeats): one kind per process, so a service says at most
  one such line per window however many nodes, groups and clients it has;
- any other warning or error: its exact text (the same line repeated).

Lines below WARNING pass untouched.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

WINDOW_S = 10.0
"""At most one line of a kind per this many seconds."""

KAFKA_LOGGERS = ("aiokafka", "kafka", "faststream")
CONNECTION = re.compile(
    r"connect|node|metadata|coordinator|heartbeat|broker|bootstrap|timed? ?out|unreachable|refused|NoBrokersAvailable",
    re.IGNORECASE)


def kind_of(record: logging.LogRecord) -> tuple[object, ...]:
    """The kind of a record (see the module's note)."""
    message = record.getMessage()
    if record.name.split(".", 1)[0] in KAFKA_LOGGERS and CONNECTION.search(message):
        return ("kafka connection",)
    return (record.name, record.levelno, message)


class RepeatFilter(logging.Filter):
    """Lets through the first line of each kind per `window_s`; counts the rest (see the module)."""

    def __init__(self, window_s: float = WINDOW_S, *, max_kinds: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.max_kinds = max_kinds
        self.clock = clock
        self._seen: OrderedDict[tuple[object, ...], list[float | int]] = OrderedDict()
        self._lock = threading.Lock()
        self.suppressed = 0
        """Lines left out so far (all kinds)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        decided = getattr(record, "_vl_pass", None)
        if decided is not None:  # one record, several handlers: decided once
            return bool(decided)
        record._vl_pass = self._decide(record)  # type: ignore[attr-defined]
        return bool(record._vl_pass)  # type: ignore[attr-defined]

    def _decide(self, record: logging.LogRecord) -> bool:
        kind, now = kind_of(record), self.clock()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                self.suppressed += 1
                return False
            left_out = int(seen[1]) if seen is not None else 0
            self._seen[kind] = [now, 0]
            self._seen.move_to_end(kind)
            while len(self._seen) > self.max_kinds:
                self._seen.popitem(last=False)
        if left_out:
            record.msg = f"{record.getMessage()} [{left_out} more like this since the last one shown]"
            record.args = ()
        return True


def install(window_s: float = WINDOW_S) -> RepeatFilter:
    """Put one `RepeatFilter` on every handler of the root logger (once); return it."""
    root = logging.getLogger()
    existing = next((f for h in root.handlers for f in h.filters if isinstance(f, RepeatFilter)), None)
    throttle = existing or RepeatFilter(window_s)
    for handler in root.handlers:
        if throttle not in handler.filters:
            handler.addFilter(throttle)
    return throttle
