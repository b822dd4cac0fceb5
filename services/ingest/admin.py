"""Administration from the command line (`visionloop ingest token ...`): tokens, straight in
ingest's schema, which is migrated first so this works before the service ever ran."""

from __future__ import annotations

from typing import Any

from visionloop.libs.db import service_schema
from visionloop.libs.settings import Settings
from visionloop.services.ingest import store
from visionloop.services.ingest.service import SPEC


async def create_token(settings: Settings, *, name: str, projects: list[str]) -> tuple[str, str]:
    """Create a token for an upstream system; (token id, token). Printed once, never stored."""
    async with service_schema(settings, SPEC.name, SPEC.migrations) as (pool, s), pool.acquire() as conn:
        return await store.create_token(conn, s, name=name, projects=projects)


async def list_tokens(settings: Settings) -> list[dict[str, Any]]:
    """Every token, never its secret."""
    async with service_schema(settings, SPEC.name, SPEC.migrations) as (pool, s), pool.acquire() as conn:
        return await store.list_tokens(conn, s)


async def revoke_token(settings: Settings, token_id: str) -> bool:
    """Revoke a token by id (it stops working at once)."""
    async with service_schema(settings, SPEC.name, SPEC.migrations) as (pool, s), pool.acquire() as conn:
        return await store.revoke_token(conn, s, token_id)
