"""Every SQL statement of the evaluator (its schema: `models`, `evaluations`)."""

from __future__ import annotations

import json
from typing import Any

from visionloop.contracts import GateFailure, Metrics, ModelRef, ModelTrained


async def champion_of(conn: Any, s: str, project: str, exclude: ModelRef) -> dict[str, Any] | None:
    """The project's champion: newest production model, else newest that passed (not `exclude`)."""
    row = await conn.fetchrow(
        f"""SELECT * FROM {s}.models WHERE project = $1 AND (production_at IS NOT NULL OR passed)
              AND NOT (model_id = $2 AND version = $3)
            ORDER BY production_at DESC NULLS LAST, evaluated_at DESC LIMIT 1""",
        project, exclude.model_id, exclude.version,
    )
    return dict(row) if row else None


async def stored_metrics(conn: Any, s: str, model: ModelRef, test_set_version: str) -> Metrics | None:
    """A model's metrics on a test set version, when it was measured on it before."""
    stored = await conn.fetchval(
        f"SELECT metrics FROM {s}.evaluations WHERE model_id = $1 AND version = $2 AND test_set_version = $3",
        model.model_id, model.version, test_set_version,
    )
    return Metrics.model_validate_json(stored) if stored else None


async def report_of(conn: Any, s: str, model: ModelRef, test_set_version: str) -> str | None:
    """The report of a model's measurement on a test set version."""
    return await conn.fetchval(
        f"SELECT report_uri FROM {s}.evaluations WHERE model_id = $1 AND version = $2 AND test_set_version = $3",
        model.model_id, model.version, test_set_version,
    )


async def record_model(conn: Any, s: str, project: str, trained: ModelTrained, *, passed: bool, failures: list[GateFailure]) -> None:
    """A candidate (its `model trained` payload kept for a rejudge) and the gate's newest verdict on it."""
    ref = trained.lineage.model
    await conn.execute(
        f"""INSERT INTO {s}.models (model_id, version, project, weights_uri, weights_sha256, class_names, imgsz, passed, trained, failures)
            VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9::jsonb, $10::jsonb)
            ON CONFLICT (model_id, version) DO UPDATE SET passed = EXCLUDED.passed, failures = EXCLUDED.failures,
                trained = EXCLUDED.trained, evaluated_at = now()""",
        ref.model_id, ref.version, project, trained.weights_uri, trained.weights_sha256, json.dumps(trained.lineage.class_names),
        trained.lineage.imgsz, passed, trained.model_dump_json(), json.dumps([f.model_dump(mode="json") for f in failures]),
    )


async def trained_of(conn: Any, s: str, model: ModelRef) -> tuple[str, ModelTrained] | None:
    """(project, `model trained` payload) of a model gated before, or None (unknown, or gated
    before its payload was kept)."""
    row = await conn.fetchrow(f"SELECT project, trained FROM {s}.models WHERE model_id = $1 AND version = $2", model.model_id, model.version)
    if row is None or row["trained"] is None:
        return None
    return row["project"], ModelTrained.model_validate_json(row["trained"])


async def gated_model(conn: Any, s: str, model_id: str, version: int | None) -> Any:
    """(project, version, passed) of a gated model (`version` None: the newest), or None."""
    return await conn.fetchrow(
        f"""SELECT project, version, passed FROM {s}.models WHERE model_id = $1 AND ($2::int IS NULL OR version = $2)
            ORDER BY version DESC LIMIT 1""",
        model_id, version,
    )


async def gate_overrides(conn: Any, s: str, project: str) -> dict[str, Any]:
    """A project's gate settings changed at run time (empty: none)."""
    stored = await conn.fetchval(f"SELECT overrides FROM {s}.gate_settings WHERE project = $1", project)
    return json.loads(stored) if stored else {}


async def set_gate_overrides(conn: Any, s: str, project: str, overrides: dict[str, Any], by: str) -> None:
    """Replace a project's run-time gate settings."""
    await conn.execute(
        f"""INSERT INTO {s}.gate_settings (project, overrides, updated_by) VALUES ($1, $2::jsonb, $3)
            ON CONFLICT (project) DO UPDATE SET overrides = EXCLUDED.overrides, updated_by = EXCLUDED.updated_by, updated_at = now()""",
        project, json.dumps(overrides), by,
    )


async def models_report(conn: Any, s: str, project: str | None, limit: int) -> list[dict[str, Any]]:
    """Gated models, newest first, with their verdict and test-set mAP50-95 (`visionloop evaluator models`)."""
    rows = await conn.fetch(
        f"""SELECT m.project, m.model_id, m.version, m.passed, m.failures, m.evaluated_at, m.production_at,
                   (SELECT (e.metrics->>'map50_95')::float FROM {s}.evaluations e WHERE e.model_id = m.model_id
                     AND e.version = m.version ORDER BY e.measured_at DESC LIMIT 1) AS map50_95
            FROM {s}.models m WHERE $1::text IS NULL OR m.project = $1 ORDER BY m.evaluated_at DESC LIMIT $2""",
        project, limit,
    )
    return [
        {**dict(r), "failures": json.loads(r["failures"]) if r["failures"] else [],
         "evaluated_at": r["evaluated_at"].isoformat(), "production_at": r["production_at"].isoformat() if r["production_at"] else None}
        for r in rows
    ]


async def record_evaluation(conn: Any, s: str, project: str, model: ModelRef, test_set_version: str, metrics: Metrics,
                            report_uri: str | None) -> None:
    """A model's metrics on a test set version (its report kept when none comes with them)."""
    await conn.execute(
        f"""INSERT INTO {s}.evaluations (model_id, version, test_set_version, project, metrics, report_uri)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6)
            ON CONFLICT (model_id, version, test_set_version) DO UPDATE SET metrics = EXCLUDED.metrics,
                report_uri = coalesce(EXCLUDED.report_uri, {s}.evaluations.report_uri), measured_at = now()""",
        model.model_id, model.version, test_set_version, project, metrics.model_dump_json(), report_uri,
    )


async def mark_production(conn: Any, s: str, project: str, model: ModelRef) -> None:
    """The model is production now: the champion candidates are compared with."""
    await conn.execute(
        f"UPDATE {s}.models SET production_at = now() WHERE model_id = $1 AND version = $2 AND project = $3",
        model.model_id, model.version, project,
    )
