"""A planned restart of the embedded broker, so that its memory has a ceiling.

Tansu's memory storage keeps every record for the broker's life: measured, neither topic
retention (accepted, read back, never applied) nor DeleteRecords (the memory engine panics, "not
yet implemented") gives any memory back; only a restart does (`scripts/tansu_memory.py`). At
8 images/s with images inline on the submit topic the broker grows about 1.3 GB an hour.

So when the broker's resident memory passes `limit_mb`, the watch restarts it, losing nothing:

1. the front door (`libs/frontdoor.py`) holds every client's produce requests and waits until each
   one already forwarded is answered: from then on the broker acknowledges nothing more;
2. every record past the lowest committed offset of the groups that read its topic is read back
   (`libs/rescue.py`): the records acknowledged to a producer that no consumer has handled;
3. the broker is stopped and started again, the registry's topics created, and those records
   written back to the same partitions, in their order;
4. the door opens: held requests, whose connections the restart closed, are sent again by their
   clients to the fresh broker.

Per-image topics are kept past the lowest offset the services' groups committed; every other
topic is small and kept whole, for readers whose groups are not known here (edge agents). The
fresh broker's epoch then names the one it continues, so the services do not re-publish their
retained outboxes (`libs/bus/epoch.py`): that replay rewrote every retained outbox row and sent it
all again on each rotation (in a 2-hour soak the outbox grew 289 MB/h and rotations came twice as
often). A death of the broker is not planned: its new epoch is a fresh id, and the replay re-derives
what was lost. A first version waited instead for a moment when every group had caught up; under a
steady stream (8 images/s) that moment never came (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("visionloop.embedded")

CHECK_EVERY_S = 5.0
"""How often the broker's memory is read."""
RETRY_AFTER_S = 60.0
"""After a failed rotation, how long until the next try."""


@dataclass
class Rotation:
    """When and how to rotate (see the module's note).

    `rss_mb` reads the broker's resident memory (None: not running); `restart` holds the door,
    keeps the unread records, restarts the broker, puts them back and returns how many."""

    limit_mb: float
    rss_mb: Callable[[], float | None]
    restart: Callable[[], int]
    check_every_s: float = CHECK_EVERY_S
    rotations: int = 0
    history: list[dict[str, object]] = field(default_factory=list)
    _next_check: float = 0.0

    def due(self, now: float) -> float | None:
        """The broker's MB when a rotation is due now (over the limit, time to check), else None."""
        if self.limit_mb <= 0 or now < self._next_check:
            return None
        self._next_check = now + self.check_every_s
        rss = self.rss_mb()
        if rss is None or rss < self.limit_mb:
            return None
        return rss

    def rotate(self, rss: float) -> None:
        """Restart the broker now (the caller holds the stack's lock); a failure is retried later."""
        started = time.monotonic()
        try:
            kept = self.restart()
        except BaseException:
            self._next_check = time.monotonic() + RETRY_AFTER_S
            raise
        self.rotations += 1
        took = time.monotonic() - started
        self.history.append({"at": time.time(), "rss_mb": round(rss, 1), "kept": kept, "took_s": round(took, 2)})
        log.warning("embedded broker restarted to give back %.0f MB (limit %.0f MB, VL_EMBEDDED_BROKER_MAX_MB; rotation %d "
                    "in %.1f s): %d unread record(s) written back, nothing lost, nothing to re-publish",
                    rss, self.limit_mb, self.rotations, took, kept)
