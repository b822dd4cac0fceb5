"""Every SQL statement of the evaluator (its schema: `models`, `evaluations`)."""

from __future__ import annotations

import json
from typing import Any

from visionloop.contracts import Metrics, ModelRef, ModelTrained


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


async def record_model(conn: Any, s: str, project: str, trained: ModelTrained, *, passed: bool) -> None:
    """A candidate and the gate's verdict on it."""
    ref = trained.lineage.model
    await conn.execute(
        f"""INSERT INTO {s}.models (model_id, version, project, weights_uri, weights_sha256, class_names, imgsz, passed)
            VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)
            ON CONFLICT (model_id, version) DO UPDATE SET passed = EXCLUDED.passed, evaluated_at = now()""",
        ref.model_id, ref.version, project, trained.weights_uri, trained.weights_sha256, json.dumps(trained.lineage.class_names),
        trained.lineage.imgsz, passed,
    )


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
