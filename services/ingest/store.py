"""Every SQL statement of ingest (its schema: `images`, `submissions`, `tokens`)."""

from __future__ import annotations

from typing import Any

from visionloop.libs import tokens
from visionloop.services.ingest.tokens import Submitter


# -- submissions ----------------------------------------------------------------------------------
async def lock_submission(conn: Any, key: str) -> None:
    """Serialise attempts on one submission (HTTP and topic alike) until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)


async def submission(conn: Any, schema: str, project: str, submission_id: str) -> Any:
    """The recorded outcome of a submission (outcome, content_sha256, answer), or None."""
    return await conn.fetchrow(
        f"SELECT outcome, content_sha256, answer FROM {schema}.submissions WHERE project = $1 AND submission_id = $2",
        project, submission_id,
    )


async def store_image(conn: Any, schema: str, *, image_id: str, blob_uri: str, width: int, height: int, format: str,
                      byte_size: int, submission_id: str) -> bool:
    """Record the image's bytes once; True when they are new to ingest (any project)."""
    first = await conn.fetchval(
        f"""INSERT INTO {schema}.images (image_id, blob_uri, width, height, format, byte_size, first_submission)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (image_id) DO NOTHING RETURNING true""",
        image_id, blob_uri, width, height, format, byte_size, submission_id,
    )
    return bool(first)


async def ingested_in(conn: Any, schema: str, project: str, image_id: str) -> bool:
    """Whether `project` has ingested these bytes before."""
    return bool(await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {schema}.submissions WHERE project = $1 AND image_id = $2 AND outcome = 'ingested')",
        project, image_id,
    ))


async def record_submission(conn: Any, schema: str, *, submission_id: str, project: str, image_id: str | None, outcome: str,
                            reason: str | None, content_sha256: str | None, answer: str, channel: str) -> None:
    """The submission's answer (replacing an earlier one of the same id)."""
    await conn.execute(
        f"""INSERT INTO {schema}.submissions
                (submission_id, project, image_id, outcome, reason, content_sha256, answer, channel)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (project, submission_id) DO UPDATE
            SET image_id = EXCLUDED.image_id, outcome = EXCLUDED.outcome,
                reason = EXCLUDED.reason, content_sha256 = EXCLUDED.content_sha256,
                answer = EXCLUDED.answer, channel = EXCLUDED.channel, decided_at = now()""",
        submission_id, project, image_id, outcome, reason, content_sha256, answer, channel,
    )


# -- tokens ---------------------------------------------------------------------------------------
async def create_token(conn: Any, schema: str, *, name: str, projects: list[str]) -> tuple[str, str]:
    """Store a new token; return (token id, token). The token is shown once and never stored."""
    token_id, token, hashed = tokens.new_token()
    await conn.execute(
        f"INSERT INTO {schema}.tokens (token_id, secret_sha256, name, projects) VALUES ($1, $2, $3, $4)",
        token_id, hashed, name, projects,
    )
    return token_id, token


async def submitter_for(conn: Any, schema: str, token: str | None) -> Submitter | None:
    """Who `token` speaks for, or None (absent, unknown shape, unknown id, wrong secret, revoked)."""
    token_id = tokens.token_id_of(token or "")
    if token is None or token_id is None:
        return None
    row = await conn.fetchrow(f"SELECT secret_sha256, name, projects, revoked_at FROM {schema}.tokens WHERE token_id = $1", token_id)
    if row is None or row["revoked_at"] is not None or not tokens.matches(token, row["secret_sha256"]):
        return None
    return Submitter(token_id, row["name"], tuple(row["projects"]))


async def list_tokens(conn: Any, schema: str) -> list[dict[str, Any]]:
    """Every token (never its secret), newest first."""
    rows = await conn.fetch(f"SELECT token_id, name, projects, created_at, revoked_at FROM {schema}.tokens ORDER BY created_at DESC")
    return [dict(r) for r in rows]


async def revoke_token(conn: Any, schema: str, token_id: str) -> bool:
    """Revoke a token; False when there is no active one with that id."""
    done = await conn.execute(f"UPDATE {schema}.tokens SET revoked_at = now() WHERE token_id = $1 AND revoked_at IS NULL", token_id)
    return done.endswith(" 1")
