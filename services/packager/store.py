"""Every SQL statement of the packager (its schema: `packages`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from visionloop.contracts import Artifact, ModelPackaged, ModelRef
from visionloop.libs import package


def _where(model: ModelRef, artifact: Artifact) -> tuple[str, int, str, str]:
    return model.model_id, model.version, artifact.target.value, artifact.precision.value


async def stored(conn: Any, s: str, model: ModelRef, artifact: Artifact) -> Any:
    """The package of (model, version, target, precision) made before: its artifact's SHA-256 and event."""
    return await conn.fetchrow(
        f"SELECT artifact_sha256, payload FROM {s}.packages WHERE model_id = $1 AND version = $2 AND target = $3 AND precision = $4",
        *_where(model, artifact),
    )


async def record(conn: Any, s: str, model: ModelRef, artifact: Artifact, *, project: str, built: package.Built, uri: str,
                 packaged: ModelPackaged, created_at: datetime) -> bool:
    """The new package; False when a replica recorded one first."""
    return bool(await conn.fetchval(
        f"""INSERT INTO {s}.packages (model_id, version, target, precision, project, artifact_sha256,
                package_sha256, package_uri, size_bytes, manifest_sha256, key_id, payload, created_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13)
            ON CONFLICT DO NOTHING RETURNING true""",
        *_where(model, artifact), project, artifact.sha256, built.sha256, uri, built.size,
        built.manifest_sha256, built.key_id, packaged.model_dump_json(), created_at,
    ))
