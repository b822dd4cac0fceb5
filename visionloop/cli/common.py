"""What every command module of the CLI shares: the apps, the consoles, settings and helpers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

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
evaluator_app = typer.Typer(help="The evaluator: gate settings per project at run time, judge a model again.", no_args_is_help=True)
app.add_typer(evaluator_app, name="evaluator")
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
JsonOpt = Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")]
WriteDocsOpt = Annotated[bool, typer.Option("--write-docs", help="Write the plot to docs/benchmarks/ (default: .visionloop/bench/).")]

DatasetOpt = Annotated[Path | None, typer.Option(
    "--dataset", help="Your own labelled images instead of the built-in world: a COCO JSON with its images, or a YOLO folder "
    "(images/, labels/, data.yaml). Checked before anything starts.")]


WorldOpt = Annotated[str, typer.Option("--world", help="The built-in world: photo (real photographs, the default) or shapes.")]


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


def unknown_name_hint(name: str, allowed: Sequence[str]) -> str:
    """What to say of a name that is not among `allowed`: its close matches (as Ultralytics says
    of an unknown argument), or every allowed name when none is close."""
    import difflib

    close = difflib.get_close_matches(name, sorted(allowed), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(sorted(allowed))}"


def report_table(title: str, *columns: str, **options: Any) -> Table:
    """A report table whose cells wrap rather than being cut (ids stay whole at any terminal width)."""
    found = Table(title=title, **options)
    for column in columns:
        found.add_column(column, overflow="fold")
    return found


def show_rows(
    rows: Sequence[Any],
    *,
    json_output: bool,
    title: str,
    columns: Sequence[str],
    cells: Callable[[Any], Sequence[str]],
    empty: str,
    as_json: Callable[[Any], Any] | None = None,
) -> None:
    """What a listing command prints: one JSON array with `--json` (each row through `as_json`),
    else a report table of `cells(row)` per row, and `empty` (on stderr) when there is none."""
    if json_output:
        out.print(json.dumps([as_json(r) for r in rows] if as_json else list(rows)), highlight=False, soft_wrap=True, markup=False)
        return
    table = report_table(title, *columns)
    for row in rows:
        table.add_row(*cells(row))
    out.print(table)
    if not rows:
        console.print(empty)
