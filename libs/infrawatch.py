"""Watching the embedded broker and PostgreSQL: a death is said in one line and repaired.

`up`, `up --processes`, `demo` and every bench run on an `EmbeddedStack`. Its broker and its
PostgreSQL are processes of their own, and either can die under the services (killed by the
kernel for memory, by a person, by a crash). Before this watch the services printed thousands of
connection errors a minute and the run hung. Now a thread looks at both every half second; when
one is gone it logs one line (what died, its exit status where it can be known, the last lines of
its log) and starts it again where it was: the broker on the same port (the bus notices the new
broker's epoch and re-derives what was in flight from PostgreSQL), PostgreSQL on the same data
folder and socket. A restart that fails is retried after a back-off that doubles up to a minute,
with one line per attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visionloop.libs.rotation import Rotation

log = logging.getLogger("visionloop.embedded")

TAIL_LINES = 5
"""Lines of the dead process's log quoted in the line that says it died."""


def tail(path: Path, lines: int = TAIL_LINES, max_bytes: int = 16_384) -> str:
    """The last `lines` non-empty lines of a log file, joined by " | " (empty if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


@dataclass
class Watched:
    """One process the watch keeps alive.

    `dead` returns None while the process lives, else a phrase for its end ("exit status -9");
    `restart` starts it again (raises when it cannot); `log_path` is quoted when it dies.
    """

    name: str
    dead: Callable[[], str | None]
    restart: Callable[[], object]
    log_path: Path
    deaths: int = 0
    restarts: int = 0
    failed_restarts: int = 0
    history: list[dict[str, object]] = field(default_factory=list)


class Watch:
    """A daemon thread keeping the `Watched` processes alive (see the module's note)."""

    def __init__(self, watched: list[Watched], lock: threading.Lock, *, interval_s: float = 0.5,
                 backoff_s: tuple[float, float] = (1.0, 60.0)) -> None:
        self.watched = watched
        self.lock = lock
        self.interval_s = interval_s
        self.backoff_s = backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rotation: Rotation | None = None
        """A planned restart of the broker when its memory passes a limit (`libs/rotation.py`)."""

    def start(self) -> None:
        """Start watching (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="embedded-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching; a restart in progress finishes first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _run(self) -> None:
        retry_at = {w.name: 0.0 for w in self.watched}
        attempts = {w.name: 0 for w in self.watched}
        while not self._stop.wait(self.interval_s):
            for w in self.watched:
                with self.lock:
                    if self._stop.is_set():
                        return
                    how = w.dead()
                    if how is None:
                        attempts[w.name] = 0
                        continue
                    if time.monotonic() < retry_at[w.name]:
                        continue
                    retry_at[w.name] = self._repair(w, how, attempts[w.name])
                    attempts[w.name] += 1
            self._rotate()

    def _rotate(self) -> None:
        rotation, now = self.rotation, time.monotonic()
        if rotation is None:
            return
        rss = rotation.due(now)
        if rss is None:
            return
        with self.lock:
            if not self._stop.is_set():
                try:
                    rotation.rotate(rss)
                except Exception as exc:  # noqa: BLE001 - the death watch starts it again if it stays down
                    log.error("embedded broker rotation failed (%s); trying again in a minute; the watch restarts "
                              "the broker if it is down", exc)

    def _repair(self, w: Watched, how: str, attempt: int) -> float:
        """Say that `w` died (first attempt only) and restart it; when to try again if it failed."""
        if attempt == 0:
            w.deaths += 1
            last = tail(w.log_path)
            log.error("embedded %s died (%s); last lines of %s: %s; restarting it", w.name, how, w.log_path,
                      last or "(empty)")
        started = time.monotonic()
        try:
            w.restart()
        except Exception as exc:  # noqa: BLE001 - any failure to start is retried, said once per attempt
            w.failed_restarts += 1
            first, most = self.backoff_s
            delay = min(most, first * 2 ** attempt)
            log.error("embedded %s could not be restarted (%s); trying again in %.0f s", w.name, exc, delay)
            w.history.append({"at": time.time(), "event": "restart_failed", "reason": str(exc)})
            return time.monotonic() + delay
        w.restarts += 1
        w.history.append({"at": time.time(), "event": "restarted", "after": how, "seconds": round(time.monotonic() - started, 2)})
        log.warning("embedded %s restarted in %.1f s", w.name, time.monotonic() - started)
        return 0.0
