"""Every SQL statement of the trainer (its schema: `samples`, `taxonomies`, `runs`, `models`,
`dataset_versions`, `test_sets`). Functions take a connection (or the pool) and the quoted schema;
transactions belong to the callers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from visionloop.libs.db import quote_ident

MAX_TRIGGERS = 20
"""Requests remembered on one queued run (the rest are coalesced into it, uncounted)."""

Conn = asyncpg.Connection | asyncpg.Pool


# -- the dataset ------------------------------------------------------------------------------------
async def lock_project(conn: asyncpg.Connection, project: str) -> None:
    """Serialise the project's dataset changes and snapshots until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-trainer:{project}")


async def taxonomy(conn: Conn, s: str, project: str) -> list[str]:
    """The project's class list (head order)."""
    stored = await conn.fetchval(f"SELECT class_names FROM {s}.taxonomies WHERE project = $1", project)
    return json.loads(stored) if stored else []


async def save_taxonomy(conn: Conn, s: str, project: str, class_names: list[str]) -> None:
    await conn.execute(
        f"""INSERT INTO {s}.taxonomies (project, class_names) VALUES ($1, $2::jsonb)
            ON CONFLICT (project) DO UPDATE SET class_names = EXCLUDED.class_names, updated_at = now()""",
        project, json.dumps(class_names),
    )


async def sample(conn: Conn, s: str, project: str, image_id: str) -> asyncpg.Record | None:
    """An image's sample: its role, label hash and perceptual hashes (None: not in the dataset)."""
    return await conn.fetchrow(
        f"SELECT role, label_hash, phash, dhash FROM {s}.samples WHERE project = $1 AND image_id = $2", project, image_id
    )


async def test_count(conn: Conn, s: str, project: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM {s}.samples WHERE project = $1 AND role = 'test'", project))


async def save_sample(conn: Conn, s: str, *, project: str, image_id: str, label_id: str, image: str, boxes: str, label_hash: str,
                      provenance: str, role: str, phash: str | None, dhash: str | None) -> None:
    """The image's newest verified label set (and role); it moves to the end of the sample order."""
    await conn.execute(
        f"""INSERT INTO {s}.samples (project, image_id, label_id, image, boxes, label_hash, provenance, role, phash, dhash)
            VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7::jsonb, $8, $9, $10)
            ON CONFLICT (project, image_id) DO UPDATE SET label_id = EXCLUDED.label_id, image = EXCLUDED.image,
                boxes = EXCLUDED.boxes, label_hash = EXCLUDED.label_hash, provenance = EXCLUDED.provenance,
                role = EXCLUDED.role, seq = nextval('{s}.sample_seq'), verified_at = now()""",
        project, image_id, label_id, image, boxes, label_hash, provenance, role, phash, dhash,
    )


async def new_training_images(conn: Conn, s: str, project: str) -> int | None:
    """Training images verified since the last run's snapshot; None while a run is queued already."""
    if await conn.fetchval(f"SELECT true FROM {s}.runs WHERE project = $1 AND status = 'queued'", project):
        return None
    since = await conn.fetchval(f"SELECT coalesce(max(snapshot_seq), 0) FROM {s}.runs WHERE project = $1", project)
    # Imported labels never count: an import asks for its own run (or for none) when it is whole.
    return int(await conn.fetchval(
        f"""SELECT count(*) FROM {s}.samples WHERE project = $1 AND role = 'train' AND seq > $2
              AND provenance->>'batch_id' IS NULL""", project, since
    ))


async def samples(conn: Conn, s: str, project: str) -> list[asyncpg.Record]:
    """Every sample of the project (a snapshot's input)."""
    return await conn.fetch(
        f"SELECT image_id, image, boxes, label_hash, role, phash, dhash, seq FROM {s}.samples WHERE project = $1", project
    )


async def record_snapshot(conn: Conn, s: str, *, run_id: str, project: str, version: str, uri: str, class_names: list[str],
                          train_images: int, val_images: int, excluded: list[dict[str, Any]], snapshot_seq: int,
                          test_version: str | None, test_images: int, test_uri: str | None) -> None:
    """A run's frozen dataset version and test set, and the run pointing at them."""
    if test_version is not None:
        await conn.execute(
            f"INSERT INTO {s}.test_sets (version, project, images, uri) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            test_version, project, test_images, test_uri,
        )
    await conn.execute(
        f"""INSERT INTO {s}.dataset_versions (version, project, class_names, train_images, val_images, excluded_near_test,
                                                  test_set_version, uri, excluded)
            VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9::jsonb) ON CONFLICT DO NOTHING""",
        version, project, json.dumps(class_names), train_images, val_images, len(excluded), test_version, uri, json.dumps(excluded),
    )
    await conn.execute(
        f"UPDATE {s}.runs SET snapshot_seq = $2, dataset_version = $3, test_set_version = $4 WHERE run_id = $1",
        run_id, snapshot_seq, version, test_version,
    )


# -- models -----------------------------------------------------------------------------------------
async def champion(conn: Conn, s: str, project: str) -> asyncpg.Record | None:
    """The model later runs fine-tune: the newest production model, else the newest that passed."""
    return await conn.fetchrow(
        f"""SELECT * FROM {s}.models WHERE project = $1 AND (production_at IS NOT NULL OR passed)
            ORDER BY production_at DESC NULLS LAST, version DESC LIMIT 1""",
        project,
    )


async def mark_passed(conn: Conn, s: str, project: str, model_id: str, version: int, passed: bool, *,
                      map50_95: float | None = None, map50: float | None = None, failures: list[dict[str, Any]] | None = None) -> None:
    """The gate's verdict on a model, with the test set's figures and the reasons it failed."""
    await conn.execute(
        f"""UPDATE {s}.models SET passed = $3, map50_95 = $5, map50 = $6, gate_failures = $7::jsonb, evaluated_at = now()
            WHERE model_id = $1 AND version = $2 AND project = $4""",
        model_id, version, passed, project, map50_95, map50, json.dumps(failures or []),
    )


async def mark_production(conn: Conn, s: str, project: str, model_id: str, version: int) -> None:
    await conn.execute(
        f"UPDATE {s}.models SET production_at = now() WHERE model_id = $1 AND version = $2 AND project = $3", model_id, version, project,
    )


async def add_model(conn: asyncpg.Connection, s: str, *, model_id: str, project: str, run_id: str, weights_uri: str,
                    weights_sha256: str, class_names: list[str], imgsz: int) -> int:
    """The next version of the model line, recorded with its run (which succeeds); the version."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-trainer-models:{model_id}")
    version = int(await conn.fetchval(f"SELECT coalesce(max(version), 0) + 1 FROM {s}.models WHERE model_id = $1", model_id))
    await conn.execute(
        f"""INSERT INTO {s}.models (model_id, version, project, run_id, weights_uri, weights_sha256, class_names, imgsz)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)""",
        model_id, version, project, run_id, weights_uri, weights_sha256, json.dumps(class_names), imgsz,
    )
    await conn.execute(
        f"""UPDATE {s}.runs SET status = 'succeeded', model_id = $2, version = $3, finished_at = now(), pid = NULL
            WHERE run_id = $1 AND status = 'running'""",
        run_id, model_id, version,
    )
    return version


# -- runs -------------------------------------------------------------------------------------------
async def queue_run(conn: Conn, s: str, project: str, trigger: Mapping[str, Any], hyperparameters: Mapping[str, Any] | None = None,
                    *, waits_for: Mapping[str, Any] | None = None, wait_s: float | None = None) -> tuple[str, bool]:
    """Queue a run for `project`, or coalesce into the one already queued; (run id, new?).

    `waits_for` ({"batch_id", "labels"}): the run is not claimed before the project holds that many
    samples of the import, or before `wait_s` have passed (a coalesced run waits for the newest import).
    """
    run_id = f"run-{uuid.uuid4().hex[:16]}"
    row = await conn.fetchrow(
        f"""INSERT INTO {s}.runs (run_id, project, status, triggers, hyperparameters, waits_for, waits_until)
            VALUES ($1, $2, 'queued', jsonb_build_array($3::jsonb), $4::jsonb, $5::jsonb,
                    CASE WHEN $6::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $6::float8) END)
            ON CONFLICT (project) WHERE status = 'queued' DO UPDATE SET
                triggers = CASE WHEN jsonb_array_length({s}.runs.triggers) < {MAX_TRIGGERS}
                                THEN {s}.runs.triggers || EXCLUDED.triggers ELSE {s}.runs.triggers END,
                hyperparameters = {s}.runs.hyperparameters || EXCLUDED.hyperparameters,
                waits_for = coalesce(EXCLUDED.waits_for, {s}.runs.waits_for),
                waits_until = coalesce(EXCLUDED.waits_until, {s}.runs.waits_until)
            RETURNING run_id, (xmax = 0) AS inserted""",
        run_id, project, json.dumps(dict(trigger)), json.dumps(dict(hyperparameters or {})),
        json.dumps(dict(waits_for)) if waits_for else None, wait_s,
    )
    return row["run_id"], row["inserted"]


async def expired_runs(conn: asyncpg.Connection, s: str) -> list[asyncpg.Record]:
    """Running runs whose lease ran out (their trainer died), locked for this transaction."""
    return await conn.fetch(
        f"SELECT run_id, project, attempts, triggers FROM {s}.runs WHERE status = 'running' AND lease_until < now() FOR UPDATE SKIP LOCKED"
    )


async def queued_run(conn: Conn, s: str, project: str) -> str | None:
    return await conn.fetchval(f"SELECT run_id FROM {s}.runs WHERE project = $1 AND status = 'queued'", project)


async def requeue(conn: Conn, s: str, run_id: str) -> None:
    await conn.execute(f"UPDATE {s}.runs SET status = 'queued', owner = NULL, pid = NULL, lease_until = NULL WHERE run_id = $1", run_id)


async def fail_lost(conn: Conn, s: str, run_id: str) -> None:
    await conn.execute(
        f"""UPDATE {s}.runs SET status = 'failed', reason = 'trainer_lost', finished_at = now(),
            error = 'the trainer running it stopped and it was not started again' WHERE run_id = $1""",
        run_id,
    )


async def claim(conn: Conn, s: str, owner: str, lease_s: float) -> dict[str, Any] | None:
    """The oldest queued run of a project with none running, now this trainer's (leased)."""
    row = await conn.fetchrow(
        f"""UPDATE {s}.runs SET status = 'running', owner = $1, attempts = attempts + 1, started_at = now(),
                lease_until = now() + make_interval(secs => $2)
            WHERE run_id = (
                SELECT r.run_id FROM {s}.runs r WHERE r.status = 'queued'
                  AND NOT EXISTS (SELECT 1 FROM {s}.runs x WHERE x.project = r.project AND x.status = 'running')
                  AND (r.waits_for IS NULL OR r.waits_until <= now()
                       OR (SELECT count(*) FROM {s}.samples m WHERE m.project = r.project
                             AND m.provenance->>'batch_id' = r.waits_for->>'batch_id') >= (r.waits_for->>'labels')::int)
                ORDER BY r.created_at FOR UPDATE SKIP LOCKED LIMIT 1)
            RETURNING *""",
        owner, lease_s,
    )
    return dict(row) if row else None


async def give_back(conn: Conn, s: str, run_id: str) -> None:
    """A run this trainer stops on: its lease ends now and this start does not count."""
    await conn.execute(f"UPDATE {s}.runs SET lease_until = now() - interval '1 second', attempts = attempts - 1 WHERE run_id = $1", run_id)


async def renew(conn: Conn, s: str, run_id: str, lease_s: float) -> None:
    await conn.execute(
        f"UPDATE {s}.runs SET lease_until = now() + make_interval(secs => $2) WHERE run_id = $1 AND status = 'running'", run_id, lease_s,
    )


async def fail(conn: Conn, s: str, run_id: str, reason: str, message: str) -> None:
    """A running run failed (a cancelled run keeps its reason)."""
    await conn.execute(
        f"""UPDATE {s}.runs SET status = 'failed', reason = $2, error = $3, finished_at = now(), pid = NULL
            WHERE run_id = $1 AND status = 'running'""",
        run_id, reason, message[:4000],
    )


async def cancel(conn: Conn, s: str, run_id: str, by: str) -> asyncpg.Record | None:
    """Cancel a queued or running run (`visionloop trainer cancel`): (project, status it had, pid), or
    None when there is no such run or it has finished."""
    return await conn.fetchrow(
        f"""WITH old AS (SELECT run_id, status FROM {s}.runs WHERE run_id = $1 AND status IN ('queued', 'running') FOR UPDATE)
            UPDATE {s}.runs r SET status = 'failed', reason = 'cancelled', error = $2, finished_at = now()
            FROM old WHERE r.run_id = old.run_id
            RETURNING r.project, old.status AS was, r.pid""",
        run_id, f"cancelled by {by}",
    )


async def cancelled(conn: Conn, s: str, run_id: str) -> bool:
    """Whether a run was cancelled while it ran (its trainer stops it)."""
    return bool(await conn.fetchval(f"SELECT reason = 'cancelled' FROM {s}.runs WHERE run_id = $1", run_id))


async def set_pid(conn: Conn, s: str, run_id: str, pid: int) -> None:
    await conn.execute(f"UPDATE {s}.runs SET pid = $2 WHERE run_id = $1", run_id, pid)


async def set_epoch(conn: Conn, s: str, run_id: str, epoch: int) -> None:
    await conn.execute(f"UPDATE {s}.runs SET epoch = $2 WHERE run_id = $1", run_id, epoch)


async def set_base_checkpoint(conn: Conn, s: str, run_id: str, record: Mapping[str, Any]) -> None:
    await conn.execute(f"UPDATE {s}.runs SET base_checkpoint = $2::jsonb WHERE run_id = $1", run_id, json.dumps(dict(record)))


async def runs_to_keep(conn: Conn, s: str, keep_runs: int) -> list[asyncpg.Record]:
    """Each run with its dataset version and whether its local folders stay (newest `keep_runs` per project, or active)."""
    return await conn.fetch(
        f"""SELECT run_id, dataset_version, (n <= $1 OR status IN ('queued', 'running')) AS keep FROM (
                SELECT run_id, dataset_version, status, row_number() OVER (PARTITION BY project ORDER BY created_at DESC) AS n
                FROM {s}.runs) ranked""",
        keep_runs,
    )


async def runs_report(pool: asyncpg.Pool, schema: str, project: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recent runs, newest first (the CLI and dashboards)."""
    s = quote_ident(schema)
    rows = await pool.fetch(
        f"""SELECT r.run_id, r.project, r.status, r.reason, r.error, r.attempts, r.epoch, r.dataset_version, r.test_set_version,
                   r.model_id, r.version, r.triggers, r.base_checkpoint, r.created_at, r.started_at, r.finished_at,
                   m.passed AS gate_passed, m.map50_95, m.map50, m.gate_failures,
                   d.train_images, d.val_images, d.excluded
            FROM {s}.runs r LEFT JOIN {s}.models m ON m.model_id = r.model_id AND m.version = r.version
            LEFT JOIN {s}.dataset_versions d ON d.version = r.dataset_version
            WHERE $1::text IS NULL OR r.project = $1 ORDER BY r.created_at DESC LIMIT $2""",
        project, limit,
    )
    out = []
    for r in rows:
        row = dict(r)
        row["triggers"] = json.loads(row["triggers"])
        row["base_checkpoint"] = json.loads(row["base_checkpoint"]) if row["base_checkpoint"] else None
        row["gate_failures"] = json.loads(row["gate_failures"]) if row["gate_failures"] else []
        row["excluded"] = json.loads(row["excluded"]) if row["excluded"] else []
        for key in ("created_at", "started_at", "finished_at"):
            row[key] = row[key].isoformat() if row[key] else None
        out.append(row)
    return out
