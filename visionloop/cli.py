"""The `visionloop` command: one vocabulary for running, inspecting and measuring the loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from visionloop import __version__
from visionloop.libs import logthrottle

app = typer.Typer(
    name="visionloop",
    help="A closed loop that keeps object detectors learning from the images they see.",
    no_args_is_help=True,
    add_completion=False,
)
contracts_app = typer.Typer(help="JSON Schemas and the AsyncAPI document of the contracts.", no_args_is_help=True)
bench_app = typer.Typer(help="Committed benchmarks; results go to docs/benchmarks.md.", no_args_is_help=True)
app.add_typer(contracts_app, name="contracts")
app.add_typer(bench_app, name="bench")
library_app = typer.Typer(help="The model library: register ONNX detectors, move aliases, list what serves.", no_args_is_help=True)
app.add_typer(library_app, name="library")
gateway_app = typer.Typer(help="The labelling gateway: projects and API tokens.", no_args_is_help=True)
gateway_token_app = typer.Typer(help="API tokens (stored hashed; shown once).", no_args_is_help=True)
gateway_project_app = typer.Typer(help="Projects and their taxonomy.", no_args_is_help=True)
gateway_app.add_typer(gateway_token_app, name="token")
gateway_app.add_typer(gateway_project_app, name="project")
app.add_typer(gateway_app, name="gateway")
ingest_app = typer.Typer(help="Ingest: API tokens of the upstream systems.", no_args_is_help=True)
ingest_token_app = typer.Typer(help="Tokens for ingest's HTTP API (stored hashed; shown once).", no_args_is_help=True)
ingest_app.add_typer(ingest_token_app, name="token")
app.add_typer(ingest_app, name="ingest")
kafka_app = typer.Typer(help="Kafka for a deployment: principals and ACLs.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
verifier_app = typer.Typer(help="The verifier: auto-accept calibration.", no_args_is_help=True)
app.add_typer(verifier_app, name="verifier")
trainer_app = typer.Typer(help="The trainer: ask for a run, list runs.", no_args_is_help=True)
app.add_typer(trainer_app, name="trainer")
release_app = typer.Typer(help="Releases: promote, pause, resume or roll back a rollout.", no_args_is_help=True)
app.add_typer(release_app, name="release")
keys_app = typer.Typer(help="Package signing keys (Ed25519).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _mount_edge_agent() -> None:
    from visionloop.services.edge_agent.cli import edge_app

    app.add_typer(edge_app, name="edge-agent", help="Run an edge agent for a fleet, or predict with its active model.")


_mount_edge_agent()

console = Console(stderr=True)
out = Console()

EX_CONFIG = 78
"""Exit status of a service that cannot start as configured (a port in use): not restarted."""
RUN_FILE = "run.json"
"""Written by `up` under the state folder: where the running embedded stack can be reached."""


def _settings(config: Path | None = None, **overrides: Any):  # noqa: ANN202 - Settings, imported lazily
    if config is not None:
        os.environ["VL_CONFIG"] = str(config)
    from visionloop.libs.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _attach(settings):  # noqa: ANN001, ANN202
    """Fill unset infrastructure from the run file of a `visionloop up` in progress."""
    if settings.kafka_bootstrap and settings.database_url:
        return settings
    path = settings.state_dir / RUN_FILE
    if not path.exists():
        console.print(
            "[red]no infrastructure configured[/]: set VL_KAFKA_BOOTSTRAP and VL_DATABASE_URL, "
            f"or start `visionloop up` (looked for {path})"
        )
        raise typer.Exit(2)
    run = json.loads(path.read_text())
    return settings.model_copy(
        update={
            "kafka_bootstrap": settings.kafka_bootstrap or run["kafka_bootstrap"],
            "kafka_embedded": settings.kafka_bootstrap is None and run.get("kafka_embedded", False),
            "database_url": settings.database_url or run["database_url"],
            "blob_url": settings.blob_url or run.get("blob_url"),
        }
    )


def _read_report(settings, service: str, table: str, report: Any) -> list[dict[str, Any]]:  # noqa: ANN001
    """`report(pool, schema)` on a service's schema; no rows while the service never ran (its `table` does not exist)."""
    from visionloop.libs.db import create_pool

    async def load() -> list[dict[str, Any]]:
        pool = await create_pool(settings, min_size=1, max_size=1)
        try:
            schema = settings.schema_for(service)
            exists = await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.{table}")
            return await report(pool, schema) if exists else []
        finally:
            await pool.close()

    return asyncio.run(load())


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "faststream", "visionloop.kafka", "pgserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    logthrottle.install()  # a repeated failure (a broker down) is said once per 10 s, with a count


ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML or TOML settings file (VL_CONFIG).")]


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
        run_file.write_text(
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


demo_app = typer.Typer(help="The whole loop in three rounds on the embedded stack; the built-in world.")
app.add_typer(demo_app, name="demo")
world_app = typer.Typer(help="The demo's built-in world.", no_args_is_help=True)
demo_app.add_typer(world_app, name="world")
DatasetOpt = Annotated[Path | None, typer.Option(
    "--dataset", help="Your own labelled images instead of the built-in world: a COCO JSON with its images, or a YOLO folder "
    "(images/, labels/, data.yaml). Checked before anything starts.")]
WorldOpt = Annotated[str, typer.Option("--world", help="The built-in world: photo (real photographs, the default) or shapes.")]


@demo_app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="The CI-sized run (about 3 minutes on two cores); its models learn little.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line summarising the report.")] = False,
    dataset: DatasetOpt = None,
    world: WorldOpt = "photo",
) -> None:
    """The whole loop in three rounds on the embedded stack, every service as in production; writes a report."""
    if ctx.invoked_subcommand is not None:
        return
    from dataclasses import replace

    from visionloop.demo.report import write_report
    from visionloop.demo.scenario import DemoConfig, run_demo

    _demo_logging()
    _check_dataset(dataset)
    cfg = replace(DemoConfig.quick() if quick else DemoConfig(), world=world, dataset=str(dataset) if dataset else None)
    result = run_demo(cfg, state=Path(".visionloop") / "demo", console=console)
    report = write_report(result, Path(result["folder"]) / "report")
    console.print(f"[green]report[/]: {report}")
    if json_output:
        out.print(json.dumps(_demo_summary(result, report)), highlight=False, soft_wrap=True, markup=False)


def _check_dataset(dataset: Path | None) -> None:
    """Refuse a malformed dataset before anything starts, naming the file and the problem."""
    if dataset is None:
        return
    from visionloop.demo.dataset import DatasetError, load_dataset

    try:
        found = load_dataset(dataset)
    except DatasetError as exc:
        console.print(f"[red]dataset refused[/] ({getattr(exc, 'reason', 'invalid')}): {exc}")
        raise typer.Exit(2) from None
    console.print(f"dataset {dataset}: {len(found.images)} labelled images, classes {', '.join(found.classes)}")


@world_app.command("export")
def demo_world_export(
    out_dir: Annotated[Path, typer.Option("--out", help="A new (or empty) folder to write the dataset into.")],
    format_: Annotated[str, typer.Option("--format", help="coco (annotations/instances.json + images/) or yolo (data.yaml, images/, labels/).")] = "coco",
    images: Annotated[int, typer.Option(help="Scenes to write.")] = 600,
    seed: Annotated[int, typer.Option(help="The world's seed.")] = 7,
    world: WorldOpt = "photo",
) -> None:
    """Write the built-in world as a labelled dataset folder (check `--dataset` against it)."""
    from visionloop.demo.export import export_world

    try:
        folder = export_world(out_dir, fmt=format_, images=images, style=world, seed=seed)
    except (ValueError, FileExistsError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    out.print(f"wrote the {world} world ({images} scenes, {format_}) to {folder}")


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A log handler that writes to whatever `sys.stderr` is when it writes: while the demo's
    progress bars are live, rich's proxy, which prints the record above them."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _demo_logging() -> None:
    """`_logging("WARNING")`, through `_CurrentStderr`."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", handlers=[_CurrentStderr()])
    for noisy in ("aiokafka", "faststream", "visionloop.kafka", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logthrottle.install()


def _demo_summary(result: dict[str, Any], report: Path) -> dict[str, Any]:
    from collections import Counter

    rounds = result["rounds"]
    return {
        "map50_95": [r["model"]["metrics"]["map50_95"] if r["model"] else None for r in rounds],
        "human_actions_per_image": [r["human_actions_per_image"] for r in rounds],
        "labelling_seconds": [r["labelling_seconds"] for r in rounds],
        "auto_accept_rate": [r["auto_accept_rate"] for r in rounds],
        "auto_accept_precision": result["auto_accept_precision"],
        "rejections": dict(sum((Counter(r["rejected"]) for r in rounds), Counter())),
        "passed": [bool(r["model"] and r["model"]["passed"]) for r in rounds],
        "devices": result["devices"],
        "wall_s": result["wall_s"],
        "report": str(report),
    }


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
    from visionloop.observe import snapshot

    settings = _attach(_settings(config))
    snap = asyncio.run(snapshot(settings, consumer_groups(settings)))
    if json_output:
        out.print(snap.to_json(), highlight=False, soft_wrap=True, markup=False)
        return
    services_table = Table(title=f"services (status topic, last 60 s) — broker {snap.bootstrap}")
    for column in ("service", "instance", "state", "seen", "uptime", "handled", "dead-lettered"):
        services_table.add_column(column)
    for inst in snap.instances:
        dead = sum(v for k, v in inst.counters.items() if k.startswith("dead_lettered"))
        services_table.add_row(
            inst.service, inst.instance, inst.kind, f"{inst.seen_s_ago:.0f} s ago", f"{inst.uptime_s:.0f} s",
            str(inst.counters.get("handled", 0)), str(dead),
        )
    out.print(services_table)
    lag_table = Table(title="consumer lag")
    for column in ("group", "topic", "committed", "end", "lag"):
        lag_table.add_column(column)
    for lag in snap.lags:
        lag_table.add_row(lag.group, lag.topic, str(lag.committed), str(lag.end), str(lag.lag))
    out.print(lag_table)
    events_table = Table(title="last events")
    for column in ("topic", "messages", "last event", "at", "producer", "project"):
        events_table.add_column(column)
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


@contracts_app.command("export")
def contracts_export() -> None:
    """Regenerate contracts/schemas/*.json and contracts/asyncapi.yaml from the code."""
    from visionloop import asyncapi
    from visionloop.contracts import jsonschemas as schemas

    problems = schemas.check()
    written = schemas.export()
    doc = asyncapi.export()
    out.print(f"wrote {len(written)} JSON Schemas to {schemas.SCHEMA_DIR} and {doc}")
    if problems:
        console.print("[yellow]these changes are not additive against the previous schemas:[/]")
        for problem in problems:
            console.print(f"  {problem}")


@contracts_app.command("check")
def contracts_check() -> None:
    """Fail when the models changed in a way that is not additive against the committed schemas."""
    from visionloop import asyncapi
    from visionloop.contracts import jsonschemas as schemas

    problems = schemas.check()
    stale = asyncapi.DOCUMENT.read_text(encoding="utf-8") != asyncapi.generate()
    for problem in problems:
        console.print(f"[red]breaking[/] {problem}")
    if stale:
        console.print("[yellow]contracts/asyncapi.yaml is stale: run `visionloop contracts export`[/]")
    if problems or stale:
        raise typer.Exit(1)
    out.print("contracts: compatible with the committed schemas; AsyncAPI document up to date")


@bench_app.command("bus")
def bench_bus(
    events: Annotated[int, typer.Option(help="Events per arm.")] = 2000,
    batch: Annotated[int, typer.Option(help="Records each hop takes at a time (1: one by one, the default shape).")] = 1,
    door: Annotated[bool, typer.Option(help="Reach the broker through the front door `up` uses to rotate it.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """Bus round trip on the embedded stack: the framework hop vs raw aiokafka, same broker, same run."""
    from visionloop.bench.bus import run_bus_bench

    result = run_bus_bench(events=events, console=console, batch=batch, door=door)
    if json_output:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)


@bench_app.command("intake")
def bench_intake(
    max_index: Annotated[int, typer.Option(help="Largest index size for query latency (100k, 1M, 10M).")] = 10_000_000,
    images: Annotated[int, typer.Option(help="Images in the end-to-end backlog.")] = 300,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """Hashing, near-duplicate search and precision/recall, and ingest+dedup end to end."""
    from visionloop.bench.intake import run_intake_bench

    sizes = [s for s in (100_000, 1_000_000, 10_000_000) if s <= max_index]
    result = run_intake_bench(sizes=sizes, e2e_images=images, console=console)
    if json_output:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)


@bench_app.command("gateway")
def bench_gateway(
    tasks: Annotated[int, typer.Option(help="Tasks in the queue the labellers drain.")] = 2000,
    labellers: Annotated[int, typer.Option(help="Concurrent simulated labellers (HTTP clients).")] = 50,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """Labelling gateway: next-task + submit round trips over real HTTP with concurrent labellers."""
    from visionloop.bench.gateway import run_gateway_bench

    result = run_gateway_bench(tasks=tasks, labellers=labellers, console=console)
    if json_output:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)


@bench_app.command("trainer")
def bench_trainer(
    train_images: Annotated[int, typer.Option(help="Verified training images (the N-th triggers the run).")] = 240,
    test_images: Annotated[int, typer.Option(help="Images of the frozen test set.")] = 60,
    epochs: Annotated[int, typer.Option(help="Epochs of the run (both arms).")] = 40,
    imgsz: Annotated[int, typer.Option(help="Training and inference size (both arms).")] = 160,
    quick: Annotated[bool, typer.Option("--quick", help="A small run (80 images, 5 epochs): checks the bench, not the target.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """Trainer + evaluator: overhead around raw Ultralytics train + val, evaluator speed, agreement with pycocotools."""
    from visionloop.bench.trainer import run_trainer_bench

    if quick:
        train_images, test_images, epochs = 80, 20, 5
    result = run_trainer_bench(train_images=train_images, test_images=test_images, epochs=epochs, imgsz=imgsz, console=console)
    if json_output:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)


@bench_app.command("release")
def bench_release(
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """Release path: passing model evaluated -> 20 edge agents activated (convert, package, register, propagate); edge FP32 vs INT8."""
    from visionloop.bench.release import run_release_bench

    result = run_release_bench(console=console)
    if json_output:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)


@bench_app.command("loop")
def bench_loop(
    quick: Annotated[bool, typer.Option("--quick", help="The CI-sized scenario, every arm, one seed unless --seeds.")] = False,
    rounds: Annotated[str | None, typer.Option(help="Images per round: bootstrap,review,new-class (default 100,400,120).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per arm (default 3; --quick: 1).", min=1)] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of the first model (default 30); another budget is another row.", min=1)] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="Epochs of each later model (default 8).", min=1)] = None,
    dataset: DatasetOpt = None,
    world: WorldOpt = "photo",
    miss_rate: Annotated[float, typer.Option(help="Annotator: share of objects not drawn.")] = 0.05,
    jitter_frac: Annotated[float, typer.Option(help="Annotator: sd of each drawn edge, as a share of the box's side.")] = 0.04,
    confusion_rate: Annotated[float, typer.Option(help="Annotator: share of drawn boxes given a wrong class.")] = 0.03,
    rubber_stamp_rate: Annotated[float, typer.Option(help="Reviewer: share of wrong pre-label sets accepted as they are.")] = 0.10,
    review_miss_rate: Annotated[float, typer.Option(help="Reviewer: share of objects missing from pre-labels not noticed.")] = 0.10,
    draw_box_s: Annotated[float, typer.Option(help="Seconds per box drawn by hand.")] = 35.0,
    review_image_s: Annotated[float, typer.Option(help="Seconds per image shown with boxes to check.")] = 4.0,
    review_box_s: Annotated[float, typer.Option(help="Seconds per box shown to a person.")] = 1.6,
    correct_box_s: Annotated[float, typer.Option(help="Seconds per box moved, relabelled or deleted.")] = 8.0,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """Human time for model quality: manual, assisted (review) and the loop (review + auto-accept), several seeds."""
    from visionloop.bench.loop import run_loop_bench
    from visionloop.demo.effort import Costs
    from visionloop.demo.people import PersonErrors

    shape = None
    if rounds is not None:
        parts = [p.strip() for p in rounds.split(",")]
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            console.print(f"[red]--rounds must be three positive counts, e.g. 100,400,120 (got {rounds!r})[/]")
            raise typer.Exit(2)
        shape = (int(parts[0]), int(parts[1]), int(parts[2]))
    try:
        errors = PersonErrors(miss_rate=miss_rate, jitter_frac=jitter_frac, confusion_rate=confusion_rate,
                              rubber_stamp_rate=rubber_stamp_rate, review_miss_rate=review_miss_rate)
        costs = Costs(draw_box_s=draw_box_s, review_image_s=review_image_s, review_box_s=review_box_s, correct_box_s=correct_box_s)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    _check_dataset(dataset)
    _logging("WARNING")
    budget = None if epochs is None and finetune_epochs is None else (epochs, finetune_epochs)
    result = run_loop_bench(quick=quick, rounds=shape, seeds=seeds if seeds is not None else (1 if quick else None), world=world,
                            dataset=str(dataset) if dataset else None, errors=errors, costs=costs, epochs=budget, console=console)
    if json_output:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)


@bench_app.command("chaos")
def bench_chaos(
    seed: Annotated[int, typer.Option(help="Seed of the scenario and of the kill schedule.")] = 11,
    ci: Annotated[bool, typer.Option("--ci", help="The test suite's reduced run: 150 images, intake and labelling, 5 kills, the broker restart.")] = False,
    replicas: Annotated[str | None, typer.Option(help="More processes of a service, e.g. dedup=2,recognizer=2 (each replica is killed too).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """The quick-demo scenario (1,020 images) while services are SIGKILLed and the broker restarts; reconciles; exit 1 on any discrepancy."""
    from dataclasses import replace

    from visionloop import services as registry
    from visionloop.bench.chaos import ChaosConfig, run_chaos_bench, summary
    from visionloop.supervisor import parse_replicas

    try:
        counts = parse_replicas(replicas, list(registry.available()))
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None

    _demo_logging()
    for expected in ("aiokafka", "asyncio"):  # connection errors while the broker restarts are the point
        logging.getLogger(expected).setLevel(logging.CRITICAL)
    cfg = replace(ChaosConfig.ci() if ci else ChaosConfig(), seed=seed, replicas=tuple(sorted(counts.items())))
    result = run_chaos_bench(cfg, console=console)
    if json_output:
        out.print(json.dumps(summary(result)), highlight=False, soft_wrap=True, markup=False)
    if not result["ok"]:
        raise typer.Exit(1)


@gateway_project_app.command("create")
def gateway_project_create(
    project: Annotated[str, typer.Argument(help="Project slug.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class names, in order (appended if the project exists).")] = "",
    config: ConfigOpt = None,
) -> None:
    """Create a project with its taxonomy, or append classes to it."""
    from visionloop.services.labeling_gateway.admin import create_project

    settings = _attach(_settings(config))
    names = [c.strip() for c in classes.split(",") if c.strip()]
    taxonomy = asyncio.run(create_project(settings, project, names))
    out.print(f"{project}: {', '.join(taxonomy) or '(no classes yet)'}")


@gateway_token_app.command("create")
def gateway_token_create(
    project: Annotated[str | None, typer.Option(help="The token's project (omit only for an all-projects admin token).")] = None,
    role: Annotated[str, typer.Option(help="annotator, reviewer or admin.")] = "annotator",
    user: Annotated[str, typer.Option(help="Who uses the token (recorded on every submission).")] = "",
    config: ConfigOpt = None,
) -> None:
    """Create an API token and print it once (only its hash is stored)."""
    from visionloop.services.labeling_gateway.admin import create_token
    from visionloop.services.labeling_gateway.store import Conflict

    settings = _attach(_settings(config))
    try:
        token_id, token = asyncio.run(create_token(settings, project=project, role=role, user_id=user or f"{role}-{uuid.uuid4().hex[:6]}"))
    except (Conflict, ValueError) as exc:
        console.print(f"[red]{getattr(exc, 'message', exc)}[/]")
        raise typer.Exit(2) from None
    console.print(f"token {token_id} ({role}, project {project or 'all'}); it is shown once — keep it:")
    out.print(token, highlight=False)


@gateway_token_app.command("revoke")
def gateway_token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (the part after `vl_`).")],
    config: ConfigOpt = None,
) -> None:
    """Revoke a token."""
    from visionloop.services.labeling_gateway.admin import revoke_token

    settings = _attach(_settings(config))
    if not asyncio.run(revoke_token(settings, token_id)):
        console.print(f"[red]no active token {token_id}[/]")
        raise typer.Exit(1)
    out.print(f"revoked {token_id}")


@ingest_token_app.command("create")
def ingest_token_create(
    name: Annotated[str, typer.Option(help="The upstream system the token is for (shown in listings).")],
    project: Annotated[list[str], typer.Option(help="A project it may submit to (repeat for more; * for every project).")],
    config: ConfigOpt = None,
) -> None:
    """Create a token for ingest's HTTP API and print it once (only its hash is stored)."""
    from visionloop.services.ingest.admin import create_token

    settings = _attach(_settings(config))
    token_id, token = asyncio.run(create_token(settings, name=name, projects=sorted(set(project))))
    console.print(f"ingest token {token_id} for {name} (projects: {', '.join(sorted(set(project)))}); it is shown once — keep it:")
    out.print(token, highlight=False)


@ingest_token_app.command("list")
def ingest_token_list(config: ConfigOpt = None) -> None:
    """Ingest's tokens: id, system, projects, created, revoked (never a secret)."""
    from visionloop.services.ingest.admin import list_tokens

    table = Table(title="ingest tokens")
    for column in ("id", "system", "projects", "created", "revoked"):
        table.add_column(column)
    for row in asyncio.run(list_tokens(_attach(_settings(config)))):
        table.add_row(row["token_id"], row["name"], ", ".join(row["projects"]), f"{row['created_at']:%Y-%m-%d %H:%M}",
                      f"{row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "-")
    out.print(table)


@ingest_token_app.command("revoke")
def ingest_token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (the part after `vl_`).")],
    config: ConfigOpt = None,
) -> None:
    """Revoke an ingest token (it stops working at once)."""
    from visionloop.services.ingest.admin import revoke_token

    if not asyncio.run(revoke_token(_attach(_settings(config)), token_id)):
        console.print(f"[red]no active ingest token {token_id}[/]")
        raise typer.Exit(1)
    out.print(f"revoked {token_id}")


@kafka_app.command("acls")
def kafka_acls(
    commands: Annotated[bool, typer.Option("--commands", help="Print `kafka-acls.sh` calls instead of a table.")] = False,
    bootstrap: Annotated[str, typer.Option(help="Broker address written into the commands.")] = "kafka:9092",
    config: ConfigOpt = None,
) -> None:
    """The principals of a deployment and exactly the ACLs each needs (each service writes what it
    produces and reads what it consumes; upstream writes the submit topic; devices their status)."""
    from visionloop.acls import all_acls

    rules = all_acls(_settings(config))
    if commands:
        for rule in rules:
            out.print(rule.command(bootstrap), highlight=False, soft_wrap=True, markup=False)
        return
    table = Table(title=f"{len({r.principal for r in rules})} principals, {len(rules)} ACLs (ALLOW; nothing else is allowed)")
    for column in ("principal", "operation", "resource", "name", "pattern"):
        table.add_column(column)
    for rule in rules:
        table.add_row(rule.principal, rule.operation, rule.resource, rule.name, rule.pattern)
    out.print(table)


@verifier_app.command("calibration")
def verifier_calibration(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Auto-accept calibration per project, class and model version: threshold, evidence, precision and its lower bound."""
    from visionloop.services.verifier.service import calibration_report

    settings = _attach(_settings(config))
    rows = _read_report(settings, "verifier", "calibration", lambda pool, schema: calibration_report(pool, schema, project))
    if json_output:
        out.print(json.dumps({"project": project, "classes": rows}), highlight=False, soft_wrap=True, markup=False)
        return

    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = Table(title=f"auto-accept calibration{f' — {project}' if project else ''}")
    columns = ("project", "model", "version", "class", "threshold", "right/verified", "right/support", "precision", "lower bound",
               "target", "confidence", "status")
    for column in columns:
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["project"], r["model_id"], "?" if r["model_version"] == 0 and r["model_id"] != "-" else str(r["model_version"]),
            r["class_name"], figure(r["threshold"]), f"{r['correct']}/{r['samples']}", f"{r['support_correct']}/{r['support']}",
            figure(r["precision"]), figure(r["lower_bound"]), f"{r['target']:.2f}",
            "-" if r["confidence"] is None else f"{r['confidence']:.2f}", r["status"],
        )
    out.print(table)
    if not rows:
        console.print("no calibration yet: it grows as people verify pre-labels (review tasks, spot checks) of each model version")
    else:
        console.print("a threshold stands where the one-sided Clopper-Pearson lower bound of box precision at it reaches the target; "
                      "precision and bound are at the threshold, or at the best cut without one; a new model version starts uncalibrated")


# -- the trainer ------------------------------------------------------------------------------------


def _hyperparameter(pair: str) -> tuple[str, Any]:
    if "=" not in pair:
        raise typer.BadParameter(f"{pair!r}: use NAME=VALUE, e.g. epochs=20")
    name, raw = pair.split("=", 1)
    value: Any = raw
    for parse in (int, float):
        try:
            value = parse(raw)
            break
        except ValueError:
            continue
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    return name.strip(), value


@trainer_app.command("request")
def trainer_request(
    project: Annotated[str, typer.Argument(help="The project to train.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Ultralytics argument for this run only, NAME=VALUE (repeatable).")] = None,
    requested_by: Annotated[str, typer.Option(help="Who asks (recorded with the run).")] = "cli",
    config: ConfigOpt = None,
) -> None:
    """Ask the trainer to train PROJECT's next model now (`training requested`; coalesced with a queued run)."""
    from visionloop.contracts import TrainingRequested
    from visionloop.libs.kafka import publish_once
    from visionloop.services.trainer.config import TUNABLE

    overrides = dict(_hyperparameter(p) for p in set_ or [])
    unknown = sorted(set(overrides) - TUNABLE)
    if unknown:
        console.print(f"[red]refused (unknown_hyperparameter)[/]: {', '.join(unknown)}; allowed: {', '.join(sorted(TUNABLE))}")
        raise typer.Exit(2)
    settings = _attach(_settings(config))
    envelope = asyncio.run(publish_once(
        settings, TrainingRequested(requested_by=requested_by, hyperparameters=overrides), project=project, producer="cli", key=project,
    ))
    out.print(f"training requested for {project} (event {envelope.event_id}); follow it with `visionloop trainer runs --project {project}`")


@trainer_app.command("runs")
def trainer_runs(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    limit: Annotated[int, typer.Option(help="Newest runs shown.")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON array instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Training runs, newest first: status, reason of a failure, epoch, dataset version, model."""
    from visionloop.services.trainer.service import runs_report

    settings = _attach(_settings(config))
    rows = _read_report(settings, "trainer", "runs", lambda pool, schema: runs_report(pool, schema, project, limit))
    if json_output:
        out.print(json.dumps(rows), highlight=False, soft_wrap=True, markup=False)
        return
    table = Table(title=f"training runs{f' — {project}' if project else ''}")
    for column in ("run", "project", "status", "reason", "epoch", "dataset", "model", "started", "finished"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["run_id"], r["project"], r["status"], r["reason"] or "-", str(r["epoch"] or "-"),
            (r["dataset_version"] or "-")[:15], f"{r['model_id']} v{r['version']}" if r["model_id"] else "-",
            (r["started_at"] or "-")[:19], (r["finished_at"] or "-")[:19],
        )
    out.print(table)
    if not rows:
        console.print("no runs yet: they start when enough labels are verified, or with `visionloop trainer request PROJECT`")


# -- releases and keys ------------------------------------------------------------------------------


@app.command()
def releases(
    fleet: Annotated[str | None, typer.Option(help="Only this fleet.")] = None,
    limit: Annotated[int, typer.Option(help="Newest releases shown.")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON array instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Releases per fleet: model, stage, status, and how many devices downloaded, activated or failed."""
    from visionloop.services.distributor.service import releases_report

    settings = _attach(_settings(config))
    rows = _read_report(settings, "distributor", "releases", lambda pool, schema: releases_report(pool, schema, fleet, limit))
    if json_output:
        out.print(json.dumps(rows), highlight=False, soft_wrap=True, markup=False)
        return
    table = Table(title=f"releases{f' — fleet {fleet}' if fleet else ''}")
    for column in ("release", "fleet", "target", "model", "stage", "status", "devices", "reason", "updated"):
        table.add_column(column)
    for r in rows:
        stages = r["stages"]
        stage = f"{r['stage_index'] + 1}/{len(stages)} ({stages[r['stage_index']]:.0f}%)"
        devices = ", ".join(f"{k} {v}" for k, v in sorted(r["devices"].items())) or "-"
        table.add_row(r["release_id"], r["fleet"], r["target"], f"{r['model_id']} v{r['version']}", stage, r["status"], devices,
                      r["reason"] or "-", r["updated_at"][:19])
    out.print(table)
    if not rows:
        console.print("no releases yet: a model that passes the gate is converted, packaged and released by the loop")


@app.command()
def report(
    project: Annotated[str, typer.Argument(help="The project.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for report.md and the plots (default ./visionloop-report-PROJECT/).")] = None,
    config: ConfigOpt = None,
) -> None:
    """The labelling economy of PROJECT per model version (test mAP50-95, human seconds, auto-accept rate and precision) and its queue depth, as Markdown with PNG plots."""
    from visionloop.report import run_report

    raise typer.Exit(run_report(_attach(_settings(config)), project, out_dir))


def _release_command(kind: str, release_id: str | None, fleet: str | None, reason: str | None, config: Path | None) -> None:
    from visionloop.contracts import SYSTEM_PROJECT, ReleaseCommand, ReleaseCommandKind
    from visionloop.libs.kafka import publish_once

    if not release_id and not fleet:
        console.print("[red]refused (no_release)[/]: name a release id or --fleet (its latest release)")
        raise typer.Exit(2)
    settings = _attach(_settings(config))
    command = ReleaseCommand(command=ReleaseCommandKind(kind), release_id=release_id, fleet=fleet, issued_by="cli", reason=reason)
    envelope = asyncio.run(publish_once(settings, command, project=SYSTEM_PROJECT, producer="cli", key=fleet or release_id))
    out.print(f"{kind} sent for {release_id or 'the latest release of ' + str(fleet)} (event {envelope.event_id}); see `visionloop releases`")


def _command(kind: str, doc: str) -> None:
    def command(
        release_id: Annotated[str | None, typer.Argument(help="The release (default: the fleet's latest).")] = None,
        fleet: Annotated[str | None, typer.Option(help="The fleet whose latest release is meant.")] = None,
        reason: Annotated[str | None, typer.Option(help="Why (recorded with the release).")] = None,
        config: ConfigOpt = None,
    ) -> None:
        _release_command(kind, release_id, fleet, reason, config)

    command.__doc__ = doc
    release_app.command(kind)(command)


_command("promote", "Start the release's next stage now (or complete it).")
_command("pause", "Stop the release's rollout where it is.")
_command("resume", "Let a paused release roll on.")
_command("rollback", "Roll the release back: devices return to their last-known-good model; the library's previous model is production again.")


@keys_app.command("create")
def keys_create(
    folder: Annotated[Path | None, typer.Option(help="Where to write the pair (default: <state_dir>/keys).")] = None,
    name: Annotated[str, typer.Option(help="File name stem: <name>.key (private, mode 600) and <name>.pub.")] = "packager-ed25519",
    config: ConfigOpt = None,
) -> None:
    """Create an Ed25519 key pair: the private key signs packages (packager), the public one verifies them (distributor, devices)."""
    from visionloop.libs.signing import key_id, load_public, write_key_pair

    settings = _settings(config)
    folder = folder or settings.state_dir / "keys"
    try:
        private, public = write_key_pair(folder, name=name)
    except FileExistsError:
        console.print(f"[red]refused (key_exists)[/]: {folder / (name + '.key')} exists; choose another --name or folder")
        raise typer.Exit(1) from None
    out.print(f"private key {private} (mode 600: for the packager only)\npublic key  {public} (key id {key_id(load_public(public))})")


# -- the model library ------------------------------------------------------------------------------


def _domain_tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            console.print(f"[red]--domain {pair!r}[/]: write tags as KEY=VALUE, e.g. --domain site=plant-3")
            raise typer.Exit(2)
        tags[key.strip()] = value.strip()
    return tags


@library_app.command("add")
def library_add(
    path: Annotated[Path, typer.Argument(help="The ONNX detector (Ultralytics export, task=detect).", exists=True, dir_okay=False)],
    project: Annotated[str, typer.Option(help="Project the model serves.")],
    classes: Annotated[str | None, typer.Option(help="Class names in head order, comma-separated (default: the file's metadata).")] = None,
    imgsz: Annotated[int | None, typer.Option(help="Square input size (default: the file's metadata).")] = None,
    domain: Annotated[list[str] | None, typer.Option(help="Domain tag the model serves, KEY=VALUE; repeatable. None: the whole project.")] = None,
    alias: Annotated[str | None, typer.Option(help="Give it an alias now: production or candidate.")] = None,
    target: Annotated[str, typer.Option(help="Where it runs: server or edge.")] = "server",
    model_id: Annotated[str | None, typer.Option(help="Model line (default: <project>-detector).")] = None,
    version: Annotated[int | None, typer.Option(help="Version within the line (default: the next).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8.")] = "fp32",
    dataset_version: Annotated[str, typer.Option(help="Dataset version it was trained on.")] = "manual",
    parent: Annotated[str | None, typer.Option(help="The model it was fine-tuned from, MODEL_ID:VERSION.")] = None,
    metrics: Annotated[Path | None, typer.Option(help="JSON file of its test-set metrics (map50_95, map50, ...).", exists=True, dir_okay=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """Register an ONNX detector in the model library (stored in the blob store; emits `model registered`)."""
    from visionloop.contracts import Alias, Metrics, ModelRef, Precision, Target
    from visionloop.libs.library import LibraryError, LibraryWriter

    settings = _attach(_settings(config))
    try:
        chosen_alias = Alias(alias) if alias else None
        chosen_target, chosen_precision = Target(target), Precision(precision)
        parent_ref = None
        if parent:
            parent_id, _, parent_version = parent.rpartition(":")
            parent_ref = ModelRef(model_id=parent_id, version=int(parent_version))
        measured = Metrics.model_validate_json(metrics.read_text()) if metrics else None
    except ValueError as exc:
        console.print(f"[red]invalid option[/]: {exc}")
        raise typer.Exit(2) from None

    async def main() -> Any:
        async with LibraryWriter(settings) as library:
            return await library.add(
                path.read_bytes(), project=project, model_id=model_id,
                class_names=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
                input_size=imgsz, domain=_domain_tags(domain or []), alias=chosen_alias,
                target=chosen_target, precision=chosen_precision, version=version,
                dataset_version=dataset_version, parent=parent_ref, metrics=measured,
            )

    try:
        entry = asyncio.run(main())
    except LibraryError as exc:
        console.print(f"[red]refused ({exc.reason})[/]: {exc}")
        raise typer.Exit(1) from None
    aliases = ", ".join(sorted(entry.aliases)) or "no alias"
    out.print(
        f"registered {entry.model_id} v{entry.version} ({entry.target.value}, {aliases}) for project "
        f"{entry.project}: {len(entry.class_names)} classes, {entry.input_size}px, sha256 {entry.artifact_sha256[:16]}…"
    )


@library_app.command("promote")
def library_promote(
    model_id: Annotated[str, typer.Argument(help="The model line.")],
    version: Annotated[int, typer.Argument(help="The version to point the alias at.")],
    alias: Annotated[str, typer.Option(help="production (the old one becomes previous) or candidate.")] = "production",
    target: Annotated[str, typer.Option(help="server or edge.")] = "server",
    config: ConfigOpt = None,
) -> None:
    """Point an alias at a registered version (emits `model registered`; recognizers reload)."""
    from visionloop.contracts import Alias, Target
    from visionloop.libs.library import LibraryError, LibraryWriter

    settings = _attach(_settings(config))

    async def main() -> Any:
        async with LibraryWriter(settings) as library:
            return await library.promote(model_id, version, Alias(alias), target=Target(target))

    try:
        entry = asyncio.run(main())
    except (LibraryError, ValueError) as exc:
        console.print(f"[red]refused ({getattr(exc, 'reason', 'invalid')})[/]: {exc}")
        raise typer.Exit(1) from None
    out.print(f"{entry.model_id} v{entry.version} ({entry.target.value}) is now {alias}")


@library_app.command("list")
def library_list(
    project: Annotated[str | None, typer.Option(help="Only this project's models.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON array instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Every model version in the library, with its aliases."""
    from visionloop.libs.db import create_pool
    from visionloop.libs.library import SERVICE, ModelLibrary

    settings = _attach(_settings(config))

    async def main() -> Any:
        pool = await create_pool(settings, min_size=1, max_size=1)
        try:
            return await ModelLibrary(pool, settings.schema_for(SERVICE)).entries(project)
        finally:
            await pool.close()

    entries = asyncio.run(main())
    if json_output:
        rows = [
            {
                "model_id": e.model_id, "version": e.version, "target": e.target.value, "project": e.project,
                "domain": e.domain, "class_names": e.class_names, "input_size": e.input_size,
                "precision": e.precision.value, "aliases": sorted(e.aliases), "artifact_uri": e.artifact_uri,
                "artifact_sha256": e.artifact_sha256, "dataset_version": e.dataset_version,
                "parent": e.parent.model_dump() if e.parent else None,
                "metrics": e.metrics.model_dump() if e.metrics else None,
                "registered_at": e.registered_at.isoformat(),
            }
            for e in entries
        ]
        out.print(json.dumps(rows), highlight=False, soft_wrap=True, markup=False)
        return
    table = Table(title=f"model library{f' — project {project}' if project else ''}")
    for column in ("project", "model", "version", "target", "domain", "aliases", "classes", "input", "precision", "mAP50-95", "sha256", "registered"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            e.project, e.model_id, str(e.version), e.target.value,
            ", ".join(f"{k}={v}" for k, v in e.domain.items()) or "(all)",
            ", ".join(sorted(e.aliases)) or "-", ", ".join(e.class_names), str(e.input_size), e.precision.value,
            f"{e.metrics.map50_95:.3f}" if e.metrics else "-", e.artifact_sha256[:12],
            e.registered_at.strftime("%Y-%m-%d %H:%M"),
        )
    out.print(table)
    if not entries:
        console.print("the library is empty: `visionloop library add MODEL.onnx --project P --alias production`")


@bench_app.command("soak")
def bench_soak(
    minutes: Annotated[float, typer.Option(help="How long images are submitted.")] = 10.0,
    rate: Annotated[float | None, typer.Option(help="Images submitted per second (default: one the reference machine holds).")] = None,
    services: Annotated[str | None, typer.Option(help="Comma-separated services to run (default: all ten).")] = None,
    sample: Annotated[float, typer.Option(help="Seconds between samples of memory, lag and database size.")] = 5.0,
    warmup: Annotated[float | None, typer.Option(help="Seconds left out of the growth fit (default: a fifth of the run, at most 120).")] = None,
    drain: Annotated[float, typer.Option(help="Most seconds to wait after the last submission for every decision.")] = 180.0,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """Sustained submissions through every service (each its own process): memory growth per hour, consumer lag, database growth."""
    from visionloop.bench.soak import RATE_PER_S, run_soak_bench

    _logging("WARNING")
    names = [n.strip() for n in services.split(",")] if services else None
    result = run_soak_bench(minutes=minutes, rate=rate or RATE_PER_S, services=names, sample_s=sample, warmup_s=warmup,
                            drain_s=drain, console=console)
    if json_output:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)


@bench_app.command("recognizer")
def bench_recognizer(
    images: Annotated[int, typer.Option(help="Images in the throughput backlog.")] = 400,
    imgsz: Annotated[int, typer.Option(help="Model input size (640 is the usual production size).")] = 640,
    batch: Annotated[int, typer.Option(help="The recognizer's batch_max (N).")] = 8,
    infer_batch: Annotated[int, typer.Option(help="Images per session.run in both arms (the recognizer's inference_batch; 1 is fastest on CPU).")] = 1,
    wait_ms: Annotated[int, typer.Option(help="The recognizer's batch_wait_ms (T).")] = 0,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads in both arms (0 = one per core).")] = 0,
    parallelism: Annotated[str, typer.Option(help="The recognizer's cpu_parallelism: images or operators.")] = "images",
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """Recognizer throughput through the real broker with micro-batching vs raw ONNX Runtime, same run."""
    from visionloop.bench.recognizer import run_recognizer_bench

    result = run_recognizer_bench(images=images, imgsz=imgsz, batch=batch, infer_batch=infer_batch, wait_ms=wait_ms,
                                  threads=threads, parallelism=parallelism, console=console)
    if json_output:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)


@bench_app.command("scale")
def bench_scale(
    intake_images: Annotated[int, typer.Option(help="Images in each intake arm's backlog (ingest + dedup).", min=1)] = 1000,
    recognizer_images: Annotated[int, typer.Option(help="Images in each recognizer arm's backlog.", min=1)] = 400,
    imgsz: Annotated[int, typer.Option(help="The recognizer model's input size (a multiple of 32).")] = 640,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads per arm, split between the replicas (0 = one per core).", min=0)] = 0,
    model: Annotated[Path | None, typer.Option(help="An ONNX detector for the recognizer arms (default: the bench's synthetic-scene detector).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")] = False,
) -> None:
    """Scale-out: intake and recognizer throughput with 1 and 2 processes per service, arms 1,2,2,1 in one run."""
    from visionloop.bench.scale import check_options, run_scale_bench

    try:
        check_options(intake_images=intake_images, recognizer_images=recognizer_images, imgsz=imgsz, model=model)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    _logging("WARNING")
    result = run_scale_bench(intake_images=intake_images, recognizer_images=recognizer_images, imgsz=imgsz,
                             threads=threads, model=model, console=console)
    if json_output:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)


def main() -> None:
    """Entry point of the `visionloop` script."""
    app()


if __name__ == "__main__":
    main()
