"""Who may submit images over ingest's HTTP API: tokens per upstream system, bound to projects.

The token format and its checks are shared with the gateway (`libs/tokens.py`): only the
SHA-256 of a token is stored, it is shown once, and it can be revoked. A token names the upstream
system it was made for and the projects it may submit to (`*`: every project). The decision
(`denial`) is pure; the SQL is in the functions below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visionloop.libs import tokens

EVERY_PROJECT = "*"


@dataclass(frozen=True)
class Submitter:
    """Who a valid token speaks for."""

    token_id: str
    name: str
    projects: tuple[str, ...]


@dataclass(frozen=True)
class Denial:
    """Why a submission over HTTP is refused: status, reason code, a sentence."""

    status: int
    reason: str
    message: str


UNAUTHENTICATED = Denial(401, "unauthenticated", (
    "send an ingest token: `Authorization: Bearer <token>` (create one with "
    "`visionloop ingest token create --name SYSTEM --project P`)"))


def denial(submitter: Submitter | None, project: str | None) -> Denial | None:
    """None when `submitter` may submit to `project` (None: not known yet); else why not."""
    if submitter is None:
        return UNAUTHENTICATED
    if project is None or EVERY_PROJECT in submitter.projects or project in submitter.projects:
        return None
    return Denial(403, "wrong_project", f"this token may submit to {', '.join(submitter.projects)}, not to {project!r}")


async def create(conn: Any, schema: str, *, name: str, projects: list[str]) -> tuple[str, str]:
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


async def listing(conn: Any, schema: str) -> list[dict[str, Any]]:
    """Every token (never its secret), newest first."""
    rows = await conn.fetch(f"SELECT token_id, name, projects, created_at, revoked_at FROM {schema}.tokens ORDER BY created_at DESC")
    return [dict(r) for r in rows]


async def revoke(conn: Any, schema: str, token_id: str) -> bool:
    """Revoke a token; False when there is no active one with that id."""
    done = await conn.execute(f"UPDATE {schema}.tokens SET revoked_at = now() WHERE token_id = $1 AND revoked_at IS NULL", token_id)
    return done.endswith(" 1")
