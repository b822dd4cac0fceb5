"""The dashboard's queries: its read model (the `dash_*` tables of `0002_dashboard.sql`, written by
the handlers of `pipeline status`, `release edge|server` and `device status`) and what the page
reads of it and of the queue. Kept apart from store.py, which holds the queue's own queries.

Functions take an open connection (or pool) and the quoted schema name, like store.py's.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True)


# -- the read model -----------------------------------------------------------------------------------


async def last_status(conn: asyncpg.Connection, s: str, service: str, instance: str) -> asyncpg.Record | None:
    """An instance's latest kept status (uptime, handled, rate, when), locked until the transaction ends."""
    return await conn.fetchrow(
        f"""SELECT uptime_s, coalesce((counters->>'handled')::bigint, 0) AS handled, handled_per_s, occurred_at
            FROM {s}.dash_instances WHERE service = $1 AND instance = $2 FOR UPDATE""",
        service, instance,
    )


async def keep_status(conn: asyncpg.Connection, s: str, *, service: str, instance: str, kind: str, uptime_s: float,
                      counters: dict[str, int], gauges: dict[str, float], rate: float | None, at: datetime) -> None:
    """An instance's latest status and its throughput since the one before."""
    await conn.execute(
        f"""INSERT INTO {s}.dash_instances (service, instance, kind, uptime_s, counters, gauges, handled_per_s, occurred_at)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8)
            ON CONFLICT (service, instance) DO UPDATE SET kind = excluded.kind, uptime_s = excluded.uptime_s,
                counters = excluded.counters, gauges = excluded.gauges, handled_per_s = excluded.handled_per_s,
                occurred_at = excluded.occurred_at""",
        service, instance, kind, uptime_s, _json(counters), _json(gauges), rate, at,
    )


async def keep_release(conn: asyncpg.Connection, s: str, row: dict[str, Any], at: datetime) -> None:
    """A release's latest stage (an older event, redelivered, changes nothing)."""
    await conn.execute(
        f"""INSERT INTO {s}.dash_releases (release_id, kind, fleet, target, action, model_id, model_version, rollback_to,
                                           stage_index, stage_percent, first_at, occurred_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)
            ON CONFLICT (release_id) DO UPDATE SET action = excluded.action, rollback_to = excluded.rollback_to,
                stage_index = excluded.stage_index, stage_percent = excluded.stage_percent,
                first_at = least(dash_releases.first_at, excluded.first_at), occurred_at = excluded.occurred_at
            WHERE dash_releases.occurred_at <= excluded.occurred_at""",
        row["release_id"], row["kind"], row["fleet"], row["target"], row["action"], row["model_id"], row["model_version"],
        row["rollback_to"], row["stage_index"], row["stage_percent"], at,
    )


async def keep_device(conn: asyncpg.Connection, s: str, row: dict[str, Any], at: datetime, *, heartbeat: bool) -> None:
    """A device's latest state per release; a heartbeat only says it is alive (`last_seen`)."""
    await conn.execute(
        f"""INSERT INTO {s}.dash_devices AS d (release_id, device_id, fleet, state, reason, active_model, occurred_at, last_seen)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
            ON CONFLICT (release_id, device_id) DO UPDATE SET
                last_seen = greatest(d.last_seen, excluded.last_seen),
                active_model = CASE WHEN excluded.occurred_at >= d.occurred_at THEN coalesce(excluded.active_model, d.active_model) ELSE d.active_model END,
                state = CASE WHEN NOT $8 AND excluded.occurred_at >= d.occurred_at THEN excluded.state ELSE d.state END,
                reason = CASE WHEN NOT $8 AND excluded.occurred_at >= d.occurred_at THEN excluded.reason ELSE d.reason END,
                occurred_at = CASE WHEN NOT $8 AND excluded.occurred_at >= d.occurred_at THEN excluded.occurred_at ELSE d.occurred_at END""",
        row["release_id"], row["device_id"], row["fleet"], row["state"], row["reason"], row["active_model"], at, heartbeat,
    )


# -- what the page reads ------------------------------------------------------------------------------


async def recent_instances(pool: Any, s: str, shown_for_s: float) -> list[asyncpg.Record]:
    """Every instance heard from in the last `shown_for_s`, with how long ago (`ago`, seconds)."""
    return await pool.fetch(
        f"""SELECT *, extract(epoch FROM now() - occurred_at) AS ago FROM {s}.dash_instances
            WHERE occurred_at > now() - make_interval(secs => $1) ORDER BY service, instance""",
        shown_for_s,
    )


async def open_tasks(pool: Any, s: str, project: str | None) -> list[asyncpg.Record]:
    """Open tasks by project, kind and state (`leased`: queued and held)."""
    return await pool.fetch(
        f"""SELECT project, kind,
                   CASE WHEN state = 'queued' AND held_until > now() THEN 'leased' ELSE state END AS state, count(*) AS n
            FROM {s}.tasks WHERE state IN ('verifying', 'queued', 'submitted') AND ($1::text IS NULL OR project = $1)
            GROUP BY 1, 2, 3 ORDER BY 1, 2""",
        project,
    )


async def queued_by_reason(pool: Any, s: str, project: str | None) -> list[asyncpg.Record]:
    """Tasks waiting for people (queued, held or not) by project, kind and why they are for people."""
    return await pool.fetch(
        f"""SELECT project, kind, coalesce(reason, 'unknown') AS reason, count(*) AS n FROM {s}.tasks
            WHERE state = 'queued' AND ($1::text IS NULL OR project = $1) GROUP BY 1, 2, 3 ORDER BY 1, 2, 4 DESC""",
        project,
    )


async def latest_releases(pool: Any, s: str, limit: int) -> list[asyncpg.Record]:
    """The `limit` releases heard from last, newest first."""
    return await pool.fetch(f"SELECT * FROM {s}.dash_releases ORDER BY occurred_at DESC LIMIT {int(limit)}")


async def device_counts(pool: Any, s: str, release_ids: list[str]) -> list[asyncpg.Record]:
    """Devices per release and state."""
    return await pool.fetch(
        f"SELECT release_id, state, count(*) AS n FROM {s}.dash_devices WHERE release_id = ANY($1::text[]) GROUP BY 1, 2 ORDER BY 1, 2",
        release_ids,
    )
