"""The commands that run the loop: up, restart, run, status, submit, version, config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from visionloop import __version__
from visionloop.cli.common import (
    EX_CONFIG,
    RUN_FILE,
    ConfigOpt,
    _attach,
    _logging,
    _settings,
    app,
    console,
    out,
    report_table,
)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


@app.command()
def config(
    docs: Annotated[bool, typer.Option("--docs", help="Print the Markdown reference of every setting.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Print the settings in force (secrets masked), or the reference of every setting."""
    from visionloop import services as registry
    from visionloop.libs.settings import Settings, settings_reference

    service_settings = [s.settings for s in registry.available().values() if s.settings is not None]
    if docs:
        out.print(settings_reference([Settings, *service_settings]), highlight=False, markup=False, soft_wrap=True)
        return
    shown = _settings(config).redacted()
    for cls in service_settings:
        shown[cls.section] = cls().model_dump(mode="json")
    out.print_json(json.dumps(shown))


@app.command()
def up(
    services: Annotated[str | None, typer.Option(help="Comma-separated services to run (default: all).")] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Push a sample image through, print the outcome, stop.")] = False,
    processes: Annotated[bool, typer.Option("--processes", help="Each service in its own OS process, supervised and restarted.")] = False,
    replicas: Annotated[str | None, typer.Option(help="With --processes: more processes of a service, e.g. dedup=2,recognizer=2 (one consumer group, one port).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Start the embedded broker and PostgreSQL (unless configured externally) and every service.

    With `--processes` every service runs as its own process (`visionloop run NAME`, as in
    production); a process that dies is restarted, and `visionloop restart NAME` restarts one.
    Ctrl-C stops everything cleanly.
    """
    from visionloop import services as registry
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.supervisor import parse_replicas

    settings = _settings(config)
    _logging(settings.log_level)
    names = [n.strip() for n in services.split(",")] if services else list(registry.available())
    for name in names:
        registry.get(name)  # unknown names fail before anything starts
    try:
        counts = parse_replicas(replicas, names)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if counts and not processes:
        console.print("[red]--replicas needs --processes (replicas are processes of their own)[/]")
        raise typer.Exit(2)
    stack = EmbeddedStack(settings)
    with console.status("starting the embedded broker and PostgreSQL"):
        settings = stack.start(door=settings.embedded_broker_max_mb > 0)  # the door lets it rotate the broker
    run_file = settings.state_dir / RUN_FILE
    try:
        code = asyncio.run(_up(settings, names, run_file, smoke, processes, counts, stack))
    finally:
        run_file.unlink(missing_ok=True)
        with console.status("stopping the embedded broker and PostgreSQL"):
            stack.stop()
    console.print("[green]stopped cleanly[/]")
    raise typer.Exit(code)


async def _up(settings, names: list[str], run_file: Path, smoke: bool, processes: bool = False,  # noqa: ANN001
              replicas: dict[str, int] | None = None, stack: Any = None) -> int:
    from visionloop.app import PortInUse, ServiceHost, rotate_embedded_broker
    from visionloop.supervisor import StartFailed, Supervisor

    host: ServiceHost | Supervisor = Supervisor(settings, names, replicas=replicas) if processes else ServiceHost(settings, names)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with console.status(f"starting {len(names)} service(s)" + (" as processes" if processes else "")):
            await host.start()
    except (StartFailed, PortInUse) as exc:  # every process started was stopped again
        console.print(f"[red]could not start:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    endpoints = host.endpoints() if isinstance(host, Supervisor) else host.endpoints
    if stack is not None:
        rotate_embedded_broker(stack, settings, names)  # the embedded broker's memory gets a ceiling
    cli_token = None
    if "ingest" in names:
        try:
            cli_token = await _local_ingest_token(settings)
        except Exception as exc:  # noqa: BLE001 - the loop runs without it; submit then needs --token
            console.print(f"[yellow]no local ingest token for `visionloop submit` ({exc}); pass --token[/]")
    try:
        written = run_file.with_suffix(".tmp")
        written.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "mode": "processes" if processes else "one process",
                    "kafka_bootstrap": settings.kafka_bootstrap,
                    "kafka_embedded": settings.kafka_embedded,
                    "database_url": settings.database_url,
                    "blob_url": settings.blob_location,
                    "services": names,
                    "replicas": replicas or {},
                    "endpoints": endpoints,
                    "started_at": time.time(),
                },
                indent=2,
            )
        )
        written.replace(run_file)  # atomic: a command run meanwhile (status, submit, a test) never reads half a file
        _print_where(settings, names, endpoints)
        if smoke:
            return await _smoke(settings, names)
        console.print("[bold]running[/] — Ctrl-C to stop" + ("; `visionloop restart NAME` restarts one service" if processes else ""))
        await stop.wait()
        return 0
    finally:
        with console.status("stopping services"):
            await host.stop()
        if cli_token is not None:
            await _revoke_local_ingest_token(settings, cli_token)


INGEST_TOKEN_FILE = "ingest-token"
"""Under the state folder while `up` runs: a token for `visionloop submit` on this machine (0600)."""


async def _local_ingest_token(settings) -> str:  # noqa: ANN001
    """Create the token `visionloop submit` uses over ingest's HTTP API here; its id."""
    from visionloop.services.ingest.admin import create_token

    token_id, token = await create_token(settings, name="visionloop-cli (local, while `up` runs)", projects=["*"])
    path = settings.state_dir / INGEST_TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token_id


async def _revoke_local_ingest_token(settings, token_id: str) -> None:  # noqa: ANN001
    from visionloop.services.ingest.admin import revoke_token

    (settings.state_dir / INGEST_TOKEN_FILE).unlink(missing_ok=True)
    with contextlib.suppress(Exception):  # the database may be going away with the stack
        await revoke_token(settings, token_id)


@app.command()
def restart(
    service: Annotated[str, typer.Argument(help="The service to restart, e.g. trainer.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the new process to serve.")] = 120.0,
    config: ConfigOpt = None,
) -> None:
    """Restart one service of a `visionloop up --processes` in progress (graceful stop; the supervisor starts it again)."""
    from visionloop.supervisor import PROCESSES

    settings = _settings(config)
    ready = settings.state_dir / PROCESSES / f"{service}.json"
    if not ready.exists():
        console.print(f"[red]no running process for {service!r}[/]: is `visionloop up --processes` running here? (looked for {ready})")
        raise typer.Exit(2)
    old = json.loads(ready.read_text())["pid"]
    try:
        os.kill(old, signal.SIGTERM)
    except ProcessLookupError:
        console.print(f"[yellow]{service} (pid {old}) had already exited; the supervisor restarts it[/]")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ValueError, OSError):
            pid = json.loads(ready.read_text())["pid"]
            if pid != old:
                console.print(f"[green]{service} restarted[/]: pid {old} -> {pid}")
                return
        time.sleep(0.2)
    console.print(f"[red]{service} was not serving again within {timeout:.0f} s[/]; see {settings.state_dir / 'logs' / (service + '.log')}")
    raise typer.Exit(1)


def _print_where(settings, names: list[str], endpoints: dict[str, str]) -> None:  # noqa: ANN001
    table = Table(title="visionloop is up", show_header=False)
    table.add_row("Kafka bootstrap", settings.kafka_bootstrap + ("  (embedded Tansu, memory only)" if settings.kafka_embedded else ""))
    table.add_row("PostgreSQL", settings.redacted()["database_url"])
    table.add_row("Blob store", settings.blob_location)
    table.add_row("State folder", str(settings.state_dir))
    table.add_row("Services", ", ".join(names) or "none")
    for name, url in endpoints.items():
        table.add_row(f"{name} HTTP", url)
    table.add_row("Status", "visionloop status   (from another terminal)")
    console.print(table)


FINAL_EVENTS = {
    "recognizer": {"image.recognized", "image.unrecognized", "image.rejected"},
    "dedup": {"image.accepted", "image.rejected"},
    "ingest": {"image.ingested", "image.rejected"},
}
"""The last event of an image's trail, by the furthest service that runs (in loop order)."""


def _final_events(names: list[str]) -> set[str]:
    for service in ("recognizer", "dedup", "ingest"):
        if service in names:
            return FINAL_EVENTS[service]
    return {"image.rejected"}


async def _smoke(settings, names: list[str]) -> int:  # noqa: ANN001
    """Publish one synthetic image as an upstream system would; follow it through the services."""
    from visionloop.libs.scenes import render_scene

    scene = render_scene(seed=int(time.time()) % 100_000)
    submission_id = f"smoke-{uuid.uuid4().hex[:8]}"
    final = _final_events(names)
    from visionloop.submit import submit_and_follow

    trail = await submit_and_follow(settings, scene.encode(), project="demo", submission_id=submission_id, final=final, timeout_s=30)
    for event in trail:
        payload = event["payload"]
        detail = payload.get("reason") or payload.get("image", {}).get("image_id", "")[:16]
        console.print(f"  {event['producer']:<28} {event['event_type']:<18} {detail}")
    if not trail or trail[-1]["event_type"] not in final:
        console.print(f"[red]sample image {submission_id}: no final answer within 30 s[/]")
        return 1
    console.print(f"[green]sample image {submission_id} -> {trail[-1]['event_type']}[/]")
    return 0 if trail[-1]["event_type"] != "image.rejected" else 1


@app.command()
def run(
    service: Annotated[str, typer.Argument(help="The service to run, e.g. ingest.")],
    ready_file: Annotated[Path | None, typer.Option(help="Write {pid, endpoints} here once serving (used by `up --processes`).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run one service as its own process against configured infrastructure (VL_KAFKA_BOOTSTRAP, VL_DATABASE_URL)."""
    from visionloop import services as registry

    settings = _attach(_settings(config))
    _logging(settings.log_level)
    try:
        registry.get(service)
    except KeyError as exc:
        console.print(f"[red]{exc.args[0]}[/]")
        raise typer.Exit(2) from None

    async def main() -> None:
        from visionloop.app import ServiceHost

        host = ServiceHost(settings, [service])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if not await _started_unless_stopped(host, stop):
            return
        if ready_file is not None:
            ready = {"pid": os.getpid(), "service": service, "endpoints": host.endpoints, "started_at": time.time()}
            temporary = ready_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(ready))
            temporary.replace(ready_file)  # atomic: a reader never sees half a file
        console.print(f"[bold]{service}[/] running against {settings.kafka_bootstrap} — Ctrl-C to stop")
        try:
            await stop.wait()
        finally:
            await host.stop()

    from visionloop.app import PortInUse

    try:
        asyncio.run(main())
    except PortInUse as exc:  # no restart can help: say it in one line (unwrapped), exit with EX_CONFIG
        print(exc, file=sys.stderr, flush=True)
        raise typer.Exit(EX_CONFIG) from None


async def _started_unless_stopped(host: Any, stop: asyncio.Event) -> bool:
    """Start `host`, unless a stop signal comes first (then stop what started): whether it runs.
    A service waiting on its infrastructure must still obey SIGTERM."""
    starting = asyncio.create_task(host.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if starting.done():
        starting.result()
        return True
    starting.cancel()
    with contextlib.suppress(BaseException):
        await starting
    await host.stop()
    return False


@app.command()
def status(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object instead of tables.")] = False,
    config: ConfigOpt = None,
) -> None:
    """What is running, topic lag per consumer group, and the last event on each topic."""
    from visionloop.app import consumer_groups
    from visionloop.libs.observe import snapshot

    settings = _attach(_settings(config))
    snap = asyncio.run(snapshot(settings, consumer_groups(settings)))
    if json_output:
        out.print(snap.to_json(), highlight=False, soft_wrap=True, markup=False)
        return
    services_table = report_table(
        f"services (status topic, last 60 s) — broker {snap.bootstrap}",
        "service", "instance", "state", "seen", "uptime", "handled", "dead-lettered",
    )
    for inst in snap.instances:
        dead = sum(v for k, v in inst.counters.items() if k.startswith("dead_lettered"))
        services_table.add_row(
            inst.service, inst.instance, inst.kind, f"{inst.seen_s_ago:.0f} s ago", f"{inst.uptime_s:.0f} s",
            str(inst.counters.get("handled", 0)), str(dead),
        )
    out.print(services_table)
    lag_table = report_table("consumer lag", "group", "topic", "committed", "end", "lag")
    for lag in snap.lags:
        lag_table.add_row(lag.group, lag.topic, str(lag.committed), str(lag.end), str(lag.lag))
    out.print(lag_table)
    events_table = report_table("last events", "topic", "messages", "last event", "at", "producer", "project")
    for ev in snap.last_events:
        events_table.add_row(ev.topic, str(ev.messages), ev.event_type or "-", ev.occurred_at or "-", ev.producer or "-", ev.project or "-")
    out.print(events_table)


@app.command()
def submit(
    paths: Annotated[list[Path], typer.Argument(help="Image files to submit.", exists=True, dir_okay=False)],
    project: Annotated[str, typer.Option(help="Project the images belong to.")] = "demo",
    wait: Annotated[float, typer.Option(help="Seconds to wait for ingest's answer per image.")] = 30.0,
    ingest_url: Annotated[str | None, typer.Option(help="Ingest's HTTP API, for files the submit topic cannot carry (default: from `visionloop up`'s run file).")] = None,
    token: Annotated[str | None, typer.Option(envvar="VL_INGEST_TOKEN", help="Ingest token for its HTTP API (default: the local one `visionloop up` made).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Submit image files as an upstream system would (inline on the submit topic, or over ingest's
    HTTP API when too big for it) and print one answer line per file."""
    from visionloop import services as registry
    from visionloop.services.ingest.config import IngestSettings
    from visionloop.submit import submit_file

    settings = _attach(_settings(config))
    url = ingest_url or _run_endpoint(settings, "ingest")
    final = _final_events(list(registry.available()))
    inline_max = IngestSettings().inline_max_bytes
    failures = 0
    for path in paths:
        answer = asyncio.run(submit_file(settings, path, project=project, wait=wait, final=final, inline_max=inline_max,
                                         ingest_url=url, token=token or _local_token(settings)))
        failures += not answer.ok
        out.print(answer.line, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1 if failures else 0)


def _local_token(settings) -> str | None:  # noqa: ANN001
    """The token `visionloop up` made for this machine's `submit`, if it runs."""
    with contextlib.suppress(OSError):
        return (settings.state_dir / INGEST_TOKEN_FILE).read_text().strip() or None
    return None


def _run_endpoint(settings, service: str) -> str | None:  # noqa: ANN001
    """A service's HTTP address from the run file of a `visionloop up` in progress, if any."""
    path = settings.state_dir / RUN_FILE
    try:
        return json.loads(path.read_text()).get("endpoints", {}).get(service)
    except (OSError, ValueError):
        return None
