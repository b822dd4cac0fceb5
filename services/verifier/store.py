"""Every SQL statement of the verifier (its schema: `verdicts`, `taxonomies`, `prelabel_offers`,
`consensus_submissions`, `consensus_groups`, `calibration_samples`, `calibration`).

Evidence and thresholds are keyed by (project, model line, model version, class): the model
version that drew the pre-labels (`calibrate.model_key`), so a new version starts with none."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from visionloop.contracts import LabelSubmitted
from visionloop.libs.db import quote_ident
from visionloop.services.verifier.calibrate import Calibration, Sample, calibrate
from visionloop.services.verifier.config import Policy


# -- verdicts and taxonomies ------------------------------------------------------------------------
async def decided(conn: asyncpg.Connection, s: str, submission_id: str) -> bool:
    """Whether the submission has its verdict already."""
    return bool(await conn.fetchval(f"SELECT true FROM {s}.verdicts WHERE submission_id = $1", submission_id))


async def record(conn: asyncpg.Connection, s: str, sub: LabelSubmitted, project: str, outcome: str, reason: str | None,
                 label_id: str | None) -> None:
    """The submission's verdict (replacing a `pending` one)."""
    await conn.execute(
        f"""INSERT INTO {s}.verdicts (submission_id, project, task_id, image_id, source, outcome, reason, label_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (submission_id) DO UPDATE SET outcome = EXCLUDED.outcome, reason = EXCLUDED.reason,
                label_id = EXCLUDED.label_id, decided_at = now()""",
        sub.submission_id, project, sub.task_id, sub.image.image_id, sub.source.value, outcome, reason, label_id,
    )


async def taxonomy(conn: asyncpg.Connection, s: str, project: str, carried: list[str] | None) -> list[str] | None:
    """The project's class list: the one the submission carries (kept), else the last one kept."""
    if carried is not None:
        await conn.execute(
            f"""INSERT INTO {s}.taxonomies (project, class_names) VALUES ($1, $2::jsonb)
                ON CONFLICT (project) DO UPDATE SET class_names = EXCLUDED.class_names, updated_at = now()""",
            project, json.dumps(carried),
        )
        return carried
    stored = await conn.fetchval(f"SELECT class_names FROM {s}.taxonomies WHERE project = $1", project)
    return json.loads(stored) if stored else None


async def record_offer(conn: asyncpg.Connection, s: str, sub: LabelSubmitted, project: str, model: tuple[str, int], outcome: str) -> None:
    """What became of a pre-label offer (auto-accepted, needs review, spot check, rejected)."""
    await conn.execute(
        f"""INSERT INTO {s}.prelabel_offers (task_id, project, image_id, model_id, model_version, outcome)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (task_id) DO UPDATE SET outcome = EXCLUDED.outcome, model_id = EXCLUDED.model_id,
                model_version = EXCLUDED.model_version, decided_at = now()""",
        sub.task_id, project, sub.image.image_id, model[0], model[1], outcome,
    )


async def spot_checked(conn: asyncpg.Connection, s: str, task_id: str) -> bool:
    """Whether the task's pre-labels went to a person as a spot check."""
    return bool(await conn.fetchval(f"SELECT outcome = 'spot_check' FROM {s}.prelabel_offers WHERE task_id = $1", task_id))


# -- consensus --------------------------------------------------------------------------------------
async def join_group(conn: asyncpg.Connection, s: str, group: str, sub: LabelSubmitted) -> bool:
    """Keep a consensus submission (under the group's lock); False when the group was decided already."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-consensus:{group}")
    await conn.execute(
        f"""INSERT INTO {s}.consensus_submissions (group_id, submission_id, labeller, payload) VALUES ($1, $2, $3, $4::jsonb)
            ON CONFLICT DO NOTHING""",
        group, sub.submission_id, sub.labeller.user_id, sub.model_dump_json(),
    )
    return not await conn.fetchval(f"SELECT true FROM {s}.consensus_groups WHERE group_id = $1", group)


async def group_members(conn: asyncpg.Connection, s: str, group: str) -> list[LabelSubmitted]:
    """The group's submissions in arrival order."""
    rows = await conn.fetch(f"SELECT payload FROM {s}.consensus_submissions WHERE group_id = $1 ORDER BY received_at, submission_id", group)
    return [LabelSubmitted.model_validate_json(row["payload"]) for row in rows]


async def close_group(conn: asyncpg.Connection, s: str, group: str, project: str, outcome: str, submission_ids: list[str]) -> None:
    """The group's one vote, and every member's verdict with it."""
    await conn.execute(f"INSERT INTO {s}.consensus_groups (group_id, project, outcome) VALUES ($1, $2, $3)", group, project, outcome)
    await conn.execute(f"UPDATE {s}.verdicts SET outcome = $2 WHERE submission_id = ANY($1::text[])", submission_ids, outcome)


# -- calibration ------------------------------------------------------------------------------------
async def recalibrate(conn: asyncpg.Connection, s: str, project: str, model: tuple[str, int], class_name: str, policy: Policy) -> Calibration:
    """Recompute and store one class's calibration on one model version from its newest samples."""
    model_id, version = model
    # One recomputation at a time per class, so concurrent verdicts cannot store a stale one last.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-calibration:{project}:{model_id}@{version}:{class_name}")
    rows = await conn.fetch(
        f"""SELECT score, correct FROM {s}.calibration_samples
            WHERE project = $1 AND model_id = $2 AND model_version = $3 AND class_name = $4 ORDER BY id DESC LIMIT $5""",
        project, model_id, version, class_name, policy.calibration_window,
    )
    cal = calibrate(
        class_name, [Sample(r["score"], r["correct"]) for r in rows], target=policy.target_precision, confidence=policy.confidence,
        min_samples=policy.min_samples, min_support=policy.min_support, model=model,
    )
    await conn.execute(
        f"""INSERT INTO {s}.calibration (project, model_id, model_version, class_name, threshold, precision, samples, support,
                status, target, correct, support_correct, lower_bound, confidence)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            ON CONFLICT (project, model_id, model_version, class_name) DO UPDATE SET threshold = EXCLUDED.threshold,
                precision = EXCLUDED.precision, samples = EXCLUDED.samples, support = EXCLUDED.support,
                status = EXCLUDED.status, target = EXCLUDED.target, correct = EXCLUDED.correct,
                support_correct = EXCLUDED.support_correct, lower_bound = EXCLUDED.lower_bound,
                confidence = EXCLUDED.confidence, updated_at = now()""",
        project, model_id, version, class_name, cal.threshold, cal.precision, cal.samples, cal.support, cal.status,
        policy.target_precision, cal.correct, cal.support_correct, cal.lower_bound, policy.confidence,
    )
    return cal


async def add_samples(conn: asyncpg.Connection, s: str, project: str, model: tuple[str, int], submission_id: str,
                      samples: list[tuple[str, Sample]], policy: Policy) -> list[Calibration]:
    """Record verified pre-label boxes of one model version and recompute the calibration of their classes."""
    if not samples:
        return []
    model_id, version = model
    await conn.executemany(
        f"""INSERT INTO {s}.calibration_samples (project, model_id, model_version, class_name, score, correct, submission_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        [(project, model_id, version, c, sample.score, sample.correct, submission_id) for c, sample in samples],
    )
    return [await recalibrate(conn, s, project, model, c, policy) for c in sorted({c for c, _ in samples})]


def _stored(row: asyncpg.Record) -> Calibration:
    return Calibration(
        row["class_name"], row["samples"], row["threshold"], row["precision"], row["support"], row["status"],
        correct=row["correct"], support_correct=row["support_correct"], lower_bound=row["lower_bound"],
        target=row["target"], confidence=row["confidence"], model=(row["model_id"], row["model_version"]),
    )


async def calibration_of(conn: asyncpg.Connection, s: str, project: str, model: tuple[str, int], policy: Policy) -> dict[str, Calibration]:
    """The calibration in force for the pre-labels of one model version, by class.

    A class stored under another target or confidence than the policy's (the settings changed,
    or the row predates the bound) is recomputed first, so no threshold outlives its rule.
    """
    rows = await conn.fetch(
        f"SELECT * FROM {s}.calibration WHERE project = $1 AND model_id = $2 AND model_version = $3", project, model[0], model[1]
    )
    found = {}
    for row in rows:
        current = row["target"] == policy.target_precision and row["confidence"] == policy.confidence
        found[row["class_name"]] = _stored(row) if current else await recalibrate(conn, s, project, model, row["class_name"], policy)
    return found


async def calibration_report(pool: asyncpg.Pool, schema: str, project: str | None = None) -> list[dict[str, Any]]:
    """Every class's calibration per model version (threshold, counts, precision and its bound), for the CLI and status."""
    s = quote_ident(schema)
    rows = await pool.fetch(
        f"""SELECT project, model_id, model_version, class_name, threshold, correct, samples, support_correct, support,
                   precision, lower_bound, target, confidence, status, updated_at
            FROM {s}.calibration WHERE $1::text IS NULL OR project = $1 ORDER BY project, model_id, model_version, class_name""",
        project,
    )
    return [{**dict(r), "updated_at": r["updated_at"].isoformat()} for r in rows]
