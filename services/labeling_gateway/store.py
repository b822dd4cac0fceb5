"""The gateway's tables (its own schema): every query the gateway makes, in one place.

Functions take an open connection and the quoted schema name; transactions belong to the
callers (an event handler's unit, or an endpoint's `runtime.transaction()`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from visionloop.contracts import Box, Detection, ImageRef, ModelRef
from visionloop.services.labeling_gateway import auth
from visionloop.services.labeling_gateway.auth import Principal, Role
from visionloop.services.labeling_gateway.decide import NewTask

ACTIVE_STATES = ("verifying", "queued", "submitted")
"""States of a task that is not finished: an image has at most one active task group."""


class Conflict(Exception):
    """A write that clashes with what is stored (an existing project, a taken name)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def boxes_json(boxes: Sequence[Box]) -> str:
    """Boxes as stored in jsonb columns."""
    return json.dumps([b.model_dump(mode="json") for b in boxes])


def boxes_from(value: str | None) -> list[Box]:
    """Boxes from a jsonb column (a score makes them model boxes, still `Box`)."""
    return [Box.model_validate(b) for b in json.loads(value or "[]")]


def detections_from(value: str | None) -> list[Detection]:
    """Model boxes (with scores) from a jsonb column; boxes without a score are skipped."""
    return [Detection.model_validate(b) for b in json.loads(value or "[]") if b.get("score") is not None]


# -- projects and taxonomy ---------------------------------------------------------------------------


async def ensure_project(conn: asyncpg.Connection, s: str, project: str, *, created_by: str, class_names: Sequence[str] = ()) -> bool:
    """Create `project` when it does not exist (with `class_names` as its taxonomy); True if created."""
    created = await conn.fetchval(
        f"INSERT INTO {s}.projects (project, created_by) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
        project,
        created_by,
    )
    if created and class_names:
        await add_classes(conn, s, project, class_names)
    return bool(created)


async def create_project(conn: asyncpg.Connection, s: str, project: str, class_names: Sequence[str], *, created_by: str) -> None:
    """Create a project with its taxonomy; `Conflict` when it exists."""
    if not await ensure_project(conn, s, project, created_by=created_by):
        raise Conflict("project_exists", f"project {project!r} exists; add classes with POST /v1/projects/{project}/classes")
    await add_classes(conn, s, project, class_names)


async def project_exists(conn: asyncpg.Connection, s: str, project: str) -> bool:
    """Whether the project exists."""
    return bool(await conn.fetchval(f"SELECT true FROM {s}.projects WHERE project = $1", project))


async def classes(conn: asyncpg.Connection, s: str, project: str) -> list[str]:
    """The project's taxonomy, in order."""
    rows = await conn.fetch(f"SELECT name FROM {s}.classes WHERE project = $1 ORDER BY position", project)
    return [r["name"] for r in rows]


async def add_classes(conn: asyncpg.Connection, s: str, project: str, names: Sequence[str]) -> list[str]:
    """Append the names not yet in the taxonomy (order kept); return the whole taxonomy."""
    # One writer at a time per project, so positions stay dense and ordered.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-gateway-classes:{project}")
    existing = await classes(conn, s, project)
    known = set(existing)
    fresh = []
    for name in names:
        if name not in known:
            known.add(name)
            fresh.append(name)
    if fresh:
        await conn.executemany(
            f"INSERT INTO {s}.classes (project, position, name) VALUES ($1, $2, $3)",
            [(project, len(existing) + i, name) for i, name in enumerate(fresh)],
        )
    return existing + fresh


async def projects(conn: asyncpg.Connection, s: str) -> list[str]:
    """Every project, by name."""
    return [r["project"] for r in await conn.fetch(f"SELECT project FROM {s}.projects ORDER BY project")]


async def queue_counts(conn: asyncpg.Connection, s: str, project: str) -> dict[str, int]:
    """Tasks by state (queued split into available and held) for the project."""
    rows = await conn.fetch(
        f"""SELECT CASE WHEN state = 'queued' AND held_until > now() THEN 'leased' ELSE state END AS state,
                   count(*) AS n
            FROM {s}.tasks WHERE project = $1 GROUP BY 1""",
        project,
    )
    return {r["state"]: r["n"] for r in rows}


# -- tokens ------------------------------------------------------------------------------------------


async def create_token(
    conn: asyncpg.Connection, s: str, *, project: str | None, role: Role, user_id: str, created_by: str
) -> tuple[str, str]:
    """Store a new token; return (token id, token). The token is shown once and never stored."""
    if role is not Role.ADMIN and project is None:
        raise Conflict("project_required", "only admin tokens may cover every project; name a project")
    if project is not None and not await project_exists(conn, s, project):
        raise Conflict("unknown_project", f"project {project!r} does not exist; create it first")
    token_id, token, hashed = auth.new_token()
    await conn.execute(
        f"""INSERT INTO {s}.tokens (token_id, secret_sha256, project, role, user_id, created_by)
            VALUES ($1, $2, $3, $4, $5, $6)""",
        token_id,
        hashed,
        project,
        role.label,
        user_id,
        created_by,
    )
    return token_id, token


async def principal_for(conn: asyncpg.Connection, s: str, token: str) -> Principal | None:
    """Who `token` speaks for, or None (unknown shape, unknown id, wrong secret, revoked)."""
    token_id = auth.token_id_of(token)
    if token_id is None:
        return None
    row = await conn.fetchrow(
        f"SELECT secret_sha256, project, role, user_id, revoked_at FROM {s}.tokens WHERE token_id = $1", token_id
    )
    if row is None or row["revoked_at"] is not None or not auth.matches(token, row["secret_sha256"]):
        return None
    return Principal(token_id=token_id, user_id=row["user_id"], role=Role.parse(row["role"]), project=row["project"])


async def revoke_token(conn: asyncpg.Connection, s: str, token_id: str, project: str | None) -> bool:
    """Revoke a token of `project` (any project when None); False when there is none."""
    done = await conn.fetchval(
        f"""UPDATE {s}.tokens SET revoked_at = now()
            WHERE token_id = $1 AND revoked_at IS NULL AND ($2::text IS NULL OR project = $2)
            RETURNING true""",
        token_id,
        project,
    )
    return bool(done)


async def tokens(conn: asyncpg.Connection, s: str, project: str) -> list[dict[str, Any]]:
    """The project's tokens (never their secrets)."""
    rows = await conn.fetch(
        f"""SELECT token_id, role, user_id, created_at, created_by, revoked_at FROM {s}.tokens
            WHERE project = $1 ORDER BY created_at""",
        project,
    )
    return [dict(r) for r in rows]


# -- images ------------------------------------------------------------------------------------------


async def upsert_image(conn: asyncpg.Connection, s: str, project: str, image: ImageRef) -> None:
    """Remember an image of the project (the first description wins; bytes never change)."""
    await conn.execute(
        f"""INSERT INTO {s}.images (project, image_id, blob_uri, width, height, format, byte_size)
            VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING""",
        project,
        image.image_id,
        image.blob_uri,
        image.width,
        image.height,
        image.format,
        image.byte_size,
    )


async def image(conn: asyncpg.Connection, s: str, project: str, image_id: str) -> ImageRef | None:
    """An image of the project, or None."""
    row = await conn.fetchrow(
        f"SELECT image_id, blob_uri, width, height, format, byte_size FROM {s}.images WHERE project = $1 AND image_id = $2",
        project,
        image_id,
    )
    return ImageRef(**dict(row)) if row else None


async def add_model_version(conn: asyncpg.Connection, s: str, project: str, model: ModelRef) -> None:
    """Remember a model version whose pre-labels reached the gateway."""
    await conn.execute(
        f"INSERT INTO {s}.model_versions (project, model_id, version) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        project,
        model.model_id,
        model.version,
    )


async def model_versions(conn: asyncpg.Connection, s: str, project: str) -> list[ModelRef]:
    """Model versions seen for the project, newest first."""
    rows = await conn.fetch(
        f"SELECT model_id, version FROM {s}.model_versions WHERE project = $1 ORDER BY first_seen DESC, version DESC",
        project,
    )
    return [ModelRef(model_id=r["model_id"], version=r["version"]) for r in rows]


async def prelabels_for(conn: asyncpg.Connection, s: str, project: str, image_id: str) -> tuple[list[Detection], ModelRef | None]:
    """The newest model boxes known for an image (from the recognizer), and their model."""
    row = await conn.fetchrow(
        f"""SELECT start_boxes, prelabel_model FROM {s}.tasks
            WHERE project = $1 AND image_id = $2 AND prelabel_model IS NOT NULL
            ORDER BY created_at DESC LIMIT 1""",
        project,
        image_id,
    )
    if row is None:
        return [], None
    return detections_from(row["start_boxes"]), ModelRef.model_validate_json(row["prelabel_model"])


# -- tasks -------------------------------------------------------------------------------------------


async def insert_tasks(conn: asyncpg.Connection, s: str, tasks: Sequence[NewTask]) -> None:
    """Create tasks."""
    await conn.executemany(
        f"""INSERT INTO {s}.tasks (task_id, project, image_id, kind, state, priority, uncertainty,
                start_boxes, prelabel_model, issues, group_id, group_size, parent_task, reason)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)""",
        [
            (
                t.task_id, t.project, t.image_id, t.kind, t.state, t.priority, t.uncertainty,
                boxes_json(t.start_boxes), t.prelabel_model.model_dump_json() if t.prelabel_model else None,
                json.dumps(t.issues), t.group_id or t.task_id, t.group_size, t.parent_task, t.reason,
            )
            for t in tasks
        ],
    )


async def has_active_task(conn: asyncpg.Connection, s: str, project: str, image_id: str) -> bool:
    """Whether the image already has a task that is not finished."""
    return bool(
        await conn.fetchval(
            f"SELECT true FROM {s}.tasks WHERE project = $1 AND image_id = $2 AND state = ANY($3::text[]) LIMIT 1",
            project,
            image_id,
            list(ACTIVE_STATES),
        )
    )


_TASK_COLUMNS = """t.task_id, t.project, t.image_id, t.kind, t.state, t.priority, t.uncertainty, t.created_at,
    t.start_boxes, t.prelabel_model, t.issues, t.spot_check, t.group_id, t.group_size, t.lease_id,
    t.leased_by, t.leased_at, t.held_until, t.submitted_by,
    i.blob_uri, i.width, i.height, i.format, i.byte_size"""


async def hold_labeller(conn: asyncpg.Connection, project: str, user_id: str) -> None:
    """One lease at a time per labeller (until the transaction ends): concurrent calls of one
    person cannot take two slots."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-lease:{project}:{user_id}")


async def held_task(conn: asyncpg.Connection, s: str, project: str, user_id: str) -> asyncpg.Record | None:
    """The task `user_id` holds in `project` right now, if any."""
    return await conn.fetchrow(
        f"""SELECT {_TASK_COLUMNS} FROM {s}.tasks t JOIN {s}.images i USING (project, image_id)
            WHERE t.project = $1 AND t.leased_by = $2 AND t.state = 'queued' AND t.held_until > now()
            ORDER BY t.leased_at LIMIT 1""",
        project,
        user_id,
    )


async def lease_next(
    conn: asyncpg.Connection, s: str, project: str, user_id: str, kinds: Sequence[str], lease_s: float
) -> asyncpg.Record | None:
    """Hold the most informative available task for `user_id`; None when none is left.

    `FOR UPDATE SKIP LOCKED` hands each row to one transaction: two labellers asking at once
    get different tasks, never the same one. A row whose hold expired is available again.
    Within a consensus group nobody gets a second slot.
    """
    return await conn.fetchrow(
        f"""WITH next AS (
                SELECT t.task_id FROM {s}.tasks t
                WHERE t.project = $1 AND t.state = 'queued'
                  AND (t.held_until IS NULL OR t.held_until <= now())
                  AND t.kind = ANY($3::text[])
                  AND NOT EXISTS (SELECT 1 FROM {s}.skips k WHERE k.task_id = t.task_id AND k.user_id = $2)
                  AND (t.group_size = 1 OR NOT EXISTS (
                        SELECT 1 FROM {s}.tasks g WHERE g.group_id = t.group_id AND g.task_id <> t.task_id
                          AND (g.submitted_by = $2 OR (g.leased_by = $2 AND g.held_until > now()))))
                ORDER BY t.priority DESC, t.created_at, t.task_id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            ), leased AS (
                UPDATE {s}.tasks t SET lease_id = $4, leased_by = $2, leased_at = now(),
                       held_until = now() + make_interval(secs => $5), updated_at = now()
                FROM next WHERE t.task_id = next.task_id
                RETURNING t.*
            )
            SELECT {_TASK_COLUMNS} FROM leased t JOIN {s}.images i USING (project, image_id)""",
        project,
        user_id,
        list(kinds),
        uuid.uuid4(),
        lease_s,
    )


async def task_for_update(conn: asyncpg.Connection, s: str, project: str, task_id: str) -> asyncpg.Record | None:
    """A task with its image, locked for the rest of the transaction."""
    return await conn.fetchrow(
        f"""SELECT {_TASK_COLUMNS} FROM {s}.tasks t JOIN {s}.images i USING (project, image_id)
            WHERE t.project = $1 AND t.task_id = $2 FOR UPDATE OF t""",
        project,
        task_id,
    )


async def task(conn: asyncpg.Connection, s: str, project: str, task_id: str) -> asyncpg.Record | None:
    """A task with its image."""
    return await conn.fetchrow(
        f"""SELECT {_TASK_COLUMNS} FROM {s}.tasks t JOIN {s}.images i USING (project, image_id)
            WHERE t.project = $1 AND t.task_id = $2""",
        project,
        task_id,
    )


async def renew(conn: asyncpg.Connection, s: str, task_id: str, lease_id: uuid.UUID, lease_s: float) -> datetime | None:
    """Extend a lease that is still held; the new expiry, or None."""
    return await conn.fetchval(
        f"""UPDATE {s}.tasks SET held_until = now() + make_interval(secs => $3), updated_at = now()
            WHERE task_id = $1 AND lease_id = $2 AND state = 'queued' AND held_until > now()
            RETURNING held_until""",
        task_id,
        lease_id,
        lease_s,
    )


async def release(conn: asyncpg.Connection, s: str, task_id: str, lease_id: uuid.UUID) -> bool:
    """Give a held task back to the queue."""
    done = await conn.fetchval(
        f"""UPDATE {s}.tasks SET held_until = NULL, lease_id = NULL, leased_by = NULL, updated_at = now()
            WHERE task_id = $1 AND lease_id = $2 AND state = 'queued' AND held_until > now()
            RETURNING true""",
        task_id,
        lease_id,
    )
    return bool(done)


async def skip(conn: asyncpg.Connection, s: str, task_id: str, lease_id: uuid.UUID, user_id: str) -> bool:
    """Release a held task and never hand it to `user_id` again."""
    if not await release(conn, s, task_id, lease_id):
        return False
    await conn.execute(
        f"INSERT INTO {s}.skips (task_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", task_id, user_id
    )
    return True


async def set_state(conn: asyncpg.Connection, s: str, task_ids: Sequence[str], state: str, *, only_from: Sequence[str]) -> int:
    """Move tasks to `state` from one of `only_from`; return how many moved."""
    result = await conn.execute(
        f"""UPDATE {s}.tasks SET state = $2, updated_at = now()
            WHERE task_id = ANY($1::text[]) AND state = ANY($3::text[])""",
        list(task_ids),
        state,
        list(only_from),
    )
    return int(result.rsplit(" ", 1)[-1])


async def group_tasks(conn: asyncpg.Connection, s: str, group_id: str) -> list[asyncpg.Record]:
    """Every slot of a task group."""
    return await conn.fetch(f"SELECT * FROM {s}.tasks WHERE group_id = $1 ORDER BY task_id FOR UPDATE", group_id)


async def open_for_review(conn: asyncpg.Connection, s: str, task_id: str, *, spot_check: bool, issues: list[dict[str, Any]],
                          reason: str) -> bool:
    """A task whose pre-labels the verifier did not auto-accept joins the queue, with the verifier's reason."""
    done = await conn.fetchval(
        f"""UPDATE {s}.tasks SET state = 'queued', spot_check = $2, issues = $3, reason = $4, updated_at = now()
            WHERE task_id = $1 AND state = 'verifying' RETURNING true""",
        task_id,
        spot_check,
        json.dumps(issues),
        reason,
    )
    return bool(done)


async def supersede_queued(conn: asyncpg.Connection, s: str, project: str, image_id: str) -> int:
    """Retire the image's queued tasks nobody holds (the image was labelled elsewhere)."""
    result = await conn.execute(
        f"""UPDATE {s}.tasks SET state = 'superseded', updated_at = now()
            WHERE project = $1 AND image_id = $2 AND state = 'queued' AND (held_until IS NULL OR held_until <= now())""",
        project,
        image_id,
    )
    return int(result.rsplit(" ", 1)[-1])


# -- submissions ---------------------------------------------------------------------------------------


@dataclass
class SubmissionRow:
    """A submission as the gateway records it."""

    submission_id: str
    task_id: str | None
    project: str
    image_id: str
    user_id: str
    role: str
    source: str
    kind: str
    decision: str | None
    boxes: Sequence[Box]
    actions: dict[str, int]
    opened_at: datetime | None
    submitted_at: datetime
    duration_s: float | None
    lease_id: uuid.UUID | None = None
    for_test_set: bool = False


async def insert_submission(conn: asyncpg.Connection, s: str, sub: SubmissionRow) -> None:
    """Record a submission."""
    await conn.execute(
        f"""INSERT INTO {s}.submissions (submission_id, task_id, project, image_id, lease_id, user_id, role,
                source, kind, decision, boxes, actions, opened_at, submitted_at, duration_s, for_test_set)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)""",
        sub.submission_id, sub.task_id, sub.project, sub.image_id, sub.lease_id, sub.user_id, sub.role,
        sub.source, sub.kind, sub.decision, boxes_json(sub.boxes), json.dumps(sub.actions), sub.opened_at,
        sub.submitted_at, sub.duration_s, sub.for_test_set,
    )


async def submission(conn: asyncpg.Connection, s: str, submission_id: str) -> asyncpg.Record | None:
    """A recorded submission."""
    return await conn.fetchrow(f"SELECT * FROM {s}.submissions WHERE submission_id = $1", submission_id)


async def submission_for_lease(conn: asyncpg.Connection, s: str, task_id: str, lease_id: uuid.UUID) -> asyncpg.Record | None:
    """The submission made under a lease (a retried submit finds it)."""
    return await conn.fetchrow(
        f"SELECT * FROM {s}.submissions WHERE task_id = $1 AND lease_id = $2", task_id, lease_id
    )


async def mark_outcome(conn: asyncpg.Connection, s: str, submission_ids: Sequence[str], outcome: str, reason: str | None) -> list[asyncpg.Record]:
    """Record the verifier's word on submissions; return the ones that had none yet."""
    return await conn.fetch(
        f"""UPDATE {s}.submissions SET outcome = $2, outcome_reason = $3, outcome_at = now()
            WHERE submission_id = ANY($1::text[]) AND outcome IS NULL
            RETURNING submission_id, task_id, source""",
        list(submission_ids),
        outcome,
        reason,
    )


# -- verified labels -------------------------------------------------------------------------------------


async def store_label(
    conn: asyncpg.Connection, s: str, project: str, image_id: str, *, label_id: str, boxes: Sequence[Box], method: str, for_test_set: bool
) -> None:
    """Keep the newest verified label set of an image (per training / test use)."""
    await conn.execute(
        f"""INSERT INTO {s}.labels (project, image_id, for_test_set, label_id, boxes, method)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (project, image_id, for_test_set) DO UPDATE
            SET label_id = EXCLUDED.label_id, boxes = EXCLUDED.boxes, method = EXCLUDED.method, verified_at = now()""",
        project, image_id, for_test_set, label_id, boxes_json(boxes), method,
    )


async def labels(conn: asyncpg.Connection, s: str, project: str) -> list[asyncpg.Record]:
    """Every verified label set of the project with its image; an image of the test set is
    never also a training image."""
    return await conn.fetch(
        f"""SELECT l.image_id, l.for_test_set, l.boxes, l.method, i.width, i.height, i.format, i.blob_uri,
                   (SELECT p.start_boxes FROM {s}.tasks p WHERE p.project = l.project AND p.image_id = l.image_id
                      AND p.prelabel_model IS NOT NULL ORDER BY p.created_at DESC LIMIT 1) AS prelabels,
                   (SELECT p.prelabel_model FROM {s}.tasks p WHERE p.project = l.project AND p.image_id = l.image_id
                      AND p.prelabel_model IS NOT NULL ORDER BY p.created_at DESC LIMIT 1) AS prelabel_model
            FROM {s}.labels l JOIN {s}.images i USING (project, image_id)
            WHERE l.project = $1
              AND (l.for_test_set OR NOT EXISTS (
                    SELECT 1 FROM {s}.labels t WHERE t.project = l.project AND t.image_id = l.image_id AND t.for_test_set))
            ORDER BY l.for_test_set, l.image_id""",
        project,
    )


async def mark_submitted(conn: asyncpg.Connection, s: str, task_id: str, user_id: str) -> None:
    """A held task answered: it waits for the verifier."""
    await conn.execute(
        f"UPDATE {s}.tasks SET state = 'submitted', submitted_by = $2, held_until = NULL, updated_at = now() WHERE task_id = $1",
        task_id, user_id,
    )


async def open_task_counts(conn: asyncpg.Connection | asyncpg.Pool, s: str) -> list[asyncpg.Record]:
    """Open tasks by project and state (a queued task held by a labeller counts as `leased`)."""
    return await conn.fetch(
        f"""SELECT project, CASE WHEN state = 'queued' AND held_until > now() THEN 'leased' ELSE state END AS state,
                   count(*) AS n
            FROM {s}.tasks WHERE state IN ('verifying', 'queued', 'submitted') GROUP BY 1, 2"""
    )


async def groups_of(conn: asyncpg.Connection, s: str, task_ids: Sequence[str]) -> list[str]:
    """The task groups the tasks belong to."""
    rows = await conn.fetch(f"SELECT DISTINCT group_id FROM {s}.tasks WHERE task_id = ANY($1::text[])", list(task_ids))
    return [r["group_id"] for r in rows]


async def reject_group_submissions(conn: asyncpg.Connection, s: str, task_ids: Sequence[str], reason: str) -> None:
    """A consensus group is rejected as one: every member's answer shares the verdict."""
    await conn.execute(
        f"""UPDATE {s}.submissions SET outcome = 'rejected', outcome_reason = $2, outcome_at = now()
            WHERE task_id = ANY($1::text[]) AND outcome IS NULL""",
        list(task_ids), reason,
    )


async def signing_key(conn: asyncpg.Connection, s: str) -> bytes:
    """The key that signs image URLs (made at the first call, shared by every replica)."""
    import secrets as _secrets

    await conn.execute(
        f"INSERT INTO {s}.secrets (name, value) VALUES ('url_signing', $1) ON CONFLICT DO NOTHING",
        _secrets.token_bytes(32),
    )
    return bytes(await conn.fetchval(f"SELECT value FROM {s}.secrets WHERE name = 'url_signing'"))


async def task_list(conn: Any, s: str, project: str, *, state: str | None, reason: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
    """A project's tasks, newest first, by state and reason (`GET /v1/projects/{p}/tasks`)."""
    rows = await conn.fetch(
        f"""SELECT task_id, image_id, kind, state, reason, priority, uncertainty, group_id, group_size, parent_task,
                   spot_check, created_at, updated_at
            FROM {s}.tasks WHERE project = $1 AND ($2::text IS NULL OR state = $2) AND ($3::text IS NULL OR reason = $3)
            ORDER BY created_at DESC, task_id DESC LIMIT $4 OFFSET $5""",
        project, state, reason, limit, offset,
    )
    return [dict(r) for r in rows]


async def record_import(conn: Any, s: str, import_id: str, project: str, fmt: str, created_by: str) -> None:
    """An import under way (its counts come at its end: `count_import`)."""
    await conn.execute(
        f"INSERT INTO {s}.imports (import_id, project, format, images, boxes, test_set, created_by) VALUES ($1, $2, $3, 0, 0, 0, $4)",
        import_id, project, fmt, created_by,
    )


async def count_import(conn: Any, s: str, import_id: str, images: int, boxes: int, test_set: int) -> None:
    """What an import sent to the verifier."""
    await conn.execute(f"UPDATE {s}.imports SET images = $2, boxes = $3, test_set = $4 WHERE import_id = $1", import_id, images, boxes, test_set)
