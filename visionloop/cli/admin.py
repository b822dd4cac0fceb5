"""Administration: contracts, gateway projects and tokens, ingest tokens, Kafka ACLs, the verifier."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Annotated

import typer
from rich.table import Table

from visionloop.cli.common import (
    ConfigOpt,
    _attach,
    _read_report,
    _settings,
    console,
    contracts_app,
    gateway_project_app,
    gateway_token_app,
    ingest_token_app,
    kafka_app,
    out,
    report_table,
    verifier_app,
)


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


@gateway_project_app.command("create")
def gateway_project_create(
    project: Annotated[str, typer.Argument(help="Project slug.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class names, in order (appended if the project exists).")] = "",
    floor: Annotated[float | None, typer.Option(help="The project's gate floor (mAP50-95), e.g. 0.05 for a first model from scratch.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Create a project with its taxonomy, or append classes to it; say (or set) the floor its models must reach."""
    from visionloop.cli.data import say_or_set_floor
    from visionloop.services.labeling_gateway.admin import create_project

    settings = _attach(_settings(config))
    names = [c.strip() for c in classes.split(",") if c.strip()]
    taxonomy = asyncio.run(create_project(settings, project, names))
    out.print(f"{project}: {', '.join(taxonomy) or '(no classes yet)'}")
    say_or_set_floor(settings, project, floor)


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

    table = report_table("ingest tokens", "id", "system", "projects", "created", "revoked")
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
    script: Annotated[bool, typer.Option("--script", help="Print the setup script of compose's secured profile (topics, "
                                         "users, ACLs): docker/kafka/secured-setup.sh.")] = False,
    user_names: Annotated[bool, typer.Option("--users", help="Print the SCRAM user names, one per line.")] = False,
    bootstrap: Annotated[str, typer.Option(help="Broker address written into the commands.")] = "kafka:9092",
    config: ConfigOpt = None,
) -> None:
    """The principals of a deployment and exactly the ACLs each needs (each service writes what it
    produces and reads what it consumes; upstream writes the submit topic; devices their status)."""
    from visionloop.acls import all_acls, setup_script, users

    settings = _settings(config)
    rules = all_acls(settings)
    lines = (setup_script(settings).splitlines() if script else users(rules) if user_names
             else [rule.command(bootstrap) for rule in rules] if commands else None)
    if lines is not None:
        for line in lines:
            out.print(line, highlight=False, soft_wrap=True, markup=False)
        return
    table = report_table(
        f"{len({r.principal for r in rules})} principals, {len(rules)} ACLs (ALLOW; nothing else is allowed)",
        "principal", "operation", "resource", "name", "pattern",
    )
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
    from visionloop.services.verifier.store import calibration_report

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
