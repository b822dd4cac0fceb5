"""PostgreSQL access: the asyncpg pool and plain versioned SQL migrations per service schema.

Each service owns one schema. Its migrations are `NNNN_name.sql` files applied in order inside
that schema (the bus's own tables first, then the service's), each in its own transaction, and
recorded with a checksum. A session-level advisory lock per schema makes concurrent starts of
several replicas safe: the first applies, the others wait and then find nothing to do.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from visionloop.libs.settings import Settings

log = logging.getLogger(__name__)

BUS_MIGRATIONS = Path(__file__).parent / "migrations"
"""The bus's tables (inbox, outbox, bus state), created in every service schema."""

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """A migration could not be applied, or an applied one was edited afterwards."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def quote_ident(name: str) -> str:
    """Quote a schema name after checking it is a plain identifier (no injection via settings)."""
    if not _IDENT.match(name):
        raise ValueError(f"{name!r} is not a valid schema name (lowercase letters, digits, _)")
    return f'"{name}"'


def quote_literal(value: str) -> str:
    """A SQL string literal for `value` (for the few statements sent with the simple protocol,
    which carries no parameters; `standard_conforming_strings` is on since PostgreSQL 9.1)."""
    if "\x00" in value:
        raise ValueError("a SQL literal cannot hold a NUL character")
    return "'" + value.replace("'", "''") + "'"


def database_url(settings: Settings) -> str:
    """The connection URL in force, with the password from its file merged in when configured."""
    if settings.database_url is None:
        raise RuntimeError("no database configured: set VL_DATABASE_URL or use `visionloop up`")
    url = settings.database_url
    if settings.database_password_file:
        password = Path(settings.database_password_file).read_text(encoding="utf-8").strip()
        parts = urlsplit(url)
        user = parts.username or "postgres"
        host = parts.netloc.rsplit("@", 1)[-1]
        url = urlunsplit(parts._replace(netloc=f"{quote(user)}:{quote(password, safe='')}@{host}"))
    return url


async def create_pool(settings: Settings, *, min_size: int | None = None, max_size: int | None = None) -> asyncpg.Pool:
    """An asyncpg pool for the configured database."""
    pool = await asyncpg.create_pool(
        database_url(settings),
        min_size=settings.db_pool_min if min_size is None else min_size,
        max_size=settings.db_pool_max if max_size is None else max_size,
        command_timeout=60,
        reset=_reset,
    )
    assert pool is not None
    return pool


async def _reset(conn: asyncpg.Connection) -> None:
    """Nothing to undo when a connection goes back to the pool beyond what asyncpg always does
    (roll back a transaction left open by a failure).

    asyncpg's default reset adds a round trip of four statements per use (advisory unlock,
    CLOSE ALL, UNLISTEN, RESET ALL); this code leaves no such session state behind (its one
    session advisory lock, in `migrate`, is released in a `finally`; settings are `SET LOCAL`).
    """


@dataclass(frozen=True)
class Migration:
    """One SQL file: `source/NNNN_name.sql`."""

    source: str
    path: Path

    @property
    def version(self) -> str:
        """The key recorded when applied, unique across sources."""
        return f"{self.source}/{self.path.name}"

    @property
    def sql(self) -> str:
        """The file's text."""
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text: an applied migration must never change."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(source: str, folder: Path) -> list[Migration]:
    """The migrations in `folder`, in version order; misnamed files are an error, not skipped."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".sql":
            continue
        if not _FILE.match(path.name):
            raise MigrationError("bad_migration_name", f"{path}: migrations are named NNNN_name.sql")
        found.append(Migration(source, path))
    return found


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"visionloop.migrate.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(pool: asyncpg.Pool, schema: str, migrations: list[Migration]) -> list[str]:
    """Apply the pending `migrations` inside `schema`; return the versions applied now."""
    qschema = quote_ident(schema)
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(schema))
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {qschema}")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {qschema}.schema_migrations (
                        version text PRIMARY KEY,
                        checksum text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            rows = await conn.fetch(f"SELECT version, checksum FROM {qschema}.schema_migrations")
            applied = {r["version"]: r["checksum"] for r in rows}
            for migration in migrations:
                if migration.version in applied:
                    if applied[migration.version] != migration.checksum:
                        raise MigrationError(
                            "migration_edited",
                            f"{migration.version} was applied to schema {schema} and has been edited "
                            "since; add a new migration instead of changing an applied one",
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL search_path TO {qschema}, public")
                    await conn.execute(migration.sql)
                    await conn.execute(
                        f"INSERT INTO {qschema}.schema_migrations (version, checksum) VALUES ($1, $2)",
                        migration.version,
                        migration.checksum,
                    )
                applied_now.append(migration.version)
                log.info("applied migration %s to schema %s", migration.version, schema)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _lock_key(schema))
    return applied_now


@asynccontextmanager
async def service_schema(settings: Settings, service: str, migrations: list[Migration]) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    """A small pool and the service's quoted schema, migrated first (the bus's tables and
    `migrations`), for commands that work on a service's data before the service ever ran
    (`visionloop ingest token ...`, `visionloop gateway ...`). The pool closes on exit."""
    pool = await create_pool(settings, min_size=1, max_size=2)
    try:
        schema = settings.schema_for(service)
        await migrate(pool, schema, discover("bus", BUS_MIGRATIONS) + migrations)
        yield pool, quote_ident(schema)
    finally:
        await pool.close()
