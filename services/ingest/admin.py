"""Administration from the command line (`visionloop ingest token ...`): tokens, straight in
ingest's schema, which is migrated first so this works before the service ever ran."""

from __future__ import annotations

from typing import Any

from visionloop.libs.db import BUS_MIGRATIONS, create_pool, discover, migrate, quote_ident
from visionloop.libs.settings import Settings
from visionloop.services.ingest import tokens
from visionloop.services.ingest.service import SPEC


async def _pool(settings: Settings):  # noqa: ANN202 - asyncpg.Pool
    pool = await create_pool(settings, min_size=1, max_size=2)
    schema = settings.schema_for(SPEC.name)
    await migrate(pool, schema, discover("bus", BUS_MIGRATIONS) + SPEC.migrations)
    return pool, quote_ident(schema)


async def create_token(settings: Settings, *, name: str, projects: list[str]) -> tuple[str, str]:
    """Create a token for an upstream system; (token id, token). Printed once, never stored."""
    pool, s = await _pool(settings)
    try:
        async with pool.acquire() as conn:
            return await tokens.create(conn, s, name=name, projects=projects)
    finally:
        await pool.close()


async def list_tokens(settings: Settings) -> list[dict[str, Any]]:
    """Every token, never its secret."""
    pool, s = await _pool(settings)
    try:
        async with pool.acquire() as conn:
            return await tokens.listing(conn, s)
    finally:
        await pool.close()


async def revoke_token(settings: Settings, token_id: str) -> bool:
    """Revoke a token by id (it stops working at once)."""
    pool, s = await _pool(settings)
    try:
        async with pool.acquire() as conn:
            return await tokens.revoke(conn, s, token_id)
    finally:
        await pool.close()
