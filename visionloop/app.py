"""The composition root: the one place that wires real adapters to services in a process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import uvicorn

from visionloop import services
from visionloop.libs.blob import open_blob_store
from visionloop.libs.bus import Runtime
from visionloop.libs.db import create_pool
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.libs.settings import Settings

log = logging.getLogger(__name__)


def build_runtime(
    spec: ServiceSpec,
    settings: Settings,
    pool: asyncpg.Pool | None,
    adapters: Adapters,
    config: Any = None,
) -> tuple[Runtime, Any]:
    """A service's runtime with its handlers wired; also its ASGI app, if it has one.

    `config` overrides the service's own settings (read from the environment otherwise).
    """
    runtime = Runtime(
        spec.name, settings, pool=pool, migrations=spec.migrations, description=spec.description
    )
    if config is None and spec.settings is not None:
        config = spec.settings()
    app = spec.wire(runtime, adapters, config)
    return runtime, app


def consumer_groups(settings: Settings, names: list[str] | None = None) -> list[tuple[str, str]]:
    """(topic, consumer group) of every handler of the named services (all when None), as wired,
    without starting anything."""
    from visionloop.libs.blob import LocalBlobStore

    adapters = Adapters(blobs=LocalBlobStore(settings.state_dir / "blobs"))
    groups: list[tuple[str, str]] = []
    for name, spec in services.available().items():
        if names is None or name in names:
            runtime, _ = build_runtime(spec, settings, None, adapters)
            groups += runtime.subscriptions
    return groups


def _reused_port(host: str, port: int) -> socket.socket:
    """A listening-ready socket on `host:port` that other processes may bind too (SO_REUSEPORT):
    replicas of a service share its port and the kernel spreads the connections."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


STREAM_PAYLOADS = frozenset({"ImageSubmitted", "ImageIngested", "ImageAccepted", "ImageRejected", "ImageRecognized",
                             "ImageUnrecognized"})
"""The per-image topics: a rotation keeps their records past the services' committed offsets only.
Every other topic is small and kept whole, for readers whose groups are not known (edge agents)."""


def rotate_embedded_broker(stack: Any, settings: Settings, names: list[str], groups: list[tuple[str, str]] | None = None) -> None:
    """Let `stack` rotate its embedded broker at `settings.embedded_broker_max_mb`, keeping what the
    named services' consumer groups (or the given (topic, group) pairs) have not read on the
    per-image topics and every record of the others, the heartbeats' topic aside, and create the
    registry's topics right after any restart of it (`libs/rotation.py`)."""
    from visionloop.contracts import PipelineStatus, topic_of
    from visionloop.contracts.topics import TOPICS
    from visionloop.libs import kafka, rescue

    if getattr(stack, "broker", None) is None:
        return
    heartbeats = topic_of(PipelineStatus, settings.topic_prefix)
    groups = sorted({(topic, group) for topic, group in groups or consumer_groups(settings, names) if topic != heartbeats})
    whole = sorted(topic_of(payload, settings.topic_prefix) for payload in TOPICS
                   if payload.__name__ not in STREAM_PAYLOADS and topic_of(payload, settings.topic_prefix) != heartbeats)
    before: list[str | None] = [None]

    def unread() -> list[rescue.Kept]:
        before[0] = asyncio.run(rescue.epoch_now(settings))
        return asyncio.run(rescue.unread(settings, groups, whole))

    def put_back(kept: list[rescue.Kept]) -> None:
        asyncio.run(rescue.put_back(settings, kept))
        asyncio.run(rescue.continue_epoch(settings, before[0]))

    def topics() -> None:
        asyncio.run(kafka.ensure_topics(settings, TOPICS.values()))

    stack.rotate_broker(settings.embedded_broker_max_mb, unread=unread, put_back=put_back, after_start=topics)


class PortInUse(RuntimeError):
    """A service's HTTP port is taken: the service cannot start (no retry helps)."""


def check_port(name: str, host: str, port: int, *, shared: bool = False) -> None:
    """Raise `PortInUse`, naming the port, when `host:port` cannot be bound now (0: any port)."""
    if not port:
        return
    try:
        sock = _reused_port(host, port) if shared else socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise PortInUse(f"{name} cannot listen on {host}:{port}: {exc.strerror or exc} (another process holds "
                        f"the port; stop it or give {name} another port in its settings)") from None
    sock.close()


@dataclass
class ServiceHost:
    """Runs some of the loop's services in this process against configured infrastructure."""

    settings: Settings
    names: list[str]
    runtimes: list[Runtime] = field(default_factory=list)
    endpoints: dict[str, str] = field(default_factory=dict)
    _pool: asyncpg.Pool | None = None
    _servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = field(default_factory=list)

    async def start(self) -> None:
        """Connect, migrate, create topics and start every service (all or nothing).

        The services start side by side, as their processes do under `up --processes` (each
        joins its consumer groups, which takes a second or more per group on the embedded
        broker); `runtimes` keeps the loop's order."""
        self._pool = await create_pool(self.settings)
        adapters = Adapters(blobs=open_blob_store(self.settings.blob_location))
        try:
            built = []
            for name in self.names:
                spec = services.get(name)
                config = spec.settings() if spec.settings else None
                built.append((spec, config, *build_runtime(spec, self.settings, self._pool, adapters, config)))
            for spec, config, _, app in built:
                if app is not None:
                    check_port(spec.name, self.settings.http_host, config.port, shared=self.settings.http_reuse_port)
            outcomes = await asyncio.gather(*(self._start_one(*b) for b in built), return_exceptions=True)
            self.runtimes = [b[2] for b, outcome in zip(built, outcomes, strict=True) if outcome is None]
            failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
            if failed is not None:
                raise failed
            if self.settings.metrics_port is not None:
                from visionloop.libs.metrics import app as metrics_app

                await self._serve("metrics", metrics_app(self.runtimes), self.settings.metrics_port)
                self.endpoints["metrics"] += "/metrics"
        except BaseException:
            await self.stop()
            raise

    async def _start_one(self, spec: ServiceSpec, config: Any, runtime: Runtime, app: Any) -> None:
        await runtime.start()
        if app is not None:
            try:
                await self._serve(spec.name, app, config.port)
            except BaseException:
                await runtime.stop()
                raise
            runtime.http_url = self.endpoints[spec.name]

    async def _serve(self, name: str, app: Any, port: int) -> None:
        config = uvicorn.Config(app, host=self.settings.http_host, port=port, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        sockets = [_reused_port(self.settings.http_host, port)] if self.settings.http_reuse_port and port else None
        task = asyncio.create_task(server.serve(sockets=sockets), name=f"{name}-http")
        while not server.started:
            if task.done():
                task.result()  # raises the bind error
                raise RuntimeError(f"{name}: HTTP server stopped during start-up")
            await asyncio.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        self.endpoints[name] = f"http://{self.settings.http_host}:{bound}"
        self._servers.append((server, task))

    async def stop(self) -> None:
        """Stop HTTP servers, then services in reverse order, then the pool."""
        for server, task in self._servers:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task
        self._servers.clear()
        for runtime in reversed(self.runtimes):
            try:
                await runtime.stop()
            except Exception as exc:
                log.warning("%s did not stop cleanly: %s", runtime.service, exc)
        self.runtimes.clear()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
