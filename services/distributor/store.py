"""Every SQL statement of the distributor (its schema: `packages`, `releases`, `devices`,
`release_devices`, `device_events`; the model library's schema is `libs/library.py`'s)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from visionloop.contracts import DeviceStatus, ModelPackaged
from visionloop.libs.db import quote_ident


async def record_package(conn: Any, s: str, p: ModelPackaged, project: str, manifest: dict[str, Any]) -> None:
    """A checked package (the package server serves only these)."""
    await conn.execute(
        f"""INSERT INTO {s}.packages (package_sha256, package_uri, project, model_id, version, target, precision, size_bytes,
                signature, key_id, manifest)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb) ON CONFLICT DO NOTHING""",
        p.package_sha256, p.package_uri, project, p.lineage.model.model_id, p.lineage.model.version, p.target.value,
        p.precision.value, p.size_bytes, p.signature, p.key_id, json.dumps(manifest),
    )


async def package_known(conn: Any, s: str, sha256: str) -> bool:
    return bool(await conn.fetchval(f"SELECT true FROM {s}.packages WHERE package_sha256 = $1", sha256))


async def release_exists(conn: Any, s: str, release_id: str) -> bool:
    return bool(await conn.fetchval(f"SELECT true FROM {s}.releases WHERE release_id = $1", release_id))


async def supersede(conn: Any, s: str, fleet: str, target: str) -> str | None:
    """Supersede the fleet's active releases of `target`; the last completed one (None: none)."""
    previous = await conn.fetchval(
        f"""SELECT release_id FROM {s}.releases WHERE fleet = $1 AND target = $2 AND status = 'completed'
            ORDER BY updated_at DESC LIMIT 1""",
        fleet, target,
    )
    await conn.execute(
        f"""UPDATE {s}.releases SET status = 'superseded', updated_at = now()
            WHERE fleet = $1 AND target = $2 AND status IN ('rolling', 'paused')""",
        fleet, target,
    )
    return previous


async def add_release(conn: Any, s: str, *, release_id: str, project: str, fleet: str, p: ModelPackaged, stages: list[float],
                      canary: list[str], status: str, previous: str | None) -> None:
    await conn.execute(
        f"""INSERT INTO {s}.releases (release_id, project, fleet, target, model_id, version, package_sha256, stages, canary_devices,
                status, previous_release)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11)""",
        release_id, project, fleet, p.target.value, p.lineage.model.model_id, p.lineage.model.version, p.package_sha256,
        json.dumps(stages), json.dumps(canary), status, previous,
    )


async def release(conn: Any, s: str, release_id: str) -> dict[str, Any] | None:
    """A release with its package's URI, signature and key."""
    row = await conn.fetchrow(
        f"""SELECT r.*, p.package_uri, p.signature, p.key_id FROM {s}.releases r
            JOIN {s}.packages p USING (package_sha256) WHERE r.release_id = $1""",
        release_id,
    )
    if row is None:
        return None
    found = dict(row)
    found["stages"] = json.loads(found["stages"])
    found["canary_devices"] = json.loads(found["canary_devices"])
    return found


async def latest_release(conn: Any, s: str, fleet: str | None) -> str | None:
    return await conn.fetchval(f"SELECT release_id FROM {s}.releases WHERE fleet = $1 ORDER BY created_at DESC LIMIT 1", fleet)


async def lock_release(conn: Any, release_id: str) -> None:
    """Serialise the release's rollout steps until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-release:{release_id}")


async def set_stage(conn: Any, s: str, release_id: str, index: int, *, reason: str | None = None, resume: bool = False) -> None:
    if resume:
        await conn.execute(
            f"UPDATE {s}.releases SET stage_index = $2, status = 'rolling', reason = $3, updated_at = now() WHERE release_id = $1",
            release_id, index, reason,
        )
    else:
        await conn.execute(f"UPDATE {s}.releases SET stage_index = $2, updated_at = now() WHERE release_id = $1", release_id, index)


async def set_status(conn: Any, s: str, release_id: str, status: str, reason: str | None) -> None:
    await conn.execute(f"UPDATE {s}.releases SET status = $2, reason = $3, updated_at = now() WHERE release_id = $1", release_id, status, reason)


async def fleet_devices(conn: Any, s: str, fleet: str) -> list[str]:
    return [r["device_id"] for r in await conn.fetch(f"SELECT device_id FROM {s}.devices WHERE fleet = $1", fleet)]


async def device_reports(conn: Any, s: str, release_id: str) -> dict[str, str]:
    """Each device's last state on a release."""
    return {r["device_id"]: r["state"] for r in await conn.fetch(
        f"SELECT device_id, state FROM {s}.release_devices WHERE release_id = $1", release_id
    )}


async def record_device(conn: Any, s: str, d: DeviceStatus) -> bool:
    """A device's report: its state always; its report on a release (not a heartbeat) in the release's log too.
    True when the fleet did not know the device before."""
    active = f"{d.active_model.model_id}:v{d.active_model.version}" if d.active_model else None
    return bool(await conn.fetchval(
        f"""INSERT INTO {s}.devices (fleet, device_id, state, release_id, active_model) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (fleet, device_id) DO UPDATE SET state = EXCLUDED.state, last_seen = now(),
                release_id = coalesce(EXCLUDED.release_id, {s}.devices.release_id),
                active_model = coalesce(EXCLUDED.active_model, {s}.devices.active_model)
            RETURNING (xmax = 0)""",
        d.fleet, d.device_id, d.state.value, d.release_id, active,
    ))


async def rolling_releases(conn: Any, s: str, fleet: str) -> list[str]:
    """Ids of the fleet's rolling releases."""
    return [r["release_id"] for r in await conn.fetch(f"SELECT release_id FROM {s}.releases WHERE fleet = $1 AND status = 'rolling'", fleet)]


async def record_release_report(conn: Any, s: str, d: DeviceStatus) -> None:
    await conn.execute(
        f"INSERT INTO {s}.device_events (fleet, device_id, release_id, state, reason, message) VALUES ($1, $2, $3, $4, $5, $6)",
        d.fleet, d.device_id, d.release_id, d.state.value, d.reason.value if d.reason else None, d.message,
    )
    await conn.execute(
        f"""INSERT INTO {s}.release_devices (release_id, device_id, state, reason, message) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (release_id, device_id) DO UPDATE SET state = EXCLUDED.state, reason = EXCLUDED.reason,
                message = EXCLUDED.message, updated_at = now()""",
        d.release_id, d.device_id, d.state.value, d.reason.value if d.reason else None, d.message,
    )


async def releases_report(pool: asyncpg.Pool, schema: str, fleet: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Releases, newest first, with the device states per release (the CLI and dashboards)."""
    s = quote_ident(schema)
    rows = await pool.fetch(
        f"""SELECT r.*, coalesce((SELECT jsonb_object_agg(state, n) FROM (
                    SELECT state, count(*) AS n FROM {s}.release_devices d WHERE d.release_id = r.release_id GROUP BY state) c), '{{}}') AS devices
            FROM {s}.releases r WHERE $1::text IS NULL OR r.fleet = $1 ORDER BY r.created_at DESC LIMIT $2""",
        fleet, limit,
    )
    out = []
    for r in rows:
        row = dict(r)
        row["stages"] = json.loads(row["stages"])
        row["canary_devices"] = json.loads(row["canary_devices"])
        row["devices"] = json.loads(row["devices"]) if isinstance(row["devices"], str) else row["devices"]
        row["created_at"] = row["created_at"].isoformat()
        row["updated_at"] = row["updated_at"].isoformat()
        out.append(row)
    return out
