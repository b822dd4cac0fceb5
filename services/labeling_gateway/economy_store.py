"""The economy's queries (tables of `0003_economy.sql`, plus tasks and submissions): what
economy.py assembles. Kept apart from store.py, which holds the queue's own queries.

Functions take an open connection (or pool) and the quoted schema name, like store.py's.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

from visionloop.contracts import ModelEvaluated, ModelRef, Provenance
from visionloop.services.labeling_gateway.economy import (
    EconomyRows,
    Evaluation,
    HumanAnswer,
    QueueSpan,
    ServiceStart,
    SpotCheck,
    VerifiedLabel,
    Version,
)

TERMINAL_STATES = ("done", "rejected", "superseded")


async def record_evaluation(conn: asyncpg.Connection, s: str, project: str, event: ModelEvaluated, at: datetime) -> None:
    """Keep a version's newest evaluation (an older one, redelivered, changes nothing)."""
    model = event.lineage.model
    await conn.execute(
        f"""INSERT INTO {s}.econ_evaluations AS e (project, model_id, version, map50_95, map50, passed, test_set_version,
                                                  test_images, occurred_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (project, model_id, version) DO UPDATE SET map50_95 = excluded.map50_95, map50 = excluded.map50,
                passed = excluded.passed, test_set_version = excluded.test_set_version, test_images = excluded.test_images,
                occurred_at = excluded.occurred_at
            WHERE e.occurred_at <= excluded.occurred_at""",
        project, model.model_id, model.version, event.candidate.map50_95, event.candidate.map50, event.passed,
        event.test_set_version, event.candidate.images, at,
    )


async def record_verified(
    conn: asyncpg.Connection, s: str, project: str, *, label_id: str, image_id: str, provenance: Provenance, for_test_set: bool, at: datetime
) -> None:
    """Keep how a label set was verified and which model pre-labelled it."""
    model = provenance.prelabel_model
    await conn.execute(
        f"""INSERT INTO {s}.econ_verified (label_id, project, image_id, method, prelabel_model_id, prelabel_version, spot_check,
                                          for_test_set, occurred_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (label_id) DO NOTHING""",
        label_id, project, image_id, provenance.method.value, model.model_id if model else None, model.version if model else None,
        provenance.spot_check, for_test_set, at,
    )


def _model(raw: Any) -> Version | None:
    """A task's `prelabel_model` jsonb as (model_id, version)."""
    if raw is None:
        return None
    ref = ModelRef.model_validate_json(raw) if isinstance(raw, str | bytes) else ModelRef.model_validate(raw)
    return ref.model_id, ref.version


def _actions(raw: Any) -> dict[str, int]:
    data = json.loads(raw) if isinstance(raw, str | bytes) else dict(raw or {})
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int | float)}


# A task's model: its own pre-labels' model, else its parent's (a re-annotate task after a
# reviewer rejected the pre-labels starts empty).
_TASK_MODEL = "coalesce(t.prelabel_model, (SELECT p.prelabel_model FROM {s}.tasks p WHERE p.task_id = t.parent_task))"


async def economy_rows(conn: asyncpg.Connection | asyncpg.Pool, s: str, project: str) -> EconomyRows:
    """Every row `economy.assemble` needs for one project."""
    model = _TASK_MODEL.format(s=s)
    evaluations = await conn.fetch(f"SELECT * FROM {s}.econ_evaluations WHERE project = $1", project)
    service = await conn.fetch(f"SELECT model_id, version, first_seen FROM {s}.model_versions WHERE project = $1", project)
    answers = await conn.fetch(
        f"""SELECT t.kind, s.duration_s, s.submitted_at, {model} AS model
            FROM {s}.submissions s JOIN {s}.tasks t ON t.task_id = s.task_id
            WHERE s.project = $1 AND s.source = 'gateway' AND s.duration_s IS NOT NULL""",
        project,
    )
    verified = await conn.fetch(
        f"""SELECT method, prelabel_model_id, prelabel_version, for_test_set, occurred_at
            FROM {s}.econ_verified WHERE project = $1""",
        project,
    )
    spot = await conn.fetch(
        f"""SELECT s.actions, jsonb_array_length(t.start_boxes) AS prelabels, s.submitted_at, {model} AS model
            FROM {s}.submissions s JOIN {s}.tasks t ON t.task_id = s.task_id
            WHERE s.project = $1 AND s.source = 'gateway' AND t.spot_check""",
        project,
    )
    queue = await conn.fetch(
        f"""SELECT t.kind, coalesce(p.outcome_at, t.created_at) AS entered,
                   coalesce(a.first_answer, CASE WHEN t.state = ANY($2::text[]) THEN t.updated_at END) AS left_at
            FROM {s}.tasks t
            LEFT JOIN {s}.submissions p ON p.submission_id = 'pre-' || t.task_id
            LEFT JOIN (SELECT task_id, min(submitted_at) AS first_answer FROM {s}.submissions
                       WHERE project = $1 AND source <> 'prelabel' GROUP BY task_id) a ON a.task_id = t.task_id
            WHERE t.project = $1 AND (p.submission_id IS NULL OR p.outcome = 'rejected')""",
        project, list(TERMINAL_STATES),
    )
    return EconomyRows(
        evaluations=[
            Evaluation(model=(r["model_id"], r["version"]), map50_95=r["map50_95"], map50=r["map50"], passed=r["passed"],
                       test_set_version=r["test_set_version"], test_images=r["test_images"], at=r["occurred_at"])
            for r in evaluations
        ],
        service=[ServiceStart(model=(r["model_id"], r["version"]), first_seen=r["first_seen"]) for r in service],
        answers=[HumanAnswer(kind=r["kind"], seconds=r["duration_s"], answered_at=r["submitted_at"], model=_model(r["model"])) for r in answers],
        verified=[
            VerifiedLabel(method=r["method"], at=r["occurred_at"], for_test_set=r["for_test_set"],
                          model=(r["prelabel_model_id"], r["prelabel_version"]) if r["prelabel_model_id"] is not None else None)
            for r in verified
        ],
        spot_checks=[_spot_check(r) for r in spot],
        queue=[QueueSpan(kind=r["kind"], entered=r["entered"], left=r["left_at"]) for r in queue],
    )


def _spot_check(row: Any) -> SpotCheck:
    actions = _actions(row["actions"])
    return SpotCheck(
        model=_model(row["model"]), prelabels=int(row["prelabels"] or 0), deleted=actions.get("boxes_deleted", 0),
        relabelled=actions.get("boxes_relabelled", 0), unchanged=actions.get("prelabels_accepted", 0),
        drawn=actions.get("boxes_drawn", 0), at=row["submitted_at"],
    )


async def has_tables(conn: asyncpg.Connection | asyncpg.Pool, schema: str) -> bool:
    """Whether `schema` (unquoted) holds the gateway's tables with the economy's (migration 0003)."""
    found = await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL", f'"{schema}".tasks', f'"{schema}".econ_verified'
    )
    return bool(found)
