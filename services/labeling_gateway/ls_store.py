"""The gateway's Label Studio tables: bound Label Studio projects and the webhook inbox (the rest
of its queries are in `store.py`, the economy's in `economy_store.py`)."""

from __future__ import annotations

import asyncpg



async def bind_ls_project(
    conn: asyncpg.Connection, s: str, ls_project: str, project: str, *, hostname: str | None = None,
    access_token: str | None = None, from_name: str | None = None, to_name: str | None = None,
) -> str:
    """Bind a Label Studio project to a visionloop project (the first binding stays); return
    the visionloop project it is bound to."""
    row = await conn.fetchrow(
        f"""INSERT INTO {s}.ls_projects (ls_project, project, hostname, access_token, from_name, to_name)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (ls_project) DO UPDATE SET
                hostname = COALESCE(EXCLUDED.hostname, {s}.ls_projects.hostname),
                access_token = COALESCE(EXCLUDED.access_token, {s}.ls_projects.access_token),
                from_name = COALESCE(EXCLUDED.from_name, {s}.ls_projects.from_name),
                to_name = COALESCE(EXCLUDED.to_name, {s}.ls_projects.to_name)
            WHERE {s}.ls_projects.project = EXCLUDED.project
            RETURNING project""",
        ls_project, project, hostname, access_token, from_name, to_name,
    )
    if row is not None:
        return row["project"]
    return await conn.fetchval(f"SELECT project FROM {s}.ls_projects WHERE ls_project = $1", ls_project)


async def ls_project(conn: asyncpg.Connection, s: str, ls_project: str) -> asyncpg.Record | None:
    """A Label Studio binding."""
    return await conn.fetchrow(f"SELECT * FROM {s}.ls_projects WHERE ls_project = $1", ls_project)


async def store_webhook(conn: asyncpg.Connection, s: str, project: str, action: str, body: str, *, state: str) -> int:
    """Keep a webhook as it came; its id."""
    return await conn.fetchval(
        f"INSERT INTO {s}.webhooks (project, action, body, state) VALUES ($1, $2, $3::jsonb, $4) RETURNING id",
        project, action, body, state,
    )


async def claim_webhooks(conn: asyncpg.Connection, s: str, limit: int, claim_s: float) -> list[asyncpg.Record]:
    """Claim pending webhooks (and ones whose claim ran out: a worker died) for processing, oldest
    first (UPDATE ... RETURNING does not keep the subquery's order: the outer SELECT orders them)."""
    return await conn.fetch(
        f"""WITH claimed AS (UPDATE {s}.webhooks w SET state = 'processing', attempts = attempts + 1,
                   claimed_until = now() + make_interval(secs => $2)
            FROM (SELECT id FROM {s}.webhooks
                  WHERE (state = 'pending' AND (claimed_until IS NULL OR claimed_until <= now()))
                     OR (state = 'processing' AND claimed_until <= now())
                  ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) c
            WHERE w.id = c.id
            RETURNING w.id, w.project, w.action, w.body, w.attempts)
            SELECT * FROM claimed ORDER BY id""",
        limit,
        claim_s,
    )


async def finish_webhook(conn: asyncpg.Connection, s: str, webhook_id: int, state: str, error: str | None = None) -> bool:
    """Mark a claimed webhook done, failed or ignored; False when it was not claimed any more."""
    done = await conn.fetchval(
        f"""UPDATE {s}.webhooks SET state = $2, error = $3, processed_at = now(), claimed_until = NULL
            WHERE id = $1 AND state = 'processing' RETURNING true""",
        webhook_id, state, error,
    )
    return bool(done)


async def retry_webhook(conn: asyncpg.Connection, s: str, webhook_id: int, error: str, delay_s: float) -> None:
    """Put a claimed webhook back for a later attempt."""
    await conn.execute(
        f"""UPDATE {s}.webhooks SET state = 'pending', error = $2, claimed_until = now() + make_interval(secs => $3)
            WHERE id = $1 AND state = 'processing'""",
        webhook_id, error, delay_s,
    )
