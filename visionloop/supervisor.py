"""`visionloop up --processes`: every service as its own OS process, supervised.

Each service runs as `visionloop run NAME` (the same command production uses), with the
platform settings of the parent passed in its environment. The supervisor restarts a process
that exits for any reason it did not ask for (a crash, SIGKILL, `visionloop restart NAME`),
after a back-off that doubles while the process keeps dying young. Each child writes a ready
file once its service is started, so "restarted" means "serving again", not "spawned".

HTTP services keep one port across restarts (a free port is chosen once when the configured
port is 0), so the clients of the gateway, ingest and the package server are not stranded. With
`metrics_port` set, each process serves `/metrics` on that port plus its index in loop order.

`replicas` runs more processes of a service (`dedup=2`): the replicas share the service's consumer
groups (Kafka spreads the partitions over them) and its HTTP port (each binds it with
SO_REUSEPORT, so the kernel spreads connections); the first is named after the service, the
others `NAME-2`, `NAME-3`, … in the supervisor's tables, logs and ready files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from visionloop.libs.embedded import _die_with_parent, free_port
from visionloop.libs.settings import Settings

log = logging.getLogger(__name__)

PROCESSES = "processes"
"""Folder under the state folder holding each child's ready file (`NAME.json`)."""

EX_CONFIG = 78
"""A child's exit status when it cannot start as configured (`visionloop run`): not restarted."""


class StartFailed(RuntimeError):
    """The services did not all come up; every process started was stopped again."""


def last_line(path: Path) -> str:
    """The last non-empty line of a log (markup and colour codes as written)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


NOT_PASSED = {"instance", "kafka_port", "metrics_port"}
"""Platform settings a child does not take from its parent (each process names and serves itself)."""


def child_environment(settings: Settings) -> dict[str, str]:
    """The parent's platform settings as `VL_*` variables for a child process (secrets included)."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        if name in NOT_PASSED:
            continue
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list | dict):
            value = json.dumps(value)
        env[f"VL_{name.upper()}"] = str(value)
    env["VL_BLOB_URL"] = settings.blob_location
    return env


@contextlib.contextmanager
def _environment(overrides: dict[str, str]) -> Iterator[None]:
    """`os.environ` with `overrides`, while a service's settings are read here as its child will read them."""
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class Exit:
    """One process exit the supervisor saw."""

    service: str
    pid: int
    returncode: int
    at: float
    requested: bool

    @property
    def signal(self) -> str | None:
        """The signal's name when a signal ended the process."""
        return signal.Signals(-self.returncode).name if self.returncode < 0 else None


def parse_replicas(text: str | None, known: list[str]) -> dict[str, int]:
    """`dedup=2,recognizer=3` as {service: processes}; ValueError naming what is wrong."""
    replicas: dict[str, int] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, _, count = part.partition("=")
        name = name.strip()
        if name not in known:
            raise ValueError(f"--replicas: {name!r} is not a service of this stack ({', '.join(known)})")
        if not count.strip().isdigit() or not 1 <= int(count) <= 16:
            raise ValueError(f"--replicas: {part!r} needs a count from 1 to 16, e.g. {name}=2")
        replicas[name] = int(count)
    return replicas


def replica_names(service: str, count: int) -> list[str]:
    """The supervisor's names of a service's processes: the service's own, then NAME-2, NAME-3, …"""
    return [service] + [f"{service}-{i}" for i in range(2, count + 1)]


@dataclass
class Child:
    """One supervised process of a service (`name` is the service's, or NAME-2, … for replicas)."""

    name: str
    env: dict[str, str]
    log_path: Path
    ready_path: Path
    service: str = ""
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    starts: int = 0
    young_deaths: int = 0
    ready: dict[str, Any] | None = None
    gave_up: str | None = None
    """Why it cannot start (it exited with EX_CONFIG), said by the last line of its log."""
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self.process.pid if self.process is not None and self.process.returncode is None else None


class Supervisor:
    """Runs services as child processes and keeps them running (see the module docstring)."""

    def __init__(self, settings: Settings, names: list[str], *, min_uptime_s: float = 30.0,
                 backoff_s: tuple[float, float] = (0.5, 10.0), extra_env: dict[str, str] | None = None,
                 replicas: dict[str, int] | None = None) -> None:
        self.settings = settings
        self.services = list(names)
        self.replicas = {service: (replicas or {}).get(service, 1) for service in names}
        self.names = [n for service in names for n in replica_names(service, self.replicas[service])]
        """Every process's name, in loop order, replicas after their first."""
        self.min_uptime_s = min_uptime_s
        self.backoff_s = backoff_s
        self.exits: list[Exit] = []
        self.restarts: Counter[str] = Counter()
        self._stopping = False
        folder = settings.state_dir / PROCESSES
        folder.mkdir(parents=True, exist_ok=True)
        logs = settings.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        base = {**os.environ, **child_environment(settings), **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        base.pop("VL_METRICS_PORT", None)
        self.children: dict[str, Child] = {}
        ports: dict[str, str] = {}
        processes = [(name, service) for service in self.services for name in replica_names(service, self.replicas[service])]
        for index, (name, service) in enumerate(processes):
            env = self._environment(base, service, extra_env, ports)
            if settings.metrics_port is not None:
                # Each process serves its own /metrics: the configured port plus the process's index (0: any free port).
                env["VL_METRICS_PORT"] = str(settings.metrics_port + index if settings.metrics_port else 0)
            self.children[name] = Child(name, env, logs / f"{name}.log", folder / f"{name}.json", service=service)

    def _environment(self, base: dict[str, str], service: str, extra_env: dict[str, str] | None,
                     ports: dict[str, str]) -> dict[str, str]:
        """A process's environment: its HTTP port chosen once per service (shared by its replicas)."""
        from visionloop import services as registry

        spec = registry.get(service)
        env = dict(base)
        with _environment(extra_env or {}):  # read as the child reads them: `extra_env` may name its config file
            config = spec.settings() if spec.settings is not None else None
        if config is not None and "port" in type(config).model_fields:
            variable = f"VL_{spec.settings.section.upper()}_PORT"
            if config.port == 0 and service not in ports:
                # One port for the life of the stack: a restart must not strand the service's clients.
                ports[service] = str(free_port(self.settings.http_host))
            if service in ports:
                env[variable] = ports[service]
            if self.replicas[service] > 1:
                env["VL_HTTP_REUSE_PORT"] = "true"  # the replicas bind one port; the kernel spreads connections
        return env

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self, timeout_s: float = 120.0) -> None:
        """Start every service's process; return when each is serving. Otherwise stop every
        process it started (none is left behind) and raise `StartFailed` with the reason."""
        try:
            for child in self.children.values():
                child.ready_path.unlink(missing_ok=True)
                await self._spawn(child)
                child.task = asyncio.create_task(self._watch(child), name=f"supervise-{child.name}")
            await asyncio.gather(*(self.wait_ready(name, timeout_s=timeout_s) for name in self.names))
        except BaseException as exc:
            await self.stop(grace_s=10.0)
            if isinstance(exc, (TimeoutError, StartFailed)):
                raise StartFailed(str(exc)) from None
            raise

    async def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every process (in reverse loop order), SIGKILL what outlives `grace_s`."""
        self._stopping = True
        for child in self.children.values():
            if child.task is not None:
                child.task.cancel()
        for child in reversed(list(self.children.values())):
            if child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for child in self.children.values():
            if child.process is None:
                continue
            try:
                await asyncio.wait_for(child.process.wait(), grace_s)
            except TimeoutError:
                log.warning("%s did not stop within %.0f s; killing it", child.name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
            child.ready_path.unlink(missing_ok=True)
        for child in self.children.values():
            if child.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await child.task

    # -- control ---------------------------------------------------------------------------------
    def pid(self, name: str) -> int | None:
        """The service's current process id (None while it is down)."""
        return self.children[name].pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Send `sig` to the service's process; the supervisor restarts it. The pid signalled."""
        child = self.children[name]
        pid = child.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pid

    async def restart(self, name: str, timeout_s: float = 120.0) -> int:
        """Stop the service's process gracefully and wait until its successor serves; the new pid."""
        old = self.kill(name, signal.SIGTERM)
        return await self.wait_ready(name, after_pid=old, timeout_s=timeout_s)

    async def wait_ready(self, name: str, *, after_pid: int | None = None, timeout_s: float = 120.0) -> int:
        """Wait until a process of `name` other than `after_pid` reports ready; its pid. Raises
        `StartFailed` at once for a process that exited as unable to start (EX_CONFIG)."""
        child = self.children[name]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child.gave_up is not None:
                raise StartFailed(child.gave_up)
            pid = child.pid
            if pid is not None and pid != after_pid and child.ready_path.exists():
                with contextlib.suppress(ValueError, OSError):
                    ready = json.loads(child.ready_path.read_text())
                    if ready.get("pid") == pid:
                        child.ready = ready
                        return pid
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{name} was not serving within {timeout_s:.0f} s; see {child.log_path}")

    def endpoints(self) -> dict[str, str]:
        """HTTP endpoints the children reported ready with."""
        out: dict[str, str] = {}
        for child in self.children.values():
            if child.ready:
                out.update(child.ready.get("endpoints", {}))
        return out

    def snapshot(self) -> dict[str, Any]:
        """Each service's pid, uptime, starts and last exit (for the run file and `status`)."""
        now = time.monotonic()
        out = {}
        for name, child in self.children.items():
            last = next((e for e in reversed(self.exits) if e.service == name), None)
            out[name] = {
                "pid": child.pid, "uptime_s": round(now - child.started_at, 1) if child.pid else None, "starts": child.starts,
                "restarts": self.restarts[name], "log": str(child.log_path),
                "last_exit": None if last is None else {"returncode": last.returncode, "signal": last.signal, "requested": last.requested},
            }
        return out

    # -- internals -------------------------------------------------------------------------------
    async def _spawn(self, child: Child) -> None:
        with open(child.log_path, "ab") as out:
            child.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "visionloop.cli", "run", child.service or child.name, "--ready-file", str(child.ready_path),
                env=child.env, stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        child.started_at = time.monotonic()
        child.starts += 1
        log.info("%s started (pid %d)", child.name, child.process.pid)

    async def _watch(self, child: Child) -> None:
        while True:
            assert child.process is not None
            pid = child.process.pid
            code = await child.process.wait()
            lived = time.monotonic() - child.started_at
            self.exits.append(Exit(child.name, pid, code, time.time(), requested=self._stopping))
            if self._stopping:
                return
            if code == EX_CONFIG:  # it cannot start as configured (a port in use): a restart cannot help
                child.gave_up = last_line(child.log_path) or f"{child.name} cannot start as configured"
                log.error("%s (pid %d) cannot start: %s", child.name, pid, child.gave_up)
                return
            child.young_deaths = child.young_deaths + 1 if lived < self.min_uptime_s else 0
            first, most = self.backoff_s
            delay = min(most, first * 2 ** max(0, child.young_deaths - 1))
            log.warning("%s (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                        child.name, pid, code, lived, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            self.restarts[child.name] += 1
            await self._spawn(child)
