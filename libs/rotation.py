"""A planned restart of the embedded broker, so that its memory has a ceiling.

Tansu's memory storage keeps every record for the broker's life: measured, neither topic
retention (accepted, read back, never applied) nor DeleteRecords (the memory engine panics, "not
yet implemented") gives any memory back; only a restart does (`scripts/tansu_memory.py`). At
8 images/s with images inline on the submit topic the broker grows about 1.3 GB an hour.

So when the broker's resident memory passes `limit_mb`, the watch restarts it, but only at a
moment when every consumer group has read and committed everything on every topic that carries
work (the heartbeats' topic aside): then nothing is in flight on the broker, and what the bus
replays from its outboxes after the new epoch is already handled (the inboxes skip it). The
records of an upstream system's producer that arrive between that check and the restart (a
fraction of a second) are the only ones at risk; the broker's topics are created from the
registry right after it starts, so a producer's retry lands on a topic with the right partitions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("visionloop.embedded")

CHECK_EVERY_S = 5.0
"""How often the broker's memory is read."""
WAITING_CHECK_EVERY_S = 30.0
"""Once over the limit, how often the groups' lag is read (each reading asks every group)."""
WAITING_LINE_EVERY_S = 300.0
"""While a due rotation waits for the groups, a line saying what is behind at most this often."""


@dataclass
class Rotation:
    """When and how to rotate (see the module's note).

    `rss_mb` reads the broker's resident memory (None: not running); `behind` returns what has
    not caught up ("" when every group has); `restart` stops and starts the broker.
    """

    limit_mb: float
    rss_mb: Callable[[], float | None]
    behind: Callable[[], str]
    restart: Callable[[], object]
    check_every_s: float = CHECK_EVERY_S
    waiting_check_every_s: float = WAITING_CHECK_EVERY_S
    rotations: int = 0
    history: list[dict[str, object]] = field(default_factory=list)
    _due_since: float | None = None
    _said_at: float = float("-inf")
    _next_check: float = 0.0

    def due(self, now: float) -> float | None:
        """The broker's MB when a rotation is due now (over the limit, time to check), else None."""
        if self.limit_mb <= 0 or now < self._next_check:
            return None
        waiting = self._due_since is not None
        self._next_check = now + (max(self.check_every_s, self.waiting_check_every_s) if waiting else self.check_every_s)
        rss = self.rss_mb()
        if rss is None or rss < self.limit_mb:
            self._due_since = None
            return None
        if self._due_since is None:
            self._due_since = now
            log.warning("embedded broker holds %.0f MB (limit %.0f MB, VL_EMBEDDED_BROKER_MAX_MB): restarting it "
                        "as soon as every consumer group has caught up", rss, self.limit_mb)
        return rss

    def quiet(self, now: float) -> bool:
        """Whether every group has caught up; says what is behind now and then while it waits."""
        try:
            behind = self.behind()
        except Exception as exc:  # noqa: BLE001 - a broker too busy to answer is not quiet
            behind = f"lag unreadable ({type(exc).__name__}: {exc})"
        if not behind:
            return True
        since = now if self._due_since is None else self._due_since
        if now - self._said_at >= WAITING_LINE_EVERY_S and now - since >= WAITING_LINE_EVERY_S:
            self._said_at = now
            log.warning("embedded broker restart still waiting for consumer groups to catch up: %s", behind)
        return False

    def rotate(self, rss: float) -> None:
        """Restart the broker now (the caller holds the stack's lock)."""
        started = time.monotonic()
        self.restart()
        self.rotations += 1
        waited = time.monotonic() - (started if self._due_since is None else self._due_since)
        self._due_since = None
        self.history.append({"at": time.time(), "rss_mb": round(rss, 1), "waited_s": round(waited, 1)})
        log.warning("embedded broker restarted to give back %.0f MB (rotation %d, after waiting %.0f s for the groups); "
                    "in-flight work is re-derived from PostgreSQL", rss, self.rotations, waited)
