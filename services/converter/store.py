"""Every SQL statement of the converter (its schema: `models`, `conversions`)."""

from __future__ import annotations

import json
from typing import Any

from visionloop.contracts import Artifact, ModelEvaluated
from visionloop.services.converter.convert import Built


async def record_model(conn: Any, s: str, project: str, e: ModelEvaluated, outcome: str, seconds: float | None) -> None:
    """What became of a gated model: converted, partial, refused, or skipped (failed the gate)."""
    ref = e.lineage.model
    await conn.execute(
        f"""INSERT INTO {s}.models (model_id, version, project, weights_sha256, passed_gate, outcome, reference_map50_95,
                test_set_version, seconds)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (model_id, version) DO UPDATE SET project = EXCLUDED.project, weights_sha256 = EXCLUDED.weights_sha256,
                passed_gate = EXCLUDED.passed_gate, outcome = EXCLUDED.outcome, reference_map50_95 = EXCLUDED.reference_map50_95,
                test_set_version = EXCLUDED.test_set_version, seconds = EXCLUDED.seconds, handled_at = now()""",
        ref.model_id, ref.version, project, e.weights_sha256, e.passed, outcome, e.candidate.map50_95,
        e.test_set.version if e.test_set else None, seconds,
    )


async def record_target(conn: Any, s: str, project: str, e: ModelEvaluated, b: Built, artifact: Artifact | None) -> None:
    """One target's outcome: the artifact that ships, or the refusal, with its parity figures."""
    ref = e.lineage.model
    await conn.execute(
        f"""INSERT INTO {s}.conversions (model_id, version, target, project, precision, outcome, reason, message,
                input_shape, max_abs_diff_px, map50_95, map50_95_delta, tolerance, artifact_uri, artifact_sha256,
                size_bytes, seconds)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14, $15, $16, $17::jsonb)
            ON CONFLICT (model_id, version, target) DO UPDATE SET project = EXCLUDED.project,
                precision = EXCLUDED.precision, outcome = EXCLUDED.outcome, reason = EXCLUDED.reason,
                message = EXCLUDED.message, input_shape = EXCLUDED.input_shape, max_abs_diff_px = EXCLUDED.max_abs_diff_px,
                map50_95 = EXCLUDED.map50_95, map50_95_delta = EXCLUDED.map50_95_delta, tolerance = EXCLUDED.tolerance,
                artifact_uri = EXCLUDED.artifact_uri, artifact_sha256 = EXCLUDED.artifact_sha256,
                size_bytes = EXCLUDED.size_bytes, seconds = EXCLUDED.seconds, converted_at = now()""",
        ref.model_id, ref.version, b.target.value, project, b.precision.value,
        "shipped" if artifact else "refused", b.refusal.reason.value if b.refusal else None,
        b.refusal.message if b.refusal else None, json.dumps(b.input_shape) if b.input_shape else None,
        b.parity.max_abs_diff_px, b.parity.map50_95, b.parity.map50_95_delta, b.parity.tolerance,
        artifact.uri if artifact else None, artifact.sha256 if artifact else None,
        artifact.size_bytes if artifact else None, json.dumps({k: round(v, 3) for k, v in b.seconds.items()}),
    )
