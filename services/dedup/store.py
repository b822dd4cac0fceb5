"""Every SQL statement of dedup/quality (its schema: `decisions`, `hashes`)."""

from __future__ import annotations

import hashlib
from typing import Any

from visionloop.libs.perceptual import Hashes


def _signed(value: int) -> int:
    """A 64-bit hash as PostgreSQL's signed bigint."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _lock_key(project: str) -> int:
    digest = hashlib.sha256(f"visionloop.dedup.{project}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def lock_project(conn: Any, project: str) -> None:
    """Serialise the project's decisions across replicas until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(project))


async def hashes_after(conn: Any, schema: str, project: str, seq: int) -> list[Any]:
    """The project's stored hashes past `seq`, in the order they were committed."""
    return await conn.fetch(
        f"SELECT seq, image_id, phash, dhash FROM {schema}.hashes WHERE project = $1 AND seq > $2 ORDER BY seq",
        project, seq,
    )


async def earlier(conn: Any, schema: str, project: str, image_id: str, *, across: bool) -> tuple[str, bool] | None:
    """The first decision on these bytes in `project` (with `across`, in any project: its own
    first), and whether it was another project's; None when never seen."""
    row = await conn.fetchrow(
        f"SELECT outcome, project <> $1 AS elsewhere FROM {schema}.decisions "
        "WHERE image_id = $2 AND (project = $1 OR $3) ORDER BY project <> $1 LIMIT 1",
        project, image_id, across,
    )
    return None if row is None else (row["outcome"], row["elsewhere"])


async def record_decision(conn: Any, schema: str, project: str, image_id: str, *, accepted: bool, reason: str | None,
                          duplicate_of: str | None, distance: int | None) -> None:
    """The image's one decision in the project."""
    await conn.execute(
        f"""INSERT INTO {schema}.decisions (image_id, project, outcome, reason, duplicate_of, distance)
            VALUES ($1, $2, $3, $4, $5, $6)""",
        image_id, project, "accepted" if accepted else "rejected", reason, duplicate_of, distance,
    )


async def store_hashes(conn: Any, schema: str, project: str, image_id: str, hashes: Hashes) -> None:
    """An accepted image's hashes, for later near-duplicate searches."""
    await conn.execute(
        f"INSERT INTO {schema}.hashes (project, image_id, phash, dhash) VALUES ($1, $2, $3, $4)",
        project, image_id, _signed(hashes.phash), _signed(hashes.dhash),
    )
