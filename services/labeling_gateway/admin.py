"""Administration from the command line (`visionloop gateway ...`): projects and tokens, straight
in the gateway's schema, which is migrated first so this works before the service ever ran."""

from __future__ import annotations

from collections.abc import Sequence

from visionloop.libs.db import service_schema
from visionloop.libs.settings import Settings
from visionloop.services.labeling_gateway import store
from visionloop.services.labeling_gateway.auth import Role
from visionloop.services.labeling_gateway.service import SPEC


async def create_project(settings: Settings, project: str, classes: Sequence[str], *, created_by: str = "cli") -> list[str]:
    """Create a project with its taxonomy (or append classes to an existing one); the taxonomy."""
    async with service_schema(settings, SPEC.name, SPEC.migrations) as (pool, s), pool.acquire() as conn, conn.transaction():
        await store.ensure_project(conn, s, project, created_by=created_by)
        return await store.add_classes(conn, s, project, classes)


async def create_token(settings: Settings, *, project: str | None, role: str, user_id: str, created_by: str = "cli") -> tuple[str, str]:
    """Create a token; (token id, token). The token is printed once and never stored."""
    async with service_schema(settings, SPEC.name, SPEC.migrations) as (pool, s), pool.acquire() as conn, conn.transaction():
        return await store.create_token(conn, s, project=project, role=Role.parse(role), user_id=user_id, created_by=created_by)


async def revoke_token(settings: Settings, token_id: str) -> bool:
    """Revoke a token by id (it stops working within `token_cache_s`)."""
    async with service_schema(settings, SPEC.name, SPEC.migrations) as (pool, s), pool.acquire() as conn:
        return await store.revoke_token(conn, s, token_id, None)
