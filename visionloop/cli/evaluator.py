"""`visionloop evaluator`: a project's gate settings changed at run time (stored in PostgreSQL,
in force from the next evaluation, no restart), and a model judged again under them."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

import typer

from visionloop.cli.common import (
    ConfigOpt,
    _attach,
    _settings,
    console,
    evaluator_app,
    out,
    show_rows,
)

_MODEL = re.compile(r"^(?P<id>[A-Za-z0-9][A-Za-z0-9._-]*?)(?:(?:@v|:)(?P<version>\d+))?$")


def _pairs(pairs: list[str]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            console.print(f"[red]refused (not_a_setting)[/]: {pair!r} is not NAME=VALUE", highlight=False)
            raise typer.Exit(2)
        found[name.strip()] = value.strip()
    return found


async def _with_schema(settings: Any, work: Any) -> Any:
    from visionloop.libs.db import service_schema
    from visionloop.services.evaluator.service import SPEC

    async with service_schema(settings, "evaluator", SPEC.migrations) as (pool, schema):
        return await work(pool, schema)


@evaluator_app.command("set")
def evaluator_set(
    project: Annotated[str, typer.Argument(help="The project.")],
    pairs: Annotated[list[str] | None, typer.Argument(help="NAME=VALUE, e.g. map50_95_floor=0.05.")] = None,
    unset: Annotated[list[str] | None, typer.Option("--unset", help="Go back to the configured value of NAME (repeatable).")] = None,
    by: Annotated[str, typer.Option(help="Who changes it (recorded).")] = "cli",
    config: ConfigOpt = None,
) -> None:
    """Change PROJECT's gate settings now: stored in PostgreSQL, in force from the next evaluation."""
    from visionloop.services.evaluator import decide, store
    from visionloop.services.evaluator.config import EvaluatorSettings

    settings = _attach(_settings(config))
    base = EvaluatorSettings().policy(project)
    wanted = _pairs(pairs or [])

    async def change(pool: Any, schema: str) -> dict[str, Any]:
        async with pool.acquire() as conn, conn.transaction():
            stored = await store.gate_overrides(conn, schema, project)
            merged = decide.changed_overrides(base, stored, wanted, unset or [])
            await store.set_gate_overrides(conn, schema, project, merged, by)
            return merged

    try:
        merged = asyncio.run(_with_schema(settings, change))
    except decide.SettingRefused as exc:
        console.print(f"[red]refused ({exc.reason})[/]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _show_policy(project, decide.with_overrides(base, merged), merged)
    out.print("in force from the next evaluation; judge a model again with `visionloop evaluator rejudge MODEL`")


@evaluator_app.command("show")
def evaluator_show(
    project: Annotated[str, typer.Argument(help="The project.")],
    config: ConfigOpt = None,
) -> None:
    """PROJECT's gate settings in force: configured, and changed at run time (marked)."""
    from visionloop.services.evaluator import decide, store
    from visionloop.services.evaluator.config import EvaluatorSettings

    settings = _attach(_settings(config))
    stored = asyncio.run(_with_schema(settings, lambda pool, schema: store.gate_overrides(pool, schema, project)))
    _show_policy(project, decide.with_overrides(EvaluatorSettings().policy(project), stored), stored)


def _show_policy(project: str, policy: Any, changed: dict[str, Any]) -> None:
    from visionloop.services.evaluator.decide import SETTABLE

    show_rows(
        [(name, getattr(policy, name)) for name in SETTABLE], json_output=False, title=f"gate settings — {project}",
        columns=("setting", "value", "from"), cells=lambda r: (r[0], str(r[1]), "set at run time" if r[0] in changed else "configured"),
        empty="",
    )


@evaluator_app.command("rejudge")
def evaluator_rejudge(
    model: Annotated[str, typer.Argument(help="MODEL_ID@vN (or MODEL_ID:N; MODEL_ID alone: its newest gated version).")],
    by: Annotated[str, typer.Option(help="Who asks (logged by the evaluator).")] = "cli",
    config: ConfigOpt = None,
) -> None:
    """Judge a gated model again under its project's gate settings now: no retraining; a pass is
    converted, packaged and released as any other."""
    from visionloop.contracts import ModelRef, ModelRejudgeRequested
    from visionloop.libs.kafka import publish_once

    match = _MODEL.match(model)
    if match is None:
        console.print(f"[red]refused (not_a_model)[/]: {model!r} is not MODEL_ID@vN", highlight=False)
        raise typer.Exit(2)
    settings = _attach(_settings(config))

    from visionloop.services.evaluator.store import gated_model

    version = int(match["version"]) if match["version"] else None
    row = asyncio.run(_with_schema(settings, lambda pool, schema: gated_model(pool, schema, match["id"], version)))
    if row is None:
        console.print(f"[red]refused (unknown_model)[/]: the evaluator never gated {model!r}; "
                      "see `visionloop evaluator models`", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    ref = ModelRef(model_id=match["id"], version=row["version"])
    envelope = asyncio.run(publish_once(settings, ModelRejudgeRequested(model=ref, requested_by=by), project=row["project"],
                                        producer="cli", key=ref.model_id))
    out.print(f"{ref.model_id} v{ref.version} ({row['project']}, last verdict: {'passed' if row['passed'] else 'failed'}) "
              f"will be judged again (event {envelope.event_id}); follow it with `visionloop trainer runs --project {row['project']}`")


@evaluator_app.command("models")
def evaluator_models(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    limit: Annotated[int, typer.Option(help="Newest models shown.")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON array instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Gated models, newest verdict first: test-set mAP50-95, passed or the reasons it failed."""
    from visionloop.cli.common import _read_report
    from visionloop.services.evaluator.store import models_report

    settings = _attach(_settings(config))
    rows = _read_report(settings, "evaluator", "models", lambda pool, schema: models_report(pool, schema, project, limit))
    show_rows(
        rows, json_output=json_output, title=f"gated models{f' — {project}' if project else ''}",
        columns=("project", "model", "test mAP50-95", "verdict", "judged", "production"),
        cells=lambda r: (
            r["project"], f"{r['model_id']} v{r['version']}", f"{r['map50_95']:.3f}" if r["map50_95"] is not None else "-",
            "passed" if r["passed"] else "FAILED: " + ("; ".join(f["reason"] for f in r["failures"]) or "no reason kept"),
            r["evaluated_at"][:19], (r["production_at"] or "-")[:19],
        ),
        empty="no model gated yet",
    )
